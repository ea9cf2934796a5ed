"""A calm start (issue 13) on the real broker: a worker started on a fleet that is already writing.

The worker runs the example config as shipped, learning period and population warm-up included (the test stacks
turn both off elsewhere). Thirty agents have been writing for twenty minutes of commit time when it starts; then
one of them writes amounts 20 times its usual ones. Every model set is in its learning period: nobody may be
quarantined, and the rogue must still be alerted, as a learning warning.
"""

from __future__ import annotations

import json
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

AGENTS = 30
NORMAL = 3_000
ROGUE_WRITES = 30


def shipped_defaults(data: dict[str, Any]) -> None:
    """Undo what the test stacks change for speed: the example config's learning and population warm-up."""
    for t in data["tables"]:
        t.pop("learning", None)
        for d in t["detectors"]:
            d.pop("population_agents", None)
            d.pop("population_writes", None)


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(kafka, Path(tmp_path_factory.mktemp("calm")), edit=shipped_defaults)
    try:
        yield w
    finally:
        w.process.stop()


def test_a_start_on_a_running_fleet_quarantines_no_one_and_still_alerts_a_20x_rogue(worker: Worker) -> None:
    assert all(t.learning.writes > 0 and t.learning.seconds >= 86_400 for t in worker.config.tables)
    now_us = time.time_ns() // 1000
    fleet = Fleet(n_agents=AGENTS, seed=5, prefix=worker.prefix)
    records = list(fleet.stream(NORMAL, now_us - 20 * 60 * 1_000_000, speedup=20.0))
    rogue = next(a for a in fleet.agents if a.table == REFUNDS)
    rogue.rogue = "inflate"
    last = max(r.commit_ts_us for r in records)
    records += [fleet.write(rogue, last + (i + 1) * 1_000_000) for i in range(ROGUE_WRITES)]
    p = Producer({"bootstrap.servers": worker.bootstrap, "linger.ms": 5})
    for r in records:
        p.produce(r.topic, key=r.key, value=r.value)
    assert p.flush(30) == 0

    worker.wait_for("writeguard_events_total", len(records))
    worker.wait_for("writeguard_alerts_total", 1)
    alerts = [json.loads(v) for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.alerts, expect=1)]
    mine = [a for a in alerts if a["agent_id"] == rogue.agent_id]
    assert mine, [a["summary"] for a in alerts]
    assert all(a["learning"] and a["severity"] == "warning" for a in mine), mine
    assert any(a["detector"] == "zscore" for a in mine), [a["summary"] for a in mine]
    assert not any(a["quarantined"] for a in alerts), [a["summary"] for a in alerts if a["quarantined"]]
    m = worker.metrics()
    assert worker.total("writeguard_quarantines_total") == 0, m
    assert m.get("writeguard_quarantined_agents", 0) == 0, m
    # Every model set still learns (the gauge refreshes every few seconds).
    worker.wait_for("writeguard_learning_models", AGENTS // 2)
    # The quarantine decision is the control topic's: it holds no record for anyone.
    control = read_topic(worker.bootstrap, worker.config.topics.control, expect=0, timeout=5)
    assert control == [], control
