"""The real Faust worker on a real Kafka broker: normal fleet, rogue agent, release, poison, metrics.

The tests of this module share one worker and run in file order: the normal fleet warms the agents'
models up, then one agent goes rogue. Everything produced is kept in :class:`Run`, so counts are exact.
Waits poll the worker's metrics with a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from testbed.fleet import ORDERS, REFUNDS, Agent, Fleet, Record
from tests.integration.conftest import Out, Worker, produce, read_topic, release

pytestmark = pytest.mark.integration

NORMAL_EVENTS = 6_000
TIMEOUT_S = 120.0  # generous: 2 busy cores, shared with other test runs
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T = TypeVar("T")




def wait_until(what: str, probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = TIMEOUT_S) -> T:
    """Poll ``probe()`` until ``ok`` holds; on timeout fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if ok(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f} s; last seen: {seen!r}")
        time.sleep(0.25)


def micros(iso: str) -> int:
    """An ISO timestamp from a message as integer microseconds since the epoch (exact, no float rounding)."""
    return (datetime.fromisoformat(iso) - EPOCH) // timedelta(microseconds=1)


@dataclass
class Run:
    """The module's worker, its fleet, and every CDC record produced to it (poison excluded)."""

    worker: Worker
    fleet: Fleet
    records: list[Record] = field(default_factory=list)

    def send(self, recs: list[Record]) -> list[tuple[int, int]]:
        self.records += recs
        return produce(self.worker.bootstrap, recs)

    def table_of(self, r: Record) -> str:
        return {self.worker.topic(t): t for t in (REFUNDS, ORDERS)}[r.topic]

    def events_by_table_op(self) -> Counter[tuple[str, str]]:
        """What ``writeguard_events_total`` must count, by (table, op), once every record is scored."""
        return Counter((self.table_of(r), r.op) for r in self.records)

    def pairs_by_table(self) -> dict[str, int]:
        """(table, agent) pairs that wrote: what ``writeguard_active_models`` must show, per table."""
        counts = Counter(table for table, _ in {(self.table_of(r), r.agent_id) for r in self.records})
        return {t: counts[t] for t in (REFUNDS, ORDERS)}

    def wait_scored(self, extra: int = 0) -> None:
        """Wait until the worker has scored every record sent (plus ``extra``), then check none more."""
        want = len(self.records) + extra
        got = self.worker.wait_for("writeguard_events_total", want, timeout=TIMEOUT_S)
        assert got == want, f"the worker scored {got} events, {want} were sent"


def labelled(m: dict[str, float], name: str, label: str) -> dict[str, float]:
    """The samples of one metric by the value of one label, e.g. active_models by table; a counter's only where it
    moved (the worker creates every label set its config can produce at 0)."""
    out: dict[str, float] = {}
    for k, v in m.items():
        if name.endswith("_total") and not v:
            continue
        if k.startswith(name + "{"):
            for part in k[len(name) + 1 : -1].split(","):
                key, _, val = part.partition("=")
                if key == label:
                    out[val.strip('"')] = v
    return out


def rogue_of(fleet: Fleet) -> Agent:
    return next(a for a in fleet.agents if a.table == REFUNDS)


@pytest.fixture(scope="module")
def run(worker: Worker) -> Run:
    """A dozen agents on two tables; NORMAL_EVENTS writes over the last few minutes of commit time."""
    r = Run(worker, Fleet(n_agents=12, seed=5, prefix=worker.prefix))
    start = time.time_ns() // 1000 - 300_000_000
    r.send(list(r.fleet.stream(NORMAL_EVENTS, start)))
    r.wait_scored()
    return r


def test_normal_fleet_raises_no_alert(worker: Worker, run: Run) -> None:
    assert len(run.records) == NORMAL_EVENTS
    by_op = run.events_by_table_op()
    # Only what moved: the worker creates every (table, op) series at 0 when it starts (Metrics.prime).
    scored = {_tab_op(k): v for k, v in worker.metrics().items() if k.startswith("writeguard_events_total{") and v}
    assert scored == dict(by_op), (scored, by_op)
    # events_total counts an event before its alert is published: a sentinel written after the fleet, and
    # scored, proves that every fleet event's alert decision has been published (one detect actor, in order).
    sentinel_agent = next(a for a in run.fleet.agents if a.table == ORDERS)
    last_ts = max(r.commit_ts_us for r in run.records)
    run.send([run.fleet.write(sentinel_agent, last_ts + 200_000)])
    run.wait_scored()
    assert worker.total("writeguard_alerts_total") == 0
    assert read_topic(worker.bootstrap, worker.config.topics.alerts) == []
    assert worker.total("writeguard_dead_letters_total") == 0
    assert worker.total("writeguard_skipped_events_total") == 0
    assert worker.total("writeguard_quarantined_agents") == 0
    # The gauge refreshes on a timer: poll until it shows one model set per (table, agent) that wrote.
    expected = run.pairs_by_table()
    assert expected == {REFUNDS: 6, ORDERS: 6}
    wait_until(
        "writeguard_active_models by table",
        lambda: labelled(worker.metrics(), "writeguard_active_models", "table"),
        lambda seen: seen == {t: float(n) for t, n in expected.items()},
    )


def _tab_op(key: str) -> tuple[str, str]:
    labels = dict(p.split("=", 1) for p in key[key.index("{") + 1 : -1].split(","))
    return labels["table"].strip('"'), labels["op"].strip('"')


def test_rogue_agent_is_alerted_within_50_anomalous_events_and_quarantined(worker: Worker, run: Run) -> None:
    fleet = run.fleet
    rogue = rogue_of(fleet)
    written_before = rogue.written
    rogue.rogue = "inflate"
    recs = [fleet.write(rogue, time.time_ns() // 1000 - (80 - i) * 20_000) for i in range(80)]
    sent_us = time.time_ns() // 1000
    where = run.send(recs)
    worker.wait_for("writeguard_alerts_total", 1, timeout=TIMEOUT_S)
    run.wait_scored()  # all 80 rogue writes scored: the counts below are final
    seen_us = time.time_ns() // 1000
    alerts = [json.loads(v) for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.alerts, expect=1)]
    # One alert in all: the quarantined agent's open incident does not re-alert on its later writes.
    assert [a["agent_id"] for a in alerts] == [rogue.agent_id], alerts
    assert worker.total("writeguard_alerts_total") == 1
    first = alerts[0]
    assert first["table"] == REFUNDS and first["detector"] == "zscore" and first["quarantined"] is True
    top = first["explanation"][0]
    assert top["feature"] == "amount" and top["value"] > top["expected_high"], top

    # Which of the rogue's writes triggered it? Every coordinate must be one of them. The zscore debounce is
    # 2 anomalous writes among the agent's last 4: the alert comes on the 2nd anomalous write, well within 50.
    index = {(recs[i].topic, p, o): i for i, (p, o) in enumerate(where)}
    trig = [(t["topic"], t["partition"], t["offset"]) for t in first["triggering_events"]]
    assert all(t in index for t in trig), (trig, list(index)[:3])
    assert len(trig) == first["anomalous_events"] == 2, first
    assert written_before + 2 <= first["agent_events"] <= written_before + 4, (written_before, first)
    # The alert's commit time is the alerting (last) trigger's: the commit time this test gave that record.
    alerting = recs[index[trig[-1]]]
    for t in first["triggering_events"]:
        assert micros(t["commit_ts"]) == recs[index[(t["topic"], t["partition"], t["offset"])]].commit_ts_us
    assert micros(first["commit_ts"]) == alerting.commit_ts_us
    # lag_ms is detected_at - commit_ts; detection happened after the record was produced and before the
    # alert was read back here, so the lag lies between what this test's own clock says on both sides.
    detected_us = micros(first["detected_at"])
    assert first["lag_ms"] == pytest.approx((detected_us - alerting.commit_ts_us) / 1000, abs=1e-3), first
    assert sent_us <= detected_us <= seen_us, (sent_us, detected_us, seen_us)
    assert (sent_us - alerting.commit_ts_us) / 1000 <= first["lag_ms"] <= (seen_us - alerting.commit_ts_us) / 1000

    control = [
        (k, json.loads(v)) for k, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.control, expect=1)
    ]
    assert [(k, v["state"]) for k, v in control] == [(rogue.agent_id.encode(), "quarantined")], control
    rec = control[0][1]
    assert rec["alert_id"] == first["alert_id"] and rec["table"] == REFUNDS
    # Later writes of a quarantined agent are counted (blast radius) and do not quarantine it again: every
    # rogue write after the alerting one (agent_events counts the agent's writes up to and including it).
    assert worker.total("writeguard_quarantined_agent_events_total") == rogue.written - first["agent_events"]
    assert worker.total("writeguard_quarantines_total") == 1
    assert worker.total("writeguard_quarantined_agents") == 1


def test_release_writes_a_control_record_and_the_worker_follows_it(worker: Worker, run: Run) -> None:
    rogue = rogue_of(run.fleet)
    assert worker.total("writeguard_quarantined_agents") == 1
    out = release(worker.config_path, rogue.agent_id, "refund bug fixed")
    assert out.returncode == 0, out.stderr
    control = [json.loads(v) for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.control, expect=2)]
    assert [c["state"] for c in control if c["agent_id"] == rogue.agent_id] == ["quarantined", "released"]
    released = next(c for c in control if c["agent_id"] == rogue.agent_id and c["state"] == "released")
    assert released["reason"] == "refund bug fixed" and released["false_positive"] is False, released
    wait_until(
        "writeguard_quarantined_agents after the release",
        lambda: worker.total("writeguard_quarantined_agents"),
        lambda seen: seen == 0,
    )


POISON = [
    (b"{not json", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"before": null, "after": {"id": 1}, "source": {"ts_ms": 1}}', "missing_op"),
    (b'{"op": "x", "after": {"id": 1}, "source": {"ts_ms": 1}}', "unknown_op"),
    (b'{"op": "c", "after": null, "source": {"ts_ms": 1}}', "missing_row"),
    (b"\xff\xfe\x00garbage", "invalid_json"),
]


def test_poison_messages_go_to_the_dead_letter_topic_and_the_worker_goes_on(worker: Worker, run: Run) -> None:
    topic = worker.topic(REFUNDS)
    normal = next(a for a in run.fleet.agents if a.table == REFUNDS and a.rogue is None)
    good = [run.fleet.write(normal, time.time_ns() // 1000 + i) for i in range(20)]
    records: list[Record | Out] = [(topic, None, b"k", v) for v, _ in POISON]
    records.append((topic, None, b"k", None))  # a tombstone: skipped and counted, not a dead letter
    records += good
    where = produce(worker.bootstrap, records)
    run.records += good
    run.wait_scored()  # the good records after the poison are scored, and nothing else was
    worker.wait_for("writeguard_dead_letters_total", len(POISON), timeout=TIMEOUT_S)
    worker.wait_for("writeguard_skipped_events_total", 1, timeout=TIMEOUT_S)
    dlq = [
        json.loads(v)
        for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.dead_letter, expect=len(POISON))
    ]
    assert len(dlq) == len(POISON)
    by_offset = {(d["partition"], d["offset"]): d for d in dlq}
    for (value, reason), (p, o) in zip(POISON, where[: len(POISON)], strict=True):
        d = by_offset[(p, o)]
        assert d["reason"] == reason and d["topic"] == topic, d
        assert base64.b64decode(d["value_b64"]) == value
        assert base64.b64decode(d["key_b64"]) == b"k"
        assert isinstance(d["detail"], str) and d["detail"].strip(), d
    m = worker.metrics()
    assert labelled(m, "writeguard_dead_letters_total", "reason") == dict(Counter(r for _, r in POISON))
    assert labelled(m, "writeguard_skipped_events_total", "reason") == {"tombstone": 1}
    assert worker.total("writeguard_alerts_total") == 1  # the poison raised nothing, the normal agent neither
    assert worker.proc.poll() is None


# Every metric the README's table lists, plus the two gauges it mentions elsewhere. The enforcement counter
# appears only in a worker that enforces: tests/integration/test_postgres_pipeline.py checks it.
README_METRICS = [
    "writeguard_events_total",
    "writeguard_alerts_total",
    "writeguard_detection_lag_seconds_bucket",
    "writeguard_processing_lag_seconds_bucket",
    "writeguard_consumer_lag_messages",
    "writeguard_active_models",
    "writeguard_quarantined_agents",
    "writeguard_quarantines_total",
    "writeguard_quarantined_agent_events_total",
    "writeguard_dead_letters_total",
    "writeguard_skipped_events_total",
    "writeguard_suppressed_findings",
    "writeguard_evicted_models",
]


def test_metrics_endpoint_shows_the_counters(worker: Worker, run: Run) -> None:
    run.wait_scored()
    # The gauges are refreshed by a timer: poll until they show what the run produced, not a fixed sleep.
    expected_models = {t: float(n) for t, n in run.pairs_by_table().items()}
    cdc_partitions = {(worker.topic(t), str(p)) for t in (REFUNDS, ORDERS) for p in range(3)}

    def lag(m: dict[str, float]) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for k, v in m.items():
            if k.startswith("writeguard_consumer_lag_messages{"):
                labels = dict(p.split("=", 1) for p in k[k.index("{") + 1 : -1].split(","))
                out[(labels["topic"].strip('"'), labels["partition"].strip('"'))] = v
        return out

    m = wait_until(
        "active models per table and zero consumer lag on every CDC partition",
        worker.metrics,
        lambda m: (
            labelled(m, "writeguard_active_models", "table") == expected_models
            and all(lag(m).get(tp) == 0 for tp in cdc_partitions)
        ),
    )
    names = {k.split("{")[0] for k in m}
    missing = [n for n in README_METRICS if n not in names]
    assert missing == [], (missing, sorted(names))
    by_op = run.events_by_table_op()
    assert m['writeguard_events_total{op="c",table="public.refunds"}'] == by_op[(REFUNDS, "c")]
    assert by_op[(REFUNDS, "c")] == sum(n for (t, _), n in by_op.items() if t == REFUNDS)  # refunds: inserts only
    total = sum(by_op.values())
    assert worker.total("writeguard_events_total") == total
    # One alert, on refunds, each observed once in the detection lag histogram.
    assert m['writeguard_detection_lag_seconds_count{table="public.refunds"}'] == 1
    assert m.get('writeguard_detection_lag_seconds_count{table="public.orders"}', 0) == 0
    # The processing lag is sampled: one event in 16 of all those scored.
    assert m["writeguard_processing_lag_seconds_count"] == total // 16
    assert m['writeguard_dead_letters_total{reason="invalid_json"}'] == 2
    assert m["writeguard_suppressed_findings"] == 0 and m["writeguard_evicted_models"] == 0
