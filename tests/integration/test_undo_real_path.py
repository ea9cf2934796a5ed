"""The undo on the whole real path: PostgreSQL -> Debezium (Kafka Connect) -> Kafka -> ``writeguard scope`` /
``undo plan`` / ``undo apply`` in their own processes -> PostgreSQL again -> Debezium -> the running worker.

One stack for the module. An agent role writes over four tables in several transactions (inserts, updates,
soft-deletes, hard-deletes; hostile values; a table with REPLICA IDENTITY DEFAULT); then a human role (no agent)
writes some of the same rows. The ``story`` fixture runs the undo as an operator would, keeping what each step
showed; each test asserts one part of it. Values are compared with a copy of the tables taken before the agent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql
from psycopg.types.string import TextLoader

from detectors.engine import UNATTRIBUTED
from stream.ingest import ingest_group
from testbed.broker import LocalKafka
from testbed.process import ROOT, spawn_worker, stop_process
from testbed.stack import Stack, start_stack
from tests.integration.conftest import read_topic
from undo.models import ApplyReport, Plan, Scope

pytestmark = pytest.mark.integration

AGENT = "agent_rogue_01"  # the agent whose writes are undone
OTHER = "agent_clean_02"  # writes the sentinel after the undo
HUMAN = "ops_human"  # a person at a SQL prompt: no agent, no message
SECOND = "agent_second_03"  # another agent, undone while the worker is killed
RUN, RUN2 = "run-7", "run-8"
TABLES = ("public.refunds", "public.orders", "public.notes", "public.hostile")
EXTRA_DDL = f"""
ALTER TABLE public.orders ADD COLUMN deleted_at timestamptz;  -- a soft-delete table
-- REPLICA IDENTITY DEFAULT: an update's before image is missing, a delete's holds only the key.
CREATE TABLE public.notes (id int PRIMARY KEY, body text NOT NULL, agent_id text);
CREATE TABLE public.hostile (id int PRIMARY KEY, t text, big text, j json, jb jsonb, n numeric(12,2),
                             "we""ird; col" text, agent_id text);
ALTER TABLE public.hostile REPLICA IDENTITY FULL;
CREATE ROLE {HUMAN} LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.notes, public.hostile TO {AGENT}, {OTHER}, {SECOND};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {HUMAN};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {HUMAN};
"""
ALERT_ONLY = {"info": ["alert"], "warning": ["alert"], "critical": ["alert"]}
# 100 KB of text that quotes, escapes and leaves the Basic Multilingual Plane.
BIG = ("ünïcødé 🚀 'quoted' \"double\" \\ back; DROP TABLE x; -- \n" * 1800)[:100_000]
UNDO_AGENT = "writeguard-undo"


def edit(data: dict[str, Any]) -> None:
    """Alerts only (no REVOKE midway through the story), orders soft-deleted by deleted_at, two more tables."""
    prefix = data["debezium"]["topic.prefix"]
    data["worker"]["agent_messages"]["hold_s"] = 1.0  # a human's rows wait 1 s for a message that never comes
    for t in data["tables"]:
        t["actions"] = ALERT_ONLY
        if t["name"] == "public.orders":
            t["soft_delete"] = {"column": "deleted_at"}
    for name in ("public.notes", "public.hostile"):
        data["tables"].append(
            {
                "name": name,
                "topic": f"{prefix}.{name}",
                "detectors": [{"kind": "op_burst", "ops": ["d"], "max_events": 20, "window_seconds": 60}],
                "actions": ALERT_ONLY,
                "learning": {"writes": 0, "seconds": 0},
            }
        )


@pytest.fixture(scope="module")
def stack(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("undo-real-path"),
        [AGENT, OTHER, SECOND],
        kafka=kafka,
        progress=lambda m: print(m, file=sys.stderr),
        edit_config=edit,
        extra_ddl=EXTRA_DDL,
    )
    try:
        yield s
    finally:
        s.stop()


# --- writing like an agent and like a person ------------------------------------------------------------------


@dataclass
class Writer:
    """A session as one role; counts the change records Debezium will publish for what it wrote."""

    conn: psycopg.Connection[Any]
    agent: str | None
    ops: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    records: Counter[str] = field(default_factory=Counter)  # topic suffix -> records (a delete adds a tombstone)

    @contextmanager
    def tx(self) -> Iterator[None]:
        with self.conn.transaction():
            if self.agent is not None:
                # Rows that do not carry the agent's id (updates of rows it did not create) are named by this.
                body = json.dumps({"agent_id": self.agent, "run_id": RUN, "model": "gpt-x"})
                self.conn.execute("SELECT pg_logical_emit_message(true, 'writeguard', %s)", (body,))
                self.records["message"] += 1
            yield

    def run(self, table: str, op: str, query: str | sql.Composable, params: Any = None) -> list[int]:
        ids = [r[0] for r in self.conn.execute(query, params).fetchall()]  # type: ignore[arg-type]
        for i in ids:
            self.ops.setdefault((table, i), []).append(op)
        self.records[table] += len(ids) * (2 if op == "d" else 1)
        return ids


def session(stack: Stack, role: str, agent: str | None) -> Writer:
    conn = psycopg.connect(stack.pg.dsn(user=role, dbname="shop"), autocommit=True)
    return Writer(conn, agent)


def text_json(conn: psycopg.Connection[Any]) -> None:
    for name in ("json", "jsonb"):
        conn.adapters.register_loader(name, TextLoader)  # json's exact text, jsonb's canonical text


def snapshot(stack: Stack) -> dict[str, dict[int, tuple[Any, ...]]]:
    """Every row of the four tables by id (json and jsonb as text)."""
    with stack.pg.connect(dbname="shop") as c:
        text_json(c)
        query = sql.SQL("SELECT * FROM {} ORDER BY id")
        return {t: {row[0]: row for row in c.execute(query.format(sql.Identifier(*t.split("."))))} for t in TABLES}


def hostile(i: int) -> dict[str, Any]:
    return {
        "t": f'it\'s "{i}"; DROP TABLE hostile; -- ünï 🚀\n\ttab \\ back',
        "big": BIG,
        "j": '{"b": 1,  "a": [1, 2], "é": "\\u00e9", "i": ' + f"{i}}}",  # json keeps its text: spaces, order
        "jb": json.dumps({"nested": {"x": [None, True, 1.5]}, "quote": "'\"", "i": i}),
        "n": f"1234567890.{i:02d}",
        'we"ird; col': "'; --",
    }


HOSTILE_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, ("t", "big", "j", "jb", "n", 'we"ird; col')))
HOSTILE_VALUES = sql.SQL(", ").join(sql.Placeholder() * 6)
HOSTILE_INSERT = sql.SQL("INSERT INTO public.hostile (id, {}) VALUES (%s, {}) RETURNING id").format(
    HOSTILE_COLUMNS, HOSTILE_VALUES
)
HOSTILE_UPDATE = sql.SQL("UPDATE public.hostile SET ({}) = ROW({}) WHERE id = %s RETURNING id").format(
    HOSTILE_COLUMNS, HOSTILE_VALUES
)
SEED_REFUNDS = """INSERT INTO public.refunds (id, order_id, amount)
    SELECT g, 1000 + g, 40 + (g * 7) % 20 FROM generate_series(1, 40) g RETURNING id"""
SEED_ORDERS = """INSERT INTO public.orders (id, total, items, status)
    SELECT g, 80 + (g * 13) % 40, 1 + g % 3, 'paid' FROM generate_series(1, 20) g RETURNING id"""
SEED_NOTES = "INSERT INTO public.notes (id, body) SELECT g, 'note ' || g FROM generate_series(1, 6) g RETURNING id"
NEW_REFUND = "INSERT INTO public.refunds (order_id, amount, agent_id, run_id) VALUES (%s, %s, %s, %s) RETURNING id"
NEW_ORDER = "INSERT INTO public.orders (total, items, agent_id, run_id) VALUES (%s, 2, %s, %s) RETURNING id"


def seed(stack: Stack) -> int:
    """The rows before the agent, by the database owner; returns the records Debezium will publish."""
    w = session(stack, "postgres", None)
    try:
        with w.tx():
            w.run("public.refunds", "c", SEED_REFUNDS)
            w.run("public.orders", "c", SEED_ORDERS)
            w.run("public.notes", "c", SEED_NOTES)
            for i in (1, 2):
                w.run("public.hostile", "c", HOSTILE_INSERT, (i, *hostile(i).values()))
            w.run("public.hostile", "c", "INSERT INTO public.hostile (id) VALUES (3) RETURNING id")  # all NULL
            # The sequences past the seeded ids, for the agents' own inserts.
            w.conn.execute("SELECT setval('public.refunds_id_seq', 100), setval('public.orders_id_seq', 100)")
        return sum(w.records.values())
    finally:
        w.conn.close()


def agent_writes(w: Writer) -> None:
    """The agent's writes, several transactions over the four tables."""
    for batch in range(5):  # 25 refunds it creates, named by their agent_id column (and the message)
        with w.tx():
            for k in range(5):
                w.run("public.refunds", "c", NEW_REFUND, (2000 + batch * 5 + k, 45 + k, AGENT, RUN))
    with w.tx():  # refunds it did not create: updated, deleted (named by the message alone)
        w.run("public.refunds", "u", "UPDATE public.refunds SET amount = amount * 1.1 WHERE id <= 6 RETURNING id")
        w.run("public.refunds", "d", "DELETE FROM public.refunds WHERE id IN (7, 8, 9) RETURNING id")
    with w.tx():  # orders: created, updated
        for k in range(4):
            w.run("public.orders", "c", NEW_ORDER, (90 + k, AGENT, RUN))
        w.run(
            "public.orders", "u", "UPDATE public.orders SET total = total + 5, status = 'x' WHERE id <= 4 RETURNING id"
        )
    with w.tx():  # soft-deleted, hard-deleted
        w.run("public.orders", "u", "UPDATE public.orders SET deleted_at = now() WHERE id IN (5, 6, 7) RETURNING id")
        w.run("public.orders", "d", "DELETE FROM public.orders WHERE id = 8 RETURNING id")
    with w.tx():  # a refund it created, then changed; another created and deleted again (nothing to undo)
        w.run("public.refunds", "u", "UPDATE public.refunds SET amount = 52 WHERE id = 101 RETURNING id")
        (gone,) = w.run("public.refunds", "c", NEW_REFUND, (3000, 50, AGENT, RUN))
        w.run("public.refunds", "d", "DELETE FROM public.refunds WHERE id = %s RETURNING id", (gone,))
    with w.tx():  # REPLICA IDENTITY DEFAULT
        w.run("public.notes", "u", "UPDATE public.notes SET body = 'agent ' || id WHERE id IN (1, 2) RETURNING id")
        w.run("public.notes", "d", "DELETE FROM public.notes WHERE id = 3 RETURNING id")
        w.run("public.notes", "c", "INSERT INTO public.notes (id, body) VALUES (100, 'agent note') RETURNING id")
    with w.tx():  # hostile values in, out and over NULLs
        w.run("public.hostile", "u", HOSTILE_UPDATE, ("rogue", "short", '{"a":2}', "[]", "0.01", None, 1))
        w.run("public.hostile", "d", "DELETE FROM public.hostile WHERE id = 2 RETURNING id")
        w.run("public.hostile", "u", HOSTILE_UPDATE, (*hostile(3).values(), 3))
        w.run("public.hostile", "c", HOSTILE_INSERT, (10, *hostile(10).values()))


# The rows the human writes afterwards, and why each is a conflict.
HUMAN_CONFLICTS = {
    ("public.refunds", 1): "later_write",  # the agent updated it
    ("public.refunds", 9): "key_reused",  # the agent deleted it; the human inserts its key again
    ("public.orders", 2): "later_write",  # the agent updated it
    ("public.orders", 6): "later_write",  # the agent soft-deleted it
}


def human_writes(w: Writer) -> None:
    with w.tx():
        w.run("public.refunds", "u", "UPDATE public.refunds SET amount = 47.5 WHERE id = 1 RETURNING id")
        w.run("public.refunds", "c", "INSERT INTO public.refunds (id, order_id, amount) VALUES (9, 9, 44) RETURNING id")
        w.run("public.refunds", "u", "UPDATE public.refunds SET amount = 41 WHERE id = 30 RETURNING id")  # not its
    with w.tx():
        w.run("public.orders", "u", "UPDATE public.orders SET total = 99.5 WHERE id = 2 RETURNING id")
        w.run("public.orders", "u", "UPDATE public.orders SET status = 'review' WHERE id = 6 RETURNING id")


# --- Kafka, the CLI, the worker -------------------------------------------------------------------------------


def records(bootstrap: str, topics: list[str]) -> int:
    """Records in the topics (high minus low watermark over their partitions); 0 for a topic not there yet."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"count-{uuid.uuid4().hex}"})
    try:
        md = c.list_topics(timeout=10)
        n = 0
        for t in topics:
            meta = md.topics.get(t)
            if meta is None or meta.error is not None:
                continue
            for p in meta.partitions:
                low, high = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                n += high - low
        return n
    finally:
        c.close()


def poll(what: str, probe: Callable[[], Any], timeout: float = 90.0, log: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not seen in {timeout:.0f} s; last seen: {last!r}\n{log()}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``writeguard ...`` as an operator runs it, in its own process."""
    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    print(f"$ writeguard {' '.join(args)}\n{r.stdout[:4000]}{r.stderr[-4000:]}", file=sys.stderr)
    return r


def scope_json(stack: Stack, *selection: str) -> Scope:
    r = cli("scope", "-c", str(stack.config_path), *selection, "--json")
    assert r.returncode == 0, r.stderr
    return Scope.model_validate_json(r.stdout)


@dataclass(frozen=True)
class Counts:
    """The worker's counters of what it did with its input (writeguard_events_total, writeguard_skipped_events)."""

    scored: float
    undo: float  # rows of a signed undo transaction, skipped
    held: float  # rows that waited for their transaction's message
    messages: float

    def __sub__(self, o: Counts) -> Counts:
        return Counts(self.scored - o.scored, self.undo - o.undo, self.held - o.held, self.messages - o.messages)

    def rows(self) -> float:
        return self.scored + self.undo + self.held


def counts(stack: Stack) -> Counts:
    m = stack.worker.metrics()

    def skipped(reason: str) -> float:
        return m.get(f'writeguard_skipped_events_total{{reason="{reason}"}}', 0.0)

    scored = sum(v for k, v in m.items() if k.startswith("writeguard_events_total{"))
    return Counts(scored, skipped("undo"), skipped("awaiting_transaction_agent"), skipped("logical_message"))


def alerts(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(v) for _, v, _, _ in read_topic(stack.kafka.bootstrap_servers, stack.config.topics.alerts) if v]


def _id(key: dict[str, Any]) -> int:
    return int(key["id"])


def keys_of(rows: Any) -> set[tuple[str, int]]:
    return {(r.table, _id(r.key)) for r in rows}


# --- the story, once for the module ---------------------------------------------------------------------------


@dataclass
class Story:
    stack: Stack
    before_agent: dict[str, dict[int, tuple[Any, ...]]]
    before_apply: dict[str, dict[int, tuple[Any, ...]]]
    after_apply: dict[str, dict[int, tuple[Any, ...]]]
    after_second: dict[str, dict[int, tuple[Any, ...]]]
    agent_ops: dict[tuple[str, int], list[str]]
    scope: Scope
    plan: Plan
    report: ApplyReport
    second: ApplyReport
    second_stdout: str
    undo_scope: Scope
    agent_scope_after: Scope
    at_apply: Counts
    worker_seen: Counts
    after_sentinel: Counts
    apply_started: datetime
    alerts: list[dict[str, Any]]
    undo_positions: set[str]


@pytest.fixture(scope="module")
def story(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Story:
    tmp = tmp_path_factory.mktemp("undo-story")
    bootstrap = stack.kafka.bootstrap_servers
    prefix = stack.config.debezium.topic_prefix if stack.config.debezium else ""
    topics = [f"{prefix}.{t}" for t in TABLES] + [f"{prefix}.message"]
    log = stack.worker.log_tail

    # The replication slot streams from the connector's start: wait until it is active before writing.
    with stack.pg.connect(dbname="shop", autocommit=True) as c:
        poll(
            "Debezium's replication slot active",
            lambda: c.execute("SELECT bool_or(active) FROM pg_replication_slots").fetchone() == (True,),
        )
    expected = seed(stack)
    before_agent = snapshot(stack)
    agent = session(stack, AGENT, AGENT)
    human = session(stack, HUMAN, None)
    try:
        agent_writes(agent)
        human_writes(human)
    finally:
        agent.conn.close()
        human.conn.close()
    expected += sum(agent.records.values()) + sum(human.records.values())
    poll(f"{expected} CDC records", lambda: records(bootstrap, topics) >= expected, log=log)
    # Every row change so far is scored once (the human's after waiting for a message): c/u/d, no tombstones.
    rows_written = 40 + 20 + 6 + 3 + sum(len(v) for v in agent.ops.values()) + sum(len(v) for v in human.ops.values())
    stack.wait_events(rows_written)
    before_apply = snapshot(stack)
    at_apply = counts(stack)

    scope = scope_json(stack, "--agent", AGENT)
    plan_path = tmp / "plan.json"
    r = cli("undo", "plan", "-c", str(stack.config_path), "--agent", AGENT, "-o", str(plan_path))
    assert r.returncode == 0, r.stderr
    plan = Plan.model_validate_json(plan_path.read_bytes())
    r = cli("undo", "show", str(plan_path))
    assert r.returncode == 0, r.stderr

    dsn = stack.pg.dsn(dbname="shop")
    apply_started = datetime.now(UTC)
    first_report, second_report = tmp / "apply-1.json", tmp / "apply-2.json"
    apply = ("undo", "apply", str(plan_path), "-c", str(stack.config_path), "--dsn", dsn)
    r = cli(*apply, "--batch-size", "7", "--by", "test", "--report", str(first_report))
    assert r.returncode == 0, r.stderr
    report = ApplyReport.model_validate_json(first_report.read_bytes())
    after_apply = snapshot(stack)
    r = cli(*apply, "--report", str(second_report))
    assert r.returncode == 0, r.stderr
    second = ApplyReport.model_validate_json(second_report.read_bytes())
    after_second = snapshot(stack)

    # The undo's writes on CDC: one record per applied step (and a tombstone per delete), a message per batch.
    applied = [s for s in report.steps if s.outcome == "applied"]
    undo_records = len(applied) + sum(1 for s in applied if s.action == "delete") + report.batches
    expected += undo_records
    poll(f"the undo's {undo_records} CDC records", lambda: records(bootstrap, topics) >= expected, log=log)
    undo_scope = scope_json(stack, "--agent", UNDO_AGENT)
    agent_scope_after = scope_json(stack, "--agent", AGENT)

    # The worker has read every one of the undo's rows and messages: each row skipped, held or scored.
    def read_all() -> Counts | None:
        now = counts(stack) - at_apply
        return now if now.rows() >= len(applied) and now.messages >= report.batches else None

    seen = poll("the worker reading the undo", read_all, log=lambda: f"{counts(stack)}\n{log()}")
    with stack.agent(OTHER) as c:  # and a write after them, which it scores
        c.execute(NEW_REFUND, (1, 48, OTHER, "r"))
    stack.wait_events(at_apply.scored + seen.scored + 1)
    return Story(
        stack=stack,
        before_agent=before_agent,
        before_apply=before_apply,
        after_apply=after_apply,
        after_second=after_second,
        agent_ops=agent.ops,
        scope=scope,
        plan=plan,
        report=report,
        second=second,
        second_stdout=r.stdout,
        undo_scope=undo_scope,
        agent_scope_after=agent_scope_after,
        at_apply=at_apply,
        worker_seen=seen,
        after_sentinel=counts(stack) - at_apply,
        apply_started=apply_started,
        alerts=alerts(stack),
        undo_positions={w.position for r in undo_scope.rows for w in r.writes},
    )


# --- what each step showed -----------------------------------------------------------------------------------


def test_scope_from_kafka_lists_exactly_the_agents_rows_with_their_ops(story: Story) -> None:
    assert {(r.table, _id(r.key)): [w.op for w in r.writes] for r in story.scope.rows} == story.agent_ops
    assert all(w.agent_id == AGENT and w.run_id == RUN for r in story.scope.rows for w in r.writes)
    # The run's other metadata, from its logical decoding message.
    assert [(x.agent_id, x.run_id, x.metadata) for x in story.scope.runs] == [(AGENT, RUN, {"model": "gpt-x"})]
    assert story.scope.events_selected == sum(len(v) for v in story.agent_ops.values())


def test_the_plan_marks_the_rows_a_human_wrote_afterwards_as_conflicts_by_no_agent(story: Story) -> None:
    conflicts = {(s.table, _id(s.key)): s.conflict for s in story.plan.steps if s.conflict is not None}
    human = {k: c for k, c in conflicts.items() if k[0] != "public.notes"}
    assert {k: c.reason for k, c in human.items()} == HUMAN_CONFLICTS
    assert {c.writer for c in human.values()} == {UNATTRIBUTED}
    assert all(s.decision == "conflict" for s in story.plan.steps if s.conflict is not None)
    assert all(s.decision == "apply" for s in story.plan.steps if s.conflict is None)


def test_apply_brings_every_other_row_back_and_the_human_keeps_the_humans_values(story: Story) -> None:
    before, now, human = story.before_agent, story.after_apply, story.before_apply
    created = {k for k, ops in story.agent_ops.items() if ops[0] == "c"}
    for table in ("public.refunds", "public.orders"):
        conflicted = {i for t, i in HUMAN_CONFLICTS if t == table}
        for i, row in before[table].items():
            if i in conflicted or (table == "public.refunds" and i == 30):
                assert now[table][i] == human[table][i], (table, i)  # the human's write stays
            else:
                assert now[table].get(i) == row, (table, i)  # as before the agent
        extra = {i: r for i, r in now[table].items() if i not in before[table] and (table, i) not in HUMAN_CONFLICTS}
        mine = {i for t, i in created if t == table and i in human[table]}
        if table == "public.refunds":
            assert extra == {}, extra  # what the agent created is deleted
        else:
            # A soft-delete table: what the agent created is soft-deleted, its values otherwise the agent's.
            assert set(extra) == mine and len(mine) == 4
            deleted_at = len(now[table][min(mine)]) - 1
            for i in mine:
                assert now[table][i][deleted_at] is not None
                assert now[table][i][:deleted_at] == human[table][i][:deleted_at]
    assert story.report.outcomes == {
        "applied": sum(1 for s in story.plan.steps if s.conflict is None),
        "conflict": sum(1 for s in story.plan.steps if s.conflict is not None),
    }


def test_a_second_apply_changes_nothing(story: Story) -> None:
    assert story.after_second == story.after_apply
    applied = story.report.outcomes["applied"]
    assert story.second.outcomes == {"already_applied": applied, "conflict": story.report.outcomes["conflict"]}
    assert f"{applied:,} already_applied" in story.second_stdout


def test_a_table_without_replica_identity_full_yields_before_incomplete_never_a_wrong_restore(story: Story) -> None:
    notes = {_id(s.key): s for s in story.plan.steps if s.table == "public.notes"}
    assert {i: s.conflict.reason if s.conflict else None for i, s in notes.items()} == {
        1: "before_incomplete",
        2: "before_incomplete",
        3: "before_incomplete",
        100: None,  # an insert's after image is whole: its delete is safe
    }
    assert notes[100].action == "delete"
    # The updated and deleted notes keep what the agent left; only the note it created is gone.
    expect = {i: row for i, row in story.before_apply["public.notes"].items() if i != 100}
    assert story.after_apply["public.notes"] == expect


def test_hostile_values_written_by_the_agent_and_undone_round_trip_exactly_through_debezium(story: Story) -> None:
    assert story.after_apply["public.hostile"] == story.before_agent["public.hostile"]
    with story.stack.pg.connect(dbname="shop") as c:
        got = c.execute("SELECT id, j::text, md5(big) FROM public.hostile ORDER BY id").fetchall()
        md5 = c.execute("SELECT md5(%s)", (BIG,)).fetchone()
    assert md5 is not None
    assert got == [(1, hostile(1)["j"], md5[0]), (2, hostile(2)["j"], md5[0]), (3, None, None)]


def _undo_rows(story: Story) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """The applied steps' rows: (all of them, those whose images name the agent in their agent_id column)."""
    applied = {(s.table, _id(s.key)) for s in story.report.steps if s.outcome == "applied"}
    created = {k for k, ops in story.agent_ops.items() if ops[0] == "c" and k[0] in ("public.refunds", "public.orders")}
    return applied, applied & created


def test_the_undos_writes_reach_cdc_and_scope_finds_them_as_writeguard_undo(story: Story) -> None:
    applied, column_named = _undo_rows(story)
    found = keys_of(story.undo_scope.rows)
    assert applied - column_named <= found <= applied
    assert {x.run_id for x in story.undo_scope.runs} == {story.plan.plan_id}
    assert all(w.agent_id == UNDO_AGENT and w.tx_id for r in story.undo_scope.rows for w in r.writes)


def test_an_undo_row_whose_image_names_the_agent_is_the_undos_not_the_agents(story: Story) -> None:
    applied, _ = _undo_rows(story)
    assert keys_of(story.undo_scope.rows) == applied
    # The agent's scope read again after the undo: the same rows and ops, nothing of the undo taken for the agent's.
    after = {(r.table, _id(r.key)): [w.op for w in r.writes] for r in story.agent_scope_after.rows}
    assert after == story.agent_ops


def test_the_worker_recognises_every_undo_transaction_and_raises_no_alert_on_it(story: Story) -> None:
    # Each batch's signed message read (and a second apply's, for its batches with conflicts to record again) ...
    assert story.worker_seen.messages >= story.report.batches and story.worker_seen.undo > 0
    assert story.after_sentinel.scored >= 1  # it went past the undo: the sentinel after it is scored
    late = [a for a in story.alerts if datetime.fromisoformat(a["commit_ts"]) >= story.apply_started]
    assert late == []


# Known gap, not tested here because it is a race (a non-strict xfail could never fail): a row of an undo
# transaction that names an agent and reaches the worker before its transaction's message, on another topic, is
# scored as that agent's (1 to 4 of 47 rows measured), and a restarted worker forgets the undo transactions it
# saw. The README's "Undoing what an agent wrote" says so; the tests above check that no alert comes of it.


# --- the worker killed while an undo is applied ---------------------------------------------------------------


def caught_up(stack: Stack) -> dict[str, int] | None:
    """None once the worker's groups have committed every partition of their inputs up to the end, i.e. read and
    scored all of it: the CDC topics and the messages topic (``<group.id>.ingest``), its own changes topic
    (``group.id``); else how far behind each one is."""
    cfg = stack.config
    prefix = cfg.debezium.topic_prefix if cfg.debezium else ""
    behind = {}
    for group, topics in (
        (ingest_group(cfg), [t.topic for t in cfg.tables] + [f"{prefix}.message"]),
        (cfg.kafka.group_id, [cfg.topics.changes]),
    ):
        c = Consumer({"bootstrap.servers": stack.kafka.bootstrap_servers, "group.id": group})
        try:
            md = c.list_topics(timeout=10)
            parts = [TopicPartition(t, p) for t in topics if t in md.topics for p in md.topics[t].partitions]
            for tp in c.committed(parts, timeout=10):
                high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)[1]
                if high > max(tp.offset, 0):
                    behind[f"{tp.topic}/{tp.partition}"] = high - max(tp.offset, 0)
        finally:
            c.close()
    return behind or None


@dataclass
class Restarted:
    plan: Plan
    report: ApplyReport
    undo_started: datetime
    applied_before_kill: int
    alerts: list[dict[str, Any]]
    seen: Counts  # by the restarted worker


@pytest.fixture(scope="module")
def restarted(story: Story, tmp_path_factory: pytest.TempPathFactory) -> Restarted:
    """A second agent's run, undone while the worker is SIGKILLed; the worker restarted from its committed offsets."""
    stack = story.stack
    tmp = tmp_path_factory.mktemp("undo-restart")
    base = counts(stack).scored
    w = session(stack, SECOND, SECOND)
    try:
        for batch in range(3):
            with w.tx():
                for k in range(10):
                    w.run("public.refunds", "c", NEW_REFUND, (4000 + batch * 10 + k, 44 + k % 5, SECOND, RUN2))
        with w.tx():
            w.run("public.refunds", "u", "UPDATE public.refunds SET amount = amount + 1 WHERE id > 30 AND id <= 35 "
                  "RETURNING id")  # fmt: skip
    finally:
        w.conn.close()
    stack.wait_events(base + sum(len(v) for v in w.ops.values()))
    poll("the worker caught up before the undo", lambda: caught_up(stack) is None, log=stack.worker.log_tail)
    plan_path = tmp / "plan.json"
    r = cli("undo", "plan", "-c", str(stack.config_path), "--agent", SECOND, "-o", str(plan_path))
    assert r.returncode == 0, r.stderr
    plan = Plan.model_validate_json(plan_path.read_bytes())
    report_path = tmp / "apply.json"
    undo_started = datetime.now(UTC)
    cmd = [sys.executable, "-m", "stream.cli", "undo", "apply", str(plan_path), "-c", str(stack.config_path),
           "--dsn", stack.pg.dsn(dbname="shop"), "--batch-size", "1", "--report", str(report_path)]  # fmt: skip
    # Another session holds the row of the plan's middle step: the apply commits the steps before it, one batch
    # each, then waits for the row. The worker is killed then, and the row let go.
    middle = plan.steps[len(plan.steps) // 2]
    blocker = stack.pg.connect(dbname="shop")
    blocker.execute("SELECT 1 FROM public.refunds WHERE id = %s FOR UPDATE", (middle.key["id"],))
    apply = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with stack.pg.connect(dbname="shop", autocommit=True) as c:

            def applied() -> int:
                row = c.execute(
                    "SELECT count(*) FROM writeguard.undo_ledger WHERE plan_id = %s AND outcome = 'applied'",
                    (plan.plan_id,),
                ).fetchone()
                return int(row[0]) if row else 0

            poll("the undo up to its middle step", lambda: applied() >= middle.n - 1 or apply.poll() is not None)
            stop_process(stack.worker.proc, sig=signal.SIGKILL)
            before_kill = applied()
        blocker.rollback()
        out, err = apply.communicate(timeout=120)
        print(out, err, file=sys.stderr)
    finally:
        blocker.close()
        if apply.poll() is None:
            apply.kill()
            apply.wait()
    assert apply.returncode == 0, err
    workdir = stack.config_path.parent
    shutil.copy(workdir / "worker.log", workdir / "worker-killed.log")
    stack.worker = spawn_worker(stack.config_path, workdir, loglevel="info")
    with stack.agent(OTHER) as c:  # a write after the undo
        c.execute(NEW_REFUND, (2, 47, OTHER, "r"))
    poll("the restarted worker caught up", lambda: caught_up(stack) is None, log=stack.worker.log_tail)
    return Restarted(
        plan=plan,
        report=ApplyReport.model_validate_json(report_path.read_bytes()),
        undo_started=undo_started,
        applied_before_kill=before_kill,
        alerts=alerts(stack),
        seen=counts(stack),
    )


def test_an_undo_applied_while_the_worker_is_killed_raises_no_alert_after_its_restart(restarted: Restarted) -> None:
    r = restarted
    assert r.report.outcomes == {"applied": len(r.plan.steps)} and len(r.plan.steps) == 35
    assert r.applied_before_kill == len(r.plan.steps) // 2  # killed in the middle of the undo
    assert r.seen.scored >= 1  # the restarted worker went past the undo: the write after it was scored
    late = [a for a in r.alerts if datetime.fromisoformat(a["commit_ts"]) >= r.undo_started]
    assert late == []


def _pos(t: dict[str, Any]) -> str:
    return f"{t.get('topic')}/{t.get('partition')}/{t.get('offset')}"
