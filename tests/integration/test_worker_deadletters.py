"""Dead letters through a real worker on the real broker, for the reasons tests/integration/test_worker.py does
not send: ``missing_source``, ``missing_timestamp``, ``invalid_message`` (from the decoder, and from the agent
messages of ``worker.agent_messages``) and ``internal_error``.

No input reaches ``internal_error``: the decoder turns every malformed value into an ``EnvelopeError`` and the
router and feature extraction only read what the decoder typed (see the notes in
``test_an_unexpected_error_is_a_dead_letter_and_the_worker_goes_on``). So the worker of this module runs with
one narrow fault injected from outside the product: a ``sitecustomize`` on its PYTHONPATH makes feature
extraction raise for rows that carry a marker column, and for nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from testbed.broker import LocalKafka
from testbed.fleet import ORDERS, REFUNDS, Fleet, debezium_value
from tests.integration.conftest import Out, Worker, produce, read_topic, start_worker

pytestmark = pytest.mark.integration

S = 1_000_000
FAULT_MARK = "writeguard-test: raise in feature extraction"
SITECUSTOMIZE = f'''
"""Loaded by the worker of tests/integration/test_worker_deadletters.py only: one narrow, injected fault."""
import detectors.features as _features

_real = _features.Extractor.features


def _features_or_fault(self, op, before, after):
    row = before if op == "d" else after
    if isinstance(row, dict) and row.get("fault") == {FAULT_MARK!r}:
        raise RuntimeError("injected fault in feature extraction")
    return _real(self, op, before, after)


_features.Extractor.features = _features_or_fault
'''
MESSAGE_PREFIX = "writeguard"


def now_us() -> int:
    return time.time_ns() // 1000




@dataclass
class Setup:
    worker: Worker
    fleet: Fleet
    messages_topic: str


@pytest.fixture(scope="module")
def setup(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = Path(tmp_path_factory.mktemp("deadletters"))
    fault = tmp / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    prefix = f"d{os.urandom(4).hex()}"
    messages_topic = f"{prefix}.message"
    kafka.create_topics({messages_topic: 1})

    def edit(data: dict[str, Any]) -> None:
        data["worker"]["agent_messages"] = {"topic": messages_topic, "prefix": MESSAGE_PREFIX}

    with pytest.MonkeyPatch.context() as mp:  # only the worker process gets the fault
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(fault), os.environ.get("PYTHONPATH")) if p))
        w = start_worker(kafka, tmp, prefix=prefix, edit=edit)
    fleet = Fleet(n_agents=4, seed=3, prefix=prefix)
    try:
        warm = list(fleet.stream(200, now_us() - 120 * S))
        produce(w.bootstrap, [(r.topic, None, r.key, r.value) for r in warm])
        w.wait_for("writeguard_events_total", len(warm))
        yield Setup(w, fleet, messages_topic)
    finally:
        w.process.stop()


def _event(prefix: str, ts: int, **changes: Any) -> bytes:
    """A refunds insert as Debezium writes it, with top-level fields replaced (None: removed)."""
    row = {"id": 1, "order_id": 7, "amount": 42.0, "agent_id": "refund-agent-00", "run_id": "run-1"}
    body = orjson.loads(debezium_value(REFUNDS, "c", None, row, ts, prefix=prefix, tx_id=4242, lsn=99))
    for k, v in changes.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return orjson.dumps(body)


def _source(ts: int, **changes: Any) -> dict[str, Any]:
    src: dict[str, Any] = {
        "version": "3.6.1.Final",
        "connector": "postgresql",
        "name": "shop",
        "ts_ms": ts // 1000,
        "ts_us": ts,
        "ts_ns": ts * 1000,
        "snapshot": "false",
        "db": "shop",
        "schema": "public",
        "table": "refunds",
        "txId": 4242,
        "lsn": 99,
    }
    for k, v in changes.items():
        if v is None:
            src.pop(k, None)
        else:
            src[k] = v
    return src


def _message(ts: int, content: bytes, tx: int = 5151, prefix: str = MESSAGE_PREFIX) -> bytes:
    """A logical decoding message (pg_logical_emit_message) as Debezium writes it: op m, content in base64."""
    return orjson.dumps(
        {
            "op": "m",
            "ts_ms": ts // 1000 + 3,
            "source": _source(ts, schema="", table="", txId=tx),
            "message": {"prefix": prefix, "content": base64.b64encode(content).decode()},
        }
    )


def poison(prefix: str, ts: int) -> list[tuple[str, str, bytes]]:
    """(case, reason, value) of malformed records for a watched CDC topic."""
    no_ts = _source(ts, ts_ms=None, ts_us=None, ts_ns=None)
    return [
        ("no source", "missing_source", _event(prefix, ts, source=None)),
        ("source is text", "missing_source", _event(prefix, ts, source="postgresql")),
        ("source.table is a number", "missing_source", _event(prefix, ts, source=_source(ts, table=7))),
        ("no commit time at all", "missing_timestamp", _event(prefix, ts, source=no_ts, ts_ms=None)),
        ("source.ts_ms is text", "missing_timestamp", _event(prefix, ts, source={**no_ts, "ts_ms": "yesterday"})),
        ("commit after 9999", "missing_timestamp", _event(prefix, ts, source={**no_ts, "ts_ms": 300 * 10**12})),
        ("heartbeat before 1970", "missing_timestamp", b'{"ts_ms": -1}'),
        (
            "message content not base64",
            "invalid_message",
            orjson.dumps(
                {
                    "op": "m",
                    "ts_ms": ts // 1000,
                    "source": _source(ts),
                    "message": {"prefix": MESSAGE_PREFIX, "content": "%%% not base64 %%%"},
                }
            ),
        ),
        (
            "transaction marker with an unknown status",
            "invalid_message",
            orjson.dumps({"status": "COMMITTED", "id": "4242:99", "ts_ms": ts // 1000, "event_count": 1}),
        ),
    ]


def dead_letters_at(w: Worker, topic: str, where: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
    """The dead letter of each record produced at ``where`` on ``topic``, polled for; exactly one each."""
    wanted = set(where)
    deadline = time.monotonic() + 120
    while True:
        found: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for _, v, _, _ in read_topic(w.bootstrap, w.config.topics.dead_letter):
            d = json.loads(v or b"null")
            if d and d["topic"] == topic and (d["partition"], d["offset"]) in wanted:
                found.setdefault((d["partition"], d["offset"]), []).append(d)
        if len(found) == len(wanted):
            assert all(len(ds) == 1 for ds in found.values()), found
            return {c: ds[0] for c, ds in found.items()}
        assert w.proc.poll() is None, w.process.log_tail()
        assert time.monotonic() < deadline, (
            f"dead letters for {sorted(wanted - set(found))} of {topic} missing; found {found}\n" + w.process.log_tail()
        )
        time.sleep(0.5)


def check(d: dict[str, Any], key: bytes, value: bytes, reason: str, case: str) -> None:
    assert d["reason"] == reason, (case, d)
    assert base64.b64decode(d["value_b64"]) == value, (case, d)
    assert base64.b64decode(d["key_b64"]) == key, (case, d)
    assert d["detail"] and isinstance(d["timestamp_ms"], int), (case, d)


def reason_count(w: Worker, reason: str) -> float:
    return w.metrics().get(f'writeguard_dead_letters_total{{reason="{reason}"}}', 0.0)


def test_malformed_cdc_records_are_dead_letters_with_their_reason_and_the_worker_goes_on(setup: Setup) -> None:
    w, fleet = setup.worker, setup.fleet
    topic = w.topic(REFUNDS)
    before = w.total("writeguard_events_total")
    counts = {r: reason_count(w, r) for r in ("missing_source", "missing_timestamp", "invalid_message")}
    cases = poison(w.prefix, now_us())
    # Each partition of the topic gets some of them, then a valid write: scored only if the worker went on.
    records: list[Out] = [(topic, i % 3, f"k{i}".encode(), v) for i, (_, _, v) in enumerate(cases)]
    agent = fleet.agents[0]
    assert agent.table == REFUNDS
    good = [fleet.write(agent, now_us() + i) for i in range(3)]
    records += [(topic, p, g.key, g.value) for p, g in enumerate(good)]
    where = produce(w.bootstrap, records)
    w.wait_for("writeguard_events_total", before + len(good))
    dlq = dead_letters_at(w, topic, where[: len(cases)])
    for i, (case, reason, value) in enumerate(cases):
        check(dlq[where[i]], f"k{i}".encode(), value, reason, case)
    for reason, n in counts.items():
        assert reason_count(w, reason) == n + sum(1 for _, r, _ in cases if r == reason), reason
    assert w.proc.poll() is None


def test_bad_agent_messages_are_invalid_message_dead_letters_and_messages_still_name_agents(setup: Setup) -> None:
    w = setup.worker
    ts = now_us()
    before_dead = reason_count(w, "invalid_message")
    cases = [
        ("content is not JSON", _message(ts, b"agent refund-agent-00, run 1")),
        ("content names no agent", _message(ts, b'{"run_id": "run-1"}')),
    ]
    where = produce(w.bootstrap, [(setup.messages_topic, 0, b"m", v) for _, v in cases])
    dlq = dead_letters_at(w, setup.messages_topic, where)
    for (case, value), at in zip(cases, where, strict=True):
        check(dlq[at], b"m", value, "invalid_message", case)
        assert "writeguard message" in dlq[at]["detail"], dlq[at]
    assert reason_count(w, "invalid_message") == before_dead + len(cases)

    # After them, a valid message names the agent of a row that has no agent column: that row is scored.
    skipped = w.metrics().get('writeguard_skipped_events_total{reason="logical_message"}', 0.0)
    tx = 777_001
    body = orjson.dumps({"agent_id": "messaged-agent-01", "run_id": "run-9"})
    produce(w.bootstrap, [(setup.messages_topic, 0, b"m", _message(ts, body, tx=tx))])
    deadline = time.monotonic() + 120
    while w.metrics().get('writeguard_skipped_events_total{reason="logical_message"}', 0.0) < skipped + 1:
        assert time.monotonic() < deadline, w.process.log_tail()
        time.sleep(0.25)
    events = w.total("writeguard_events_total")
    row = {"id": 9001, "order_id": 1, "amount": 31.5}  # no agent_id, no run_id
    value = debezium_value(REFUNDS, "c", None, row, now_us(), prefix=w.prefix, tx_id=tx, lsn=123)
    produce(w.bootstrap, [(w.topic(REFUNDS), None, b'{"id": 9001}', value)])
    w.wait_for("writeguard_events_total", events + 1)


def test_an_unexpected_error_is_a_dead_letter_and_the_worker_goes_on(setup: Setup) -> None:
    """``internal_error``, from the fault this module injects (see the module docstring).

    Why no real input gets there: ``decode`` maps every msgspec error (wrong types, bad UTF-8, integers past
    the interpreter's digit limit, too deep nesting) to a reason; rows are typed dicts of JSON values, which
    ``lookup``/``identity``/``as_number`` read without raising (``as_number`` catches OverflowError, a
    divisor of 0 is skipped); message content goes through ``orjson.loads``, whose only error is caught.
    """
    w, fleet = setup.worker, setup.fleet
    topic = w.topic(REFUNDS)
    before = w.total("writeguard_events_total")
    row = {"id": 5, "order_id": 7, "amount": 42.0, "agent_id": "refund-agent-00", "fault": FAULT_MARK}
    bad = debezium_value(REFUNDS, "c", None, row, now_us(), prefix=w.prefix)
    agent = fleet.agents[0]
    good = fleet.write(agent, now_us())
    where = produce(w.bootstrap, [(topic, 1, b'{"id": 5}', bad), (topic, 1, good.key, good.value)])
    w.wait_for("writeguard_events_total", before + 1)
    d = dead_letters_at(w, topic, where[:1])[where[0]]
    check(d, b'{"id": 5}', bad, "internal_error", "injected fault")
    assert "RuntimeError" in d["detail"] and "injected fault" in d["detail"], d
    assert reason_count(w, "internal_error") == 1
    assert w.proc.poll() is None


def test_a_write_whose_features_overflow_does_not_stop_detection(setup: Setup) -> None:
    w, fleet = setup.worker, setup.fleet
    before = w.total("writeguard_events_total")
    agent = next(a for a in fleet.agents if a.table == ORDERS)
    old = {"id": 77, "customer_id": 1, "total": -1.5e308, "items": 1, "status": "paid", "agent_id": agent.agent_id}
    new = {**old, "total": 1.5e308}  # each finite; total_change (after - before) is not
    bad = debezium_value(ORDERS, "u", old, new, now_us(), prefix=w.prefix)
    later = [fleet.write(a, now_us() + i) for i, a in enumerate(fleet.agents * 3)]
    produce(w.bootstrap, [(w.topic(ORDERS), None, b'{"id": 77}', bad)])
    produce(w.bootstrap, [(r.topic, None, r.key, r.value) for r in later])
    deadline = time.monotonic() + 120
    while w.total("writeguard_events_total") < before + 1 + len(later):
        log = w.process.log_tail(200_000)
        crash = log.find("Crashed reason=")
        assert crash < 0, log[max(crash - 300, 0) : crash + 2000]
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.5)
    assert w.proc.poll() is None


def test_a_record_on_the_changes_topic_that_is_not_a_change_is_a_dead_letter_and_detection_goes_on(
    setup: Setup,
) -> None:
    """The internal ``changes`` topic is ours, but any producer with access can write to it."""
    w, fleet = setup.worker, setup.fleet
    changes = w.config.topics.changes
    before = w.total("writeguard_events_total")
    junk = [b"not json", b'["public.refunds", "c"]', b'{"table": 1}']
    where = produce(w.bootstrap, [(changes, 0, b"refund-agent-00", v) for v in junk])
    later = [fleet.write(a, now_us() + i) for i, a in enumerate(fleet.agents * 2)]
    produce(w.bootstrap, [(r.topic, None, r.key, r.value) for r in later])
    w.wait_for("writeguard_events_total", before + len(later))
    dlq = dead_letters_at(w, changes, where)
    for i, v in enumerate(junk):
        check(dlq[where[i]], b"refund-agent-00", v, "invalid_change", f"junk {i}")
    assert reason_count(w, "invalid_change") == len(junk)
    assert w.proc.poll() is None
