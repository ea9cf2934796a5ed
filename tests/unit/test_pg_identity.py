"""Identity from the database (issue 17, point 1): the rendered SQL, the router's database mode, the engine's
identity_mismatch and reserved identities, and the table-wide ceilings. The real PostgreSQL path is in
tests/integration/test_identity.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from connectors.pg_enforce import RoleMapping
from connectors.pg_identity import EMIT_OVERLOADS, IdentitySqlError, render_identity_sql, script
from detectors.engine import IDENTITY_MISMATCH, UNATTRIBUTED, Change, Engine, KafkaCoords, role_identity
from detectors.spec import FeatureSpec, OpBurstSpec, RateSpec, TableSpec
from stream.cli import main
from stream.config import EXAMPLE_CONFIG
from stream.pipeline import SKIP_MESSAGE, SKIP_PENDING, Router, build_alert

MSG = KafkaCoords("shop.message", 0, 0)
ROW = KafkaCoords("shop.public.refunds", 0, 1)
SPEC = TableSpec(
    name="public.refunds", topic="shop.public.refunds", features=(FeatureSpec(name="amount", column="amount"),)
)


def text(stmts: list) -> str:  # type: ignore[type-arg]
    return script(stmts)


# --- rendering ---------------------------------------------------------------------------------------------


def test_hostile_table_column_role_and_agent_names_are_quoted_or_bound() -> None:
    hostile = TableSpec(name='we"ird.ta"ble; DROP TABLE x; --', topic="t", agent_id="row.ag\"ent'; --")
    roles = RoleMapping(map={"a'); DROP ROLE x; --": "agent_one"}, template="agent_{agent_id}")
    out = text(render_identity_sql([hostile], roles, "wg'; --"))
    assert 'ON "we""ird"."ta""ble; DROP TABLE x; --"' in out
    assert "stamp_identity('ag\"ent''; --')" in out  # the column is the trigger's argument: a literal
    assert "'a''); DROP ROLE x; --'" in out  # the agent id is a literal in agent_of
    assert "pg_logical_emit_message(true, 'wg''; --'," in out
    assert "DROP TABLE x; --\n" not in out and "DROP ROLE x; --\n" not in out


def test_both_emit_overloads_are_revoked_from_public_and_every_agent_role() -> None:
    roles = RoleMapping(map={"a1": "agent_one", "a2": "agent_two"})
    out = text(render_identity_sql([SPEC], roles, "writeguard"))
    for args in EMIT_OVERLOADS:
        fn = f"pg_catalog.pg_logical_emit_message({args})"
        assert f"REVOKE EXECUTE ON FUNCTION {fn} FROM PUBLIC" in out
        assert f'REVOKE EXECUTE ON FUNCTION {fn} FROM "agent_one", "agent_two"' in out
        assert f'GRANT EXECUTE ON FUNCTION {fn} TO "writeguard_identity"' in out
    assert out.count("SECURITY DEFINER") == 2 and out.count("SET search_path = pg_catalog, pg_temp") == 3
    assert "session_user" in out and "current_user" not in out
    assert 'AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON "public"."refunds" FOR EACH STATEMENT' in out
    assert out.startswith("BEGIN;\n") and out.endswith("COMMIT;\n")


def test_the_template_is_inverted_by_its_fixed_prefix_and_map_keys_keep_their_roles() -> None:
    roles = RoleMapping(map={"bot": "agent_bot_role"}, template="agent_{agent_id}_rw")
    out = text(render_identity_sql([SPEC], roles, "writeguard"))
    assert "WHEN r = 'agent_bot_role' THEN 'bot'" in out
    assert "starts_with(r, 'agent_') AND right(r, 3) = '_rw' AND length(r) > 9" in out
    assert "NOT (substr(r, 7, length(r) - 9) = ANY ('{bot}'::text[]))" in out


@pytest.mark.parametrize(
    ("spec", "roles", "kw", "where"),
    [
        (TableSpec(name="public.t", topic="t", agent_id="after.meta.agent"), None, {}, "tables.0.agent_id"),
        (TableSpec(name="public.t", topic="t", agent_id="before.agent_id"), None, {}, "tables.0.agent_id"),
        (SPEC, RoleMapping(map={"a": "r1", "b": "r1"}), {}, "share role 'r1'"),
        (SPEC, None, {"schema": "x$wg$y"}, "--schema"),
        (SPEC, None, {"owner": 'Owner"'}, "--owner"),
    ],
)
def test_what_cannot_be_rendered_safely_is_refused_with_its_key(
    spec: TableSpec, roles: RoleMapping | None, kw: dict[str, str], where: str
) -> None:
    with pytest.raises(IdentitySqlError, match=where.replace("$", r"\$")):
        render_identity_sql([spec], roles, "writeguard", **kw)


def write_config(tmp_path: Path, identity: str | None) -> Path:
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    if identity is not None:
        data["worker"]["agent_messages"] = {"topic": "shop.message", "identity": identity}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_prints_the_script_and_needs_agent_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["identity-sql", "-c", str(write_config(tmp_path, "database"))]) == 0
    out = capsys.readouterr().out
    assert 'ON "public"."refunds"' in out and 'ON "public"."orders"' in out
    assert main(["identity-sql", "-c", str(write_config(tmp_path, None))]) == 2
    assert "worker.agent_messages" in capsys.readouterr().err
    assert main(["identity-sql", "-c", str(write_config(tmp_path, "database")), "--apply"]) == 2
    assert "--dsn" in capsys.readouterr().err


def test_config_refuses_an_unknown_identity_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(write_config(tmp_path, "row"))]) == 2
    assert "worker.agent_messages.identity" in capsys.readouterr().err


# --- the router in database mode ------------------------------------------------------------------------------


def row(op: str, tx: int, agent: str | None = None, before_agent: str | None = None, amount: float = 10.0) -> bytes:
    after = {"id": 1, "amount": amount, "agent_id": agent}
    before = {"id": 1, "amount": amount, "agent_id": before_agent}
    return json.dumps(
        {
            "op": op,
            "before": before if op in ("u", "d") else None,
            "after": None if op in ("d", "t") else after,
            "source": {"ts_us": 5, "schema": "public", "table": "refunds", "txId": tx, "connector": "postgresql"},
        }
    ).encode()


def message(tx: int, content: dict[str, object]) -> bytes:
    return json.dumps(
        {
            "op": "m",
            "source": {"ts_us": 5, "schema": "", "table": "", "txId": tx, "connector": "postgresql"},
            "message": {"prefix": "writeguard", "content": base64.b64encode(json.dumps(content).encode()).decode()},
        }
    ).encode()


def db_router() -> Router:
    return Router([SPEC], message_prefix="writeguard", database_identity=True)


def test_the_row_column_is_ignored_the_database_identity_is_used() -> None:
    r = db_router()
    assert r.route("shop.public.refunds", row("d", 1, before_agent="refund_bot"), ROW) == SKIP_PENDING
    db = {"agent_id": "cleaner", "role": "agent_cleaner", "table": "public.refunds"}
    assert r.route("shop.message", message(1, db), MSG) == SKIP_MESSAGE
    # the delete's before image names the last writer: neither credited nor flagged
    assert [(c.op, c.agent_id, c.claimed) for c in r.ready] == [("d", "cleaner", None)]


def test_a_claimed_id_becomes_a_mismatch_change_credited_to_the_database_identity() -> None:
    r = db_router()
    r.route(
        "shop.message", message(2, {"agent_id": "b", "role": "agent_b", "table": "public.refunds", "claimed": "a"}), MSG
    )
    r.route("shop.message", message(2, {"agent_id": "b", "role": "agent_b", "table": "public.refunds"}), MSG)
    out = r.route("shop.public.refunds", row("c", 2, agent="b"), ROW)
    assert isinstance(out, Change) and out.agent_id == "b"
    assert [(c.op, c.table, c.agent_id, c.claimed) for c in r.ready] == [("m", "public.refunds", "b", "a")]


def test_a_writers_own_message_is_a_claim_never_an_identity() -> None:
    r = db_router()
    # a role that kept EXECUTE on pg_logical_emit_message names someone else, before the triggers' message
    assert r.route("shop.message", message(3, {"agent_id": "a"}), MSG) == SKIP_MESSAGE
    assert r.route("shop.public.refunds", row("c", 3, agent="b"), ROW) == SKIP_PENDING
    r.route("shop.message", message(3, {"agent_id": "b", "role": "agent_b", "table": "public.refunds"}), MSG)
    assert sorted((c.op, c.agent_id, c.claimed) for c in r.ready) == [("c", "b", None), ("m", "b", "a")]


def test_a_row_value_that_differs_from_the_database_identity_is_flagged() -> None:
    r = db_router()  # a table whose trigger is missing: the column keeps what the writer put there
    r.route("shop.message", message(4, {"agent_id": "b", "role": "agent_b", "table": "public.refunds"}), MSG)
    out = r.route("shop.public.refunds", row("c", 4, agent="a"), ROW)
    assert isinstance(out, Change) and out.agent_id == "b"
    assert [(c.agent_id, c.claimed) for c in r.ready] == [("b", "a")]
    r.ready.clear()
    r.route("shop.public.refunds", row("u", 4, agent="a", before_agent="a"), ROW)  # column left alone: no claim
    assert r.ready == []


def test_a_role_that_is_no_agents_is_scored_as_its_reserved_identity() -> None:
    r = db_router()
    r.route("shop.message", message(5, {"role": "app_owner", "table": "public.refunds"}), MSG)
    out = r.route("shop.public.refunds", row("c", 5, agent=None, amount=9_999_999.0), ROW)
    assert isinstance(out, Change) and out.agent_id == role_identity("app_owner")
    # and nobody can name a reserved identity as an agent id
    r.route("shop.message", message(6, {"agent_id": "<unattributed>", "role": "agent_x"}), MSG)
    out = r.route("shop.public.refunds", row("c", 6), ROW)
    assert isinstance(out, Change) and out.agent_id == role_identity("agent_x")


def test_in_database_mode_rows_whose_message_never_comes_are_unattributed() -> None:
    r = db_router()
    assert r.route("shop.public.refunds", row("c", 7, agent="a"), ROW) == SKIP_PENDING
    assert r.expire(10**12) == 1
    assert [c.agent_id for c in r.ready] == [UNATTRIBUTED]


# --- the engine ---------------------------------------------------------------------------------------------


def change(agent: str, i: int, op: str = "c", amount: float = 10.0, claimed: str | None = None) -> Change:
    return Change(
        "public.refunds",
        op,
        agent,
        None,
        {} if op == "m" else {"amount": amount},
        i * 1000,
        KafkaCoords("t", 0, i),
        claimed=claimed,
    )  # type: ignore[arg-type]


def test_identity_mismatch_alerts_once_names_both_ids_and_quarantines_the_real_writer() -> None:
    eng = Engine([SPEC])
    found = eng.process(change("b", 1, "m", claimed="a"))
    assert [(f.detector, f.severity, f.agent_id, f.claimed, f.quarantine) for f in found] == [
        (IDENTITY_MISMATCH, "critical", "b", "a", True)
    ]
    summary = build_alert(found[0], 2000).summary
    assert "agent b" in summary and "claimed to be a" in summary
    assert eng.process(change("b", 2, "m", claimed="a")) == []  # one incident, not one alert per row
    assert "a" not in eng.quarantined


def test_a_reserved_identity_is_alerted_but_never_quarantined() -> None:
    spec = SPEC.model_copy(update={"detectors": (RateSpec(max_events=3),)})
    eng = Engine([spec])
    found = [f for i in range(5) for f in eng.process(change(role_identity("app_owner"), i))]
    assert [(f.detector, f.quarantine, f.actions) for f in found] == [("rate", False, ("alert",))]
    assert eng.quarantined == {}


@pytest.mark.parametrize("kind", ["rate", "op_burst"])
def test_a_table_wide_ceiling_catches_writes_spread_over_fresh_ids_and_names_the_top_agents(kind: str) -> None:
    guard = (
        RateSpec(max_events=20, table_max_events=100)
        if kind == "rate"
        else OpBurstSpec(max_events=20, table_max_events=100)
    )
    spec = SPEC.model_copy(update={"detectors": (guard,)})
    eng = Engine([spec])
    op = "c" if kind == "rate" else "d"
    found = []
    for i in range(400):
        agent = "heavy" if i % 20 == 0 else f"fresh-{i}"  # one agent 20 writes (at its own ceiling), 380 one-offs
        found += eng.process(change(agent, i, op))
    assert [(f.detector, f.scope, f.quarantine) for f in found] == [(f"{kind}.table", "table", False)]
    f = found[0]
    assert f.contributions[0].value == 101.0
    # the 101st write is heavy's 6th (i = 0, 20, ..., 100); every other id wrote once
    assert (f.agent_id, f.contributions[1].feature, f.contributions[1].value) == ("heavy", "agent heavy", 6.0)
    assert "top agents: heavy 6, " in build_alert(f, 10**9).summary
    # the per-agent ceiling alone saw nothing: every id stayed far below 20
    solo = Engine([SPEC.model_copy(update={"detectors": (guard.model_copy(update={"table_max_events": None}),)})])
    assert [f for i in range(400) for f in solo.process(change(f"fresh-{i}", i, op))] == []


def test_a_table_wide_detector_name_must_not_collide() -> None:
    with pytest.raises(ValueError, match="unique"):
        TableSpec(
            name="public.t",
            topic="t",
            detectors=(RateSpec(max_events=5, table_max_events=9), RateSpec(name="rate.table", max_events=5)),
        )


def test_config_refuses_a_reserved_agent_id_in_the_role_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    data["enforcement"] = {"postgres": {"dsn": "host=db", "roles": {"map": {"<unattributed>": "agent_x"}}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["config", "check", str(path)]) == 2
    assert "enforcement.postgres.roles.map" in capsys.readouterr().err


def test_writes_the_table_wide_ceiling_does_not_count_do_not_close_its_incident() -> None:
    spec = SPEC.model_copy(update={"detectors": (OpBurstSpec(max_events=20, table_max_events=10),)})
    eng = Engine([spec])
    found = []
    for i in range(60):
        found += eng.process(change(f"fresh-{i}", i, "d"))
        found += [f for _ in range(20) for f in eng.process(change("inserter", i, "c"))]  # interleaved inserts
    assert [f.detector for f in found] == ["op_burst.table"]
