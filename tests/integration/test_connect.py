"""The real Debezium PostgreSQL connector on a real Kafka Connect worker, end to end.

PostgreSQL (wal_level=logical) -> Debezium (pgoutput) in LocalConnect -> LocalKafka -> confluent-kafka
-> connectors.debezium.decode.  Pins what writeguard relies on: c/u/d/t events with full before/after
images (REPLICA IDENTITY FULL), NUMERIC as JSON numbers, logical decoding messages (op m) carrying the
same transaction id as the rows written in their transaction, rows keyed by agent_id, and every commit
arriving once, in order, with its op and values.  Run with ``-s`` to see the commit -> Kafka latency
figures (printed, never asserted) and the raw m and t events.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Message

from connectors.debezium import ChangeEvent, decode
from connectors.debezium_connector import debezium_postgres_config
from testbed.broker import LocalKafka
from testbed.connect import ConnectError, LocalConnect, resolve_connect_jars
from testbed.postgres import LocalPostgres, PostgresError, find_pg_bin
from tests.integration.conftest import process_group_exists

pytestmark = pytest.mark.integration

TABLE = "public.refunds"
SLOT = "writeguard_test"
CONNECTOR = "writeguard refunds"  # a space, so the URL quoting is exercised
TX_MESSAGE = '{"agent_id":"a1","run_id":"r1"}'


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@pytest.fixture(scope="module", autouse=True)
def _needs_tools() -> None:
    """Java, Maven and PostgreSQL are required (scripts/system-deps installs them): missing, the tests fail."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"LocalConnect needs {', '.join(missing)} on PATH: run scripts/system-deps")
    try:
        find_pg_bin()
    except PostgresError as exc:
        pytest.fail(f"{exc} (scripts/system-deps installs it)")


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    server = LocalPostgres(progress=_say).start()
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE public.refunds (id serial PRIMARY KEY, amount numeric(12,2), agent_id text, run_id text)"
            )
            # Full before images on update and delete; the default (primary key) gives before=null
            # on update and only the id on delete.
            conn.execute("ALTER TABLE public.refunds REPLICA IDENTITY FULL")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def connect(kafka: LocalKafka) -> Iterator[LocalConnect]:
    started = time.monotonic()
    resolve_connect_jars(progress=_say)
    _say(f"Connect jars resolved (warm) in {time.monotonic() - started:.3f}s")
    worker = LocalConnect(kafka.bootstrap_servers, progress=_say)
    with pytest.raises(ConnectError):
        _ = worker.rest_url  # not started yet: must not silently point anywhere
    started = time.monotonic()
    worker.start()
    _say(f"Connect start -> ready in {time.monotonic() - started:.1f}s at {worker.rest_url}")
    try:
        yield worker
    finally:
        worker.stop()


@dataclass
class Cdc:
    pg: LocalPostgres
    connect: LocalConnect
    bootstrap: str
    prefix: str

    @property
    def table_topic(self) -> str:
        return f"{self.prefix}.{TABLE}"

    @property
    def message_topic(self) -> str:
        return f"{self.prefix}.message"

    def consumer(self) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"wg-connect-test-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([self.table_topic, self.message_topic])
        return consumer


def _wait_slot_active(dsn: str, slot: str, timeout: float = 30.0) -> None:
    """RUNNING is not streaming yet: the WAL sender is attached once the slot is active."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is not None and row[0]:
                return
            time.sleep(0.05)
    raise AssertionError(f"replication slot {slot} not active after {timeout}s")


@pytest.fixture(scope="module")
def cdc(kafka: LocalKafka, pg: LocalPostgres, connect: LocalConnect) -> Iterator[Cdc]:
    prefix = f"wg{uuid.uuid4().hex[:6]}"
    state = Cdc(pg, connect, kafka.bootstrap_servers, prefix)
    # Created up front so consumers can subscribe before the first event (Connect would
    # otherwise rely on the broker auto-creating them on first produce).
    kafka.create_topics({state.table_topic: 1, state.message_topic: 1})
    config = debezium_postgres_config(
        hostname=pg.host,
        port=pg.port,
        user="postgres",
        password="",
        dbname="postgres",
        topic_prefix=prefix,
        tables=[TABLE],
        slot_name=SLOT,
        publication_name="writeguard_test",
        key_columns={TABLE: "agent_id"},
    )
    assert config["message.key.columns"] == "public.refunds:agent_id"
    started = time.monotonic()
    connect.put_connector(CONNECTOR, config)
    running = time.monotonic() - started
    _wait_slot_active(pg.dsn(), SLOT)
    _say(
        f"connector create -> RUNNING in {running:.2f}s, -> replication slot active in "
        f"{time.monotonic() - started:.2f}s"
    )
    status = connect.status(CONNECTOR)
    assert status["connector"]["state"] == "RUNNING"
    assert [t["state"] for t in status["tasks"]] == ["RUNNING"]
    yield state
    if connect.running:  # test_stop_leaves_nothing_behind stops the worker
        connect.delete_connector(CONNECTOR)


def _poll_until(consumer: Consumer, done: Any, timeout: float = 60.0) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        assert time.monotonic() < deadline, f"timed out; got {[(m.topic(), m.value()) for m in got]}"
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        got.append(msg)
    return got


def test_change_events_truncate_and_logical_message(cdc: Cdc) -> None:
    with psycopg.connect(cdc.pg.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO public.refunds (amount, agent_id, run_id) VALUES (12.50, 'a1', 'r1')")
        conn.execute("UPDATE public.refunds SET amount = 99.99 WHERE id = 1")
        with conn.transaction():
            conn.execute("INSERT INTO public.refunds (amount, agent_id, run_id) VALUES (7, 'a1', 'r1')")
            conn.execute("SELECT pg_logical_emit_message(true, 'writeguard', %s)", (TX_MESSAGE,))
            row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert row is not None
            xid = row[0]
        conn.execute("SELECT pg_logical_emit_message(false, 'writeguard', 'outside any transaction')")
        conn.execute("DELETE FROM public.refunds WHERE id = 1")
        conn.execute("TRUNCATE public.refunds")

    consumer = cdc.consumer()
    try:

        def done(got: list[Message]) -> bool:
            ops = [decode(m.value()) for m in got]
            n_m = sum(isinstance(e, ChangeEvent) and e.op == "m" for e in ops)
            return n_m == 2 and any(isinstance(e, ChangeEvent) and e.op == "t" for e in ops)

        got = _poll_until(consumer, done)
    finally:
        consumer.close()

    rows = [m for m in got if m.topic() == cdc.table_topic]
    messages = [m for m in got if m.topic() == cdc.message_topic]
    decoded = [decode(m.value()) for m in rows]
    summary = [e.op if isinstance(e, ChangeEvent) else type(e).__name__.lower() for e in decoded]
    assert summary == ["c", "u", "c", "d", "tombstone", "t"], summary

    c1, u1, c2, d1, _, t1 = decoded
    assert isinstance(c1, ChangeEvent) and isinstance(u1, ChangeEvent)
    assert isinstance(c2, ChangeEvent) and isinstance(d1, ChangeEvent) and isinstance(t1, ChangeEvent)
    assert c1.before is None and c1.after == {"id": 1, "amount": 12.5, "agent_id": "a1", "run_id": "r1"}
    assert u1.before == c1.after and u1.after == {**c1.after, "amount": 99.99}
    assert c2.after == {"id": 2, "amount": 7.0, "agent_id": "a1", "run_id": "r1"}
    assert d1.before == u1.after and d1.after is None
    for event in (c1, u1, c2):
        assert event.after is not None and type(event.after["amount"]) is float  # decimal.handling.mode=double
    assert t1.before is None and t1.after is None
    assert (t1.schema, t1.table) == ("public", "refunds")
    for event in (c1, u1, c2, d1, t1):
        assert event.tx_id is not None and event.tx_id.isdigit() and event.lsn is not None and not event.snapshot
    assert c2.tx_id == xid
    # message.key.columns: rows keyed by agent_id (the tombstone too); a truncate has no row, so no key.
    assert [json.loads(m.key()) for m in rows[:5]] == [{"agent_id": "a1"}] * 5
    assert rows[5].key() is None

    tx_msg, plain_msg = (decode(m.value()) for m in messages)
    assert isinstance(tx_msg, ChangeEvent) and isinstance(plain_msg, ChangeEvent)
    assert tx_msg.op == "m" and tx_msg.message_prefix == "writeguard"
    assert tx_msg.message_content is not None and json.loads(tx_msg.message_content) == {
        "agent_id": "a1",
        "run_id": "r1",
    }
    assert tx_msg.tx_id == c2.tx_id == xid, (tx_msg.tx_id, c2.tx_id, xid)
    assert tx_msg.commit_ts_us == c2.commit_ts_us  # source.ts_* is the commit time of the transaction
    assert (tx_msg.schema, tx_msg.table) == (None, None)  # Debezium sends "" for both
    assert plain_msg.message_content == b"outside any transaction" and plain_msg.tx_id is None
    assert json.loads(messages[0].key()) == {"prefix": "writeguard"}  # m events are keyed by prefix

    raw_m = json.loads(messages[0].value())
    raw_row = json.loads(rows[2].value())
    # Without provide.transaction.metadata the envelope carries "transaction": null.
    assert raw_m["source"]["txId"] == raw_row["source"]["txId"] == int(xid)
    _say("raw m event (transactional):    " + messages[0].value().decode())
    _say("raw m event (non-transactional): " + messages[1].value().decode())
    _say("raw row event in the same tx:   " + rows[2].value().decode())
    _say("raw t event:                    " + rows[5].value().decode())


def test_every_commit_arrives_once_in_commit_order_with_its_op_and_values(cdc: Cdc) -> None:
    """Single-row commits, one at a time, each awaited on Kafka before the next: every committed row change
    reaches its topic exactly once, in commit order for its key, with the op and the row images committed.

    The commit -> Debezium -> Kafka -> consumer figures are printed (run with ``-s``), never asserted:
    speed belongs to benchmarks/bench_postgres.py.
    """
    agent = f"seq-{uuid.uuid4().hex[:6]}"  # message.key.columns keys rows by agent_id: one key for this test
    key = {"agent_id": agent}
    consumer = cdc.consumer()
    mine: list[tuple[Message, float]] = []  # this test's records on the table topic, with when they arrived
    expected: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = []

    sentinel = {"agent_id": f"{agent}-end"}
    seen_sentinel: list[Message] = []

    def await_all(timeout: float = 60.0, *, until_sentinel: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while len(mine) < len(expected) or (until_sentinel and not seen_sentinel):
            assert time.monotonic() < deadline, (
                f"{len(mine)} of {len(expected)} changes arrived in {timeout:.0f} s (sentinel: {bool(seen_sentinel)}); "
                f"got {[(m.offset(), m.value()) for m, _ in mine]}, expected {expected}"
            )
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            if msg.topic() != cdc.table_topic or msg.key() is None:
                continue
            if json.loads(msg.key()) == key:
                mine.append((msg, time.time()))
            elif json.loads(msg.key()) == sentinel:
                seen_sentinel.append(msg)

    try:
        with psycopg.connect(cdc.pg.dsn(), autocommit=True) as conn:
            rows: dict[int, dict[str, Any]] = {}
            for i in range(8):
                amount, run = round(10 + i * 1.25, 2), f"r{i}"
                row = conn.execute(
                    "INSERT INTO public.refunds (amount, agent_id, run_id) VALUES (%s, %s, %s) RETURNING id",
                    (amount, agent, run),
                ).fetchone()
                assert row is not None
                rows[row[0]] = {"id": row[0], "amount": amount, "agent_id": agent, "run_id": run}
                expected.append(("c", None, rows[row[0]]))
                await_all()
            ids = sorted(rows)
            for n, rid in enumerate([ids[2], ids[5], ids[2]]):  # the same row twice: order per key matters
                amount = round(rows[rid]["amount"] * 2 + n, 2)
                conn.execute("UPDATE public.refunds SET amount = %s WHERE id = %s", (amount, rid))
                expected.append(("u", rows[rid], {**rows[rid], "amount": amount}))
                rows[rid] = {**rows[rid], "amount": amount}
                await_all()
            for rid in (ids[2], ids[7]):
                conn.execute("DELETE FROM public.refunds WHERE id = %s", (rid,))
                expected += [("d", rows.pop(rid), None), ("tombstone", None, None)]
                await_all()
            # A later commit under another key: once it has arrived, a duplicate or stray record for this
            # key (the topic has one partition, in commit order) would have arrived before it, into `mine`.
            conn.execute(
                "INSERT INTO public.refunds (amount, agent_id, run_id) VALUES (1, %s, 'end')", (sentinel["agent_id"],)
            )
            await_all(until_sentinel=True)
    finally:
        consumer.close()

    decoded = [decode(m.value()) for m, _ in mine]
    got = [
        (e.op, e.before, e.after) if isinstance(e, ChangeEvent) else (type(e).__name__.lower(), None, None)
        for e in decoded
    ]
    assert got == expected
    events = [e for e in decoded if isinstance(e, ChangeEvent)]
    assert all(e.lsn is not None and e.tx_id is not None and not e.snapshot for e in events)
    lsns = [e.lsn for e in events if e.lsn is not None]
    assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns), lsns  # commit order, each change once
    assert len({e.tx_id for e in events}) == len(events)  # one commit each
    commits = [e.commit_ts_us for e in events]
    assert commits == sorted(commits), commits
    offsets = [m.offset() for m, _ in mine]
    assert all(o is not None for o in offsets) and len({m.partition() for m, _ in mine}) == 1, offsets
    assert offsets == sorted(o for o in offsets if o is not None), offsets

    # Figures only, printed: commit (source.ts_us) -> Debezium built the event -> Kafka record -> consumed.
    samples: list[tuple[float, float, float]] = []
    for (msg, consumed_s), event in zip(mine, decoded, strict=True):
        if isinstance(event, ChangeEvent):
            envelope_us = json.loads(msg.value())["ts_us"]
            _, kafka_ms = msg.timestamp()  # producer CreateTime
            samples.append(
                (
                    (envelope_us - event.commit_ts_us) / 1000,
                    (kafka_ms * 1000 - event.commit_ts_us) / 1000,
                    (consumed_s * 1e6 - event.commit_ts_us) / 1000,
                )
            )

    def fmt(values: list[float]) -> str:
        return f"median {statistics.median(values):.0f} ms, max {max(values):.0f} ms"

    _say(
        f"commit -> Debezium event {fmt([s[0] for s in samples])}; -> Kafka record {fmt([s[1] for s in samples])}; "
        f"-> consumed {fmt([s[2] for s in samples])} (not asserted)"
    )


def test_rejected_config_failed_task_and_delete(cdc: Cdc) -> None:
    bad = debezium_postgres_config(
        hostname="127.0.0.1",
        port=1,  # nothing listens there: Connect's validation (Debezium connects) rejects it
        user="postgres",
        password="",
        dbname="postgres",
        topic_prefix=f"{cdc.prefix}bad",
        tables=[TABLE],
        slot_name="writeguard_bad",
    )
    with pytest.raises(ConnectError, match="config rejected") as rejected:
        cdc.connect.put_connector("writeguard bad", bad, timeout=30.0)
    _say(f"rejected config: {rejected.value}")
    assert "127.0.0.1:1" in str(rejected.value)  # the validation error names the unreachable server
    with pytest.raises(ConnectError, match="HTTP 404"):
        cdc.connect.status("writeguard bad")  # a rejected config creates no connector

    # Valid config, but the task fails on start: no decoderbufs extension in this PostgreSQL.
    failing = debezium_postgres_config(
        hostname=cdc.pg.host,
        port=cdc.pg.port,
        user="postgres",
        password="",
        dbname="postgres",
        topic_prefix=f"{cdc.prefix}failing",
        tables=[TABLE],
        slot_name="writeguard_failing",
        extra={"plugin.name": "decoderbufs"},
    )
    with pytest.raises(ConnectError, match=r"failed:\n.*replication slot") as failed:
        cdc.connect.put_connector("writeguard failing", failing, timeout=30.0)
    assert "at io.debezium" in str(failed.value)  # the stack trace is in the message
    assert cdc.connect.status("writeguard failing")["tasks"][0]["state"] == "FAILED"
    cdc.connect.delete_connector("writeguard failing")
    with pytest.raises(ConnectError, match="HTTP 404"):
        cdc.connect.status("writeguard failing")

    cdc.connect.delete_connector("never existed")  # absent: not an error
    with pytest.raises(ConnectError, match="HTTP 404"):
        cdc.connect.status("never existed")


def test_stop_leaves_nothing_behind(cdc: Cdc) -> None:
    worker = cdc.connect
    pid, workdir = worker.pid, worker.workdir
    assert pid is not None and workdir is not None and worker.running
    started = time.monotonic()
    worker.stop()
    _say(f"Connect stopped in {time.monotonic() - started:.2f}s (connector running at the time)")
    assert not worker.running
    assert not process_group_exists(pid), f"java process group {pid} still alive after stop()"
    assert not workdir.exists(), "temp workdir not removed"
    worker.stop()  # idempotent
    with pytest.raises(ConnectError):
        _ = worker.rest_url


def test_debezium_postgres_config_rendering() -> None:
    config = debezium_postgres_config(
        hostname="db",
        port=5432,
        user="cdc",
        password="secret",
        dbname="app",
        topic_prefix="app",
        tables=["public.refunds", "public.orders"],
        key_columns={"public.refunds": "agent_id", "public.orders": "agent_id,run_id"},
        extra={"poll.interval.ms": "10", "provide.transaction.metadata": "true"},
    )
    assert config["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert config["table.include.list"] == "public.refunds,public.orders"
    assert config["message.key.columns"] == "public.refunds:agent_id;public.orders:agent_id,run_id"
    assert config["poll.interval.ms"] == "10"  # extra wins
    assert config["provide.transaction.metadata"] == "true"
    assert config["skipped.operations"] == "none"  # TRUNCATE is not dropped
    assert config["database.port"] == "5432"
    assert all(isinstance(v, str) for v in config.values())
    assert "message.key.columns" not in debezium_postgres_config(
        hostname="db", port=5432, user="u", password="", dbname="d", topic_prefix="p", tables=["public.t"]
    )
    with pytest.raises(ValueError, match="tables"):
        debezium_postgres_config(hostname="db", port=1, user="u", password="", dbname="d", topic_prefix="p", tables=[])
