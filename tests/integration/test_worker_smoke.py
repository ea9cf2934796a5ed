"""A worker smoke test that `make test` also runs under Debian's own /usr/bin/python3.

The worker opens its store of evicted models once and uses it on an agent's first write: a store that the
interpreter's build cannot serve fails here, on the real broker, not on a user's first event.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from testbed.broker import LocalKafka
from testbed.fleet import REFUNDS, Fleet
from tests.integration.conftest import Worker, read_topic, start_worker

pytestmark = pytest.mark.integration

MAX_AGENTS = 3


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    def edit(data: dict[str, Any]) -> None:
        data["worker"]["max_agents"] = MAX_AGENTS  # 12 agents on 2 tables: most writes evict or restore one

    w = start_worker(kafka, Path(tmp_path_factory.mktemp("smoke")), edit=edit)
    try:
        yield w
    finally:
        w.process.stop()


def test_worker_evicts_restores_and_alerts_on_this_interpreter(worker: Worker) -> None:
    print(f"interpreter: {sys.executable} {sys.version.split()[0]}", file=sys.stderr)
    fleet = Fleet(n_agents=12, seed=21, prefix=worker.prefix)
    records = list(fleet.stream(1_500, time.time_ns() // 1000 - 200_000_000))
    rogue = next(a for a in fleet.agents if a.table == REFUNDS)
    rogue.rogue = "inflate"
    records += [fleet.write(rogue, time.time_ns() // 1000 - (30 - i) * 10_000) for i in range(30)]
    p = Producer({"bootstrap.servers": worker.bootstrap, "linger.ms": 5})
    for r in records:
        p.produce(r.topic, key=r.key, value=r.value)
    assert p.flush(30) == 0
    worker.wait_for("writeguard_events_total", len(records))
    assert worker.proc.poll() is None, worker.process.log_tail()
    # Evictions went through the store: 12 agents, 3 in memory (the gauge refreshes every 5 s).
    worker.wait_for("writeguard_evicted_models", 9)
    worker.wait_for("writeguard_alerts_total", 1, timeout=60)
    alerts = [json.loads(v) for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.alerts, expect=1)]
    assert {a["agent_id"] for a in alerts} == {rogue.agent_id}, [a["summary"] for a in alerts]
    # Judged by its own model, restored from the store, not by a cold one or the population.
    assert alerts[0]["scope"] == "agent" and alerts[0]["quarantined"] is True, alerts[0]
    assert "Traceback" not in worker.process.log_tail(20_000)
