"""Enforcement through the real worker: a hanging webhook or database never holds back the alert.

Each test runs its own worker process on the session broker, with its own topics. The pause webhook is a
real HTTP server on loopback that takes each request and answers only when the test lets it. PostgreSQL is a
real local cluster (one per module, a database per test); the agent's role is a real role, and the blocked
REVOKE is a real lock wait inside PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from testbed.broker import LocalKafka
from testbed.fleet import REFUNDS, Agent, Fleet
from testbed.postgres import LocalPostgres
from testbed.stack import SHOP_DDL
from tests.integration.conftest import Worker, produce, read_topic, release, start_worker, until

pytestmark = pytest.mark.integration

SECRET = "hang-test-secret"
WARMUP = 600
ROLE_PATTERN = "^agent_[a-z0-9_]{1,50}$"
TIMEOUT = 120.0


# -- the parts -------------------------------------------------------------------------------------------------


class HangingReceiver:
    """An orchestrator's pause endpoint that reads each POST and holds it open until :meth:`answer`.

    Each request is answered 200 once released; until then the worker's delivery is in flight.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answered = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                receiver._release.wait(600)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver._lock:
                    receiver.answered += 1

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/agents/pause"

    def state(self) -> tuple[int, int]:
        """(requests received, requests answered)."""
        with self._lock:
            return len(self.requests), self.answered

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(body) for _, body in self.requests]

    def answer(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[HangingReceiver]:
    r = HangingReceiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    server = LocalPostgres(progress=lambda m: print(m, file=sys.stderr)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shop(pg: LocalPostgres) -> Iterator[str]:
    """A fresh database with the shop tables; the roles a test creates are dropped afterwards."""
    dbname = f"shop_{uuid.uuid4().hex[:8]}"
    pg.create_database(dbname)
    with pg.connect(dbname=dbname, autocommit=True) as c:
        c.execute(SHOP_DDL)
    try:
        yield dbname
    finally:
        with pg.connect(autocommit=True) as root:
            root.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname)))
            roles = root.execute("SELECT rolname::text FROM pg_roles WHERE rolname LIKE %s", [f"%{dbname[5:]}%"])
            for (role,) in roles.fetchall():
                root.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def tagged_fleet(worker: Worker, n_agents: int, tag: str, seed: int = 11) -> Fleet:
    """A fleet whose agent ids are valid role-name parts, unique to one test (roles are cluster-wide)."""
    fleet = Fleet(n_agents=n_agents, seed=seed, prefix=worker.prefix)
    for a in fleet.agents:
        a.agent_id = f"{tag}_{a.agent_id.replace('-', '_')}"
    return fleet




def warm_up(worker: Worker, fleet: Fleet, n: int = WARMUP) -> None:
    """``n`` normal writes over the last two minutes of commit time, scored by the worker."""
    before = worker.total("writeguard_events_total")
    produce(worker.bootstrap, list(fleet.stream(n, time.time_ns() // 1000 - 120_000_000)))
    worker.wait_for("writeguard_events_total", before + n, timeout=TIMEOUT)


def go_rogue(worker: Worker, fleet: Fleet, rogue: Agent, n: int = 20) -> None:
    rogue.rogue = "inflate"
    now = time.time_ns() // 1000
    produce(worker.bootstrap, [fleet.write(rogue, now - (n - i) * 10_000) for i in range(n)])


def normal_writes(worker: Worker, fleet: Fleet, n: int) -> None:
    """``n`` normal writes by the fleet's agents that are not rogue, and wait until all are scored."""
    before = worker.total("writeguard_events_total")
    normal = [a for a in fleet.agents if a.rogue is None]
    now = time.time_ns() // 1000
    produce(worker.bootstrap, [fleet.write(normal[i % len(normal)], now + i) for i in range(n)])
    worker.wait_for("writeguard_events_total", before + n, timeout=TIMEOUT)




def alerts_of(worker: Worker, agent_id: str) -> list[dict[str, Any]]:
    records = read_topic(worker.bootstrap, worker.config.topics.alerts)
    return [a for a in (json.loads(v) for _, v, _, _ in records if v) if a["agent_id"] == agent_id]


def control_of(worker: Worker, agent_id: str) -> list[dict[str, Any]]:
    """The agent's control records in the order they were written (one agent is on one partition)."""
    records = sorted(read_topic(worker.bootstrap, worker.config.topics.control), key=lambda r: (r[2], r[3]))
    return [c for c in (json.loads(v) for _, v, _, _ in records if v) if c["agent_id"] == agent_id]


def metric(worker: Worker, name: str, **labels: str) -> float:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return worker.metrics().get(f"{name}{{{inner}}}", 0.0)


def webhook_edit(url: str, **settings: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        # No timeout and no retry within the test: the delivery stays in flight for as long as the server holds it.
        data["enforcement"] = {"webhook": {"url": url, "secret": SECRET, "timeout_s": 600, "retries": 0, **settings}}
        for t in data["tables"]:
            t["actions"] = {"info": ["alert"], "warning": ["alert"], "critical": ["alert", "quarantine", "webhook"]}

    return edit


def postgres_edit(pg: LocalPostgres, dbname: str, **settings: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["enforcement"] = {
            "postgres": {
                "dsn": pg.dsn(dbname=dbname),
                "roles": {"template": "agent_{agent_id}", "pattern": ROLE_PATTERN},
                **settings,
            }
        }
        for t in data["tables"]:
            t["actions"] = {"info": ["alert"], "warning": ["alert"], "critical": ["alert", "quarantine", "postgres"]}

    return edit


@contextlib.contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    try:
        yield worker
    finally:
        worker.process.stop()


def create_agent_role(pg: LocalPostgres, dbname: str, role: str) -> None:
    with pg.connect(dbname=dbname, autocommit=True) as c:
        ident = sql.Identifier(role)
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        c.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.refunds, public.orders TO {}").format(ident))
        c.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident))


# -- 1. the alert does not wait for enforcement -----------------------------------------------------------------


def test_alert_and_quarantine_record_are_published_while_the_pause_webhook_hangs(
    kafka: LocalKafka, receiver: HangingReceiver, tmp_path: Path
) -> None:
    with running(start_worker(kafka, tmp_path, edit=webhook_edit(receiver.url))) as worker:
        fleet = Fleet(n_agents=6, seed=9, prefix=worker.prefix)
        warm_up(worker, fleet)
        rogue = next(a for a in fleet.agents if a.table == REFUNDS)
        go_rogue(worker, fleet, rogue)

        # The worker's POST reaches the endpoint, which holds it open without answering.
        until("the pause request at the endpoint", lambda: receiver.state()[0] >= 1, worker)
        alert = until("the rogue's alert", lambda: alerts_of(worker, rogue.agent_id), worker)[0]
        control = until("the quarantined record", lambda: control_of(worker, rogue.agent_id), worker)
        assert receiver.state() == (1, 0), "the endpoint must still hold the request: nothing was answered"

        assert alert["quarantined"] is True and "webhook" in alert["actions"], alert
        assert [(c["state"], c["alert_id"], c["enforcement"]) for c in control] == [
            ("quarantined", alert["alert_id"], [])
        ], control
        (payload,) = receiver.payloads()
        assert (payload["agent_id"], payload["alert_id"]) == (rogue.agent_id, alert["alert_id"])
        assert metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="ok") == 0
        assert metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="failed") == 0

        # The stream goes on while the delivery hangs: later writes are scored.
        normal_writes(worker, fleet, 50)
        assert receiver.state() == (1, 0)

        # Once the endpoint answers, the outcome is recorded in a later quarantined record.
        receiver.answer()
        done = until(
            "the webhook outcome in the control record",
            lambda: [c for c in control_of(worker, rogue.agent_id) if c["enforcement"]],
            worker,
        )
        assert done[-1]["state"] == "quarantined" and done[-1]["alert_id"] == alert["alert_id"]
        assert done[-1]["enforcement"] == [
            {"action": "webhook", "ok": True, "detail": "HTTP 200 after 1 attempt(s)", "revocation": None}
        ]
        assert metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="ok") == 1
        assert receiver.state() == (1, 1)


def test_alert_and_quarantine_record_are_published_while_the_revoke_waits_for_a_lock(
    kafka: LocalKafka, pg: LocalPostgres, shop: str, tmp_path: Path
) -> None:
    tag = shop[5:]
    with running(start_worker(kafka, tmp_path, edit=postgres_edit(pg, shop))) as worker:
        fleet = tagged_fleet(worker, 6, tag)
        rogue = next(a for a in fleet.agents if a.table == REFUNDS)
        role = f"agent_{rogue.agent_id}"
        create_agent_role(pg, shop, role)
        with pg.connect(dbname=shop, autocommit=True) as c:
            c.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(f"reporting_{tag}")))
        warm_up(worker, fleet)

        # A migration in an open transaction changes refunds' ACL: the REVOKE on refunds has to wait for it.
        with pg.connect(dbname=shop, autocommit=True) as admin, pg.connect(dbname=shop) as holder:
            holder.execute(sql.SQL("GRANT SELECT ON public.refunds TO {}").format(sql.Identifier(f"reporting_{tag}")))
            holder_pid = holder.info.backend_pid

            def enforcer_blocked() -> list[tuple[Any, ...]]:
                return admin.execute(
                    "SELECT pid, wait_event_type, query FROM pg_stat_activity "
                    "WHERE application_name = 'writeguard-enforcer' AND datname = %s "
                    "AND wait_event_type = 'Lock' AND %s = ANY(pg_blocking_pids(pid))",
                    [shop, holder_pid],
                ).fetchall()

            def can(privilege: str) -> bool:
                row = admin.execute("SELECT has_table_privilege(%s, 'public.refunds', %s)", [role, privilege])
                return bool(row.fetchone()[0])  # type: ignore[index]

            try:
                go_rogue(worker, fleet, rogue)
                blocked = until("the enforcer's REVOKE waiting on the lock", enforcer_blocked, worker)
                assert blocked[0][2].startswith("REVOKE"), blocked

                alert = until("the rogue's alert", lambda: alerts_of(worker, rogue.agent_id), worker)[0]
                control = until("the quarantined record", lambda: control_of(worker, rogue.agent_id), worker)
                assert alert["quarantined"] is True and "postgres" in alert["actions"], alert
                assert [(c["state"], c["alert_id"], c["enforcement"]) for c in control] == [
                    ("quarantined", alert["alert_id"], [])
                ], control
                # Nothing is revoked yet, and the worker goes on scoring while its enforcement thread waits.
                normal_writes(worker, fleet, 50)
                assert enforcer_blocked(), "the REVOKE must still be waiting"
                assert can("INSERT")
                assert worker.total("writeguard_enforcement_actions_total") == 0
            finally:
                holder.rollback()  # the lock goes; the waiting REVOKE proceeds

            # README: each outcome is recorded in the quarantined control record. The REVOKE completes once the
            # lock is gone (within the enforcer's 30 s statement timeout; past it, it is reported failed and
            # nothing changes).
            done = until(
                "the postgres outcome in the control record",
                lambda: [c for c in control_of(worker, rogue.agent_id) if c["enforcement"]],
                worker,
            )
            (result,) = done[-1]["enforcement"]
            assert result["action"] == "postgres" and result["ok"] is True, result
            assert done[-1]["alert_id"] == alert["alert_id"]
            assert result["revocation"]["role"] == role and result["revocation"]["mode"] == "revoke_writes"
            assert sorted(tuple(p) for p in result["revocation"]["privileges"]) == [
                ("public", t, p) for t in ("orders", "refunds") for p in ("DELETE", "INSERT", "UPDATE")
            ]
            assert [p for p in ("SELECT", "INSERT", "UPDATE", "DELETE") if can(p)] == ["SELECT"]
        assert metric(worker, "writeguard_enforcement_actions_total", action="postgres", outcome="ok") == 1
        assert metric(worker, "writeguard_enforcement_actions_total", action="postgres", outcome="failed") == 0


# -- 2. the webhook queue full inside the worker ----------------------------------------------------------------


def test_webhook_queue_full_drops_and_reports_without_blocking_the_alerts(
    kafka: LocalKafka, receiver: HangingReceiver, tmp_path: Path
) -> None:
    # One delivery in flight and one queued; every later quarantine finds the queue full.
    edit = webhook_edit(receiver.url, concurrency=1, queue_size=1)
    with running(start_worker(kafka, tmp_path, edit=edit)) as worker:
        fleet = Fleet(n_agents=8, seed=21, prefix=worker.prefix)
        warm_up(worker, fleet, 800)
        first, *others = [a for a in fleet.agents if a.table == REFUNDS]
        assert len(others) == 3
        go_rogue(worker, fleet, first)
        until("the first pause request held at the endpoint", lambda: receiver.state() == (1, 0), worker)

        for rogue in others:
            go_rogue(worker, fleet, rogue)
        rogues = [first, *others]
        # Every rogue is alerted on and quarantined while the one delivery hangs.
        alerts = {
            a.agent_id: until(f"the alert on {a.agent_id}", lambda a=a: alerts_of(worker, a.agent_id), worker)[0]
            for a in rogues
        }
        assert all(al["quarantined"] and "webhook" in al["actions"] for al in alerts.values()), alerts
        for a in rogues:
            quarantined = until(
                f"the quarantined record of {a.agent_id}", lambda a=a: control_of(worker, a.agent_id), worker
            )
            assert (
                quarantined[0]["state"] == "quarantined"
                and quarantined[0]["alert_id"] == alerts[a.agent_id]["alert_id"]
            )

        # The drops are reported at once, in the metric the README names.
        until(
            "two dropped deliveries counted",
            lambda: metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="failed") >= 2,
            worker,
        )
        # The worker keeps running and scoring; the held delivery is still held.
        normal_writes(worker, fleet, 100)
        assert worker.total("writeguard_quarantines_total") == 4
        assert receiver.state() == (1, 0)
        assert metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="failed") == 2
        assert metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="ok") == 0

        # Released, the endpoint answers the held request and gets the queued one; the dropped ones never come.
        receiver.answer()
        until(
            "the two deliveries that were not dropped",
            lambda: metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="ok") == 2,
            worker,
        )
        delivered = {p["agent_id"] for p in receiver.payloads()}
        assert first.agent_id in delivered and len(delivered) == 2 and receiver.state() == (2, 2)
        dropped = {a.agent_id for a in rogues} - delivered

        def latest() -> dict[str, dict[str, Any]]:
            """Each rogue's latest control record, once the delivered ones carry their outcome."""
            out = {a.agent_id: control_of(worker, a.agent_id)[-1] for a in rogues}
            return out if all(out[agent]["enforcement"] for agent in delivered) else {}

        records = until("the delivered outcomes on the control topic", latest, worker)
        for agent, rec in records.items():
            # Each outcome is reported once, in the agent's own quarantined record.
            assert rec["state"] == "quarantined" and rec["alert_id"] == alerts[agent]["alert_id"], rec
            (result,) = rec["enforcement"]
            if agent in dropped:
                assert (result["action"], result["ok"]) == ("webhook", False) and "queue full" in result["detail"]
            else:
                assert result == {
                    "action": "webhook",
                    "ok": True,
                    "detail": "HTTP 200 after 1 attempt(s)",
                    "revocation": None,
                }
        assert metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="failed") == 2


# -- 3. mode: nologin, from config to release -------------------------------------------------------------------


def role_state(admin: psycopg.Connection[Any], role: str) -> dict[str, Any]:
    """Everything about the role a quarantine could touch: its attributes, memberships, settings and grants."""
    attributes = admin.execute("SELECT to_jsonb(r) FROM pg_roles r WHERE rolname = %s", [role]).fetchone()
    assert attributes is not None, f"role {role} does not exist"
    members = admin.execute(
        "SELECT roleid::regrole::text, admin_option FROM pg_auth_members WHERE member = %s::regrole ORDER BY 1",
        [role],
    ).fetchall()
    grants = admin.execute(
        "SELECT c.relname::text, a.privilege_type, a.is_grantable FROM pg_class c "
        "CROSS JOIN LATERAL aclexplode(c.relacl) a "
        "WHERE c.relnamespace = 'public'::regnamespace AND a.grantee = %s::regrole ORDER BY 1, 2",
        [role],
    ).fetchall()
    columns = admin.execute(
        "SELECT c.relname::text, att.attname::text, a.privilege_type FROM pg_attribute att "
        "JOIN pg_class c ON c.oid = att.attrelid CROSS JOIN LATERAL aclexplode(att.attacl) a "
        "WHERE c.relnamespace = 'public'::regnamespace AND a.grantee = %s::regrole ORDER BY 1, 2, 3",
        [role],
    ).fetchall()
    return {"attributes": attributes[0], "members": members, "grants": grants, "columns": columns}


def test_nologin_mode_from_config_to_release(kafka: LocalKafka, pg: LocalPostgres, shop: str, tmp_path: Path) -> None:
    tag = shop[5:]
    with running(start_worker(kafka, tmp_path, edit=postgres_edit(pg, shop, mode="nologin"))) as worker:
        assert worker.config.enforcement.postgres is not None and worker.config.enforcement.postgres.mode == "nologin"
        fleet = tagged_fleet(worker, 6, tag, seed=13)
        rogue = next(a for a in fleet.agents if a.table == REFUNDS)
        role = f"agent_{rogue.agent_id}"
        group = f"reporting_{tag}"
        admin: psycopg.Connection[Any] = pg.connect(dbname=shop, autocommit=True)
        try:
            ident = sql.Identifier(role)
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 7").format(ident))
            admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(group)))
            admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), ident))
            admin.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = '7s'").format(ident))
            admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.orders TO {}").format(ident))
            admin.execute(sql.SQL("GRANT SELECT, INSERT ON public.refunds TO {}").format(ident))
            admin.execute(sql.SQL("GRANT UPDATE (run_id) ON public.refunds TO {}").format(ident))
            admin.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident))
            before = role_state(admin, role)
            assert before["attributes"]["rolcanlogin"] is True

            session = pg.connect(user=role, dbname=shop, autocommit=True)  # the agent, logged in
            session.execute("INSERT INTO public.refunds (amount, agent_id) VALUES (30, %s)", [rogue.agent_id])
            warm_up(worker, fleet)
            go_rogue(worker, fleet, rogue)

            done = until(
                "the postgres outcome in the control record",
                lambda: [c for c in control_of(worker, rogue.agent_id) if c["enforcement"]],
                worker,
            )
            (result,) = done[-1]["enforcement"]
            assert result["action"] == "postgres" and result["ok"] is True, result
            rev = result["revocation"]
            assert (rev["role"], rev["mode"], rev["had_login"], rev["privileges"]) == (role, "nologin", True, [])
            assert rev["terminated_sessions"] == 1

            # Quarantined: the role cannot log in, its open session was ended, and nothing else changed.
            during = role_state(admin, role)
            assert during["attributes"]["rolcanlogin"] is False
            assert {**during["attributes"], "rolcanlogin": True} == before["attributes"]
            assert {k: v for k, v in during.items() if k != "attributes"} == {
                k: v for k, v in before.items() if k != "attributes"
            }
            with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
                pg.connect(user=role, dbname=shop, connect_timeout=10).close()
            with pytest.raises(psycopg.OperationalError):
                session.execute("SELECT 1")
            session.close()

            out = release(worker.config_path, rogue.agent_id, "prompt fixed")
            assert out.returncode == 0, out.stderr
            assert f"restored role {role}: 0 privileges granted back, LOGIN restored" in out.stdout, out.stdout

            after = role_state(admin, role)
            assert after == before
            with pg.connect(user=role, dbname=shop, autocommit=True, connect_timeout=10) as again:
                again.execute("INSERT INTO public.refunds (amount, agent_id) VALUES (31, %s)", [rogue.agent_id])
        finally:
            admin.close()

        last = control_of(worker, rogue.agent_id)[-1]
        assert last["state"] == "released" and last["reason"] == "prompt fixed"
        assert [(r["action"], r["ok"]) for r in last["enforcement"]] == [("postgres", True)]
        until("the worker following the release", lambda: worker.total("writeguard_quarantined_agents") == 0, worker)


# -- a late enforcement outcome must not undo a release ----------------------------------------------------------


def test_a_webhook_outcome_after_the_release_does_not_quarantine_the_agent_again(
    kafka: LocalKafka, receiver: HangingReceiver, tmp_path: Path
) -> None:
    with running(start_worker(kafka, tmp_path, edit=webhook_edit(receiver.url))) as worker:
        fleet = Fleet(n_agents=6, seed=9, prefix=worker.prefix)
        warm_up(worker, fleet)
        first, second = [a for a in fleet.agents if a.table == REFUNDS][:2]
        go_rogue(worker, fleet, first)
        until("the pause request held at the endpoint", lambda: receiver.state() == (1, 0), worker)
        until("the quarantine followed", lambda: worker.total("writeguard_quarantined_agents") == 1, worker)
        out = release(worker.config_path, first.agent_id, "false alarm")
        assert out.returncode == 0, out.stderr
        until("the release followed", lambda: worker.total("writeguard_quarantined_agents") == 0, worker)

        receiver.answer()  # the pause request of the released agent completes now
        until(
            "the late webhook outcome counted",
            lambda: metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="ok") == 1,
            worker,
        )
        # A later quarantine of another agent, written and followed after that outcome, marks the point to check.
        go_rogue(worker, fleet, second)
        until("the second agent's quarantine", lambda: control_of(worker, second.agent_id), worker)
        until(
            "the second agent's pause request",
            lambda: metric(worker, "writeguard_enforcement_actions_total", action="webhook", outcome="ok") == 2,
            worker,
        )
        states = [c["state"] for c in control_of(worker, first.agent_id)]
        assert states[-1] == "released", states
        assert worker.total("writeguard_quarantined_agents") == 1  # the second agent only
