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

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson

from detectors.engine import UNATTRIBUTED
from detectors.features import as_number, lookup
from detectors.spec import TableSpec
from undo.events import TOAST_PLACEHOLDER, TOAST_PLACEHOLDER_B64, RowEvent, is_placeholder
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


# Rows whose last image (by writers outside the selection) the scan remembers: ~0.5 KB each as compact JSON.
MAX_KNOWN = 100_000
_PLACEHOLDERS = (TOAST_PLACEHOLDER.encode(), TOAST_PLACEHOLDER_B64.encode())
Packed = bytes | None
_encode = msgspec.json.Encoder().encode


def _pack(after: Mapping[str, Any], prev: Packed) -> Packed:
    """An after image as compact JSON (a third of a dict's memory), TOAST placeholders filled from ``prev``.

    msgspec rather than orjson: orjson's bytes keep their 4 KB output buffer allocated.

    >>> _pack({"id": 1, "body": TOAST_PLACEHOLDER}, _pack({"id": 1, "body": "long"}, None))
    b'{"id":1,"body":"long"}'
    """
    raw = _encode(after)
    if any(p in raw for p in _PLACEHOLDERS):
        raw = _encode(_merge(after, _unpack(prev)))
    return raw


def _unpack(packed: Packed) -> dict[str, Any] | None:
    if packed is None:
        return None
    image: dict[str, Any] = orjson.loads(packed)
    return image


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


def us_of(t: datetime) -> int:
    """µs since the epoch of a time (UTC when it names no zone), as :meth:`Selection.matches` counts them.

    >>> us_of(datetime(2026, 1, 1, 0, 0, 1, 5, tzinfo=UTC))
    1767225601000005
    """
    t = t if t.tzinfo is not None else t.replace(tzinfo=UTC)
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def window_us(selection: Selection) -> tuple[int, int]:
    """The selection's commit-time range in µs, [since, until): unbounded ends as the extreme integers."""
    since = -(2**63) if selection.since is None else us_of(selection.since)
    until = 2**63 if selection.until is None else us_of(selection.until)
    return since, until


def matcher(selection: Selection) -> Callable[[str | None, str | None, int], bool]:
    """:meth:`Selection.matches`, compiled: sets and µs bounds computed once, not per event.

    >>> m = matcher(Selection(agents=("a1",), until=ts(2_000)))
    >>> m("a1", None, 1_999), m("a1", None, 2_000), m("a2", None, 1_000)
    (True, False, False)
    """
    agents = frozenset(selection.agents)
    runs = frozenset(selection.runs)
    since, until = window_us(selection)
    if agents and not runs:
        return lambda agent, run, at: agent in agents and since <= at < until
    return lambda agent, run, at: (not agents or agent in agents) and (not runs or run in runs) and since <= at < until


def build_scope(
    events: Iterable[RowEvent], selection: Selection, tables: Sequence[TableSpec], max_known: int = MAX_KNOWN
) -> Scope:
    """The rows the selected writes touched, each with what others wrote to it afterwards.

    ``events`` are every change of the watched tables, selected or not (others' writes are how conflicts are
    found), in commit order; an iterator is consumed once, as it comes. State is kept for the rows the selection
    writes (their writes, images and later writes) and, for changes inside the selection's time range, the last
    image of at most ``max_known`` rows others wrote, the most recently written, as compact JSON: when the selection
    later writes such a row, its prior image fills in a TOAST value the agent's after image left out and checks
    the before image. A change before ``since`` leaves nothing behind: the scan's history starts where the
    selection does, as a Kafka read that starts at ``since`` sees it; a row without a prior image is planned from
    its own before image, as it would be then.
    """
    specs = {t.name: t for t in tables}
    match = matcher(selection)
    since, until = window_us(selection)
    columns: dict[str, set[str]] = {}
    known: OrderedDict[tuple[str, str], Packed] = OrderedDict()  # others' rows' last images, the recent ones
    rows: dict[tuple[str, str], _Row] = {}
    counts: dict[str, dict[str, int]] = {}
    runs: dict[tuple[str | None, str | None], list[Any]] = {}
    selected = 0
    first: int | None = None
    last: int | None = None
    n = -1
    for n, ev in enumerate(events):
        at = ev.commit_ts_us
        after = ev.after
        if at >= since and after is not None:
            cols = columns.get(ev.table)
            if cols is None:
                cols = columns[ev.table] = set()
            cols.update(after)
        rid = ev.row_id()
        row = rows.get(rid)
        if not match(ev.agent_id, ev.run_id, at):
            if row is not None:
                row.later.append(write_of(ev))
            elif since <= at < until:
                prev = known.pop(rid, None)  # re-inserted: the order is the order rows were last written
                known[rid] = None if after is None else _pack(after, prev)
                if len(known) > max_known:
                    known.popitem(last=False)
            continue
        selected += 1
        first = at if first is None else first
        last = at
        c = counts.get(ev.table)
        if c is None:
            c = counts[ev.table] = {"c": 0, "u": 0, "d": 0}
        c[ev.op] += 1
        run = runs.get((ev.agent_id, ev.run_id))
        if run is None:
            run = runs[(ev.agent_id, ev.run_id)] = [0, at, at, {}]
        run[0] += 1
        run[2] = at
        run[3].update(ev.meta)
        if row is None:
            prior = _unpack(known.pop(rid, None))  # from here on the row's writes are the scope's: no second copy
            row = rows[rid] = _Row(ev.table, dict(ev.key), existed_before=ev.op != "c", first=ev, prior=prior)
            if ev.op != "c" and ev.before is not None:
                row.first_before = dict(ev.before)
            row.last_after = row.first_before if prior is None else prior
        row.last_event = n
        row.writes.append(write_of(ev))
        if after is not None:
            row.last_after = _merge(after, row.last_after if row.last_after is not None else ev.before)
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
    by_table: dict[str, list[RowScope]] = {}
    for r in scoped:
        by_table.setdefault(r.table, []).append(r)
    return Scope(
        selection=selection,
        events_read=n + 1,
        events_selected=selected,
        first_commit=None if first is None else ts(first),
        last_commit=None if last is None else ts(last),
        tables=[_table_scope(t, OpCounts(**c), by_table.get(t, []), specs.get(t)) for t, c in counts.items()],
        runs=[
            RunScope(run_id=run_id, agent_id=agent, events=k, first_commit=ts(a), last_commit=ts(b), metadata=meta)
            for (agent, run_id), (k, a, b, meta) in runs.items()
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
