"""``python -m testbed demo --postgres``: the same story on the real path, ending with the rogue agent's writes undone.

Agents log in to a local PostgreSQL as their own roles and run real SQL; Debezium on Kafka Connect turns
their commits into change events; the worker alerts and REVOKEs the rogue role's write privileges. Then, as an
on-call engineer would, the demo runs the undo that the quarantine alert names (``writeguard scope``, ``undo plan``,
``undo show``, ``undo apply``, each in its own process, reading Kafka) and checks in PostgreSQL that the rogue's
rows are gone and the rows it changed hold their old values again.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from testbed.demo import Clock, print_alert
from testbed.process import ROOT, interrupt_on_sigterm
from testbed.stack import Stack, start_stack

# The refunds the rogue rewrites in its first bad transaction, besides the one it inserts.
CHANGED = 2
OTHERS_REFUNDS = """SELECT id, order_id, amount, agent_id, run_id FROM public.refunds
    WHERE agent_id <> %s ORDER BY id DESC LIMIT %s"""
REFUNDS_BY_ID = "SELECT id, order_id, amount, agent_id, run_id FROM public.refunds WHERE id = ANY(%s) ORDER BY id"


@dataclass
class SqlAgent:
    role: str
    table: str
    mean: float
    rate_per_s: float
    conn: Any = None
    written: int = 0


def _write(a: SqlAgent, rng: random.Random, factor: float = 1.0) -> int:
    """One insert; the new row's id."""
    value = round(a.mean * math.exp(rng.gauss(0.0, 0.3)) * factor, 2)
    if a.table == "public.refunds":
        row = a.conn.execute(
            "INSERT INTO public.refunds (order_id, amount, agent_id, run_id) VALUES (%s, %s, %s, %s) RETURNING id",
            (rng.randint(1, 90_000), value, a.role, "run-demo"),
        ).fetchone()
    else:
        row = a.conn.execute(
            "INSERT INTO public.orders (total, items, agent_id, run_id) VALUES (%s, %s, %s, %s) RETURNING id",
            (value, 1 + rng.randrange(3), a.role, "run-demo"),
        ).fetchone()
    assert row is not None
    a.written += 1
    return int(row[0])


@dataclass
class RogueDamage:
    """What the rogue wrote once it went rogue: the refunds it created, and those it rewrote (as they were)."""

    created: list[int] = field(default_factory=list)
    changed: list[tuple[Any, ...]] = field(default_factory=list)
    updates: int = 0


def _first_rogue_write(a: SqlAgent, rng: random.Random, damage: RogueDamage) -> None:
    """One transaction: a refund at ~20x, and two other agents' refunds rewritten to ~20x, stamped with its id."""
    others = a.conn.execute(OTHERS_REFUNDS, (a.role, CHANGED)).fetchall()
    with a.conn.transaction():
        rid = _write(a, rng, 20.0)
        cur = a.conn.execute(
            "UPDATE public.refunds SET amount = round((amount * 20)::numeric, 2), agent_id = %s WHERE id = ANY(%s)",
            (a.role, [r[0] for r in others]),
        )
    damage.created.append(rid)
    damage.changed = sorted(others)
    damage.updates = cur.rowcount


def run_postgres_demo(*, warmup_s: float = 20.0, n_agents: int = 12, seed: int = 11) -> int:
    import psycopg
    from psycopg import errors

    clock = Clock()
    interrupt_on_sigterm()  # run the finally below: nothing may outlive the demo
    rng = random.Random(seed)
    agents = [
        SqlAgent(
            role=f"agent_{'refund' if i % 2 == 0 else 'order'}_{i:02d}",
            table="public.refunds" if i % 2 == 0 else "public.orders",
            mean=rng.uniform(15, 120),
            rate_per_s=rng.uniform(1.8, 3.0),
        )
        for i in range(n_agents)
    ]
    workdir = Path(tempfile.mkdtemp(prefix="writeguard-demo-pg-"))
    stack: Stack | None = None
    try:
        stack = start_stack(
            workdir, [a.role for a in agents], progress=clock.say, loglevel="warning", edit_config=_undo_database
        )
        watch = Consumer(
            {
                "bootstrap.servers": stack.kafka.bootstrap_servers,
                "group.id": f"writeguard-demo-{os.getpid()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        watch.subscribe([stack.config.topics.alerts, stack.config.topics.control])
        for a in agents:
            a.conn = stack.agent(a.role)
        clock.say(
            f"fleet: {len(agents)} agents, each logged in as its own PostgreSQL role, inserting into "
            f"public.refunds and public.orders (~{sum(a.rate_per_s for a in agents):.0f} commits/s)"
        )
        rogue = agents[2]
        due = {a.role: time.monotonic() + rng.expovariate(a.rate_per_s) for a in agents}
        rogue_at = time.monotonic() + warmup_s
        rogue_rows = 0
        damage = RogueDamage()
        refused: str | None = None
        alerts: list[dict[str, Any]] = []
        enforced: dict[str, Any] | None = None
        deadline = rogue_at + 60
        last = time.monotonic()
        while time.monotonic() < deadline and refused is None:
            now = time.monotonic()
            if now - last >= 5 and now < rogue_at:
                last = now
                clock.say(f"fleet: {sum(a.written for a in agents):,} rows committed, no alert expected")
            enforced = _show(watch, 0.0, stack.config.topics.alerts, alerts, clock, enforced)
            a = min(agents, key=lambda x: due[x.role])
            wait = due[a.role] - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.02))
                continue
            due[a.role] += rng.expovariate(a.rate_per_s)
            is_rogue = a is rogue and time.monotonic() >= rogue_at
            if is_rogue and rogue_rows == 0:
                clock.say(f"{a.role} goes rogue: its refunds are now ~20x the usual amount")
                due[a.role] = time.monotonic()  # and it hurries: one commit after another
            try:
                if is_rogue and rogue_rows == 0:
                    _first_rogue_write(a, rng, damage)
                elif is_rogue:
                    damage.created.append(_write(a, rng, 20.0))
                else:
                    _write(a, rng)
            except errors.InsufficientPrivilege as e:
                refused = str(e).strip()
                clock.say(f"{a.role}'s next write was REFUSED by PostgreSQL: {refused}")
                break
            except (errors.AdminShutdown, psycopg.OperationalError):
                clock.say(f"{a.role}'s session was ended by the quarantine; it reconnects and tries again")
                a.conn = stack.agent(a.role)
                continue
            if is_rogue:
                rogue_rows += 1
                due[a.role] = time.monotonic() + 0.05
        # The worker publishes the enforcement record right after the REVOKE, and the alert just before it: the
        # refusal may come first. Give them a moment to show.
        end = time.monotonic() + 5
        while (enforced is None or _undo_alert(alerts, rogue.role) is None) and time.monotonic() < end:
            enforced = _show(watch, 0.2, stack.config.topics.alerts, alerts, clock, enforced)
        watch.close()
        for a in agents:
            a.conn.close()
        print()
        print("=== summary ===")
        print(f"rows committed by the fleet: {sum(a.written for a in agents):,}; rogue rows that landed: {rogue_rows}")
        first = next((x for x in alerts if x["agent_id"] == rogue.role), None)
        if first is not None:
            print(f"commit -> alert lag: {first['lag_ms']:.0f} ms")
        print(f"alerts on other agents (false alarms): {sum(1 for x in alerts if x['agent_id'] != rogue.role)}")
        if refused is None:
            print(f"{rogue.role} was NOT stopped")
            return 1
        print(
            f"{rogue.role} is quarantined in PostgreSQL; `writeguard release {rogue.role} --reason ... "
            f"--config CONFIG` would grant its writes back"
        )
        alert = _undo_alert(alerts, rogue.role)
        if alert is None:
            print(f"no quarantine alert of {rogue.role} naming its undo command was seen")
            return 1
        # Every commit on Kafka before the scope reads it: the worker has scored each one (the rogue's updates too).
        stack.wait_events(sum(a.written for a in agents) + damage.updates, timeout=60)
        print()
        print("=== undo ===")
        return 0 if undo_the_rogue(stack, clock, str(alert["undo_command"]), damage, workdir) else 1
    finally:
        if stack is not None:
            clock.say("stopping the worker, Kafka Connect, PostgreSQL and Kafka ...")
            stack.stop()
        clock.say(f"done; logs kept in {workdir}")


def _undo_database(data: dict[str, Any]) -> None:
    """``undo apply`` writes to the shop database as its owner, the role that enforces the quarantine."""
    data["undo"] = {"dsn": data["enforcement"]["postgres"]["dsn"]}


def _show(
    watch: Any, timeout: float, alerts_topic: str, alerts: list[dict[str, Any]], clock: Clock, enforced: Any
) -> Any:
    """Print what the worker published since the last call: alerts (kept in ``alerts``), and the first control
    record that reports an enforcement; returns that record (``enforced`` when it came before)."""
    for msg in watch.consume(50, timeout=timeout):
        value = msg.value()
        if msg.error() or value is None:
            continue
        body = json.loads(value)
        if msg.topic() == alerts_topic:
            alerts.append(body)
            print_alert(clock, body)
        elif body.get("enforcement") and enforced is None:
            enforced = body
            for r in body["enforcement"]:
                clock.say(f"ENFORCED in PostgreSQL: {r['detail']}")
    return enforced


def _undo_alert(alerts: list[dict[str, Any]], agent: str) -> dict[str, Any] | None:
    return next((x for x in alerts if x["agent_id"] == agent and x.get("undo_command")), None)


def _writeguard(clock: Clock, args: list[str], shown: list[str] | None = None) -> str:
    """``writeguard ARGS`` in its own process, as a user runs it; its stdout. Raises with its stderr if it fails."""
    clock.say("$ writeguard " + shlex.join(shown or args))
    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    if r.returncode != 0:
        raise RuntimeError(f"writeguard {args[0]} exited with {r.returncode}:\n{r.stderr}")
    return r.stdout


def _indented(text: str) -> None:
    for line in text.splitlines():
        print(f"          {line}")


def undo_the_rogue(stack: Stack, clock: Clock, command: str, damage: RogueDamage, workdir: Path) -> bool:
    """Run the undo the alert names (scope, plan, show, apply), then check the rows in PostgreSQL."""
    clock.say(f"the quarantine alert names its undo: {command}")
    words = shlex.split(command)  # writeguard undo plan -c CONFIG --agent ID --since TIME -o undo-plan.json
    selection = words[words.index("--agent") : words.index("--agent") + 4]
    config, plan = str(stack.config_path), str(workdir / "undo-plan.json")
    _indented(_writeguard(clock, ["scope", "-c", config, *selection], ["scope", "-c", "CONFIG", *selection]))
    args = [config if w == "CONFIG" else plan if w == "undo-plan.json" else w for w in words[1:]]
    _indented(_writeguard(clock, args, words[1:]))
    shown = _writeguard(clock, ["undo", "show", plan], ["undo", "show", "undo-plan.json"])
    sql_lines = ("-- ", "DELETE ", "UPDATE ", "INSERT ")  # the summary only: each step's SQL is in the file
    _indented("\n".join(line for line in shown.splitlines() if not line.startswith(sql_lines)))
    # undo.dsn in the config names the database (the stack's: as its owner).
    applied = _writeguard(
        clock, ["undo", "apply", plan, "-c", config], ["undo", "apply", "undo-plan.json", "-c", "CONFIG"]
    )
    _indented(applied)
    with stack.pg.connect(dbname="shop") as c:
        left = c.execute("SELECT id FROM public.refunds WHERE id = ANY(%s) ORDER BY id", (damage.created,)).fetchall()
        now = c.execute(REFUNDS_BY_ID, ([r[0] for r in damage.changed],)).fetchall()
    gone = not left
    restored = now == damage.changed and len(now) == CHANGED
    clock.say(
        f"check in PostgreSQL: the rogue's {len(damage.created)} refunds are "
        + ("gone" if gone else f"NOT gone ({len(left)} left: {[r[0] for r in left]})")
    )
    for before in damage.changed:
        after = next((r for r in now if r[0] == before[0]), None)
        held = "holds its old value again" if after == before else f"does NOT hold its old value: {after}"
        clock.say(f"check in PostgreSQL: refund {before[0]} (the rogue had rewritten it to ~20x) {held}: "
                  f"amount {before[2]:,.2f}, agent {before[3]}")  # fmt: skip
    if not (gone and restored):
        print("the undo did NOT bring the tables back")
        return False
    print("the undo is applied and checked: the rogue's refunds are gone, the refunds it rewrote are as they were")
    return True
