"""Distinct agent ids stay distinct: over-long ids, and names that look like the identity of rows without an agent.

An id longer than 256 characters used to be cut to 256, so two agents whose ids share those characters shared
models and one quarantine. Now it becomes its first 200 characters, ``~sha256:`` and the digest of the whole id,
on every path: the router's agent column and logical decoding message, the engine's models and quarantine, the
alert, the control record, and the undo reader.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from connectors.debezium import EnvelopeError
from connectors.messages import CONTROL_SIGNATURE_HEADER, ControlRecord, sign_control, verify_control
from connectors.undo_source import UndoReader
from detectors.engine import UNATTRIBUTED, Change, Engine, KafkaCoords, is_reserved
from detectors.features import ID_LIMIT, identity
from detectors.spec import FeatureSpec, Learning, TableSpec, ZScoreSpec
from stream.pipeline import SKIP_MESSAGE, Router, build_alert

TOPIC = "shop.public.refunds"
SPEC = TableSpec(
    name="public.refunds",
    topic=TOPIC,
    key_columns=("id",),
    features=(FeatureSpec(name="amount", column="amount", transform="log"),),
    detectors=(ZScoreSpec(threshold=0.6, warmup=30, population_agents=1, population_writes=1),),
    learning=Learning(writes=0, seconds=0),
)
SHARED = "agent/" + "x" * (ID_LIMIT - 6)  # 256 characters both ids share
ROGUE, NORMAL = SHARED + "-rogue-" + "r" * 37, SHARED + "-normal-" + "n" * 36  # 300 characters each
BASE_US = 1_700_000_000_000_000
KEY = b"k" * 32


def row(n: int, agent: object, amount: float, tx: int | None = None) -> bytes:
    after = {"id": n, "amount": amount, **({"agent_id": agent} if agent is not None else {})}
    source = {"ts_us": BASE_US + n * 1_000_000, "schema": "public", "table": "refunds", "connector": "postgresql"}
    return json.dumps({"op": "c", "before": None, "after": after, "source": {**source, "txId": tx or n}}).encode()


def message(tx: int, content: dict[str, Any]) -> bytes:
    body = base64.b64encode(json.dumps(content).encode()).decode()
    source = {"ts_us": BASE_US, "schema": "", "table": "", "txId": tx, "connector": "postgresql"}
    return json.dumps({"op": "m", "source": source, "message": {"prefix": "writeguard", "content": body}}).encode()


def route(r: Router, n: int, value: bytes, topic: str = TOPIC) -> Change | str:
    return r.route(topic, value, KafkaCoords(topic, 0, n))


def normal(i: int) -> float:
    return (40.0, 45.0, 50.0, 55.0, 60.0)[i * 3 % 5]


def test_two_long_ids_sharing_their_first_256_characters_stay_apart() -> None:
    assert len(ROGUE) == len(NORMAL) == 300 and ROGUE[:ID_LIMIT] == NORMAL[:ID_LIMIT]
    a, b = identity(ROGUE), identity(NORMAL)
    assert a is not None and b is not None and a != b
    digest = hashlib.sha256(ROGUE.encode()).hexdigest()
    assert a == ROGUE[:200] + "~sha256:" + digest  # readable prefix plus the digest of the whole id
    assert len(a) == len(b) == ID_LIMIT + 16  # bounded, and longer than any id kept as it is
    assert identity(ROGUE) == a  # deterministic: every worker and every run names the agent the same


def test_ids_up_to_the_limit_are_kept_as_they_are() -> None:
    exact = "y" * ID_LIMIT
    assert identity(exact) == exact and identity("agent-7") == "agent-7"
    assert identity("y" * (ID_LIMIT + 1)) != exact


def test_a_writer_cannot_take_an_over_long_agents_name_by_sending_its_digest_form() -> None:
    victim = identity(ROGUE)
    assert victim is not None
    assert identity(victim) != victim  # the form itself is over-long: digested again
    assert identity(victim[:ID_LIMIT]) != victim


def test_odd_values_digest_without_raising() -> None:
    assert identity("\ud800" * 300) is not None  # a lone surrogate, valid in a JSON string
    assert identity(10**5000) is None  # beyond Python's int-to-text limit: no id
    assert identity(7 * 10**300) is not None and len(identity(7 * 10**300) or "") == ID_LIMIT + 16


def test_through_router_and_engine_one_long_id_is_quarantined_alone() -> None:
    r, engine = Router([SPEC]), Engine([SPEC])
    findings = []
    n = 0
    for i in range(40):  # both warm up their own models, interleaved
        for agent in (ROGUE, NORMAL):
            n += 1
            ch = route(r, n, row(n, agent, normal(i)))
            assert isinstance(ch, Change)
            findings += engine.process(ch)
    assert findings == []
    assert {k for k in engine.states} == {(SPEC.name, identity(ROGUE)), (SPEC.name, identity(NORMAL))}
    for _ in range(3):  # the rogue writes 20x its usual amounts
        n += 1
        findings += engine.process(route(r, n, row(n, ROGUE, 1000.0)))  # type: ignore[arg-type]
    for i in range(10):  # the other goes on as usual
        n += 1
        assert engine.process(route(r, n, row(n, NORMAL, normal(i)))) == []  # type: ignore[arg-type]

    [alert_finding] = [f for f in findings if f.quarantine]
    assert alert_finding.agent_id == identity(ROGUE)
    assert set(engine.quarantined) == {identity(ROGUE)}
    # The alert names the rogue: its readable prefix and the digest of its own full id, not the other's.
    alert = build_alert(alert_finding, BASE_US)
    assert alert.agent_id == identity(ROGUE) and hashlib.sha256(ROGUE.encode()).hexdigest() in alert.agent_id
    assert hashlib.sha256(NORMAL.encode()).hexdigest() not in alert.summary


def test_the_control_record_of_a_long_id_quarantines_only_it_on_another_worker() -> None:
    rogue = identity(ROGUE)
    assert rogue is not None
    engine = Engine([SPEC])
    findings = []
    amounts = [normal(i) for i in range(40)] + [1000.0] * 3
    for i, amount in enumerate(amounts):
        findings += engine.process(
            Change(SPEC.name, "c", rogue, None, {"amount": amount}, BASE_US + i, KafkaCoords(TOPIC, 0, i))
        )
    [f] = [f for f in findings if f.quarantine]
    rec = ControlRecord.quarantine(build_alert(f, BASE_US))
    key, value = rec.agent_id.encode(), rec.to_bytes()  # as the worker sends it: keyed by the agent id
    got = verify_control((KEY,), key, value, [(CONTROL_SIGNATURE_HEADER, sign_control(KEY, key, value))])
    other = Engine([SPEC])  # another worker, following the control topic
    other.apply_control(got.agent_id, got.state, got.alert_id, got.reason, BASE_US)
    assert set(other.quarantined) == {rogue} and identity(NORMAL) not in other.quarantined


def test_a_long_id_from_the_transactions_message_is_the_same_as_from_the_row() -> None:
    r = Router([SPEC], message_prefix="writeguard")
    assert route(r, 1, message(77, {"agent_id": ROGUE, "run_id": "run-" + "z" * 400})) == SKIP_MESSAGE
    ch = route(r, 2, row(2, None, 10.0, tx=77))
    assert isinstance(ch, Change) and ch.agent_id == identity(ROGUE)
    assert ch.run_id is not None and len(ch.run_id) == ID_LIMIT + 16


def test_undo_reader_names_a_long_id_as_the_alert_does() -> None:
    # `writeguard scope --agent <the alert's agent_id>` must find the rows: the reader uses the same identity().
    reader = UndoReader([SPEC])
    reader.feed(b'{"id": 1}', row(1, ROGUE, 10.0), "f:1")
    reader.feed(b'{"id": 2}', row(2, NORMAL, 10.0), "f:2")
    assert [e.agent_id for e in reader.events()] == [identity(ROGUE), identity(NORMAL)]


# --- the identity of rows without an agent ---------------------------------------------------------------------


def test_an_agent_named_unattributed_has_its_own_state_and_quarantine() -> None:
    r, engine = Router([SPEC]), Engine([SPEC])
    findings = []
    for i in range(40):
        for n, agent in ((2 * i + 1, "unattributed"), (2 * i + 2, None)):
            ch = route(r, n, row(n, agent, normal(i)))
            assert isinstance(ch, Change)
            findings += engine.process(ch)
    assert {k[1] for k in engine.states} == {"unattributed", UNATTRIBUTED}
    for n in range(100, 103):
        findings += engine.process(route(r, n, row(n, "unattributed", 1000.0)))  # type: ignore[arg-type]
    assert [f.agent_id for f in findings if f.quarantine] == ["unattributed"]
    assert set(engine.quarantined) == {"unattributed"}  # the rows without an agent go on, unquarantined
    ch = route(r, 200, row(200, None, normal(0)))
    assert isinstance(ch, Change) and ch.agent_id == UNATTRIBUTED and ch.agent_id not in engine.quarantined


@pytest.mark.parametrize("claimed", [UNATTRIBUTED, "<role:app_owner>", "<anything>"])
def test_a_row_claiming_a_reserved_identity_is_no_agent(claimed: str) -> None:
    # As if the row named nobody: never an agent's name, so never quarantined and never hiding a named agent.
    ch = route(Router([SPEC]), 1, row(1, claimed, 10.0))
    assert isinstance(ch, Change) and ch.agent_id == UNATTRIBUTED
    assert route(Router([SPEC]), 2, row(2, "unattributed", 10.0)).agent_id == "unattributed"  # type: ignore[union-attr]


def test_a_message_claiming_a_reserved_identity_names_no_agent() -> None:
    r = Router([SPEC], message_prefix="writeguard")
    with pytest.raises(EnvelopeError):  # dead-lettered; its rows wait, then are scored as unattributed
        route(r, 1, message(5, {"agent_id": UNATTRIBUTED}))
    assert route(r, 2, message(6, {"agent_id": "unattributed"})) == SKIP_MESSAGE
    ch = route(r, 3, row(3, None, 1.0, tx=6))
    assert isinstance(ch, Change) and ch.agent_id == "unattributed"


def test_database_roles_never_map_to_the_unattributed_identity() -> None:
    r = Router([SPEC], message_prefix="writeguard", database_identity=True)
    # The identity trigger's message: a role that is no agent's (agent_id NULL is stripped), one named
    # 'unattributed', and a role whose template would make it '<unattributed>'.
    for tx, body in (
        (1, {"role": "unattributed", "table": SPEC.name}),
        (2, {"agent_id": UNATTRIBUTED, "role": "agent_<unattributed>", "table": SPEC.name}),
    ):
        assert route(r, tx * 10, message(tx, body)) == SKIP_MESSAGE
    one, two = route(r, 11, row(11, None, 1.0, tx=1)), route(r, 21, row(21, None, 1.0, tx=2))
    assert isinstance(one, Change) and isinstance(two, Change)
    assert (one.agent_id, two.agent_id) == ("<role:unattributed>", "<role:agent_<unattributed>>")
    assert UNATTRIBUTED not in (one.agent_id, two.agent_id) and is_reserved(one.agent_id)


def test_an_over_long_reserved_looking_id_is_an_agent_apart_from_the_reserved_ones() -> None:
    ch = route(Router([SPEC]), 1, row(1, "<" + "u" * 300 + ">", 10.0))
    assert isinstance(ch, Change) and ch.agent_id not in (UNATTRIBUTED,) and not is_reserved(ch.agent_id)
    assert ch.agent_id == identity("<" + "u" * 300 + ">")


def test_the_cli_names_an_agent_as_the_worker_does_raw_or_copied_from_an_alert() -> None:
    from detectors.features import identity, typed_identity

    raw = "agent-" + "x" * 300
    shown = identity(raw)
    assert shown is not None and shown != raw
    assert typed_identity(raw) == shown  # the raw over-long id
    assert typed_identity(shown) == shown  # the form an alert shows, pasted back
    assert typed_identity("refund-bot-7") == "refund-bot-7"
