"""``writeguard restore`` on the real path: PostgreSQL -> Debezium (snapshot.mode=initial) -> Kafka -> restore.

An agent's own role writes rows of a watched table it owns, then runs ``TRUNCATE`` and ``DROP TABLE`` (no guard
rails). ``writeguard restore``, run as an operator runs it, rebuilds the table from its topic (a snapshot, the
agent's inserts, updates and deletes, the truncate, over three partitions) into a new table, and the rows equal a
copy taken just before the TRUNCATE; a second run changes nothing; a hostile target name is quoted; once the
table exists again, the rows go back into it with its own column types. A topic whose start was deleted by
retention is refused with exit 2 and the settings that would have kept it restorable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg import sql

from testbed.broker import LocalKafka
from testbed.process import ROOT
from testbed.stack import Stack, start_stack

pytestmark = pytest.mark.integration

AGENT = "agent_rogue_07"
TABLE = "public.ledger"
# Column types whose Debezium JSON infers back to the same type when the original is gone (bigint, double,
# text, boolean, jsonb), and a numeric and a timestamptz that only the catalog path restores as themselves.
DDL = """
CREATE TABLE public.ledger (id bigint PRIMARY KEY, amount double precision, note text, paid boolean, tags jsonb);
ALTER TABLE public.ledger REPLICA IDENTITY FULL;
"""
EXTRA_DDL = DDL + f"""
ALTER TABLE public.ledger OWNER TO {AGENT};
INSERT INTO public.ledger SELECT i, i * 1.5, 'seeded ' || i || ' ünï ''q'' "d"', i % 2 = 0, jsonb_build_array(i)
  FROM generate_series(1, 40) i;
"""
HOSTILE_INTO = 'public.réstored "x"; tbl'
SEEDED = 40


def edit(data: dict[str, Any]) -> None:
    data["debezium"]["snapshot.mode"] = "initial"  # the topic starts with a snapshot of the seeded rows
    prefix = data["debezium"]["topic.prefix"]
    data["tables"].append(
        {
            "name": TABLE,
            "topic": f"{prefix}.{TABLE}",
            "detectors": [{"kind": "op_burst", "ops": ["d"], "max_events": 1000, "window_seconds": 60}],
            "actions": {"info": ["alert"], "warning": ["alert"], "critical": ["alert"]},
            "learning": {"writes": 0, "seconds": 0},
        }
    )


@pytest.fixture(scope="module")
def stack(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("restore"),
        [AGENT],
        kafka=kafka,
        progress=lambda m: print(m, file=sys.stderr),
        edit_config=edit,
        extra_ddl=EXTRA_DDL,
    )
    try:
        yield s
    finally:
        s.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    print(f"$ writeguard {' '.join(args)}\n{r.stdout[-4000:]}{r.stderr[-4000:]}", file=sys.stderr)
    return r


def records(bootstrap: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"count-{uuid.uuid4().hex}"})
    try:
        meta = c.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0
        marks = [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in meta.partitions]
        return sum(hi - lo for lo, hi in marks)
    finally:
        c.close()


def poll(what: str, probe: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not seen in {timeout:.0f} s; last seen: {last!r}")


def rows_of(stack: Stack, name: str) -> list[tuple[Any, ...]]:
    schema, _, table = name.partition(".")
    with stack.pg.connect(dbname="shop") as c:
        q = sql.SQL("SELECT id, amount, note, paid, tags FROM {} ORDER BY id").format(sql.Identifier(schema, table))
        return [tuple(r) for r in c.execute(q)]


@dataclass
class Story:
    before_truncate: list[tuple[Any, ...]]
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    report: dict[str, Any]
    second_report: dict[str, Any]
    dsn: str


@pytest.fixture(scope="module")
def story(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Story:
    topic = next(t.topic for t in stack.config.tables if t.name == TABLE)
    bootstrap = stack.kafka.bootstrap_servers
    poll("the snapshot of the seeded rows", lambda: records(bootstrap, topic) >= SEEDED)
    expected = SEEDED
    with psycopg.connect(stack.pg.dsn(user=AGENT, dbname="shop"), autocommit=True) as agent:
        for i in range(41, 61):
            agent.execute(
                "INSERT INTO public.ledger VALUES (%s, %s, %s, %s, %s::jsonb)",
                (i, i / 4, f"agent row {i} 🚀 'x'", True, json.dumps({"i": i, "s": "ü"})),
            )
        expected += 20
        agent.execute("UPDATE public.ledger SET amount = amount + 100, note = note || ' (upd)' WHERE id % 3 = 0")
        expected += 20  # ids 3, 6, ..., 60
        agent.execute("DELETE FROM public.ledger WHERE id % 7 = 0")
        expected += 2 * 8  # a delete and its tombstone: ids 7, 14, ..., 56
        poll("the agent's writes on the topic", lambda: records(bootstrap, topic) >= expected)
        before = rows_of(stack, TABLE)
        agent.execute("TRUNCATE public.ledger")
        expected += 1
        poll("the truncate on the topic", lambda: records(bootstrap, topic) >= expected)
        agent.execute("DROP TABLE public.ledger")
    tmp = tmp_path_factory.mktemp("restore-reports")
    dsn = stack.pg.dsn(dbname="shop")
    common = ("restore", "-c", str(stack.config_path), "--table", TABLE, "--dsn", dsn, "--batch-size", "7")
    first = cli(*common, "--into", "public.ledger_restored", "--report", str(tmp / "1.json"))
    second = cli(*common, "--into", "public.ledger_restored", "--report", str(tmp / "2.json"))
    return Story(
        before,
        first,
        second,
        json.loads((tmp / "1.json").read_text()) if first.returncode == 0 else {},
        json.loads((tmp / "2.json").read_text()) if second.returncode == 0 else {},
        dsn,
    )


def test_restore_rebuilds_the_dropped_table_from_kafka_equal_to_a_copy_taken_before_the_truncate(
    stack: Stack, story: Story
) -> None:
    assert story.first.returncode == 0, story.first.stderr
    assert len(story.before_truncate) == SEEDED + 20 - 8
    assert rows_of(stack, "public.ledger_restored") == story.before_truncate
    r = story.report
    assert r["created"] is True and r["cut"] == "before_truncate" and r["types_from"] == "inferred"
    assert r["rows"] == r["rows_inserted"] == len(story.before_truncate)
    assert r["ops"]["r"] == SEEDED and r["ops"]["c"] == 20 and r["ops"]["u"] == 20 and r["ops"]["d"] == 8
    assert r["unrestorable"] == {}
    assert "stopped just before the truncate" in story.first.stderr


def test_a_second_restore_changes_nothing(stack: Stack, story: Story) -> None:
    assert story.second.returncode == 0, story.second.stderr
    assert "0 rows changed" in story.second.stdout
    r = story.second_report
    assert r["rows_changed"] == 0 and r["rows_equal"] == len(story.before_truncate) and r["created"] is False
    assert rows_of(stack, "public.ledger_restored") == story.before_truncate


def test_a_hostile_target_name_is_quoted(stack: Stack, story: Story) -> None:
    r = cli("restore", "-c", str(stack.config_path), "--table", TABLE, "--dsn", story.dsn, "--into", HOSTILE_INTO)
    assert r.returncode == 0, r.stderr
    assert rows_of(stack, HOSTILE_INTO) == story.before_truncate
    with stack.pg.connect(dbname="shop") as c:
        assert c.execute("SELECT to_regclass('public.ledger_restored') IS NOT NULL").fetchone() == (True,)


def test_the_rows_go_back_into_the_original_table_once_it_exists_again(stack: Stack, story: Story) -> None:
    with stack.pg.connect(dbname="shop", autocommit=True) as c:
        c.execute(DDL)
    r = cli("restore", "-c", str(stack.config_path), "--table", TABLE, "--dsn", story.dsn, "--into", TABLE)
    assert r.returncode == 0, r.stderr
    assert f"restored {len(story.before_truncate)} rows" in r.stdout and "types from catalog:public.ledger" in r.stdout
    assert rows_of(stack, TABLE) == story.before_truncate
    again = cli("restore", "-c", str(stack.config_path), "--table", TABLE, "--dsn", story.dsn, "--into", TABLE)
    assert again.returncode == 0 and "0 rows changed" in again.stdout, again.stderr


def test_a_topic_whose_start_was_deleted_by_retention_is_refused_with_the_settings_that_keep_it(
    stack: Stack, tmp_path: Path
) -> None:
    bootstrap = stack.kafka.bootstrap_servers
    assert stack.config.debezium is not None
    name = f"gone_{uuid.uuid4().hex[:6]}"
    topic = f"{stack.config.debezium.topic_prefix}.public.{name}"
    stack.kafka.create_topics({topic: 1})
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(10):
        op = "r" if i < 5 else "c"
        marker = {0: "first", 4: "last"}.get(i, "true") if op == "r" else "false"
        value = {"op": op, "before": None, "after": {"id": i, "n": i},
                 "source": {"schema": "public", "table": name, "ts_us": 1_000 + i, "snapshot": marker}}  # fmt: skip
        p.produce(topic, key=json.dumps({"id": i}).encode(), value=json.dumps(value).encode())
    assert p.flush(30) == 0
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deleted = admin.delete_records([TopicPartition(topic, 0, 6)])
    for f in deleted.values():
        f.result(timeout=30)
    data = yaml.safe_load(stack.config_path.read_text())
    entry = dict(next(t for t in data["tables"] if t["name"] == TABLE))
    entry.update(name=f"public.{name}", topic=topic)
    data["tables"].append(entry)
    cfg = tmp_path / "gone.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    r = cli("restore", "-c", str(cfg), "--table", f"public.{name}", "--dsn", stack.pg.dsn(dbname="shop"))
    assert r.returncode == 2, r.stderr
    assert f"no longer holds the whole history of public.{name}" in r.stderr
    assert "offsets before 6 were deleted" in r.stderr and f"{topic}/0/6" in r.stderr
    assert "retention.ms=-1" in r.stderr and "cleanup.policy=compact" in r.stderr
    assert "snapshot.mode=initial" in r.stderr and "Nothing was written" in r.stderr
    with stack.pg.connect(dbname="shop") as c:
        assert c.execute("SELECT to_regclass(%s)", (f"public.{name}_restored",)).fetchone() == (None,)
