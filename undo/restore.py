"""Rebuild a table's rows as they were at a point in time from its change events: the pure fold of ``restore``.

A table's CDC topic holds Debezium's snapshot (op ``r``: every row as it was when the connector started) and then
every committed ``c``/``u``/``d``, and a ``t`` for a ``TRUNCATE``. Folding them in commit order gives the table's
rows at any point of that history, also after a ``DROP TABLE``, which produces no event at all. :func:`apply`
folds one :class:`Change` into a :class:`RestoreState` (rows keyed by the canonical row key), :func:`rows_at`
folds a stream up to a time, or up to the first truncate. No I/O here: ``connectors/restore_pg.py`` turns Kafka
records or a JSONL file into :class:`Change` and writes the rows into PostgreSQL.

>>> ch = [Change("r", {"id": 1}, {"id": 1, "amount": 5}, 10, snapshot="last"),
...       Change("u", {"id": 1}, {"id": 1, "amount": 7}, 20),
...       Change("c", {"id": 2}, {"id": 2, "amount": 9}, 30),
...       Change("t", None, None, 40)]
>>> f = rows_at(ch, before_truncate=True)
>>> sorted((r.key["id"], r.values["amount"]) for r in f.state.rows.values()), f.stopped_at.op
([(1, 7), (2, 9)], 't')
>>> [r.values["amount"] for r in rows_at(ch, at_us=25).state.rows.values()]
[7]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import msgspec
from pydantic import Field

from detectors.strict import Strict
from undo.events import canonical_key, is_placeholder

ChangeOp = Literal["r", "c", "u", "d", "t"]

# Debezium's source.snapshot on a snapshot read: "first" (of the whole snapshot) or "first_in_data_collection" (of
# one table, when several are captured) on its first row, "last"/"last_in_data_collection" on its last, "true"
# between. A snapshot without its last row never finished (the connector stopped during it).
FIRST_MARKERS: Final = frozenset({"first", "first_in_data_collection"})
LAST_MARKERS: Final = frozenset({"last", "last_in_data_collection"})

# Reasons a column of a restored row has no value (a NULL or the column's default is written instead).
PLACEHOLDER: Final = "toast_placeholder"  # Debezium's __debezium_unavailable_value, and no earlier value known
MISSING: Final = "missing_from_image"  # the row's last image had no such column (added to the table later)


class Change(msgspec.Struct, frozen=True, gc=False):
    """One event of the table, decoded: a row image for ``r``/``c``/``u``, a key for ``d``, nothing for ``t``.

    ``key`` is the row's primary key (None only for ``t``); ``after`` the whole row after the change (None for
    ``d`` and ``t``); ``snapshot`` Debezium's ``source.snapshot`` marker of a snapshot read.
    """

    op: ChangeOp
    key: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    commit_ts_us: int
    position: str = ""
    snapshot: str | None = None


class Row(msgspec.Struct, gc=False):
    """A row of the rebuilt table: its key, its last known values, the columns whose value is not known."""

    key: dict[str, Any]
    values: dict[str, Any]
    unavailable: frozenset[str] = frozenset()


@dataclass
class RestoreState:
    """The rows so far, keyed by canonical key JSON, and what the fold saw on the way.

    ``counts`` holds per op the events applied and the odd cases (``update_of_missing_row``,
    ``delete_of_missing_row``, ``create_of_existing_row``, ``out_of_order``); ``columns`` is the column set of the
    latest row image, in its order: what a new table is created with.
    """

    rows: dict[str, Row] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    columns: tuple[str, ...] = ()
    events: int = 0
    first_ts_us: int | None = None
    last_ts_us: int | None = None
    first: Change | None = None  # the first event folded: a snapshot read when the topic starts with a snapshot
    snapshot_rows: int = 0
    snapshot_first: bool = False  # the snapshot's first-row marker was seen
    snapshot_last: bool = False  # the snapshot's last-row marker was seen: it finished
    truncates: list[tuple[int, str]] = field(default_factory=list)  # (commit time, position) of each t folded


def _merge_image(old: Row | None, after: Mapping[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """The new values of a row from its after image; a placeholder keeps the value known before, if any.

    >>> _merge_image(Row({"id": 1}, {"id": 1, "b": "x"}), {"id": 1, "b": "__debezium_unavailable_value"})
    ({'id': 1, 'b': 'x'}, frozenset())
    >>> _merge_image(None, {"id": 1, "b": "__debezium_unavailable_value"})
    ({'id': 1}, frozenset({'b'}))
    """
    values: dict[str, Any] = {}
    unknown: set[str] = set()
    for c, v in after.items():
        if is_placeholder(v):
            if old is not None and c in old.values:
                values[c] = old.values[c]
            else:
                unknown.add(c)
        else:
            values[c] = v
    return values, frozenset(unknown)


def apply(state: RestoreState, ch: Change) -> None:
    """Fold one change into ``state`` (in place: a million rows are not copied per event).

    A create or snapshot read sets the row, an update sets it too (Debezium's after image is the whole row, so an
    update of a row not known yet still restores it; counted), a delete removes it, a truncate removes every row.
    Unchanged TOAST columns (the placeholder) keep their earlier value, or are marked unavailable.

    >>> s = RestoreState()
    >>> apply(s, Change("u", {"id": 3}, {"id": 3, "n": 1}, 5)); apply(s, Change("d", {"id": 9}, None, 6))
    >>> [r.values for r in s.rows.values()], s.counts["update_of_missing_row"], s.counts["delete_of_missing_row"]
    ([{'id': 3, 'n': 1}], 1, 1)
    """
    at = ch.commit_ts_us
    if state.last_ts_us is not None and at < state.last_ts_us:
        state.counts["out_of_order"] += 1
    else:
        state.last_ts_us = at
    if state.first is None:
        state.first, state.first_ts_us = ch, at
    state.events += 1
    op = ch.op
    state.counts[op] += 1
    rows = state.rows
    if op == "t":
        rows.clear()
        state.truncates.append((at, ch.position))
        return
    if ch.key is None:
        raise ValueError(f"{ch.position}: a {op!r} change without a row key")
    k = canonical_key(ch.key)
    if op == "d":
        if rows.pop(k, None) is None:
            state.counts["delete_of_missing_row"] += 1
        return
    after = ch.after
    if after is None:
        raise ValueError(f"{ch.position}: a {op!r} change without an after image")
    old = rows.get(k)
    if op == "u" and old is None:
        state.counts["update_of_missing_row"] += 1
    elif op == "c" and old is not None:
        state.counts["create_of_existing_row"] += 1
    if op == "r":
        state.snapshot_rows += 1
        if ch.snapshot in FIRST_MARKERS:
            state.snapshot_first = True
        elif ch.snapshot in LAST_MARKERS:
            state.snapshot_last = True
    values, unknown = _merge_image(old, after)
    rows[k] = Row(dict(ch.key), values, unknown)
    if len(after) != len(state.columns) or tuple(after) != state.columns:
        state.columns = tuple(after)


@dataclass
class Fold:
    """The state at the cut, and the event the fold stopped at (None: it read to the end)."""

    state: RestoreState
    stopped_at: Change | None = None


def rows_at(changes: Iterable[Change], at_us: int | None = None, *, before_truncate: bool = False) -> Fold:
    """Fold ``changes`` (in commit order) up to and including commit time ``at_us``, or to the end.

    With ``before_truncate``, it also stops just before the first truncate: the table as it was before it. It
    stops reading at the first event past the cut, so a reader feeding it stops there too.

    >>> ch = [Change("c", {"id": 1}, {"id": 1}, 10), Change("t", None, None, 20), Change("c", {"id": 2}, {"id": 2}, 30)]
    >>> sorted(r.key["id"] for r in rows_at(ch).state.rows.values())
    [2]
    >>> f = rows_at(ch, before_truncate=True); (list(f.state.rows), f.stopped_at.commit_ts_us)
    (['{"id":1}'], 20)
    """
    state = RestoreState()
    limit = at_us if at_us is not None else 2**63
    for ch in changes:
        if ch.commit_ts_us > limit or (before_truncate and ch.op == "t"):
            return Fold(state, ch)
        apply(state, ch)
    return Fold(state)


def unrestorable(state: RestoreState, columns: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """Column -> reason -> rows whose value of that column cannot be restored (over ``columns``, default the last
    known column set); columns that some rows hold but the column set lacks are ``not_in_column_set``.

    >>> s = RestoreState()
    >>> apply(s, Change("c", {"id": 1}, {"id": 1, "old": 2}, 1))
    >>> apply(s, Change("c", {"id": 2}, {"id": 2, "b": "__debezium_unavailable_value", "new": 3}, 2))
    >>> for column, reasons in unrestorable(s).items():
    ...     print(column, reasons)
    b {'missing_from_image': 1, 'toast_placeholder': 1}
    new {'missing_from_image': 1}
    old {'not_in_column_set': 1}
    """
    cols = tuple(state.columns if columns is None else columns)
    wanted = set(cols)
    out: dict[str, Counter[str]] = {}
    for row in state.rows.values():
        values, unknown = row.values, row.unavailable
        if len(values) == len(cols) and not unknown and values.keys() == wanted:
            continue  # the common case: a whole row
        for c in cols:
            if c in unknown:
                out.setdefault(c, Counter())[PLACEHOLDER] += 1
            elif c not in values:
                out.setdefault(c, Counter())[MISSING] += 1
        for c in values.keys() - wanted:
            out.setdefault(c, Counter())["not_in_column_set"] += 1
    return {c: dict(sorted(r.items())) for c, r in sorted(out.items())}


# --- is the whole history there? ------------------------------------------------------------------------------


class PartitionStart(msgspec.Struct, frozen=True):
    """Where one partition of the topic (or a file: ``low`` 0) starts, and its first change event of the table."""

    name: str
    low: int
    first: Change | None


RESTORABLE_SETTINGS: Final = (
    "keep a table restorable: retention.ms=-1 on its topic (keep everything), or cleanup.policy=compact keyed by "
    "the primary key (keeps every row's last image: restores the latest state, not earlier points in time, and "
    "forgets a deleted row after delete.retention.ms); Debezium snapshot.mode=initial so that the topic starts "
    "with a snapshot; tombstones.on.delete=true so that compaction also drops deleted rows"
)


def history_problem(starts: Sequence[PartitionStart], state: RestoreState, *, compacted: bool = False) -> str | None:
    """Why the events read cannot rebuild the whole table (None: they can).

    The history is whole when no partition lost its head to retention (``low`` 0), or when the snapshot it
    starts with is all there: each partition whose head is gone starts with a snapshot read, and the snapshot's
    first and last markers were both read. A snapshot without its last marker never finished. A compacted topic
    keeps every row's latest image under offsets that no longer start at the snapshot: its markers may be gone.

    >>> s = RestoreState()
    >>> apply(s, Change("c", {"id": 1}, {"id": 1}, 1, position="t/0/7"))
    >>> print(history_problem([PartitionStart("t/0", 7, s.first)], s))  # doctest: +ELLIPSIS
    t/0: its offsets before 7 were deleted (retention), and the first one left (t/0/7) is a c, not a snapshot ...
    >>> history_problem([PartitionStart("t/0", 0, s.first)], s) is None
    True
    """
    if state.snapshot_rows and not state.snapshot_last and not compacted:
        return (
            f"the snapshot is incomplete: {state.snapshot_rows:,} snapshot rows read but not its last one "
            "(Debezium marks it source.snapshot=last): the connector stopped during its snapshot"
        )
    for p in starts:
        if p.low == 0:
            continue
        first = p.first
        if first is None or first.op != "r":
            what = "no change event at all" if first is None else f"a {first.op}, not a snapshot read"
            where = "" if first is None else f" ({first.position})"
            return (
                f"{p.name}: its offsets before {p.low:,} were deleted (retention), and the first one left{where} "
                f"is {what}: the rows written before it are lost"
            )
        if not state.snapshot_first and not compacted:
            return (
                f"{p.name}: its offsets before {p.low:,} were deleted (retention), and the snapshot's first row "
                "(source.snapshot=first) is not among the records left: part of the snapshot is lost"
            )
    return None


# --- the report ---------------------------------------------------------------------------------------------


class RestoreReport(Strict):
    """What one ``writeguard restore`` run did (``--report FILE``)."""

    schema_version: Literal[1] = 1
    table: str = Field(description="The table rebuilt, '<schema>.<table>'.")
    into: str = Field(description="Where its rows were written, '<schema>.<table>'.")
    source: str = Field(description="The topic, or the --events file.")
    at: datetime | None = Field(description="The cut: the last commit time applied (None: no event applied).")
    cut: str = Field(description="'at' (--at or --alert), 'before_truncate' or 'end' (every event read).")
    stopped_at: str | None = Field(description="Position of the first event not applied (the truncate, or past --at).")
    events: int = Field(description="Change events folded.")
    ops: dict[str, int] = Field(description="Op -> events folded; and the odd cases (update_of_missing_row, ...).")
    rows: int = Field(description="Rows in the rebuilt table state.")
    rows_inserted: int
    rows_updated: int = Field(description="Rows that existed in the target with other values, and were set.")
    rows_equal: int = Field(description="Rows already equal in the target: left alone.")
    rows_changed: int = Field(description="rows_inserted + rows_updated: 0 on a second run.")
    extra_rows: int = Field(description="Rows in the target that the rebuilt state does not have (left alone).")
    created: bool = Field(description="The target table was created by this run.")
    columns: list[str] = Field(description="The columns written.")
    types_from: str = Field(description="'catalog:<table>' (pg_catalog of that table) or 'inferred' (the values).")
    unrestorable: dict[str, dict[str, int]] = Field(
        description="Column -> reason -> rows without a value for it: toast_placeholder, missing_from_image, "
        "not_in_column_set, unconvertible."
    )
    truncates_seen: int = Field(description="Truncates folded (with --at past them); the one it stopped at excluded.")
    warnings: list[str]
    dry_run: bool
    batches: int
    seconds_read: float
    seconds_write: float
