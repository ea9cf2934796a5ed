"""Model sets on the models topic, through real worker processes on the real broker.

- A worker SIGKILLed in the middle of a rogue's incident and restarted: the rogue is alerted and quarantined by its
  own restored model (scope ``agent``, where a cold worker would judge it by the population model), once, and an
  event scored by both processes has one alert id.
- ``writeguard learn`` over a JSONL history, then a worker on the live fleet: the agents' models are warm (no
  learning alerts, none of them learning) and a rogue is quarantined at its first anomalous writes, although the
  tables have the deployment's learning period of 200 writes and a day.
- Two workers, one SIGKILLed: a rogue whose changes partition was the dead worker's is alerted and quarantined
  by its own model on the survivor, restored from the models partition that moved with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_failover import produce_all, settle, start_pair
from stream.checkpoints import parse_key, partition_for
from stream.config import load_config
from testbed.broker import LocalKafka
from testbed.fleet import Fleet
from testbed.process import ROOT, spawn_worker
from tests.integration.conftest import Worker, make_config, produce, read_topic, start_worker

pytestmark = pytest.mark.integration

S = 1_000_000


def now_us() -> int:
    return time.time_ns() // 1000


def poll(
    what: str, probe: Callable[[], tuple[bool, Any]], worker: Worker | Callable[[], None], timeout: float = 120.0
) -> Any:
    """Call ``probe`` until it says done; fail after ``timeout`` s with what it last saw, or at once if the worker
    died (``worker`` is a Worker, or a check that raises)."""
    deadline = time.monotonic() + timeout

    def tail() -> str:
        return worker.process.log_tail() if isinstance(worker, Worker) else ""

    while True:
        if isinstance(worker, Worker):
            assert worker.proc.poll() is None, f"worker died:\n{tail()}"
        else:
            worker()
        done, seen = probe()
        if done:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; last seen: {seen!r}\n{tail()}")
        time.sleep(0.3)


def records(w: Worker, topic: str) -> list[dict[str, Any]]:
    return [json.loads(v) for _, v, _, _ in read_topic(w.bootstrap, topic) if v is not None]


def alerts_of(w: Worker, agent: str) -> list[dict[str, Any]]:
    return [a for a in records(w, w.config.topics.alerts) if a["agent_id"] == agent]


def checkpointed(w: Worker) -> dict[tuple[str, str], int]:
    """(table, agent) -> the models topic partition of its latest checkpoint."""
    out: dict[tuple[str, str], int] = {}
    for key, value, part, _ in read_topic(w.bootstrap, w.config.topics.models):
        if value is not None and key is not None and b"\0" in key:  # not a table's shared models
            out[parse_key(key)] = part
    return out


def checkpoints_every_second(data: dict[str, Any]) -> None:
    data.setdefault("worker", {})["checkpoint_interval_s"] = 1.0


def test_a_worker_killed_mid_incident_alerts_the_rogue_with_its_restored_model(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    (tmp_path / "first").mkdir()
    w = start_worker(kafka, tmp_path / "first", edit=checkpoints_every_second)
    fleet = Fleet(n_agents=8, seed=11, prefix=w.prefix)
    t0 = now_us() - 3600 * S
    normal = list(fleet.stream(2_000, t0))
    produce(w.bootstrap, normal)
    w.wait_for("writeguard_events_total", len(normal))
    agents = {(a.table, a.agent_id) for a in fleet.agents}
    # Every agent's model set reaches the topic, in its changes partition's number.
    where = poll("a checkpoint of every agent", lambda: (agents <= set(got := checkpointed(w)), got), w)
    assert all(where[(t, a)] == partition_for(a, w.config.topics.partitions) for t, a in agents), where
    assert w.total("writeguard_checkpoints_total") >= len(agents)
    assert w.total("writeguard_checkpoint_seconds_total") > 0
    rogue = next(a for a in fleet.agents if a.table == "public.refunds")
    assert records(w, w.config.topics.alerts) == []

    # The incident starts: one anomalous write (the zscore needs 2 of 4), scored and checkpointed, then SIGKILL.
    rogue.rogue = "inflate"
    t1 = normal[-1].commit_ts_us + S
    before = len(models_of(w, rogue.agent_id))
    produce(w.bootstrap, [fleet.write(rogue, t1)])
    w.wait_for("writeguard_events_total", len(normal) + 1)
    poll("the rogue's checkpoint after it", lambda: (len(models_of(w, rogue.agent_id)) > before, before), w)
    os.killpg(w.proc.pid, signal.SIGKILL)
    w.proc.wait(30)

    (tmp_path / "second").mkdir()
    new = Worker(spawn_worker(w.config_path, tmp_path / "second", loglevel="info"), w.config, w.config_path,
                 w.bootstrap, w.prefix)  # fmt: skip
    try:
        rest = [fleet.write(rogue, t1 + (i + 1) * 100_000) for i in range(6)]
        produce(new.bootstrap, rest)
        got = poll("the rogue's alert after the restart", lambda: (bool(a := alerts_of(new, rogue.agent_id)), a), new)
        zs = [a for a in got if a["detector"].startswith("zscore")]
        assert zs and zs[0]["detector"] == "zscore" and zs[0]["scope"] == "agent", got
        assert zs[0]["quarantined"] is True and zs[0]["learning"] is False, zs[0]
        # The restart read the agents' model sets back (all of them: this worker owns every partition).
        assert new.total("writeguard_restored_models_total") == len(agents)
        assert new.total("writeguard_restore_duration_seconds_count") >= 1
        # An event scored twice (before the kill and again from the committed offset) keeps its alert id.
        ids: dict[tuple[str, str], set[str]] = {}
        for a in alerts_of(new, rogue.agent_id):
            at = json.dumps(a["triggering_events"][-1], sort_keys=True)
            ids.setdefault((a["detector"], at), set()).add(a["alert_id"])
        assert all(len(v) == 1 for v in ids.values()), ids
        control = [c for c in records(new, new.config.topics.control) if c["agent_id"] == rogue.agent_id]
        assert [c["state"] for c in control] == ["quarantined"], control
        # Normal agents stay unalerted after the restart.
        more = list(fleet.stream(400, t1 + 10 * S))
        produce(new.bootstrap, [r for r in more if r.agent_id != rogue.agent_id])
        new.wait_for("writeguard_events_total", len(rest) + sum(r.agent_id != rogue.agent_id for r in more))
        others = [a for a in records(new, new.config.topics.alerts) if a["agent_id"] != rogue.agent_id]
        assert others == [], others
    finally:
        new.process.stop()


def models_of(w: Worker, agent: str) -> list[int]:
    """Offsets of the agent's checkpoints on the models topic (before compaction, one per checkpoint)."""
    return [off for key, v, _, off in read_topic(w.bootstrap, w.config.topics.models)
            if v is not None and key is not None and b"\0" in key and parse_key(key)[1] == agent]  # fmt: skip


def with_learning_period(data: dict[str, Any]) -> None:
    for t in data["tables"]:
        t["learning"] = {"writes": 200, "seconds": 86400}  # the deployment's default
        # The history is compressed (a write every few minutes) and the live fleet writes several a second: rhythm
        # rightly calls that a burst. This test is about the value models being warm, so it leaves rhythm out.
        t["detectors"] = [d for d in t["detectors"] if d.get("kind") != "rhythm"]


def test_learn_then_a_worker_starts_warm_and_quarantines_a_rogue_at_once(kafka: LocalKafka, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    cfg_path = make_config(tmp_path, kafka.bootstrap_servers, prefix, with_learning_period)
    cfg = load_config(cfg_path)
    kafka.create_topics({cfg.tables[0].topic: 3, cfg.tables[1].topic: 3})
    fleet = Fleet(n_agents=6, seed=21, prefix=prefix)
    # Four days of history, each agent writing every few minutes: past the learning period (200 writes, a day).
    t0 = now_us() - 4 * 86400 * S
    history = list(fleet.stream(4_000, t0, speedup=0.0005))
    assert history[-1].commit_ts_us < now_us()
    events = tmp_path / "history.jsonl"
    events.write_bytes(b"\n".join(r.value for r in history) + b"\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "learn", "--events", str(events), "--config", str(cfg_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "events/s" in proc.stderr and "model sets" in proc.stderr, proc.stderr

    process = spawn_worker(cfg_path, tmp_path, loglevel="info")
    w = Worker(process, cfg, cfg_path, kafka.bootstrap_servers, prefix)
    try:
        live_t0 = max(history[-1].commit_ts_us + S, now_us() - 600 * S)
        live = list(fleet.stream(300, live_t0))
        produce(w.bootstrap, live)
        w.wait_for("writeguard_events_total", len(live))
        assert records(w, cfg.topics.alerts) == []  # not even a learning alert: the agents' models are warm
        # The gauge (refreshed every 5 s) counts agents' and population models still learning: none.
        poll("writeguard_learning_models == 0", lambda: ((v := w.total("writeguard_learning_models")) == 0, v), w)
        rogue = next(a for a in fleet.agents if a.table == "public.refunds")
        rogue.rogue = "inflate"
        t1 = live[-1].commit_ts_us + S
        produce(w.bootstrap, [fleet.write(rogue, t1 + i * 100_000) for i in range(4)])
        got = poll("the rogue's alert", lambda: (bool(a := alerts_of(w, rogue.agent_id)), a), w)
        assert (got[0]["detector"], got[0]["scope"], got[0]["learning"]) == ("zscore", "agent", False), got
        assert got[0]["quarantined"] is True and got[0]["severity"] == "critical", got
    finally:
        w.process.stop()


def test_a_dead_workers_agents_are_judged_by_their_own_models_on_the_survivor(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    with start_pair(kafka, tmp_path, edit=checkpoints_every_second) as pair:
        cfg = pair.config
        parts = cfg.topics.partitions
        fleet = Fleet(n_agents=24, seed=23, prefix=pair.prefix)
        # A rogue whose changes partition (and so its model set) is the victim's: the survivor has never seen it.
        victims = {p for t, p in pair.victim_tps if t == cfg.topics.changes}
        on_victim = [a for a in fleet.agents if partition_for(a.agent_id, parts) in victims]
        # Refunds: an x20 amount is 8 of its spreads away; an order's total also varies with its item count.
        rogue = next((a for a in on_victim if a.table == "public.refunds"), None)
        assert rogue is not None, f"no refunds agent on the victim's changes partitions {sorted(pair.victim_tps)}"
        settle(pair, list(fleet.stream(1440, now_us() - 300 * S)))
        assert rogue.written >= 40, rogue.written  # past its own model's warm-up (30)

        def rogue_checkpointed() -> tuple[bool, int]:
            n = len([o for k, v, _, o in read_topic(pair.group.bootstrap, cfg.topics.models)
                     if v is not None and k == f"{rogue.table}\0{rogue.agent_id}".encode()])  # fmt: skip
            return n > 0, n

        poll("the rogue's checkpoint", rogue_checkpointed, pair.survivor_alive)
        os.killpg(pair.victim.proc.pid, signal.SIGKILL)
        pair.victim.proc.wait(30)

        rogue.rogue = "inflate"
        t = now_us()
        burst = [fleet.write(rogue, t + i * 20_000) for i in range(8)]
        produce_all(pair.group.bootstrap, [(r.topic, None, r.key, r.value) for r in burst])

        def alerted() -> tuple[bool, list[dict[str, Any]]]:
            got = [json.loads(v) for _, v, _, _ in read_topic(pair.group.bootstrap, cfg.topics.alerts) if v]
            got = [a for a in got if a["agent_id"] == rogue.agent_id]
            return bool(got), got

        got = poll(f"an alert for {rogue.agent_id} from the survivor", alerted, pair.survivor_alive)
        # Its own model, restored from the victim's checkpoints: a cold survivor would judge it by the population.
        assert (got[0]["detector"], got[0]["scope"], got[0]["quarantined"]) == ("zscore", "agent", True), got
