"""What the worker remembers, through real worker processes on the real broker.

- Model sets evicted to the worker's store under ``worker.max_agents`` come back with what they learned.
- Top-level ``suppressions:`` silence the covered agent inside the window only.
- ``writeguard release --false-positive`` teaches the agent's model; a plain release does not.
- A new worker process rebuilds the quarantine from the control topic.

Two workers: ``evicting`` (``max_agents: 4``) for the first two tests, and ``shop``, shared in file order by
the others. Each test on ``shop`` uses its own agents and its own span of commit time, and releases the agents
it quarantined, so that the restart test, which replaces the worker process and comes last, starts with none.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from detectors.spec import RateSpec
from testbed.broker import LocalKafka
from testbed.fleet import Fleet, Record
from testbed.process import ROOT, spawn_worker
from tests.integration.conftest import Worker, poll_worker, produce, read_topic, start_worker

pytestmark = pytest.mark.integration

S = 1_000_000  # µs per second
MAX_AGENTS = 4
ROGUE = "refund-agent-02"


def now_us() -> int:
    return time.time_ns() // 1000




def messages(w: Worker, topic: str) -> list[dict[str, Any]]:
    return [json.loads(v) for _, v, _, _ in read_topic(w.bootstrap, topic) if v is not None]



def gauge(w: Worker, name: str) -> float | None:
    try:
        return w.total(name)
    except OSError:
        return None


def wait_gauge(w: Worker, name: str, ok: Callable[[float], bool], what: str) -> float:
    """Gauges refresh every 5 s (and some on every control record): poll for the value."""

    def probe() -> tuple[bool, float | None]:
        v = gauge(w, name)
        return v is not None and ok(v), v

    return float(poll_worker(f"{name} {what}", probe, w))


def wait_alerts(w: Worker, match: Callable[[dict[str, Any]], bool], what: str) -> list[dict[str, Any]]:
    def probe() -> tuple[bool, list[dict[str, Any]]]:
        got = [a for a in messages(w, w.config.topics.alerts) if match(a)]
        return bool(got), got

    return list(poll_worker(f"alert for {what}", probe, w))


def of_agent(agent: str) -> Callable[[dict[str, Any]], bool]:
    return lambda a: bool(a["agent_id"] == agent)


def alerts_for(w: Worker, agent: str) -> list[dict[str, Any]]:
    return [a for a in messages(w, w.config.topics.alerts) if a["agent_id"] == agent]


def control_for(w: Worker, agent: str) -> list[dict[str, Any]]:
    return [c for c in messages(w, w.config.topics.control) if c["agent_id"] == agent]


def release(w: Worker, agent: str, reason: str, *, false_positive: bool = False) -> None:
    """``writeguard release`` as an operator runs it, in its own process."""
    cmd = [sys.executable, "-m", "stream.cli", "release", agent, "--reason", reason, "--config", str(w.config_path)]
    if false_positive:
        cmd.append("--false-positive")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"released {agent!r}" in out.stdout, out.stdout


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / S, UTC).isoformat()


# ---------------------------------------------------------------------------------------------------------------
# Eviction to the worker's own store


@pytest.fixture(scope="module")
def evicting(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Fleet]]:
    def edit(data: dict[str, Any]) -> None:
        data["worker"]["max_agents"] = MAX_AGENTS

    w = start_worker(kafka, Path(tmp_path_factory.mktemp("evicting")), edit=edit)
    try:
        yield w, Fleet(n_agents=12, seed=5, prefix=w.prefix)  # 12 (table, agent) pairs for 4 places
    finally:
        w.process.stop()


def test_an_evicted_agent_is_restored_with_what_it_learned(evicting: tuple[Worker, Fleet]) -> None:
    w, fleet = evicting
    normal = list(fleet.stream(3_000, now_us() - 900 * S))
    produce(w.bootstrap, normal)
    w.wait_for("writeguard_events_total", len(normal))
    # 12 pairs went through 4 places: at least 8 model sets went to the store, and 4 are held.
    evicted = wait_gauge(w, "writeguard_evicted_models", lambda v: v >= 12 - MAX_AGENTS, ">= 8")
    wait_gauge(w, "writeguard_active_models", lambda v: v == MAX_AGENTS, f"== {MAX_AGENTS}")

    rogue = fleet.agent(ROGUE)
    learned = rogue.written
    assert learned >= 100, learned  # far past its zscore warm-up (30)
    # Every other agent writes after the rogue's last write: 11 pairs through 4 places, so the rogue's model set
    # is in the store now, whatever order the CDC partitions were read in.
    t = max(r.commit_ts_us for r in normal) + S
    others = [a for a in fleet.agents if a is not rogue]
    evict = [fleet.write(a, t + i * 10_000) for i, a in enumerate(others * 2)]
    produce(w.bootstrap, evict)
    w.wait_for("writeguard_events_total", len(normal) + len(evict))
    wait_gauge(w, "writeguard_evicted_models", lambda v: v > evicted, f"> {evicted}")
    # Nearly every one of those normal writes restored an agent's model set: none of them alerted.
    assert messages(w, w.config.topics.alerts) == []
    assert w.total("writeguard_alerts_total") == 0

    rogue.rogue = "inflate"
    bad = [fleet.write(rogue, t + 10 * S + i * 20_000) for i in range(40)]
    produce(w.bootstrap, bad)
    first = wait_alerts(w, of_agent(ROGUE), ROGUE)[0]
    # A cold model set would still be in its warm-up: judged by the population model (detector
    # "zscore.population", scope "population") or by nothing. Its own restored model alerted, counting every write.
    assert (first["detector"], first["scope"], first["table"]) == ("zscore", "agent", rogue.table), first
    assert learned + 2 <= first["agent_events"] <= learned + len(bad), (first["agent_events"], learned)
    top = first["explanation"][0]
    assert top["feature"] == "amount" and top["expected_low"] < rogue.mean_amount < top["expected_high"], top
    assert top["value"] > top["expected_high"]
    assert first["quarantined"] is True
    assert {a["agent_id"] for a in messages(w, w.config.topics.alerts)} == {ROGUE}


def test_a_released_agent_whose_models_were_evicted_is_alerted_on_again(evicting: tuple[Worker, Fleet]) -> None:
    w, fleet = evicting
    agent, sentinel = fleet.agent("refund-agent-04"), fleet.agent("refund-agent-06")
    t = now_us()
    agent.rogue = "inflate"
    produce(w.bootstrap, [fleet.write(agent, t + i * 20_000) for i in range(10)])
    first = wait_alerts(w, of_agent(agent.agent_id), agent.agent_id)
    assert first[0]["quarantined"] is True
    agent.rogue = None
    before = w.total("writeguard_events_total")
    others = [a for a in fleet.agents if a is not agent]
    evict = [fleet.write(a, t + S + i * 10_000) for i, a in enumerate(others)]
    produce(w.bootstrap, evict)  # 11 other pairs after its last write: its model set is in the store
    w.wait_for("writeguard_events_total", before + len(evict))
    held = wait_gauge(w, "writeguard_quarantined_agents", lambda v: v >= 1, ">= 1")
    release(w, agent.agent_id, "fixed")
    wait_gauge(w, "writeguard_quarantined_agents", lambda v: v == held - 1, f"== {held - 1}")

    agent.rogue = "inflate"  # the same misbehaviour again, after the release
    produce(w.bootstrap, [fleet.write(agent, t + 5 * S + i * 20_000) for i in range(10)])
    sentinel.rogue = "inflate"  # a later incident: once it is alerted on, the writes above have been judged
    produce(w.bootstrap, [fleet.write(sentinel, t + 6 * S + i * 20_000) for i in range(10)])
    wait_alerts(w, of_agent(sentinel.agent_id), sentinel.agent_id)
    again = alerts_for(w, agent.agent_id)
    assert len(again) == 2 and again[1]["quarantined"] is True, again


# ---------------------------------------------------------------------------------------------------------------
# One shared worker: suppressions, false positives, restart

SUPPRESSED = "refund-agent-04"  # covered by the suppression window
SUPPRESSED_TOO = "refund-agent-00"  # covered too (the window's overrun case)
UNCOVERED = "refund-agent-06"
SENTINEL = "refund-agent-12"
FALSE_POSITIVE = "refund-agent-08"
PLAIN = "refund-agent-10"


@dataclass
class Shop:
    worker: Worker
    fleet: Fleet
    t0: int  # µs: commit time of the first warm-up write; each test works in its own span after it
    window: tuple[int, int]  # the suppression window, µs
    tmp: Path
    sent: int = 0  # valid change events produced to the current worker process

    def send(self, recs: list[Record]) -> list[tuple[int, int]]:
        """Produce and wait until the worker has scored them all."""
        where = produce(self.worker.bootstrap, recs)
        self.sent += len(recs)
        self.worker.wait_for("writeguard_events_total", self.sent)
        return where

    def burst(self, agent: str, start_us: int, n: int, step_us: int = 100_000) -> list[Record]:
        a = self.fleet.agent(agent)
        return [self.fleet.write(a, start_us + i * step_us) for i in range(n)]


@pytest.fixture(scope="module")
def shop(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    tmp = Path(tmp_path_factory.mktemp("shop"))
    t0 = now_us() - 3 * 3600 * S
    window = (t0 + 1000 * S, t0 + 1200 * S)

    def edit(data: dict[str, Any]) -> None:
        data["suppressions"] = [
            {
                "from": iso(window[0]),
                "to": iso(window[1]),
                "reason": "planned refund migration",
                "tables": ["public.refunds"],
                "agents": [SUPPRESSED, SUPPRESSED_TOO],
                "detectors": ["zscore"],
            }
        ]

    w = start_worker(kafka, tmp, edit=edit)
    s = Shop(w, Fleet(n_agents=16, seed=5, prefix=w.prefix), t0, window, tmp)
    try:
        s.send(list(s.fleet.stream(5_000, t0)))  # ~90 s of commit time: every agent past its warm-up
        assert min(a.written for a in s.fleet.agents) >= 100  # every agent far past its warm-up (30)
        assert messages(w, w.config.topics.alerts) == []
        yield s
    finally:
        s.worker.process.stop()


def release_all(shop: Shop, agents: Iterable[str]) -> None:
    """Leave no agent quarantined for the next test (releasing one that is not quarantined changes nothing)."""
    for agent in agents:
        release(shop.worker, agent, "test cleanup")
    wait_gauge(shop.worker, "writeguard_quarantined_agents", lambda v: v == 0, "== 0 after the cleanup")


def test_a_suppression_window_silences_the_covered_agent_inside_it_only(shop: Shop) -> None:
    w, (start, end) = shop.worker, shop.window
    covered, other = shop.fleet.agent(SUPPRESSED), shop.fleet.agent(UNCOVERED)
    try:
        covered.rogue = "inflate"
        shop.send(shop.burst(SUPPRESSED, start + 10 * S, 20))
        # Scored and counted: each write that would have alerted is a suppressed finding.
        wait_gauge(w, "writeguard_suppressed_findings", lambda v: v >= 1, ">= 1")

        other.rogue = "inflate"  # the same writes, the same time, an agent the window does not name
        shop.send(shop.burst(UNCOVERED, start + 30 * S, 20))
        alert = wait_alerts(w, of_agent(UNCOVERED), UNCOVERED)[0]
        assert alert["detector"] == "zscore" and alert["scope"] == "agent" and alert["quarantined"] is True
        assert start <= datetime.fromisoformat(alert["commit_ts"]).timestamp() * S < end
        # The covered agent's writes were all scored before the uncovered agent's: no alert for it.
        assert alerts_for(w, SUPPRESSED) == []
        assert control_for(w, SUPPRESSED) == []
        inside = w.total("writeguard_suppressed_findings")
        assert inside >= 1

        # After the window: a few normal writes close the incident, then the same writes are alerted on.
        covered.rogue = None
        shop.send(shop.burst(SUPPRESSED, end + 10 * S, 6, S))
        covered.rogue = "inflate"
        shop.send(shop.burst(SUPPRESSED, end + 60 * S, 20))
        after = wait_alerts(w, of_agent(SUPPRESSED), SUPPRESSED)
        assert len(after) == 1 and after[0]["detector"] == "zscore" and after[0]["quarantined"] is True, after
        assert datetime.fromisoformat(after[0]["commit_ts"]).timestamp() * S >= end
        assert w.total("writeguard_suppressed_findings") == inside  # nothing is suppressed after the window
    finally:
        covered.rogue = other.rogue = None
        release_all(shop, [SUPPRESSED, UNCOVERED])


def test_an_anomaly_that_goes_on_past_the_window_is_alerted_after_it(shop: Shop) -> None:
    w, end = shop.worker, shop.window[1]
    covered, sentinel = shop.fleet.agent(SUPPRESSED_TOO), shop.fleet.agent(SENTINEL)
    try:
        suppressed = w.total("writeguard_suppressed_findings")
        covered.rogue = "inflate"
        shop.send(shop.burst(SUPPRESSED_TOO, end - 5 * S, 10))  # starts inside the window ...
        wait_gauge(w, "writeguard_suppressed_findings", lambda v: v > suppressed, f"> {suppressed}")
        shop.send(shop.burst(SUPPRESSED_TOO, end + 5 * S, 20))  # ... and goes on after it
        sentinel.rogue = "inflate"  # a later incident: once it is alerted on, the writes above have been judged
        shop.send(shop.burst(SENTINEL, end + 30 * S, 20))
        wait_alerts(w, of_agent(SENTINEL), SENTINEL)
        after = alerts_for(w, SUPPRESSED_TOO)
        assert after and datetime.fromisoformat(after[0]["commit_ts"]).timestamp() * S >= end, after
    finally:
        covered.rogue = sentinel.rogue = None
        release_all(shop, [SUPPRESSED_TOO, SENTINEL])


def test_release_false_positive_teaches_the_model_and_a_plain_release_does_not(shop: Shop) -> None:
    w = shop.worker
    wait_gauge(w, "writeguard_quarantined_agents", lambda v: v == 0, "== 0 before the test")
    t = shop.t0 + 1500 * S
    first: dict[str, dict[str, Any]] = {}
    try:
        for agent, false_positive in ((FALSE_POSITIVE, True), (PLAIN, False)):
            # Refunds twenty times larger, from now on: its new normal. Alerted on and quarantined; its later
            # writes (all anomalous for its model) stay part of the incident.
            shop.fleet.agent(agent).rogue = "inflate"
            shop.send(shop.burst(agent, t, 40))
            alert = wait_alerts(w, of_agent(agent), agent)
            assert len(alert) == 1 and alert[0]["scope"] == "agent" and alert[0]["quarantined"] is True, alert
            first[agent] = alert[0]
            wait_gauge(w, "writeguard_quarantined_agents", lambda v: v == 1, "== 1")
            release(w, agent, "bulk refunds are the new policy", false_positive=false_positive)
            wait_gauge(w, "writeguard_quarantined_agents", lambda v: v == 0, "== 0 after the release")
            t += 100 * S

        released = {a: [c for c in control_for(w, a) if c["state"] == "released"] for a in (FALSE_POSITIVE, PLAIN)}
        assert [c["false_positive"] for c in released[FALSE_POSITIVE]] == [True], released
        assert [c["false_positive"] for c in released[PLAIN]] == [False], released

        # The same writes again, first by the agent released as a false positive, then by the other.
        shop.send(shop.burst(FALSE_POSITIVE, t, 20))
        shop.send(shop.burst(PLAIN, t + 10 * S, 20))
        again = wait_alerts(
            w, lambda a: a["agent_id"] == PLAIN and a["alert_id"] != first[PLAIN]["alert_id"], f"{PLAIN} again"
        )
        assert again[0]["scope"] == "agent" and again[0]["quarantined"] is True, again
        # Its model never learned those amounts; the false positive's did. Its writes came first: nothing new.
        assert alerts_for(w, FALSE_POSITIVE) == [first[FALSE_POSITIVE]]
        assert [c["state"] for c in control_for(w, FALSE_POSITIVE)] == ["quarantined", "released"]
    finally:
        for agent in (FALSE_POSITIVE, PLAIN):
            shop.fleet.agent(agent).rogue = None
        release_all(shop, [FALSE_POSITIVE, PLAIN])


def test_a_new_worker_process_rebuilds_the_quarantine_from_the_control_topic(shop: Shop) -> None:
    w = shop.worker
    wait_gauge(w, "writeguard_quarantined_agents", lambda v: v == 0, "== 0 before the test")
    rogue = shop.fleet.agent(ROGUE)
    rogue.rogue = "inflate"
    shop.send(shop.burst(ROGUE, shop.t0 + 2000 * S, 12))
    alert = wait_alerts(w, of_agent(ROGUE), ROGUE)
    assert len(alert) == 1 and alert[0]["quarantined"] is True, alert
    control = poll_worker("its control record", lambda: (bool(got := control_for(w, ROGUE)), got), w)
    assert [(c["state"], c["alert_id"]) for c in control] == [("quarantined", alert[0]["alert_id"])], control
    wait_gauge(w, "writeguard_quarantined_agents", lambda v: v == 1, "== 1")

    os.killpg(w.proc.pid, signal.SIGTERM)
    try:
        rc = w.proc.wait(60)
    except subprocess.TimeoutExpired:
        w.process.stop()
        raise AssertionError(f"the worker ignored SIGTERM for 60 s:\n{w.process.log_tail()}") from None
    assert rc == 0, w.process.log_tail()

    workdir = shop.tmp / "restarted"
    workdir.mkdir()
    new = Worker(spawn_worker(w.config_path, workdir, loglevel="info"), w.config, w.config_path, w.bootstrap, w.prefix)
    shop.worker, shop.sent = new, 0
    # Read from the control topic, before any new write.
    wait_gauge(new, "writeguard_quarantined_agents", lambda v: v == 1, "== 1 in the new process")

    # More writes than the rate ceiling allows: the rate guard needs no warm-up, so the new process (whose value
    # models start cold) does judge these, and would quarantine the agent if it did not know it already was.
    rogue.rogue = None
    ceiling = next(d.max_events for d in new.config.tables[0].detectors if isinstance(d, RateSpec))
    burst = shop.burst(ROGUE, shop.t0 + 2500 * S, ceiling + 100, 10_000)
    produce(new.bootstrap, burst)
    new.wait_for("writeguard_quarantined_agent_events_total", len(burst))
    rate = wait_alerts(new, lambda a: a["agent_id"] == ROGUE and a["detector"] == "rate", f"{ROGUE} by rate")
    assert len(rate) == 1 and rate[0]["quarantined"] is False, rate
    assert control_for(new, ROGUE) == control  # no second quarantine for the same incident
    assert new.total("writeguard_quarantines_total") == 0
    assert new.total("writeguard_quarantined_agents") == 1
