"""stream.enforce.Enforcer: outcomes that arrive after a human released the agent (fakes for the database edge)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from connectors.messages import ControlRecord
from connectors.pg_enforce import Revocation
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
