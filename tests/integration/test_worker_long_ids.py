"""Agent ids on a real worker and the real broker: long ids stay apart, and an id cannot forge a log line.

Two agents whose 300-character ids share their first 256 characters write the same table: the rogue is alerted
and quarantined under its own id (readable prefix + digest of the whole id), in the alert and in the control
record's key, and the other goes on unalerted. An agent whose id holds a newline and a fake log line is alerted
too, and the worker's log shows its id escaped on the ALERT line.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from detectors.features import identity
from testbed.broker import LocalKafka
from testbed.fleet import REFUNDS, Agent, Fleet
from tests.integration.conftest import Worker, produce, read_topic, start_worker, until

pytestmark = pytest.mark.integration

S = 1_000_000
SHARED = "agent/" + "x" * 250
ROGUE, NORMAL = SHARED + "-rogue-" + "r" * 37, SHARED + "-normal-" + "n" * 36
FORGED_LINE = "[2026-12-02 01:00:00,000] [1] [ERROR] forged line"
FORGER = f"forger\n{FORGED_LINE}"


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(kafka, Path(tmp_path_factory.mktemp("identity")))
    try:
        yield w
    finally:
        w.process.stop()


def messages(w: Worker, topic: str) -> list[tuple[bytes | None, dict[str, Any]]]:
    return [(k, json.loads(v)) for k, v, _, _ in read_topic(w.bootstrap, topic) if v is not None]


def test_long_ids_stay_apart_and_ids_cannot_forge_log_lines(worker: Worker) -> None:
    agents = [
        Agent(agent_id=a, table=REFUNDS, mean_amount=50.0, rate_per_s=4.0, run_id=f"run-{i}")
        for i, a in enumerate((ROGUE, NORMAL, FORGER, "refund-agent-a", "refund-agent-b"))
    ]
    fleet = Fleet(prefix=worker.prefix, agents=agents, seed=4)
    t = time.time_ns() // 1000 - 300 * S
    normal = list(fleet.stream(500, t))
    produce(worker.bootstrap, normal)
    worker.wait_for("writeguard_events_total", len(normal))
    assert min(a.written for a in agents) >= 40, [a.written for a in agents]  # past their models' warm-up

    rogue, other, forger = agents[:3]
    rogue.rogue = forger.rogue = "inflate"
    later = max(r.commit_ts_us for r in normal) + S
    bad = [fleet.write(a, later + i * 20_000) for i in range(12) for a in (rogue, forger)]
    calm = [fleet.write(other, later + S + i * 20_000) for i in range(30)]
    produce(worker.bootstrap, bad + calm)
    worker.wait_for("writeguard_events_total", len(normal) + len(bad) + len(calm))

    def quarantined() -> set[str]:
        return {a["agent_id"] for _, a in messages(worker, worker.config.topics.alerts) if a["quarantined"]}

    want = {identity(ROGUE), FORGER}
    until("quarantine alerts of the rogue and the forger", lambda: want <= quarantined(), worker)
    alerted = {a["agent_id"] for _, a in messages(worker, worker.config.topics.alerts)}
    assert identity(NORMAL) not in alerted and identity(ROGUE) != identity(NORMAL)
    long_id = identity(ROGUE)
    assert long_id is not None and long_id.startswith(ROGUE[:200] + "~sha256:")
    assert long_id.endswith(hashlib.sha256(ROGUE.encode()).hexdigest())

    def control() -> list[tuple[bytes | None, dict[str, Any]]]:
        return [(k, c) for k, c in messages(worker, worker.config.topics.control) if c["state"] == "quarantined"]

    until("two quarantine control records", lambda: len(control()) >= 2, worker)
    records = control()
    assert sorted(c["agent_id"] for _, c in records) == sorted(want)
    assert all(k == c["agent_id"].encode() for k, c in records)  # keyed by the same distinct id

    log = worker.process.log.read_text(errors="replace")
    lines = log.splitlines()
    assert not any(line.startswith(FORGED_LINE) for line in lines), "an agent id forged a log line"
    assert any("ALERT public.refunds: agent forger\\n[2026-12-02 01:00:00,000]" in line for line in lines), log[-3000:]
