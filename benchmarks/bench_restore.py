"""How fast ``writeguard restore`` rebuilds a table from its CDC topic: the fold from Kafka, and into PostgreSQL.

Usage: ``python3 benchmarks/bench_restore.py [--rows N] [--pg-rows K] [--bootstrap-servers HOST:PORT]``.
Without ``--bootstrap-servers`` a throw-away single-node Kafka is started (:class:`testbed.broker.LocalKafka`);
the PostgreSQL part starts a :class:`testbed.postgres.LocalPostgres` (skipped with ``--pg-rows 0``).

What it does:

1. A table of N rows (default 1,000,000) as Debezium would have written it, produced straight to a 3-partition
   topic keyed by the primary key: a snapshot (op ``r``, markers first/last) of every row, then N/10 updates and
   N/100 deletes, then a ``TRUNCATE`` (op ``t``). Payload-only JSON, ~0.25 KB a record.
2. Fold rate: the restore's reading (every partition by offsets, merged into commit order, decoded) and fold
   (:func:`undo.restore.rows_at`, stopping at the truncate), in this process: records/s and rows/s of the table
   rebuilt. No PostgreSQL in this figure.
3. End to end: the same for a table of K rows (default 100,000; ``--pg-rows 1000000`` for the full size), then
   :func:`connectors.restore_pg.write_rows` into a new table of a real PostgreSQL (batches of --batch-size, one
   transaction each): rows/s of the write and of the whole restore, and of a second run (every row already
   equal: nothing changes).

Progress on stderr, figures on stdout; no assertions.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from benchmarks.bench_pipeline import create_topics  # noqa: E402
from benchmarks.common import log, machine_lines  # noqa: E402
from connectors.restore_pg import ChangeReader, ReadStats, iter_changes_kafka, write_rows  # noqa: E402
from undo.restore import Fold, rows_at  # noqa: E402

T0_US = 1_780_000_000_000_000


def value(op: str, i: int, ts: int, n: int, marker: str = "false") -> bytes:
    after = None if op in ("d", "t") else {
        "id": i, "amount": round(i * 0.37 + n, 2), "note": f"refund {i} for order {i * 7}", "paid": i % 3 == 0,
        "agent_id": f"agent-{i % 50:02d}", "created_at": T0_US + i,
    }  # fmt: skip
    before = {"id": i} if op == "d" else None
    src = {"schema": "public", "table": "refunds", "ts_us": ts, "lsn": ts, "txId": ts, "snapshot": marker}
    return orjson.dumps({"op": op, "before": before, "after": after, "source": src})


def produce_table(bootstrap: str, topic: str, rows: int) -> int:
    """The topic of a table of ``rows`` rows: snapshot, updates, deletes, then a truncate. Records produced."""
    create_topics(bootstrap, {topic: 3})
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.size": 1_000_000,
                  "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000})  # fmt: skip
    n = 0

    def send(key: int | None, v: bytes) -> None:
        nonlocal n
        k = None if key is None else orjson.dumps({"id": key})
        while True:
            try:
                p.produce(topic, key=k, value=v)
                break
            except BufferError:
                p.poll(0.05)
        n += 1
        if n % 100_000 == 0:
            p.poll(0)
            log(f"produced {n:,} records to {topic}")

    ts = T0_US
    for i in range(1, rows + 1):
        marker = "first" if i == 1 else "last" if i == rows else "true"
        send(i, value("r", i, T0_US, 0, marker))  # a snapshot's rows share its time
    for j in range(rows // 10):
        ts += 10
        i = (j * 7919) % rows + 1
        send(i, value("u", i, ts, j))
    for j in range(rows // 100):
        ts += 10
        i = (j * 104_729) % rows + 1
        send(i, value("d", i, ts, 0))
        send(i, b"")  # the tombstone
    ts += 10
    send(None, value("t", 0, ts, 0))
    assert p.flush(120) == 0
    return n


def fold(bootstrap: str, topic: str) -> tuple[Fold, ReadStats, float]:
    stats = ReadStats()
    started = time.perf_counter()
    gc.disable()
    try:
        changes = iter_changes_kafka({"bootstrap.servers": bootstrap}, topic, ChangeReader("public.refunds"), stats)
        f = rows_at(changes, before_truncate=True)
        changes.close()
    finally:
        gc.enable()
    return f, stats, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the table folded from Kafka")
    ap.add_argument("--pg-rows", type=int, default=100_000, help="rows restored end to end into PostgreSQL (0: skip)")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--bootstrap-servers", help="an existing broker (default: start a local one)")
    args = ap.parse_args(argv)
    load0, wall0 = os.getloadavg(), time.perf_counter()
    kafka: Any = None
    pg: Any = None
    lines: list[str] = []
    try:
        bootstrap = args.bootstrap_servers
        if bootstrap is None:
            from testbed.broker import LocalKafka

            kafka = LocalKafka(Path(tempfile.mkdtemp(prefix="bench-restore-kafka-")), progress=log).start()
            bootstrap = kafka.bootstrap_servers
        run = uuid.uuid4().hex[:6]
        topic = f"bench{run}.public.refunds"
        produced = produce_table(bootstrap, topic, args.rows)
        log(f"{produced:,} records in {topic}; folding ...")
        f, stats, secs = fold(bootstrap, topic)
        rows = len(f.state.rows)
        lines += [
            f"table of {args.rows:,} rows: {produced:,} records (snapshot, {args.rows // 10:,} updates, "
            f"{args.rows // 100:,} deletes + tombstones, a truncate), 3 partitions",
            f"fold from Kafka (read + decode + merge + fold, no PostgreSQL): {stats.records:,} records in "
            f"{secs:.2f} s = {stats.records / secs:,.0f} records/s; {rows:,} rows rebuilt = {rows / secs:,.0f} rows/s",
        ]
        if args.pg_rows:
            from testbed.postgres import LocalPostgres

            small = f"bench{run}.public.refunds_pg"
            produce_table(bootstrap, small, args.pg_rows)
            pg = LocalPostgres(progress=log).start()
            f2, _, read_s = fold(bootstrap, small)
            import psycopg

            state_rows = list(f2.state.rows.values())
            key = ["id"]
            with psycopg.connect(pg.dsn(), autocommit=True) as conn:
                w1 = write_rows(conn, "public.refunds", "public.refunds_restored", list(f2.state.columns), key,
                                state_rows, batch_size=args.batch_size)  # fmt: skip
                w2 = write_rows(conn, "public.refunds", "public.refunds_restored", list(f2.state.columns), key,
                                state_rows, batch_size=args.batch_size)  # fmt: skip
            n2 = len(state_rows)
            total = read_s + w1.seconds
            lines += [
                f"end to end, table of {args.pg_rows:,} rows into a new PostgreSQL table (batches of "
                f"{args.batch_size:,}): read+fold {read_s:.2f} s, write {w1.seconds:.2f} s "
                f"({n2 / w1.seconds:,.0f} rows/s written, {w1.inserted:,} inserted); whole restore {total:.2f} s = "
                f"{n2 / total:,.0f} rows/s",
                f"second run (every row already equal): write {w2.seconds:.2f} s ({n2 / w2.seconds:,.0f} rows/s), "
                f"{w2.inserted + w2.updated:,} rows changed",
            ]
        lines += machine_lines(load0, wall0)
    finally:
        if pg is not None:
            pg.stop()
        if kafka is not None:
            kafka.stop()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
