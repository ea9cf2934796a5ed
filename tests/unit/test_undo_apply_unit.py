"""The pure parts of ``writeguard undo apply``: Debezium values to parameters, statements, signatures, models."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from connectors.corrections import Correction
from connectors.messages import UNDO_AGENT, undo_signature, verify_undo_message
from connectors.undo_apply import ApplyRefused, check_plan, ledger_ddl, lock_keys, split_name, undo_message
from connectors.undo_sql import (
    ColumnType,
    Shape,
    UnrestorableValue,
    compare_kind,
    db_value,
    lock_sql,
    shape_of,
    shape_params,
    shape_sql,
)
from stream import cli
from stream.config import ConfigError, parse_config
from undo.models import ApplyReport, Plan, Precondition, Selection, Step, StepOutcome

KEY = b"k" * 32
OTHER = b"o" * 32
PLAN_ID = "ab" * 32


def col(name: str, base: str | None = None, **kw: Any) -> ColumnType:
    return ColumnType("pg_catalog", name, base if base is not None else name, **kw)


def text_of(composed: Any) -> str:
    return composed.as_string(None).replace('"pg_catalog".', "")


# --- Debezium values -> parameters --------------------------------------------------------------------------------

# One row as Debezium 3.6.1 (pgoutput, JsonConverter without schemas, writeguard's connector config) published it,
# captured from the real connector, with the SQL literal it was inserted from. Each value must convert back to a
# parameter that gives the column that value again.
REAL_DEBEZIUM = [
    ("timestamp", col("timestamp"), 1772368496123456, datetime(2026, 3, 1, 12, 34, 56, 123456)),
    ("timestamp(3)", col("timestamp", typmod=3), 1772368496789, datetime(2026, 3, 1, 12, 34, 56, 789000)),
    ("timestamptz", col("timestamptz"), "2026-03-01T10:34:56.123456Z", "2026-03-01T10:34:56.123456Z"),
    ("date", col("date"), 20513, date(2026, 3, 1)),
    ("time", col("time"), 45296654321, time(12, 34, 56, 654321)),
    ("timetz", col("timetz"), "09:34:56.5Z", "09:34:56.5Z"),
    ("bytea", col("bytea"), "AP8n", b"\x00\xff'"),
    ("json", col("json"), '{"b": 1,  "a": [1, 2]}', '{"b": 1,  "a": [1, 2]}'),
    ("jsonb", col("jsonb"), '{"a": "x", "b": 1}', '{"a": "x", "b": 1}'),
    ("numeric(12,2)", col("numeric"), 12345.67, Decimal("12345.67")),
    ("numeric", col("numeric"), 0.12345678901234568, Decimal("0.12345678901234568")),  # a double: digits lost
    ("real", col("float4"), 0.1, 0.1),
    ("double precision", col("float8"), 0.1, 0.1),
    ("uuid", col("uuid"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("text[]", col("_text", "text", array=True), ["x,y", 'q"t', None], ["x,y", 'q"t', None]),
    ("int[]", col("_int4", "int4", array=True), [1, 2], [1, 2]),
    (
        "timestamp[]",
        col("_timestamp", "timestamp", array=True),
        [1767225600500000],
        [datetime(2026, 1, 1, 0, 0, 0, 500000)],
    ),
    ("interval", col("interval"), 2813645500000, timedelta(microseconds=2813645500000)),
    ("char(5)", col("bpchar"), "ab   ", "ab   "),
    ("boolean", col("bool"), True, True),
    ("bigint", col("int8"), 9007199254740993, 9007199254740993),
    ("smallint", col("int2"), -3, -3),
    ("inet", col("inet"), "10.0.0.1/8", "10.0.0.1/8"),
    ("money", col("money"), 12.34, Decimal("12.34")),
    ("xml", col("xml"), "<a>x</a>", "<a>x</a>"),
    ("enum", ColumnType("public", "mood", ""), "happy", "happy"),
]


@pytest.mark.parametrize(
    ("sqltype", "column", "debezium", "expected"), REAL_DEBEZIUM, ids=[r[0] for r in REAL_DEBEZIUM]
)
def test_a_real_debezium_value_converts_to_the_original_value(
    sqltype: str, column: ColumnType, debezium: Any, expected: Any
) -> None:
    got = db_value(debezium, column)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("column", [c for _, c, _, _ in REAL_DEBEZIUM], ids=[r[0] for r in REAL_DEBEZIUM])
def test_null_stays_null_in_every_type(column: ColumnType) -> None:
    assert db_value(None, column) is None


def test_a_numeric_double_comes_back_as_its_shortest_decimal_not_its_binary_expansion() -> None:
    assert db_value(0.1, col("numeric")) == Decimal("0.1")
    assert db_value(1e20, col("numeric")) == Decimal("1E+20")
    assert db_value(5, col("numeric")) == 5
    assert db_value("12.500", col("numeric")) == Decimal("12.500")  # decimal.handling.mode=string


def test_json_objects_are_written_as_their_json_text() -> None:
    assert db_value({"a": [1, None]}, col("jsonb")) == '{"a":[1,null]}'
    assert db_value([1, 2], col("json")) == "[1,2]"


@pytest.mark.parametrize(
    ("value", "column", "message"),
    [
        ("not base64!", col("bytea"), "not valid base64"),
        ({"a": 1}, col("text"), "cannot be written to a text column"),
        (1_772_368_496, col("timestamptz"), "expected ISO 8601"),
        ("5", col("int4"), "expected a JSON number"),
        (True, col("int4"), "a boolean cannot be written"),
        ("AeI=", col("numeric"), "not a decimal number"),  # decimal.handling.mode=precise: the scale is unknown
        (86_400_000_000, col("time"), "not a time of day"),
        (10**20, col("timestamp"), "out of range"),
        ("x", col("_int4", "int4", array=True), "expected a JSON array"),
    ],
)
def test_a_value_that_cannot_be_written_back_is_refused(value: Any, column: ColumnType, message: str) -> None:
    with pytest.raises(UnrestorableValue, match=message):
        db_value(value, column)


def test_precondition_comparisons_follow_the_type() -> None:
    assert compare_kind("{}", col("json")) == "jsonb"  # json has no equality operator
    assert compare_kind("{}", col("jsonb")) == "jsonb"
    assert compare_kind(0.1, col("numeric")) == "float8"  # Debezium's double, compared as a double
    assert compare_kind(5, col("numeric")) == "eq"
    assert compare_kind("09:34:56Z", col("timetz")) == "utc"
    assert compare_kind("<a/>", col("xml")) == "text"
    assert compare_kind([1], col("_int4", "int4", array=True)) == "eq"
    assert compare_kind(["{}"], col("_json", "json", array=True)) == "text"


# --- statements -----------------------------------------------------------------------------------------------------

TYPES = {
    "id": col("int4"),
    "amount": col("numeric"),
    "note": col("text"),
    "doc": col("json"),
    "deleted_at": col("timestamptz"),
    'we"ird': col("text"),
    "gen": col("int4", generated=True),
}
AT = datetime(2026, 1, 1, tzinfo=UTC)


def step(action: str, values: dict[str, Any] | None, pre: dict[str, Any], **kw: Any) -> Step:
    kind = "key_free" if action == "insert" else "row_matches"
    return Step(
        n=1,
        table="public.t",
        key={"id": 7},
        action=action,  # type: ignore[arg-type]
        values=values,
        precondition=Precondition(kind=kind, columns=pre),  # type: ignore[arg-type]
        last_commit=AT,
        **kw,
    )


def test_an_update_sets_the_values_back_only_where_the_row_holds_what_the_selection_left() -> None:
    s = step("update", {"amount": 5.5, 'we"ird': "x"}, {"amount": 500.25, 'we"ird': "y", "doc": '{"a": 1}'})
    shape = shape_of(s, TYPES, force=False)
    assert text_of(shape_sql(shape, TYPES)) == (
        'UPDATE "public"."t" SET "amount" = %s::"numeric", "we""ird" = %s::"text" WHERE "id" = %s::"int4" '
        'AND "amount"::float8 IS NOT DISTINCT FROM %s::float8 AND "we""ird" IS NOT DISTINCT FROM %s::"text" '
        'AND "doc"::jsonb IS NOT DISTINCT FROM %s::jsonb'
    )
    assert shape_params(s, shape, TYPES) == [Decimal("5.5"), "x", 7, 500.25, "y", '{"a": 1}']


def test_force_drops_the_precondition() -> None:
    s = step("update", {"amount": 5}, {"amount": 500}, decision="force")
    assert text_of(shape_sql(shape_of(s, TYPES, force=True), TYPES)).endswith('WHERE "id" = %s::"int4"')


def test_a_delete_and_a_soft_delete() -> None:
    d = step("delete", {}, {"note": "x", "id": 7})
    assert text_of(shape_sql(shape_of(d, TYPES, False), TYPES)) == (
        'DELETE FROM "public"."t" WHERE "id" = %s::"int4" AND "note" IS NOT DISTINCT FROM %s::"text"'
    )
    soft = step("soft_delete", {}, {"deleted_at": None}, now_columns=["deleted_at"])
    sh = shape_of(soft, TYPES, False)
    assert text_of(shape_sql(sh, TYPES)) == (
        'UPDATE "public"."t" SET "deleted_at" = now() WHERE "id" = %s::"int4" '
        'AND "deleted_at" IS NOT DISTINCT FROM %s::"timestamptz"'
    )
    assert shape_params(soft, sh, TYPES) == [7, None]


def test_a_reinsert_leaves_a_taken_key_alone_unless_forced_and_skips_generated_columns() -> None:
    s = step("insert", {"id": 7, "note": "n", "gen": 3}, {})
    assert text_of(shape_sql(shape_of(s, TYPES, False), TYPES)) == (
        'INSERT INTO "public"."t" ("id", "note") VALUES (%s::"int4", %s::"text") ON CONFLICT DO NOTHING'
    )
    forced = text_of(shape_sql(shape_of(s, TYPES, True), TYPES))
    assert forced.endswith('ON CONFLICT ("id") DO UPDATE SET "note" = EXCLUDED."note"')
    identity = {**TYPES, "id": col("int4", identity_always=True)}
    assert "OVERRIDING SYSTEM VALUE" in text_of(shape_sql(shape_of(s, identity, False), identity))


def test_steps_of_one_shape_share_one_statement() -> None:
    a = step("update", {"amount": 5}, {"amount": 500.0})
    b = a.model_copy(update={"n": 2, "key": {"id": 8}, "values": {"amount": 6}})
    assert shape_of(a, TYPES, False) == shape_of(b, TYPES, False)
    assert shape_of(a, TYPES, False) != shape_of(a, TYPES, True)


def test_the_lock_statement_locks_in_key_order() -> None:
    text = text_of(lock_sql("public.t", ["id"], TYPES))
    assert text == (
        'SELECT "_u"."_n" FROM "public"."t" AS "_t" JOIN unnest(%s::int4[], %s::"int4"[]) AS "_u"("_n", "_k0") '
        'ON "_t"."id" = "_u"."_k0" ORDER BY "_t"."id" FOR UPDATE OF "_t"'
    )


# --- plan checks ---------------------------------------------------------------------------------------------------


def plan_of(*steps: Step) -> Plan:
    return Plan(
        plan_id=PLAN_ID,
        created_at=AT,
        selection=Selection(agents=("a",)),
        all_or_nothing=False,
        tables=[],
        unchanged_rows=0,
        steps=list(steps),
    )


def test_check_plan_names_every_misfit_and_passes_a_fitting_plan() -> None:
    uniques = {"public.t": [frozenset({"id"})]}
    ok = step("update", {"amount": 5}, {"amount": 500})
    assert check_plan(plan_of(ok), {"public.t": TYPES}, uniques) == []
    assert check_plan(plan_of(ok), {}, uniques) == ["step 1: table public.t does not exist (or is no table)"]
    assert "no unique index on exactly (id)" in check_plan(plan_of(ok), {"public.t": TYPES}, {})[0]
    missing = step("update", {"nope": 1}, {"amount": 500})
    assert check_plan(plan_of(missing), {"public.t": TYPES}, uniques) == ["step 1: public.t has no column nope"]
    bad = step("update", {"deleted_at": 17}, {"amount": 500})
    assert (
        "value of public.t.deleted_at: timestamptz: expected ISO 8601"
        in check_plan(plan_of(bad), {"public.t": TYPES}, uniques)[0]
    )
    skipped = bad.model_copy(update={"decision": "skip"})
    assert check_plan(plan_of(skipped), {"public.t": TYPES}, uniques) == []  # a skipped step never runs


def test_names_need_a_schema_and_the_ledger_ddl_quotes_them() -> None:
    assert split_name('my"schema.ledger') == ('my"schema', "ledger")
    with pytest.raises(ApplyRefused):
        split_name("ledger")
    ddl = [s.as_string(None) for s in ledger_ddl('my"schema.ledger')]
    assert ddl[0] == 'CREATE SCHEMA IF NOT EXISTS "my""schema"'
    assert ddl[1].startswith('CREATE TABLE IF NOT EXISTS "my""schema"."ledger"')
    assert "PRIMARY KEY (plan_id, step)" in ddl[1]


def test_the_advisory_lock_keys_name_the_plan() -> None:
    assert lock_keys(PLAN_ID) == lock_keys(PLAN_ID)
    assert lock_keys(PLAN_ID)[1] != lock_keys("cd" * 32)[1]
    assert all(-(2**31) <= k < 2**31 for k in lock_keys("ff" * 32))


# --- the undo message's signature ---------------------------------------------------------------------------------


def signed_body(plan_id: str = PLAN_ID, tx_id: int = 728, key: bytes = KEY) -> dict[str, Any]:
    return json.loads(undo_message(plan_id, 1, [], tx_id, key))


def test_a_signed_undo_message_verifies_for_its_transaction() -> None:
    body = signed_body()
    assert body["agent_id"] == UNDO_AGENT and body["run_id"] == PLAN_ID
    assert verify_undo_message([KEY], body, 728) == PLAN_ID
    assert verify_undo_message([KEY], json.dumps(body), "728") == PLAN_ID  # JSON text, tx id as text
    assert verify_undo_message([KEY], json.dumps(body).encode(), 728) == PLAN_ID


def test_a_wrong_key_is_refused_and_a_previous_key_still_verifies() -> None:
    body = signed_body()
    assert verify_undo_message([OTHER], body, 728) is None
    assert verify_undo_message([OTHER, KEY], body, 728) == PLAN_ID  # rotation: the old key is still accepted


def test_another_transaction_is_refused() -> None:
    body = signed_body(tx_id=728)
    assert verify_undo_message([KEY], body, 729) is None
    # txid_current() carries the epoch in its high bits; Debezium's source.txId does not: both mean xid 728.
    assert verify_undo_message([KEY], body, 7 * 2**32 + 728) == PLAN_ID


def test_another_plan_is_refused() -> None:
    body = signed_body()
    other = "cd" * 32
    assert (
        verify_undo_message([KEY], {**body, "run_id": other, "undo": {**body["undo"], "plan_id": other}}, 728) is None
    )
    assert verify_undo_message([KEY], {**body, "run_id": other}, 728) is None  # run_id must name the plan too
    assert verify_undo_message([KEY], {**body, "agent_id": "rogue"}, 728) is None


def test_the_signature_is_an_hmac_over_plan_and_xid() -> None:
    expected = hmac.new(KEY, b"writeguard-undo-v1\n728\n" + PLAN_ID.encode(), hashlib.sha256).hexdigest()
    assert undo_signature(KEY, PLAN_ID, 728) == "v1=" + expected


@pytest.mark.parametrize(
    "body",
    [
        b"\xff not json",
        b"[]",
        "null",
        {},
        {"agent_id": UNDO_AGENT},
        {"agent_id": UNDO_AGENT, "undo": []},
        {"agent_id": UNDO_AGENT, "run_id": "p", "undo": {"plan_id": "p", "signature": 5}},
        {"agent_id": UNDO_AGENT, "run_id": "p", "undo": {"plan_id": "p", "signature": None}},
        {"agent_id": UNDO_AGENT, "run_id": "p", "undo": {"plan_id": "p", "signature": "v1=\udcff"}},
    ],
)
def test_a_malformed_message_is_not_verified_and_never_raises(body: Any) -> None:
    assert verify_undo_message([KEY], body, 728) is None
    assert verify_undo_message([KEY], signed_body(), "not a number") is None


def test_an_unsigned_message_names_the_undo_but_verifies_nothing() -> None:
    body = json.loads(undo_message(PLAN_ID, 2, [], 728, None))
    assert body["undo"]["signature"] is None and body["undo"]["batch"] == 2
    assert verify_undo_message([KEY], body, 728) is None


# --- models -----------------------------------------------------------------------------------------------------


def test_a_correction_says_what_the_agent_wrote_and_what_came_back() -> None:
    common: dict[str, Any] = {"plan_id": PLAN_ID, "table": "public.t", "key": {"id": 7}, "applied_at": AT, "tx_id": 9}
    ins = Correction.of(step=1, action="insert", restored={"id": 7, "a": 1}, agent_values={}, now_columns=[], **common)
    assert (ins.op, ins.agent_wrote, ins.restored) == ("c", None, {"id": 7, "a": 1})
    upd = Correction.of(step=2, action="update", restored={"a": 1}, agent_values={"a": 9}, now_columns=[], **common)
    assert (upd.op, upd.agent_wrote, upd.restored) == ("u", {"a": 9}, {"a": 1})
    soft = Correction.of(
        step=3, action="soft_delete", restored={}, agent_values={"a": 9}, now_columns=["deleted_at"], **common
    )
    assert (soft.op, soft.now_columns) == ("u", ["deleted_at"])
    assert Correction.model_validate_json(upd.model_dump_json()) == upd
    assert upd.kafka_key() == b'{"id":7}'


def test_the_apply_report_round_trips_and_refuses_unknown_outcomes() -> None:
    outcome = StepOutcome(n=1, table="public.t", key={"id": 1}, action="update", outcome="applied", batch=1)
    report = ApplyReport(
        plan_id=PLAN_ID,
        dry_run=False,
        ledger="writeguard.undo_ledger",
        applied_by="me@host",
        started_at=AT,
        finished_at=AT + timedelta(seconds=2),
        batches=1,
        outcomes={"applied": 1},
        tables={"public.t": {"applied": 1}},
        steps=[outcome],
    )
    assert ApplyReport.model_validate_json(report.model_dump_json()) == report
    assert report.seconds == 2.0
    with pytest.raises(ValidationError):
        StepOutcome.model_validate({**outcome.model_dump(), "outcome": "done"})


def test_the_correction_and_report_schemas_are_published() -> None:
    schemas = cli.all_schemas()
    assert schemas["undo-correction"] == Correction.model_json_schema()
    assert schemas["undo-apply-report"] == ApplyReport.model_json_schema()
    root = Path(__file__).resolve().parents[2] / "schemas"
    for name in ("undo-correction", "undo-apply-report"):
        text = json.dumps(schemas[name], indent=2, sort_keys=True) + "\n"
        assert (root / f"{name}.schema.json").read_text() == text, "run `writeguard schemas --write`"


# --- config and CLI ---------------------------------------------------------------------------------------------

TABLES = [{"name": "public.t", "topic": "shop.public.t"}]


def test_the_undo_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRITEGUARD_UNDO_DSN", "host=db password=sekrit")
    cfg = parse_config(
        {
            "tables": TABLES,
            "undo": {
                "dsn": "${WRITEGUARD_UNDO_DSN}",
                "batch_size": 100,
                "corrections": {"downstream_groups": ["billing-sync"]},
            },
        }
    )
    assert cfg.undo.dsn is not None and cfg.undo.dsn.get_secret_value() == "host=db password=sekrit"
    assert "sekrit" not in repr(cfg) and "sekrit" not in cfg.model_dump_json()
    assert (cfg.undo.ledger, cfg.undo.batch_size) == ("writeguard.undo_ledger", 100)
    assert cfg.undo.corrections is not None and cfg.undo.corrections.topic == "writeguard.corrections"
    assert parse_config({"tables": TABLES}).undo.corrections is None
    with pytest.raises(ConfigError, match=r"undo\.ledger"):
        parse_config({"tables": TABLES, "undo": {"ledger": "no_schema"}})
    with pytest.raises(ConfigError, match=r"undo\.batch_size"):
        parse_config({"tables": TABLES, "undo": {"batch_size": 0}})


def write_plan(tmp_path: Path, plan: Plan) -> tuple[Path, Path]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"tables": TABLES}))
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json())
    return cfg, path


def real_plan() -> Plan:
    from undo.plan import plan_id_of

    p = plan_of(step("update", {"amount": 5}, {"amount": 500}))
    return p.model_copy(update={"plan_id": plan_id_of(p)})


def test_apply_and_status_refuse_a_tampered_plan_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = real_plan()
    cfg, path = write_plan(tmp_path, plan.model_copy(update={"all_or_nothing": True}))
    for command in ("apply", "status"):
        assert cli.main(["undo", command, str(path), "-c", str(cfg), "--dsn", "host=127.0.0.1 port=1"]) == 1
        err = capsys.readouterr().err
        assert f"writeguard undo {command}: refused" in err and "does not match its content" in err


def test_apply_without_a_database_says_how_to_name_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, path = write_plan(tmp_path, real_plan())
    assert cli.main(["undo", "apply", str(path), "-c", str(cfg)]) == 2
    assert "give --dsn or set undo.dsn" in capsys.readouterr().err


def test_a_connection_error_never_shows_the_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, path = write_plan(tmp_path, real_plan())
    dsn = "host=127.0.0.1 port=1 password=hunter2 sekrit connect_timeout=2"  # unparsable: libpq echoes a word
    assert cli.main(["undo", "apply", str(path), "-c", str(cfg), "--dsn", dsn]) == 1
    out = capsys.readouterr()
    assert "cannot connect" in out.err and "hunter2" not in out.err + out.out and "sekrit" not in out.err + out.out


@pytest.mark.parametrize(
    ("command", "words"),
    [("apply", ["--dry-run", "--batch-size", "--by", "ledger"]), ("status", ["downstream", "Exit 0 when"])],
)
def test_help_answers(command: str, words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["undo", command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(w in out for w in words), out


def test_shape_is_hashable_and_frozen() -> None:
    s = Shape("public.t", "delete", ("id",), (), (), (), False)
    assert {s: 1}[s] == 1
