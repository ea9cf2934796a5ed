"""Latency of writeguard over the real path: PostgreSQL -> Debezium -> Kafka -> worker -> REVOKE -> write refused.

Usage: ``python3 benchmarks/bench_postgres.py [--agents 40] [--rate 100] [--rogues 30] [--rogue-every 2.5]``
(``--help`` for all options). Everything runs on this machine through :func:`testbed.stack.start_stack`: a
local Kafka (KRaft), PostgreSQL 15 with the ``shop`` database, Kafka Connect with the Debezium PostgreSQL
connector, and one ``writeguard worker`` whose config quarantines with REVOKE. Needs Java 17, Maven (jars
from Maven Central, cached) and the PostgreSQL server binaries. Nothing is simulated past the SQL.

What runs, with the defaults:

1. warm-up: every agent (the 40 normal ones and the 30 future rogues, each its own login role) commits 36
   ordinary single-row INSERTs (the example config's zscore warmup is 30), at up to 400 commits/s in
   total; then the worker must have scored all of them.
2. steady load: the 40 normal agents (half refunds, half orders) each on its own connection, spread over
   4 writer threads, commit single-row autocommit INSERTs at 100 commits/s in total (2.5/s per agent,
   evenly spaced with random phases) until the end of the run.
3. rogues: 3 s into the steady load, and then every 2.5 s, one rogue agent starts INSERTing refunds at 20x
   its usual amount, one commit every 20 ms, until PostgreSQL refuses it with InsufficientPrivilege (the
   quarantine also ends its sessions: like an agent framework, it reconnects and tries again). Meanwhile a
   probe asks PostgreSQL (as the superuser) every 2 ms whether the rogue's INSERT privilege is gone yet.

Per rogue: the client clock (``time.time_ns()``) right after each INSERT returns (autocommit, so after its
COMMIT is acknowledged) - "client commit" below; the Debezium change event of each of its rows (read from
the CDC topic by a side consumer: ``source.ts_us`` = the PostgreSQL commit time, the envelope ``ts_us`` =
when Debezium built the event, the Kafka record timestamp = when Kafka Connect's producer sent it); its
alert from the alert topic (``commit_ts`` = Debezium's ``source.ts_us`` of the triggering row,
``detected_at``, ``lag_ms``); the control record whose ``enforcement`` holds the REVOKE result (its ``at``
is stamped after the REVOKE committed and the role's sessions were terminated); the probe's clock when
the REVOKE became visible; and the client clock when its write was first refused.

Reported: commit -> alert (the alert's ``lag_ms``), commit -> enforced (refused - client commit of the
triggering row, and of the rogue's first row), rogue rows that landed, the worker's Prometheus histograms
(``writeguard_detection_lag_seconds``, ``writeguard_processing_lag_seconds``, over the steady phase), and
where the time goes, segment by segment. Tunables: ``--poll-interval-ms`` (Debezium ``poll.interval.ms``,
50 as the connector config renders it), ``--fetch-max-wait-ms`` (``worker.fetch_max_wait_ms``, 20),
``--commit-interval-s`` (``worker.commit_interval_s``, 1.0), ``--debezium-extra KEY=VALUE``.

Progress goes to stderr, the table of figures to stdout. Numbers only, no assertions: timings belong to the
machine (and the neighbours) they ran on. The defaults take about 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from psycopg import errors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from benchmarks.common import (  # noqa: E402
    hist_buckets,
    histogram_quantile,
    iso_us,
    log,
    machine_lines,
    percentile,
    remove_work_folder,
)
from detectors.engine import KafkaCoords  # noqa: E402
from stream.ingest import decode_changes  # noqa: E402
from testbed.fleet import ORDERS, REFUNDS  # noqa: E402
from testbed.stack import Stack, start_stack  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
INSERT_SQL = {
    REFUNDS: "INSERT INTO public.refunds (order_id, amount, agent_id, run_id) VALUES (%s, %s, %s, %s) RETURNING id",
    ORDERS: "INSERT INTO public.orders (total, items, agent_id, run_id) VALUES (%s, %s, %s, %s) RETURNING id",
}
RECONNECT = (errors.AdminShutdown, psycopg.OperationalError)  # the quarantine terminates the role's sessions


def now_us() -> int:
    return time.time_ns() // 1000


def bucket_of(buckets: dict[float, float], q: float) -> tuple[float, float]:
    """The (lower, upper] bounds of the bucket that holds the q-quantile: all a histogram really knows."""
    rank = q * buckets.get(math.inf, 0.0)
    prev = 0.0
    for b in sorted(buckets):
        if buckets[b] >= rank:
            return prev, b
        prev = b
    return prev, math.inf


def hist_delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {b: v - before.get(b, 0.0) for b, v in after.items()}


def group_cpu_s(pgid: int | None) -> float | None:
    """CPU seconds of every live process in a process group, with their reaped children's."""
    if pgid is None:
        return None
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(f[2]) == pgid:  # field 5 (pgrp); f[0] is field 3 (state)
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


# -- agents ---------------------------------------------------------------------------------------------


def role_name(kind: str, i: int) -> str:
    """agent_<kind>_NN, then agent_<kind>b_NN, ...: the stack's role pattern allows letters and two digits."""
    letters = "" if i < 100 else chr(ord("a") + i // 100)
    return f"agent_{kind}{letters}_{i % 100:02d}"


@dataclass
class Agent:
    role: str
    table: str
    mean: float  # its usual amount (refunds) or order total (orders)
    rng: random.Random
    conn: Any = None
    quarantined: bool = False

    def params(self, factor: float = 1.0) -> tuple[Any, ...]:
        value = round(self.mean * factor * math.exp(self.rng.gauss(0, 0.3)), 2)
        if self.table == REFUNDS:
            return (self.rng.randint(1, 10_000), value, self.role, "bench")
        return (value, self.rng.randint(1, 3), self.role, "bench")


@dataclass
class Shared:
    """What the writer threads report, and the main thread's signals to them."""

    stop: threading.Event = field(default_factory=threading.Event)
    steady: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    warm_done: int = 0
    warm_writes: int = 0
    steady_acks: dict[tuple[str, int], int] = field(default_factory=dict)  # (table, id) -> client commit µs
    steady_writes: int = 0
    reconnects: int = 0
    refused: list[str] = field(default_factory=list)  # normal agents quarantined (false positives)
    errors: list[str] = field(default_factory=list)


def write_one(stack: Stack, a: Agent, shared: Shared, *, record: bool) -> bool:
    """One single-row autocommit INSERT as ``a``; False once the agent is refused."""
    for _ in range(3):
        try:
            if a.conn is None:
                a.conn = stack.agent(a.role)
            row = a.conn.execute(INSERT_SQL[a.table], a.params()).fetchone()
        except errors.InsufficientPrivilege:
            a.quarantined = True
            with shared.lock:
                shared.refused.append(a.role)
            return False
        except RECONNECT:
            with contextlib.suppress(Exception):
                a.conn.close()
            a.conn = None
            with shared.lock:
                shared.reconnects += 1
            time.sleep(0.005)
            continue
        ack = now_us()
        if record:
            with shared.lock:
                shared.steady_acks[(a.table, int(row[0]))] = ack
                shared.steady_writes += 1
        return True
    return True


def writer(
    stack: Stack, normal: list[Agent], rogues: list[Agent], args: argparse.Namespace, shared: Shared, seed: int
) -> None:
    """Warm-up (normal agents and future rogues, ``--warmup-writes`` each), then the steady load until stop."""
    rng = random.Random(seed)
    try:
        gap = args.threads / args.warmup_rate
        nxt = time.monotonic()
        for is_rogue, group in ((False, normal), (True, rogues)):
            for a in group:
                for _ in range(args.warmup_writes):
                    if shared.stop.is_set():
                        return
                    delay = nxt - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    nxt = max(nxt + gap, time.monotonic() - 1.0)
                    write_one(stack, a, shared, record=False)
                    with shared.lock:
                        shared.warm_writes += 1
                if is_rogue and a.conn is not None:  # reopened when it turns rogue: keeps connections few
                    a.conn.close()
                    a.conn = None
        with shared.lock:
            shared.warm_done += 1
        while not shared.steady.wait(0.1):
            if shared.stop.is_set():
                return
        period = args.agents / args.rate  # seconds between two commits of one agent
        t0 = time.monotonic()
        due = [(t0 + rng.uniform(0, period), i) for i in range(len(normal))]
        heapq.heapify(due)
        while due and not shared.stop.is_set():
            t, i = heapq.heappop(due)
            delay = t - time.monotonic()
            if delay > 0 and shared.stop.wait(delay):
                return
            a = normal[i]
            if not write_one(stack, a, shared, record=True):
                continue  # refused: it stays out
            t += period
            if t < time.monotonic() - period:  # fell behind by more than a period: do not burst to catch up
                t = time.monotonic()
            heapq.heappush(due, (t, i))
    except Exception as e:  # a writer's failure must be visible in the report, not kill the run silently
        with shared.lock:
            shared.errors.append(f"writer {seed}: {e!r}")
    finally:
        for a in normal + rogues:
            if a.conn is not None:
                with contextlib.suppress(Exception):
                    a.conn.close()
                a.conn = None


# -- rogues ---------------------------------------------------------------------------------------------


@dataclass
class RogueRow:
    id: int
    send_us: int
    ack_us: int  # client clock right after the autocommit INSERT returned


@dataclass
class Rogue:
    agent: Agent
    start_us: int = 0
    rows: list[RogueRow] = field(default_factory=list)
    refused_us: int | None = None  # client clock: InsufficientPrivilege raised
    terminated_us: int | None = None  # client clock: its session was first found terminated
    revoked_us: int | None = None  # client clock: the probe's first query that saw INSERT revoked was sent
    reconnects: int = 0
    timed_out: bool = False
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def run_rogue(stack: Stack, r: Rogue, args: argparse.Namespace, stop: threading.Event) -> None:
    a = r.agent
    period = args.rogue_interval_ms / 1000.0
    conn: Any = None
    try:
        conn = stack.agent(a.role)
        r.start_us = now_us()
        deadline = time.monotonic() + args.rogue_timeout
        nxt = time.monotonic()
        while not stop.is_set():
            if time.monotonic() > deadline:
                r.timed_out = True
                return
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            nxt = time.monotonic() + period
            send = now_us()
            try:
                if conn is None:
                    conn = stack.agent(a.role)
                row = conn.execute(INSERT_SQL[REFUNDS], a.params(args.rogue_factor)).fetchone()
            except errors.InsufficientPrivilege:
                r.refused_us = now_us()
                return
            except RECONNECT:
                if r.terminated_us is None:
                    r.terminated_us = now_us()
                r.reconnects += 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                nxt = time.monotonic() + 0.002  # try again at once, as an agent framework would
                continue
            r.rows.append(RogueRow(int(row[0]), send, now_us()))
    except Exception as e:
        r.error = repr(e)
    finally:
        r.done.set()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


PROBE_SQL = "SELECT has_table_privilege(%s, 'public.refunds', 'INSERT')"


def probe_revoke(r: Rogue, conn: Any, interval_s: float, stop: threading.Event) -> None:
    """When the REVOKE became visible: poll the rogue's INSERT privilege as the superuser, every ``interval_s``.

    Each query sees what had committed when it started, so the REVOKE committed between the previous query
    and the first one that sees it gone; the latter's send time is recorded (resolution: the interval).
    """
    role = r.agent.role
    try:
        while not stop.is_set():
            sent = now_us()
            if not conn.execute(PROBE_SQL, (role,)).fetchone()[0]:
                r.revoked_us = sent
                return
            if r.done.is_set() and r.refused_us is None:
                return  # gave up or failed: no REVOKE to wait for
            time.sleep(interval_s)
    except Exception as e:
        r.error = r.error or f"probe: {e!r}"
    finally:
        with contextlib.suppress(Exception):
            conn.close()


# -- the side consumer ------------------------------------------------------------------------------------


@dataclass
class CdcRecord:
    table: str
    row_id: int
    agent_id: str | None
    source_us: int  # source.ts_us: the PostgreSQL commit time
    debezium_us: int  # envelope ts_us: when Debezium built the change event
    kafka_ms: int  # Kafka record timestamp (CreateTime: Kafka Connect's producer)
    coords: KafkaCoords


@dataclass
class Seen:
    record: dict[str, Any]
    kafka_ms: int


class SideConsumer(threading.Thread):
    """Reads the CDC topics, the alert topic and the control topic from the beginning, in this process."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(name="side-consumer", daemon=True)
        cfg = stack.config
        self.tables = {t.topic: t.name for t in cfg.tables}
        self.alerts_topic = cfg.topics.alerts
        self.control_topic = cfg.topics.control
        # The worker's re-keyed copy of each change (repartition on): its Kafka timestamp splits the worker's time.
        self.changes_topic = cfg.topics.changes if cfg.worker.repartition else None
        self.consumer = Consumer(
            {
                "bootstrap.servers": stack.kafka.bootstrap_servers,
                "group.id": f"bench-side-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 50,
            }
        )
        topics = [*self.tables, self.alerts_topic, self.control_topic]
        if self.changes_topic is not None:
            topics.append(self.changes_topic)
        md = self.consumer.list_topics(timeout=30)
        tps = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in md.topics[t].partitions]
        self.consumer.assign(tps)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.cdc: dict[tuple[str, int], CdcRecord] = {}
        self.coords: dict[KafkaCoords, tuple[str, int]] = {}
        self.alerts: list[Seen] = []
        self.control: list[Seen] = []
        self.rekeyed_ms: dict[KafkaCoords, int] = {}  # CDC coords -> Kafka timestamp of the worker's changes record
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                for m in self.consumer.consume(num_messages=500, timeout=0.2):
                    if m.error() is not None:
                        continue
                    self.handle(m)
        except Exception as e:
            self.error = repr(e)
        finally:
            self.consumer.close()

    def handle(self, m: Any) -> None:
        value = m.value()
        if value is None:
            return
        topic = m.topic()
        kafka_ms = int(m.timestamp()[1])
        body = json.loads(value)
        if topic in self.tables:
            after = body.get("after") or {}
            src = body.get("source") or {}
            if "id" not in after or src.get("ts_us") is None:
                return
            rec = CdcRecord(
                self.tables[topic],
                int(after["id"]),
                after.get("agent_id"),
                int(src["ts_us"]),
                int(body.get("ts_us") or body["ts_ms"] * 1000),
                kafka_ms,
                KafkaCoords(topic, int(m.partition()), int(m.offset())),
            )
            with self.lock:
                self.cdc[(rec.table, rec.row_id)] = rec
                self.coords[rec.coords] = (rec.table, rec.row_id)
        elif topic == self.alerts_topic:
            with self.lock:
                self.alerts.append(Seen(body, kafka_ms))
        elif topic == self.control_topic:
            with self.lock:
                self.control.append(Seen(body, kafka_ms))
        elif topic == self.changes_topic:
            try:
                batch = decode_changes(value)
            except msgspec.ValidationError:
                return
            with self.lock:
                for ch in batch:
                    if isinstance(ch.coords, KafkaCoords):
                        self.rekeyed_ms[ch.coords] = kafka_ms

    def alert_for(self, role: str) -> Seen | None:
        with self.lock:
            mine = [a for a in self.alerts if a.record.get("agent_id") == role]
        quarantining = [a for a in mine if a.record.get("quarantined")]
        best = quarantining or mine
        return best[0] if best else None

    def enforcement_for(self, role: str) -> Seen | None:
        with self.lock:
            for c in self.control:
                if c.record.get("agent_id") == role and c.record.get("enforcement"):
                    return c
        return None


# -- results ----------------------------------------------------------------------------------------------


@dataclass
class RogueResult:
    role: str
    landed: int
    landed_after_trigger: int | None
    alert_lag_ms: float | None  # the alert's lag_ms: detected_at - source.ts_us of the triggering row
    alert_from_first_ms: float | None  # detected_at - client commit of the first rogue row
    enforced_trigger_ms: float | None  # refused - client commit of the triggering row
    enforced_first_ms: float | None  # refused - client commit of the first rogue row
    trigger_index: int | None  # 1-based: which of its rogue rows triggered the alert
    segments: dict[str, float]  # ms, for the triggering row
    enforcement: str


SEGMENTS = [
    ("commit_ack", "client commit ack - PostgreSQL commit (source.ts_us)"),
    ("pg_to_debezium", "PostgreSQL commit -> Debezium event built (envelope ts_us)"),
    ("debezium_to_kafka", "Debezium event -> Kafka record timestamp (Connect's producer)"),
    ("kafka_to_alert", "Kafka record timestamp -> alert detected_at (worker)"),
    ("alert_to_revoke", "alert detected_at -> REVOKE visible (has_table_privilege probe)"),
    ("revoke_to_refused", "REVOKE visible -> agent refused (client clock)"),
]


def analyse_rogue(r: Rogue, side: SideConsumer) -> RogueResult:
    role = r.agent.role
    first = r.rows[0] if r.rows else None
    seen = side.alert_for(role)
    ctrl = side.enforcement_for(role)
    seg: dict[str, float] = {}
    alert_lag = from_first = enf_trigger = enf_first = None
    trig_idx = after_trigger = None
    if first is not None and r.refused_us is not None:
        enf_first = (r.refused_us - first.ack_us) / 1000
    if seen is not None:
        alert = seen.record
        detected = iso_us(str(alert["detected_at"]))
        commit = iso_us(str(alert["commit_ts"]))
        alert_lag = float(alert["lag_ms"])
        if first is not None:
            from_first = (detected - first.ack_us) / 1000
        # The triggering row: the alert's event at its commit_ts, found by its Kafka coordinates.
        trig: CdcRecord | None = None
        for te in alert.get("triggering_events") or []:
            if te.get("topic") is None or iso_us(str(te["commit_ts"])) != commit:
                continue
            key = side.coords.get(KafkaCoords(str(te["topic"]), int(te["partition"]), int(te["offset"])))
            if key is not None:
                trig = side.cdc.get(key)
        if trig is None:  # fall back on the commit time
            trig = next(
                (c for (t, _), c in side.cdc.items() if t == REFUNDS and c.agent_id == role and c.source_us == commit),
                None,
            )
        by_id = {row.id: (i, row) for i, row in enumerate(r.rows)}
        if trig is not None and trig.row_id in by_id:
            i, row = by_id[trig.row_id]
            trig_idx = i + 1
            after_trigger = len(r.rows) - trig_idx
            seg["commit_ack"] = (row.ack_us - trig.source_us) / 1000
            seg["pg_to_debezium"] = (trig.debezium_us - trig.source_us) / 1000
            seg["debezium_to_kafka"] = (trig.kafka_ms * 1000 - trig.debezium_us) / 1000
            seg["kafka_to_alert"] = (detected - trig.kafka_ms * 1000) / 1000
            rekeyed = side.rekeyed_ms.get(trig.coords)
            if rekeyed is not None:
                seg["kafka_to_rekeyed"] = float(rekeyed - trig.kafka_ms)
                seg["rekeyed_to_alert"] = (detected - rekeyed * 1000) / 1000
            if r.refused_us is not None:
                enf_trigger = (r.refused_us - row.ack_us) / 1000
        if r.revoked_us is not None:
            seg["alert_to_revoke"] = (r.revoked_us - detected) / 1000
            if r.refused_us is not None:
                seg["revoke_to_refused"] = (r.refused_us - r.revoked_us) / 1000
        if ctrl is not None:
            seg["alert_to_control"] = (iso_us(str(ctrl.record["at"])) - detected) / 1000
        if r.terminated_us is not None:
            seg["alert_to_terminated"] = (r.terminated_us - detected) / 1000
    if ctrl is None:
        enforcement = "no enforcement record"
    else:
        res = ctrl.record["enforcement"][0]
        enforcement = ("ok" if res.get("ok") else "FAILED") + f": {res.get('detail', '')}"
    return RogueResult(
        role, len(r.rows), after_trigger, alert_lag, from_first, enf_trigger, enf_first, trig_idx, seg, enforcement
    )


def fmt_dist(values: list[float], unit: str = "ms", digits: int = 0) -> str:
    if not values:
        return "n/a (no samples)"
    n = len(values)
    p99 = f"{percentile(values, 0.99):,.{digits}f}"
    mark = "~" if n < 100 else ""
    return (
        f"p50 {percentile(values, 0.5):,.{digits}f} {unit}, p99{mark} {p99} {unit}, "
        f"max {max(values):,.{digits}f} {unit} (n={n})"
    )


# -- main -------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Latency of writeguard on the real path (PostgreSQL -> Debezium -> Kafka -> worker -> REVOKE) "
        "under a steady background load: commit -> alert and commit -> enforced p50/p99, rogue rows that "
        "landed, and where the time goes. Progress on stderr, the table of figures on stdout."
    )
    p.add_argument(
        "--agents",
        type=int,
        default=40,
        help="normal agents, half refunds and half orders, each its own role and connection (40)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="total commits/s of the normal agents, single-row autocommit INSERTs (100)",
    )
    p.add_argument("--threads", type=int, default=4, help="writer threads sharing the normal agents (4)")
    p.add_argument("--rogues", type=int, default=30, help="rogue agents, one after the other (30; at most 100)")
    p.add_argument(
        "--rogue-every", type=float, default=2.5, metavar="SECONDS", help="seconds between two rogues starting (2.5)"
    )
    p.add_argument(
        "--rogue-interval-ms",
        type=float,
        default=20.0,
        help="a rogue commits one row every this many ms until refused (20)",
    )
    p.add_argument("--rogue-factor", type=float, default=20.0, help="a rogue's amounts, times its usual ones (20)")
    p.add_argument(
        "--rogue-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="give up on a rogue that is not refused within this (20)",
    )
    p.add_argument(
        "--warmup-writes",
        type=int,
        default=36,
        help="ordinary writes per agent (rogues included) before the run; example zscore warmup: 30 (36)",
    )
    p.add_argument("--warmup-rate", type=float, default=400.0, help="total commits/s during the warm-up (400)")
    p.add_argument(
        "--probe-interval-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="while a rogue runs, ask PostgreSQL every MS whether its INSERT is revoked yet (2)",
    )
    p.add_argument(
        "--settle", type=float, default=3.0, metavar="SECONDS", help="steady load before the first rogue (3)"
    )
    p.add_argument(
        "--poll-interval-ms",
        type=int,
        metavar="MS",
        help="Debezium poll.interval.ms (default: the connector config's 50)",
    )
    p.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        metavar="MS",
        help="worker.fetch_max_wait_ms (default: the example config's 20)",
    )
    p.add_argument(
        "--commit-interval-s",
        type=float,
        metavar="S",
        help="worker.commit_interval_s (default: the example config's 1.0)",
    )
    p.add_argument(
        "--debezium-extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another Debezium connector property, e.g. max.batch.size=64 (repeatable)",
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--keep", action="store_true", help="keep the work folder (worker log, Connect log, config)")
    return p


class Interrupted(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.rogues <= 100:
        raise SystemExit("--rogues must be 1..100 (role names agent_rogue_00..99)")
    if args.agents < 1 or args.rate <= 0 or args.threads < 1:
        raise SystemExit("--agents, --rate and --threads must be positive")
    extra: dict[str, str] = {}
    for kv in args.debezium_extra:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--debezium-extra wants KEY=VALUE, not {kv!r}")
        extra[k] = v
    if args.poll_interval_ms is not None:
        extra["poll.interval.ms"] = str(args.poll_interval_ms)

    # SIGTERM (and Ctrl-C) raise in the main thread, except while the stack starts: start_stack cleans up what
    # it started when it fails, but a worker being spawned could be left behind, so wait for it to return.
    starting = [True]
    pending: list[int] = []

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        if starting[0]:
            if not pending:
                log("signal received: stopping once the stack is up ...")
            pending.append(signum)
            return
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    wall0 = time.monotonic()
    load0 = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="writeguard-bench-pg-"))
    rng = random.Random(args.seed)
    n_ref = (args.agents + 1) // 2
    normal = [
        Agent(role_name("refund", i), REFUNDS, rng.uniform(20, 90), random.Random(rng.random())) for i in range(n_ref)
    ]
    normal += [
        Agent(role_name("order", i), ORDERS, rng.uniform(20, 90), random.Random(rng.random()))
        for i in range(args.agents - n_ref)
    ]
    rogue_agents = [
        Agent(role_name("rogue", i), REFUNDS, rng.uniform(20, 90), random.Random(rng.random()))
        for i in range(args.rogues)
    ]

    def edit(data: dict[str, Any]) -> None:
        if extra:
            data["debezium"]["extra"] = dict(extra)
        w = data.setdefault("worker", {})
        if args.fetch_max_wait_ms is not None:
            w["fetch_max_wait_ms"] = args.fetch_max_wait_ms
        if args.commit_interval_s is not None:
            w["commit_interval_s"] = args.commit_interval_s

    stack: Stack | None = None
    shared = Shared()
    threads: list[threading.Thread] = []
    rogue_threads: list[threading.Thread] = []
    side: SideConsumer | None = None
    try:
        log(f"starting the stack in {workdir} ...")
        try:
            stack = start_stack(
                workdir, [a.role for a in normal + rogue_agents], progress=log, edit_config=edit, loglevel="warning"
            )
        finally:
            starting[0] = False
        if pending:
            raise Interrupted(signal.Signals(pending[0]).name)
        st = stack
        with st.pg.connect(dbname="shop") as c:
            max_conn = int(c.execute("SHOW max_connections").fetchone()[0])
        if args.agents + args.threads + 12 > max_conn:
            raise SystemExit(f"--agents {args.agents} needs more than PostgreSQL's max_connections={max_conn}")
        wcfg = st.config.worker
        settings = (
            f"Debezium poll.interval.ms={extra.get('poll.interval.ms', '50')}"
            + "".join(f", {k}={v}" for k, v in extra.items() if k != "poll.interval.ms")
            + f"; worker.fetch_max_wait_ms={wcfg.fetch_max_wait_ms}, "
            f"worker.commit_interval_s={wcfg.commit_interval_s:g}, worker.repartition={wcfg.repartition}"
        )
        log(f"settings: {settings}")
        side = SideConsumer(st)
        side.start()

        # -- warm-up --
        n_warm = (len(normal) + len(rogue_agents)) * args.warmup_writes
        log(
            f"warm-up: {len(normal)} normal agents + {len(rogue_agents)} future rogues x {args.warmup_writes} "
            f"writes = {n_warm:,} commits at up to {args.warmup_rate:g}/s ..."
        )
        for k in range(args.threads):
            t = threading.Thread(
                target=writer,
                name=f"writer-{k}",
                daemon=True,
                args=(
                    st,
                    normal[k :: args.threads],
                    rogue_agents[k :: args.threads],
                    args,
                    shared,
                    args.seed * 100 + k,
                ),
            )
            threads.append(t)
            t.start()
        while shared.warm_done < args.threads:
            if shared.errors:
                raise RuntimeError(f"writer failed: {shared.errors[0]}")
            if not any(t.is_alive() for t in threads):
                raise RuntimeError("the writer threads ended during the warm-up")
            time.sleep(0.1)
        log(f"warm-up written ({shared.warm_writes:,} commits); waiting for the worker to score them ...")
        st.wait_events(n_warm, timeout=180)
        warm_alerts = len(side.alerts)
        hist0 = st.worker.metrics()
        pids = {"worker": st.worker.proc.pid, "Kafka": st.kafka.pid, "Connect": st.connect.pid, "PostgreSQL": st.pg.pid}
        cpu0 = {k: group_cpu_s(v) for k, v in pids.items()}
        cpu0["this benchmark"] = time.process_time()

        # -- steady load, then rogues --
        steady0 = time.monotonic()
        shared.steady.set()
        log(
            f"steady load: {len(normal)} agents at {args.rate:g} commits/s in total; first rogue in "
            f"{args.settle:g} s, then one every {args.rogue_every:g} s ..."
        )
        rogues = [Rogue(a) for a in rogue_agents]
        next_report = time.monotonic() + 5
        for i, r in enumerate(rogues):
            start_at = steady0 + args.settle + i * args.rogue_every
            while True:
                now = time.monotonic()
                if st.worker.proc.poll() is not None:
                    raise RuntimeError(f"worker died:\n{st.worker.log_tail()}")
                if now >= next_report:
                    next_report = now + 5
                    refused = sum(x.refused_us is not None for x in rogues)
                    log(
                        f"{shared.steady_writes:,} background commits, {i} rogues started, {refused} refused, "
                        f"{len(side.alerts)} alerts"
                    )
                if now >= start_at:
                    break
                time.sleep(min(start_at - now, 0.05))
            probe_conn = st.pg.connect(dbname="shop", autocommit=True)
            t = threading.Thread(target=run_rogue, name=f"rogue-{i}", daemon=True, args=(st, r, args, shared.stop))
            p = threading.Thread(
                target=probe_revoke,
                name=f"probe-{i}",
                daemon=True,
                args=(r, probe_conn, args.probe_interval_ms / 1000, shared.stop),
            )
            rogue_threads += [t, p]
            t.start()
            p.start()
        for t in rogue_threads:
            t.join(args.rogue_timeout + 5)
        steady_s = time.monotonic() - steady0
        steady_writes = shared.steady_writes
        cpu1 = {k: group_cpu_s(v) for k, v in pids.items()}
        cpu1["this benchmark"] = time.process_time()
        shared.stop.set()
        for t in threads:
            t.join(10)
        log(
            f"rogues done; background stopped after {steady_s:.1f} s ({steady_writes:,} commits). "
            "waiting for the last alerts, control records and CDC records ..."
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with side.lock:
                have_rows = all((REFUNDS, row.id) in side.cdc for r in rogues for row in r.rows)
            if have_rows and all(side.enforcement_for(r.agent.role) for r in rogues if r.refused_us is not None):
                break
            time.sleep(0.2)
        hist1 = st.worker.metrics()
        side.stop_event.set()
        side.join(10)

        # -- figures --
        results = [analyse_rogue(r, side) for r in rogues]
        rogue_roles = {a.role for a in rogue_agents}
        other_alerts = [a for a in side.alerts if a.record.get("agent_id") not in rogue_roles]
        rogue_alerts = {a.record["agent_id"] for a in side.alerts if a.record.get("agent_id") in rogue_roles}
        lines: list[str] = []
        from testbed.broker import kafka_version
        from testbed.connect import connect_version, debezium_version
        from testbed.postgres import find_pg_bin

        lines.append(
            f"writeguard PostgreSQL path benchmark: PostgreSQL {find_pg_bin().parent.name} -> Debezium "
            f"{debezium_version()} (Kafka Connect {connect_version()}) -> Kafka {kafka_version()} -> "
            f"worker -> REVOKE; {os.cpu_count()} cores, all on this machine"
        )
        rate = steady_writes / steady_s if steady_s else 0.0
        lines.append(
            f"load: {len(normal)} normal agents ({n_ref} refunds, {len(normal) - n_ref} orders), own role "
            f"and connection each, single-row autocommit INSERTs at {args.rate:g} commits/s in total "
            f"(achieved {rate:.1f}/s over {steady_s:.0f} s), after a warm-up of {args.warmup_writes} "
            "writes per agent"
        )
        lines.append(
            f"rogues: {len(rogues)}, one every {args.rogue_every:g} s, each INSERTing refunds at "
            f"{args.rogue_factor:g}x its usual amount, one commit every {args.rogue_interval_ms:g} ms, "
            "until refused"
        )
        lines.append(f"settings: {settings}")
        lines.append("")
        al = [x.alert_lag_ms for x in results if x.alert_lag_ms is not None]
        af = [x.alert_from_first_ms for x in results if x.alert_from_first_ms is not None]
        et = [x.enforced_trigger_ms for x in results if x.enforced_trigger_ms is not None]
        ef = [x.enforced_first_ms for x in results if x.enforced_first_ms is not None]
        landed = [float(x.landed) for x in results]
        after = [float(x.landed_after_trigger) for x in results if x.landed_after_trigger is not None]
        w = 60
        lines.append(f"{'commit -> alert (alert lag_ms: detected_at - source.ts_us)':<{w}}: {fmt_dist(al)}")
        lines.append(f"{'commit -> enforced (refused - client commit, trigger row)':<{w}}: {fmt_dist(et)}")
        lines.append(f"{'commit -> enforced (refused - client commit, 1st rogue row)':<{w}}: {fmt_dist(ef)}")
        lines.append(f"{'first rogue row (client commit) -> alert detected_at':<{w}}: {fmt_dist(af)}")
        lines.append(
            f"{'rogue rows that landed, per rogue':<{w}}: {fmt_dist(landed, 'rows')}; total {int(sum(landed))}"
        )
        lines.append(f"{'  of which after the triggering row':<{w}}: {fmt_dist(after, 'rows')}")
        trig = [float(x.trigger_index) for x in results if x.trigger_index is not None]
        counts = ", ".join(f"#{v:.0f}: {trig.count(v)}" for v in sorted(set(trig)))
        lines.append(
            f"{'  triggering row, by commit order (rogues)':<{w}}: "
            + (
                f"{counts} (debounce k=2 of n=4 fires on the 2nd anomalous row scored; the CDC topics "
                "are keyed by primary key over 3 partitions, so one agent's rows can be scored out of "
                "commit order)"
                if trig
                else "n/a"
            )
        )
        refused_n = sum(r.refused_us is not None for r in rogues)
        lines.append(
            f"{'rogues refused / alerted / enforced ok':<{w}}: {refused_n} / {len(rogue_alerts)} / "
            f"{sum(x.enforcement.startswith('ok') for x in results)} of {len(rogues)}"
            + (
                f"; {sum(r.timed_out for r in rogues)} never refused within {args.rogue_timeout:g} s"
                if any(r.timed_out for r in rogues)
                else ""
            )
        )
        lines.append(
            f"(p99~: fewer than 100 samples, so p99 is approximate: with n={len(al)} it sits between the "
            "two largest values)"
        )
        lines.append("")
        lines.append(
            "where the time goes, triggering row of each rogue (p50 / p99~ / max, ms, and the p50's share "
            "of the sum of the p50s after the commit; all one clock):"
        )
        p50s = {k: percentile([x.segments[k] for x in results if k in x.segments], 0.5) for k, _ in SEGMENTS[1:]}
        p50_sum = sum(v for v in p50s.values() if not math.isnan(v))
        for key, label in SEGMENTS:
            vals = [x.segments[key] for x in results if key in x.segments]
            if vals:
                share = f"  {100 * p50s[key] / p50_sum:3.0f}%" if key in p50s and p50_sum > 0 else "      "
                lines.append(
                    f"  {label:<80}: {percentile(vals, 0.5):7.1f} / {percentile(vals, 0.99):7.1f} / "
                    f"{max(vals):7.1f}{share}  (n={len(vals)})"
                )
        sums = [
            sum(x.segments[k] for k, _ in SEGMENTS[1:]) for x in results if all(k in x.segments for k, _ in SEGMENTS)
        ]
        if sums:
            lines.append(
                f"  {'sum of the five segments after the commit = refused - source.ts_us':<80}: "
                f"{percentile(sums, 0.5):7.1f} / {percentile(sums, 0.99):7.1f} / {max(sums):7.1f}"
            )
        for key, label in [
            ("kafka_to_rekeyed", "(Kafka -> alert, 1: CDC record -> worker's re-keyed changes record)"),
            ("rekeyed_to_alert", "(Kafka -> alert, 2: changes record -> alert detected_at)"),
            ("alert_to_terminated", "(alert detected_at -> the rogue finds its session terminated)"),
            ("alert_to_control", "(alert detected_at -> control record 'at', stamped after the sessions ended)"),
        ]:
            vals = [x.segments[key] for x in results if key in x.segments]
            if vals:
                lines.append(
                    f"  {label:<80}: {percentile(vals, 0.5):7.1f} / {percentile(vals, 0.99):7.1f} / "
                    f"{max(vals):7.1f}  (n={len(vals)})"
                )

        # Background rows: the Debezium part of the path, with many more samples.
        with side.lock:
            cdc = dict(side.cdc)
            rekeyed_ms = dict(side.rekeyed_ms)
        bg: dict[str, list[float]] = {
            "commit_ack": [],
            "pg_to_debezium": [],
            "debezium_to_kafka": [],
            "total": [],
            "kafka_to_rekeyed": [],
        }
        missing = 0
        for row_key, ack in shared.steady_acks.items():
            rec = cdc.get(row_key)
            if rec is None:
                missing += 1
                continue
            bg["commit_ack"].append((ack - rec.source_us) / 1000)
            bg["pg_to_debezium"].append((rec.debezium_us - rec.source_us) / 1000)
            bg["debezium_to_kafka"].append((rec.kafka_ms * 1000 - rec.debezium_us) / 1000)
            bg["total"].append((rec.kafka_ms * 1000 - rec.source_us) / 1000)
            if rec.coords in rekeyed_ms:
                bg["kafka_to_rekeyed"].append(float(rekeyed_ms[rec.coords] - rec.kafka_ms))
        lines.append(
            f"background rows, steady phase (p50 / p99 / max, ms; n={len(bg['total']):,}"
            + (f", {missing} not read back" if missing else "")
            + "):"
        )
        for key, label in [
            *SEGMENTS[:3],
            ("total", "PostgreSQL commit -> Kafka record timestamp"),
            ("kafka_to_rekeyed", "Kafka record -> the worker's re-keyed record (its ingest hop)"),
        ]:
            vals = bg[key]
            if vals:
                lines.append(
                    f"  {label:<80}: {percentile(vals, 0.5):7.1f} / {percentile(vals, 0.99):7.1f} / {max(vals):7.1f}"
                )

        lines.append("worker's Prometheus histograms over the steady phase (bucket-interpolated):")
        for name, what in [
            ("writeguard_detection_lag_seconds", "commit -> alert published, per alert"),
            ("writeguard_processing_lag_seconds", "commit -> scored, 1 event in 16"),
        ]:
            d = hist_delta(hist_buckets(hist1, name), hist_buckets(hist0, name))
            n = int(d.get(math.inf, 0.0))
            lo, hi = bucket_of(d, 0.99)
            lines.append(
                f"  {name} ({what}): p50 {1000 * histogram_quantile(d, 0.5):,.0f} ms, "
                f"p99 {1000 * histogram_quantile(d, 0.99):,.0f} ms (interpolated inside its bucket, "
                f"{1000 * lo:,.0f}-{1000 * hi:,.0f} ms) (n={n:,})"
            )
        lines.append("")
        lines.append("details:")
        lines.append(
            f"  alerts on normal agents (false positives): {len(other_alerts)}"
            + (f" ({', '.join(sorted({str(a.record['agent_id']) for a in other_alerts}))})" if other_alerts else "")
            + f"; alerts raised during the warm-up: {warm_alerts}; normal agents refused: "
            f"{len(shared.refused)}; background reconnects: {shared.reconnects}"
        )
        if shared.errors:
            lines.append(f"  writer errors: {'; '.join(shared.errors[:3])}")
        rogue_errors = [f"{r.agent.role}: {r.error}" for r in rogues if r.error]
        if rogue_errors:
            lines.append(f"  rogue errors: {'; '.join(rogue_errors[:3])}")
        if side.error:
            lines.append(f"  side consumer error: {side.error}")
        seen_term = sum(r.terminated_us is not None for r in rogues)
        lines.append(
            f"  rogues that saw their session terminated before the refusal: {seen_term} of {len(rogues)}; "
            "commit times are the client clock right after the autocommit INSERT returned, the "
            "alert's commit_ts is Debezium's source.ts_us"
        )
        cpu = []
        for k in cpu0:
            a0, a1 = cpu0.get(k), cpu1.get(k)
            if a0 is not None and a1 is not None:
                cpu.append(f"{k} {100 * (a1 - a0) / steady_s:.0f}%")
        lines.append(f"  CPU over the steady phase, % of one core: {', '.join(cpu)}")
        lines += machine_lines(load0, wall0)
        lines.append("")
        lines.append("per rogue (ms; segments of the triggering row as above, in order):")
        lines.append(
            f"  {'role':<15} {'landed':>6} {'trig#':>5} {'alert':>6} {'enf.trig':>8} {'enf.1st':>8}   "
            "ack-pg  pg-dbz dbz-kfk kfk-alrt alrt-rvk rvk-refused"
        )

        def f(v: float | None, width: int) -> str:
            return f"{v:>{width}.0f}" if v is not None else f"{'-':>{width}}"

        for x in results:
            segs = " ".join(f"{x.segments[k]:>7.1f}" if k in x.segments else f"{'-':>7}" for k, _ in SEGMENTS)
            lines.append(
                f"  {x.role:<15} {x.landed:>6} {f(x.trigger_index, 5)} {f(x.alert_lag_ms, 6)} "
                f"{f(x.enforced_trigger_ms, 8)} {f(x.enforced_first_ms, 8)}  {segs}"
                + ("" if x.enforcement.startswith("ok") else f"  [{x.enforcement}]")
            )
        print("\n".join(lines), flush=True)
        return 0
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"interrupted ({e or 'SIGINT'})")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cleanup runs to its end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shared.stop.set()
        for t in threads + rogue_threads:
            t.join(5)
        if side is not None:
            side.stop_event.set()
            side.join(5)
        if stack is not None:
            log("stopping the worker, Kafka Connect, PostgreSQL and Kafka ...")
            stack.stop()
        remove_work_folder(workdir, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
