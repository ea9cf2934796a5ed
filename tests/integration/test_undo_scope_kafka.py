"""``writeguard scope`` from Kafka on a real broker: the same scope as from the same events in a file, a late
window read from the offsets ``offsets_for_times`` gives, and multi-partition topics merged into commit order."""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from stream import cli
from stream.undo_cli import _scope
from testbed.broker import LocalKafka
from undo.events import RowEvent
from undo.models import Scope

pytestmark = pytest.mark.integration

S = 1_000_000
PARTITIONS = {"refunds": 3, "orders": 2, "message": 1}


@dataclass
class Rec:
    topic: str
    partition: int
    key: bytes | None
    value: bytes
    ts_us: int
    lsn: int
    offset: int = -1


@dataclass
class History:
    """Change events as Debezium writes them, each transaction's rows (and its message) one commit time."""

    prefix: str
    records: list[Rec] = field(default_factory=list)
    tx: int = 1000
    lsn: int = 50_000_000

    def topic(self, name: str) -> str:
        return f"{self.prefix}.message" if name == "message" else f"{self.prefix}.public.{name}"

    def commit(
        self,
        at_us: int,
        rows: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]],
        agent: str | None = None,
        message_last: bool = False,
        **meta: str,
    ) -> None:
        """One transaction: its rows, and a writeguard message naming ``agent`` before them or after them."""
        self.tx += 1
        out: list[Rec] = []
        for table, op, before, after in rows:
            self.lsn += 100
            row = before if op == "d" else after
            assert row is not None
            value = {
                "op": op,
                "before": before,
                "after": after,
                "source": {"schema": "public", "table": table, "ts_us": at_us, "txId": self.tx, "lsn": self.lsn},
            }
            partition = row["id"] % PARTITIONS[table]
            key = json.dumps({"id": row["id"]}).encode()
            out.append(Rec(self.topic(table), partition, key, json.dumps(value).encode(), at_us, self.lsn))
        if agent is not None:
            self.lsn += 100
            body = json.dumps({"agent_id": agent, "run_id": f"{agent}-run", **meta}).encode()
            value = {
                "op": "m",
                "source": {"ts_us": at_us, "txId": self.tx, "lsn": self.lsn if message_last else out[0].lsn - 50},
                "message": {"prefix": "writeguard", "content": base64.b64encode(body).decode()},
            }
            m = Rec(self.topic("message"), 0, None, json.dumps(value).encode(), at_us, value["source"]["lsn"])
            out = [*out, m] if message_last else [m, *out]
        self.records.extend(out)


def refund(i: int, amount: float, reason: str = "late") -> dict[str, Any]:
    return {"id": i, "amount": amount, "reason": reason}


def order(i: int, total: float, agent: str | None, status: str = "paid") -> dict[str, Any]:
    return {"id": i, "total": total, "status": status, "agent_id": agent}


def build(prefix: str, now_us: int) -> tuple[History, int]:
    """Two hours of history: an early block (2 h to 70 min ago) and a late one (the last 20 minutes).

    Returns the history and the index of the late block's first record."""
    h = History(prefix)
    t = now_us - 7_200 * S
    for i in range(1, 31):  # people create refunds
        h.commit(t + i * 60 * S, [("refunds", "c", None, refund(i, 10.0 * i))])
    for i in range(31, 41):  # the rogue agent's early refunds, named by its message
        h.commit(t + (i + 30) * 60 * S // 2, [("refunds", "c", None, refund(i, 7.5))], agent="rogue", version="1")
    for i in range(1, 21):  # an orders agent, named by the row's column
        h.commit(t + i * 90 * S, [("orders", "c", None, order(i, 20.0 + i, "order-bot"))])
    late_from = len(h.records)
    t = now_us - 1_200 * S
    # The rogue agent updates people's refunds, several per transaction, its message after the rows for some.
    for n, ids in enumerate([(1, 2, 3), (4, 5), (6, 7, 8, 9, 10)]):
        rows = [("refunds", "u", refund(i, 10.0 * i), refund(i, 9_999.0, "rogue")) for i in ids]
        h.commit(t + n * 10 * S, rows, agent="rogue", message_last=n != 1, version="2")
    h.commit(t + 40 * S, [("refunds", "d", refund(11, 110.0), None), ("refunds", "d", refund(12, 120.0), None)],
             agent="rogue", message_last=True)  # fmt: skip
    h.commit(t + 50 * S, [("orders", "c", None, order(i, 1_000.0, "rogue")) for i in range(100, 106)])
    h.commit(t + 60 * S, [("orders", "u", order(3, 23.0, "order-bot"), order(3, 24.0, "order-bot", "shipped"))])
    # Afterwards: a person reuses a deleted key and corrects a refund; another agent writes one of the rogue's.
    h.commit(t + 300 * S, [("refunds", "c", None, refund(11, 1.0, "again"))])
    h.commit(t + 310 * S, [("refunds", "u", refund(3, 9_999.0, "rogue"), refund(3, 30.0, "fixed by hand"))])
    h.commit(t + 320 * S, [("refunds", "u", refund(5, 9_999.0, "rogue"), refund(5, 50.0))], agent="other")
    h.commit(t + 330 * S, [("orders", "u", order(101, 1_000.0, "rogue"), order(101, 1_000.0, None, "checked"))])
    return h, late_from


@dataclass
class Setup:
    history: History
    late_from: int
    now_us: int
    config: Path
    events: Path
    bootstrap: str

    def argv(self, *more: str, events: bool = False) -> list[str]:
        where = ["--events", str(self.events)] if events else ["--bootstrap-servers", self.bootstrap]
        return ["scope", "-c", str(self.config), *where, *more]


@pytest.fixture(scope="module")
def setup(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tmp = tmp_path_factory.mktemp("undo-scope")
    prefix = f"us{uuid.uuid4().hex[:8]}"
    now_us = time.time_ns() // 1000
    h, late_from = build(prefix, now_us)
    kafka.create_topics({h.topic(name): n for name, n in PARTITIONS.items()})
    # Kafka order: each partition in commit order; records carry their commit time as their timestamp.
    order_ = sorted(range(len(h.records)), key=lambda i: (h.records[i].ts_us, h.records[i].lsn))
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 5, "enable.idempotence": True})
    errors: list[str] = []

    def done(rec: Rec) -> Any:
        def cb(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                rec.offset = msg.offset()

        return cb

    for i in order_:
        r = h.records[i]
        producer.produce(r.topic, r.value, r.key, partition=r.partition, timestamp=r.ts_us // 1000, on_delivery=done(r))
    assert producer.flush(30) == 0 and not errors, errors
    assert all(r.offset >= 0 for r in h.records)
    events = tmp / "events.jsonl"
    with events.open("w") as fh:
        for i in order_:
            r = h.records[i]
            key = None if r.key is None else json.loads(r.key)
            fh.write(json.dumps({"key": key, "value": json.loads(r.value)}) + "\n")
    config = tmp / "writeguard.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # Wrong on purpose: --bootstrap-servers must override it, as for the other commands.
                "kafka": {"bootstrap.servers": "127.0.0.1:1"},
                "tables": [
                    {
                        "name": "public.refunds",
                        "topic": h.topic("refunds"),
                        "features": [{"name": "amount", "column": "amount"}],
                    },
                    {
                        "name": "public.orders",
                        "topic": h.topic("orders"),
                        "features": [{"name": "total", "column": "total"}],
                    },
                ],
                "worker": {"agent_messages": {"topic": h.topic("message")}},
            }
        )
    )
    return Setup(h, late_from, now_us, config, events, kafka.bootstrap_servers)


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[Scope, str]:
    code = cli.main([*argv, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return Scope.model_validate_json(out.out), out.err


def without_positions(scope: Scope) -> dict[str, Any]:
    """The scope as JSON, with where each write was read (file line, or Kafka offset) left out."""
    doc = json.loads(scope.model_dump_json())
    for r in doc["rows"]:
        for w in [*r["writes"], *r["later"]]:
            w.pop("position")
    return doc


READ = re.compile(r"scope: ([\d,]+) records read of ([\d,]+) in (\d+) partitions of (\d+) topics")


def test_scope_from_kafka_equals_scope_from_the_file(setup: Setup, capsys) -> None:
    from_kafka, err = run(capsys, setup.argv("--agent", "rogue"))
    from_file, _ = run(capsys, setup.argv("--agent", "rogue", events=True))
    assert without_positions(from_kafka) == without_positions(from_file)
    m = READ.search(err)
    assert m is not None, err
    assert (int(m.group(1).replace(",", "")), m.group(3), m.group(4)) == (len(setup.history.records), "6", "3")
    # What it found: the early and late refunds, the deletes, the orders; and the three conflicts.
    rows = {(r.table, r.key["id"]) for r in from_kafka.rows}
    expected = {("public.refunds", i) for i in [*range(1, 13), *range(31, 41)]}
    assert rows == expected | {("public.orders", i) for i in range(100, 106)}
    later = {(r.table, r.key["id"]): [(w.op, w.agent_id) for w in r.later] for r in from_kafka.rows if r.later}
    assert later == {
        ("public.refunds", 11): [("c", None)],
        ("public.refunds", 3): [("u", None)],
        ("public.refunds", 5): [("u", "other")],
        ("public.orders", 101): [("u", None)],
    }
    assert all(w.position.startswith(setup.history.prefix) for r in from_kafka.rows for w in r.writes)


def test_a_late_window_reads_only_from_the_offsets_for_its_start(setup: Setup, capsys) -> None:
    # The late block began 20 minutes ago, the early one ended 85 minutes ago. One time for both reads.
    since = datetime.fromtimestamp((setup.now_us - 1_800 * S) / 1e6, UTC).isoformat()
    from_kafka, err = run(capsys, setup.argv("--agent", "rogue", "--since", since))
    m = READ.search(err)
    assert m is not None, err
    read, in_topics = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
    late = setup.history.records[setup.late_from :]
    assert (read, in_topics) == (len(late), len(setup.history.records))
    # Every write the scope cites is at or after the first late offset of its partition.
    first = {}
    for r in late:
        first.setdefault((r.topic, r.partition), r.offset)
    for row in from_kafka.rows:
        for w in [*row.writes, *row.later]:
            topic, partition, offset = w.position.rsplit("/", 2)
            assert int(offset) >= first[topic, int(partition)], w.position
    assert {r.key["id"] for r in from_kafka.rows if r.table == "public.refunds"} == set(range(1, 13))
    from_file, ferr = run(capsys, setup.argv("--agent", "rogue", "--since", since, events=True))
    assert without_positions(from_kafka) == without_positions(from_file)
    assert f"({setup.late_from:,} lines before --since skipped)" in ferr
    # The offsets Kafka gives for the window's start are where the scan began.
    c = Consumer({"bootstrap.servers": setup.bootstrap, "group.id": f"check-{uuid.uuid4()}"})
    try:
        start_ms = (setup.now_us - 1_800 * S - 60 * S) // 1000
        parts = [TopicPartition(t, p, start_ms) for (t, p) in first]
        found = {(tp.topic, tp.partition): tp.offset for tp in c.offsets_for_times(parts, timeout=10)}
    finally:
        c.close()
    assert found == first


def test_partitions_merge_into_commit_order_and_the_tap_sees_every_event(setup: Setup) -> None:
    seen: list[RowEvent] = []
    _, scope = _scope(cli.parser().parse_args(setup.argv("--agent", "rogue")), tap=seen.append)
    assert [e.commit_ts_us for e in seen] == sorted(e.commit_ts_us for e in seen)
    assert len(seen) == sum(1 for r in setup.history.records if not r.topic.endswith(".message"))
    partitions = [e.position.rsplit("/", 1)[0] for e in seen if e.table == "public.refunds"]
    assert len(set(partitions)) == 3
    switches = sum(1 for a, b in itertools.pairwise(partitions) if a != b)
    assert switches > 10  # interleaved, not one partition after another
    from_file: list[RowEvent] = []
    _scope(cli.parser().parse_args(setup.argv("--agent", "rogue", events=True)), tap=from_file.append)
    assert [(e.table, e.key, e.op, e.commit_ts_us, e.agent_id) for e in seen] == [
        (e.table, e.key, e.op, e.commit_ts_us, e.agent_id) for e in from_file
    ]
    # Transactions whose message (on another topic) came after their rows are the agent's too.
    by_key = {(r.table, r.key["id"]): r for r in scope.rows}
    for i in (1, 2, 3, 6, 7, 8, 9, 10, 11, 12):
        assert [(w.agent_id, w.run_id) for w in by_key["public.refunds", i].writes] == [("rogue", "rogue-run")]
    assert {(r.agent_id, r.run_id): r.events for r in scope.runs} == {("rogue", "rogue-run"): 22, ("rogue", None): 6}
