"""The fold of ``writeguard restore`` (undo/restore.py) and its decoding edge, without any real part."""

from __future__ import annotations

import json

from connectors.debezium import decode
from connectors.restore_pg import ChangeReader, infer_type, snapshot_marker
from undo.events import TOAST_PLACEHOLDER
from undo.restore import (
    Change,
    PartitionStart,
    RestoreState,
    apply,
    history_problem,
    rows_at,
    unrestorable,
)


def c(op: str, i: int | None, ts: int, **values: object) -> Change:
    key = None if i is None else {"id": i}
    after = None if op in ("d", "t") or i is None else {"id": i, **values}
    return Change(op, key, after, ts, position=f"p/0/{ts}")  # type: ignore[arg-type]


def table(state: RestoreState) -> dict[int, dict[str, object]]:
    return {r.key["id"]: r.values for r in state.rows.values()}


def test_events_apply_in_the_order_given_so_the_last_write_of_a_row_wins() -> None:
    events = [c("r", 1, 1, n=1), c("u", 1, 2, n=2), c("u", 1, 3, n=3)]
    assert table(rows_at(events).state) == {1: {"id": 1, "n": 3}}
    assert table(rows_at(list(reversed(events))).state) == {1: {"id": 1, "n": 1}}


def test_events_out_of_commit_order_are_counted() -> None:
    s = rows_at([c("c", 1, 5, n=1), c("c", 2, 3, n=1)]).state
    assert s.counts["out_of_order"] == 1


def test_an_update_of_a_row_not_known_restores_it_from_its_after_image_and_is_counted() -> None:
    s = rows_at([c("u", 7, 1, n=5)]).state
    assert table(s) == {7: {"id": 7, "n": 5}}
    assert s.counts["update_of_missing_row"] == 1


def test_a_delete_removes_the_row_and_a_delete_of_an_unknown_row_is_counted() -> None:
    s = rows_at([c("c", 1, 1, n=1), c("c", 2, 2, n=2), c("d", 1, 3), c("d", 9, 4)]).state
    assert table(s) == {2: {"id": 2, "n": 2}}
    assert s.counts["delete_of_missing_row"] == 1


def test_a_truncate_empties_the_table_state_at_its_point() -> None:
    s = rows_at([c("c", 1, 1), c("t", None, 2), c("c", 2, 3)]).state
    assert list(table(s)) == [2]
    assert s.truncates == [(2, "p/0/2")]


def test_the_default_cut_stops_just_before_the_first_truncate() -> None:
    f = rows_at([c("c", 1, 1), c("c", 2, 2), c("t", None, 3), c("c", 3, 4), c("t", None, 5)], before_truncate=True)
    assert sorted(table(f.state)) == [1, 2]
    assert f.stopped_at is not None and f.stopped_at.op == "t" and f.stopped_at.commit_ts_us == 3
    assert f.state.truncates == []


def test_the_at_cut_includes_its_own_commit_time_and_nothing_after() -> None:
    events = [c("c", 1, 10, n=1), c("u", 1, 20, n=2), c("u", 1, 30, n=3)]
    assert table(rows_at(events, at_us=20).state) == {1: {"id": 1, "n": 2}}
    assert table(rows_at(events, at_us=19).state) == {1: {"id": 1, "n": 1}}
    assert rows_at(events, at_us=9).state.rows == {}
    assert rows_at(events, at_us=20).stopped_at == events[2]


def test_an_unavailable_placeholder_keeps_the_earlier_value() -> None:
    s = rows_at([c("r", 1, 1, big="x" * 5000, n=1), c("u", 1, 2, big=TOAST_PLACEHOLDER, n=2)]).state
    assert table(s) == {1: {"id": 1, "big": "x" * 5000, "n": 2}}
    assert unrestorable(s) == {}


def test_an_unavailable_placeholder_without_an_earlier_value_is_reported_never_restored_as_text() -> None:
    s = rows_at([c("u", 1, 2, big=TOAST_PLACEHOLDER, n=2)]).state
    assert table(s) == {1: {"id": 1, "n": 2}}
    assert unrestorable(s) == {"big": {"toast_placeholder": 1}}


def test_columns_missing_from_an_older_image_are_reported() -> None:
    s = rows_at([c("c", 1, 1, n=1), c("c", 2, 2, n=2, added=True)]).state
    assert s.columns == ("id", "n", "added")
    assert unrestorable(s) == {"added": {"missing_from_image": 1}}


def test_a_partition_whose_head_was_deleted_and_starts_with_a_write_is_a_gap() -> None:
    s = rows_at([c("u", 1, 5)]).state
    problem = history_problem([PartitionStart("t/0", 100, s.first)], s)
    assert problem is not None and "offsets before 100 were deleted" in problem and "a u, not a snapshot" in problem


def test_a_partition_whose_head_was_deleted_but_starts_with_a_whole_snapshot_is_restorable() -> None:
    s = RestoreState()
    apply(s, Change("r", {"id": 1}, {"id": 1}, 1, "t/0/100", snapshot="first"))
    apply(s, Change("r", {"id": 2}, {"id": 2}, 1, "t/0/101", snapshot="last"))
    assert history_problem([PartitionStart("t/0", 100, s.first)], s) is None


def test_a_snapshot_without_its_last_row_is_incomplete() -> None:
    s = RestoreState()
    apply(s, Change("r", {"id": 1}, {"id": 1}, 1, "t/0/0", snapshot="first"))
    apply(s, Change("r", {"id": 2}, {"id": 2}, 1, "t/0/1", snapshot="true"))
    problem = history_problem([PartitionStart("t/0", 0, s.first)], s)
    assert problem is not None and "snapshot is incomplete" in problem
    assert history_problem([PartitionStart("t/0", 0, s.first)], s, compacted=True) is None


def test_a_topic_from_offset_zero_without_a_snapshot_is_not_refused() -> None:
    s = rows_at([c("c", 1, 1)]).state
    assert history_problem([PartitionStart("t/0", 0, s.first)], s) is None


def test_the_reader_keeps_snapshot_markers_truncates_and_skips_other_tables_and_messages() -> None:
    r = ChangeReader("public.t")

    def value(op: str, table: str = "t", **extra: object) -> bytes:
        src = {"schema": "public", "table": table, "ts_us": 5, "snapshot": extra.pop("snapshot", "false")}
        return json.dumps({"op": op, "source": src, **extra}).encode()

    snap = value("r", after={"id": 1}, snapshot="last")
    got = r.change(decode(snap), b'{"id": 1}', snap, "x:1")
    assert got is not None and got.op == "r" and got.snapshot == "last" and got.key == {"id": 1}
    trunc = value("t")
    t = r.change(decode(trunc), None, trunc, "x:2")
    assert t is not None and t.op == "t" and t.key is None
    other = value("c", table="u", after={"id": 1})
    assert r.change(decode(other), b'{"id": 1}', other, "x:3") is None
    assert r.skipped["other_table"] == 1
    assert snapshot_marker(b'{"payload": {"source": {"snapshot": "first"}}}') == "first"


def test_inferred_types_follow_the_values() -> None:
    assert infer_type([True, False]) == "boolean"
    assert infer_type([1, 2, None]) == "bigint"
    assert infer_type([1, 2.5]) == "double precision"
    assert infer_type([[1], {"a": 1}]) == "jsonb"
    assert infer_type(["a", 1]) == "text"
    assert infer_type([None]) == "text"
