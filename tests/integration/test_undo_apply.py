"""``writeguard undo apply`` on a real PostgreSQL (and the session's Kafka broker for the corrections).

Each test gets its own database. An "agent" writes rows through real SQL while a :class:`Recorder` keeps the row
changes Debezium would publish for them (REPLICA IDENTITY FULL, values in JsonConverter's encoding, as checked
against Debezium 3.6.1 in tests/unit/test_undo_apply_unit.py); the real planner (build_scope + plan_undo) turns them
into a plan, and the plan is applied in process (``apply_plan``) or by the CLI in a subprocess.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql
from psycopg.types.string import TextLoader

from connectors.corrections import Correction, CorrectionPublisher
from connectors.debezium_connector import debezium_postgres_config
from connectors.messages import verify_undo_message
from connectors.undo_apply import ApplyRefused, StepFailed, apply_plan
from detectors.spec import SoftDelete, TableSpec
from testbed.broker import LocalKafka
from testbed.connect import LocalConnect
from testbed.postgres import LocalPostgres
from tests.integration.conftest import read_topic
from undo.events import RowEvent, RowOp, canonical_key
from undo.models import ApplyReport, Plan, Selection
from undo.plan import PlanRejected, plan_undo
from undo.scope import build_scope

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEY = b"k" * 32
T0_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
EPOCH = datetime(1970, 1, 1)
EPOCH_DATE = date(1970, 1, 1)
LEDGER = "writeguard.undo_ledger"

REFUNDS = TableSpec(name="public.refunds", topic="shop.public.refunds")
ORDERS = TableSpec(
    name="public.orders", topic="shop.public.orders", soft_delete=SoftDelete(column="deleted_at", kind="timestamp")
)
HOSTILE = TableSpec(name="public.hostile", topic="shop.public.hostile")
SCHEMA = """
CREATE TABLE public.refunds (id int PRIMARY KEY, amount numeric(12,2) NOT NULL, reason text, status text NOT NULL);
CREATE TABLE public.orders (id bigint PRIMARY KEY, customer text NOT NULL, total double precision, meta jsonb,
                            deleted_at timestamptz);
CREATE TABLE public.hostile (id int PRIMARY KEY, t text, big text, j json, jb jsonb, b bytea, ts timestamp,
                             ts3 timestamp(3), tstz timestamptz, d date, tm time, n numeric(12,2), f4 real,
                             f8 double precision, u uuid, arr text[], tsarr timestamp[], bo boolean,
                             "we""ird; col" text);
ALTER TABLE public.refunds REPLICA IDENTITY FULL;
ALTER TABLE public.orders REPLICA IDENTITY FULL;
ALTER TABLE public.hostile REPLICA IDENTITY FULL;
"""
MS_COLUMNS = {"ts3"}  # timestamp(3): Debezium's adaptive precision sends ms


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    # PostgreSQL is required (scripts/system-deps installs it): if it cannot start, fail with its own error.
    server = LocalPostgres(progress=lambda m: print(m, file=sys.stderr)).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Db:
    pg: LocalPostgres
    name: str
    conn: psycopg.Connection[Any]

    @property
    def dsn(self) -> str:
        return self.pg.dsn("postgres", self.name)

    def sql(self, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of the table, json and jsonb as their exact text, in key order."""
        return self.sql(sql.SQL("SELECT * FROM {} ORDER BY 1").format(sql.Identifier(*table.split("."))))

    def ledger(self, plan_id: str) -> list[tuple[Any, ...]]:
        return self.sql(
            "SELECT step, outcome, attempts, tx_id, found, published_at IS NOT NULL FROM writeguard.undo_ledger "
            "WHERE plan_id = %s ORDER BY step",
            (plan_id,),
        )

    def has_ledger(self) -> bool:
        return bool(self.sql("SELECT to_regclass('writeguard.undo_ledger') IS NOT NULL")[0][0])


def json_as_text(conn: psycopg.Connection[Any]) -> None:
    for name in ("json", "jsonb"):
        conn.adapters.register_loader(name, TextLoader)


@pytest.fixture
def db(pg: LocalPostgres) -> Iterator[Db]:
    name = f"undo_{uuid.uuid4().hex[:10]}"
    pg.create_database(name)
    conn = pg.connect(dbname=name, autocommit=True)
    json_as_text(conn)
    conn.execute(SCHEMA)
    try:
        yield Db(pg, name, conn)
    finally:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"):
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.close()
        with pg.connect(autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def debezium(value: Any, column: str) -> Any:
    """A value as Debezium's JsonConverter sends it (writeguard's connector config)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, datetime):
        d = value - EPOCH
        us = (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
        return us // 1000 if column in MS_COLUMNS else us
    if isinstance(value, date):
        return (value - EPOCH_DATE).days
    if isinstance(value, timedelta):
        return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list):
        return [debezium(v, column) for v in value]
    if hasattr(value, "hour"):  # time
        return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond
    raise TypeError(f"no Debezium encoding for {type(value)}")


@dataclass
class Recorder:
    """Writes like an agent (or a human) in real transactions; keeps the change events Debezium would publish."""

    conn: psycopg.Connection[Any]
    events: list[RowEvent] = field(default_factory=list)
    ts_us: int = T0_US
    tx: int = 1000
    agent: str | None = None

    @contextlib.contextmanager
    def transaction(self, agent: str | None) -> Iterator[None]:
        self.agent = agent
        with self.conn.transaction():
            yield
        self.tx += 1
        self.ts_us += 1_000_000

    def _row(self, table: str, cur: psycopg.Cursor[Any]) -> dict[str, Any] | None:
        row = cur.fetchone()
        if row is None:
            return None
        assert cur.description is not None
        return {d.name: debezium(v, d.name) for d, v in zip(cur.description, row, strict=True)}

    def _record(self, table: str, key: dict[str, Any], op: RowOp, before: Any, after: Any) -> None:
        at = f"rec:{len(self.events)}"
        self.events.append(RowEvent(table, key, op, before, after, self.ts_us, str(self.tx), self.agent, None, at))

    def _select(self, table: str, key: dict[str, Any]) -> dict[str, Any] | None:
        where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in key)
        q = sql.SQL("SELECT * FROM {} WHERE {}").format(sql.Identifier(*table.split(".")), where)
        return self._row(table, self.conn.execute(q, list(key.values())))

    def insert(self, table: str, row: dict[str, Any]) -> None:
        q = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING *").format(
            sql.Identifier(*table.split(".")),
            sql.SQL(", ").join(sql.Identifier(c) for c in row),
            sql.SQL(", ").join(sql.Placeholder() for _ in row),
        )
        after = self._row(table, self.conn.execute(q, list(row.values())))
        self._record(table, {"id": row["id"]}, "c", None, after)

    def update(self, table: str, key: int, **changes: Any) -> None:
        before = self._select(table, {"id": key})
        q = sql.SQL("UPDATE {} SET {} WHERE id = %s RETURNING *").format(
            sql.Identifier(*table.split(".")),
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in changes),
        )
        after = self._row(table, self.conn.execute(q, [*changes.values(), key]))
        self._record(table, {"id": key}, "u", before, after)

    def delete(self, table: str, key: int) -> None:
        before = self._select(table, {"id": key})
        self.conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(sql.Identifier(*table.split("."))), [key])
        self._record(table, {"id": key}, "d", before, None)


def make_plan(events: list[RowEvent], tables: list[TableSpec] | None = None, agent: str = "rogue") -> Plan:
    specs = tables or [REFUNDS, ORDERS, HOSTILE]
    return plan_undo(build_scope(events, Selection(agents=(agent,)), specs), specs)


def seed(db: Db, rec: Recorder) -> None:
    """Rows that exist before the agent runs (written by a human: their events are not selected)."""
    with rec.transaction(None):
        for i in range(1, 11):
            rec.insert(
                "public.refunds", {"id": i, "amount": Decimal(f"{i * 10}.25"), "reason": f"r{i}", "status": "open"}
            )
        for i in range(1, 8):
            rec.insert(
                "public.orders",
                {"id": i, "customer": f"c{i}", "total": i * 1.5, "meta": json.dumps({"n": i, "tags": ["a"]})},
            )


def rogue(rec: Recorder) -> None:
    """The agent: inserts, updates, soft-deletes and deletes over both tables, in several transactions."""
    with rec.transaction("rogue"):
        for i in (101, 102, 103):
            rec.insert("public.refunds", {"id": i, "amount": Decimal("99999.99"), "reason": "rogue", "status": "paid"})
        rec.update("public.refunds", 1, amount=Decimal("5000.00"), status="paid")
        rec.update("public.refunds", 2, reason='it\'s "rogue"')
    with rec.transaction("rogue"):
        rec.update("public.refunds", 3, amount=Decimal("0.01"))
        rec.update("public.refunds", 3, status="void")  # two writes to one row: one step back to the first before
        rec.delete("public.refunds", 4)
        rec.delete("public.refunds", 5)
        rec.update("public.orders", 1, deleted_at=datetime(2026, 1, 1, 1, tzinfo=UTC))  # soft delete
        rec.update("public.orders", 2, deleted_at=datetime(2026, 1, 1, 1, tzinfo=UTC))
    with rec.transaction("rogue"):
        rec.update("public.orders", 3, meta=json.dumps({"n": 3, "rogue": True}), total=0.0)
        rec.delete("public.orders", 4)
        rec.insert("public.orders", {"id": 50, "customer": "fake", "total": 1e6, "meta": None})
        rec.insert("public.orders", {"id": 51, "customer": "fake2", "total": 2e6, "meta": "{}"})


@dataclass
class Scenario:
    db: Db
    rec: Recorder
    before: dict[str, list[tuple[Any, ...]]]
    plan: Plan


@pytest.fixture
def scenario(db: Db) -> Scenario:
    rec = Recorder(db.conn)
    seed(db, rec)
    before = {t: db.rows(t) for t in ("public.refunds", "public.orders")}
    rogue(rec)
    plan = make_plan(rec.events)
    assert len(plan.steps) == 14 and all(s.decision == "apply" for s in plan.steps)
    return Scenario(db, rec, before, plan)


def apply(db: Db, plan: Plan, **kw: Any) -> Any:
    kw.setdefault("applied_by", "tester@test")
    kw.setdefault("signing_keys", [KEY])
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        return apply_plan(conn, plan, **kw)


def assert_restored(s: Scenario) -> None:
    assert s.db.rows("public.refunds") == s.before["public.refunds"]
    orders = s.db.rows("public.orders")
    # The rows that existed are as before; the agent's two new orders are soft-deleted (the table has deleted_at).
    assert [r for r in orders if r[0] not in (50, 51)] == s.before["public.orders"]
    fake = [r for r in orders if r[0] in (50, 51)]
    assert [r[:4] for r in fake] == [(50, "fake", 1e6, None), (51, "fake2", 2e6, "{}")]
    assert all(r[4] is not None for r in fake), fake


# --- apply, re-apply, dry run ------------------------------------------------------------------------------------


def test_apply_brings_every_row_back_and_a_second_apply_changes_nothing(scenario: Scenario) -> None:
    s = scenario
    report = apply(s.db, s.plan, batch_size=4)
    assert report.outcomes == {"applied": 14}, report.steps
    assert report.batches == 4 and not report.dry_run
    assert report.tables == {"public.orders": {"applied": 6}, "public.refunds": {"applied": 8}}
    assert_restored(s)
    ledger = s.db.ledger(s.plan.plan_id)
    assert [(n, o, a) for n, o, a, *_ in ledger] == [(n, "applied", 1) for n in range(1, 15)]
    rows_after_first = {t: s.db.rows(t) for t in ("public.refunds", "public.orders")}

    again = apply(s.db, s.plan, batch_size=4)
    assert again.outcomes == {"already_applied": 14}
    assert {t: s.db.rows(t) for t in rows_after_first} == rows_after_first
    assert s.db.ledger(s.plan.plan_id) == ledger  # not even an attempt counted


def test_dry_run_changes_nothing_not_even_the_ledger_and_reports_the_same_counts(scenario: Scenario) -> None:
    s = scenario
    agent_state = {t: s.db.rows(t) for t in ("public.refunds", "public.orders")}
    dry = apply(s.db, s.plan, dry_run=True, batch_size=5)
    assert dry.dry_run and dry.outcomes == {"applied": 14} and dry.batches == 3
    assert {t: s.db.rows(t) for t in agent_state} == agent_state
    assert not s.db.has_ledger()  # created inside each batch's transaction, rolled back with it
    real = apply(s.db, s.plan, batch_size=5)
    assert real.outcomes == dry.outcomes and real.tables == dry.tables
    assert [(x.n, x.outcome) for x in real.steps] == [(x.n, x.outcome) for x in dry.steps]
    assert_restored(s)


def test_a_row_changed_after_the_plan_keeps_the_later_value(scenario: Scenario) -> None:
    s = scenario
    with s.rec.transaction("human"):
        s.rec.update("public.refunds", 1, amount=Decimal("4321.00"))  # the scan did not see this one
    step = next(x for x in s.plan.steps if x.table == "public.refunds" and x.key == {"id": 1})
    report = apply(s.db, s.plan)
    out = {x.n: x for x in report.steps}
    assert out[step.n].outcome == "precondition_failed"
    assert out[step.n].detail == "the row no longer holds what the selection left"
    assert report.outcomes == {"applied": 13, "precondition_failed": 1}
    row = s.db.sql("SELECT amount, status FROM public.refunds WHERE id = 1")[0]
    assert row == (Decimal("4321.00"), "paid")  # the human's value stays, and the agent's status too
    found = {n: f for n, _, _, _, f, _ in s.db.ledger(s.plan.plan_id)}
    assert json.loads(found[step.n])["amount"] == 4321.00
    # Every other row is back.
    assert [r for r in s.db.rows("public.refunds") if r[0] != 1] == [r for r in s.before["public.refunds"] if r[0] != 1]


def test_a_reinsert_whose_key_was_taken_is_not_applied(scenario: Scenario) -> None:
    s = scenario
    with s.rec.transaction("human"):
        s.rec.insert("public.refunds", {"id": 4, "amount": Decimal("1.00"), "reason": "new", "status": "open"})
    step = next(x for x in s.plan.steps if x.key == {"id": 4} and x.table == "public.refunds")
    assert step.action == "insert"
    report = apply(s.db, s.plan)
    assert {x.n: x.outcome for x in report.steps}[step.n] == "key_taken"
    assert s.db.sql("SELECT amount, reason FROM public.refunds WHERE id = 4") == [(Decimal("1.00"), "new")]
    # Re-run: still taken, looked at again (attempts 2), never overwritten.
    apply(s.db, s.plan)
    row = next(r for r in s.db.ledger(s.plan.plan_id) if r[0] == step.n)
    assert row[1:3] == ("key_taken", 2)
    assert s.db.sql("SELECT amount, reason FROM public.refunds WHERE id = 4") == [(Decimal("1.00"), "new")]


def test_skip_is_honoured_and_force_applies_a_conflict_step(db: Db) -> None:
    rec = Recorder(db.conn)
    seed(db, rec)
    with rec.transaction("rogue"):
        rec.update("public.refunds", 1, amount=Decimal("7777.00"))
        rec.update("public.refunds", 2, amount=Decimal("8888.00"))
        rec.update("public.refunds", 3, amount=Decimal("9999.00"))
    with rec.transaction("human"):
        rec.update("public.refunds", 2, reason="human was here")  # a later write: step of row 2 is a conflict
    plan = make_plan(rec.events)
    steps = {x.key["id"]: x for x in plan.steps}
    assert steps[2].decision == "conflict" and steps[2].conflict is not None
    reviewed = plan.model_copy(
        update={
            "steps": [
                x.model_copy(update={"decision": {1: "skip", 2: "force"}.get(x.key["id"], x.decision)})
                for x in plan.steps
            ]
        }
    )
    report = apply(db, reviewed)
    assert {x.key["id"]: x.outcome for x in report.steps} == {1: "skipped", 2: "applied", 3: "applied"}
    amounts = dict(db.sql("SELECT id, amount FROM public.refunds WHERE id <= 3"))
    assert amounts == {1: Decimal("7777.00"), 2: Decimal("20.25"), 3: Decimal("30.25")}
    # The conflict as planned (not forced) is not applied, and says why.
    fresh = apply(db, plan)
    assert {x.key["id"]: x.outcome for x in fresh.steps}[1] == "applied"  # skip was a decision of the review only
    assert {x.key["id"]: (x.outcome, x.detail) for x in fresh.steps}[2] == ("already_applied", None)


def test_an_unforced_conflict_is_reported_with_its_reason_and_not_written(db: Db) -> None:
    rec = Recorder(db.conn)
    seed(db, rec)
    with rec.transaction("rogue"):
        rec.update("public.refunds", 2, amount=Decimal("8888.00"))
    with rec.transaction("human"):
        rec.update("public.refunds", 2, reason="human")
    plan = make_plan(rec.events)
    report = apply(db, plan)
    (only,) = report.steps
    assert only.outcome == "conflict" and only.detail is not None and "human" in only.detail
    assert db.sql("SELECT amount, reason FROM public.refunds WHERE id = 2") == [(Decimal("8888.00"), "human")]


def test_a_tampered_plan_is_refused_before_any_sql(scenario: Scenario, tmp_path: Path) -> None:
    s = scenario
    step = s.plan.steps[0]
    tampered = s.plan.model_copy(
        update={"steps": [step.model_copy(update={"values": {"amount": 1_000_000}}), *s.plan.steps[1:]]}
    )
    # A connection string to nothing: any SQL, even connecting, would fail with another error.
    with pytest.raises(PlanRejected, match="does not match its content"):
        apply_plan("host=127.0.0.1 port=1 dbname=none connect_timeout=1", tampered, applied_by="x")
    state = {t: s.db.rows(t) for t in s.before}
    path = tmp_path / "plan.json"
    path.write_text(tampered.model_dump_json())
    cfg = write_config(tmp_path, s.db)
    r = cli("undo", "apply", str(path), "-c", str(cfg), "--dsn", s.db.dsn)
    assert r.returncode == 1, r.stderr
    assert "refused" in r.stderr and "does not match its content" in r.stderr
    assert {t: s.db.rows(t) for t in s.before} == state and not s.db.has_ledger()


def test_a_plan_that_does_not_fit_the_database_is_refused_before_any_write(scenario: Scenario) -> None:
    s = scenario
    s.db.sql("ALTER TABLE public.orders DROP CONSTRAINT orders_pkey")  # no unique key: a step could hit many rows
    state = {t: s.db.rows(t) for t in s.before}
    with pytest.raises(ApplyRefused, match="no unique index on exactly"):
        apply(s.db, s.plan)
    assert {t: s.db.rows(t) for t in s.before} == state and not s.db.has_ledger()


# --- values ------------------------------------------------------------------------------------------------------

BIG = ("ünïcødé 🚀 'quoted' \"double\" \\ back; DROP TABLE x; -- " * 1800)[:100_000]


def hostile_row(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "t": f'it\'s "{i}"; DROP TABLE hostile; -- ünï 🚀\n\ttab',
        "big": BIG,
        "j": '{"b": 1,  "a": [1, 2], "é": "\\u00e9"}',  # json keeps its exact text: spaces, order, escapes
        "jb": json.dumps({"nested": {"x": [None, True, 1.5]}, "quote": "'\""}),
        "b": bytes(range(256)) * 3,
        "ts": datetime(2026, 3, 1, 12, 34, 56, 123456 + i),
        "ts3": datetime(2026, 3, 1, 12, 34, 56, 789000),
        "tstz": datetime(2026, 3, 1, 10, 34, 56, 654321, tzinfo=UTC),
        "d": date(1969, 7, 20),
        "tm": datetime(2026, 1, 1, 23, 59, 59, 999999).time(),
        "n": Decimal("1234567890.12"),
        "f4": 0.1,
        "f8": 1 / 3,
        "u": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        "arr": ["x,y", 'q"t', None, "{}"],
        "tsarr": [datetime(2026, 1, 1, 0, 0, 0, 500000)],
        "bo": False,
        'we"ird; col': "'; --",
    }


def test_hostile_values_round_trip_exactly(db: Db) -> None:
    rec = Recorder(db.conn)
    nulls = {k: None for k in hostile_row(0) if k != "id"}
    with rec.transaction(None):
        rec.insert("public.hostile", hostile_row(1))
        rec.insert("public.hostile", hostile_row(2))
        rec.insert("public.hostile", {"id": 3, **nulls})
    before = db.rows("public.hostile")
    with rec.transaction("rogue"):
        rec.update(
            "public.hostile",
            1,
            t="rogue",
            big="short",
            j='{"a":2}',
            jb="[]",
            b=b"",
            ts=None,
            ts3=datetime(2000, 1, 1),
            tstz=datetime(2000, 1, 1, tzinfo=UTC),
            d=date(2000, 1, 1),
            tm=None,
            n=Decimal("0.01"),
            f4=2.5,
            f8=None,
            u=None,
            arr=[],
            tsarr=None,
            bo=True,
            **{'we"ird; col': None},
        )
        rec.delete("public.hostile", 2)  # re-inserted from its before image: every column
        rec.update("public.hostile", 3, **{k: v for k, v in hostile_row(3).items() if k != "id"})  # NULLs back
        rec.insert("public.hostile", hostile_row(4))
    plan = make_plan(rec.events, [HOSTILE])
    assert sorted(x.action for x in plan.steps) == ["delete", "insert", "update", "update"]
    report = apply(db, plan)
    assert report.outcomes == {"applied": 4}, report.steps
    assert db.rows("public.hostile") == before
    # Byte for byte too: the json column's text, the 100 KB text, the bytea.
    assert db.sql("SELECT j::text, md5(big), md5(b) FROM public.hostile WHERE id = 1") == [
        (hostile_row(1)["j"], *db.sql("SELECT md5(%s), md5(%s::bytea)", (BIG, hostile_row(1)["b"]))[0])
    ]


# --- crash and re-run -----------------------------------------------------------------------------------------


def write_config(tmp: Path, db: Db, kafka: LocalKafka | None = None, **undo: Any) -> Path:
    cfg: dict[str, Any] = {
        "tables": [
            {"name": t.name, "topic": t.topic, **({"soft_delete": {"column": "deleted_at"}} if t.soft_delete else {})}
            for t in (REFUNDS, ORDERS, HOSTILE)
        ],
        "control": {"signing_key": KEY.decode()},
        "undo": {"ledger": LEDGER, **undo},
    }
    if kafka is not None:
        cfg["kafka"] = {"bootstrap.servers": kafka.bootstrap_servers}
    path = tmp / "writeguard.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def poll(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not seen in {timeout:.0f} s; last seen: {last!r}")


def many_updates(db: Db, rows: int) -> tuple[Plan, dict[int, Decimal]]:
    """``rows`` refunds the agent changed: a plan of ``rows`` updates, and each row's value before the agent."""
    rec = Recorder(db.conn)
    with rec.transaction(None):
        db.sql(
            "INSERT INTO public.refunds SELECT g, g + 0.5, 'r', 'open' FROM generate_series(1, %s) g",
            (rows,),
        )
    with rec.transaction("rogue"):
        for i in range(1, rows + 1):
            rec.update("public.refunds", i, amount=Decimal(i) * 1000)
    return make_plan(rec.events), {i: Decimal(i) + Decimal("0.5") for i in range(1, rows + 1)}


def test_an_apply_killed_in_the_middle_and_run_again_compensates_every_row_exactly_once(db: Db, tmp_path: Path) -> None:
    plan, original = many_updates(db, 40)
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json())
    cfg = write_config(tmp_path, db)
    # A human holds row 25 locked: the apply (one step per batch) waits there, after committing steps 1..k.
    blocked = next(x.n for x in plan.steps if x.key == {"id": 25})
    holder = db.pg.connect(dbname=db.name)
    holder.execute("SELECT * FROM public.refunds WHERE id = 25 FOR UPDATE")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream.cli",
            "undo",
            "apply",
            str(path),
            "-c",
            str(cfg),
            "--dsn",
            db.dsn,
            "--batch-size",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def waiting() -> bool:
            return bool(
                db.has_ledger()
                and len(db.ledger(plan.plan_id)) == blocked - 1
                and db.sql(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )

        poll("the apply waiting on row 25 with the steps before it committed", waiting)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        holder.rollback()
        holder.close()
    assert proc.returncode == -signal.SIGKILL
    done = db.ledger(plan.plan_id)
    assert 0 < len(done) < len(plan.steps)
    r = cli("undo", "apply", str(path), "-c", str(cfg), "--dsn", db.dsn, "--batch-size", "7")
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} already_applied" in r.stdout and f"{len(plan.steps) - len(done)} applied" in r.stdout
    ledger = db.ledger(plan.plan_id)
    assert [(n, o, a) for n, o, a, *_ in ledger] == [(x.n, "applied", 1) for x in plan.steps]
    assert dict(db.sql("SELECT id, amount FROM public.refunds")) == original


# --- the logical decoding message ------------------------------------------------------------------------------


def test_each_batch_emits_a_signed_undo_message_in_its_own_transaction(scenario: Scenario) -> None:
    s = scenario
    s.db.sql("SELECT pg_create_logical_replication_slot('undo_msgs', 'test_decoding')")
    report = apply(s.db, s.plan, batch_size=6, message_prefix="wg-test")
    assert report.batches == 3
    changes = s.db.sql("SELECT xid::text::bigint, data FROM pg_logical_slot_get_changes('undo_msgs', NULL, NULL)")
    by_tx: dict[int, list[str]] = {}
    for xid, data in changes:
        by_tx.setdefault(xid, []).append(data)
    undo_txs = {}
    for xid, lines in by_tx.items():
        msgs = [line for line in lines if line.startswith("message: transactional: 1 prefix: wg-test")]
        if msgs:
            (msg,) = msgs
            body = json.loads(msg.split(" content:", 1)[1])
            assert verify_undo_message([KEY], body, xid) == s.plan.plan_id
            assert verify_undo_message([KEY], body, xid + 1) is None
            undo_txs[body["undo"]["batch"]] = (xid, lines)
    assert sorted(undo_txs) == [1, 2, 3]
    for _xid, lines in undo_txs.values():
        # The compensating writes of the watched tables are in the same transaction as its message.
        assert any(line.startswith(("table public.refunds", "table public.orders")) for line in lines), lines
    ledger_txs = {tx for _, _, _, tx, _, _ in s.db.ledger(s.plan.plan_id)}
    assert ledger_txs == {xid for xid, _ in undo_txs.values()}


# --- corrections and status --------------------------------------------------------------------------------------


def corrections_config(tmp: Path, db: Db, kafka: LocalKafka, topic: str, groups: list[str]) -> Path:
    return write_config(tmp, db, kafka, corrections={"topic": topic, "downstream_groups": groups})


def commit_group(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        c.close()


def test_corrections_arrive_keyed_by_row_and_status_completes_when_downstream_has_read_them(
    scenario: Scenario, kafka: LocalKafka, tmp_path: Path
) -> None:
    s = scenario
    topic = f"corrections-{uuid.uuid4().hex[:8]}"
    cfg = corrections_config(tmp_path, s.db, kafka, topic, ["billing-sync", "search-index"])
    path = tmp_path / "plan.json"
    path.write_text(s.plan.model_dump_json())
    r = cli("undo", "status", str(path), "-c", str(cfg), "--dsn", s.db.dsn)
    assert r.returncode == 1 and "14 not yet run" in r.stdout, r.stdout + r.stderr
    # One step changed since: precondition_failed, so no correction for it.
    with s.rec.transaction("human"):
        s.rec.update("public.refunds", 1, amount=Decimal("1.00"))
    r = cli("undo", "apply", str(path), "-c", str(cfg), "--dsn", s.db.dsn, "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert "13 corrections published" in r.stdout
    records = read_topic(kafka.bootstrap_servers, topic, expect=13)
    assert len(records) == 13
    got = {}
    for key, value, partition, offset in records:
        c = Correction.model_validate_json(value or b"")
        assert key == canonical_key(c.key).encode()
        got[(c.table, canonical_key(c.key))] = (c, partition, offset)
    changed = ("public.refunds", canonical_key({"id": 1}))
    planned = {(x.table, canonical_key(x.key)): x for x in s.plan.steps if (x.table, canonical_key(x.key)) != changed}
    assert set(got) == set(planned)
    for k, (c, _, _) in got.items():
        step = planned[k]
        assert (c.plan_id, c.step, c.action) == (s.plan.plan_id, step.n, step.action)
        assert c.restored == (None if step.action == "delete" else step.values)
        assert c.agent_wrote == (None if step.action == "insert" else step.agent_values)
    # Not complete until every downstream group has committed past the last correction on each partition.
    r = cli("undo", "status", str(path), "-c", str(cfg), "--dsn", s.db.dsn)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "13 applied" in r.stdout and "1 precondition failed" in r.stdout and "0 not yet run" in r.stdout
    assert "downstream billing-sync: not yet past" in r.stdout
    ends: dict[int, int] = {}
    for _, partition, offset in got.values():
        ends[partition] = max(ends.get(partition, -1), offset + 1)
    commit_group(kafka.bootstrap_servers, "billing-sync", topic, ends)
    r = cli("undo", "status", str(path), "-c", str(cfg), "--dsn", s.db.dsn)
    assert r.returncode == 1 and "downstream billing-sync: has read every correction" in r.stdout, r.stdout
    assert "downstream search-index: not yet past" in r.stdout
    commit_group(kafka.bootstrap_servers, "search-index", topic, {p: o - 1 for p, o in ends.items()})
    r = cli("undo", "status", str(path), "-c", str(cfg), "--dsn", s.db.dsn)
    assert r.returncode == 1, r.stdout  # at the last correction is not past it
    commit_group(kafka.bootstrap_servers, "search-index", topic, ends)
    r = cli("undo", "status", str(path), "-c", str(cfg), "--dsn", s.db.dsn)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("complete"), r.stdout + r.stderr


def test_corrections_lost_between_commit_and_confirmation_are_published_on_the_next_run(
    scenario: Scenario, kafka: LocalKafka
) -> None:
    s = scenario
    topic = f"corrections-{uuid.uuid4().hex[:8]}"
    publisher = CorrectionPublisher({"bootstrap.servers": kafka.bootstrap_servers}, topic, partitions=3)
    first = apply(s.db, s.plan, corrections=publisher, batch_size=5)
    assert first.corrections_published == 14
    assert len(read_topic(kafka.bootstrap_servers, topic, expect=14)) == 14
    # As if the process died after the commit of steps 11..14, before Kafka confirmed their corrections.
    s.db.sql(
        "UPDATE writeguard.undo_ledger SET published_at = NULL, kafka_partition = NULL, kafka_offset = NULL "
        "WHERE plan_id = %s AND step > 10",
        (s.plan.plan_id,),
    )
    second = apply(s.db, s.plan, corrections=publisher)
    assert second.outcomes == {"already_applied": 14} and second.corrections_published == 4
    records = read_topic(kafka.bootstrap_servers, topic, expect=18)
    steps = sorted(Correction.model_validate_json(v or b"").step for _, v, _, _ in records)
    assert steps == sorted([*range(1, 15), *range(11, 15)])  # at least once: (plan_id, step) dedupes
    assert all(published for *_, published in s.db.ledger(s.plan.plan_id))


# --- errors ------------------------------------------------------------------------------------------------------


def test_a_database_error_names_the_step_and_the_server_message_not_the_dsn(scenario: Scenario, tmp_path: Path) -> None:
    s = scenario
    # Since the plan was made, a constraint the restored value breaks: refund 1 goes back to 10.25.
    s.db.sql("ALTER TABLE public.refunds ADD CONSTRAINT big_enough CHECK (amount > 15 OR id <> 1)")
    step = next(x for x in s.plan.steps if x.key == {"id": 1} and x.table == "public.refunds")
    with pytest.raises(StepFailed) as e:
        apply(s.db, s.plan, batch_size=100)
    assert e.value.step is not None and e.value.step.n == step.n
    assert 'violates check constraint "big_enough"' in str(e.value)
    assert not s.db.ledger(s.plan.plan_id)  # the batch was rolled back as a whole
    s.db.sql("ALTER ROLE postgres PASSWORD 'sekrit-pw'")
    path = tmp_path / "plan.json"
    path.write_text(s.plan.model_dump_json())
    cfg = write_config(tmp_path, s.db)
    dsn = s.db.dsn + " password=sekrit-pw"
    r = cli("undo", "apply", str(path), "-c", str(cfg), "--dsn", dsn)
    assert r.returncode == 1
    assert f"step {step.n} (update public.refunds" in r.stderr and "big_enough" in r.stderr, r.stderr
    assert "sekrit" not in r.stderr + r.stdout and "port=" not in r.stderr + r.stdout


# --- the whole path: real Debezium events in, the undo's own events out -------------------------------------------


@pytest.fixture
def connect(kafka: LocalKafka) -> Iterator[LocalConnect]:
    worker = LocalConnect(kafka.bootstrap_servers, progress=lambda m: print(m, file=sys.stderr)).start()
    try:
        yield worker
    finally:
        worker.stop()


def test_real_debezium_events_undo_exactly_and_the_undo_reaches_cdc_signed_and_scoped(
    db: Db, kafka: LocalKafka, connect: LocalConnect, tmp_path: Path
) -> None:
    prefix = f"u{uuid.uuid4().hex[:8]}"
    slot = f"slot_{prefix}"
    connect.put_connector(
        prefix,
        debezium_postgres_config(
            hostname="127.0.0.1",
            port=db.pg.port,
            user="postgres",
            password="",
            dbname=db.name,
            topic_prefix=prefix,
            tables=["public.hostile"],
            slot_name=slot,
            publication_name=f"pub_{prefix}",
        ),
    )
    poll(
        "the replication slot active",
        lambda: db.sql("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [(True,)],
    )
    rec = Recorder(db.conn)
    nulls = {k: None for k in hostile_row(0) if k != "id"}
    with rec.transaction(None):
        rec.insert("public.hostile", hostile_row(1))
        rec.insert("public.hostile", hostile_row(2))
        rec.insert("public.hostile", {"id": 3, **nulls})
    before = db.rows("public.hostile")
    with rec.transaction("rogue"):
        db.sql('SELECT pg_logical_emit_message(true, \'writeguard\', \'{"agent_id": "rogue", "run_id": "r1"}\')')
        rec.update("public.hostile", 1, t="rogue", j='{"a":2}', jb="[]", b=b"", ts=None, n=Decimal("0.01"), f4=2.5,
                   tstz=datetime(2000, 1, 1, tzinfo=UTC), tsarr=None, **{'we"ird; col': None})  # fmt: skip
        rec.delete("public.hostile", 2)
    with rec.transaction("rogue"):
        db.sql('SELECT pg_logical_emit_message(true, \'writeguard\', \'{"agent_id": "rogue", "run_id": "r1"}\')')
        rec.update("public.hostile", 3, **{k: v for k, v in hostile_row(3).items() if k not in ("id", "big")})
        rec.insert("public.hostile", hostile_row(4))
    topics = [f"{prefix}.public.hostile", f"{prefix}.message"]
    cdc = poll("the 7 change events and 2 messages", lambda: cdc_records(kafka, topics, 9))
    events = tmp_path / "cdc.jsonl"
    events.write_text("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in cdc))
    cfg = tmp_path / "writeguard.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap.servers": kafka.bootstrap_servers},
                "tables": [{"name": "public.hostile", "topic": f"{prefix}.public.hostile"}],
                "worker": {"agent_messages": {"topic": f"{prefix}.message"}},
                "control": {"signing_key": KEY.decode()},
            }
        )
    )
    plan_path = tmp_path / "plan.json"
    r = cli("undo", "plan", "--events", str(events), "-c", str(cfg), "--agent", "rogue", "-o", str(plan_path))
    assert r.returncode == 0, r.stderr
    plan = Plan.model_validate_json(plan_path.read_bytes())
    assert sorted(x.action for x in plan.steps) == ["delete", "insert", "update", "update"]
    assert all(x.decision == "apply" for x in plan.steps), [x.conflict for x in plan.steps]
    r = cli("undo", "apply", str(plan_path), "-c", str(cfg), "--dsn", db.dsn, "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert "4 applied" in r.stdout
    assert db.rows("public.hostile") == before  # from Debezium's own JSON, every value exactly back
    # The undo's writes on CDC: two transactions, each with its signed message and its rows under one txId.
    after = poll("the undo's 4 change events and 2 messages", lambda: cdc_records(kafka, topics, 15))
    undo = after[9:]
    messages = [v for _, v in undo if v is not None and v.get("op") == "m"]
    rows = [v for _, v in undo if v is not None and v.get("op") in ("c", "u", "d")]
    assert len(messages) == 2 and len(rows) == 4
    for m in messages:
        content = base64.b64decode(m["message"]["content"])
        tx = m["source"]["txId"]
        assert verify_undo_message([KEY], content, tx) == plan.plan_id
        assert json.loads(content)["agent_id"] == "writeguard-undo"
    assert {v["source"]["txId"] for v in rows} == {m["source"]["txId"] for m in messages}
    ledger_txs = {tx for _, _, _, tx, _, _ in db.ledger(plan.plan_id)}
    assert ledger_txs == {m["source"]["txId"] for m in messages}
    # And the undo itself can be scoped (and so undone): its rows are attributed to writeguard-undo.
    events.write_text("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in after))
    r = cli("scope", "--events", str(events), "-c", str(cfg), "--agent", "writeguard-undo", "--json")
    assert r.returncode == 0, r.stderr
    scoped = json.loads(r.stdout)
    assert scoped["events_selected"] == 4 and len(scoped["rows"]) == 4
    assert {run["run_id"] for run in scoped["runs"]} == {plan.plan_id}


def cdc_records(kafka: LocalKafka, topics: list[str], expect: int) -> list[tuple[Any, Any]] | None:
    """The topics' records as (key JSON, value JSON) in commit order, once there are ``expect`` (tombstones aside)."""
    got = []
    for topic in topics:
        for key, value, _, _ in read_topic(kafka.bootstrap_servers, topic, timeout=5):
            if value is not None:
                got.append((None if key is None else json.loads(key), json.loads(value)))
    if len(got) < expect:
        return None
    got.sort(key=lambda kv: (kv[1]["source"]["txId"], kv[1]["source"]["lsn"]))
    return got


def test_an_all_or_nothing_plan_commits_nothing_when_one_step_cannot_be_applied(db: Db) -> None:
    rec = Recorder(db.conn)
    seed(db, rec)
    rogue(rec)
    specs = [REFUNDS, ORDERS]
    plan = plan_undo(build_scope(rec.events, Selection(agents=("rogue",)), specs), specs, all_or_nothing=True)
    with rec.transaction("human"):
        rec.update("public.orders", 3, total=42.0)  # unseen by the plan: its step's precondition fails
    state = {t: db.rows(t) for t in ("public.refunds", "public.orders")}
    report = apply(db, plan, batch_size=2)  # all or nothing: one transaction whatever the batch size
    assert report.rolled_back and report.batches == 1
    assert report.outcomes == {"applied": 13, "precondition_failed": 1}
    assert {t: db.rows(t) for t in state} == state and db.ledger(plan.plan_id) == []


def test_two_applies_of_one_plan_never_interleave(scenario: Scenario) -> None:
    from connectors.undo_apply import lock_keys

    s = scenario
    other = s.db.pg.connect(dbname=s.db.name, autocommit=True)
    try:
        other.execute("SELECT pg_advisory_lock(%s, %s)", lock_keys(s.plan.plan_id))  # as another apply's batch
        with pytest.raises(StepFailed, match="lock timeout"):
            apply(s.db, s.plan, lock_timeout_s=0.5)
        assert s.db.ledger(s.plan.plan_id) == []
        other.execute("SELECT pg_advisory_unlock(%s, %s)", lock_keys(s.plan.plan_id))
        assert apply(s.db, s.plan, lock_timeout_s=0.5).outcomes == {"applied": 14}
    finally:
        other.close()


def test_the_cli_dry_run_says_what_would_change_and_changes_nothing(scenario: Scenario, tmp_path: Path) -> None:
    s = scenario
    path = tmp_path / "plan.json"
    path.write_text(s.plan.model_dump_json())
    cfg = write_config(tmp_path, s.db, batch_size=3)
    state = {t: s.db.rows(t) for t in s.before}
    report = tmp_path / "report.json"
    r = cli("undo", "apply", str(path), "-c", str(cfg), "--dsn", s.db.dsn, "--dry-run", "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert "dry run, rolled back: nothing changed; 14 steps in 5 batches" in r.stdout
    assert "14 applied" in r.stdout and "public.refunds: 8 applied" in r.stdout
    assert "undo apply: 14/14 steps (100%)" in r.stderr and "rows/s" in r.stderr
    assert ApplyReport.model_validate_json(report.read_bytes()).dry_run
    assert {t: s.db.rows(t) for t in s.before} == state and not s.db.has_ledger()
