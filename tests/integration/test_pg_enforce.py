"""Quarantine in a real PostgreSQL: the agent's role loses its writes (or its LOGIN), release restores it exactly.

One throwaway cluster per module; each test gets its own database and drops the roles it made. The agent's
side is played by real connections made *as* the agent's role.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
import pytest
from psycopg import sql

from connectors.pg_enforce import EnforcementError, PostgresEnforcer, Revocation, RoleMapping
from testbed.postgres import LocalPostgres

pytestmark = pytest.mark.integration

AGENT = "refund_02"
ROLE = "agent_refund_02"
TABLES = ["public.refunds", "public.orders"]
HOSTILE_TABLE = 'weird"; DROP TABLE refunds; --'
WRITES = {(t, p) for t in ("refunds", "orders") for p in ("INSERT", "UPDATE", "DELETE")}


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    # PostgreSQL is required, not optional (scripts/system-deps installs it, CI has it): if it cannot start,
    # every test here must fail with LocalPostgres's own error (PostgresError says what to install), not skip.
    server = LocalPostgres(progress=lambda m: print(m, file=sys.stderr)).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Shop:
    """One test's database, its superuser connection, and the roles it created (dropped afterwards)."""

    pg: LocalPostgres
    dbname: str
    admin: psycopg.Connection[Any]
    roles: list[str] = field(default_factory=list)
    sessions: list[psycopg.Connection[Any]] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return self.pg.dsn("postgres", self.dbname)

    def sql(self, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        cur = self.admin.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []

    def create_role(self, name: str, *tables: str, privileges: str = "INSERT, UPDATE, DELETE, SELECT") -> None:
        self.admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        self.roles.append(name)
        for t in tables:
            self.admin.execute(
                sql.SQL("GRANT " + privileges + " ON TABLE {} TO {}").format(
                    sql.Identifier("public", t), sql.Identifier(name)
                )
            )

    def connect_as(self, role: str, **kw: Any) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self.pg.connect(user=role, dbname=self.dbname, connect_timeout=5, **kw)
        self.sessions.append(conn)
        return conn

    def enforcer(
        self, roles: RoleMapping | None = None, tables: list[str] | None = None, **kw: Any
    ) -> PostgresEnforcer:
        return PostgresEnforcer(self.dsn, roles or RoleMapping(template="agent_{agent_id}"), tables or TABLES, **kw)

    def acls(self) -> dict[str, list[str]]:
        """Every relation's (tables, partitioned tables, sequences, views) and column's ACL items, every default
        privilege entry, and the role memberships, sorted: compares what is granted, not the item order."""
        out: dict[str, list[str]] = {}
        for rel, acl in self.sql(
            "SELECT c.relname::text, coalesce(c.relacl::text[], '{}') FROM pg_class c "
            "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'S', 'v', 'f', 'm')"
        ):
            out[rel] = sorted(acl)
        for owner, nsp, kind, acl in self.sql(
            "SELECT pg_get_userbyid(defaclrole)::text, defaclnamespace::regnamespace::text, defaclobjtype::text, "
            "defaclacl::text[] FROM pg_default_acl"
        ):
            out[f"default {owner} {nsp} {kind}"] = sorted(acl)
        out["memberships"] = sorted(
            f"{r}>{m} admin={a} by {g}"
            for r, m, a, g in self.sql(
                "SELECT roleid::regrole::text, member::regrole::text, admin_option, grantor::regrole::text "
                "FROM pg_auth_members WHERE member::regrole::text NOT LIKE 'pg\\_%'"
            )
        )
        for rel, col, acl in self.sql(
            "SELECT c.relname::text, a.attname::text, a.attacl::text[] FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relnamespace = 'public'::regnamespace AND a.attacl IS NOT NULL"
        ):
            out[f"{rel}.{col}"] = sorted(acl)
        return out

    def tables(self) -> set[str]:
        return {r[0] for r in self.sql("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")}

    def all_roles(self) -> set[str]:
        return {r[0] for r in self.sql("SELECT rolname::text FROM pg_roles")}

    def can_login(self, role: str) -> bool:
        return bool(self.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", [role])[0][0])


@pytest.fixture
def shop(pg: LocalPostgres) -> Iterator[Shop]:
    dbname = f"shop_{uuid.uuid4().hex[:8]}"
    pg.create_database(dbname)
    admin: psycopg.Connection[Any] = pg.connect(dbname=dbname, autocommit=True)
    s = Shop(pg, dbname, admin)
    s.sql("CREATE TABLE refunds (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, amount numeric, status text)")
    s.sql("CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, total numeric)")
    s.sql("INSERT INTO refunds (amount, status) VALUES (10, 'new'), (20, 'new')")
    s.sql("INSERT INTO orders (total) VALUES (100)")
    s.create_role(ROLE, "refunds", "orders")
    try:
        yield s
    finally:
        for c in s.sessions:
            with contextlib.suppress(Exception):
                c.close()
        admin.close()
        with pg.connect(autocommit=True) as root:
            root.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname)))
            for role in reversed(s.roles):
                root.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def insert_refund(conn: psycopg.Connection[Any], amount: int = 5) -> None:
    conn.execute("INSERT INTO refunds (amount, status) VALUES (%s, 'new')", [amount])


# -- revoke_writes --------------------------------------------------------------------------------------------


def test_quarantine_blocks_writes_and_release_restores_exactly(shop: Shop) -> None:
    agent = shop.connect_as(ROLE, autocommit=True)
    insert_refund(agent)
    before = shop.acls()

    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.role == ROLE and rev.mode == "revoke_writes" and rev.had_login is None
        assert {(t, p) for s, t, p in rev.privileges} == WRITES
        assert all(s == "public" for s, _, _ in rev.privileges)
        assert rev.inherited == () and rev.still_writable == () and rev.enforced
        assert rev.cascaded == () and rev.partitions == () and rev.memberships == ()
        assert rev.terminated_sessions == 1  # the session above

        again = shop.connect_as(ROLE, autocommit=True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            insert_refund(again)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            again.execute("UPDATE orders SET total = 0")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            again.execute("DELETE FROM refunds")
        assert again.execute("SELECT count(*) FROM refunds").fetchone() == (3,)  # reading still works
        assert shop.acls() != before

        # What goes on the control topic comes back as the same revocation.
        enforcer.release(Revocation.from_dict(rev.to_dict()))

    insert_refund(again)
    again.execute("UPDATE orders SET total = total + 1")
    assert shop.acls() == before


def test_quarantine_and_release_are_idempotent(shop: Shop) -> None:
    before = shop.acls()
    with shop.enforcer() as enforcer:
        first = enforcer.quarantine(AGENT)
        quarantined = shop.acls()
        second = enforcer.quarantine(AGENT)
        assert second.privileges == () and second.column_privileges == ()
        assert shop.acls() == quarantined
        # Releasing the empty second record gives nothing back: the first one must be kept (or merged).
        enforcer.release(second)
        assert shop.acls() == quarantined
        assert first.merged(second).privileges == first.privileges
        enforcer.release(first)
        assert shop.acls() == before
        enforcer.release(first)
        assert shop.acls() == before
    insert_refund(shop.connect_as(ROLE, autocommit=True))


def test_open_transaction_is_rolled_back_by_ending_its_session(shop: Shop) -> None:
    agent = shop.connect_as(ROLE)  # not autocommit: the INSERT stays in an open transaction
    insert_refund(agent, 999)
    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
    assert rev.terminated_sessions == 1
    with pytest.raises(psycopg.OperationalError):
        agent.execute("SELECT 1")
    assert shop.sql("SELECT count(*) FROM refunds WHERE amount = 999") == [(0,)]


def test_without_ending_sessions_an_open_transaction_still_commits_its_earlier_writes(shop: Shop) -> None:
    """Why terminate_sessions is on by default: REVOKE stops the next statement, not the rows already written."""
    agent = shop.connect_as(ROLE)
    insert_refund(agent, 777)
    with shop.enforcer(terminate_sessions=False) as enforcer:
        rev = enforcer.quarantine(AGENT)
    assert rev.terminated_sessions == 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        insert_refund(agent, 778)
    agent.rollback()
    # And a transaction that wrote before the REVOKE and commits after it keeps its rows:
    with shop.enforcer() as enforcer:
        enforcer.release(rev)
    late = shop.connect_as(ROLE)
    insert_refund(late, 780)
    with shop.enforcer(terminate_sessions=False) as enforcer:
        enforcer.quarantine(AGENT)
    late.commit()
    assert shop.sql("SELECT count(*) FROM refunds WHERE amount = 780") == [(1,)]


def test_column_grants_truncate_and_grant_option_are_taken_and_restored(shop: Shop) -> None:
    shop.sql("REVOKE ALL ON refunds, orders FROM agent_refund_02")
    shop.sql("GRANT SELECT, UPDATE (status) ON refunds TO agent_refund_02")
    shop.sql("GRANT SELECT, TRUNCATE ON orders TO agent_refund_02")
    shop.sql("GRANT INSERT ON refunds TO agent_refund_02 WITH GRANT OPTION")
    before = shop.acls()
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("UPDATE refunds SET status = 'paid' WHERE id = 1")

    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert set(rev.privileges) == {("public", "refunds", "INSERT"), ("public", "orders", "TRUNCATE")}
        assert rev.column_privileges == (("public", "refunds", "status", "UPDATE"),)
        assert rev.grant_options == (("public", "refunds", "", "INSERT"),)
        assert rev.inherited == ()
        agent = shop.connect_as(ROLE, autocommit=True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            agent.execute("UPDATE refunds SET status = 'void' WHERE id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            agent.execute("TRUNCATE orders")
        enforcer.release(Revocation.from_dict(rev.to_dict()))

    assert shop.acls() == before
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("UPDATE refunds SET status = 'void' WHERE id = 1")


def test_writes_through_public_are_reported_as_not_enforced_and_memberships_are_taken(shop: Shop) -> None:
    """By design since issue 17: the membership that gave writes is taken (and given back); PUBLIC stays, and the
    quarantine says it is not enforced, with what is still writable, as its own role's attempt found it."""
    shop.sql("GRANT INSERT ON orders TO PUBLIC")
    shop.create_role("refund_writers", "refunds", privileges="UPDATE")
    shop.sql("ALTER ROLE refund_writers NOLOGIN")
    shop.sql("GRANT refund_writers TO agent_refund_02")
    before = shop.acls()
    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.memberships == (("refund_writers", "", "postgres"),)
        assert rev.inherited == ("PUBLIC",)
        assert rev.still_writable == ("INSERT on public.orders",)
        assert not rev.enforced and "not enforced: still writable through INSERT on public.orders" in rev.describe()
        # And indeed: the write through PUBLIC still works, the one through the membership no longer does.
        agent = shop.connect_as(ROLE, autocommit=True)
        agent.execute("INSERT INTO orders (total) VALUES (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            agent.execute("UPDATE refunds SET status = 'x' WHERE id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            insert_refund(agent)
        enforcer.release(Revocation.from_dict(rev.to_dict()))
    assert shop.acls() == before  # the membership (and its grantor) is back
    shop.connect_as(ROLE, autocommit=True).execute("UPDATE refunds SET status = 'x' WHERE id = 1")


def test_pg_write_all_data_is_taken_and_given_back(shop: Shop) -> None:
    shop.sql("REVOKE ALL ON refunds, orders FROM agent_refund_02")
    shop.sql("GRANT pg_write_all_data TO agent_refund_02")
    agent = shop.connect_as(ROLE, autocommit=True)
    insert_refund(agent)
    before = shop.acls()
    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.memberships == (("pg_write_all_data", "", "postgres"),) and rev.privileges == ()
        assert rev.enforced, rev
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            insert_refund(shop.connect_as(ROLE, autocommit=True))
        enforcer.release(Revocation.from_dict(rev.to_dict()))
    assert shop.acls() == before
    insert_refund(shop.connect_as(ROLE, autocommit=True))


def test_missing_watched_table_is_skipped(shop: Shop) -> None:
    with shop.enforcer(tables=[*TABLES, "public.nope", "nope.refunds"]) as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert {(t, p) for _, t, p in rev.privileges} == WRITES
        enforcer.release(rev)


def test_unknown_and_superuser_roles_are_refused_and_nothing_changes(shop: Shop) -> None:
    before = shop.acls()
    logins_before = shop.sql("SELECT rolname, rolcanlogin FROM pg_roles ORDER BY 1")
    # A hostile agent id that maps to the administrator must not lock it out.
    mapping = RoleMapping(map={"postgres": "postgres", "agent_nobody": "agent_nobody"})
    for mode in ("revoke_writes", "nologin"):
        with shop.enforcer(mapping, mode=mode) as enforcer:
            with pytest.raises(EnforcementError, match="superuser"):
                enforcer.quarantine("postgres")
            with pytest.raises(EnforcementError, match="does not exist"):
                enforcer.quarantine("agent_nobody")
            with pytest.raises(EnforcementError, match="does not exist"):
                enforcer.release(
                    Revocation("agent_nobody", "revoke_writes", (("public", "orders", "INSERT"),), None, 0)
                )
    assert shop.acls() == before
    assert shop.sql("SELECT rolname, rolcanlogin FROM pg_roles ORDER BY 1") == logins_before


# -- nologin --------------------------------------------------------------------------------------------------


def test_nologin_ends_sessions_and_refuses_new_ones(shop: Shop) -> None:
    open_session = shop.connect_as(ROLE, autocommit=True)
    insert_refund(open_session)
    acl_before = shop.acls()
    with shop.enforcer(mode="nologin") as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.mode == "nologin" and rev.had_login is True and rev.privileges == ()
        assert rev.terminated_sessions == 1
        assert rev.inherited == ()
        with pytest.raises(psycopg.OperationalError):
            open_session.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            shop.connect_as(ROLE)
        assert not shop.can_login(ROLE)
        assert shop.acls() == acl_before  # nologin leaves the grants alone

        # Idempotent: the second quarantine finds no LOGIN to take, its release gives none back.
        second = enforcer.quarantine(AGENT)
        assert second.had_login is False and second.terminated_sessions == 0
        enforcer.release(second)
        assert not shop.can_login(ROLE)

        enforcer.release(Revocation.from_dict(rev.to_dict()))
        enforcer.release(rev)
    assert shop.can_login(ROLE)
    insert_refund(shop.connect_as(ROLE, autocommit=True))


def test_nologin_keeps_a_role_that_never_could_log_in_that_way(shop: Shop) -> None:
    shop.sql("ALTER ROLE agent_refund_02 NOLOGIN")
    with shop.enforcer(mode="nologin") as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.had_login is False
        enforcer.release(rev)
    assert not shop.can_login(ROLE)


def test_nologin_reports_login_roles_that_can_set_role(shop: Shop) -> None:
    shop.create_role("ops_person")
    shop.sql("GRANT agent_refund_02 TO ops_person")
    with shop.enforcer(mode="nologin") as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.inherited == ("ops_person",)
        enforcer.release(rev)


# -- hostile names --------------------------------------------------------------------------------------------

HOSTILE_ROLES = {
    "quote": 'a"; DROP TABLE refunds; --',
    "single": "o'brien'; DROP ROLE postgres; --",
    "semicolon": "semi;colon",
    "space": "agent with space",
    "unicode": "agént-①",
    "public-ish": "PUBLIC",  # quoted uppercase is a real role, not the PUBLIC keyword
}


def install_audit(shop: Shop) -> None:
    """Record the command tag of every DDL statement (GRANT/REVOKE included) run in this database."""
    shop.sql("CREATE TABLE audit (tag text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())")
    shop.sql(
        "CREATE FUNCTION audit_ddl() RETURNS event_trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO public.audit (tag) VALUES (tg_tag); END $$"
    )
    shop.sql("CREATE EVENT TRIGGER audit_ddl ON ddl_command_start EXECUTE FUNCTION audit_ddl()")


def test_hostile_role_and_table_names_are_quoted(shop: Shop) -> None:
    shop.sql(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier("public", HOSTILE_TABLE)))
    tables = [*TABLES, f"public.{HOSTILE_TABLE}"]
    for role in HOSTILE_ROLES.values():
        shop.create_role(role, "refunds", "orders", HOSTILE_TABLE)
    install_audit(shop)
    tables_before, roles_before, acl_before = shop.tables(), shop.all_roles(), shop.acls()
    rows_before = shop.sql("SELECT (SELECT count(*) FROM refunds), (SELECT count(*) FROM orders)")
    # The agent ids are hostile too; the explicit map names the weird roles, the pattern lets them through.
    mapping = RoleMapping(map={f"id {k}: {v}": v for k, v in HOSTILE_ROLES.items()}, pattern=".*")

    revs = []
    with shop.enforcer(mapping, tables) as enforcer:
        for key, role in HOSTILE_ROLES.items():
            agent = shop.connect_as(role, autocommit=True)
            agent.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(HOSTILE_TABLE)))
            rev = enforcer.quarantine(f"id {key}: {role}")
            assert rev.role == role
            assert {(t, p) for _, t, p in rev.privileges} == WRITES | {
                (HOSTILE_TABLE, p) for p in ("INSERT", "UPDATE", "DELETE")
            }
            assert rev.inherited == ()
            again = shop.connect_as(role, autocommit=True)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                again.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(sql.Identifier(HOSTILE_TABLE)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                insert_refund(again)
            revs.append(rev)
        # The untouched agent kept its rights: no REVOKE went to PUBLIC or to the wrong role.
        insert_refund(shop.connect_as(ROLE, autocommit=True))
        for rev in revs:
            enforcer.release(Revocation.from_dict(rev.to_dict()))

    for role in HOSTILE_ROLES.values():
        insert_refund(shop.connect_as(role, autocommit=True))
    assert shop.tables() == tables_before
    assert shop.all_roles() == roles_before
    assert shop.acls() == acl_before
    rows_after = shop.sql("SELECT (SELECT count(*) FROM refunds), (SELECT count(*) FROM orders)")
    assert rows_after[0][1] == rows_before[0][1]
    assert rows_after[0][0] == rows_before[0][0] + 1 + len(HOSTILE_ROLES)  # only the test's own inserts
    # The only DDL that ran: one REVOKE per privilege taken, one GRANT per privilege given back.
    tags = [r[0] for r in shop.sql("SELECT tag FROM audit ORDER BY at")]
    taken = sum(len(r.privileges) for r in revs)
    assert sorted(tags) == ["GRANT"] * taken + ["REVOKE"] * taken


def test_hostile_table_name_that_does_not_exist_is_harmless(shop: Shop) -> None:
    install_audit(shop)
    before = shop.tables()
    with shop.enforcer(tables=[*TABLES, f"public.{HOSTILE_TABLE}", "public.refunds; DROP TABLE orders"]) as e:
        rev = e.quarantine(AGENT)
        e.release(rev)
    assert shop.tables() == before
    assert {r[0] for r in shop.sql("SELECT tag FROM audit")} == {"GRANT", "REVOKE"}


def test_long_agent_id_is_refused_not_truncated_to_another_role(shop: Shop) -> None:
    victim = "agent_" + "x" * 57  # 63 bytes: the longest name PostgreSQL keeps
    shop.create_role(victim, "refunds", "orders")
    before = shop.acls()
    permissive = RoleMapping(template="agent_{agent_id}", pattern=".*")
    with shop.enforcer(permissive) as enforcer:
        for agent_id in ["x" * 10_240, "x" * 57 + "y", "x" * 57 + "é"]:
            with pytest.raises(EnforcementError, match="63"):
                enforcer.quarantine(agent_id)
        with shop.enforcer(permissive, mode="nologin") as nologin:
            with pytest.raises(EnforcementError, match="63"):
                nologin.quarantine("x" * 10_240)
    assert shop.acls() == before
    assert shop.can_login(victim)
    insert_refund(shop.connect_as(victim, autocommit=True))


def test_forged_revocation_cannot_grant_beyond_the_watched_writes(shop: Shop) -> None:
    shop.sql("CREATE TABLE secrets (v text)")
    before = shop.acls()
    forged = Revocation(ROLE, "revoke_writes", (("public", "secrets", "INSERT"),), None, 0)
    with shop.enforcer() as enforcer, pytest.raises(EnforcementError, match="not a watched table"):
        enforcer.release(forged)
    assert shop.acls() == before


def test_grants_from_another_grantor_are_reported_as_not_enforced(shop: Shop) -> None:
    # A grant made by a role other than the owner survives the owner's (superuser's) REVOKE: it must show.
    shop.create_role("delegate", "orders", privileges="INSERT")
    shop.sql("GRANT INSERT ON orders TO delegate WITH GRANT OPTION")
    delegate = shop.connect_as("delegate", autocommit=True)
    delegate.execute("GRANT INSERT ON orders TO agent_refund_02")
    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.inherited == (ROLE,)
        assert rev.still_writable == ("INSERT on public.orders",) and not rev.enforced
        shop.connect_as(ROLE, autocommit=True).execute("INSERT INTO orders (total) VALUES (1)")
        enforcer.release(rev)


# -- issue 17: a quarantine the agent cannot block --------------------------------------------------------------


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 90.0) -> Any:
    """Poll ``probe`` until it returns something truthy; on timeout fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not seen in {timeout:.0f} s; last seen: {last!r}")


def alive(shop: Shop, pid: int) -> bool:
    return bool(shop.sql("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])[0][0])


def enforcers_waiting(shop: Shop) -> list[tuple[Any, ...]]:
    """The enforcer sessions of this database that wait for a lock, with the sessions they wait for."""
    return shop.sql(
        "SELECT pid, pg_blocking_pids(pid), query FROM pg_stat_activity "
        "WHERE application_name = 'writeguard-enforcer' AND datname = %s AND wait_event_type = 'Lock'",
        [shop.dbname],
    )


def test_the_agent_cannot_block_its_quarantine_with_the_old_advisory_lock(shop: Shop) -> None:
    # Before issue 17 the enforcer serialised on this advisory lock (class 0x77677264, "wgrd"), which any role can
    # take: the REVOKE then waited until its statement timeout and nothing changed.
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [0x77677264, ROLE])
    with shop.enforcer(lock_timeout=1, max_wait=10) as enforcer:
        rev = enforcer.quarantine(AGENT)
    assert {(t, p) for _, t, p in rev.privileges} == WRITES and rev.enforced, rev
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        insert_refund(shop.connect_as(ROLE, autocommit=True))


def test_an_agent_transaction_that_blocks_the_revoke_is_ended_and_the_revoke_retried(shop: Shop) -> None:
    """An open GRANT on refunds (the agent holds a grant option) locks the ACL row the REVOKE must change."""
    shop.sql("GRANT INSERT ON refunds TO agent_refund_02 WITH GRANT OPTION")
    shop.create_role("helper")
    blocker = shop.connect_as(ROLE)  # not autocommit: the GRANT stays uncommitted
    blocker.execute("GRANT INSERT ON refunds TO helper")
    pid = blocker.info.backend_pid
    with shop.enforcer(lock_timeout=1, max_wait=60, terminate_sessions=False) as enforcer:
        rev = enforcer.quarantine(AGENT)
    assert rev.enforced and {(t, p) for _, t, p in rev.privileges} == WRITES, rev
    assert rev.terminated_sessions == 1  # the blocking session, although terminate_sessions is off
    assert not alive(shop, pid)
    with pytest.raises(psycopg.OperationalError):
        blocker.execute("SELECT 1")
    # Its uncommitted GRANT died with it, and the agent cannot write.
    assert shop.sql("SELECT has_table_privilege('helper', 'public.refunds', 'INSERT')") == [(False,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        insert_refund(shop.connect_as(ROLE, autocommit=True))


def test_an_agent_lock_that_blocks_the_verification_is_ended(shop: Shop) -> None:
    """LOCK TABLE needs only UPDATE: the agent's lock would hold up the write attempts made as its role."""
    locker = shop.connect_as(ROLE)
    locker.execute("LOCK TABLE refunds IN ACCESS EXCLUSIVE MODE")
    pid = locker.info.backend_pid
    with shop.enforcer(lock_timeout=1, max_wait=60, terminate_sessions=False) as enforcer:
        rev = enforcer.quarantine(AGENT)
    assert rev.enforced and rev.still_writable == (), rev
    assert rev.terminated_sessions == 1 and not alive(shop, pid)


def test_a_blocker_that_is_not_the_agent_is_named_and_nothing_changes(shop: Shop) -> None:
    """A migration's open transaction is not ended: after the bounded wait the error says who held the lock."""
    shop.create_role("reporting")
    agent = shop.connect_as(ROLE, autocommit=True)
    before = shop.acls()
    holder = shop.pg.connect(dbname=shop.dbname, application_name="migration")
    shop.sessions.append(holder)
    holder.execute("GRANT SELECT ON refunds TO reporting")
    pid = holder.info.backend_pid
    with shop.enforcer(lock_timeout=1, max_wait=4) as enforcer, pytest.raises(EnforcementError) as failed:
        enforcer.quarantine(AGENT)
    message = str(failed.value)
    assert failed.value.retryable, message
    assert f"pid {pid} (role 'postgres', application 'migration', idle in transaction" in message, message
    assert "nothing changed" in message, message
    assert alive(shop, pid)  # not the agent's: left alone
    holder.rollback()
    assert shop.acls() == before
    insert_refund(agent)  # the agent kept its rights (and its session)


def test_a_verification_that_cannot_be_done_is_reported_as_not_enforced(shop: Shop) -> None:
    """The change committed, but another session's lock keeps the agent's write attempts from running."""
    before = shop.acls()
    holder = shop.pg.connect(dbname=shop.dbname, application_name="maintenance")
    shop.sessions.append(holder)
    holder.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
    with shop.enforcer(lock_timeout=1, max_wait=3) as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert {(t, p) for _, t, p in rev.privileges} == WRITES  # taken: the REVOKE needs no lock on the table
        assert not rev.enforced
        (unverified,) = rev.still_writable
        assert unverified.startswith("unverified: verification of role 'agent_refund_02''s quarantine not done")
        assert "application 'maintenance'" in unverified and "nothing changed" not in unverified, unverified
        holder.rollback()
        enforcer.release(rev)
    assert shop.acls() == before


def test_concurrent_enforcers_on_one_role_both_complete(shop: Shop, caplog: pytest.LogCaptureFixture) -> None:
    """Two workers quarantine the same agent at once: PostgreSQL's "tuple concurrently updated" is retried."""
    before = shop.acls()
    holder = shop.pg.connect(dbname=shop.dbname)
    shop.sessions.append(holder)
    shop.create_role("reporting")
    holder.execute("GRANT SELECT ON orders, refunds TO reporting")  # both REVOKEs wait on this transaction
    results: dict[int, Revocation | BaseException] = {}

    def run(i: int) -> None:
        try:
            with shop.enforcer(lock_timeout=60, max_wait=120) as enforcer:
                results[i] = enforcer.quarantine(AGENT)
        except BaseException as e:  # reported below
            results[i] = e

    caplog.set_level(logging.INFO, logger="writeguard.pg_enforce")
    threads = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    # One waits for the open transaction, the other for the first (the row's lock queue).
    waiting = wait_until("both enforcers waiting", lambda: (w := enforcers_waiting(shop)) and len(w) == 2 and w)
    assert holder.info.backend_pid in {pid for _, blockers, _ in waiting for pid in blockers}, waiting
    holder.commit()  # both wake up on a row that changed under them
    for t in threads:
        t.join(150)
    revs = [results.get(i) for i in (1, 2)]
    assert all(isinstance(r, Revocation) for r in revs), revs
    first, second = cast(list[Revocation], revs)
    retried = [r.getMessage() for r in caplog.records if "tuple concurrently updated" in r.getMessage()]
    assert retried, "the row changed under both waiting REVOKEs: at least one attempt must have been retried"
    assert {(t, p) for _, t, p in first.merged(second).privileges} == WRITES
    assert first.enforced and second.enforced
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        insert_refund(shop.connect_as(ROLE, autocommit=True))
    with shop.enforcer() as enforcer:
        enforcer.release(first.merged(second))
    shop.sql("REVOKE SELECT ON orders, refunds FROM reporting")
    assert shop.acls() == before


# -- issue 17: what the agent passed on, partitions, sequences, default privileges -------------------------------


def test_grants_the_agent_passed_on_are_revoked_with_cascade_and_recorded(shop: Shop) -> None:
    """Before issue 17 this REVOKE failed with "dependent privileges exist" and nothing was revoked."""
    shop.sql("GRANT INSERT, UPDATE ON refunds TO agent_refund_02 WITH GRANT OPTION")
    shop.create_role("helper")
    shop.create_role("helper2")
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("GRANT INSERT ON refunds TO PUBLIC")
    agent.execute("GRANT UPDATE ON refunds TO helper WITH GRANT OPTION")
    shop.connect_as("helper", autocommit=True).execute("GRANT UPDATE ON refunds TO helper2")  # one more step on
    before = shop.acls()
    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.enforced, rev
        assert set(rev.cascaded) == {
            ("public", "refunds", "", "INSERT", "PUBLIC", ROLE),
            ("public", "refunds", "", "UPDATE", "helper", ROLE),
            ("public", "refunds", "", "UPDATE", "helper2", "helper"),
        }
        assert "3 grants it had passed on removed (CASCADE)" in rev.describe()
        for role in ("helper", "helper2"):
            assert shop.sql("SELECT has_table_privilege(%s, 'public.refunds', 'UPDATE')", [role]) == [(False,)]
        assert shop.sql("SELECT has_table_privilege('public', 'public.refunds', 'INSERT')") == [(False,)]
        enforcer.release(Revocation.from_dict(rev.to_dict()))
    # The agent's own grants (with their grant options) are back; what it passed on is not.
    after = shop.acls()
    removed = {"=a/agent_refund_02", "helper=w*/agent_refund_02", "helper2=w/helper"}
    assert sorted(set(before["refunds"]) - removed) == after["refunds"], (before["refunds"], after["refunds"])
    assert {k: v for k, v in after.items() if k != "refunds"} == {k: v for k, v in before.items() if k != "refunds"}


def make_ledger(shop: Shop) -> list[str]:
    """A partitioned watched table with one partition; the agent may write on both."""
    shop.sql("CREATE TABLE ledger (id bigserial, k int NOT NULL, amount numeric) PARTITION BY RANGE (k)")
    shop.sql("CREATE TABLE ledger_p0 PARTITION OF ledger FOR VALUES FROM (0) TO (10)")
    shop.sql("GRANT SELECT, INSERT, UPDATE, DELETE ON ledger, ledger_p0 TO agent_refund_02")
    shop.sql("GRANT USAGE ON SEQUENCE ledger_id_seq TO agent_refund_02")
    return [*TABLES, "public.ledger"]


def test_a_partition_of_a_watched_table_is_covered(shop: Shop) -> None:
    tables = make_ledger(shop)
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("INSERT INTO ledger_p0 (k, amount) VALUES (1, 5)")
    before = shop.acls()
    with shop.enforcer(tables=tables) as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.partitions == (("public", "ledger_p0", "public", "ledger"),)
        assert {p for _, t, p in rev.privileges if t == "ledger_p0"} == {"INSERT", "UPDATE", "DELETE"}
        assert rev.enforced, rev
        again = shop.connect_as(ROLE, autocommit=True)
        for statement in (
            "INSERT INTO ledger_p0 (k, amount) VALUES (2, 5)",
            "UPDATE ledger_p0 SET amount = 0",
            "DELETE FROM ledger_p0",
            "INSERT INTO ledger (k, amount) VALUES (2, 5)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                again.execute(statement)
        enforcer.release(Revocation.from_dict(rev.to_dict()))
    assert shop.acls() == before
    shop.connect_as(ROLE, autocommit=True).execute("INSERT INTO ledger_p0 (k, amount) VALUES (3, 5)")


def test_a_partition_created_during_the_quarantine_is_not_writable(shop: Shop) -> None:
    tables = make_ledger(shop)
    # The owner's default privileges would give the agent INSERT on every table it creates later.
    shop.sql("ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT INSERT ON TABLES TO agent_refund_02")
    shop.sql("ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT UPDATE ON TABLES TO agent_refund_02")
    shop.sql("ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT UPDATE ON SEQUENCES TO agent_refund_02")
    before = shop.acls()
    with shop.enforcer(tables=tables) as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert set(rev.default_privileges) == {
            ("postgres", "", "tables", "INSERT"),
            ("postgres", "public", "tables", "UPDATE"),
            ("postgres", "", "sequences", "UPDATE"),
        }
        assert rev.enforced, rev
        shop.sql("CREATE TABLE ledger_p1 PARTITION OF ledger FOR VALUES FROM (10) TO (20)")
        agent = shop.connect_as(ROLE, autocommit=True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            agent.execute("INSERT INTO ledger_p1 (k, amount) VALUES (11, 5)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            agent.execute("UPDATE ledger_p1 SET amount = 0")
        # A second quarantine covers the new partition too (it has nothing to take there).
        assert enforcer.quarantine(AGENT).enforced
        shop.sql("DROP TABLE ledger_p1")
        enforcer.release(Revocation.from_dict(rev.to_dict()))
    assert shop.acls() == before
    shop.sql("CREATE TABLE ledger_p2 PARTITION OF ledger FOR VALUES FROM (20) TO (30)")
    shop.connect_as(ROLE, autocommit=True).execute("INSERT INTO ledger_p2 (k, amount) VALUES (21, 5)")


def test_setval_on_a_watched_tables_sequence_is_taken(shop: Shop) -> None:
    tables = make_ledger(shop)
    shop.sql("GRANT UPDATE ON SEQUENCE refunds_id_seq, ledger_id_seq TO agent_refund_02")  # identity and serial
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("SELECT setval('refunds_id_seq', 500)")
    before = shop.acls()
    with shop.enforcer(tables=tables) as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert set(rev.sequence_privileges) == {
            ("public", "refunds_id_seq", "UPDATE"),
            ("public", "ledger_id_seq", "UPDATE"),
        }
        assert set(rev.sequences) == {
            ("public", "refunds_id_seq", "public", "refunds"),
            ("public", "ledger_id_seq", "public", "ledger"),
        }
        assert rev.enforced, rev
        again = shop.connect_as(ROLE, autocommit=True)
        for seq in ("refunds_id_seq", "ledger_id_seq"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                again.execute("SELECT setval(%s, 1000)", [seq])
        enforcer.release(Revocation.from_dict(rev.to_dict()))
    assert shop.acls() == before
    shop.connect_as(ROLE, autocommit=True).execute("SELECT setval('refunds_id_seq', 600)")


# -- issue 17: roles a quarantine cannot hold are refused ----------------------------------------------------------


def test_a_role_that_owns_a_watched_table_is_refused(shop: Shop) -> None:
    """The id `app_owner` must not revoke the owner's writes (an outage), nor its login."""
    shop.create_role("app_owner")
    shop.sql("ALTER TABLE orders OWNER TO app_owner")
    shop.create_role("app_team")
    shop.sql("GRANT app_owner TO app_team")  # a member can SET ROLE app_owner
    owner = shop.connect_as("app_owner", autocommit=True)
    before = shop.acls()
    for mode in ("revoke_writes", "nologin"):
        mapping = RoleMapping(map={"app_owner": "app_owner", "app_team": "app_team"})
        with shop.enforcer(mapping, mode=mode) as enforcer:
            for who in ("app_owner", "app_team"):
                with pytest.raises(
                    EnforcementError, match=r"owns, or is a member of the owner of, watched public\.orders"
                ):
                    enforcer.quarantine(who)
        # With the prefixed template, the same id names a role that is not the owner's.
        with shop.enforcer(mode=mode) as enforcer, pytest.raises(EnforcementError, match="'agent_app_owner' does not"):
            enforcer.quarantine("app_owner")
    assert shop.acls() == before and shop.can_login("app_owner") and shop.can_login("app_team")
    owner.execute("INSERT INTO orders (total) VALUES (1)")


@pytest.mark.parametrize("attribute", ["CREATEROLE", "REPLICATION", "BYPASSRLS", "SUPERUSER"])
def test_a_role_with_power_a_quarantine_cannot_hold_is_refused(shop: Shop, attribute: str) -> None:
    """With CREATEROLE the agent could GRANT itself the owner's role back; the quarantine refuses to pretend."""
    shop.create_role("agent_strong", "refunds")
    shop.sql(sql.SQL("ALTER ROLE agent_strong " + attribute))
    shop.create_role("agent_weak", "refunds")
    shop.create_role("powers")
    shop.sql(sql.SQL("ALTER ROLE powers NOLOGIN " + attribute))
    shop.sql("GRANT powers TO agent_weak")  # only a member: it can SET ROLE powers
    before = shop.acls()
    strong = "is a superuser" if attribute == "SUPERUSER" else rf"can act as agent_strong \({attribute}\)"
    for mode in ("revoke_writes", "nologin"):
        with shop.enforcer(mode=mode) as enforcer:
            with pytest.raises(EnforcementError, match=strong):
                enforcer.quarantine("strong")
            with pytest.raises(EnforcementError, match=rf"can act as powers \({attribute}\)"):
                enforcer.quarantine("weak")
    assert shop.acls() == before
    assert shop.can_login("agent_strong") and shop.can_login("agent_weak")
    insert_refund(shop.connect_as("agent_weak", autocommit=True))


def test_createrole_lets_an_agent_take_the_owners_role_which_is_why_it_is_refused(shop: Shop) -> None:
    # The attack itself, on the real server: a CREATEROLE role makes itself a member of the owner's role.
    shop.create_role("app_owner")
    shop.sql("ALTER TABLE refunds OWNER TO app_owner")
    shop.sql("ALTER ROLE agent_refund_02 CREATEROLE")
    shop.sql("REVOKE ALL ON refunds FROM agent_refund_02")
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("GRANT app_owner TO agent_refund_02")
    insert_refund(agent)  # written as a member of the owner
    agent.execute("REVOKE app_owner FROM agent_refund_02")
    with shop.enforcer() as enforcer, pytest.raises(EnforcementError, match="CREATEROLE"):
        enforcer.quarantine(AGENT)


# -- issue 17: verification with the agent's own role -----------------------------------------------------------


def test_what_stays_writable_is_found_by_the_agents_own_attempts_and_reported(shop: Shop) -> None:
    tables = make_ledger(shop)
    # Grants no quarantine of one role may take: to PUBLIC, on a partition, per column, and TRUNCATE.
    shop.sql("GRANT INSERT ON ledger_p0 TO PUBLIC")
    shop.sql("GRANT UPDATE (status) ON refunds TO PUBLIC")
    shop.sql("GRANT TRUNCATE ON orders TO PUBLIC")
    shop.sql("GRANT UPDATE ON SEQUENCE ledger_id_seq TO PUBLIC")
    with shop.enforcer(tables=tables) as enforcer:
        rev = enforcer.quarantine(AGENT)
    assert not rev.enforced
    assert set(rev.still_writable) == {
        "INSERT on public.ledger_p0",
        "UPDATE (status) on public.refunds",
        "TRUNCATE on public.orders",
        "UPDATE on sequence public.ledger_id_seq (setval)",
    }, rev.still_writable
    assert rev.inherited == ("PUBLIC",)
    # Each is real: the agent can do exactly these.
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("INSERT INTO ledger_p0 (k, amount) VALUES (1, 1)")
    agent.execute("UPDATE refunds SET status = 'x' WHERE id = 1")
    agent.execute("SELECT setval('ledger_id_seq', 100)")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        agent.execute("UPDATE refunds SET amount = 0 WHERE id = 1")
    agent.execute("TRUNCATE orders")
