"""End-to-end ``writeguard replay`` over a simulated fleet with one rogue agent, by subprocess and in process."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from connectors.messages import Alert
from stream.config import EXAMPLE_CONFIG, load_config
from stream.replay import replay
from testbed.fleet import REFUNDS, Fleet

ROOT = Path(__file__).resolve().parents[2]

def without_learning(tmp: Path) -> Path:
    """The example config without its day-long learning period: these runs last minutes of commit time."""
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    for t in data["tables"]:
        t["learning"] = {"writes": 0, "seconds": 0}
    path = tmp / "writeguard.yaml"
    path.write_text(yaml.safe_dump(data))
    return path

START_US = 1_700_000_000_000_000
NORMAL_EVENTS = 4000
ROGUE_EVENTS = 60


@dataclass
class Run:
    events: Path
    config: Path
    lines: list[bytes]
    rogue: str
    rogue_lines: list[int]  # 1-based input lines written by the rogue agent while rogue
    bad_line: int
    tombstone_line: int
    proc: subprocess.CompletedProcess[str]
    alerts: list[Alert]
    alerts_raw: list[dict]
    scores: list[dict]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("replay")
    config = without_learning(tmp)
    fleet = Fleet(n_agents=12, seed=7)
    stream = fleet.stream(10**6, START_US)
    lines = [next(stream).value for _ in range(NORMAL_EVENTS)]
    lines.append(b'{"before": null, "after": {"agent_id": "x"')  # truncated JSON
    bad = len(lines)
    lines.append(b"null")  # a tombstone
    tomb = len(lines)
    agent = next(a for a in fleet.agents if a.table == REFUNDS)
    agent.rogue = "inflate"
    rogue_lines = []
    while agent.rogue_written < ROGUE_EVENTS:
        rec = next(stream)
        lines.append(rec.value)
        if rec.rogue:
            rogue_lines.append(len(lines))
    events = tmp / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")

    alerts_path, scores_path = tmp / "alerts.jsonl", tmp / "scores.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "replay", str(events), "--config", str(config),
         "--alerts", str(alerts_path), "--scores", str(scores_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    alert_lines = alerts_path.read_bytes().splitlines() if alerts_path.exists() else []
    scores = [json.loads(x) for x in scores_path.read_bytes().splitlines()] if scores_path.exists() else []
    return Run(events, config, lines, agent.agent_id, rogue_lines, bad, tomb, proc,
               [Alert.model_validate_json(x) for x in alert_lines], [json.loads(x) for x in alert_lines], scores)


def test_replay_exits_0(run):
    assert run.proc.returncode == 0, run.proc.stderr
    assert run.proc.stdout == ""  # alerts went to --alerts
    assert len(run.rogue_lines) == ROGUE_EVENTS


def test_only_the_rogue_agent_is_alerted(run):
    assert run.alerts, run.proc.stderr
    assert {a.agent_id for a in run.alerts} == {run.rogue}
    assert run.rogue.startswith("refund-agent-")


def test_rogue_is_alerted_within_10_anomalous_events(run):
    first = run.alerts[0]
    assert (first.table, first.detector, first.scope) == ("public.refunds", "zscore", "agent")
    assert first.quarantined is True and first.actions == ["alert", "quarantine"]
    sources = [t.source for t in first.triggering_events]
    assert all(s is not None and s.startswith(f"{run.events}:") for s in sources)
    alert_line = int(sources[-1].rsplit(":", 1)[1])  # the event that raised the alert
    assert alert_line in run.rogue_lines
    assert 2 <= run.rogue_lines.index(alert_line) + 1 <= 10
    assert all(int(s.rsplit(":", 1)[1]) in run.rogue_lines for s in sources)
    assert first.explanation[0].feature == "amount"
    assert "amount = " in first.summary and "expected" in first.summary
    assert sum(a.quarantined for a in run.alerts) == 1


def test_scores_file_lines_match_the_input(run):
    assert run.scores
    assert set(run.scores[0]) == {"line", "table", "agent_id", "op", "detector", "score"}
    scored_lines = set()
    for s in run.scores:
        scored_lines.add(s["line"])
        ev = json.loads(run.lines[s["line"] - 1])  # "line" is 1-based
        row = ev["before"] if ev["op"] == "d" else ev["after"]
        assert s["agent_id"] == row["agent_id"]
        assert s["table"] == f"{ev['source']['schema']}.{ev['source']['table']}"
        assert s["op"] == ev["op"]
        assert s["detector"] in {"zscore", "rate", "op_burst", "op_habit", "rhythm"}  # the example config's
        assert 0.0 <= s["score"] <= 1.0
    # Every decodable line is scored (the guards always score), the bad and null lines are not.
    assert scored_lines == set(range(1, len(run.lines) + 1)) - {run.bad_line, run.tombstone_line}
    rogue_scores = [s["score"] for s in run.scores if s["line"] == run.rogue_lines[5] and s["detector"] == "zscore"]
    assert rogue_scores and rogue_scores[0] >= 0.6


def test_summary_mentions_the_undecodable_line(run):
    err = run.proc.stderr
    assert f"replay: {len(run.lines):,} lines, {len(run.lines) - 2:,} changes scored, {len(run.alerts)} alerts" in err
    assert "1 agents quarantined" in err
    assert "undecodable (would go to the dead-letter topic): invalid_json=1" in err
    assert "skipped: tombstone=1" in err


def test_in_process_replay_gives_the_same_alert_ids(run):
    out = io.BytesIO()
    stats = replay(str(run.events), load_config(run.config), alerts_out=out)
    alerts = [Alert.model_validate_json(x) for x in out.getvalue().splitlines()]
    assert [a.alert_id for a in alerts] == [a.alert_id for a in run.alerts]
    assert [(a.detector, a.triggering_events) for a in alerts] == [
        (a.detector, a.triggering_events) for a in run.alerts]
    assert stats.lines == len(run.lines) and stats.changes == len(run.lines) - 2
    assert stats.alerts == len(run.alerts) and stats.quarantined == [run.rogue]
    assert dict(stats.dead_letters) == {"invalid_json": 1}
    assert dict(stats.skipped) == {"tombstone": 1}


def test_with_the_default_learning_period_the_rogue_only_warns(run: Run) -> None:
    """The example config as shipped: 4,000 writes over minutes are all in the models' learning period, so the
    rogue is still alerted, as learning and at most a warning, and nobody is quarantined."""
    out = io.BytesIO()
    replay(str(run.events), load_config(EXAMPLE_CONFIG), alerts_out=out)
    alerts = [Alert.model_validate_json(x) for x in out.getvalue().splitlines()]
    assert {a.agent_id for a in alerts} == {run.rogue}, [a.summary for a in alerts]
    assert all(a.learning and a.severity in ("info", "warning") and not a.quarantined for a in alerts), alerts
