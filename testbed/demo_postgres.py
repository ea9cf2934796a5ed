"""``python -m testbed demo --postgres``: the same story on the real path, ending with the rogue agent's write refused.

Agents log in to a local PostgreSQL as their own roles and run real SQL; Debezium on Kafka Connect turns
their commits into change events; the worker alerts and REVOKEs the rogue role's write privileges.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from testbed.demo import Clock, print_alert
from testbed.process import interrupt_on_sigterm
from testbed.stack import Stack, start_stack


@dataclass
class SqlAgent:
    role: str
    table: str
    mean: float
    rate_per_s: float
    conn: Any = None
    written: int = 0


def _write(a: SqlAgent, rng: random.Random, factor: float = 1.0) -> None:
    value = round(a.mean * math.exp(rng.gauss(0.0, 0.3)) * factor, 2)
    if a.table == "public.refunds":
        a.conn.execute(
            "INSERT INTO public.refunds (order_id, amount, agent_id, run_id) VALUES (%s, %s, %s, %s)",
            (rng.randint(1, 90_000), value, a.role, "run-demo"),
        )
    else:
        a.conn.execute(
            "INSERT INTO public.orders (total, items, agent_id, run_id) VALUES (%s, %s, %s, %s)",
            (value, 1 + rng.randrange(3), a.role, "run-demo"),
        )
    a.written += 1


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
        stack = start_stack(workdir, [a.role for a in agents], progress=clock.say, loglevel="warning")
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
            for msg in watch.consume(50, timeout=0):
                value = msg.value()
                if msg.error() or value is None:
                    continue
                body = json.loads(value)
                if msg.topic() == stack.config.topics.alerts:
                    alerts.append(body)
                    print_alert(clock, body)
                elif body.get("enforcement") and enforced is None:
                    enforced = body
                    for r in body["enforcement"]:
                        clock.say(f"ENFORCED in PostgreSQL: {r['detail']}")
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
                _write(a, rng, 20.0 if is_rogue else 1.0)
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
        # The worker publishes the enforcement record right after the REVOKE; give it a moment to show.
        end = time.monotonic() + 2
        while enforced is None and time.monotonic() < end:
            for msg in watch.consume(50, timeout=0.2):
                value = msg.value()
                if not msg.error() and value is not None and msg.topic() == stack.config.topics.control:
                    body = json.loads(value)
                    if body.get("enforcement"):
                        enforced = body
                        for r in body["enforcement"]:
                            clock.say(f"ENFORCED in PostgreSQL: {r['detail']}")
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
        return 0
    finally:
        if stack is not None:
            clock.say("stopping the worker, Kafka Connect, PostgreSQL and Kafka ...")
            stack.stop()
        clock.say(f"done; logs kept in {workdir}")
