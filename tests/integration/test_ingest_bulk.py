"""The bulk ingest (stream.ingest) on the real broker: batches in, every event once, offsets only for what was sent.

Behaviour, not speed (that is `make bench`): a clean run forwards and scores each of several thousand events
exactly once and alerts the rogue; an ingest that stops after its produce but before its commit leaves the
batch uncommitted, so the next one sends it again rather than skipping it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from detectors.engine import Change
from stream.app import ensure_topics
from stream.config import Config, load_config
from stream.ingest import BulkIngest, ingest_group
from stream.metrics import Metrics
from stream.pipeline import router_for
from testbed.broker import LocalKafka
from testbed.fleet import REFUNDS, Fleet
from tests.integration.conftest import changes_on_topic, make_config, produce, read_topic, start_worker

pytestmark = pytest.mark.integration

S = 1_000_000


def now_us() -> int:
    return time.time_ns() // 1000


def changes_of(cfg: Config) -> list[Change]:
    return changes_on_topic(cfg.kafka.bootstrap_servers, cfg.topics.changes)


def committed(cfg: Config, topics: list[str], partitions: int = 3) -> dict[tuple[str, int], int]:
    c = Consumer({"bootstrap.servers": cfg.kafka.bootstrap_servers, "group.id": ingest_group(cfg)})
    try:
        tps = c.committed([TopicPartition(t, p) for t in topics for p in range(partitions)], timeout=10)
        return {(tp.topic, tp.partition): tp.offset for tp in tps}
    finally:
        c.close()


def test_a_clean_run_scores_every_event_once_and_alerts_the_rogue(kafka: LocalKafka, tmp_path: Path) -> None:
    w = start_worker(kafka, tmp_path)
    try:
        fleet = Fleet(n_agents=20, seed=31, prefix=w.prefix)
        history = list(fleet.stream(5_000, now_us() - 600 * S))
        where = produce(w.bootstrap, history)
        w.wait_for("writeguard_events_total", len(history), timeout=120)
        rogue = next(a for a in fleet.agents if a.table == REFUNDS)
        rogue.rogue = "inflate"
        burst = [fleet.write(rogue, now_us() - 20 * S + i * 50_000) for i in range(40)]
        where += produce(w.bootstrap, burst)
        w.wait_for("writeguard_alerts_total", 1, timeout=120)
        total = len(history) + len(burst)
        assert w.wait_for("writeguard_events_total", total, timeout=120) == total

        # Each CDC record crossed the changes topic once, in batches, and nothing else did.
        chs = changes_of(w.config)
        coords = sorted((c.coords.topic, c.coords.partition, c.coords.offset) for c in chs)  # type: ignore[union-attr]
        sent = sorted((r.topic, p, o) for r, (p, o) in zip([*history, *burst], where, strict=True))
        assert coords == sent
        records = read_topic(w.bootstrap, w.config.topics.changes)
        assert len(records) < total / 10, f"{len(records)} records for {total} changes: not batched"
        assert w.total("writeguard_events_total") == total  # scored once: nothing came back later

        alerts = [json.loads(v) for _, v, _, _ in read_topic(w.bootstrap, w.config.topics.alerts) if v]
        assert {a["agent_id"] for a in alerts} == {rogue.agent_id}, [a["summary"] for a in alerts]

        # The CDC offsets are committed to the ends: everything read was forwarded and acknowledged.
        ends: dict[tuple[str, int], int] = {}
        for topic, p, o in sent:
            ends[(topic, p)] = max(ends.get((topic, p), 0), o + 1)
        deadline = time.monotonic() + 30
        while (
            got := {k: v for k, v in committed(w.config, [t.topic for t in w.config.tables]).items() if k in ends}
        ) != ends:
            assert time.monotonic() < deadline, f"committed {got}, ends {ends}"
            time.sleep(0.5)
    finally:
        w.process.stop()


class _NoCommit(BulkIngest):
    """An ingest that dies between the broker's acknowledgement of a batch and the commit of its offsets."""

    def _commit(self) -> None:
        self._next.clear()


def bulk(cfg: Config, cls: type[BulkIngest] = BulkIngest) -> BulkIngest:
    return cls(cfg, router_for(cfg), Metrics(), [t.topic for t in cfg.tables])


def run_until(b: BulkIngest, n: int, timeout: float = 60.0) -> int:
    got, deadline = 0, time.monotonic() + timeout
    while got < n:
        assert time.monotonic() < deadline, f"forwarded {got} of {n} in {timeout} s"
        got += b.step()
    return got


def test_a_batch_sent_but_not_committed_is_sent_again_not_skipped(kafka: LocalKafka, tmp_path: Path) -> None:
    cfg = load_config(make_config(tmp_path, kafka.bootstrap_servers, f"t{uuid.uuid4().hex[:8]}"))
    kafka.create_topics({t.topic: 3 for t in cfg.tables})
    ensure_topics(cfg)
    fleet = Fleet(n_agents=8, seed=32, prefix=cfg.tables[0].topic.split(".")[0])
    first = list(fleet.stream(600, now_us() - 300 * S))
    sent_first = {(r.topic, p, o) for r, (p, o) in zip(first, produce(cfg.kafka.bootstrap_servers, first), strict=True)}

    dying = bulk(cfg, _NoCommit)
    assert run_until(dying, len(first)) == len(first)
    dying.close()  # the process is gone: nothing of the batch was committed
    assert all(o < 0 for o in committed(cfg, [t.topic for t in cfg.tables]).values())

    second = list(fleet.stream(200, now_us() - 100 * S))
    produce(cfg.kafka.bootstrap_servers, second)
    again = bulk(cfg)
    assert run_until(again, len(first) + len(second)) == len(first) + len(second)
    again.close()

    # The first batch twice (sent, then re-sent), the second once: at least once, never lost.
    counts: dict[tuple[str, int, int], int] = {}
    for c in changes_of(cfg):
        k = (c.coords.topic, c.coords.partition, c.coords.offset)  # type: ignore[union-attr]
        counts[k] = counts.get(k, 0) + 1
    assert len(counts) == len(first) + len(second)
    assert {k for k, n in counts.items() if n == 2} == sent_first
    assert set(counts.values()) == {1, 2}


def test_run_forwards_batch_after_batch_until_stopped_then_closes(kafka: LocalKafka, tmp_path: Path) -> None:
    cfg = load_config(make_config(tmp_path, kafka.bootstrap_servers, f"t{uuid.uuid4().hex[:8]}"))
    kafka.create_topics({t.topic: 3 for t in cfg.tables})
    ensure_topics(cfg)
    fleet = Fleet(n_agents=8, seed=33, prefix=cfg.tables[0].topic.split(".")[0])
    b = bulk(cfg)
    # The worker's way: run() once on the ingest thread, for as long as the worker lives.
    done = b.executor.submit(b.run)
    first = list(fleet.stream(300, now_us() - 300 * S))
    produce(cfg.kafka.bootstrap_servers, first)
    deadline = time.monotonic() + 60
    while b.forwarded < len(first):
        assert time.monotonic() < deadline and not done.done(), f"forwarded {b.forwarded} of {len(first)}"
        time.sleep(0.1)
    later = list(fleet.stream(200, now_us() - 100 * S))  # arrives while run() is in its loop, not in a new call
    produce(cfg.kafka.bootstrap_servers, later)
    while b.forwarded < len(first) + len(later):
        assert time.monotonic() < deadline and not done.done(), f"forwarded {b.forwarded}"
        time.sleep(0.1)

    b.stop()  # from another thread, as the worker's shutdown does
    done.result(timeout=10)  # run() returns after the batch it was in
    closing = b.executor.submit(b.close)  # queued behind run() on the same thread, as _close_ingest does
    closing.result(timeout=30)
    assert b.closed
    assert b.forwarded == len(first) + len(later) == len(changes_of(cfg))
