"""Checkpoints of model sets: restore time, checkpoint cost per event, and ``writeguard learn`` events/s.

Usage: ``python benchmarks/bench_checkpoints.py [--agents 100000] [--events 300000] [--bootstrap H:P]``.
Without ``--bootstrap`` it starts a throwaway broker (:class:`testbed.broker.LocalKafka`).

- restore: ``--agents`` model sets (each trained on 40 writes; the example config) on a models topic of 6
  partitions; the worker's restore path reads every partition to its end (:func:`stream.checkpoints.read_partitions`)
  and puts the blobs in its SQLite cache (``Engine.preload`` into :class:`stream.modelstore.ModelStore`).
- checkpoint cost: the engine over a fleet's events alone, then with dirty tracking and a
  :class:`~stream.checkpoints.Checkpointer` flushing to the broker as often as ``worker.checkpoint_interval_s``
  (5 s) would at the measured rate, with the worker's budget (``stream.app.CHECKPOINT_SHARE`` of the interval),
  for 1,000 active agents and for ``--agents`` active agents (most of them changed between two checkpoints: the
  worst case, where the budget leaves model sets waiting for later rounds). In-process: the worker's Faust and
  Kafka costs, most of its time per event, are not in the baseline, so the share is an upper bound of the worker's.
- learn: ``writeguard learn`` over a JSONL file of ``--events`` fleet events (1,000 agents), with the checkpoints
  written to the broker.

Progress on stderr, figures on stdout; no assertions (targets: restore 100,000 agents in at most 10 s, checkpoints
at most 10 % of throughput, learn at least 30,000 events/s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log
from detectors.engine import Change, Engine, KafkaCoords
from stream.app import CHECKPOINT_SHARE, ensure_topics
from stream.checkpoints import Checkpointer, CheckpointWriter, Restored, partition_for, read_partitions
from stream.config import Config, parse_config
from stream.learn import learn
from stream.modelstore import ModelStore
from stream.pipeline import router_for
from testbed.broker import LocalKafka
from testbed.fleet import Fleet
from testbed.stack import example_config

S = 1_000_000
T0 = 1_700_000_000_000_000
PARTITIONS = 6


def config(bootstrap: str) -> Config:
    prefix = f"b{uuid.uuid4().hex[:8]}"
    data = example_config(bootstrap, prefix)
    data["topics"]["partitions"] = PARTITIONS
    return parse_config(data)


def warm_blobs(cfg: Config, n: int) -> list[bytes]:
    """``n`` distinct model sets of public.refunds, each trained on 40 writes."""
    eng = Engine(list(cfg.tables), track_dirty=True)
    for i in range(40):
        for a in range(n):
            x = {"amount": 20.0 + (a * 7 + i * 3) % 50}
            at = T0 + (i * n + a) * 1000
            eng.process(Change("public.refunds", "c", f"w{a}", None, x, at, KafkaCoords("t", 0, i)))
    out = []
    for key in eng.take_dirty():
        got = eng.checkpoint(key)
        assert got is not None
        out.append(got[0])
    return out


def bench_restore(cfg: Config, agents: int) -> None:
    ensure_topics(cfg)
    blobs = warm_blobs(cfg, 1000)
    writer = CheckpointWriter(cfg)
    t = time.perf_counter()
    for i in range(agents):
        agent = f"agent-{i:06d}"
        writer.write(("public.refunds", agent), blobs[i % len(blobs)], False, partition_for(agent, PARTITIONS))
        if i & 1023 == 0:
            writer.poll()
    assert writer.flush(120) == 0 and not writer.errors, writer.errors
    log(f"wrote {agents:,} checkpoints ({writer.bytes / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    for run in range(2):
        t = time.perf_counter()
        got: Restored = read_partitions(cfg, range(PARTITIONS))
        read_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            store = ModelStore(Path(d) / "models.sqlite")
            eng = Engine(list(cfg.tables), max_states=100_000, store=store)
            t2 = time.perf_counter()
            n = sum(eng.preload(items) for items in got.items.values())
            put_s = time.perf_counter() - t2
            store.close()
        print(f"restore run {run + 1}: {n:,} model sets ({got.bytes / 1e6:.1f} MB) read in {read_s:.2f} s, "
              f"cached in {put_s:.2f} s: {read_s + put_s:.2f} s in all")  # fmt: skip


def fleet_changes(n_agents: int, events: int) -> list[Change]:
    cfg = parse_config(example_config("127.0.0.1:1", "x"))
    router = router_for(cfg)
    fleet = Fleet(n_agents=n_agents, seed=3, prefix="x")
    out = []
    for i, rec in enumerate(fleet.stream(events, T0)):
        ch = router.route(rec.topic, rec.value, KafkaCoords(rec.topic, 0, i))
        if isinstance(ch, Change):
            out.append(ch)
    return out


class _Null:
    """A writer that only counts (the serialisation cost without the broker)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.bytes = 0

    def write(self, key: object, blob: bytes, learning: bool, partition: int) -> None:
        self.bytes += len(blob)

    def poll(self) -> None:
        return None


def bench_cost(cfg: Config, agents: int, events: int, interval_s: float = 5.0) -> None:
    ensure_topics(cfg)
    for n_agents in (1000, agents):
        changes = fleet_changes(n_agents, max(events, n_agents * 3))
        # CPU time of the process (librdkafka's threads included), the better of two runs: the machine is shared.
        base_s = float("inf")
        for _ in range(2):
            base = Engine(list(cfg.tables), max_states=None)
            t = time.process_time()
            for ch in changes:
                base.process(ch)
            base_s = min(base_s, time.process_time() - t)
        rate = len(changes) / base_s
        every = max(1, int(rate * interval_s))  # events between two checkpoints at that rate
        # A run shorter than two intervals would hold no checkpoint at all: then checkpoint more often than the
        # worker would (the cost printed is then higher than at the interval's rate; the line says how often).
        every = min(every, max(1, len(changes) // 3))
        every_s = every / rate
        for label in ("to the broker", "to the broker", "serialise only", "serialise only"):
            writer = CheckpointWriter(cfg) if label == "to the broker" else _Null()
            eng = Engine(list(cfg.tables), max_states=None, track_dirty=True)
            ck = Checkpointer(cfg, eng, writer=writer)  # type: ignore[arg-type]
            ck.owned = set(range(PARTITIONS))
            flushes = written = 0
            backlog: list[int] = []
            t = time.process_time()
            for i, ch in enumerate(changes, 1):
                eng.process(ch)
                if i % every == 0:  # the worker's timer: a budget of CHECKPOINT_SHARE of the interval
                    written += ck.flush(budget_s=interval_s * CHECKPOINT_SHARE)
                    flushes += 1
                    backlog.append(ck.backlog)
            with_s = time.process_time() - t
            t = time.perf_counter()
            rest = ck.flush()  # what a revoke or a stop writes: every model set still waiting
            rest_s = time.perf_counter() - t
            if isinstance(writer, CheckpointWriter):
                writer.flush(60)
            extra_us = (with_s - base_s) / len(changes) * 1e6
            print(f"checkpoint cost, {n_agents:,} agents, {label}, a checkpoint every {every:,} events "
                  f"({every_s:.1f} s at that rate): {len(changes):,} events, {rate:,.0f} events/s "
                  f"without, {len(changes) / with_s:,.0f} with ({flushes} checkpoints, {written:,} model sets; "
                  f"left waiting after each: {backlog}): {extra_us:+.2f} µs/event, "
                  f"{(with_s - base_s) / base_s:+.1%} of the time; the final flush of {rest:,} took "
                  f"{rest_s:.2f} s")  # fmt: skip


def bench_cost_parts(cfg: Config, events: int, interval_s: float = 5.0) -> None:
    """The parts of the checkpoint cost, each the best of five runs (A/B throughput on a shared machine is noise):
    dirty tracking per event, and serialising (pickle plus the producer's call) per model set."""
    ensure_topics(cfg)
    changes = fleet_changes(1000, min(events, 100_000))
    plain = tracked = float("inf")
    for _ in range(5):
        for track in (False, True):
            eng = Engine(list(cfg.tables), max_states=None, track_dirty=track)
            t = time.process_time()
            for ch in changes:
                eng.process(ch)
            took = time.process_time() - t
            if track:
                tracked = min(tracked, took)
            else:
                plain = min(plain, took)
    per_event = plain / len(changes) * 1e6
    dirty_us = (tracked - plain) / len(changes) * 1e6
    writer = CheckpointWriter(cfg)
    ck = Checkpointer(cfg, eng, writer=writer)
    ck.owned = set(range(PARTITIONS))
    per_set = float("inf")
    for _ in range(5):
        for key in eng.states:
            assert eng.dirty is not None
            eng.dirty[key] = None
        t = time.process_time()
        n = ck.flush()
        per_set = min(per_set, (time.process_time() - t) / n * 1e6)
    writer.flush(60)
    print(f"checkpoint cost parts: engine {per_event:.1f} µs/event; dirty tracking {dirty_us:+.2f} µs/event "
          f"({dirty_us / per_event:+.1%}); a checkpoint {per_set:.1f} µs per model set (pickle and produce)")
    for agents_per_interval in (1_000, 100_000):
        rate = 1e6 / per_event
        share = agents_per_interval * per_set / 1e6 / interval_s
        print(f"  at {rate:,.0f} events/s with {agents_per_interval:,} agents changed per {interval_s:.0f} s: "
              f"{share:.1%} of the time unbudgeted, at most {CHECKPOINT_SHARE:.0%} with the worker's budget")


def bench_learn(cfg: Config, events: int) -> None:
    ensure_topics(cfg)
    fleet = Fleet(n_agents=1000, seed=9, prefix=cfg.tables[0].topic.split(".")[0])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "history.jsonl"
        with path.open("wb") as fh:
            for rec in fleet.stream(events, T0, speedup=0.01):
                fh.write(rec.value + b"\n")
        stats = learn(cfg, events=path, progress=log)
    print(f"learn: {stats.events:,} events in {stats.seconds:.2f} s ({stats.events_per_second:,.0f} events/s); "
          f"{stats.model_sets:,} model sets written in {stats.write_seconds:.2f} s "
          f"({(stats.events) / (stats.seconds + stats.write_seconds):,.0f} events/s in all)")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=100_000)
    p.add_argument("--events", type=int, default=300_000)
    p.add_argument("--bootstrap", help="an existing broker (default: start one)")
    p.add_argument("--only", choices=["restore", "cost", "parts", "learn"], action="append")
    args = p.parse_args()
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = LocalKafka(progress=log)
        broker.start()
        bootstrap = broker.bootstrap_servers
    try:
        only = set(args.only or ["restore", "cost", "learn"])
        if "restore" in only:
            bench_restore(config(bootstrap), args.agents)
        if "cost" in only:
            bench_cost_parts(config(bootstrap), args.events)
            bench_cost(config(bootstrap), args.agents, args.events)
        if "parts" in only:
            bench_cost_parts(config(bootstrap), args.events)
        if "learn" in only:
            bench_learn(config(bootstrap), args.events)
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
