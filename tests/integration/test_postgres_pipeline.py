"""End to end on the real parts: PostgreSQL -> Debezium (Kafka Connect) -> Kafka -> worker -> REVOKE in PostgreSQL.

Agents connect as their own database roles and write rows; nothing is simulated past the SQL they run.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from connectors.broker import LocalKafka
from stream.stack import Stack, start_stack
from tests.integration.conftest import read_topic, release

pytestmark = pytest.mark.integration

REFUND_AGENTS = [f"agent_refund_{i:02d}" for i in range(4)]
ORDER_AGENTS = [f"agent_order_{i:02d}" for i in range(3)]


@pytest.fixture(scope="module")
def pipeline(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("pg-pipeline"),
        REFUND_AGENTS + ORDER_AGENTS,
        kafka=kafka,
        progress=lambda m: print(m, file=sys.stderr),
    )
    try:
        yield stack
    finally:
        stack.stop()


def write_until_refused(
    p: Stack,
    role: str,
    write: Callable[[psycopg.Connection[Any], int], None],
    limit: int = 500,
    pause_s: float = 0.02,
    timeout_s: float = 60.0,
) -> tuple[int, float]:
    """Run ``write(conn, i)`` as ``role`` until PostgreSQL refuses it; returns (writes that landed, seconds).

    The quarantine ends the role's sessions; like an agent framework, this reconnects and tries again.
    """
    landed = 0
    started = time.monotonic()
    conn = p.agent(role)
    try:
        for i in range(limit):
            assert time.monotonic() - started < timeout_s, f"{role} was not stopped; {landed} writes landed"
            try:
                write(conn, i)
            except errors.InsufficientPrivilege:
                return landed, time.monotonic() - started
            except (errors.AdminShutdown, psycopg.OperationalError):
                conn.close()
                conn = p.agent(role)
                continue
            landed += 1
            time.sleep(pause_s)
    finally:
        conn.close()
    raise AssertionError(f"{role} was never refused after {landed} writes")


def _normal_refunds(p: Stack, rng: random.Random, n: int) -> int:
    conns = {a: p.agent(a) for a in REFUND_AGENTS}
    means = {a: rng.uniform(20, 90) for a in REFUND_AGENTS}
    for _ in range(n):
        for a, c in conns.items():
            c.execute(
                "INSERT INTO public.refunds (order_id, amount, agent_id, run_id) VALUES (%s, %s, %s, %s)",
                (rng.randint(1, 10_000), round(means[a] * math.exp(rng.gauss(0, 0.3)), 2), a, "run-1"),
            )
    for c in conns.values():
        c.close()
    return n * len(conns)


def test_rogue_agent_is_quarantined_in_postgres_and_its_next_write_fails(pipeline: Stack) -> None:
    rng = random.Random(1)
    written = _normal_refunds(pipeline, rng, 40)
    pipeline.wait_events(written)
    rogue = REFUND_AGENTS[1]
    landed, enforced_s = write_until_refused(
        pipeline,
        rogue,
        lambda c, i: c.execute(
            "INSERT INTO public.refunds (order_id, amount, agent_id, run_id) VALUES (1, %s, %s, 'run-1')",
            (round(rng.uniform(20, 90) * 20, 2), rogue),
        ),
    )
    print(f"rogue rows that landed before the REVOKE: {landed}; first rogue write -> refused: {enforced_s:.2f} s")
    assert landed <= 50
    # Its other writes are refused too; reads still work; the other agents are untouched.
    with pipeline.agent(rogue) as c:
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("DELETE FROM public.refunds WHERE agent_id = %s", (rogue,))
        assert c.execute("SELECT count(*) FROM public.refunds WHERE agent_id = %s", (rogue,)).fetchone()
    with pipeline.agent(REFUND_AGENTS[0]) as c:
        c.execute("INSERT INTO public.refunds (amount, agent_id) VALUES (42.0, %s)", (REFUND_AGENTS[0],))

    alerts = [
        json.loads(v)
        for _, v, _, _ in read_topic(pipeline.kafka.bootstrap_servers, pipeline.config.topics.alerts, expect=1)
    ]
    mine = [a for a in alerts if a["agent_id"] == rogue]
    assert mine and "postgres" in mine[0]["actions"] and mine[0]["quarantined"]
    assert [a["agent_id"] for a in alerts if a["agent_id"] != rogue] == []
    control = [
        json.loads(v)
        for _, v, _, _ in read_topic(pipeline.kafka.bootstrap_servers, pipeline.config.topics.control, expect=2)
    ]
    enforced = [r for r in control if r["agent_id"] == rogue and r["enforcement"]]
    assert enforced, control
    result = enforced[-1]["enforcement"][0]
    assert result["action"] == "postgres" and result["ok"], result
    assert result["revocation"]["role"] == rogue
    assert {p[2] for p in result["revocation"]["privileges"]} >= {"INSERT", "UPDATE", "DELETE"}


def test_release_grants_back_exactly_what_was_revoked(pipeline: Stack) -> None:
    rogue = REFUND_AGENTS[1]
    out = release(pipeline.config_path, rogue, "prompt fixed")
    assert out.returncode == 0, out.stderr
    assert "granted back" in out.stdout
    with pipeline.agent(rogue) as c:
        c.execute("INSERT INTO public.refunds (amount, agent_id) VALUES (50.0, %s)", (rogue,))
    with pipeline.pg.connect(dbname="shop") as c:
        acl = c.execute(
            "SELECT privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = %s AND table_name = 'refunds' ORDER BY 1",
            (rogue,),
        ).fetchall()
    assert [r[0] for r in acl] == ["DELETE", "INSERT", "SELECT", "UPDATE"]


def test_delete_burst_is_stopped_in_postgres(pipeline: Stack) -> None:
    agent = ORDER_AGENTS[0]
    before = pipeline.worker.total("writeguard_events_total")
    with pipeline.agent(agent) as c:
        for i in range(120):
            c.execute(
                "INSERT INTO public.orders (total, items, agent_id) VALUES (%s, %s, %s)",
                (30.0 + i % 7, 1 + i % 3, agent),
            )
    pipeline.wait_events(before + 120)
    with pipeline.agent(agent) as c:
        ids = [r[0] for r in c.execute("SELECT id FROM public.orders WHERE agent_id = %s ORDER BY id", (agent,))]
    deleted, took = write_until_refused(
        pipeline,
        agent,
        lambda c, i: c.execute("DELETE FROM public.orders WHERE id = %s", (ids[i],)),
        limit=len(ids),
        pause_s=0.05,
    )
    print(f"deletes that landed before the REVOKE: {deleted} (ceiling 20 per 60 s), {took:.2f} s")
    assert 20 < deleted < len(ids), "the burst must be stopped soon after it crosses the ceiling"


def test_update_whose_delta_is_the_anomaly_is_stopped(pipeline: Stack) -> None:
    agent = ORDER_AGENTS[1]
    rng = random.Random(3)
    before = pipeline.worker.total("writeguard_events_total")
    with pipeline.agent(agent) as c:
        # Like the orders the table has seen so far: a new agent that stands out is judged by the population.
        for i in range(20):
            c.execute(
                "INSERT INTO public.orders (total, items, agent_id) VALUES (%s, %s, %s)",
                (round(30 + rng.uniform(0, 6), 2), 1 + i % 3, agent),
            )
        ids = [r[0] for r in c.execute("SELECT id FROM public.orders WHERE agent_id = %s", (agent,))]
        for i in range(40):  # price corrections of a few percent: the agent's normal updates
            c.execute(
                "UPDATE public.orders SET total = round((total * %s)::numeric, 2) WHERE id = %s",
                (1 + rng.uniform(-0.05, 0.05), ids[i % len(ids)]),
            )
    pipeline.wait_events(before + 60)
    landed, _ = write_until_refused(
        pipeline,
        agent,
        lambda c, i: c.execute("UPDATE public.orders SET total = total * 40 WHERE id = %s", (ids[i % len(ids)],)),
    )
    print(f"anomalous updates that landed before the REVOKE: {landed}")
    assert 0 < landed <= 50
    alerts = [
        json.loads(v)
        for _, v, _, _ in read_topic(pipeline.kafka.bootstrap_servers, pipeline.config.topics.alerts, expect=1)
    ]
    mine = [a for a in alerts if a["agent_id"] == agent]
    assert mine and mine[0]["explanation"][0]["feature"] in ("total_change", "total")


def test_truncate_by_an_agent_named_in_its_transaction_is_stopped(pipeline: Stack) -> None:
    """Runs last: it empties public.orders. The agent is named only by its transaction's logical message."""
    agent = ORDER_AGENTS[2]
    with pipeline.pg.connect(dbname="shop", autocommit=True) as c:
        c.execute(sql.SQL("GRANT TRUNCATE ON public.orders TO {}").format(sql.Identifier(agent)))
    with pipeline.agent(agent) as c, c.transaction():
        c.execute(
            "SELECT pg_logical_emit_message(true, 'writeguard', %s)",
            (json.dumps({"agent_id": agent, "run_id": "run-9"}),),
        )
        c.execute("TRUNCATE public.orders")
    landed, took = write_until_refused(
        pipeline,
        agent,
        lambda c, i: c.execute("INSERT INTO public.orders (total, items, agent_id) VALUES (30, 1, %s)", (agent,)),
    )
    print(f"writes that landed after the TRUNCATE before the REVOKE: {landed} ({took:.2f} s)")
    alerts = [
        json.loads(v)
        for _, v, _, _ in read_topic(pipeline.kafka.bootstrap_servers, pipeline.config.topics.alerts, expect=1)
    ]
    mine = [a for a in alerts if a["agent_id"] == agent]
    assert mine and mine[0]["detector"] == "op_burst" and mine[0]["run_id"] == "run-9", mine
    with pipeline.pg.connect(dbname="shop") as c:
        privs = c.execute(
            "SELECT privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = %s AND table_name = 'orders' ORDER BY 1",
            (agent,),
        ).fetchall()
    assert [r[0] for r in privs] == ["SELECT"]  # TRUNCATE went with INSERT, UPDATE and DELETE
