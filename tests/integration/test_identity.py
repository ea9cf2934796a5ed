"""Identity from the database, on the real path: PostgreSQL with `writeguard identity-sql --apply`, Debezium on
Kafka Connect, Kafka, and a worker with ``worker.agent_messages.identity: database``.

The attacks of issue 17, each as the agent would run it, with its own login role:
(a) impersonation: one role deletes another agent's rows, and another writes rows naming that agent;
(b) NULL agent ids: 30 refunds of 9,999,999 with agent_id NULL;
(c) 400 deletes spread over many fresh identities, each under its own ceiling;
(d) an agent emitting its own logical decoding message to name someone else.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from detectors.engine import Change, role_identity
from stream.ingest import decode_changes
from testbed.broker import LocalKafka
from testbed.process import ROOT
from testbed.stack import Stack, start_stack
from tests.integration.conftest import read_topic

pytestmark = pytest.mark.integration

AGENTS = [f"agent_refund_{i:02d}" for i in range(4)]
OWNER, CLEANER, IMPOSTOR, WARMER = AGENTS  # agent ids are their role names (roles.map: {a: a})
HUMAN = "ops_human"  # a login role that is no agent's
FRESH = [f"temp_writer_{i:02d}" for i in range(20)]  # fresh identities, 20 deletes each: at the per-agent ceiling
TABLE_CEILING = 100


def edit(data: dict[str, Any]) -> None:
    data["worker"]["agent_messages"]["identity"] = "database"
    for d in data["tables"][0]["detectors"]:
        if d["kind"] == "op_burst":
            d["table_max_events"] = TABLE_CEILING


@pytest.fixture(scope="module")
def stack(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("identity"),
        AGENTS,
        kafka=kafka,
        edit_config=edit,
        progress=lambda m: print(m, file=sys.stderr),
    )
    try:
        with s.pg.connect(dbname="shop", autocommit=True) as c:
            for role in [HUMAN, *FRESH]:
                ident = sql.Identifier(role)
                c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
                c.execute(sql.SQL("GRANT SELECT, INSERT, DELETE ON public.refunds TO {}").format(ident))
                c.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident))
        cli = [sys.executable, "-m", "stream.cli", "identity-sql", "-c", str(s.config_path)]
        applied = subprocess.run(
            [*cli, "--apply", "--dsn", s.pg.dsn(dbname="shop")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert applied.returncode == 0, applied.stderr
        yield s
    finally:
        s.stop()


def poll(s: Stack, what: str, probe: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        assert s.worker.proc.poll() is None, f"worker died waiting for {what}:\n{s.worker.log_tail()}"
        last = probe()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what}: not seen in {timeout:.0f} s; last: {last!r}\n{s.worker.log_tail()}")


def alerts(s: Stack) -> list[dict[str, Any]]:
    return [json.loads(v) for _, v, _, _ in read_topic(s.kafka.bootstrap_servers, s.config.topics.alerts) if v]


def control(s: Stack) -> list[dict[str, Any]]:
    return [json.loads(v) for _, v, _, _ in read_topic(s.kafka.bootstrap_servers, s.config.topics.control) if v]


def changes(s: Stack) -> list[Change]:
    topic = read_topic(s.kafka.bootstrap_servers, s.config.topics.changes)
    return [ch for _, v, _, _ in topic if v for ch in decode_changes(v)]


def insert(conn: Any, n: int, amount: float, agent: str | None) -> None:
    conn.execute(
        "INSERT INTO refunds (amount, agent_id) SELECT %s + (g %% 7), %s FROM generate_series(1, %s) g",
        (amount, agent, n),
    )


def test_d_an_agent_can_no_longer_emit_a_logical_decoding_message(stack: Stack) -> None:
    with stack.agent(IMPOSTOR) as c:
        for content in ('\'{"agent_id": "agent_refund_00"}\'::text', "'\\x7b7d'::bytea"):
            with pytest.raises(errors.InsufficientPrivilege, match="pg_logical_emit_message"):
                c.execute(f"SELECT pg_logical_emit_message(true, 'writeguard', {content})")
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("SELECT writeguard.emit_identity('public.refunds', 'agent_refund_00')")


def test_a_impersonation_is_credited_to_the_real_writer_and_flagged(stack: Stack) -> None:
    with stack.agent(OWNER) as owner:
        insert(owner, 25, 30.0, OWNER)
    # Another agent deletes the owner's 25 rows: the before images all name the owner, the database names the
    # cleaner. Before issue 17 the owner was quarantined for it.
    with stack.agent(CLEANER) as cleaner:
        cleaner.execute("DELETE FROM refunds WHERE agent_id = %s", (OWNER,))
    # And a third writes rows naming the owner in the column; the trigger overwrites it, and reports the claim.
    with stack.agent(IMPOSTOR) as impostor:
        insert(impostor, 3, 30.0, OWNER)
    with stack.pg.connect(dbname="shop") as c:
        stamped = c.execute("SELECT DISTINCT agent_id FROM refunds").fetchall()
    assert stamped == [(IMPOSTOR,)]

    quarantined = poll(
        stack,
        "the cleaner's and the impostor's quarantines",
        lambda: (
            {r["agent_id"] for r in control(stack) if r["state"] == "quarantined"} >= {CLEANER, IMPOSTOR}
            and control(stack)
        ),
    )
    stack.wait_events(25 + 25 + 3)  # every row change is scored (mismatch changes count too: at least this)
    assert OWNER not in {r["agent_id"] for r in quarantined}
    got = alerts(stack)
    assert all(a["agent_id"] != OWNER for a in got), got
    burst = [a for a in got if a["agent_id"] == CLEANER and a["detector"] == "op_burst"]
    assert burst and burst[0]["quarantined"], got
    mismatch = [a for a in got if a["detector"] == "identity_mismatch"]
    assert [(a["agent_id"], a["severity"]) for a in mismatch] == [(IMPOSTOR, "critical")], got
    assert OWNER in mismatch[0]["summary"] and IMPOSTOR in mismatch[0]["summary"]
    deletes = [ch for ch in changes(stack) if ch.op == "d"]
    assert len(deletes) == 25 and {ch.agent_id for ch in deletes} == {CLEANER}


def test_b_writes_with_a_null_agent_id_are_scored_and_alerted_not_dropped(stack: Stack) -> None:
    with stack.agent(WARMER) as warmer:
        for _ in range(40):  # the table's population model learns normal refunds (one transaction each)
            insert(warmer, 1, 30.0, WARMER)
    with psycopg.connect(stack.pg.dsn(user=HUMAN, dbname="shop"), autocommit=True) as human:
        for _ in range(30):
            insert(human, 1, 9_999_999.0, None)
    who = role_identity(HUMAN)
    got = poll(stack, "an alert on the NULL-agent refunds", lambda: [a for a in alerts(stack) if a["agent_id"] == who])
    assert got[0]["detector"].startswith("zscore") and got[0]["severity"] == "critical"
    assert not got[0]["quarantined"]  # a role that is no agent's is never quarantined
    assert {r["agent_id"] for r in control(stack)}.isdisjoint({who, HUMAN})
    scored = poll(stack, "all 30 scored", lambda: len([c for c in changes(stack) if c.agent_id == who]) >= 30)
    assert scored


def test_c_deletes_spread_over_fresh_identities_trip_the_table_wide_ceiling(stack: Stack) -> None:
    with stack.pg.connect(dbname="shop", autocommit=True) as c:
        c.execute(
            "INSERT INTO refunds (amount) SELECT 30 + g %% 7 FROM generate_series(1, %s) g",
            (20 * len(FRESH),),
        )
        ids = [r[0] for r in c.execute("SELECT id FROM refunds WHERE agent_id IS NULL ORDER BY id").fetchall()]
    ids = ids[-20 * len(FRESH) :]  # the seed rows (the superuser maps to no agent: its rows are stamped NULL)
    assert len(ids) == 20 * len(FRESH)
    for i, role in enumerate(FRESH):
        with psycopg.connect(stack.pg.dsn(user=role, dbname="shop"), autocommit=True) as w:
            w.execute("DELETE FROM refunds WHERE id = ANY(%s)", (ids[20 * i : 20 * (i + 1)],))
    wide = poll(
        stack, "the table-wide op_burst alert", lambda: [a for a in alerts(stack) if a["detector"] == "op_burst.table"]
    )
    assert len(wide) == 1 and wide[0]["scope"] == "table" and not wide[0]["quarantined"]
    # the window holds the cleaner's 25 deletes of test (a) too: any of them may lead; fresh roles are named
    assert "top agents: " in wide[0]["summary"] and "<role:temp_writer_" in wide[0]["summary"]
    assert wide[0]["explanation"][0]["value"] == TABLE_CEILING + 1
    stack.wait_events(20 * len(FRESH))
    fresh = {role_identity(r) for r in FRESH}
    assert not [a for a in alerts(stack) if a["agent_id"] in fresh and a["detector"] == "op_burst"]
