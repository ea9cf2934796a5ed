"""``python -m testbed demo`` as a user runs it: its own process, here against the session's broker.

Every process the demo starts inherits its environment, so a marker variable finds them all in /proc, even
those started in a new session (the worker) that its process group would not show.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from testbed.broker import LocalKafka
from testbed.process import ROOT
from tests.integration.conftest import process_group_exists

pytestmark = pytest.mark.integration

# The rogue, refund-agent-02, writes ~2.7 times a second: after 16 s it is ~40 writes into its own model, past
# the 30-write warm-up, as after the default 20 s.
WARMUP_S = 16
MARKER = "WRITEGUARD_DEMO_TEST"


def marked(token: str) -> set[int]:
    """Live processes whose environment holds MARKER=token."""
    want = f"{MARKER}={token}".encode()
    out: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if want in env.split(b"\0"):
            out.add(int(d.name))
    return out


def test_demo_quarantines_the_rogue_with_no_false_alarm_and_leaves_no_process(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    log = tmp_path / "demo.out"
    cmd = [
        sys.executable,
        "-m",
        "testbed",
        "demo",
        "--bootstrap-servers",
        kafka.bootstrap_servers,
        "--warmup",
        str(WARMUP_S),
    ]
    env = {**os.environ, MARKER: token, "PYTHONUNBUFFERED": "1"}
    seen: set[int] = set()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None:
        seen |= marked(token)
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)  # the demo stops what it started on SIGTERM
            proc.wait(60)
            pytest.fail(f"the demo did not end within 300 s:\n{log.read_text()}")
        time.sleep(0.5)
    left = marked(token)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert left == set(), (left, text)

    worker = re.search(r"worker running \(pid (\d+)\)", text)
    assert worker is not None, text
    pid = int(worker.group(1))
    assert pid in seen, (pid, seen)  # the scan did see the demo's worker while it ran
    assert not process_group_exists(pid), text  # the worker leads its own group: nothing of it is left

    rogue = re.search(r"\] (\S+) goes rogue", text)
    assert rogue is not None, text
    agent = rogue.group(1)
    summary = text.split("=== summary ===", 1)
    assert len(summary) == 2, text
    tail = summary[1]
    assert re.search(rf"^quarantined: {re.escape(agent)} \(", tail, re.M), tail
    assert [line for line in tail.splitlines() if line.startswith("quarantined: ")] == [
        line for line in tail.splitlines() if line.startswith(f"quarantined: {agent} ")
    ], tail
    assert re.search(r"^alerts on other agents \(false alarms\): 0$", tail, re.M), tail
    # This run's rogue writes made the alert: it needs 2 anomalous writes, a stale quarantine would show none.
    writes = re.search(r"rogue writes that landed before the alert: (\d+)", tail)
    assert writes is not None and int(writes.group(1)) >= 2, tail

    kept = re.search(r"done; logs kept in (\S+)", text)
    assert kept is not None, text
    folder = Path(kept.group(1))
    if folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("writeguard-demo-"):
        shutil.rmtree(folder, ignore_errors=True)


def test_postgres_demo_stops_the_rogue_then_undoes_its_writes_and_checks_them(tmp_path: Path) -> None:
    """``python -m testbed demo --postgres`` as ``make demo-postgres`` runs it: its own Kafka, PostgreSQL, Connect."""
    token = uuid.uuid4().hex
    log = tmp_path / "demo-postgres.out"
    cmd = [sys.executable, "-m", "testbed", "demo", "--postgres", "--warmup", str(WARMUP_S)]
    env = {**os.environ, MARKER: token, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 420
    while proc.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            pytest.fail(f"the demo did not end within 420 s:\n{log.read_text()}")
        time.sleep(0.5)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert marked(token) == set(), text  # no JVM, PostgreSQL or worker left behind

    rogue = re.search(r"\] (\S+) goes rogue", text)
    assert rogue is not None, text
    agent = rogue.group(1)
    assert f"{agent}'s next write was REFUSED by PostgreSQL" in text, text
    summary, _, undo = text.partition("=== undo ===")
    assert re.search(r"^alerts on other agents \(false alarms\): 0$", summary, re.M), summary
    landed = re.search(r"rogue rows that landed: (\d+)", summary)
    assert landed is not None and int(landed.group(1)) >= 1, summary
    created = int(landed.group(1))
    # The quarantine alert's own command, then each step as a user runs it.
    command = re.search(rf"names its undo: (writeguard undo plan -c CONFIG --agent {agent} --since \S+ -o \S+)", undo)
    assert command is not None, undo
    assert f"$ writeguard scope -c CONFIG --agent {agent} --since" in undo, undo
    assert re.search(rf"^\s+public\.refunds: {created} rows created, 2 rows updated, amount \+", undo, re.M), undo
    assert f"$ {command.group(1)}" in undo, undo
    plan = re.search(r"^\s+plan ([0-9a-f]{64}): (\d+) steps, 0 conflicts", undo, re.M)
    assert plan is not None and int(plan.group(2)) == created + 2, undo
    assert re.search(rf"^\s+public\.refunds: {created} delete, 2 update; 0 conflicts, amount -", undo, re.M), undo
    assert re.search(rf"^\s+plan {plan.group(1)}: applied by \S+; {created + 2} steps", undo, re.M), undo
    # The check the demo makes in PostgreSQL, and its verdict (the demo exits 1 when it fails).
    assert f"check in PostgreSQL: the rogue's {created} refunds are gone" in undo, undo
    assert len(re.findall(r"\(the rogue had rewritten it to ~20x\) holds its old value again", undo)) == 2, undo
    assert "the undo is applied and checked" in undo, undo
    kept = re.search(r"done; logs kept in (\S+)", text)
    assert kept is not None, text
    folder = Path(kept.group(1))
    if folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("writeguard-demo-"):
        shutil.rmtree(folder, ignore_errors=True)
