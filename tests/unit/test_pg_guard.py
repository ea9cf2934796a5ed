"""Guard rails (issue 12): the rendered SQL, the approval tokens, and the two commands. The real PostgreSQL side
is in tests/integration/test_pg_guard_real.py."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from connectors.pg_enforce import RoleMapping
from connectors.pg_guard import (
    DDL_EVENT_TRIGGER,
    DROP_EVENT_TRIGGER,
    ApprovalError,
    GuardSqlError,
    apply_guard_sql,
    approval_problem,
    guard_script,
    issue_approval,
    parse_refusal,
    read_approval,
    render_guard_sql,
)
from detectors.spec import GuardSpec, TableSpec
from stream.cli import main
from stream.config import EXAMPLE_CONFIG, load_config

KEY = b"k" * 32
ROLES = RoleMapping(template="agent_{agent_id}")
SOON = datetime(2030, 1, 1, tzinfo=UTC)
BEFORE = SOON - timedelta(minutes=1)


def spec(name: str, **guard: object) -> TableSpec:
    return TableSpec(name=name, topic=f"t.{name}", guard=GuardSpec.model_validate(guard))


# --- rendering ---------------------------------------------------------------------------------------------


def test_hostile_table_role_and_agent_names_are_quoted_or_literals() -> None:
    hostile = spec('we"ird.ta"ble; DROP TABLE x; --')
    roles = RoleMapping(map={"a'); DROP ROLE x; --": "ro\"le'; --"}, template="agent_{agent_id}", pattern="^.+$")
    out = guard_script(render_guard_sql([hostile], roles))
    assert 'BEFORE TRUNCATE ON "we""ird"."ta""ble; DROP TABLE x; --" FOR EACH STATEMENT' in out
    assert "WHERE n.nspname = 'we\"ird' AND c.relname = 'ta\"ble; DROP TABLE x; --'" in out
    assert "WHEN r = 'ro\"le''; --' THEN 'a''); DROP ROLE x; --'" in out
    assert "DROP TABLE x; --\n" not in out and "DROP ROLE x; --\n" not in out


def test_every_watched_table_is_covered_by_what_its_guard_asks() -> None:
    tables = [
        spec("public.refunds", max_rows_per_statement=100),
        spec("public.orders", max_rows_per_statement=None, max_update_rows=5, refuse_truncate=False),
        spec("audit.log", refuse_ddl=False),
    ]
    out = guard_script(render_guard_sql(tables, ROLES))
    for t in ('"public"."refunds"', '"public"."orders"', '"audit"."log"'):
        assert f'DROP TRIGGER IF EXISTS "zz_writeguard_guard_delete" ON {t}' in out
    assert (
        out.count("BEFORE TRUNCATE ON") == 2
        and 'DROP TRIGGER IF EXISTS "zz_writeguard_guard_truncate" ON "public"."orders"' in out
    )
    assert (
        'AFTER DELETE ON "public"."refunds" REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT '
        "EXECUTE FUNCTION \"writeguard_guard\".limit_rows('100')" in out
    )
    assert 'AFTER UPDATE ON "public"."orders" REFERENCING OLD TABLE' in out and "limit_rows('5')" in out
    assert 'AFTER DELETE ON "public"."orders"' not in out
    assert "limit_rows('1000')" in out  # audit.log: the default limit
    watched = re.findall(r"SELECT c\.oid, '([^']+)', (true|false) FROM", out)
    assert watched == [("public.refunds", "true"), ("public.orders", "true"), ("audit.log", "false")]
    assert f'CREATE EVENT TRIGGER "{DROP_EVENT_TRIGGER}" ON sql_drop' in out
    assert f'CREATE EVENT TRIGGER "{DDL_EVENT_TRIGGER}" ON ddl_command_end' in out


def test_the_definer_functions_pin_their_search_path_and_the_key_stays_private() -> None:
    out = guard_script(render_guard_sql([spec("public.refunds")], ROLES))
    assert out.count("SECURITY DEFINER") == 6
    assert out.count("SET search_path = pg_catalog, pg_temp") == 8
    assert 'REVOKE ALL ON TABLE "writeguard_guard"."approval_key" FROM PUBLIC' in out
    assert 'REVOKE ALL ON SCHEMA "writeguard_guard" FROM PUBLIC' in out
    assert "session_user" in out and "current_user" not in out
    assert "pg_logical_emit_message(false, 'writeguard.refused'" in out
    assert "convert_to(:'wg_approval_key', 'UTF8')" in out
    assert out.startswith("-- writeguard guard-sql") and out.endswith("COMMIT;\n")


def test_no_agent_roles_or_odd_schema_names_are_refused() -> None:
    with pytest.raises(GuardSqlError, match="no role is mapped"):
        render_guard_sql([spec("public.refunds")], None)
    with pytest.raises(GuardSqlError, match="no role is mapped"):
        render_guard_sql([spec("public.refunds")], RoleMapping())
    with pytest.raises(GuardSqlError, match="--schema"):
        render_guard_sql([spec("public.refunds")], ROLES, schema="x$wg$")


def test_apply_binds_the_key_only_to_its_own_statement() -> None:
    calls: list[tuple[str, object]] = []

    class Conn:
        def transaction(self) -> Conn:
            return self

        def __enter__(self) -> Conn:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def execute(self, query: object, params: object = None) -> None:
            calls.append((query.as_string(None), params))  # type: ignore[attr-defined]

    apply_guard_sql(Conn(), render_guard_sql([spec("public.refunds")], ROLES), "the-key")
    with_params = [(q, p) for q, p in calls if p is not None]
    assert len(with_params) == 1 and with_params[0][1] == {"approval_key": "the-key"}
    assert "%(approval_key)s" in with_params[0][0] and all("the-key" not in q for q, _ in calls)


def test_guard_limits_fall_back_to_the_statement_limit() -> None:
    g = GuardSpec(max_rows_per_statement=50, max_update_rows=7)
    assert (g.limit("delete"), g.limit("update")) == (50, 7)
    assert GuardSpec(max_rows_per_statement=None).limit("delete") is None


# --- tokens ------------------------------------------------------------------------------------------------


def test_a_token_round_trips_and_says_what_it_allows() -> None:
    token = issue_approval(KEY, "public.refunds", "delete", 500, SOON, by="ann@ops")
    a = read_approval(token)
    assert (a.table, a.op, a.max_rows, a.exp, a.by) == (
        "public.refunds",
        "delete",
        500,
        int(SOON.timestamp()),
        "ann@ops",
    )
    assert approval_problem(KEY, token, "public.refunds", "delete", 500, BEFORE) is None
    assert approval_problem(KEY, token, "public.refunds", "delete", 1, BEFORE) is None
    assert issue_approval(KEY, "public.refunds", "delete", 500, SOON) != issue_approval(
        KEY, "public.refunds", "delete", 500, SOON
    )  # a fresh nonce each time: every token approves its own transaction


def test_a_token_expires() -> None:
    token = issue_approval(KEY, "public.refunds", "delete", 5, SOON)
    assert approval_problem(KEY, token, "public.refunds", "delete", 5, SOON - timedelta(seconds=1)) is None
    assert approval_problem(KEY, token, "public.refunds", "delete", 5, SOON) == "expired"


@pytest.mark.parametrize(
    ("table", "op", "rows", "key", "reason"),
    [
        ("public.orders", "delete", 5, KEY, "wrong table"),
        ("public.refunds", "update", 5, KEY, "wrong operation"),
        ("public.refunds", "delete", 6, KEY, "too many rows"),
        ("public.refunds", "delete", 5, b"x" * 32, "bad signature"),
    ],
)
def test_a_token_out_of_scope_or_under_another_key_is_refused(
    table: str, op: str, rows: int, key: bytes, reason: str
) -> None:
    token = issue_approval(KEY, "public.refunds", "delete", 5, SOON)
    assert approval_problem(key, token, table, op, rows, BEFORE) == reason


def test_a_tampered_or_malformed_token_is_refused() -> None:
    token = issue_approval(KEY, "public.refunds", "delete", 5, SOON)
    other = issue_approval(b"x" * 32, "public.refunds", "delete", 5000, SOON)
    forged = ".".join([*other.split(".")[:2], token.split(".")[2]])
    assert approval_problem(KEY, forged, "public.refunds", "delete", 5000, BEFORE) == "bad signature"
    assert approval_problem(KEY, None, "public.refunds", "delete", 1, BEFORE) == "missing"
    assert approval_problem(KEY, "wg1.abc", "public.refunds", "delete", 1, BEFORE) == "malformed"
    with pytest.raises(ApprovalError):
        read_approval("nope")


def test_an_approval_needs_a_positive_row_count_a_known_op_and_a_zone() -> None:
    with pytest.raises(ApprovalError, match="max_rows"):
        issue_approval(KEY, "public.refunds", "delete", 0, SOON)
    with pytest.raises(ApprovalError, match="--op"):
        issue_approval(KEY, "public.refunds", "insert", 5, SOON)  # type: ignore[arg-type]
    with pytest.raises(ApprovalError, match="time zone"):
        issue_approval(KEY, "public.refunds", "delete", 5, datetime(2030, 1, 1))


def test_a_refusal_message_parses() -> None:
    r = parse_refusal(
        b'{"v": 1, "kind": "rows", "command": "DELETE", "table": "public.refunds", "role": "agent_a", '
        b'"agent_id": "a", "rows": 30, "limit": 10, "approval": "missing", "at": "2026-03-01T12:00:00.5Z"}'
    )
    assert (r.rows, r.limit, r.approval, r.at.tzinfo is not None) == (30, 10, "missing", True)


# --- commands ----------------------------------------------------------------------------------------------


def config_file(tmp_path: Path, *, guard: bool = True) -> Path:
    data = {
        "enforcement": {"postgres": {"dsn": "host=x", "roles": {"template": "agent_{agent_id}"}}},
        "tables": [{"name": "public.refunds", "topic": "shop.public.refunds", "guard": {"max_delete_rows": 10}}],
    }
    if guard:
        data["guard"] = {"approval_key": "${WG_TEST_APPROVAL_KEY}", "max_ttl_s": 3600}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_approve_prints_the_set_local_line_with_a_token_the_key_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WG_TEST_APPROVAL_KEY", "s" * 40)
    cfg = config_file(tmp_path)
    assert main(["approve", "-c", str(cfg), "--table", "public.refunds", "--op", "delete", "--max-rows", "40"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"^SET LOCAL writeguard\.approval = '(wg1\.[^']+)';$", out, re.M)
    assert m is not None, out
    assert approval_problem(b"s" * 40, m.group(1), "public.refunds", "delete", 40) is None
    assert approval_problem(b"s" * 40, m.group(1), "public.refunds", "delete", 41) == "too many rows"
    exp = read_approval(m.group(1)).exp - datetime.now(UTC).timestamp()
    assert 14 * 60 < exp <= 15 * 60  # the default --ttl


def test_approve_refuses_an_unknown_table_a_long_ttl_and_a_config_without_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WG_TEST_APPROVAL_KEY", "s" * 40)
    cfg = config_file(tmp_path)
    base = ["approve", "-c", str(cfg), "--op", "delete", "--max-rows", "40"]
    assert main([*base, "--table", "public.orders"]) == 2
    assert main([*base, "--table", "public.refunds", "--ttl", "2h"]) == 2
    assert "above guard.max_ttl_s" in capsys.readouterr().err
    assert main(["approve", "-c", str(config_file(tmp_path, guard=False)), "--table", "public.refunds",
                 "--op", "delete", "--max-rows", "1"]) == 2  # fmt: skip
    assert "guard.approval_key is needed" in capsys.readouterr().err


def test_guard_sql_prints_the_script_without_the_key_and_apply_needs_a_dsn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WG_TEST_APPROVAL_KEY", "s" * 40)
    cfg = config_file(tmp_path)
    assert main(["guard-sql", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert 'BEFORE TRUNCATE ON "public"."refunds"' in out and "s" * 40 not in out
    assert main(["guard-sql", "-c", str(cfg), "--apply"]) == 2
    assert "--apply needs --dsn" in capsys.readouterr().err


def test_the_example_config_still_loads_with_default_guards() -> None:
    cfg = load_config(EXAMPLE_CONFIG)
    assert all(t.guard.refuse_truncate and t.guard.refuse_ddl for t in cfg.tables)
