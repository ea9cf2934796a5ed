"""The real Faust worker on a real Kafka broker: normal fleet, rogue agent, release, poison, metrics.

The tests of this module share one worker and run in file order: the normal fleet warms the agents'
models up, then one agent goes rogue.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from confluent_kafka import Producer

from stream.fleet import REFUNDS, Fleet
from tests.integration.conftest import Worker, read_topic, release

pytestmark = pytest.mark.integration

NORMAL_EVENTS = 6_000


def produce(worker: Worker, records: list[tuple[str, bytes | None, bytes | None]]) -> list[tuple[int, int]]:
    """Produce and wait for delivery; returns (partition, offset) of each record, in order."""
    p = Producer({"bootstrap.servers": worker.bootstrap, "linger.ms": 5})
    where: list[tuple[int, int]] = [(-1, -1)] * len(records)

    def done(i: int):  # type: ignore[no-untyped-def]
        def cb(err, msg):  # type: ignore[no-untyped-def]
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())

        return cb

    for i, (topic, key, value) in enumerate(records):
        p.produce(topic, key=key, value=value, on_delivery=done(i))
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(30) == 0
    return where


@pytest.fixture(scope="module")
def fleet(worker: Worker) -> Fleet:
    """A dozen agents on two tables; NORMAL_EVENTS writes over the last few minutes of commit time."""
    f = Fleet(n_agents=12, seed=5, prefix=worker.prefix)
    start = time.time_ns() // 1000 - 300_000_000
    recs = list(f.stream(NORMAL_EVENTS, start))
    produce(worker, [(r.topic, r.key, r.value) for r in recs])
    worker.wait_for("writeguard_events_total", NORMAL_EVENTS)
    return f


def test_normal_fleet_raises_no_alert(worker: Worker, fleet: Fleet) -> None:
    assert worker.total("writeguard_events_total") >= NORMAL_EVENTS >= 5_000
    time.sleep(2)  # an alert would be published right after its event; give it time to show
    assert read_topic(worker.bootstrap, worker.config.topics.alerts) == []
    assert worker.total("writeguard_alerts_total") == 0
    assert worker.total("writeguard_active_models") in (0, 12)  # gauge refreshes every 5 s


def test_rogue_agent_is_alerted_within_50_anomalous_events_and_quarantined(worker: Worker, fleet: Fleet) -> None:
    rogue = next(a for a in fleet.agents if a.table == REFUNDS)
    rogue.rogue = "inflate"
    recs = [fleet.write(rogue, time.time_ns() // 1000 - (80 - i) * 20_000) for i in range(80)]
    where = produce(worker, [(r.topic, r.key, r.value) for r in recs])
    worker.wait_for("writeguard_alerts_total", 1, timeout=60)
    alerts = [json.loads(v) for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.alerts, expect=1)]
    mine = [a for a in alerts if a["agent_id"] == rogue.agent_id]
    assert mine, alerts
    first = mine[0]
    assert first["table"] == REFUNDS and first["detector"] == "zscore" and first["quarantined"] is True
    assert first["explanation"][0]["feature"] == "amount"
    assert first["explanation"][0]["value"] > first["explanation"][0]["expected_high"]
    # Which of the rogue's writes triggered it? Every coordinate must be one of them, the last within 50.
    index = {(recs[i].topic, p, o): i for i, (p, o) in enumerate(where)}
    trig = [(t["topic"], t["partition"], t["offset"]) for t in first["triggering_events"]]
    assert all(t in index for t in trig), (trig, list(index)[:3])
    assert max(index[t] for t in trig) < 50
    assert first["lag_ms"] >= 0
    assert [a for a in alerts if a["agent_id"] != rogue.agent_id] == []

    control = [
        (k, json.loads(v)) for k, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.control, expect=1)
    ]
    assert (rogue.agent_id.encode(), "quarantined") in [(k, v["state"]) for k, v in control]
    rec = next(v for k, v in control if v["state"] == "quarantined")
    assert rec["alert_id"] == first["alert_id"]
    # Later writes of a quarantined agent are counted (blast radius) and do not quarantine it again.
    worker.wait_for("writeguard_quarantined_agent_events_total", 1)
    assert worker.total("writeguard_quarantines_total") == 1


def test_release_writes_a_control_record_and_the_worker_follows_it(worker: Worker, fleet: Fleet) -> None:
    rogue = next(a for a in fleet.agents if a.table == REFUNDS)
    out = release(worker.config_path, rogue.agent_id, "refund bug fixed")
    assert out.returncode == 0, out.stderr
    control = [json.loads(v) for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.control, expect=2)]
    assert [c["state"] for c in control if c["agent_id"] == rogue.agent_id] == ["quarantined", "released"]
    deadline = time.monotonic() + 30
    while worker.total("writeguard_quarantined_agents") != 0:
        assert time.monotonic() < deadline, "the worker did not follow the release"
        time.sleep(0.5)


POISON = [
    (b"{not json", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"before": null, "after": {"id": 1}, "source": {"ts_ms": 1}}', "missing_op"),
    (b'{"op": "x", "after": {"id": 1}, "source": {"ts_ms": 1}}', "unknown_op"),
    (b'{"op": "c", "after": null, "source": {"ts_ms": 1}}', "missing_row"),
    (b"\xff\xfe\x00garbage", "invalid_json"),
]


def test_poison_messages_go_to_the_dead_letter_topic_and_the_worker_goes_on(worker: Worker, fleet: Fleet) -> None:
    before = worker.total("writeguard_events_total")
    topic = worker.topic(REFUNDS)
    normal = next(a for a in fleet.agents if a.table == REFUNDS and a.rogue is None)
    good = [fleet.write(normal, time.time_ns() // 1000 + i) for i in range(20)]
    records: list[tuple[str, bytes | None, bytes | None]] = [(topic, b"k", v) for v, _ in POISON]
    records.append((topic, b"k", None))  # a tombstone: skipped and counted, not a dead letter
    records += [(r.topic, r.key, r.value) for r in good]
    where = produce(worker, records)
    worker.wait_for("writeguard_events_total", before + len(good), timeout=60)
    dlq = [
        json.loads(v)
        for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.dead_letter, expect=len(POISON))
    ]
    assert len(dlq) == len(POISON)
    by_offset = {(d["partition"], d["offset"]): d for d in dlq}
    for (value, reason), (p, o) in zip(POISON, where[: len(POISON)], strict=True):
        d = by_offset[(p, o)]
        assert d["reason"] == reason and d["topic"] == topic
        assert base64.b64decode(d["value_b64"]) == value
        assert d["detail"]
    assert worker.total("writeguard_dead_letters_total") == len(POISON)
    assert worker.metrics()['writeguard_skipped_events_total{reason="tombstone"}'] == 1
    assert worker.proc.poll() is None


def test_metrics_endpoint_shows_the_counters(worker: Worker, fleet: Fleet) -> None:
    time.sleep(5.5)  # gauges refresh every 5 s
    m = worker.metrics()
    names = {k.split("{")[0] for k in m}
    for name in [
        "writeguard_events_total",
        "writeguard_alerts_total",
        "writeguard_dead_letters_total",
        "writeguard_detection_lag_seconds_bucket",
        "writeguard_processing_lag_seconds_bucket",
        "writeguard_active_models",
        "writeguard_quarantined_agents",
        "writeguard_consumer_lag_messages",
        "writeguard_quarantines_total",
        "writeguard_skipped_events_total",
    ]:
        assert name in names, (name, sorted(names))
    assert m['writeguard_events_total{op="c",table="public.refunds"}'] > 1000
    assert m['writeguard_active_models{table="public.refunds"}'] == 6
    assert m['writeguard_detection_lag_seconds_count{table="public.refunds"}'] >= 1
    assert m['writeguard_dead_letters_total{reason="invalid_json"}'] == 2
