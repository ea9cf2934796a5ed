"""The worker without the repartition hop (worker.repartition: false), as when Debezium keys CDC records by
agent id (debezium.key_by_agent): the same detection, on a real broker and a real worker process."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from testbed.broker import LocalKafka
from testbed.fleet import REFUNDS, Fleet, logical_message, without_agent
from tests.integration.conftest import Worker, read_topic, start_worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    prefix = f"r{uuid.uuid4().hex[:8]}"
    kafka.create_topics({f"{prefix}.message": 1})

    def edit(data: dict[str, Any]) -> None:
        data["worker"]["repartition"] = False
        # With agent messages: the direct path's reader of the whole messages topic (stream.join) runs too.
        data["worker"]["agent_messages"] = {"topic": f"{prefix}.message", "prefix": "writeguard"}

    w = start_worker(kafka, Path(tmp_path_factory.mktemp("direct")), prefix=prefix, edit=edit)
    try:
        yield w
    finally:
        w.process.stop()


def test_keyed_by_agent_without_repartition_detects_the_same(worker: Worker) -> None:
    fleet = Fleet(n_agents=8, seed=13, prefix=worker.prefix)
    records = list(fleet.stream(2_000, time.time_ns() // 1000 - 200_000_000))
    rogue = next(a for a in fleet.agents if a.table == REFUNDS)
    rogue.rogue = "inflate"
    burst = [fleet.write(rogue, time.time_ns() // 1000 - (30 - i) * 10_000) for i in range(30)]
    p = Producer({"bootstrap.servers": worker.bootstrap})
    for r in records:
        # What message.key.columns=<table>:agent_id makes Debezium do: every record of an agent has its key.
        p.produce(r.topic, key=r.agent_id.encode(), value=r.value)
    # The burst names its agent only in each transaction's logical decoding message: the join, on this path.
    for r in burst:
        value, tx = without_agent(r.value)
        key, msg = logical_message(tx, r.commit_ts_us, json.dumps({"agent_id": rogue.agent_id}).encode())
        p.produce(f"{worker.prefix}.message", key=key, value=msg)
        p.produce(r.topic, key=r.agent_id.encode(), value=value)
    records += burst
    assert p.flush(30) == 0
    worker.wait_for("writeguard_events_total", len(records))
    worker.wait_for("writeguard_alerts_total", 1, timeout=30)
    alerts = [json.loads(v) for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.alerts, expect=1)]
    assert [a["agent_id"] for a in alerts] == [rogue.agent_id]
    assert alerts[0]["quarantined"] and alerts[0]["anomalous_events"] <= 10
    changes = read_topic(worker.bootstrap, worker.config.topics.changes)
    assert changes == []  # no hop: nothing was re-keyed
