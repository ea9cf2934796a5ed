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

from testbed.broker import LocalKafka
from testbed.stack import Stack, start_stack
from tests.integration.conftest import read_topic, release

pytestmark = pytest.mark.integration

REFUND_AGENTS = [f"agent_refund_{i:02d}" for i in range(4)]
ORDER_AGENTS = [f"agent_order_{i:02d}" for i in range(3)]


# How many of a rogue's writes may land after the write its alert was raised on. Each write here waits until
# the worker has scored it before the next is tried (``lock_step``), so the CDC latency is out of the race and
# only the enforcement path is in it: the worker counts the alerting write, publishes the alert and starts the
# REVOKE in its enforcement thread at once. The next write may be tried as soon as the alerting one is counted,
# before that REVOKE has committed (1). The one after it first waits for that write's whole round trip
# (PostgreSQL -> Debezium -> Kafka -> worker -> metrics): it lands only if one short REVOKE transaction takes
# longer than a CDC round trip (2). Two more round trips would be far beyond any REVOKE: that would be a bug.
IN_FLIGHT = 2
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


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


def acl_snapshot(p: Stack, role: str) -> dict[str, Any]:
    """The full ACL of every watched table: its raw ``relacl`` items (every grantee, sorted), its column ACLs,
    and what ``has_table_privilege`` says ``role`` may do there, for every table privilege."""
    out: dict[str, Any] = {}
    with p.pg.connect(dbname="shop") as c:
        for table in (t.name for t in p.config.tables):
            row = c.execute(
                "SELECT coalesce(relacl::text[], '{}') FROM pg_class WHERE oid = %s::regclass", (table,)
            ).fetchone()
            assert row is not None, table
            columns = c.execute(
                "SELECT attname::text, attacl::text[] FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND attacl IS NOT NULL ORDER BY 1",
                (table,),
            ).fetchall()
            may = c.execute(
                "SELECT p, has_table_privilege(%s, %s::regclass, p) FROM unnest(%s::text[]) AS p",
                (role, table, list(PRIVILEGES)),
            ).fetchall()
            out[table] = {
                "relacl": sorted(row[0]),
                "columns": {col: sorted(acl) for col, acl in columns},
                "may": dict(may),
            }
    return out


def may(snapshot: dict[str, Any]) -> dict[str, set[str]]:
    """From a snapshot: the privileges the role holds, per table."""
    return {t: {p for p, ok in v["may"].items() if ok} for t, v in snapshot.items()}


@pytest.fixture(scope="module")
def acls_at_start(pipeline: Stack) -> dict[str, Any]:
    """The watched tables' ACLs as the rogue of the first test has them before any quarantine."""
    snap = acl_snapshot(pipeline, REFUND_AGENTS[1])
    assert may(snap) == {t: {"SELECT", "INSERT", "UPDATE", "DELETE"} for t in snap}, snap
    return snap


def lock_step(p: Stack) -> Callable[[int], object]:
    """After the n-th write landed, wait until the worker has scored it (see IN_FLIGHT)."""
    base = p.worker.total("writeguard_events_total")
    return lambda landed: p.wait_events(base + landed)


def write_until_refused(
    p: Stack,
    role: str,
    write: Callable[[psycopg.Connection[Any], int], object],
    limit: int = 500,
    timeout_s: float = 120.0,
    after_landed: Callable[[int], object] | None = None,
) -> tuple[int, float]:
    """Run ``write(conn, i)`` as ``role`` until PostgreSQL refuses it; returns (writes that landed, seconds).

    ``after_landed(n)`` runs after the n-th write that landed. The quarantine ends the role's sessions; like
    an agent framework, this reconnects and tries again. The seconds are for printing, never asserted.
    """
    landed = 0
    started = time.monotonic()
    deadline = started + timeout_s
    interrupted = 0
    conn = p.agent(role)
    try:
        for i in range(limit):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{role} was not refused within {timeout_s:.0f} s: {landed} writes landed, "
                    f"{interrupted} interrupted by the end of the session; worker log:\n{p.worker.log_tail()}"
                )
            try:
                write(conn, i)
            except errors.InsufficientPrivilege:
                return landed, time.monotonic() - started
            except (errors.AdminShutdown, psycopg.OperationalError):
                interrupted += 1
                conn.close()
                conn = p.agent(role)
                continue
            landed += 1
            if after_landed is not None:
                after_landed(landed)
    finally:
        conn.close()
    raise AssertionError(f"{role} was never refused after {landed} writes ({interrupted} interrupted)")


def alerts_of(p: Stack, agent: str) -> list[dict[str, Any]]:
    alerts = [json.loads(v) for _, v, _, _ in read_topic(p.kafka.bootstrap_servers, p.config.topics.alerts, expect=1)]
    return [a for a in alerts if a["agent_id"] == agent]


def enforced(p: Stack, agent: str) -> dict[str, Any]:
    """The postgres enforcement result recorded on the control topic for ``agent``'s quarantine."""
    deadline = time.monotonic() + 60
    while True:
        control = [
            json.loads(v) for _, v, _, _ in read_topic(p.kafka.bootstrap_servers, p.config.topics.control, expect=1)
        ]
        done = [r for r in control if r["agent_id"] == agent and r["state"] == "quarantined" and r["enforcement"]]
        if done:
            result: dict[str, Any] = done[-1]["enforcement"][0]
            return result
        assert time.monotonic() < deadline, f"no enforcement recorded for {agent}: {control}"
        time.sleep(0.25)


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


def test_rogue_agent_is_quarantined_in_postgres_and_its_next_write_fails(
    pipeline: Stack, acls_at_start: dict[str, Any]
) -> None:
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
        after_landed=lock_step(pipeline),
    )
    print(f"rogue rows that landed before the REVOKE: {landed}; first rogue write -> refused: {enforced_s:.2f} s")
    mine = alerts_of(pipeline, rogue)
    assert len(mine) == 1, mine
    alert = mine[0]
    assert alert["table"] == "public.refunds" and alert["detector"] == "zscore", alert
    assert "postgres" in alert["actions"] and alert["quarantined"], alert
    # The alert was raised on the agent's n-th rogue write (agent_events counts its 40 normal ones too).
    nth = alert["agent_events"] - 40
    assert nth >= 2, alert  # the debounce needs 2 anomalous writes
    assert nth <= landed <= nth + IN_FLIGHT, (nth, landed)
    # Its other writes are refused too; reads still work; the rows that landed are all there is.
    with pipeline.agent(rogue) as c:
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("DELETE FROM public.refunds WHERE agent_id = %s", (rogue,))
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("UPDATE public.orders SET total = 0 WHERE agent_id = %s", (rogue,))
        row = c.execute("SELECT count(*) FROM public.refunds WHERE agent_id = %s", (rogue,)).fetchone()
        assert row == (40 + landed,)
    # The other agents are untouched.
    with pipeline.agent(REFUND_AGENTS[0]) as c:
        c.execute("INSERT INTO public.refunds (amount, agent_id) VALUES (42.0, %s)", (REFUND_AGENTS[0],))
    alerts = [
        json.loads(v)
        for _, v, _, _ in read_topic(pipeline.kafka.bootstrap_servers, pipeline.config.topics.alerts, expect=1)
    ]
    assert [a["agent_id"] for a in alerts] == [rogue], alerts

    result = enforced(pipeline, rogue)
    assert result["action"] == "postgres" and result["ok"], result
    assert result["revocation"]["role"] == rogue
    assert sorted(map(tuple, result["revocation"]["privileges"])) == sorted(
        ("public", t, p) for t in ("orders", "refunds") for p in ("DELETE", "INSERT", "UPDATE")
    )
    assert result["revocation"]["inherited"] == []
    assert pipeline.worker.total("writeguard_enforcement_actions_total") == 1
    assert pipeline.worker.metrics()['writeguard_enforcement_actions_total{action="postgres",outcome="ok"}'] == 1
    # What PostgreSQL itself now says: the rogue may only read the watched tables; nothing else changed.
    during = acl_snapshot(pipeline, rogue)
    assert may(during) == {t: {"SELECT"} for t in during}, during
    assert during != acls_at_start


def test_release_grants_back_exactly_what_was_revoked(pipeline: Stack, acls_at_start: dict[str, Any]) -> None:
    rogue = REFUND_AGENTS[1]
    assert may(acl_snapshot(pipeline, rogue)) == {t: {"SELECT"} for t in acls_at_start}  # still quarantined
    out = release(pipeline.config_path, rogue, "prompt fixed")
    assert out.returncode == 0, out.stderr
    assert f"role {rogue}: 6 privileges granted back" in out.stdout, out.stdout
    # Every watched table's whole ACL (every grantee, column ACLs, each privilege of the role) is as it was.
    assert acl_snapshot(pipeline, rogue) == acls_at_start
    with pipeline.agent(rogue) as c:
        c.execute("INSERT INTO public.refunds (amount, agent_id) VALUES (50.0, %s)", (rogue,))


def _op_burst_ceiling(p: Stack, table: str) -> int:
    spec = next(t for t in p.config.tables if t.name == table)
    return next(int(getattr(d, "max_events", 0)) for d in spec.detectors if d.kind == "op_burst")


def test_delete_burst_is_stopped_in_postgres(pipeline: Stack) -> None:
    agent = ORDER_AGENTS[0]
    ceiling = _op_burst_ceiling(pipeline, "public.orders")
    assert ceiling == 20
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
    assert len(ids) == 120
    deleted, took = write_until_refused(
        pipeline,
        agent,
        lambda c, i: c.execute("DELETE FROM public.orders WHERE id = %s", (ids[i],)),
        limit=len(ids),
        after_landed=lock_step(pipeline),
    )
    print(f"deletes that landed before the REVOKE: {deleted} (ceiling {ceiling} per 60 s), {took:.2f} s")
    mine = alerts_of(pipeline, agent)
    assert len(mine) == 1, mine
    alert = mine[0]
    assert alert["detector"] == "op_burst" and alert["quarantined"], alert
    # The guard fires on the first delete over the ceiling: the 21st, after the agent's 120 inserts.
    assert alert["agent_events"] == 120 + ceiling + 1, alert
    top = alert["explanation"][0]
    assert (top["value"], top["expected_high"]) == (ceiling + 1, ceiling), top
    assert ceiling + 1 <= deleted <= ceiling + 1 + IN_FLIGHT, deleted
    with pipeline.pg.connect(dbname="shop") as c:
        left = c.execute("SELECT count(*) FROM public.orders WHERE agent_id = %s", (agent,)).fetchone()
    assert left == (len(ids) - deleted,)
    assert enforced(pipeline, agent)["ok"]


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
        after_landed=lock_step(pipeline),
    )
    print(f"anomalous updates that landed before the REVOKE: {landed}")
    mine = alerts_of(pipeline, agent)
    assert len(mine) == 1, mine
    alert = mine[0]
    assert alert["detector"] == "zscore" and alert["quarantined"], alert
    # A x40 update: its ratio (log(40) = 3.7 where the agent's corrections are +/-0.05) stands out most.
    assert alert["explanation"][0]["feature"] == "total_ratio", alert
    nth = alert["agent_events"] - 60  # its n-th "total * 40" update raised the alert
    assert nth >= 2, alert  # the debounce needs 2 anomalous writes
    assert nth <= landed <= nth + IN_FLIGHT, (nth, landed)
    assert enforced(pipeline, agent)["ok"]


def test_truncate_by_an_agent_named_in_its_transaction_is_stopped(pipeline: Stack) -> None:
    """Runs last: it empties public.orders. The agent is named only by its transaction's logical message."""
    agent = ORDER_AGENTS[2]
    with pipeline.pg.connect(dbname="shop", autocommit=True) as c:
        c.execute(sql.SQL("GRANT TRUNCATE ON public.orders TO {}").format(sql.Identifier(agent)))
    before = pipeline.worker.total("writeguard_events_total")
    with pipeline.agent(agent) as c, c.transaction():
        c.execute(
            "SELECT pg_logical_emit_message(true, 'writeguard', %s)",
            (json.dumps({"agent_id": agent, "run_id": "run-9"}),),
        )
        c.execute("TRUNCATE public.orders")
    pipeline.wait_events(before + 1)  # the truncate, attributed through the message, is scored
    landed, took = write_until_refused(
        pipeline,
        agent,
        lambda c, i: c.execute("INSERT INTO public.orders (total, items, agent_id) VALUES (30, 1, %s)", (agent,)),
        after_landed=lock_step(pipeline),
    )
    print(f"writes that landed after the TRUNCATE before the REVOKE: {landed} ({took:.2f} s)")
    # The truncate itself raised the alert, so only the writes in flight during the REVOKE may land.
    assert landed <= IN_FLIGHT, landed
    mine = alerts_of(pipeline, agent)
    assert len(mine) == 1, mine
    alert = mine[0]
    assert alert["detector"] == "op_burst" and alert["run_id"] == "run-9" and alert["agent_events"] == 1, alert
    result = enforced(pipeline, agent)
    assert result["ok"], result
    assert ("public", "orders", "TRUNCATE") in map(tuple, result["revocation"]["privileges"])
    snap = acl_snapshot(pipeline, agent)
    assert may(snap) == {t: {"SELECT"} for t in snap}, snap  # TRUNCATE went with INSERT, UPDATE and DELETE
    # Four quarantines in this module, each enforced once in PostgreSQL, none failed.
    m = pipeline.worker.metrics()
    assert m['writeguard_enforcement_actions_total{action="postgres",outcome="ok"}'] == 4
    assert m.get('writeguard_enforcement_actions_total{action="postgres",outcome="failed"}', 0) == 0
