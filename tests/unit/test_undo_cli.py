"""``writeguard scope``, ``undo plan`` and ``undo show`` over ``--events FILE``, in process and by subprocess."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.undo_sql import step_sql
from stream import cli
from undo.models import Plan, Scope

ROOT = Path(__file__).resolve().parents[2]
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

CONFIG = """
tables:
  - name: public.refunds
    topic: shop.public.refunds
    key_columns: [id]
    features:
      - {name: amount, column: amount}
  - name: public.notes
    topic: shop.public.notes
    agent_id: row.author
    soft_delete: {column: deleted_at}
worker:
  agent_messages:
    topic: shop.message
"""


def value(op, table, before, after, at_s, tx):
    return {
        "op": op,
        "before": before,
        "after": after,
        "source": {"schema": "public", "table": table, "ts_ms": T0_MS + at_s * 1000, "txId": tx, "lsn": at_s},
    }


def message(agent, run, tx, at_s, **meta):
    body = json.dumps({"agent_id": agent, "run_id": run, **meta}).encode()
    return {
        "op": "m",
        "source": {"ts_ms": T0_MS + at_s * 1000, "txId": tx},
        "message": {"prefix": "writeguard", "content": base64.b64encode(body).decode()},
    }


def refund(i, amount, reason="late"):
    return {"id": i, "amount": amount, "reason": reason}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    hostile = 'it\'s "quoted"; DROP TABLE x; -- ünïcode'
    lines = [
        value("c", "refunds", None, refund(1, 10), 1, 100),  # before the agent, by a human
        # The agent's transaction names it in a message that comes after its rows.
        value("c", "refunds", None, refund(2, 250_000.5), 10, 200),
        value("u", "refunds", refund(1, 10), refund(1, 9_999, hostile), 10, 200),
        message("rogue", "run-7", 200, 10, version="2.1"),
        value("c", "refunds", None, refund(3, 5), 11, 201),
        message("rogue", "run-7", 201, 11),
        # A human corrects row 3 afterwards: a conflict.
        value("u", "refunds", refund(3, 5), refund(3, 6), 20, 300),
        # A note with its message key kept, soft-delete table, agent named by its row.
        {
            "key": {"id": 9},
            "value": value("c", "notes", None, {"id": 9, "author": "rogue", "deleted_at": None}, 12, 202),
        },
        None,  # a tombstone
        value("c", "refunds", None, refund(4, 1), 30, 400),  # another agent's, never selected
        message("good", "run-1", 400, 30),
    ]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join("null" if x is None else json.dumps(x) for x in lines) + "\n")
    config = tmp_path / "writeguard.yaml"
    config.write_text(CONFIG)
    return events, config


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_scope_summary_names_tables_in_business_units_runs_and_conflicts(files, capsys) -> None:
    events, config = files
    code, out, err = run(capsys, "scope", "--events", str(events), "-c", str(config), "--agent", "rogue")
    assert code == 0, err
    lines = out.splitlines()
    assert "public.refunds: 2 rows created, 1 rows updated, amount +259,994.50" in lines
    assert "public.notes: 1 rows created" in lines
    assert any(line.startswith("run run-7 of rogue: 3 writes") and "version=2.1" in line for line in lines)
    assert "time range: 2026-01-01T00:00:10+00:00 .. 2026-01-01T00:00:12+00:00" in lines
    assert "4 of 7 events selected, 4 rows, 1 conflicts" in lines
    assert any("conflict public.refunds id=3: later u by <unattributed>" in line for line in lines)
    assert "7 row changes" in err and "events/s" in err


def test_scope_json_is_the_scope_model(files, capsys) -> None:
    events, config = files
    code, out, _ = run(capsys, "scope", "--events", str(events), "-c", str(config), "--run", "run-7", "--json")
    assert code == 0
    scope = Scope.model_validate_json(out)
    # The run's rows only: the note's agent is named by its row, which names no run.
    assert sorted((r.table, r.key["id"]) for r in scope.rows) == [("public.refunds", i) for i in (1, 2, 3)]
    row1 = next(r for r in scope.rows if r.key == {"id": 1})
    assert row1.first_before == refund(1, 10) and [w.tx_id for w in row1.writes] == ["200"]


def test_undo_plan_then_show_prints_counts_totals_and_the_sql(files, tmp_path, capsys) -> None:
    events, config = files
    plan_file = tmp_path / "plan.json"
    argv = ["undo", "plan", "--events", str(events), "-c", str(config), "--agent", "rogue", "-o", str(plan_file)]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    plan = Plan.model_validate_json(plan_file.read_text())
    assert out.startswith(f"plan {plan.plan_id}: 4 steps, 1 conflicts")
    # Reverse commit order: the note (t=12), row 3 (t=11), then rows 2 and 1 (same transaction, later row first).
    assert [(s.table, s.key["id"], s.action) for s in plan.steps] == [
        ("public.notes", 9, "soft_delete"),
        ("public.refunds", 3, "delete"),
        ("public.refunds", 1, "update"),
        ("public.refunds", 2, "delete"),
    ]
    code, out, err = run(capsys, "undo", "show", str(plan_file))
    assert code == 0, err
    assert "public.refunds: 2 delete, 1 update; 1 conflicts, amount -259,989.50" in out
    assert "  3 apply, 1 conflict; 0 rows unchanged" in out
    assert (
        'UPDATE "public"."refunds" SET "amount" = 10, "reason" = \'late\' WHERE "id" = 1 AND "amount" IS NOT '
        "DISTINCT FROM 9999 AND \"reason\" IS NOT DISTINCT FROM 'it''s \"quoted\"; DROP TABLE x; -- ünïcode';"
    ) in out
    assert 'UPDATE "public"."notes" SET "deleted_at" = now() WHERE "id" = 9 AND' in out
    assert '[conflict] delete public.refunds {"id": 3} -- conflict later_write by <unattributed>' in out
    # What an apply will run binds the hostile value as a parameter; the SQL text holds none of it.
    update = next(s for s in plan.steps if s.action == "update")
    query, params = step_sql(update)
    assert "DROP" not in query.as_string(None) and params[-1] == 'it\'s "quoted"; DROP TABLE x; -- ünïcode'


def test_show_refuses_a_tampered_plan_and_accepts_a_reviewers_decision(files, tmp_path, capsys) -> None:
    events, config = files
    plan_file = tmp_path / "plan.json"
    argv = ["undo", "plan", "--events", str(events), "-c", str(config), "--agent", "rogue", "-o", str(plan_file)]
    assert run(capsys, *argv)[0] == 0
    doc = json.loads(plan_file.read_text())
    conflict = next(s for s in doc["steps"] if s["conflict"])
    conflict["decision"] = "force"
    plan_file.write_text(json.dumps(doc))
    code, out, _ = run(capsys, "undo", "show", str(plan_file))
    assert code == 0 and "[force] delete" in out
    next(s for s in doc["steps"] if s["action"] == "update")["values"]["amount"] = 1
    plan_file.write_text(json.dumps(doc))
    code, out, err = run(capsys, "undo", "show", str(plan_file))
    assert code == 1 and out == "" and "does not match its content" in err


def test_all_or_nothing_refuses_with_the_conflicts_and_writes_no_plan(files, tmp_path, capsys) -> None:
    events, config = files
    plan_file = tmp_path / "plan.json"
    argv = ["undo", "plan", "--events", str(events), "-c", str(config), "--agent", "rogue", "-o", str(plan_file)]
    code, _, err = run(capsys, *argv, "--all-or-nothing")
    assert code == 1 and not plan_file.exists()
    assert 'public.refunds {"id": 3}: later_write' in err


def test_alert_selects_its_agent_from_its_first_triggering_event(files, tmp_path, capsys) -> None:
    events, config = files
    at = datetime.fromtimestamp(T0_MS / 1000 + 11, UTC)
    alert = {
        "alert_id": "a-1",
        "agent_id": "rogue",
        "run_id": "run-7",
        "table": "public.refunds",
        "detector": "z",
        "detector_kind": "zscore",
        "scope": "agent",
        "severity": "critical",
        "score": 9.0,
        "threshold": 4.0,
        "summary": "s",
        "explanation": [],
        "commit_ts": (at.replace(second=12)).isoformat(),
        "detected_at": at.isoformat(),
        "lag_ms": 1.0,
        "triggering_events": [{"commit_ts": at.isoformat(), "score": 9.0}],
        "anomalous_events": 1,
        "agent_events": 3,
        "actions": ["alert"],
        "quarantined": False,
    }
    path = tmp_path / "alert.json"
    path.write_text(json.dumps(alert))
    code, out, err = run(capsys, "scope", "--events", str(events), "-c", str(config), "--alert", str(path), "--json")
    assert code == 0, err
    scope = Scope.model_validate_json(out)
    assert scope.selection.alert_id == "a-1" and scope.selection.agents == ("rogue",)
    assert sorted((r.table, r.key["id"]) for r in scope.rows) == [("public.notes", 9), ("public.refunds", 3)]


def test_bad_input_is_refused_with_a_reason(files, tmp_path, capsys) -> None:
    events, config = files
    code, _, err = run(capsys, "scope", "--events", str(events), "-c", str(config))
    assert code == 2 and "select writes with --agent" in err
    config.write_text(CONFIG.replace("    key_columns: [id]\n", ""))
    code, _, err = run(capsys, "scope", "--events", str(events), "-c", str(config), "--agent", "rogue")
    assert code == 2 and "tables.0.key_columns is not set" in err and "events.jsonl:1" in err
    bad = tmp_path / "plan.json"
    bad.write_text("{}")
    code, _, err = run(capsys, "undo", "show", str(bad))
    assert code == 2 and "plan_id" in err


def test_help_answers_for_every_new_command() -> None:
    for argv in (["scope"], ["undo"], ["undo", "plan"], ["undo", "show"]):
        proc = subprocess.run(
            [sys.executable, "-m", "stream.cli", *argv, "--help"], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0 and proc.stdout.startswith("usage: writeguard " + " ".join(argv)), proc.stderr


# --- the reader: Debezium records to row events --------------------------------------------------------------


def spec(**kw):
    from detectors.spec import TableSpec

    return TableSpec(name="public.refunds", topic="shop.public.refunds", **kw)


def raw(x) -> bytes:
    return json.dumps(x).encode()


def test_the_reader_takes_the_row_key_from_the_message_key_with_or_without_its_envelope() -> None:
    from connectors.undo_source import UndoReader

    r = UndoReader([spec()])
    v = raw(value("c", "refunds", None, {**refund(1, 5), "agent_id": "a"}, 1, 1))
    r.feed(raw({"schema": {"type": "struct"}, "payload": {"id": 1}}), v, "f:1")
    r.feed(raw({"id": 2}), v, "f:2")
    assert [(e.key, e.agent_id, e.position) for e in r.events()] == [({"id": 1}, "a", "f:1"), ({"id": 2}, "a", "f:2")]


def test_the_reader_ignores_agent_keyed_message_keys_and_needs_key_columns() -> None:
    from connectors.undo_source import MissingKey, UndoReader

    v = raw(value("c", "refunds", None, {**refund(1, 5), "agent_id": "a"}, 1, 1))
    with pytest.raises(MissingKey, match=r"tables\.0\.key_columns"):
        UndoReader([spec()], message_keys=False).feed(raw({"agent_id": "a"}), v, "f:1")
    r = UndoReader([spec(key_columns=("id",))], message_keys=False)
    r.feed(raw({"agent_id": "a"}), v, "f:1")
    assert [e.key for e in r.events()] == [{"id": 1}]


def test_with_database_identity_only_the_triggers_message_names_the_agent() -> None:
    from connectors.undo_source import UndoReader

    r = UndoReader([spec(key_columns=("id",))], message_prefix="writeguard", database_identity=True)
    r.feed(None, raw(value("u", "refunds", refund(1, 5), {**refund(1, 6), "agent_id": "claimed"}, 1, 7)), "f:1")
    r.feed(None, raw(message("forged", None, 7, 1)), "f:2")  # a writer's own message: no role
    r.feed(None, raw(message("db-agent", "r1", 7, 1, role="agent_role")), "f:3")
    r.feed(None, raw(value("u", "refunds", refund(2, 5), refund(2, 6), 2, 8)), "f:4")  # no message: unattributed
    assert [(e.agent_id, e.run_id, dict(e.meta)) for e in r.events()] == [
        ("db-agent", "r1", {"role": "agent_role"}),
        (None, None, {}),
    ]
    assert r.skipped["claimed_identity"] == 1


def test_the_reader_counts_what_it_cannot_undo_and_reserved_identities_are_not_taken_from_rows() -> None:
    from connectors.undo_source import UndoReader

    r = UndoReader([spec(key_columns=("id",))])
    r.feed(None, raw({"op": "t", "source": {"schema": "public", "table": "refunds", "ts_ms": 1}}), "f:1")
    r.feed(None, raw(value("c", "other", None, {"id": 1}, 1, 1)), "f:2")
    r.feed(None, None, "f:3")  # a tombstone
    r.feed(None, raw(value("c", "refunds", None, {**refund(1, 5), "agent_id": "<unattributed>"}, 1, 1)), "f:4")
    assert r.skipped == {"truncate": 1, "unwatched_table": 1, "tombstone": 1}
    assert [e.agent_id for e in r.events()] == [None]


def test_the_undo_table_settings_are_checked_at_load_with_the_keys_path(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("key_columns: [id]", "key_columns: []"))
    code, _, err = run(capsys, "config", "check", str(bad))
    assert code == 2 and "tables.0.key_columns" in err
    bad.write_text(CONFIG.replace("soft_delete: {column: deleted_at}", "soft_delete: {column: d, kind: maybe}"))
    code, _, err = run(capsys, "config", "check", str(bad))
    assert code == 2 and "tables.1.soft_delete.kind" in err
