"""``plan_undo``: the compensation of a :class:`~undo.models.Scope`, step by step, and the plan's content id.

Per row, from what the selection did to it (net, over all its selected writes):

* created (and still there): ``delete`` it, or ``soft_delete`` it when the table names a soft-delete column;
* updated: ``update`` back exactly the columns whose value the selection changed, to their first before values
  (``undelete`` when one of them is the soft-delete column the selection set);
* deleted: ``insert`` it again from its first before image;
* created and deleted again, or updated back to what it held: nothing to do, no step. So an insert, an update
  and a delete of one row by the agent plan nothing: the row did not exist before and does not exist now.

Each step's precondition is what the selection left (``row_matches``), or for a re-insert that the key is free
(``key_free``); applying checks it, so that a write the scan did not see is never overwritten either. A row that
someone outside the selection wrote afterwards, or whose before image is incomplete, is a ``conflict`` step.

The plan id is the sha256 of the plan's content without the id, ``created_at`` and the steps' ``decision``: the
reviewer's ``force``/``skip`` edits keep the id (it names the computed plan, which the apply ledger records per
step, so a reviewed plan that was partly applied is still the same plan), and any other edit is refused by
:func:`verify_plan_id`. Same scope, same plan id, whenever it is planned.

>>> from undo.events import RowEvent
>>> from undo.scope import build_scope
>>> from undo.models import Selection
>>> from detectors.spec import TableSpec
>>> t = TableSpec(name="public.refunds", topic="shop.public.refunds")
>>> evs = [RowEvent("public.refunds", {"id": 1}, "u", {"id": 1, "amount": 5, "note": "x"},
...                 {"id": 1, "amount": 500, "note": "x"}, 1_000, agent_id="a1")]
>>> plan = plan_undo(build_scope(evs, Selection(agents=("a1",)), [t]), [t])
>>> [(s.action, s.values, s.precondition.columns) for s in plan.steps]
[('update', {'amount': 5}, {'amount': 500})]
>>> verify_plan_id(plan)
>>> verify_plan_id(plan.model_copy(update={"all_or_nothing": True}))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
undo.plan.PlanRejected: plan id ... does not match its content (sha256 ...): the plan was changed after it was made
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from detectors.spec import TableSpec
from undo.events import is_placeholder
from undo.models import Action, Conflict, Plan, Precondition, Row, RowScope, Scope, Step, TablePlan
from undo.scope import changed_columns, net_change, numeric_columns, writer_name


class PlanRefused(ValueError):
    """``all_or_nothing`` and the plan has conflicts; ``conflicts`` lists them."""

    def __init__(self, conflicts: list[tuple[str, Row, Conflict]]) -> None:
        super().__init__(f"{len(conflicts)} conflicting rows: all-or-nothing refuses the plan")
        self.conflicts = conflicts


class PlanRejected(ValueError):
    """A plan file that must not be applied: its content changed since it was made, or a decision is invalid."""


def _conflict(r: RowScope) -> Conflict | None:
    if r.later:
        w = r.later[0]
        more = f" (and {len(r.later) - 1} more)" if len(r.later) > 1 else ""
        if w.op == "c" and not r.exists_after:
            reason, detail = "key_reused", f"the selection deleted the row; {writer_name(w.agent_id)} inserted its key"
        else:
            reason, detail = "later_write", f"{writer_name(w.agent_id)} wrote the row afterwards (op {w.op})"
        return Conflict(
            reason=reason, detail=detail + more, writer=writer_name(w.agent_id), at=w.commit_ts, position=w.position
        )
    if r.incomplete_before:
        return Conflict(reason="before_incomplete", detail="; ".join(r.incomplete_before))
    return None


def _complete(row: Row | None) -> Row | None:
    if row is None or any(is_placeholder(v) for v in row.values()):
        return None
    return row


def _step(r: RowScope, spec: TableSpec | None) -> tuple[Action, Row | None, list[str], Precondition, Row] | None:
    """(action, values, now_columns, precondition, agent_values), or None when the row needs nothing."""
    soft = spec.soft_delete if spec is not None else None
    left = {c: v for c, v in (r.last_after or {}).items() if not is_placeholder(v)}
    if not r.existed_before and not r.exists_after:
        return None
    if not r.existed_before:
        match = Precondition(kind="row_matches", columns=left)
        if soft is None:
            return "delete", {}, [], match, left
        if soft.kind == "boolean":
            return "soft_delete", {soft.column: True}, [], match, left
        return "soft_delete", {}, [soft.column], match, left
    if not r.exists_after:
        return "insert", _complete(r.first_before), [], Precondition(kind="key_free"), {}
    changed = changed_columns(r.first_before, r.last_after)
    if r.first_before is not None and not changed:
        return None
    if r.first_before is None:  # nothing known to restore; the row must at least hold what the selection left
        return "update", None, [], Precondition(kind="row_matches", columns=left), left
    values = {c: r.first_before.get(c) for c in changed}
    touched = {c: left.get(c) for c in changed}
    action: Action = "update"
    if soft is not None and soft.column in changed and _live(r.first_before.get(soft.column)):
        action = "undelete"
    return action, values, [], Precondition(kind="row_matches", columns=touched), touched


def _live(v: Any) -> bool:
    return v is None or v is False


def plan_undo(
    scope: Scope, tables: Sequence[TableSpec], all_or_nothing: bool = False, created_at: datetime | None = None
) -> Plan:
    """The compensation of every row of ``scope``, in reverse commit order of the rows' last selected writes.

    Raises :class:`PlanRefused` when ``all_or_nothing`` and any row is a conflict.
    """
    specs = {t.name: t for t in tables}
    steps: list[Step] = []
    unchanged = 0
    refused: list[tuple[str, Row, Conflict]] = []
    undo_net: dict[str, dict[str, float]] = {}
    for r in sorted(scope.rows, key=lambda r: r.last_event, reverse=True):
        spec = specs.get(r.table)
        planned = _step(r, spec)
        if planned is None:
            unchanged += 1
            continue
        action, values, now_columns, pre, agent_values = planned
        conflict = _conflict(r)
        if conflict is not None:
            refused.append((r.table, r.key, conflict))
        else:
            net = undo_net.setdefault(r.table, {})
            for name, keys in numeric_columns(spec):
                net[name] = net.get(name, 0.0) - net_change(r, keys)
        steps.append(
            Step(
                n=len(steps) + 1,
                table=r.table,
                key=r.key,
                action=action,
                values=values,
                now_columns=now_columns,
                precondition=pre,
                agent_values=agent_values,
                last_commit=r.writes[-1].commit_ts,
                conflict=conflict,
                decision="apply" if conflict is None else "conflict",
            )
        )
    if all_or_nothing and refused:
        raise PlanRefused(refused)
    tables_out = []
    for name in dict.fromkeys(s.table for s in steps):
        mine = [s for s in steps if s.table == name]
        counts: dict[str, int] = {}
        for s in mine:
            counts[s.action] = counts.get(s.action, 0) + 1
        zero = {f: 0.0 for f, _ in numeric_columns(specs.get(name))}
        tables_out.append(
            TablePlan(
                table=name,
                steps=counts,
                conflicts=sum(1 for s in mine if s.conflict is not None),
                undo_net={**zero, **undo_net.get(name, {})},
            )
        )
    draft = Plan(
        plan_id="",
        created_at=created_at or datetime.now(UTC),
        selection=scope.selection,
        all_or_nothing=all_or_nothing,
        tables=tables_out,
        unchanged_rows=unchanged,
        steps=steps,
    )
    return draft.model_copy(update={"plan_id": plan_id_of(draft)})


def plan_id_of(plan: Plan) -> str:
    """sha256 (hex) of the plan's canonical JSON without ``plan_id``, ``created_at`` and the steps' decisions."""
    without: dict[str, Any] = {"plan_id": True, "created_at": True, "steps": {"__all__": {"decision"}}}
    content = plan.model_dump(mode="json", exclude=without)
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def verify_plan_id(plan: Plan) -> None:
    """Refuse (:class:`PlanRejected`) a plan whose content is not the one its id names, or a decision it forbids.

    A reviewer may set ``skip`` on any step and ``force`` on a conflict step whose values are known; a conflict
    step is never ``apply`` and a clean step never ``conflict`` or ``force``.
    """
    actual = plan_id_of(plan)
    if actual != plan.plan_id:
        raise PlanRejected(
            f"plan id {plan.plan_id} does not match its content (sha256 {actual}): the plan was changed after it "
            "was made"
        )
    for s in plan.steps:
        allowed = ("apply", "skip") if s.conflict is None else ("conflict", "force", "skip")
        if s.decision not in allowed:
            raise PlanRejected(f"step {s.n}: decision {s.decision!r} is not one of {', '.join(allowed)}")
        if s.decision == "force" and s.values is None:
            raise PlanRejected(f"step {s.n}: cannot force, the values to write back are unknown")
