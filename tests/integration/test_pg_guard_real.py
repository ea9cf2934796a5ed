"""Guard rails in a real PostgreSQL (issue 12): ``writeguard guard-sql --apply`` and ``writeguard approve`` as a DBA
and a human would run them, and the agent's side played by connections that log in *as* the agent's role.

One cluster for the module; roles are cluster-wide, so they are made once. ``bare`` is a database without guard
rails (the baseline), ``shop`` has them applied through the CLI, ``scripted`` through the printed psql script.
The agents' roles are members of the tables' owner role: the careless setup in which an agent can drop the table.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import errors, sql

from connectors.pg_guard import REFUSED_PREFIX, REFUSED_SQLSTATE, GuardRefusal, issue_approval, parse_refusal
from testbed.postgres import LocalPostgres, find_pg_bin
from testbed.process import ROOT

pytestmark = pytest.mark.integration

KEY = "approval-key-for-tests-0123456789abcdef"
OWNER = "shop_owner"
AGENT = "agent_refund_01"  # through roles.template agent_{agent_id}: agent refund_01
HOSTILE_AGENT_ROLE = "Ag\"ent'; DROP ROLE shop_owner; --"  # through roles.map
HUMAN = "ops_human"
HOSTILE_SCHEMA = "sch'ema"
HOSTILE_TABLE = 'we"ird; DROP TABLE refunds; --'
HOSTILE = f"{HOSTILE_SCHEMA}.{HOSTILE_TABLE}"
LIMIT = 10
ROWS = 50


def write_config(path: Path) -> Path:
    data: dict[str, Any] = {
        "enforcement": {
            "postgres": {
                "dsn": "host=unused",
                "roles": {
                    "template": "agent_{agent_id}",
                    "map": {"hostile": HOSTILE_AGENT_ROLE},
                    "pattern": "^.{1,63}$",  # lets the hostile name through, to show it is quoted
                },
            }
        },
        "guard": {"approval_key": "${WRITEGUARD_APPROVAL_KEY}"},
        "tables": [
            {"name": "public.refunds", "topic": "shop.public.refunds", "guard": {"max_rows_per_statement": LIMIT}},
            {
                "name": HOSTILE,
                "topic": "shop.hostile",
                "guard": {"max_delete_rows": LIMIT, "max_update_rows": None, "max_rows_per_statement": None},
            },
        ],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WRITEGUARD_APPROVAL_KEY": KEY}
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def make_shop(pg: LocalPostgres, dbname: str) -> None:
    pg.create_database(dbname)
    with pg.connect(dbname=dbname, autocommit=True) as c:
        c.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(OWNER)))
        c.execute(
            sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(HOSTILE_SCHEMA), sql.Identifier(OWNER))
        )
        for schema, table in (("public", "refunds"), (HOSTILE_SCHEMA, HOSTILE_TABLE)):
            t = sql.Identifier(schema, table)
            c.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, amount int NOT NULL)").format(t))
            c.execute(sql.SQL("INSERT INTO {} SELECT g, g FROM generate_series(1, %s) g").format(t), (ROWS,))
            c.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(t, sql.Identifier(OWNER)))


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    server = LocalPostgres(progress=lambda m: print(m, file=sys.stderr)).start()
    try:
        with server.connect(autocommit=True) as c:
            c.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(OWNER)))
            for role in (AGENT, HOSTILE_AGENT_ROLE, HUMAN):
                c.execute(
                    sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(role), sql.Identifier(OWNER))
                )
            # A human who can act as the agent's role (to show that doing so leaves them a human).
            c.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(AGENT), sql.Identifier(HUMAN)))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("guard") / "writeguard.yaml")


@pytest.fixture(scope="module")
def shop(pg: LocalPostgres, config: Path) -> str:
    make_shop(pg, "shop")
    with pg.connect(dbname="shop", autocommit=True) as c:
        # Before any refusal: the slot sees every logical decoding message written after it.
        c.execute("SELECT pg_create_logical_replication_slot('guard_test', 'test_decoding')")
    applied = cli("guard-sql", "-c", str(config), "--apply", "--dsn", pg.dsn(dbname="shop"))
    assert applied.returncode == 0, applied.stderr
    assert "applied: 2 tables guarded" in applied.stdout
    return "shop"


def connect(pg: LocalPostgres, role: str, dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn(role, dbname), autocommit=True)


def refused(conn: psycopg.Connection[Any], *statements: str | sql.Composable) -> str:
    """Run the statements in one transaction; they must be refused by the guard. Returns the error message."""
    with pytest.raises(psycopg.Error) as got:
        with conn.transaction():
            for st in statements:
                conn.execute(st)
    assert got.value.diag.sqlstate == REFUSED_SQLSTATE, got.value
    return got.value.diag.message_primary or ""


def scalar(pg: LocalPostgres, dbname: str, query: str | sql.Composable, params: Any = None) -> Any:
    with pg.connect(dbname=dbname) as c:
        row = c.execute(query, params).fetchone()
    assert row is not None
    return row[0]


REFUNDS = sql.Identifier("public", "refunds")


def count(pg: LocalPostgres, dbname: str, table: sql.Composable = REFUNDS) -> int:
    return int(scalar(pg, dbname, sql.SQL("SELECT count(*) FROM {}").format(table)))


def approve(config: Path, table: str, op: str, max_rows: int, ttl: str = "15m") -> str:
    out = cli(
        "approve",
        "-c",
        str(config),
        "--table",
        table,
        "--op",
        op,
        "--max-rows",
        str(max_rows),
        "--ttl",
        ttl,
        "--token-only",
        "--by",
        "test@host",
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def swapped_payload() -> str:
    """A real signature (1 row) under the payload of a token the agent made itself (1,000 rows)."""
    soon = datetime.now(UTC) + timedelta(minutes=5)
    real = issue_approval(KEY.encode(), "public.refunds", "delete", 1, soon)
    mine = issue_approval(b"x" * 32, "public.refunds", "delete", 1000, soon)
    return ".".join([*mine.split(".")[:2], real.split(".")[2]])


def set_approval(token: str) -> sql.Composed:
    return sql.SQL("SET LOCAL writeguard.approval = {}").format(sql.Literal(token))


# --- baseline ----------------------------------------------------------------------------------------------


def test_without_guard_rails_an_agent_truncates_and_drops_a_table(pg: LocalPostgres) -> None:
    make_shop(pg, "bare")
    with connect(pg, AGENT, "bare") as a:
        a.execute("DELETE FROM public.refunds WHERE id > 5")
        a.execute("TRUNCATE public.refunds")
        assert count(pg, "bare") == 0
        a.execute("DROP TABLE public.refunds")
    assert scalar(pg, "bare", "SELECT to_regclass('public.refunds')") is None


# --- refusals ----------------------------------------------------------------------------------------------


def test_an_agent_truncate_is_refused_with_the_documented_message(pg: LocalPostgres, shop: str) -> None:
    with connect(pg, AGENT, shop) as a:
        msg = refused(a, "TRUNCATE public.refunds")
    assert msg.startswith(
        f"writeguard refused TRUNCATE on public.refunds by agent role {AGENT}: agent roles may not "
        "truncate a watched table. Nothing was changed. No approval allows it: a human must run it"
    )
    assert count(pg, shop) == ROWS


def test_an_agent_drop_table_and_drop_of_a_guard_trigger_are_refused(pg: LocalPostgres, shop: str) -> None:
    with connect(pg, AGENT, shop) as a:
        msg = refused(a, "DROP TABLE public.refunds")
        assert msg.startswith(
            f"writeguard refused DROP TABLE on public.refunds by agent role {AGENT}: agent roles may not drop"
        )
        refused(a, "DROP TABLE public.refunds CASCADE")
        refused(a, "DROP TRIGGER zz_writeguard_guard_truncate ON public.refunds")
    assert count(pg, shop) == ROWS
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.refunds'::regclass AND tgname LIKE %s"
    assert scalar(pg, shop, triggers, ("zz_writeguard_guard_%",)) == 3


def test_an_agent_alter_table_is_refused_even_through_a_rename_or_set_role(pg: LocalPostgres, shop: str) -> None:
    with connect(pg, AGENT, shop) as a:
        for st in (
            "ALTER TABLE public.refunds ADD COLUMN note text",
            "ALTER TABLE public.refunds RENAME TO refunds_old",
            "ALTER TABLE public.refunds DISABLE TRIGGER zz_writeguard_guard_delete",
            "CREATE TRIGGER sneaky BEFORE DELETE ON public.refunds FOR EACH ROW "
            "EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        ):
            msg = refused(a, st)
            assert f"on public.refunds by agent role {AGENT}: agent roles may not alter a watched table" in msg, st
        # SET ROLE to the owner changes current_user, not the login role the guard reads.
        refused(a, f"SET LOCAL ROLE {OWNER}", "ALTER TABLE public.refunds ADD COLUMN note text")
        refused(a, f"SET LOCAL ROLE {OWNER}", "TRUNCATE public.refunds")
    columns = (
        "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = 'public.refunds'::regclass AND attnum > 0 AND NOT attisdropped"
    )
    assert scalar(pg, shop, columns) == ["id", "amount"]


def test_a_mass_delete_or_update_is_refused_and_a_small_one_passes(pg: LocalPostgres, shop: str) -> None:
    total = scalar(pg, shop, "SELECT sum(amount) FROM public.refunds")
    with connect(pg, AGENT, shop) as a:
        msg = refused(a, "DELETE FROM public.refunds WHERE id > 20")
        assert msg == (
            f"writeguard refused DELETE on public.refunds by agent role {AGENT}: 30 rows in one statement, above the "
            f"limit of {LIMIT} for agent roles (approval: missing). Nothing was changed. A human can approve it: "
            "writeguard approve -c CONFIG --table public.refunds --op delete --max-rows 30 --ttl 15m, then run the "
            "statement in a transaction after SET LOCAL writeguard.approval = '<token>';"
        )
        msg = refused(a, "UPDATE public.refunds SET amount = 0")
        assert f"UPDATE on public.refunds by agent role {AGENT}: {ROWS} rows in one statement" in msg
        assert count(pg, shop) == ROWS
        with a.transaction():
            a.execute("UPDATE public.refunds SET amount = amount + 1 WHERE id <= %s", (LIMIT,))
            a.execute("DELETE FROM public.refunds WHERE id = %s", (ROWS,))
            a.execute("INSERT INTO public.refunds VALUES (%s, %s)", (ROWS, ROWS))
    assert scalar(pg, shop, "SELECT sum(amount) FROM public.refunds") == total + LIMIT
    assert count(pg, shop) == ROWS


def test_an_approved_mass_delete_passes_once(pg: LocalPostgres, shop: str, config: Path) -> None:
    with pg.connect(dbname=shop, autocommit=True) as c:
        c.execute("CREATE TABLE public.refunds_copy AS SELECT * FROM public.refunds")
    token = approve(config, "public.refunds", "delete", 20)
    try:
        with connect(pg, AGENT, shop) as a:
            with a.transaction():
                a.execute(set_approval(token))
                a.execute("DELETE FROM public.refunds WHERE id > 40")  # 10: under the limit
                a.execute("DELETE FROM public.refunds WHERE id > 25")  # 15: approved
            assert count(pg, shop) == 25
            # The same token in another transaction: refused, although everything else fits.
            msg = refused(a, set_approval(token), "DELETE FROM public.refunds WHERE id > 10")
            assert "(approval: already used by another transaction)" in msg
    finally:
        with pg.connect(dbname=shop, autocommit=True) as c:  # a human puts the rows back (never refused)
            c.execute("INSERT INTO public.refunds SELECT * FROM public.refunds_copy ON CONFLICT DO NOTHING")
            c.execute("DROP TABLE public.refunds_copy")
    assert count(pg, shop) == ROWS


def test_a_rolled_back_approved_statement_leaves_the_token_usable(pg: LocalPostgres, shop: str, config: Path) -> None:
    token = approve(config, "public.refunds", "update", ROWS)
    with connect(pg, AGENT, shop) as a:
        with pytest.raises(psycopg.errors.DivisionByZero), a.transaction():
            a.execute(set_approval(token))
            a.execute("UPDATE public.refunds SET amount = amount")
            a.execute("SELECT 1 / 0")
        with a.transaction():
            a.execute(set_approval(token))
            a.execute("UPDATE public.refunds SET amount = amount")


@pytest.mark.parametrize(
    ("what", "token", "reason"),
    [
        (
            "expired",
            lambda: issue_approval(
                KEY.encode(), "public.refunds", "delete", 100, datetime.now(UTC) - timedelta(seconds=1)
            ),
            "expired",
        ),
        (
            "other table",
            lambda: issue_approval(KEY.encode(), HOSTILE, "delete", 100, datetime.now(UTC) + timedelta(minutes=5)),
            "wrong table",
        ),
        (
            "other op",
            lambda: issue_approval(
                KEY.encode(), "public.refunds", "update", 100, datetime.now(UTC) + timedelta(minutes=5)
            ),
            "wrong operation",
        ),
        (
            "too few rows",
            lambda: issue_approval(
                KEY.encode(), "public.refunds", "delete", 29, datetime.now(UTC) + timedelta(minutes=5)
            ),
            "too many rows",
        ),
        (
            "forged without the key",
            lambda: issue_approval(
                b"the agent's guess at a key, 32+ chars",
                "public.refunds",
                "delete",
                100,
                datetime.now(UTC) + timedelta(minutes=5),
            ),
            "bad signature",
        ),
        ("payload swapped under a real signature", swapped_payload, "bad signature"),
        ("garbage", lambda: "wg1.not-a-token", "malformed"),
    ],
)
def test_a_bad_token_is_refused_with_its_reason(
    pg: LocalPostgres, shop: str, what: str, token: Any, reason: str
) -> None:
    with connect(pg, AGENT, shop) as a:
        msg = refused(a, set_approval(token()), "DELETE FROM public.refunds WHERE id > 20")
    assert f"(approval: {reason})" in msg, what
    assert count(pg, shop) == ROWS


def test_the_agent_cannot_read_the_key_or_call_the_guard_functions(pg: LocalPostgres, shop: str) -> None:
    with connect(pg, AGENT, shop) as a:
        for st in (
            "SELECT key FROM writeguard_guard.approval_key",
            "SELECT writeguard_guard.approval_problem('public.refunds', 'delete', 1)",
            "DELETE FROM writeguard_guard.approval_used",
            "SELECT writeguard_guard.refuse('x', 'x', 'x', 0, 0, 'x')",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                a.execute(st)
    acl = "SELECT has_table_privilege(%s, 'writeguard_guard.approval_key', 'SELECT')"
    assert scalar(pg, shop, acl, (AGENT,)) is False


def test_a_human_role_is_never_affected(pg: LocalPostgres, shop: str) -> None:
    with connect(pg, HUMAN, shop) as h:
        for statements in (
            ["DELETE FROM public.refunds", "UPDATE public.refunds SET amount = 0"],
            ["TRUNCATE public.refunds"],
            ["ALTER TABLE public.refunds ADD COLUMN note text", "ALTER TABLE public.refunds RENAME TO r2"],
            ["DROP TABLE public.refunds"],
            # A human acting as an agent's role is still the human who logged in.
            [f'SET LOCAL ROLE "{AGENT}"', "DELETE FROM public.refunds"],
        ):
            tx = h.transaction(force_rollback=True)
            with tx:
                for st in statements:
                    h.execute(st)
    assert count(pg, shop) == ROWS


def test_hostile_table_and_role_names_are_quoted(pg: LocalPostgres, shop: str, config: Path) -> None:
    target = sql.Identifier(HOSTILE_SCHEMA, HOSTILE_TABLE)
    with connect(pg, HOSTILE_AGENT_ROLE, shop) as a:
        msg = refused(a, sql.SQL("TRUNCATE {}").format(target))
        assert msg.startswith(f'writeguard refused TRUNCATE on {HOSTILE} by agent role "Ag""ent\'; DROP ROLE')
        refused(a, sql.SQL("DROP TABLE {}").format(target))
        msg = refused(a, sql.SQL("DELETE FROM {} WHERE id > 20").format(target))
        # The table is one shell word of the approve command, whatever it holds.
        command = msg.split("A human can approve it: ", 1)[1].split(", then run", 1)[0]
        assert shlex.split(command)[4:11] == ["--table", HOSTILE, "--op", "delete", "--max-rows", "30", "--ttl"]
        a.execute(sql.SQL("UPDATE {} SET amount = amount").format(target))  # no update limit on this table
        token = approve(config, HOSTILE, "delete", 30)
        with a.transaction(force_rollback=True):
            a.execute(set_approval(token))
            a.execute(sql.SQL("DELETE FROM {} WHERE id > 20").format(target))
        # The agent of the template is refused there too; the roles and tables the names tried to drop are there.
        with connect(pg, AGENT, shop) as b:
            refused(b, sql.SQL("TRUNCATE {}").format(target))
    assert count(pg, shop, target) == ROWS
    assert count(pg, shop) == ROWS
    assert scalar(pg, "postgres", "SELECT count(*) FROM pg_roles WHERE rolname = %s", (OWNER,)) == 1


def test_every_refusal_is_emitted_as_a_non_transactional_logical_message(pg: LocalPostgres, shop: str) -> None:
    with connect(pg, AGENT, shop) as a:
        refused(a, "DELETE FROM public.refunds WHERE amount >= 0 /* refusal-probe */")
    deadline = time.monotonic() + 30
    seen: list[GuardRefusal] = []
    while time.monotonic() < deadline:
        with pg.connect(dbname=shop) as c:
            rows = c.execute(
                "SELECT data FROM pg_logical_slot_peek_changes('guard_test', NULL, NULL) WHERE data LIKE %s",
                (f"message: transactional: 0 prefix: {REFUSED_PREFIX}, %",),
            ).fetchall()
        seen = [parse_refusal(r[0].split(" content:", 1)[1]) for r in rows]
        probe = [m for m in seen if m.query and "refusal-probe" in m.query]
        if probe:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no refusal message for the probe in 30 s; seen: {seen!r}")
    m = probe[0]
    assert (m.kind, m.command, m.table, m.role, m.agent_id) == ("rows", "DELETE", "public.refunds", AGENT, "refund_01")
    assert (m.rows, m.limit, m.approval) == (ROWS, LIMIT, "missing")


def test_the_printed_script_applies_with_psql_and_reapplying_changes_nothing(
    pg: LocalPostgres, shop: str, config: Path
) -> None:
    make_shop(pg, "scripted")
    printed = cli("guard-sql", "-c", str(config))
    assert printed.returncode == 0, printed.stderr
    assert KEY not in printed.stdout
    psql = find_pg_bin() / "psql"
    for _ in range(2):
        run = subprocess.run(
            [
                str(psql),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                f"wg_approval_key={KEY}",
                "-d",
                pg.dsn(dbname="scripted"),
            ],
            input=printed.stdout,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
    again = cli("guard-sql", "-c", str(config), "--apply", "--dsn", pg.dsn(dbname=shop))
    assert again.returncode == 0, again.stderr
    for db in ("scripted", shop):
        with connect(pg, AGENT, db) as a:
            refused(a, "TRUNCATE public.refunds")
            with a.transaction(force_rollback=True):
                a.execute(set_approval(approve(config, "public.refunds", "delete", ROWS)))
                a.execute("DELETE FROM public.refunds")
