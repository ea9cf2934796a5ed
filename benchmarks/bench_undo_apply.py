"""Speed of ``writeguard undo apply``: a 10,000-row plan (updates, deletes, re-inserts) on a local PostgreSQL.

Usage: ``python benchmarks/bench_undo_apply.py [--rows 10000] [--batch-sizes 100,500,2000] [--dsn DSN]``.
Without ``--dsn`` it starts a throwaway PostgreSQL (:class:`testbed.postgres.LocalPostgres`, Debian's server).

For each batch size: a fresh schema with two REPLICA IDENTITY FULL tables, the rows as they were before the
agent, then the agent's writes (half the plan updates of existing refunds, a quarter refunds it inserted, a
quarter orders it deleted, interleaved in commit order), all written with COPY and plain SQL; the plan is made by
the real planner (build_scope + plan_undo) from the change events Debezium would have sent, and applied by
``connectors.undo_apply.apply_plan`` (signed messages, ledger, no corrections). Reported: wall time and rows/s of
the dry run and of the apply, and a check that every row is back. Progress on stderr, figures on stdout; no
assertions: the figures belong to the machine they ran on.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from benchmarks.common import log
from connectors.undo_apply import apply_plan
from detectors.spec import TableSpec
from undo.events import RowEvent
from undo.models import Plan, Selection
from undo.plan import plan_undo
from undo.scope import build_scope

T0_US = 1_767_225_600_000_000
TABLES = [TableSpec(name="bench.refunds", topic="b.bench.refunds"), TableSpec(name="bench.orders", topic="b.o")]
DDL = """
DROP SCHEMA IF EXISTS bench CASCADE;
DROP SCHEMA IF EXISTS writeguard CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.refunds (id int PRIMARY KEY, amount numeric(12,2) NOT NULL, reason text, status text NOT NULL,
                            updated_at timestamptz NOT NULL, meta jsonb);
CREATE TABLE bench.orders (id bigint PRIMARY KEY, customer text NOT NULL, total double precision, note text);
ALTER TABLE bench.refunds REPLICA IDENTITY FULL;
ALTER TABLE bench.orders REPLICA IDENTITY FULL;
"""


def refund(i: int, amount: str, status: str) -> dict[str, Any]:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)
    return {
        "id": i,
        "amount": amount,
        "reason": f"reason {i} it's",
        "status": status,
        "updated_at": at.isoformat().replace("+00:00", "Z"),
        "meta": f'{{"n": {i}, "tags": ["a", "b"]}}',
    }


def order(i: int) -> dict[str, Any]:
    return {"id": i, "customer": f"customer {i}", "total": i * 1.25, "note": "x" * 200}


def debezium(row: dict[str, Any]) -> dict[str, Any]:
    """numeric as Debezium's double; the rest is already in JsonConverter's form."""
    return {k: float(v) if k == "amount" else v for k, v in row.items()}


def build(conn: psycopg.Connection[Any], rows: int, seed: int = 7) -> Plan:
    """Write the tables as before the agent, then the agent's writes; the plan of its undo."""
    updates, inserts, deletes = rows // 2, rows // 4, rows - rows // 2 - rows // 4
    conn.execute(DDL)
    before_refunds = [refund(i, f"{i}.50", "open") for i in range(1, updates + 1)]
    before_orders = [order(i) for i in range(1, deletes + 1)]
    with conn.cursor() as cur:
        with cur.copy("COPY bench.refunds (id, amount, reason, status, updated_at, meta) FROM STDIN") as cp:
            for r in before_refunds:
                cp.write_row(list(r.values()))
        with cur.copy("COPY bench.orders (id, customer, total, note) FROM STDIN") as cp:
            for o in before_orders:
                cp.write_row(list(o.values()))
    # The agent: its events, in a random interleaving, one transaction per 50 writes.
    writes: list[tuple[str, int]] = [("u", i) for i in range(1, updates + 1)]
    writes += [("c", 1_000_000 + i) for i in range(inserts)] + [("d", i) for i in range(1, deletes + 1)]
    random.Random(seed).shuffle(writes)
    events: list[RowEvent] = []
    for n, (op, i) in enumerate(writes):
        ts, tx = T0_US + n // 50 * 1000, str(5000 + n // 50)
        if op == "u":
            b = refund(i, f"{i}.50", "open")
            a = {**b, "amount": f"{i * 100}.00", "status": "paid"}
            events.append(RowEvent("bench.refunds", {"id": i}, "u", debezium(b), debezium(a), ts, tx, "rogue"))
        elif op == "c":
            a = refund(i, "99999.99", "paid")
            events.append(RowEvent("bench.refunds", {"id": i}, "c", None, debezium(a), ts, tx, "rogue"))
        else:
            events.append(RowEvent("bench.orders", {"id": i}, "d", order(i), None, ts, tx, "rogue"))
    conn.execute("UPDATE bench.refunds SET amount = id * 100, status = 'paid' WHERE id <= %s", (updates,))
    with conn.cursor() as cur:
        with cur.copy("COPY bench.refunds (id, amount, reason, status, updated_at, meta) FROM STDIN") as cp:
            for i in range(inserts):
                cp.write_row(list(refund(1_000_000 + i, "99999.99", "paid").values()))
    conn.execute("DELETE FROM bench.orders")
    conn.execute("VACUUM ANALYZE bench.refunds")
    conn.execute("VACUUM ANALYZE bench.orders")
    plan = plan_undo(build_scope(events, Selection(agents=("rogue",)), TABLES), TABLES)
    assert len(plan.steps) == rows, len(plan.steps)
    return plan


def restored(conn: psycopg.Connection[Any], rows: int) -> bool:
    updates, deletes = rows // 2, rows - rows // 2 - rows // 4
    bad = conn.execute(
        """SELECT (SELECT count(*) FROM bench.refunds WHERE id <= %s AND (amount <> id + 0.5 OR status <> 'open'))
                + (SELECT count(*) FROM bench.refunds WHERE id > %s)
                + (%s - (SELECT count(*) FROM bench.orders WHERE total = id * 1.25))""",
        (updates, updates, deletes),
    ).fetchone()
    return bad is not None and bad[0] == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--batch-sizes", default="100,500,2000", help="comma-separated (500 is the default)")
    p.add_argument("--dsn", help="a PostgreSQL to use (its schemas bench and writeguard are dropped!)")
    args = p.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    server = None
    dsn = args.dsn
    if dsn is None:
        from testbed.postgres import LocalPostgres

        server = LocalPostgres(progress=log).start()
        dsn = server.dsn()
    results: list[tuple[int, float, float, bool]] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            for size in sizes:
                log(f"batch size {size}: writing {args.rows:,} rows and the agent's writes")
                t = time.perf_counter()
                plan = build(conn, args.rows)
                log(f"  set up and planned in {time.perf_counter() - t:.1f} s")
                figures = []
                for dry in (True, False):
                    t = time.perf_counter()
                    report = apply_plan(
                        conn, plan, applied_by="bench", dry_run=dry, batch_size=size, signing_keys=[b"k" * 32]
                    )
                    wall = time.perf_counter() - t
                    assert report.outcomes == {"applied": args.rows}, report.outcomes
                    figures.append(wall)
                    log(f"  {'dry run' if dry else 'apply'}: {wall:.2f} s, {args.rows / wall:,.0f} rows/s")
                results.append((size, figures[0], figures[1], restored(conn, args.rows)))
    finally:
        if server is not None:
            server.stop()
    print(
        f"undo apply, {args.rows:,} steps ({args.rows // 2:,} updates, {args.rows // 4:,} deletes, "
        f"{args.rows - args.rows // 2 - args.rows // 4:,} re-inserts), PostgreSQL {version[0] if version else '?'}"
    )
    print(f"{'batch size':>10}  {'dry run s':>9}  {'rows/s':>8}  {'apply s':>8}  {'rows/s':>8}  restored")
    for size, dry_s, real, ok in results:
        print(f"{size:>10}  {dry_s:>9.2f}  {args.rows / dry_s:>8,.0f}  {real:>8.2f}  {args.rows / real:>8,.0f}  {ok}")


if __name__ == "__main__":
    main()
