"""Quarantine in a real PostgreSQL: the agent's role loses its writes (or its LOGIN), release restores it exactly.

One throwaway cluster per module; each test gets its own database and drops the roles it made. The agent's
side is played by real connections made *as* the agent's role.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

from connectors.pg_enforce import EnforcementError, PostgresEnforcer, Revocation, RoleMapping
from connectors.postgres import LocalPostgres

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
        """Every relation's and column's ACL items, sorted: compares what is granted, not the item order."""
        out: dict[str, list[str]] = {}
        for rel, acl in self.sql(
            "SELECT c.relname::text, coalesce(c.relacl::text[], '{}') FROM pg_class c "
            "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"
        ):
            out[rel] = sorted(acl)
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
        assert rev.inherited == ()
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


def test_writes_through_public_and_membership_are_reported(shop: Shop) -> None:
    shop.sql("GRANT INSERT ON orders TO PUBLIC")
    shop.create_role("refund_writers", "refunds", privileges="UPDATE")
    shop.sql("ALTER ROLE refund_writers NOLOGIN")
    shop.sql("GRANT refund_writers TO agent_refund_02")
    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
    assert rev.inherited == ("PUBLIC", "refund_writers")
    # The quarantine is visibly incomplete, and indeed these writes still work:
    agent = shop.connect_as(ROLE, autocommit=True)
    agent.execute("INSERT INTO orders (total) VALUES (1)")
    agent.execute("UPDATE refunds SET status = 'x' WHERE id = 1")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        insert_refund(agent)


def test_pg_write_all_data_and_ownership_are_reported(shop: Shop) -> None:
    shop.sql("GRANT pg_write_all_data TO agent_refund_02")
    with shop.enforcer() as enforcer:
        assert enforcer.quarantine(AGENT).inherited == ("pg_write_all_data",)
        shop.sql("REVOKE pg_write_all_data FROM agent_refund_02")
        shop.sql("ALTER TABLE orders OWNER TO agent_refund_02")
        # The owner can grant itself its privileges back at any time.
        assert ROLE in enforcer.quarantine(AGENT).inherited


def test_missing_watched_table_is_skipped(shop: Shop) -> None:
    with shop.enforcer(tables=[*TABLES, "public.nope", "nope.refunds"]) as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert {(t, p) for _, t, p in rev.privileges} == WRITES
        enforcer.release(rev)


def test_unknown_and_superuser_roles_are_refused_and_nothing_changes(shop: Shop) -> None:
    before = shop.acls()
    logins_before = shop.sql("SELECT rolname, rolcanlogin FROM pg_roles ORDER BY 1")
    # A hostile agent id that maps to the administrator must not lock it out.
    for mode in ("revoke_writes", "nologin"):
        with shop.enforcer(RoleMapping(template="{agent_id}"), mode=mode) as enforcer:
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


def test_grants_from_another_grantor_are_reported_and_onward_grants_refused(shop: Shop) -> None:
    # A grant made by a role other than the owner survives the owner's (superuser's) REVOKE: it must show.
    shop.create_role("delegate", "orders", privileges="INSERT")
    shop.sql("GRANT INSERT ON orders TO delegate WITH GRANT OPTION")
    delegate = shop.connect_as("delegate", autocommit=True)
    delegate.execute("GRANT INSERT ON orders TO agent_refund_02")
    with shop.enforcer() as enforcer:
        rev = enforcer.quarantine(AGENT)
        assert rev.inherited == (ROLE,)
        shop.connect_as(ROLE, autocommit=True).execute("INSERT INTO orders (total) VALUES (1)")
        enforcer.release(rev)

    # An agent that passed its own grant on to another role: REVOKE without CASCADE fails, nothing changes.
    shop.sql("GRANT INSERT ON refunds TO agent_refund_02 WITH GRANT OPTION")
    shop.create_role("helper")
    shop.connect_as(ROLE, autocommit=True).execute("GRANT INSERT ON refunds TO helper")
    before = shop.acls()
    with shop.enforcer() as enforcer, pytest.raises(EnforcementError, match="nothing was revoked"):
        enforcer.quarantine(AGENT)
    assert shop.acls() == before
