"""``writeguard learn --since`` on the real broker: the CDC topics read from an offset by time, to their ends.

Records carry their commit time as the Kafka timestamp (as Debezium's records do, by the producer's CreateTime);
``--since 1d`` must start each partition at the first record of the last day (``offsets_for_times``), learn what
follows, and write a model set for every (table, agent) seen there, and none for the agents that wrote only
before. The JSONL path of ``learn`` is covered by ``test_worker_checkpoints.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from stream.checkpoints import parse_key
from stream.config import load_config
from testbed.broker import LocalKafka
from testbed.fleet import Fleet, Record
from testbed.process import ROOT
from tests.integration.conftest import make_config, read_topic

pytestmark = pytest.mark.integration

S = 1_000_000
DAY_US = 86_400 * S


def produce_at_commit_time(bootstrap: str, records: list[Record]) -> None:
    """Produce with each record's commit time as its Kafka timestamp, and wait for every delivery."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    errors: list[str] = []
    for r in records:
        p.produce(
            r.topic, key=r.key, value=r.value, timestamp=r.commit_ts_us // 1000,
            on_delivery=lambda err, _m: errors.append(str(err)) if err is not None else None,
        )  # fmt: skip
        p.poll(0)
    assert p.flush(30) == 0 and not errors, errors


def test_learn_since_reads_the_cdc_topics_from_that_time_on(kafka: LocalKafka, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    cfg_path = make_config(tmp_path, kafka.bootstrap_servers, prefix)
    cfg = load_config(cfg_path)
    kafka.create_topics({cfg.tables[0].topic: 3, cfg.tables[1].topic: 3})
    fleet = Fleet(n_agents=8, seed=5, prefix=prefix)
    old_agents, recent_agents = fleet.agents[:4], fleet.agents[4:]
    now = time.time_ns() // 1000
    # Three to two days ago: only the old agents. The last six hours: only the recent ones.
    old = [fleet.write(a, now - 3 * DAY_US + (i * 4 + k) * 60 * S) for i in range(60) for k, a in enumerate(old_agents)]
    start = now - 6 * 3600 * S
    recent = [fleet.write(a, start + (i * 4 + k) * 20 * S) for i in range(60) for k, a in enumerate(recent_agents)]
    produce_at_commit_time(kafka.bootstrap_servers, old + recent)

    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "learn", "--since", "1d", "--config", str(cfg_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    done = re.search(r"learn: ([\d,]+) events, ([\d,]+) changes learned", proc.stderr)
    assert done is not None, proc.stderr
    assert int(done.group(1).replace(",", "")) == len(recent), proc.stderr  # not one record from before the day

    sets = {
        parse_key(k)
        for k, v, _, _ in read_topic(kafka.bootstrap_servers, cfg.topics.models)
        if k is not None and v is not None and b"\0" in k  # an agent's model set, not a table's shared models
    }
    assert sets == {(a.table, a.agent_id) for a in recent_agents}, sets
