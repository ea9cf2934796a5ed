"""``build_scope``: from row changes in commit order to the rows a selection of writes touched.

>>> from undo.events import RowEvent
>>> from detectors.spec import TableSpec, FeatureSpec
>>> t = TableSpec(name="public.refunds", topic="shop.public.refunds",
...               features=(FeatureSpec(name="amount", column="amount"),))
>>> evs = [RowEvent("public.refunds", {"id": 1}, "c", None, {"id": 1, "amount": 50}, 1_000, agent_id="a1"),
...        RowEvent("public.refunds", {"id": 2}, "c", None, {"id": 2, "amount": 7}, 2_000, agent_id="bob")]
>>> s = build_scope(evs, Selection(agents=("a1",)), [t])
>>> [(r.key, r.exists_after) for r in s.rows], s.tables[0].rows_created, s.tables[0].net
([({'id': 1}, True)], 1, {'amount': 50.0})
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from detectors.engine import UNATTRIBUTED
from detectors.features import as_number, lookup
from detectors.spec import TableSpec
from undo.events import RowEvent, is_placeholder
from undo.models import OpCounts, Row, RowScope, RunScope, Scope, Selection, TableScope, Write


def ts(us: int) -> datetime:
    """µs since the epoch as an aware UTC datetime."""
    return datetime.fromtimestamp(us / 1e6, UTC)


def write_of(ev: RowEvent) -> Write:
    return Write(
        op=ev.op,
        agent_id=ev.agent_id,
        run_id=ev.run_id,
        tx_id=ev.tx_id,
        commit_ts=ts(ev.commit_ts_us),
        position=ev.position,
    )


def writer_name(agent_id: str | None) -> str:
    return agent_id if agent_id is not None else UNATTRIBUTED


@dataclass
class _Row:
    table: str
    key: dict[str, Any]
    writes: list[Write] = field(default_factory=list)
    first_before: dict[str, Any] | None = None
    last_after: dict[str, Any] | None = None
    existed_before: bool = False
    exists_after: bool = False
    later: list[Write] = field(default_factory=list)
    first: RowEvent | None = None  # the selection's first write to the row
    prior: dict[str, Any] | None = None  # the row's last image before it, when the scan saw one
    last_event: int = 0


def _merge(after: Mapping[str, Any], prev: Mapping[str, Any] | None) -> dict[str, Any]:
    """An after image with TOAST placeholders replaced by the last known value, where one is known."""
    out = dict(after)
    if prev is not None:
        for c, v in after.items():
            if is_placeholder(v) and c in prev and not is_placeholder(prev[c]):
                out[c] = prev[c]
    return out


def changed_columns(first_before: Mapping[str, Any] | None, last_after: Mapping[str, Any] | None) -> list[str]:
    """The columns an update left with another value than it found, in the after image's order.

    A column whose value Debezium never had (TOAST placeholder in the after image) was not changed by the update.

    >>> changed_columns({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "c": "__debezium_unavailable_value"})
    ['b']
    """
    after = last_after or {}
    before = first_before or {}
    return [c for c, v in after.items() if not is_placeholder(v) and (c not in before or before[c] != v)]


def _before_problems(
    ev: RowEvent, columns: set[str], known: Mapping[str, Any] | None, key_columns: Iterable[str]
) -> list[str]:
    """Why the before image of the selection's first write to an existing row cannot be restored from.

    ``columns`` are the ones the undo needs: all of the table's for a re-insert, the changed ones for an update.
    """
    before = ev.before
    if before is None:
        return ["no before image: the table's REPLICA IDENTITY is not FULL"]
    problems: list[str] = []
    missing = sorted(columns - set(before))
    if missing:
        problems.append(f"before image lacks columns {', '.join(missing)}: REPLICA IDENTITY is not FULL")
    toast = sorted(c for c, v in before.items() if c in columns and is_placeholder(v))
    if toast:
        problems.append(f"before image has Debezium's unavailable-value placeholder in {', '.join(toast)} (TOAST)")
    keys = set(key_columns)
    others = [c for c in before if c not in keys]
    if ev.op == "d" and others and all(before[c] is None for c in others):
        # REPLICA IDENTITY DEFAULT: PostgreSQL logs only the key of a deleted row, Debezium nulls the rest.
        problems.append("before image holds only the key (all other columns null): REPLICA IDENTITY is not FULL")
    elif known is not None:
        differ = sorted(
            c for c in others if c in columns and c in known and not is_placeholder(known[c]) and known[c] != before[c]
        )
        if differ:
            problems.append(f"before image disagrees with the row's last known image in {', '.join(differ)}")
    return problems


def build_scope(events: Iterable[RowEvent], selection: Selection, tables: Sequence[TableSpec]) -> Scope:
    """The rows the selected writes touched, each with what others wrote to it afterwards.

    ``events`` are every change of the watched tables over the window, selected or not (others' writes are how
    conflicts are found), in commit order; they are sorted by commit time (stably, so a transaction's rows keep
    their order) in case they were merged from several topics.
    """
    specs = {t.name: t for t in tables}
    ordered = sorted(events, key=lambda e: e.commit_ts_us)
    columns: dict[str, set[str]] = {}
    known: dict[tuple[str, str], dict[str, Any] | None] = {}  # last image of rows seen outside the selection
    rows: dict[tuple[str, str], _Row] = {}
    counts: dict[str, OpCounts] = {}
    runs: dict[tuple[str | None, str | None], list[Any]] = {}
    selected = 0
    first: int | None = None
    last: int | None = None
    for n, ev in enumerate(ordered):
        rid = ev.row_id()
        cols = columns.setdefault(ev.table, set())
        if ev.after is not None:
            cols.update(ev.after)
        row = rows.get(rid)
        if not selection.matches(ev.agent_id, ev.run_id, ev.commit_ts_us):
            if row is not None:
                row.later.append(write_of(ev))
            else:
                known[rid] = None if ev.after is None else _merge(ev.after, known.get(rid))
            continue
        selected += 1
        first = ev.commit_ts_us if first is None else first
        last = ev.commit_ts_us
        c = counts.get(ev.table, OpCounts())
        counts[ev.table] = c.model_copy(update={ev.op: getattr(c, ev.op) + 1})
        run = runs.setdefault((ev.agent_id, ev.run_id), [0, ev.commit_ts_us, ev.commit_ts_us, {}])
        run[0] += 1
        run[2] = ev.commit_ts_us
        run[3].update(ev.meta)
        if row is None:
            prior = known.get(rid)
            row = rows[rid] = _Row(ev.table, dict(ev.key), existed_before=ev.op != "c", first=ev, prior=prior)
            if ev.op != "c" and ev.before is not None:
                row.first_before = dict(ev.before)
            row.last_after = row.first_before if prior is None else prior
        row.last_event = n
        row.writes.append(write_of(ev))
        if ev.after is not None:
            row.last_after = _merge(ev.after, row.last_after if row.last_after is not None else ev.before)
        else:
            row.last_after = None
        row.exists_after = ev.op != "d"
    scoped = [
        RowScope(
            table=r.table,
            key=r.key,
            writes=r.writes,
            first_before=r.first_before,
            last_after=r.last_after,
            existed_before=r.existed_before,
            exists_after=r.exists_after,
            later=r.later,
            incomplete_before=_incomplete(r, columns.get(r.table, set()), specs.get(r.table)),
            last_event=r.last_event,
        )
        for r in rows.values()
    ]
    return Scope(
        selection=selection,
        events_read=len(ordered),
        events_selected=selected,
        first_commit=None if first is None else ts(first),
        last_commit=None if last is None else ts(last),
        tables=[_table_scope(t, n, [r for r in scoped if r.table == t], specs.get(t)) for t, n in counts.items()],
        runs=[
            RunScope(run_id=run_id, agent_id=agent, events=n, first_commit=ts(a), last_commit=ts(b), metadata=meta)
            for (agent, run_id), (n, a, b, meta) in runs.items()
        ],
        rows=scoped,
    )


def _incomplete(r: _Row, table_columns: set[str], spec: TableSpec | None) -> list[str]:
    """The before-image problems that matter for this row's undo: none for a row the selection created."""
    if not r.existed_before or r.first is None:
        return []
    if r.exists_after:
        needed = set(changed_columns(r.first_before, r.last_after))
        if r.first_before is not None and not needed:
            return []
    else:  # a re-insert needs every column: the table's, as its after images showed them, and the image's own
        needed = table_columns | set(r.first_before or ())
    key_cols = spec.key_columns if spec is not None and spec.key_columns else tuple(r.key)
    return _before_problems(r.first, needed, r.prior, key_cols)


def numeric_columns(spec: TableSpec | None) -> list[tuple[str, tuple[str, ...]]]:
    """(feature name, column path) of the features whose net change is a sum of column values.

    A ratio (``divide_by``) has no meaningful sum; two features on one column (value and delta) are one column.
    """
    out: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for f in spec.features if spec is not None else ():
        if f.divide_by is None and f.column not in seen:
            seen.add(f.column)
            out.append((f.name, tuple(f.column.split("."))))
    return out


def net_change(r: RowScope, keys: tuple[str, ...]) -> float:
    """After minus before of one column over the row's selected writes; a row that did not exist counts as 0."""
    after = as_number(lookup(r.last_after, keys)) if r.exists_after else None
    before = as_number(lookup(r.first_before, keys)) if r.existed_before else None
    return (after or 0.0) - (before or 0.0)


def _table_scope(table: str, events: OpCounts, rows: list[RowScope], spec: TableSpec | None) -> TableScope:
    created = sum(1 for r in rows if not r.existed_before and r.exists_after)
    deleted = sum(1 for r in rows if r.existed_before and not r.exists_after)
    updated = sum(1 for r in rows if r.existed_before and r.exists_after)
    net = {name: sum(net_change(r, keys) for r in rows) for name, keys in numeric_columns(spec)}
    return TableScope(
        table=table,
        events=events,
        rows_created=created,
        rows_updated=updated,
        rows_deleted=deleted,
        rows_transient=len(rows) - created - deleted - updated,
        net=net,
    )


def summary_lines(scope: Scope) -> list[str]:
    """The terminal summary: one line per table, the runs, the time range and the conflicts."""
    out: list[str] = []
    for t in scope.tables:
        parts = [f"{n} rows {what}" for n, what in _effects(t) if n]
        parts += [f"{name} {v:+,.2f}" for name, v in t.net.items()]
        out.append(f"{t.table}: " + (", ".join(parts) or "nothing left changed"))
    for run in scope.runs:
        meta = "".join(f", {k}={v}" for k, v in sorted(run.metadata.items()))
        out.append(
            f"run {run.run_id or '-'} of {writer_name(run.agent_id)}: {run.events} writes, "
            f"{run.first_commit.isoformat()} .. {run.last_commit.isoformat()}{meta}"
        )
    if scope.first_commit is not None and scope.last_commit is not None:
        out.append(f"time range: {scope.first_commit.isoformat()} .. {scope.last_commit.isoformat()}")
    out.append(
        f"{scope.events_selected:,} of {scope.events_read:,} events selected, {len(scope.rows):,} rows, "
        f"{scope.conflicts} conflicts"
    )
    for r in scope.rows:
        for w in r.later:
            out.append(
                f"  conflict {r.table} {_key_text(r.key)}: later {w.op} by {writer_name(w.agent_id)} at "
                f"{w.commit_ts.isoformat()} ({w.position})"
            )
        for p in r.incomplete_before:
            out.append(f"  conflict {r.table} {_key_text(r.key)}: {p}")
    return out


def _effects(t: TableScope) -> list[tuple[int, str]]:
    return [
        (t.rows_created, "created"),
        (t.rows_updated, "updated"),
        (t.rows_deleted, "deleted"),
        (t.rows_transient, "created and deleted again"),
    ]


def _key_text(key: Row) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in key.items())
