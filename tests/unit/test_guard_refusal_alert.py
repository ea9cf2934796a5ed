"""A statement the guard rails refused (``writeguard guard-sql``'s logical message) becomes a critical alert.

A refused destructive attempt is itself a signal: the router turns the refusal's message into an op ``m``
Change naming the session's agent (from its login role, never from what the session claimed), and the engine
raises one ``guard_refusal`` finding per agent and kind, which quarantines.
"""

from __future__ import annotations

import base64
import json

import pytest

from connectors.debezium import EnvelopeError
from detectors.engine import GUARD_REFUSAL, Engine, KafkaCoords, role_identity
from detectors.spec import FeatureSpec, TableSpec
from stream.pipeline import SKIP_MESSAGE, SKIP_UNWATCHED, Intake, Router, build_alert

SPEC = TableSpec(
    name="public.refunds", topic="shop.public.refunds", features=(FeatureSpec(name="amount", column="amount"),)
)
AT = KafkaCoords("shop.message", 0, 7)
TS = 1_800_000_000_000_000


def refusal(**over: object) -> bytes:
    body = {
        "v": 1,
        "kind": "truncate",
        "command": "TRUNCATE",
        "table": "public.refunds",
        "role": "agent_refund_bot",
        "agent_id": "refund-agent-01",
        "at": "2027-01-15T08:00:00Z",
        **over,
    }
    content = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(
        {
            "op": "m",
            "ts_ms": TS // 1000,
            "source": {"ts_us": TS, "schema": "", "table": "", "connector": "postgresql"},
            "message": {"prefix": "writeguard.refused", "content": content},
        }
    ).encode()


def routed(value: bytes) -> list[object]:
    out: list[object] = []
    intake = Intake(Router([SPEC], message_prefix="writeguard"), out.append, out.append, lambda *d: out.append(d))
    intake.feed("shop.message", value, AT)
    intake.release(None)
    return out


def test_a_refusal_becomes_an_op_m_change_of_the_sessions_agent() -> None:
    [skip, ch] = routed(refusal())
    assert skip == SKIP_MESSAGE
    assert (ch.table, ch.op, ch.agent_id, ch.refused, ch.commit_ts_us, ch.coords) == (  # type: ignore[attr-defined]
        "public.refunds",
        "m",
        "refund-agent-01",
        "truncate: TRUNCATE",
        TS,
        AT,
    )


def test_a_role_of_no_agent_and_a_reserved_claim_are_named_by_the_role() -> None:
    for agent_id in (None, "<unattributed>"):
        [_, ch] = routed(refusal(agent_id=agent_id, role="app_owner"))
        assert ch.agent_id == role_identity("app_owner")  # type: ignore[attr-defined]


def test_an_unwatched_table_is_skipped_and_bad_content_is_a_dead_letter() -> None:
    assert routed(refusal(table="public.other")) == [SKIP_UNWATCHED]
    [(reason, _)] = routed(refusal(kind="explode"))  # type: ignore[misc]
    assert reason == "invalid_message"
    with pytest.raises(EnvelopeError):
        Router([SPEC], message_prefix="writeguard").route("shop.message", refusal(at="yesterday"), AT)


def test_without_agent_messages_a_refusal_is_not_read() -> None:
    assert Router([SPEC]).route("shop.message", refusal(), AT) == SKIP_MESSAGE


def test_the_engine_raises_one_critical_quarantining_alert_per_agent_and_kind() -> None:
    engine = Engine([SPEC])
    [_, ch] = routed(refusal())
    [f] = engine.process(ch)  # type: ignore[arg-type]
    assert (f.detector, f.severity, f.quarantine, f.refused) == (GUARD_REFUSAL, "critical", True, "truncate: TRUNCATE")
    assert engine.process(ch) == []  # type: ignore[arg-type]  # the same attempt again: one open incident
    [_, drop] = routed(refusal(kind="drop", command="DROP TABLE"))
    [g] = engine.process(drop)  # type: ignore[arg-type]
    assert g.refused == "drop: DROP TABLE" and not g.quarantine  # already quarantined by the first
    alert = build_alert(f, TS + 1000)
    assert alert.summary.startswith(
        "public.refunds: the guard rails refused agent refund-agent-01 a statement (truncate: TRUNCATE)"
    ), alert.summary
    assert alert.detector == GUARD_REFUSAL and alert.quarantined
