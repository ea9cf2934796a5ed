"""End-to-end throughput, detection lag and memory of writeguard on a real Kafka.

Usage: ``python3 benchmarks/bench_pipeline.py [--events N] [--bootstrap-servers HOST:PORT]`` (``--help``
for all options). Without ``--bootstrap-servers`` a throw-away single-node Kafka is started from the
Maven Central jars (:class:`testbed.broker.LocalKafka`; needs Java 17 and Maven).

What it measures, all with the example config's detectors (``stream/examples/writeguard.yaml``):

1. replay: the N events through :func:`stream.replay.replay`, in this process, no Kafka; then the bytes
   held per (table, agent) model set, with tracemalloc and with a ``sys.getsizeof`` walk.
2. worker: the N events pre-produced to the two CDC topics (3 partitions each), then ONE
   ``writeguard worker`` subprocess (Faust, repartition by agent) on a fresh group; events/s from the
   first to the last event counted by ``writeguard_events_total``, and the worker's RSS. Optionally the
   same with ``worker.repartition: false`` (no changes-topic hop).
3. bare loop: the same records through a confluent-kafka ``Consumer`` in this process, calling
   ``Router.route`` then ``Engine.process`` directly: what the detection code costs without Faust.
4. detection lag: a fresh worker, the fleet's models warmed up first, then events produced in real
   time at half the measured worker throughput while a refunds agent turns rogue every ~0.25 s; the
   writes are made before the phase, each with its commit time, and produced at that time, so that the
   load generator does not take the worker's core; p50/p99 of the alerts' ``lag_ms`` and the worker's
   processing-lag histogram.

Progress goes to stderr, the table of figures to stdout. Numbers only, no assertions: timings belong to
the machine (and the neighbours) they ran on. The defaults take about 2.5 minutes on 2 cores.

Diagnostics: ``--profile SECONDS`` attaches py-spy (``pip install py-spy``) to the throughput worker and
prints where it spends its time; ``--worker-fetch-max-wait-ms MS`` runs the workers with
``worker.fetch_max_wait_ms`` set to MS instead of the example config's value (Faust's own is 1500).
"""

from __future__ import annotations

import argparse
import copy
import gc
import heapq
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # re-export not declared

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from benchmarks.common import (  # noqa: E402
    hist_buckets,
    histogram_quantile,
    iso_us,
    log,
    machine_lines,
    metric_total,
    percentile,
    remove_work_folder,
)
from detectors.engine import Change, Engine, FileCoords, KafkaCoords  # noqa: E402
from stream.config import EXAMPLE_CONFIG, Config, load_config  # noqa: E402
from stream.pipeline import Router, build_alert  # noqa: E402
from stream.replay import replay  # noqa: E402
from testbed.fleet import REFUNDS, Agent, Fleet, Record  # noqa: E402
from testbed.process import WorkerProcess, interrupt_on_sigterm, spawn_worker, stop_process  # noqa: E402

if TYPE_CHECKING:
    from testbed.broker import LocalKafka

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small helpers -------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f} events/s"


# -- Kafka ---------------------------------------------------------------------------------------------


def create_topics(bootstrap: str, topics: dict[str, int], timeout: float = 30.0,
                  config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, n, 1, config=config or {}) for t, n in topics.items()],
                                  request_timeout=timeout)
    for name, fut in futures.items():
        try:
            fut.result()
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise RuntimeError(f"cannot create topic {name}: {e}") from None
    deadline = time.monotonic() + timeout
    pending = set(topics)
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics without leaders after {timeout} s: {sorted(pending)}")
        md = admin.list_topics(timeout=5)
        for name in list(pending):
            meta = md.topics.get(name)
            if meta is not None and meta.error is None and meta.partitions and all(
                    p.leader >= 0 for p in meta.partitions.values()):
                pending.discard(name)
        time.sleep(0.05)


def produce_all(bootstrap: str, records: list[Record]) -> float:
    """Produce and flush; returns seconds taken."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10_000,
                         "queue.buffering.max.messages": 500_000, "acks": "all"})
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    started = time.perf_counter()
    for i, rec in enumerate(records):
        while True:
            try:
                producer.produce(rec.topic, key=rec.key, value=rec.value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i & 1023 == 0:
            producer.poll(0)
    left = producer.flush(60)
    if left or errors:
        raise RuntimeError(f"producing failed: {left} undelivered, errors {errors[:3]}")
    return time.perf_counter() - started


def write_config(path: Path, bootstrap: str, cdc_prefix: str, run: str, *, repartition: bool = True,
                 fetch_max_wait_ms: int | None = None) -> Config:
    """The example config with a fresh group id and fresh writeguard topics, reading ``cdc_prefix``'s topics."""
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    data["kafka"]["bootstrap.servers"] = bootstrap
    data["kafka"]["group.id"] = f"wg-bench-{run}"
    parts = data.get("topics", {}).get("partitions", 6)
    data["topics"] = {"alerts": f"{run}.alerts", "control": f"{run}.control", "dead_letter": f"{run}.dlq",
                      "changes": f"{run}.changes", "partitions": parts}
    data.setdefault("worker", {})["repartition"] = repartition
    if fetch_max_wait_ms is not None:
        data["worker"]["fetch_max_wait_ms"] = fetch_max_wait_ms
    for t in data["tables"]:
        t["topic"] = f"{cdc_prefix}.{t['name']}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


# -- the worker subprocess -----------------------------------------------------------------------------


@dataclass
class Worker(WorkerProcess):
    """A worker under measurement, with its RSS when it came up."""

    rss_start_kib: int | None = None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker exited with {self.proc.returncode}; log tail:\n{tail}")


def start_worker(cfg_path: Path, cfg: Config, workdir: Path, children: list[subprocess.Popen[bytes]]) -> Worker:
    wp = spawn_worker(cfg_path, workdir, bootstrap=cfg.kafka.bootstrap_servers)
    children.append(wp.proc)
    w = Worker(wp.proc, wp.metrics_port, wp.log)
    w.rss_start_kib = rss_kib(wp.proc.pid)
    log(f"worker pid {wp.proc.pid} up (metrics :{wp.metrics_port}, RSS {(w.rss_start_kib or 0) / 1024:.0f} MiB)")
    return w


# -- 1. replay and memory ------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    events_per_s: float
    events_per_cpu_s: float
    changes: int
    alerts: int
    bytes_tracemalloc: float
    bytes_walk: float
    walk_by_table: dict[str, float]
    models: int


def deep_size(obj: object, seen: set[int]) -> int:
    """sys.getsizeof of obj and everything it reaches (dicts, sequences, __dict__, __slots__), once each."""
    stack = [obj]
    size = 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type | types.ModuleType | types.FunctionType | types.MethodType):
            continue
        seen.add(id(o))
        size += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        d = getattr(o, "__dict__", None)
        if isinstance(d, dict):
            stack.append(d)
        for cls in type(o).__mro__:
            for slot in cls.__dict__.get("__slots__", ()):
                if slot not in ("__dict__", "__weakref__") and hasattr(o, slot):
                    stack.append(getattr(o, slot))
    return size


def bench_replay(cfg: Config, records: list[Record], workdir: Path) -> ReplayResult:
    path = workdir / "events.jsonl"
    with path.open("wb") as fh:
        for rec in records:
            fh.write(rec.value + b"\n")
    engine = Engine(list(cfg.tables))
    log(f"replay: {len(records):,} events from {path.name} ...")
    stats = replay(path, cfg, engine=engine, progress=log)
    log(f"replay: {stats.events_per_second:,.0f} events/s, {stats.changes:,} changes, {stats.alerts} alerts")

    # Walk: what the engine holds after the whole run, shared objects (e.g. feature-name sets) counted once.
    seen: set[int] = set()
    deep_size(engine.tables, seen)  # the compiled plans and population models are not per agent
    by_table: dict[str, list[int]] = {}
    walk_total = sys.getsizeof(engine.states)
    for key, st in engine.states.items():
        n = deep_size(key, seen) + deep_size(st, seen)
        by_table.setdefault(key[0], []).append(n)
        walk_total += n
    models = len(engine.states)

    # tracemalloc: net allocations of a fresh engine fed the same changes (decoded before tracing starts,
    # so the agent-id strings, which the state keys share with the decoded changes, are added by hand).
    router = Router(cfg.tables)
    changes: list[Change] = []
    for i, rec in enumerate(records):
        out = router.route(rec.topic, rec.value, FileCoords("m", i))
        if not isinstance(out, str):
            changes.append(out)
    del engine
    gc.collect()
    log(f"memory: tracemalloc over Engine.process of {len(changes):,} changes ...")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    eng2 = Engine(list(cfg.tables))
    for ch in changes:
        eng2.process(ch)
    del ch
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    ids = sum(sys.getsizeof(agent) for _, agent in eng2.states)
    traced_per = (traced + ids) / max(len(eng2.states), 1)
    return ReplayResult(
        events_per_s=stats.events_per_second, events_per_cpu_s=stats.events_per_cpu_second, changes=stats.changes,
        alerts=stats.alerts,
        bytes_tracemalloc=traced_per, bytes_walk=walk_total / max(models, 1),
        walk_by_table={t: sum(v) / len(v) for t, v in by_table.items()}, models=models,
    )


# -- 2. one Faust worker over pre-produced events ------------------------------------------------------


@dataclass
class WorkerResult:
    events_per_s: float | None
    counted: int
    seconds: float
    alerts: int
    rss_start_kib: int | None
    rss_after_kib: int | None
    worker_cpu: float | None  # fraction of one core, first to last event
    broker_cpu: float | None
    profile: Path | None = None
    startup_s: float | None = None  # worker start to its first counted event


def bench_worker(bootstrap: str, cdc_prefix: str, expected: int, workdir: Path,
                 children: list[subprocess.Popen[bytes]], *, repartition: bool, broker_pid: int | None,
                 profile_s: float, stall_s: float, fetch_max_wait_ms: int | None = None) -> WorkerResult:
    run = f"{cdc_prefix}-{'w' if repartition else 'd'}{uuid.uuid4().hex[:6]}"
    wdir = workdir / run
    wdir.mkdir()
    cfg_path = wdir / "writeguard.yaml"
    cfg = write_config(cfg_path, bootstrap, cdc_prefix, run, repartition=repartition,
                       fetch_max_wait_ms=fetch_max_wait_ms)
    w = start_worker(cfg_path, cfg, wdir, children)
    prof_out = wdir / "pyspy.txt" if profile_s > 0 else None
    prof_proc: subprocess.Popen[bytes] | None = None
    t_first: float | None = None
    c_first = 0.0
    cpu_w0: float | None = None
    cpu_b0: float | None = None
    count = 0.0
    t_last = time.perf_counter()
    last_change = time.perf_counter()
    last_report = 0.0
    report_cpu: float | None = None
    report_count = 0.0
    started = time.perf_counter()
    try:
        while True:
            w.check_alive()
            now = time.perf_counter()
            c = metric_total(w.metrics(), "writeguard_events_total")
            if c != count:
                last_change = now
            count = c
            if c > 0 and t_first is None:
                t_first, c_first = now, c
                cpu_w0, cpu_b0 = cpu_seconds(w.proc.pid), cpu_seconds(broker_pid)
                if prof_out is not None:
                    prof_proc = start_profiler(w.proc.pid, profile_s, prof_out, children)
            if c >= expected:
                t_last = now
                break
            if now - last_change > stall_s:
                log(f"worker: stalled at {c:,.0f} of {expected:,} events for {stall_s:.0f} s; giving up")
                t_last = last_change
                break
            if now - last_report >= 3.0:
                cpu_now = cpu_seconds(w.proc.pid)
                busy = ((cpu_now - report_cpu) / (now - last_report)
                        if cpu_now is not None and report_cpu is not None and last_report else None)
                rate = (c - report_count) / (now - last_report) if last_report else 0.0
                last_report, report_cpu, report_count = now, cpu_now, c
                log(f"worker: {c:,.0f} / {expected:,} events ({rate:,.0f} events/s over the last seconds, "
                    f"worker CPU {'n/a' if busy is None else f'{100 * busy:.0f}%'})")
            time.sleep(0.5)  # each scrape costs the worker ~10 ms of CPU: its metrics server shares the GIL
        cpu_w1, cpu_b1 = cpu_seconds(w.proc.pid), cpu_seconds(broker_pid)
        rss_after = rss_kib(w.proc.pid)
        alerts = int(metric_total(w.metrics(), "writeguard_alerts_total"))
        secs = t_last - t_first if t_first is not None else 0.0
        eps = (count - c_first) / secs if secs > 0 else None

        def frac(a: float | None, b: float | None) -> float | None:
            return (b - a) / secs if a is not None and b is not None and secs > 0 else None

        if prof_proc is not None:
            log("worker: waiting for py-spy to finish ...")
            try:
                prof_proc.wait(profile_s + 30)
            except subprocess.TimeoutExpired:
                stop_process(prof_proc)
        log(f"worker (repartition={repartition}): {count:,.0f} events, {fmt_rate(eps)}, {alerts} alerts, "
            f"RSS {(rss_after or 0) / 1024:.0f} MiB")
        return WorkerResult(eps, int(count), secs, alerts, w.rss_start_kib, rss_after,
                            frac(cpu_w0, cpu_w1), frac(cpu_b0, cpu_b1), prof_out if prof_proc else None,
                            t_first - started if t_first is not None else None)
    finally:
        if prof_proc is not None:
            stop_process(prof_proc)
        stop_process(w.proc)


def start_profiler(pid: int, seconds: float, out: Path, children: list[subprocess.Popen[bytes]]
                   ) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        log("py-spy not found (pip install py-spy): no profile")
        return None
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(int(seconds), 1)), "--rate", "200",
         "--format", "raw", "--output", str(out), "--nonblocking", "--threads"],
        stdout=subprocess.DEVNULL, stderr=(out.parent / "pyspy.log").open("wb"), start_new_session=True,
    )
    children.append(proc)
    log(f"py-spy attached to the worker for {seconds:.0f} s")
    return proc


def summarize_profile(path: Path, top: int = 15) -> list[str]:
    """Samples by thread, self time by package and by function, inclusive time, from py-spy raw output."""
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    n = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not stack or not cnt.isdigit():
            continue
        k = int(cnt)
        parts = stack.split(";")
        thread = "?"
        if parts and parts[0].startswith("thread ("):
            thread = parts.pop(0).partition(": ")[2] or "?"
        frames = [f for f in parts if f and not f.startswith("process ")]
        if not frames:
            continue
        n += k
        if "serve_forever" in thread or "process_request" in thread:
            thread = "metrics HTTP server (prometheus_client)"
        elif thread.startswith("Thread-") and "(" not in thread:
            thread = "Thread-N (Faust's aiokafka consumer thread)"
        by_thread[thread] += k
        names = []
        for f in frames:
            fn, _, loc = f.partition(" (")
            names.append((fn, loc.rsplit(":", 1)[0].rstrip(")")))
        fn, file = names[-1]
        self_fn[f"{fn} ({file})"] += k
        self_pkg[file.split("/")[0]] += k
        for item in {f"{a} ({b})" for a, b in names}:
            incl[item] += k
    if n == 0:
        return ["(py-spy collected no samples)"]
    out = [f"py-spy: {n:,} samples of the worker's non-idle threads (percent of those samples)", "  by thread:"]
    out += [f"    {100 * v / n:5.1f}%  {k}" for k, v in by_thread.most_common()]
    out.append("  self time by package or stdlib file:")
    out += [f"    {100 * v / n:5.1f}%  {k}" for k, v in self_pkg.most_common(top)]
    out.append("  self time by function:")
    out += [f"    {100 * v / n:5.1f}%  {k}" for k, v in self_fn.most_common(top)]
    ours = sum(v for k, v in self_pkg.items() if k in ("stream", "detectors", "connectors"))
    out.append(f"  writeguard's own code (stream, detectors, connectors): {100 * ours / n:.1f}% self time; inclusive:")
    out += [f"    {100 * v / n:5.1f}%  {k}" for k, v in incl.most_common()
            if k.split(" (", 1)[1].startswith(("stream/", "detectors/", "connectors/"))
            and not k.startswith(("<module>", "main ", "cmd_worker", "run_worker"))][:top]
    return out


# -- 3. bare confluent-kafka loop ----------------------------------------------------------------------


@dataclass
class BareResult:
    events_per_s: float | None
    changes: int
    alerts: int


def bench_bare(bootstrap: str, cfg: Config, expected: int, stall_s: float) -> BareResult:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wg-bench-bare-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})
    consumer.subscribe([t.topic for t in cfg.tables])
    router = Router(cfg.tables)
    engine = Engine(list(cfg.tables))
    n = alerts = 0
    t_first: float | None = None
    t_last = last_msg = time.perf_counter()
    try:
        while n < expected:
            msgs = consumer.consume(num_messages=1000, timeout=0.5)
            now = time.perf_counter()
            if not msgs:
                if now - last_msg > stall_s:
                    log(f"bare loop: stalled at {n:,} of {expected:,}; giving up")
                    break
                continue
            last_msg = now
            if t_first is None:
                t_first = now
            for m in msgs:
                if m.error() is not None:
                    continue
                topic, part, off = m.topic(), m.partition(), m.offset()
                assert topic is not None and part is not None and off is not None
                out = router.route(topic, m.value(), KafkaCoords(topic, part, off))
                if isinstance(out, str):
                    continue
                n += 1
                findings = engine.process(out)
                if findings:
                    alerts += len(findings)
                    now_us = time.time_ns() // 1000
                    for f in findings:
                        build_alert(f, now_us).to_bytes()
            t_last = time.perf_counter()
    finally:
        consumer.close()
    secs = t_last - t_first if t_first is not None else 0.0
    eps = n / secs if secs > 0 else None
    log(f"bare loop: {n:,} changes, {fmt_rate(eps)}, {alerts} alerts")
    return BareResult(eps, n, alerts)


# -- 4. detection lag under real-time load -------------------------------------------------------------


@dataclass
class LagResult:
    target_rate: float
    achieved_rate: float
    produced: int
    rogues: int
    alert_lags_ms: list[float] = field(default_factory=list)
    e2e_lags_ms: list[float] = field(default_factory=list)
    rogue_alerts: int = 0
    other_alerts: int = 0
    warmup_alerts: int = 0
    hist_p50_s: float = float("nan")
    hist_p99_s: float = float("nan")
    hist_samples: int = 0
    worker_cpu: float | None = None
    phase_start_us: int = 0
    points: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, lag_ms)
    late_ms: list[float] = field(default_factory=list)  # produce time minus commit time, 1 write in 64
    gc: list[tuple[int, float]] = field(default_factory=list)  # the worker's collections and ms, by generation
    # (detected_at µs, topic, partition, offset) of each alert's triggering write, for the worker's share
    triggers: list[tuple[int, str, int, int]] = field(default_factory=list)
    worker_share_ms: list[float] = field(default_factory=list)  # CDC record's arrival -> alert published


def bench_lag(bootstrap: str, args: argparse.Namespace, rate: float, workdir: Path,
              children: list[subprocess.Popen[bytes]], *, repartition: bool = True) -> LagResult:
    prefix = f"lag{uuid.uuid4().hex[:8]}"
    fleet = Fleet(n_agents=args.agents, seed=args.seed + 1, prefix=prefix)
    # The broker stamps each CDC record with its arrival: an alert's lag then splits into the load generator's
    # and the broker's share (commit -> arrival) and the worker's (arrival -> alert published).
    create_topics(bootstrap, {f"{prefix}.{t}": 3 for t in {a.table for a in fleet.agents}},
                  config={"message.timestamp.type": "LogAppendTime"})
    scale = rate / sum(a.rate_per_s for a in fleet.agents)
    for a in fleet.agents:
        a.rate_per_s *= scale
    warm = args.warmup_per_agent
    # Warm-up history: every agent writes `warm` times, spread over the last two minutes of commit time.
    span_us = 120_000_000
    n_warm = warm * len(fleet.agents)
    start_us = time.time_ns() // 1000 - span_us - 5_000_000
    history = [fleet.write(a, start_us + (k * len(fleet.agents) + i) * span_us // n_warm)
               for k in range(warm) for i, a in enumerate(fleet.agents)]
    log(f"lag: producing {len(history):,} warm-up events ({warm} per agent) ...")
    produce_all(bootstrap, history)

    wdir = workdir / f"{prefix}-lag"
    wdir.mkdir()
    cfg_path = wdir / "writeguard.yaml"
    cfg = write_config(cfg_path, bootstrap, prefix, f"{prefix}-lag", repartition=repartition,
                       fetch_max_wait_ms=args.worker_fetch_max_wait_ms)
    w = start_worker(cfg_path, cfg, wdir, children)
    watch = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wg-bench-watch-{uuid.uuid4().hex[:8]}",
                      "enable.auto.commit": False})
    try:
        md = watch.list_topics(cfg.topics.alerts, timeout=30).topics[cfg.topics.alerts]
        watch.assign([TopicPartition(cfg.topics.alerts, p, OFFSET_BEGINNING) for p in md.partitions])
        deadline = time.monotonic() + 300
        while True:
            w.check_alive()
            c = metric_total(w.metrics(), "writeguard_events_total")
            if c >= n_warm:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up not consumed: {c:,.0f} of {n_warm:,}")
            time.sleep(0.5)
        log(f"lag: worker has scored the warm-up; now {rate:,.0f} events/s in real time for "
            f"{args.lag_seconds:.0f} s, a refunds agent turning rogue every {args.rogue_every} s")
        res = LagResult(target_rate=rate, achieved_rate=0.0, produced=0, rogues=0)
        base = w.metrics()
        hist0 = hist_buckets(base, "writeguard_processing_lag_seconds")
        events0 = metric_total(base, "writeguard_events_total")
        cpu0, wall0 = cpu_seconds(w.proc.pid), time.monotonic()
        def where(changes_topic: str = cfg.topics.changes) -> str:
            """Where a backlog sits: the CDC topics (ingest) or the changes topic (detect)."""
            m = w.metrics()
            lag = {k: v for k, v in m.items() if k.startswith("writeguard_consumer_lag_messages{")}
            hop = sum(v for k, v in lag.items() if f'topic="{changes_topic}"' in k)
            return f"worker backlog: CDC {sum(lag.values()) - hop:,.0f}, changes topic {hop:,.0f} records"

        rogue_ids = realtime_phase(bootstrap, fleet, args, watch, res, where)
        # Let the worker catch up and publish the last alerts.
        expected = events0 + res.produced
        settle_end = time.monotonic() + args.settle_seconds
        while time.monotonic() < settle_end:
            drain_alerts(watch, res, rogue_ids)
            if metric_total(w.metrics(), "writeguard_events_total") >= expected:
                settle_end = min(settle_end, time.monotonic() + 1.0)
            time.sleep(0.2)
        drain_alerts(watch, res, rogue_ids)
        cpu1, wall1 = cpu_seconds(w.proc.pid), time.monotonic()
        res.worker_share_ms = worker_share(bootstrap, res.triggers)
        end = w.metrics()
        hist1 = hist_buckets(end, "writeguard_processing_lag_seconds")
        def grown(key: str) -> float:
            return end.get(key, 0.0) - base.get(key, 0.0)

        for g in range(3):
            k = f'{{generation="{g}"}}'
            res.gc.append((int(grown(f"writeguard_gc_pause_seconds_count{k}")),
                           1000 * grown(f"writeguard_gc_pause_seconds_sum{k}")))
        delta = {b: hist1.get(b, 0.0) - hist0.get(b, 0.0) for b in hist1}
        res.hist_samples = int(delta.get(float("inf"), 0.0))
        res.hist_p50_s = histogram_quantile(delta, 0.50)
        res.hist_p99_s = histogram_quantile(delta, 0.99)
        if cpu0 is not None and cpu1 is not None:
            res.worker_cpu = (cpu1 - cpu0) / (wall1 - wall0)
        log(f"lag: {res.produced:,} events at {res.achieved_rate:,.0f}/s, {res.rogues} rogues, "
            f"{res.rogue_alerts} rogue alerts, {res.other_alerts} other alerts")
        return res
    finally:
        watch.close()
        stop_process(w.proc)


def schedule_realtime(fleet: Fleet, args: argparse.Namespace, t0: float) -> tuple[list[Record], set[str]]:
    """The real-time phase's writes, made before it starts, each with its commit time from ``t0`` on.

    Made beforehand so that the phase itself only hands ready bytes to librdkafka: building Debezium
    envelopes in Python at half the worker's rate would take most of a core from the same 2 cores, and the
    lag measured would be the load generator's. Rogues start on the same clock: one every ``rogue_every``
    seconds, none in the last 3 s (a rogue needs two inflated writes, debounce k=2, before its alert).
    """
    rng = random.Random(args.seed + 2)
    candidates: list[Agent] = [a for a in fleet.agents if a.table == REFUNDS]
    rng.shuffle(candidates)
    rogue_ids: set[str] = set()
    end = t0 + args.lag_seconds
    last_rogue_at = end - 3.0
    next_rogue = t0 + min(2.0, args.rogue_every)
    queue = [(t0 + rng.expovariate(a.rate_per_s), i) for i, a in enumerate(fleet.agents)]
    heapq.heapify(queue)
    out: list[Record] = []
    while True:
        ts, i = heapq.heappop(queue)
        if ts >= end:
            break
        while next_rogue <= ts and next_rogue < last_rogue_at and candidates:
            a = candidates.pop()
            a.rogue = "inflate"
            rogue_ids.add(a.agent_id)
            next_rogue += args.rogue_every
        a = fleet.agents[i]
        heapq.heappush(queue, (ts + rng.expovariate(a.rate_per_s), i))
        out.append(fleet.write(a, int(ts * 1e6)))
    return out, rogue_ids


def realtime_phase(bootstrap: str, fleet: Fleet, args: argparse.Namespace, watch: Consumer,
                   res: LagResult, where: Callable[[], str]) -> set[str]:
    # Time the envelope builder on a copy of the fleet (its state: live orders, ids), over the phase's first
    # two seconds, so that the phase starts once its writes are made.
    probe = copy.deepcopy(fleet)
    t = time.perf_counter()
    sample, _ = schedule_realtime(probe, argparse.Namespace(**{**vars(args), "lag_seconds": 2.0}), 0.0)
    per_write = (time.perf_counter() - t) / max(1, len(sample))
    expected = args.lag_seconds * sum(a.rate_per_s for a in fleet.agents)
    t0 = time.time() + 2.0 + 1.5 * per_write * expected
    log(f"lag: making {expected:,.0f} writes ({1e6 * per_write:.0f} µs each) before the phase starts ...")
    made, rogue_ids = schedule_realtime(fleet, args, t0)
    # Plain tuples, and out of the collector's sight: a full collection over half a million objects would stall
    # the producer for longer than the lag being measured.
    sends = [(r.commit_ts_us / 1e6, r.topic, r.key, r.value) for r in made]
    del made
    gc.collect()
    gc.freeze()
    res.rogues = len(rogue_ids)
    late = time.time() - t0
    if late > 0:
        log(f"lag: WARNING the writes were ready {late:.1f} s after the phase's start; its first alerts carry that")
    # linger.ms 5: the default of Kafka 4's Java producer, the one Debezium's Connect worker sends with (KIP-1030).
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    # Connected, with the topics' metadata, before the first write is due: as Debezium's long-lived producer is.
    # A new one holds its first writes until then, and the run's first alerts would carry that.
    for topic in sorted({s[1] for s in sends}):
        producer.list_topics(topic, timeout=30)
    res.phase_start_us = int(t0 * 1e6)
    last_report = last_drain = time.monotonic()
    i, n = 0, len(sends)
    while i < n:
        now = time.time()
        # Every write that is due, then a short wait: the generator's own cost stays small at any rate.
        while i < n and sends[i][0] <= now:
            commit, topic, key, value = sends[i]
            try:
                producer.produce(topic, key=key, value=value)
            except BufferError:
                producer.poll(0.01)
                continue
            i += 1
            if i & 63 == 0:
                res.late_ms.append(1000 * (time.time() - commit))
        res.produced = i
        mono = time.monotonic()
        if mono - last_drain >= 0.02:
            last_drain = mono
            drain_alerts(watch, res, rogue_ids)
        if mono - last_report >= 5.0:
            last_report = mono
            log(f"lag: {res.produced:,} produced, {res.rogue_alerts} rogue alerts so far; {where()}")
        if i < n:
            # A millisecond's sleep rather than a spin to the next write: the generator shares the 2 cores.
            producer.poll(0.001)
    producer.flush(30)
    gc.unfreeze()
    res.achieved_rate = res.produced / (time.time() - t0)
    return rogue_ids


def worker_share(bootstrap: str, triggers: list[tuple[int, str, int, int]]) -> list[float]:
    """Per alert, its triggering CDC record's arrival at the broker (LogAppendTime) to the alert's detected_at."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wg-bench-share-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    out: list[float] = []
    try:
        for detected_us, topic, partition, offset in triggers:
            c.assign([TopicPartition(topic, partition, offset)])
            msg = c.consume(1, 10.0)
            if msg and msg[0].error() is None and msg[0].offset() == offset:
                kind, ts_ms = msg[0].timestamp()
                if kind == TIMESTAMP_LOG_APPEND_TIME:
                    out.append(detected_us / 1000 - ts_ms)
    finally:
        c.close()
    return out


def drain_alerts(watch: Consumer, res: LagResult, rogue_ids: set[str]) -> None:
    msgs = watch.consume(num_messages=500, timeout=0)
    if not msgs:
        return
    recv_us = time.time_ns() // 1000
    for m in msgs:
        value = m.value()
        if m.error() is not None or value is None:
            continue
        body = json.loads(value)
        commit_us = iso_us(str(body["commit_ts"]))
        if commit_us < res.phase_start_us:
            res.warmup_alerts += 1  # raised on the warm-up history: its commit times are in the past
            continue
        res.alert_lags_ms.append(float(body["lag_ms"]))
        last = next((t for t in reversed(body.get("triggering_events") or [])
                     if t.get("topic") is not None and iso_us(str(t["commit_ts"])) == commit_us), None)
        if last is not None:
            res.triggers.append((iso_us(str(body["detected_at"])), last["topic"], last["partition"], last["offset"]))
        res.points.append(((commit_us - res.phase_start_us) / 1e6, float(body["lag_ms"])))
        res.e2e_lags_ms.append((recv_us - commit_us) / 1000.0)
        if body["agent_id"] in rogue_ids:
            res.rogue_alerts += 1
        else:
            res.other_alerts += 1


# -- main ----------------------------------------------------------------------------------------------


def make_events(n: int, agents: int, seed: int, prefix: str) -> list[Record]:
    """``n`` events in commit order from ``agents`` agents at the fleet's own rates (2-6 writes/s each,
    far under the example's rate guard of 1,200 writes/min), ending now."""
    fleet = Fleet(n_agents=agents, seed=seed, prefix=prefix)
    total_rate = sum(a.rate_per_s for a in fleet.agents)
    start_us = time.time_ns() // 1000 - int(n / total_rate * 1e6)
    return list(fleet.stream(n, start_us))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark writeguard on a real Kafka: Faust worker throughput, a bare confluent-kafka "
        "loop with the same detectors, replay, detection lag at half load, and memory per agent model set. "
        "Progress on stderr, the table of figures on stdout.")
    p.add_argument("--events", type=int, default=100_000, help="events for the throughput runs (100,000)")
    p.add_argument("--agents", type=int, default=1000, help="simulated agents (1,000)")
    p.add_argument("--bootstrap-servers", metavar="HOST:PORT",
                   help="use this Kafka instead of starting a local one (topics get unique names)")
    p.add_argument("--lag-seconds", type=float, default=30.0, help="real-time phase of the lag run (30)")
    p.add_argument("--lag-rate", type=float,
                   help="events/s of the lag run (default: half the measured worker throughput)")
    p.add_argument(
        "--rogue-every",
        type=float,
        default=0.25,
        help="seconds between rogue agents (0.25: about 110 alerts in 30 s, enough for a p99)",
    )
    p.add_argument("--warmup-per-agent", type=int, default=40,
                   help="warm-up writes per agent before the lag run (40; the example's zscore warmup is 30)")
    p.add_argument("--settle-seconds", type=float, default=5.0,
                   help="max seconds to wait for the last alerts after the lag run (5)")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=True,
                   help="also run a worker with worker.repartition: false (default: yes)")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="attach py-spy to the throughput worker for SECONDS and print where it spends its "
                   "time (off by default; slows the worker slightly)")
    p.add_argument("--worker-fetch-max-wait-ms", type=int, metavar="MS",
                   help="set worker.fetch_max_wait_ms for the workers (example config: 20; Faust's own: 1500)")
    p.add_argument("--skip-lag", action="store_true", help="skip the detection-lag run")
    p.add_argument("--replay-only", action="store_true",
                   help="only the replay and memory figures: no Kafka, no workers (seconds, not minutes)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the work folder (worker logs, configs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    interrupt_on_sigterm()
    wall0 = time.monotonic()
    load0 = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="writeguard-bench-"))
    children: list[subprocess.Popen[bytes]] = []
    broker: LocalKafka | None = None
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    try:
        log(f"generating {args.events:,} events from {args.agents:,} agents ...")
        records = make_events(args.events, args.agents, args.seed, prefix)
        cfg0 = load_config(EXAMPLE_CONFIG)
        rep = bench_replay(cfg0, records, workdir)
        if args.replay_only:
            lines.append(f"writeguard replay benchmark ({args.events:,} events, {args.agents:,} agents, "
                         f"{os.cpu_count() or 0} cores)")
            lines.append(f"replay (no Kafka)                        : {fmt_rate(rep.events_per_s)} "
                         f"({rep.events_per_cpu_s:,.0f} events per CPU second)")
            lines.append(f"memory per agent model set               : {rep.bytes_tracemalloc:,.0f} bytes "
                         f"(tracemalloc); {rep.bytes_walk:,.0f} bytes (getsizeof walk)")
            lines.append(f"  alerts (normal traffic, should be ~0): replay {rep.alerts}; changes scored "
                         f"{rep.changes:,}")
            lines += machine_lines(load0, wall0)
            print("\n".join(lines), flush=True)
            return 0

        if args.bootstrap_servers:
            bootstrap = args.bootstrap_servers
            where = f"Kafka at {bootstrap}"
        else:
            from testbed.broker import LocalKafka, kafka_version

            log("starting a local Kafka broker ...")
            broker = LocalKafka(workdir / "kafka", progress=log).start()
            bootstrap = broker.bootstrap_servers
            where = f"Kafka {kafka_version()} local"
        broker_pid = broker.pid if broker is not None else None
        topics = sorted({r.topic for r in records})
        create_topics(bootstrap, dict.fromkeys(topics, 3))
        log(f"producing {len(records):,} events to {', '.join(topics)} ...")
        secs = produce_all(bootstrap, records)
        log(f"produced in {secs:.1f} s ({len(records) / secs:,.0f} events/s)")
        expected = rep.changes

        faust = bench_worker(bootstrap, prefix, expected, workdir, children, repartition=True,
                             broker_pid=broker_pid, profile_s=args.profile, stall_s=30.0,
                             fetch_max_wait_ms=args.worker_fetch_max_wait_ms)
        direct = (bench_worker(bootstrap, prefix, expected, workdir, children, repartition=False,
                               broker_pid=broker_pid, profile_s=0.0, stall_s=30.0,
                               fetch_max_wait_ms=args.worker_fetch_max_wait_ms) if args.direct else None)
        cfg1 = write_config(workdir / "bare.yaml", bootstrap, prefix, f"{prefix}-bare")
        log("bare loop: confluent-kafka Consumer -> Router.route -> Engine.process ...")
        bare = bench_bare(bootstrap, cfg1, expected, stall_s=30.0)

        lag: LagResult | None = None
        if not args.skip_lag:
            rate = args.lag_rate or (faust.events_per_s or 1000.0) / 2
            lag = bench_lag(bootstrap, args, rate, workdir, children)

        # -- the table --
        cores = os.cpu_count() or 0
        lines.append(f"writeguard pipeline benchmark ({args.events:,} events, {args.agents:,} agents, {where}, "
                     f"{cores} cores)")
        if args.worker_fetch_max_wait_ms is not None:
            lines.append(f"(workers ran with worker.fetch_max_wait_ms={args.worker_fetch_max_wait_ms})")
        lines.append(f"worker (Faust, repartition by agent)     : {fmt_rate(faust.events_per_s)}"
                     + ("  [py-spy attached]" if faust.profile else ""))
        if direct is not None:
            lines.append(f"worker (Faust, repartition: false)       : {fmt_rate(direct.events_per_s)}")
        ratio = (f"  (Faust overhead: Y/X = {bare.events_per_s / faust.events_per_s:.1f} x)"
                 if bare.events_per_s and faust.events_per_s else "")
        lines.append(f"bare confluent-kafka loop, same detectors: {fmt_rate(bare.events_per_s)}{ratio}")
        lines.append(f"replay (no Kafka)                        : {fmt_rate(rep.events_per_s)}")
        if lag is not None:
            lags = sorted(lag.alert_lags_ms)
            n = len(lags)
            head = f"detection lag at 50% load ({lag.achieved_rate:,.0f} events/s)"
            if n == 0:
                lines.append(f"{head}: no alerts")
            else:
                p99 = f"p99 {percentile(lags, 0.99):,.0f} ms" if n >= 100 else \
                    f"p99 n/a (only {n} alerts, < 100; max {lags[-1]:,.0f} ms)"
                lines.append(f"{head}: p50 {percentile(lags, 0.5):,.0f} ms, {p99} ({n} alerts)")
            share = sorted(lag.worker_share_ms)
            if share:
                p99s = f"p99 {percentile(share, 0.99):,.0f} ms" if len(share) >= 100 else f"max {share[-1]:,.0f} ms"
                lines.append(f"  of which the worker's (CDC record at the broker -> alert published): "
                             f"p50 {percentile(share, 0.5):,.0f} ms, {p99s} ({len(share)} alerts)")
            lines.append(f"processing lag histogram p50/p99         : {1000 * lag.hist_p50_s:,.0f} ms / "
                         f"{1000 * lag.hist_p99_s:,.0f} ms ({lag.hist_samples:,} samples, 1 event in 16, "
                         "bucket-interpolated)")
        lines.append(f"memory per agent model set               : {rep.bytes_tracemalloc:,.0f} bytes (tracemalloc); "
                     f"{rep.bytes_walk:,.0f} bytes (getsizeof walk: "
                     + ", ".join(f"{t} {v:,.0f}" for t, v in sorted(rep.walk_by_table.items())) + ")")
        rss = faust.rss_after_kib
        growth = (f"; growth / agent model {(rss - faust.rss_start_kib) * 1024 / max(rep.models, 1):,.0f} bytes,"
                  " an upper bound: it includes client buffers"
                  if rss is not None and faust.rss_start_kib is not None else "")
        lines.append(f"worker RSS after {faust.counted:,} events{' ' * max(0, 17 - len(f'{faust.counted:,}'))}: "
                     f"{(rss or 0) / 1024:,.0f} MiB (at start {(faust.rss_start_kib or 0) / 1024:,.0f} MiB{growth})")
        lines.append("")
        lines.append("details:")
        lines.append(f"  alerts (normal traffic, should be ~0): replay {rep.alerts}, Faust worker {faust.alerts}, "
                     + (f"direct worker {direct.alerts}, " if direct else "") + f"bare loop {bare.alerts}")
        lines.append(f"  changes scored: replay {rep.changes:,}, Faust {faust.counted:,}, "
                     + (f"direct {direct.counted:,}, " if direct else "") + f"bare {bare.changes:,}")

        def cpu(r: WorkerResult) -> str:
            wc = "n/a" if r.worker_cpu is None else f"{100 * r.worker_cpu:.0f}%"
            bc = "n/a" if r.broker_cpu is None else f"{100 * r.broker_cpu:.0f}%"
            up = f"; {r.startup_s:.1f} s from worker start to its first event" if r.startup_s is not None else ""
            return f"worker {wc}, broker {bc} of one core over {r.seconds:.1f} s{up}"

        lines.append(f"  CPU, Faust worker run: {cpu(faust)}")
        if direct is not None:
            lines.append(f"  CPU, direct worker run: {cpu(direct)}")
        if lag is not None:
            e2e = sorted(lag.e2e_lags_ms)
            behind = sorted(lag.late_ms) or [0.0]
            lines.append(f"  lag run: the load generator produced its writes p50 {percentile(behind, 0.5):,.1f} ms, "
                         f"p99 {percentile(behind, 0.99):,.1f} ms, max {behind[-1]:,.1f} ms after their commit time")
            lines.append(f"  lag run: target {lag.target_rate:,.0f} events/s, achieved {lag.achieved_rate:,.0f}, "
                         f"{lag.produced:,} events, {lag.rogues} rogue agents, {lag.rogue_alerts} rogue alerts, "
                         f"{lag.other_alerts} other alerts ({lag.warmup_alerts} more on the warm-up history), "
                         f"worker CPU {100 * (lag.worker_cpu or 0):.0f}% of one core")
            if lag.gc:
                lines.append("  lag run: the worker's garbage collections " + ", ".join(
                    f"generation {g} {n:,} ({ms:,.0f} ms)" for g, (n, ms) in enumerate(lag.gc)))
            pts = sorted(lag.points)
            if len(pts) >= 6:
                third = len(pts) // 3
                early = sorted(v for _, v in pts[:third])
                late = sorted(v for _, v in pts[-third:])
                lines.append(f"  alert lag over the run: p50 {percentile(early, 0.5):,.0f} ms in the first third, "
                             f"{percentile(late, 0.5):,.0f} ms in the last third")
                windows: dict[int, list[float]] = {}
                for at, v in pts:
                    windows.setdefault(int(at // 5), []).append(v)
                lines.append("  the run's first alerts (s into the run: lag): " + ", ".join(
                    f"{at:.2f} s: {v:,.0f} ms" for at, v in pts[:8]))
                lines.append("  alert lag by 5 s of the run (max): " + ", ".join(
                    f"{5 * k}-{5 * k + 5} s {max(v):,.0f} ms" for k, v in sorted(windows.items())))
            if e2e:
                lines.append(f"  commit -> alert read by a consumer: p50 {percentile(e2e, 0.5):,.0f} ms, "
                             f"max {e2e[-1]:,.0f} ms (includes the alert's produce and fetch)")
        lines += machine_lines(load0, wall0)
        if faust.profile is not None and faust.profile.exists():
            lines.append("")
            lines += summarize_profile(faust.profile)
        print("\n".join(lines), flush=True)
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for proc in children:
            stop_process(proc)
        if broker is not None:
            log("stopping Kafka ...")
            broker.stop()
        remove_work_folder(workdir, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
