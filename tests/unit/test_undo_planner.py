"""The pure scope and undo planner on handcrafted change sequences (undo/)."""

from __future__ import annotations

import ast
import sys
from datetime import UTC, datetime

import pytest

from detectors.spec import FeatureSpec, SoftDelete, TableSpec
from tests.import_graph import ROOT, import_graph
from undo.events import TOAST_PLACEHOLDER, RowEvent
from undo.models import Plan, Selection
from undo.plan import PlanRefused, PlanRejected, plan_id_of, plan_undo, verify_plan_id
from undo.scope import build_scope, summary_lines

T = "public.refunds"
SPEC = TableSpec(name=T, topic="shop.public.refunds", features=(FeatureSpec(name="amount", column="amount"),))
AGENT = Selection(agents=("rogue",))
_clock = iter(range(1_000_000, 10**12, 1_000_000))


def ev(op, key, before=None, after=None, agent="rogue", run="run-1", table=T, **kw):
    return RowEvent(table, {"id": key}, op, before, after, next(_clock), f"tx{key}", agent, run, f"f:{key}", **kw)


def row(key, amount, **more):
    return {"id": key, "amount": amount, "reason": "r", "status": "open", "note": "n", **more}


def plan_of(events, specs=(SPEC,), selection=AGENT, **kw):
    return plan_undo(build_scope(events, selection, specs), specs, **kw)


def test_insert_update_delete_of_one_row_by_the_agent_plans_nothing() -> None:
    # The row did not exist before the agent and does not exist now: the net compensation is empty.
    events = [ev("c", 1, None, row(1, 10)), ev("u", 1, row(1, 10), row(1, 99)), ev("d", 1, row(1, 99), None)]
    scope = build_scope(events, AGENT, [SPEC])
    assert [w.op for w in scope.rows[0].writes] == ["c", "u", "d"]
    assert scope.tables[0].rows_transient == 1 and scope.tables[0].net == {"amount": 0.0}
    plan = plan_of(events)
    assert plan.steps == [] and plan.unchanged_rows == 1
    # Someone reusing the key afterwards is no conflict: the undo leaves the row alone.
    events.append(ev("c", 1, None, row(1, 5), agent="bob"))
    assert build_scope(events, AGENT, [SPEC]).conflicts == 0 and plan_of(events).steps == []


def test_insert_then_update_by_the_agent_is_one_delete_guarded_by_the_last_after_image() -> None:
    plan = plan_of([ev("c", 1, None, row(1, 10)), ev("u", 1, row(1, 10), row(1, 99))])
    [step] = plan.steps
    assert (step.action, step.key, step.decision) == ("delete", {"id": 1}, "apply")
    assert step.precondition.kind == "row_matches" and step.precondition.columns == row(1, 99)
    assert plan.tables[0].undo_net == {"amount": -99.0}


def test_an_update_of_two_of_five_columns_restores_only_those_two() -> None:
    before = row(1, 10)
    after = {**before, "amount": 500, "status": "paid"}
    [step] = plan_of([ev("u", 1, before, after)]).steps
    assert step.action == "update"
    assert step.values == {"amount": 10, "status": "open"}
    assert step.precondition.columns == {"amount": 500, "status": "paid"}


def test_a_later_write_by_a_human_is_a_conflict_naming_the_human() -> None:
    events = [
        ev("u", 1, row(1, 10), row(1, 500)),
        ev("u", 1, row(1, 500), row(1, 500, note="checked"), agent=None, run=None),
        ev("u", 2, row(2, 10), row(2, 600)),
        ev("u", 2, row(2, 600), row(2, 600, note="x"), agent="other-agent", run=None),
    ]
    scope = build_scope(events, AGENT, [SPEC])
    assert scope.conflicts == 2
    plan = plan_of(events)
    by_key = {s.key["id"]: s for s in plan.steps}
    assert by_key[1].decision == "conflict" and by_key[1].conflict is not None
    assert (by_key[1].conflict.reason, by_key[1].conflict.writer) == ("later_write", "<unattributed>")
    assert by_key[2].conflict is not None and by_key[2].conflict.writer == "other-agent"
    assert plan.tables[0].conflicts == 2 and plan.tables[0].undo_net == {"amount": 0.0}


def test_writes_before_the_selection_by_others_are_no_conflict() -> None:
    events = [ev("c", 1, None, row(1, 10), agent=None), ev("u", 1, row(1, 10), row(1, 20))]
    [step] = plan_of(events).steps
    assert step.conflict is None and step.values == {"amount": 10}


def test_key_reuse_after_the_agent_deleted_the_row_is_a_conflict() -> None:
    events = [ev("d", 1, row(1, 10), None), ev("c", 1, None, row(1, 77), agent="bob")]
    [step] = plan_of(events).steps
    assert step.action == "insert" and step.precondition.kind == "key_free"
    assert step.conflict is not None and (step.conflict.reason, step.conflict.writer) == ("key_reused", "bob")


def test_a_delete_with_an_incomplete_before_image_is_a_conflict_never_a_wrong_insert() -> None:
    # REPLICA IDENTITY DEFAULT: PostgreSQL logs only the key of a deleted row, Debezium nulls the rest.
    keyonly = {"id": 1, "amount": None, "reason": None, "status": None, "note": None}
    [step] = plan_of([ev("d", 1, keyonly, None)]).steps
    assert step.conflict is not None and step.conflict.reason == "before_incomplete"
    assert "REPLICA IDENTITY" in step.conflict.detail
    # A before image lacking columns that the table's after images have.
    events = [ev("c", 2, None, row(2, 5), agent=None), ev("d", 2, {"id": 2, "amount": 5}, None)]
    [step] = plan_of(events).steps
    assert step.conflict is not None and "lacks columns note, reason, status" in step.conflict.detail
    # An update without a before image: nothing known to restore, so it cannot be forced either.
    [step] = plan_of([ev("u", 3, None, row(3, 5))]).steps
    assert step.conflict is not None and step.values is None


def test_a_toast_placeholder_in_a_changed_column_is_a_conflict_and_in_an_unchanged_one_is_not() -> None:
    big = "x" * 10_000
    # The agent changed the TOASTed column, but Debezium had no old value for it.
    [step] = plan_of([ev("u", 1, row(1, 10, body=TOAST_PLACEHOLDER), row(1, 10, body="short"))]).steps
    assert step.conflict is not None and step.conflict.reason == "before_incomplete"
    assert "placeholder in body" in step.conflict.detail
    # An unchanged TOASTed column: the placeholder in both images is not a change, and nothing restores it.
    [step] = plan_of([ev("u", 2, row(2, 10, body=TOAST_PLACEHOLDER), row(2, 50, body=TOAST_PLACEHOLDER))]).steps
    assert step.conflict is None and step.values == {"amount": 10}
    # A deleted row whose before image has the placeholder cannot be re-inserted.
    [step] = plan_of([ev("d", 3, row(3, 10, body=TOAST_PLACEHOLDER), None)]).steps
    assert step.conflict is not None and step.values is None
    # The scan saw the value earlier: the agent's later after image with the placeholder keeps the known value.
    events = [ev("c", 4, None, row(4, 1, body=big), agent=None), ev("u", 4, None, row(4, 2, body=TOAST_PLACEHOLDER))]
    scope = build_scope(events, AGENT, [SPEC])
    assert scope.rows[0].last_after is not None and scope.rows[0].last_after["body"] == big


def test_soft_delete_table_marks_created_rows_and_clears_the_agents_soft_deletes() -> None:
    spec = SPEC.model_copy(update={"soft_delete": SoftDelete(column="deleted_at")})
    events = [
        ev("c", 1, None, row(1, 10, deleted_at=None)),
        ev("u", 2, row(2, 10, deleted_at=None), row(2, 10, deleted_at="2026-01-01T00:00:00Z")),
    ]
    steps = {s.key["id"]: s for s in plan_of(events, specs=(spec,)).steps}
    assert (steps[1].action, steps[1].values, steps[1].now_columns) == ("soft_delete", {}, ["deleted_at"])
    assert (steps[2].action, steps[2].values) == ("undelete", {"deleted_at": None})
    boolean = SPEC.model_copy(update={"soft_delete": SoftDelete(column="deleted", kind="boolean")})
    [step] = plan_of([ev("c", 3, None, row(3, 1, deleted=False))], specs=(boolean,)).steps
    assert (step.action, step.values) == ("soft_delete", {"deleted": True})


def test_steps_run_in_reverse_commit_order() -> None:
    events = [ev("c", 1, None, row(1, 1)), ev("c", 2, None, row(2, 2)), ev("u", 1, row(1, 1), row(1, 3))]
    assert [(s.n, s.key["id"]) for s in plan_of(events).steps] == [(1, 1), (2, 2)]
    events = [ev("c", 5, None, row(5, 1)), ev("c", 6, None, row(6, 2))]
    assert [s.key["id"] for s in plan_of(events).steps] == [6, 5]


def test_all_or_nothing_refuses_a_plan_with_a_conflict_and_accepts_one_without() -> None:
    events = [ev("u", 1, row(1, 10), row(1, 500)), ev("u", 1, row(1, 500), row(1, 1), agent="bob")]
    with pytest.raises(PlanRefused) as e:
        plan_of(events, all_or_nothing=True)
    assert [(t, k, c.reason) for t, k, c in e.value.conflicts] == [(T, {"id": 1}, "later_write")]
    assert plan_of(events[:1], all_or_nothing=True).all_or_nothing is True


def test_the_plan_id_is_stable_and_covers_everything_but_the_decisions() -> None:
    events = [
        ev("c", 1, None, row(1, 10)),
        ev("u", 2, row(2, 1), row(2, 2)),
        ev("u", 2, row(2, 2), row(2, 3), agent="h"),
    ]
    a = plan_of(events, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    b = plan_of(events, created_at=datetime(2027, 1, 1, tzinfo=UTC))
    assert a.plan_id == b.plan_id == plan_id_of(a) and len(a.plan_id) == 64
    # Through the file and back: the same id.
    again = Plan.model_validate_json(a.model_dump_json())
    verify_plan_id(again)
    # A reviewer's decision keeps the id; a changed value, key or step list does not.
    conflict = next(s for s in a.steps if s.conflict is not None)
    reviewed = a.model_copy(update={"steps": [s.model_copy(update={"decision": "skip"}) for s in a.steps]})
    verify_plan_id(reviewed)
    forced = [s.model_copy(update={"decision": "force"}) if s is conflict else s for s in a.steps]
    verify_plan_id(a.model_copy(update={"steps": forced}))
    tampered = [s.model_copy(update={"values": {"amount": 999}}) if s.values else s for s in a.steps]
    with pytest.raises(PlanRejected, match="does not match its content"):
        verify_plan_id(a.model_copy(update={"steps": tampered}))
    with pytest.raises(PlanRejected, match="does not match"):
        verify_plan_id(a.model_copy(update={"steps": a.steps[1:]}))


def test_decisions_a_reviewer_may_not_make_are_refused() -> None:
    events = [ev("u", 1, row(1, 10), row(1, 500)), ev("u", 2, None, row(2, 5))]
    plan = plan_of(events)
    [clean] = [s for s in plan.steps if s.conflict is None]
    [unknown] = [s for s in plan.steps if s.conflict is not None]
    for bad, message in [
        (clean.model_copy(update={"decision": "force"}), "not one of apply, skip"),
        (unknown.model_copy(update={"decision": "apply"}), "not one of conflict, force, skip"),
        (unknown.model_copy(update={"decision": "force"}), "cannot force"),
    ]:
        steps = [bad if s.n == bad.n else s for s in plan.steps]
        with pytest.raises(PlanRejected, match=message):
            verify_plan_id(plan.model_copy(update={"steps": steps}))


def test_selection_by_run_and_time_and_the_runs_metadata() -> None:
    events = [
        ev("c", 1, None, row(1, 1), run="r1", meta={"version": "1.2"}),
        ev("c", 2, None, row(2, 2), run="r2"),
        ev("c", 3, None, row(3, 3), run="r2"),
    ]
    scope = build_scope(events, Selection(runs=("r1",)), [SPEC])
    assert [r.key for r in scope.rows] == [{"id": 1}]
    assert [(r.run_id, r.metadata) for r in scope.runs] == [("r1", {"version": "1.2"})]
    since = datetime.fromtimestamp(events[1].commit_ts_us / 1e6, UTC)
    scope = build_scope(events, Selection(since=since), [SPEC])
    assert [r.key["id"] for r in scope.rows] == [2, 3]
    until = datetime.fromtimestamp(events[2].commit_ts_us / 1e6, UTC)
    assert [r.key["id"] for r in build_scope(events, Selection(until=until), [SPEC]).rows] == [1, 2]


def test_the_summary_names_tables_in_business_units_and_conflicts() -> None:
    events = [
        ev("c", 1, None, row(1, 412.5)),
        ev("c", 2, None, row(2, 100_000)),
        ev("u", 2, None, row(2, 1), agent="h"),
    ]
    lines = summary_lines(build_scope(events, AGENT, [SPEC]))
    assert lines[0] == "public.refunds: 2 rows created, amount +100,412.50"
    assert any(line.startswith("run run-1 of rogue: 2 writes") for line in lines)
    assert any("conflict public.refunds id=2: later u by h" in line for line in lines)


def test_undo_is_pure_it_imports_only_detectors_and_light_libraries() -> None:
    graph = import_graph(["undo"])
    assert {t.split(".")[0] for ts in graph.values() for t in ts} <= {"detectors", "undo"}
    allowed = {"pydantic", "orjson", "msgspec", "detectors", "undo", "__future__"} | set(sys.stdlib_module_names)
    for path in (ROOT / "undo").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = {n.split(".")[0] for n in names} - allowed
            assert not bad, (path.name, bad)
    assert not {"io", "socket", "os", "pathlib", "subprocess"} & {
        n.split(".")[0]
        for p in (ROOT / "undo").glob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
    }
