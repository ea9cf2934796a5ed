"""stream.enforce.Enforcer: outcomes that arrive after a human released the agent (fakes for the database edge)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from connectors.messages import ControlRecord
from connectors.pg_enforce import EnforcementError, Revocation
from stream.config import parse_config
from stream.enforce import Enforcer
from stream.metrics import Metrics
from stream.pipeline import build_alert
from tests.unit.test_messages import DETECTED_US, finding


class BlockedDatabase:
    """A PostgresEnforcer stand-in whose REVOKE waits until the test lets it go."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.released: list[Revocation] = []

    def quarantine(self, agent_id: str) -> Revocation:
        assert self.go.wait(30)
        return Revocation(f"agent_{agent_id}", "revoke_writes", (("public", "refunds", "INSERT"),), None, 0)

    def release(self, rev: Revocation) -> None:
        self.released.append(rev)

    def close(self) -> None:
        pass


def _config() -> Any:
    return parse_config(
        {
            "enforcement": {"postgres": {"dsn": "host=127.0.0.1 port=1", "roles": {"template": "agent_{agent_id}"}}},
            "control": {"signing_key": "unit-test-control-key-0123456789abcdef"},
            "tables": [
                {
                    "name": "public.refunds",
                    "topic": "shop.public.refunds",
                    "features": [{"name": "amount", "column": "amount"}],
                    "actions": {"critical": ["alert", "quarantine", "postgres"]},
                }
            ],
        }
    )


def _run(still_quarantined: bool) -> tuple[list[ControlRecord], BlockedDatabase]:
    published: list[ControlRecord] = []
    db = BlockedDatabase()
    alert = build_alert(finding(actions=("alert", "quarantine", "postgres"), quarantine=True), DETECTED_US)

    async def publish(rec: ControlRecord) -> None:
        published.append(rec)

    async def main() -> None:
        enf = Enforcer(_config(), publish, Metrics(), lambda agent, aid: still_quarantined)
        enf._pg = db  # type: ignore[assignment]
        await enf.start()
        enf.enforce(alert)
        await asyncio.sleep(0)
        db.go.set()  # the REVOKE lands now, after the release (or not) was followed
        for _ in range(200):
            if published or db.released:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        await enf.stop()

    asyncio.run(main())
    return published, db


def test_a_revoke_that_lands_after_the_release_is_granted_back_and_not_published() -> None:
    published, db = _run(still_quarantined=False)
    assert published == []  # no `quarantined` record over the human's `released` one
    assert [r.role for r in db.released] == ["agent_refund-agent-00"]


def test_a_revoke_under_a_standing_quarantine_is_published_and_kept() -> None:
    published, db = _run(still_quarantined=True)
    assert db.released == []
    assert [(r.state, [e.action for e in r.enforcement]) for r in published] == [("quarantined", ["postgres"])]
    assert published[0].enforcement[0].revocation is not None


# -- retries of a failed postgres enforcement --------------------------------------------------------------------


class FlakyDatabase:
    """A PostgresEnforcer stand-in whose quarantine fails with the given errors first, then returns ``rev``."""

    def __init__(self, failures: list[Exception], rev: Revocation | None = None) -> None:
        self.failures = list(failures)
        self.rev = rev
        self.calls = 0

    def quarantine(self, agent_id: str) -> Revocation:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        assert self.rev is not None, "the test gave no revocation for a quarantine that succeeds"
        return self.rev

    def release(self, rev: Revocation) -> None:
        raise AssertionError("nothing is released in these tests")

    def close(self) -> None:
        pass


REVOKED = Revocation("agent_refund-agent-00", "revoke_writes", (("public", "refunds", "INSERT"),), None, 0)


def _enforce(db: FlakyDatabase, delays: tuple[float, ...]) -> tuple[list[ControlRecord], Metrics]:
    """Enforce one quarantining alert against ``db``; returns once the postgres outcome was published."""
    published: list[ControlRecord] = []
    metrics = Metrics()
    alert = build_alert(finding(actions=("alert", "quarantine", "postgres"), quarantine=True), DETECTED_US)

    async def publish(rec: ControlRecord) -> None:
        published.append(rec)

    async def main() -> None:
        enf = Enforcer(_config(), publish, metrics)
        enf._pg = db  # type: ignore[assignment]
        enf.retry_delays = delays
        await enf.start()
        enf.enforce(alert)
        for _ in range(600):
            if published:
                break
            await asyncio.sleep(0.05)
        await enf.stop()

    asyncio.run(main())
    assert published, f"no control record after {db.calls} quarantine attempts"
    return published, metrics


def outcomes(metrics: Metrics) -> dict[str, float | None]:
    return {
        o: metrics.registry.get_sample_value(
            "writeguard_enforcement_actions_total", {"action": "postgres", "outcome": o}
        )
        for o in ("ok", "failed")
    }


def test_a_failure_that_may_pass_is_retried_until_it_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    db = FlakyDatabase(
        [
            EnforcementError("cannot connect to PostgreSQL for enforcement: refused", retryable=True),
            EnforcementError("quarantine not done after 9 attempts in 30 s: waited for a lock", retryable=True),
        ],
        REVOKED,
    )
    with caplog.at_level(logging.WARNING, logger="writeguard.enforce"):
        published, metrics = _enforce(db, (0.01, 0.01, 0.01))
    assert db.calls == 3
    (rec,) = published
    (result,) = rec.enforcement
    assert result.ok is True and result.revocation == REVOKED.to_dict(), result
    assert outcomes(metrics) == {"ok": 1.0, "failed": None}
    # Each failed attempt is in the log, with what went wrong.
    attempts = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert len(attempts) == 2, attempts
    assert "attempt 1 of 4 failed" in attempts[0] and "cannot connect" in attempts[0], attempts
    assert "attempt 2 of 4 failed" in attempts[1] and "waited for a lock" in attempts[1], attempts


def test_a_failure_that_lasts_is_recorded_as_failed_after_the_last_attempt(caplog: pytest.LogCaptureFixture) -> None:
    db = FlakyDatabase([EnforcementError(f"blocked {i}", retryable=True) for i in range(10)])
    with caplog.at_level(logging.WARNING, logger="writeguard.enforce"):
        published, metrics = _enforce(db, (0.01, 0.01))
    assert db.calls == 3  # the first attempt and one per pause
    (rec,) = published
    (result,) = rec.enforcement
    assert result.ok is False and result.revocation is None
    assert result.detail == "failed 3 attempts; the last: blocked 2", result.detail
    assert outcomes(metrics) == {"ok": None, "failed": 1.0}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("trying again" in m for m in messages) == 2, messages
    assert any("enforcement postgres failed" in m and "blocked 2" in m for m in messages), messages


def test_a_refusal_is_not_retried() -> None:
    db = FlakyDatabase([EnforcementError("role 'app_owner' owns watched public.refunds: it is refused")], REVOKED)
    published, metrics = _enforce(db, (0.01, 0.01))
    assert db.calls == 1
    (result,) = published[0].enforcement
    assert result.ok is False and "refused" in result.detail
    assert outcomes(metrics) == {"ok": None, "failed": 1.0}


def test_a_quarantine_that_leaves_writes_open_is_reported_as_not_enforced() -> None:
    partial = Revocation(
        "agent_refund-agent-00",
        "revoke_writes",
        (("public", "refunds", "INSERT"),),
        None,
        0,
        inherited=("PUBLIC",),
        still_writable=("INSERT on public.refunds",),
    )
    published, metrics = _enforce(FlakyDatabase([], partial), (0.01,))
    (result,) = published[0].enforcement
    assert result.ok is False
    assert "not enforced: still writable through INSERT on public.refunds, via PUBLIC" in result.detail, result.detail
    assert result.revocation == partial.to_dict()  # what was taken is still recorded, for the release
    assert outcomes(metrics) == {"ok": None, "failed": 1.0}
