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

    return {
        "agent_id": UNDO_AGENT,
        "run_id": plan,
        "undo": {"plan_id": plan, "batch": 1, "signature": undo_signature(key, plan, tx)},
    }


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


# --- several workers: every member joins every message (Router.join), the group's reader only checks it ---------


def split_router(**kw: object) -> Router:
    return Router([SPEC], message_prefix="writeguard", hold_s=5.0, **kw)  # type: ignore[arg-type]


def test_a_message_joined_by_another_reader_attributes_rows_read_here() -> None:
    r = split_router()
    assert r.route("shop.public.refunds", row("c", 9, 1_000, 1.0), ROW1) == SKIP_PENDING
    r.join(message(9, 1_000, {"agent_id": "a2", "run_id": "r"}), MSG)
    assert [(c.agent_id, c.run_id, c.coords) for c in r.ready] == [("a2", "r", ROW1)]
    out = r.route("shop.public.refunds", row("u", 9, 1_000), ROW2)  # a later row of the same transaction
    assert isinstance(out, Change) and out.agent_id == "a2"


def test_a_message_read_by_both_readers_of_one_worker_releases_its_rows_once() -> None:
    r = split_router()
    assert r.route("shop.public.refunds", row("c", 9, 1_000), ROW1) == SKIP_PENDING
    assert r.route("shop.message", message(9, 1_000, {"agent_id": "a2"}), MSG) == SKIP_MESSAGE  # the group's
    r.join(message(9, 1_000, {"agent_id": "a2"}), MSG)  # the joiner's
    assert [(c.agent_id, c.coords) for c in r.ready] == [("a2", ROW1)] and not r.pending


def test_only_the_group_reader_dead_letters_a_bad_message_and_alerts_a_refusal() -> None:
    from connectors.pg_guard import REFUSED_PREFIX

    r = split_router()
    for bad in (b"not json", {"run_id": "no agent"}):
        r.join(message(2, 5, bad), MSG)  # every member: nothing
        with pytest.raises(EnvelopeError):
            r.route("shop.message", message(2, 5, bad), MSG)  # the one member whose group holds the partition
    refusal = {
        "v": 1,
        "kind": "truncate",
        "command": "TRUNCATE",
        "table": "public.refunds",
        "role": "agent_x",
        "agent_id": "x",
        "at": "2026-03-01T12:00:00+00:00",
    }
    r.join(message(3, 5, refusal, prefix=REFUSED_PREFIX), MSG)
    assert r.ready == []
    assert r.route("shop.message", message(3, 5, refusal, prefix=REFUSED_PREFIX), MSG) == SKIP_MESSAGE
    assert [(c.op, c.agent_id, c.refused) for c in r.ready] == [("m", "x", "truncate: TRUNCATE")]


def test_database_identity_is_checked_by_the_group_reader_and_joined_on_every_worker() -> None:
    r = split_router(database_identity=True)
    trig = {"agent_id": "owner", "role": "owner", "table": "public.refunds"}
    forged = {"agent_id": "other", "role": "impostor", "table": "public.refunds"}
    claim = {"agent_id": "victim"}  # the writer's own message, before the triggers'
    # The group's reader of the messages partition, in topic order: the claim, the triggers', a forged second.
    assert r.route("shop.message", message(5, 7, claim), MSG) == SKIP_MESSAGE
    assert r.route("shop.message", message(5, 7, trig), MSG) == SKIP_MESSAGE
    assert r.route("shop.message", message(5, 7, forged), MSG) == SKIP_MESSAGE
    assert sorted((c.agent_id, c.claimed) for c in r.ready) == [("owner", "other"), ("owner", "victim")]
    r.ready.clear()
    # The joiner of the same worker reads them too: no second mismatch, the first identity names the rows.
    for body in (claim, trig, forged):
        r.join(message(5, 7, body), MSG)
    assert r.ready == []
    out = r.route("shop.public.refunds", row("c", 5, 7), ROW1)
    assert isinstance(out, Change) and out.agent_id == "owner"
    # On a worker that does not read the partition through the group, the joiner alone: the same attribution.
    other = split_router(database_identity=True)
    assert other.route("shop.public.refunds", row("c", 5, 7), ROW1) == SKIP_PENDING
    for body in (claim, trig, forged):
        other.join(message(5, 7, body), MSG)
    assert [(c.agent_id, c.claimed, c.coords) for c in other.ready] == [("owner", None, ROW1)]


def test_revoked_partitions_drop_their_held_rows_for_the_next_owner() -> None:
    r = split_router()
    other = KafkaCoords("shop.public.refunds", 1, 0)
    r.route("shop.public.refunds", row("c", 9, 1_000), ROW1)
    r.route("shop.public.refunds", row("c", 9, 1_000), other)
    r.route("shop.public.refunds", row("c", 10, 1_000), ROW2)
    assert r.forget({("shop.public.refunds", 0)}) == 2
    assert [[c for _, _, c in held] for held in r.pending.values()] == [[other]]


def test_with_an_arrival_clock_a_backlog_waits_from_when_it_was_read() -> None:
    r = split_router()
    clock = [100_000_000]
    r.arrival_clock = lambda: clock[0]
    r.route("shop.public.refunds", row("c", 30, 1_000), ROW1)  # committed long before it is read
    assert r.expire(clock[0] + 4_000_000) == 0 and r.ready == []  # old by commit time, yet within hold_s
    clock[0] += 1_000_000
    r.route("shop.public.refunds", row("c", 31, 1_000), ROW2)
    assert r.expire(100_000_000 + 5_500_000) == 1
    assert [(c.coords, c.agent_id) for c in r.ready] == [(ROW1, UNATTRIBUTED)]
    r.join(message(31, 1_000, {"agent_id": "late"}), MSG)
    assert r.ready[-1].agent_id == "late" and not r.pending and not r._held_at
