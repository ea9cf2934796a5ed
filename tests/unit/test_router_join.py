"""Agents named by a logical decoding message in their transaction: the join of m events to row events."""

from __future__ import annotations

import base64
import json

import pytest

from connectors.debezium import EnvelopeError
from detectors.engine import UNATTRIBUTED, Change, KafkaCoords
from detectors.spec import FeatureSpec, TableSpec
from stream.pipeline import SKIP_MESSAGE, SKIP_PENDING, Router

# The router carries each record's coordinates along without reading them.
MSG = KafkaCoords("shop.message", 0, 0)
ROW, ROW1, ROW2 = (KafkaCoords("shop.public.refunds", 0, i) for i in range(3))
SPEC = TableSpec(
    name="public.refunds", topic="shop.public.refunds", features=(FeatureSpec(name="amount", column="amount"),)
)


def row(op: str, tx: int, ts_us: int, amount: float = 10.0, agent: str | None = None) -> bytes:
    image = {"id": 1, "amount": amount, **({"agent_id": agent} if agent else {})}
    return json.dumps(
        {
            "op": op,
            "before": image if op == "d" else None,
            "after": None if op in ("d", ROW) else image,
            "source": {"ts_us": ts_us, "schema": "public", "table": "refunds", "txId": tx, "connector": "postgresql"},
        }
    ).encode()


def message(tx: int, ts_us: int, content: object, prefix: str = "writeguard") -> bytes:
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    return json.dumps(
        {
            "op": "m",
            "ts_ms": ts_us // 1000,
            "source": {"ts_us": ts_us, "schema": "", "table": "", "txId": tx, "connector": "postgresql"},
            "message": {"prefix": prefix, "content": base64.b64encode(raw).decode()},
        }
    ).encode()


def router() -> Router:
    return Router([SPEC], message_prefix="writeguard", hold_s=5.0)


def test_message_first_then_rows_are_attributed_at_once() -> None:
    r = router()
    assert r.route("shop.message", message(7, 1_000, {"agent_id": "a1", "run_id": "r1"}), MSG) == SKIP_MESSAGE
    out = r.route("shop.public.refunds", row("c", 7, 1_000), ROW)
    assert isinstance(out, Change) and (out.agent_id, out.run_id, out.x) == ("a1", "r1", {"amount": 10.0})


def test_rows_first_wait_for_their_message_then_are_released_in_order() -> None:
    r = router()
    assert r.route("shop.public.refunds", row("c", 9, 1_000, 1.0), ROW1) == SKIP_PENDING
    assert r.route("shop.public.refunds", row("u", 9, 1_000, 2.0), ROW2) == SKIP_PENDING
    assert r.ready == []
    r.route("shop.message", message(9, 1_000, {"agent_id": "a2"}), MSG)
    assert [(c.agent_id, c.coords, c.op) for c in r.ready] == [("a2", ROW1, "c"), ("a2", ROW2, "u")]
    assert r.pending == {}


def test_a_truncate_is_attributed_through_its_transaction() -> None:
    r = router()
    r.route("shop.message", message(11, 5, {"agent_id": "cleaner"}), MSG)
    out = r.route("shop.public.refunds", row("t", 11, 5), ROW)
    assert isinstance(out, Change) and out.op == "t" and out.agent_id == "cleaner"


def test_a_column_in_the_row_wins_over_the_message() -> None:
    r = router()
    r.route("shop.message", message(3, 5, {"agent_id": "from-message"}), MSG)
    out = r.route("shop.public.refunds", row("c", 3, 5, agent="from-row"), ROW)
    assert isinstance(out, Change) and out.agent_id == "from-row"


def test_rows_whose_message_never_comes_are_scored_as_unattributed_not_dropped() -> None:
    r = router()
    r.route("shop.public.refunds", row("c", 20, 1_000_000), ROW)
    r.route("shop.public.refunds", row("t", 21, 1_000_000), ROW)
    assert r.expire(1_000_000 + 4_000_000) == 0  # still within hold_s
    assert r.ready == []
    assert r.expire(1_000_000 + 6_000_000) == 2
    assert [(c.op, c.agent_id) for c in r.ready] == [("c", UNATTRIBUTED), ("t", UNATTRIBUTED)]
    assert r.pending == {}


def test_other_prefixes_are_ignored_and_bad_content_is_a_dead_letter() -> None:
    r = router()
    assert r.route("shop.message", message(1, 5, {"agent_id": "x"}, prefix="audit"), MSG) == SKIP_MESSAGE
    assert r.route("shop.public.refunds", row("c", 1, 5), ROW) == SKIP_PENDING
    for bad in (b"not json", {"run_id": "no agent"}, ["a", "list"], {"agent_id": {"nested": 1}}):
        with pytest.raises(EnvelopeError) as e:
            r.route("shop.message", message(2, 5, bad), MSG)
        assert e.value.reason == "invalid_message"


def test_without_a_message_prefix_rows_without_agent_are_scored_as_unattributed() -> None:
    r = Router([SPEC])
    for op in ("c", "t"):
        out = r.route("shop.public.refunds", row(op, 1, 5), ROW)
        assert isinstance(out, Change) and (out.op, out.agent_id) == (op, UNATTRIBUTED)


def test_a_row_cannot_take_a_reserved_identity() -> None:
    out = Router([SPEC]).route("shop.public.refunds", row("c", 1, 5, agent="<role:app_owner>"), ROW)
    assert isinstance(out, Change) and out.agent_id == UNATTRIBUTED


def test_memory_is_bounded_whatever_the_input() -> None:
    r = Router([SPEC], message_prefix="writeguard", max_tx=10)
    for tx in range(50):
        r.route("shop.public.refunds", row("c", tx, 5), ROW)
        r.route("shop.message", message(1000 + tx, 5, {"agent_id": "a"}), MSG)
    assert len(r.pending) <= 10 and len(r._tx_agents) <= 10


UNDO_KEY = b"u" * 32


def undo_body(plan: str, tx: int, key: bytes = UNDO_KEY) -> dict[str, object]:
    from connectors.messages import UNDO_AGENT, undo_signature

    return {"agent_id": UNDO_AGENT, "run_id": plan, "undo": {"plan_id": plan, "batch": 1,
            "signature": undo_signature(key, plan, tx)}}


def undo_router() -> Router:
    return Router([SPEC], message_prefix="writeguard", hold_s=5.0, undo_keys=(UNDO_KEY,))


def test_rows_of_a_signed_undo_transaction_are_neither_scored_nor_held() -> None:
    from stream.pipeline import SKIP_UNDO

    r = undo_router()
    # A row that names no agent arrives first and waits; the undo's message then drops it.
    assert r.route("shop.public.refunds", row("u", 41, 1_000), ROW1) == SKIP_PENDING
    assert r.route("shop.message", message(41, 1_000, undo_body("plan-1", 41)), MSG) == SKIP_MESSAGE
    assert not r.pending and r.ready == []
    # Later rows of the same transaction, whatever agent their images name (a restored agent column).
    assert r.route("shop.public.refunds", row("d", 41, 1_000, agent="rogue"), ROW2) == SKIP_UNDO
    # Another transaction is scored as usual.
    out = r.route("shop.public.refunds", row("c", 42, 2_000, agent="a1"), ROW)
    assert isinstance(out, Change) and out.agent_id == "a1"


@pytest.mark.parametrize(
    "body",
    [
        undo_body("plan-1", 41, key=b"x" * 32),  # another key: forged
        undo_body("plan-1", 40),  # signed for another transaction: copied
        {"agent_id": "writeguard-undo", "run_id": "plan-1"},  # no signature at all
    ],
)
def test_an_undo_message_without_a_valid_signature_exempts_nothing(body: dict[str, object]) -> None:
    r = undo_router()
    assert r.route("shop.message", message(41, 1_000, body), MSG) == SKIP_MESSAGE
    out = r.route("shop.public.refunds", row("c", 41, 1_000), ROW)
    # Scored, under the name it claimed: an agent hiding behind the undo's name is judged like any other.
    assert isinstance(out, Change) and out.agent_id == "writeguard-undo"
