"""The join of transaction messages to their rows with two workers, on the real broker (issue 11 item 6).

Every row names no agent: its agent comes only from the ``pg_logical_emit_message`` of its transaction, on
Debezium's messages topic (one partition, as Debezium keys messages by prefix). The ingest group gives that
partition to one worker and spreads the rows over both, so most rows are read by a worker that does not own their
message. Each worker reads every message outside the group (stream.join), so every row is attributed to its agent,
each exactly once, and a rogue known only by its messages is alerted. A bad message is dead-lettered once and a
guard-rails refusal alerted once, although both workers read them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.bench_failover import Pair, produce_all, start_pair
from detectors.engine import UNATTRIBUTED, Change
from stream.ingest import decode_changes
from testbed.broker import LocalKafka
from testbed.fleet import Fleet, logical_message, without_agent
from tests.integration.conftest import changes_on_topic, read_topic

pytestmark = pytest.mark.integration

S = 1_000_000
Out = tuple[str, int | None, bytes, bytes]


def alerts(pair: Pair) -> list[dict[str, Any]]:
    return [json.loads(v) for _, v, _, _ in read_topic(pair.group.bootstrap, pair.config.topics.alerts) if v]


def changes(pair: Pair) -> list[Change]:
    return changes_on_topic(pair.group.bootstrap, pair.config.topics.changes)


def wait(what: str, probe: Any, pair: Pair, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        pair.alive()
        done, last = probe()
        if done:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; last seen: {last!r}")


def with_messages(data: dict[str, Any]) -> None:
    """worker.agent_messages on Debezium's messages topic of the config's topic prefix."""
    prefix = data["tables"][0]["topic"].rsplit(".public.", 1)[0]
    data["worker"]["agent_messages"] = {"topic": f"{prefix}.message", "prefix": "writeguard"}


def test_rows_are_joined_to_messages_read_by_the_other_worker(kafka: LocalKafka, tmp_path: Path) -> None:
    with start_pair(kafka, tmp_path, edit=with_messages, message_partitions=1) as pair:
        msgs = pair.config.worker.agent_messages
        assert msgs is not None
        owner = [
            name
            for name, tps in (("survivor", pair.survivor_tps), ("victim", pair.victim_tps))
            if (msgs.topic, 0) in tps
        ]
        assert len(owner) == 1, f"the messages partition: {sorted(pair.survivor_tps)} / {sorted(pair.victim_tps)}"
        cdc = {
            name: {tp for tp in tps if tp[0] in pair.cdc_topics}
            for name, tps in (("survivor", pair.survivor_tps), ("victim", pair.victim_tps))
        }
        assert cdc["survivor"] and cdc["victim"], f"both workers must read rows: {cdc}"

        fleet = Fleet(n_agents=6, seed=41, prefix=pair.prefix)
        rogue = fleet.agents[0]
        batch: list[Out] = []
        expected: dict[str, int] = {}

        def write(i: int, agent: Any, ts_us: int) -> None:
            rec = fleet.write(agent, ts_us)
            value, tx = without_agent(rec.value)
            part = i % 3  # every partition of the table's topic: both workers' rows
            content = orjson.dumps({"agent_id": agent.agent_id, "run_id": agent.run_id})
            key, msg = logical_message(tx, ts_us, content, prefix=pair.prefix)
            row: Out = (rec.topic, part, rec.key, value)
            note: Out = (msgs.topic, 0, key, msg)
            # Either may reach its reader first: half the rows come before their message, half after.
            batch.extend([row, note] if i % 2 else [note, row])
            expected[agent.agent_id] = expected.get(agent.agent_id, 0) + 1

        t0 = time.time_ns() // 1000 - 200 * S
        for i in range(40 * len(fleet.agents)):  # past every model's warm-up (30 writes)
            write(i, fleet.agents[i % len(fleet.agents)], t0 + i * 250_000)
        # What only one worker may act on, though both read it: a bad message and a refusal of the guard rails.
        # Before the rogue's last rows: once both workers forwarded those, both joiners had read these.
        bad_key, bad = logical_message(99_999_001, t0 + 65 * S, b"{not json", prefix=pair.prefix)
        refusal = orjson.dumps(
            {
                "v": 1,
                "kind": "truncate",
                "command": "TRUNCATE",
                "table": "public.refunds",
                "role": "agent_x",
                "agent_id": "refusal-agent",
                "at": "2026-03-01T12:00:00+00:00",
            }
        )
        ref_key, ref = logical_message(
            99_999_002, t0 + 65 * S, refusal, prefix=pair.prefix, message_prefix="writeguard.refused"
        )
        batch += [(msgs.topic, 0, bad_key, bad), (msgs.topic, 0, ref_key, ref)]
        produce_all(pair.group.bootstrap, batch)
        # The models warm first: two ingest workers forward one agent's rows in their own batches, so a burst
        # produced at once with the history could reach its model before the history does (and be learned).
        pair.ingest.wait_committed(pair.ingest.end_offsets([*pair.cdc_topics, msgs.topic]), pair.alive)
        batch.clear()
        rogue.rogue = "inflate"
        for i in range(12):
            write(i, rogue, t0 + 70 * S + i * 400_000)
        produce_all(pair.group.bootstrap, batch)

        rows = sum(expected.values())
        cdc_topics = set(pair.cdc_topics)
        pair.ingest.wait_committed(pair.ingest.end_offsets([*pair.cdc_topics, msgs.topic]), pair.alive)

        def all_forwarded() -> tuple[bool, list[Change]]:
            got = [c for c in changes(pair) if c.coords.topic in cdc_topics or c.refused]  # type: ignore[union-attr]
            return sum(c.op != "m" for c in got) >= rows, got

        got = wait(f"{rows} rows on the changes topic", all_forwarded, pair)
        by_agent: dict[str, int] = {}
        for c in got:
            if c.op != "m":
                by_agent[c.agent_id] = by_agent.get(c.agent_id, 0) + 1
        assert UNATTRIBUTED not in by_agent, f"{by_agent.get(UNATTRIBUTED)} rows lost their agent"
        assert by_agent == expected, (by_agent, expected)
        assert len({c.coords for c in got if c.op != "m"}) == rows  # each row once
        # The refusal became one Change (from the messages partition's owner), not one per worker.
        assert [(c.agent_id, c.refused) for c in got if c.op == "m"] == [("refusal-agent", "truncate: TRUNCATE")]
        # (Rows of both workers' partitions are among them: the worker that does not own the messages partition
        # could only name their agents through its own reader of that topic.)

        def rogue_alerted() -> tuple[bool, list[dict[str, Any]]]:
            got = [a for a in alerts(pair) if a["agent_id"] == rogue.agent_id and a["quarantined"]]
            return bool(got), got

        [alert] = wait(f"a quarantine of {rogue.agent_id}", rogue_alerted, pair)
        assert alert["table"] == rogue.table and alert["scope"] == "agent", alert
        refusals = wait(
            "the refusal's alert",
            lambda: (bool(r := [a for a in alerts(pair) if a["detector"] == "guard_refusal"]), r),
            pair,
        )
        assert [a["agent_id"] for a in refusals] == ["refusal-agent"], refusals
        dead = [json.loads(v) for _, v, _, _ in read_topic(pair.group.bootstrap, pair.config.topics.dead_letter) if v]
        assert [d["reason"] for d in dead] == ["invalid_message"], dead


def test_a_worker_started_after_its_backlog_finds_the_older_messages(kafka: LocalKafka, tmp_path: Path) -> None:
    """Rows and messages written well before the worker starts, the messages already committed by a previous owner
    (a takeover with a backlog): its own reader of the messages topic starts at its start time minus ``hold_s``,
    then moves back for the older rows it holds."""
    import uuid

    from stream.config import load_config
    from testbed.process import spawn_worker
    from tests.integration.conftest import Worker, make_config

    prefix = f"j{uuid.uuid4().hex[:8]}"
    cfg_path = make_config(tmp_path, kafka.bootstrap_servers, prefix, with_messages)
    cfg = load_config(cfg_path)
    msgs = cfg.worker.agent_messages
    assert msgs is not None
    kafka.create_topics({cfg.tables[0].topic: 3, cfg.tables[1].topic: 3, msgs.topic: 1})
    fleet = Fleet(n_agents=4, seed=43, prefix=prefix)
    batch: list[Out] = []
    expected: dict[str, int] = {}
    t0 = time.time_ns() // 1000 - 100 * S
    for i, r in enumerate(fleet.stream(200, t0)):
        value, tx = without_agent(r.value)
        key, note = logical_message(tx, r.commit_ts_us, orjson.dumps({"agent_id": r.agent_id}), prefix=prefix)
        batch += [(msgs.topic, 0, key, note), (r.topic, i % 3, r.key, value)]
        expected[r.agent_id] = expected.get(r.agent_id, 0) + 1
    produce_all(kafka.bootstrap_servers, batch)
    # A takeover: the previous owner of the messages partition committed it, its rows are still to be read (they
    # were held there). Only the new worker's own reader of the messages topic can name their agents.
    from confluent_kafka import Consumer, TopicPartition

    from stream.ingest import ingest_group

    c = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": ingest_group(cfg)})
    try:
        end = c.get_watermark_offsets(TopicPartition(msgs.topic, 0), timeout=10)[1]
        c.commit(offsets=[TopicPartition(msgs.topic, 0, end)], asynchronous=False)
    finally:
        c.close()
    time.sleep(msgs.hold_s + 1)  # what is being tested: messages older than a new reader's start minus hold_s
    w = Worker(spawn_worker(cfg_path, tmp_path, loglevel="info"), cfg, cfg_path, kafka.bootstrap_servers, prefix)
    try:
        cdc = {t.topic for t in cfg.tables}

        def forwarded() -> tuple[bool, dict[str, int]]:
            got: dict[str, int] = {}
            for _, v, _, _ in read_topic(w.bootstrap, cfg.topics.changes):
                for c in decode_changes(v or b"[]"):
                    if c.coords.topic in cdc:  # type: ignore[union-attr]
                        got[c.agent_id] = got.get(c.agent_id, 0) + 1
            return sum(got.values()) >= len(batch) // 2, got

        deadline = time.monotonic() + 120
        while not (seen := forwarded())[0]:
            assert w.proc.poll() is None and time.monotonic() < deadline, (seen, w.process.log_tail())
            time.sleep(0.5)
        assert seen[1] == expected, seen[1]  # every row with its agent, none unattributed
    finally:
        w.process.stop()
