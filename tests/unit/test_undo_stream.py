"""Scope as a stream: the reader's hold queue, the same results as a whole-input read, bounded state, the tap,
relative times (connectors/undo_source.py, undo/scope.py, stream/undo_cli.py)."""

from __future__ import annotations

import argparse
import base64
import json
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connectors.undo_source import ReadStats, UndoReader, iter_events_file, peek_commit_us, split_line
from detectors.spec import FeatureSpec, TableSpec
from stream import cli
from stream.undo_cli import _scope, _when
from undo.events import TOAST_PLACEHOLDER as TOAST
from undo.events import RowEvent
from undo.models import Selection
from undo.scope import build_scope, matcher, ts

T0_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
S = 1_000_000
REFUNDS = TableSpec(
    name="public.refunds",
    topic="shop.public.refunds",
    key_columns=("id",),
    features=(FeatureSpec(name="amount", column="amount"),),
)
NOTES = TableSpec(name="public.notes", topic="shop.public.notes", key_columns=("id",), agent_id="row.author")
TABLES = [REFUNDS, NOTES]


def change(op, table, before, after, at_us, tx, lsn=None):
    return {
        "op": op,
        "before": before,
        "after": after,
        "source": {"schema": "public", "table": table, "ts_us": at_us, "txId": tx, "lsn": lsn or at_us},
    }


def message(agent, run, tx, at_us, **meta):
    body = json.dumps({"agent_id": agent, "run_id": run, **meta}).encode()
    return {
        "op": "m",
        "source": {"ts_us": at_us, "txId": tx, "lsn": at_us},
        "message": {"prefix": "writeguard", "content": base64.b64encode(body).decode()},
    }


def refund(i, amount, **more):
    return {"id": i, "amount": amount, "reason": "late", **more}


def raw(x) -> bytes:
    return json.dumps(x).encode()


def reader(**kw) -> UndoReader:
    return UndoReader(TABLES, message_prefix="writeguard", **kw)


# A history with everything the streaming must keep right: a transaction whose message comes after its rows while
# other writers' rows come in between, interleaved writers on the same rows, a key the agent deleted and a human
# reused, a row the agent names in its own column, and rows before the agent.
HISTORY = [
    change("c", "refunds", None, refund(1, 10), T0_US + 1 * S, 100),  # a human, before the agent
    change("c", "refunds", None, refund(2, 20), T0_US + 2 * S, 101),
    message("other", "o-1", 101, T0_US + 2 * S),
    change("u", "refunds", refund(1, 10), refund(1, 900), T0_US + 10 * S, 200),  # the agent's tx 200 ...
    change("c", "refunds", None, refund(3, 30), T0_US + 10 * S, 200),
    change("u", "refunds", refund(2, 20), refund(2, 21), T0_US + 10 * S, 201),  # ... another writer's in between
    message("rogue", "run-7", 200, T0_US + 10 * S, version="2.1"),  # ... then the agent's message
    change("d", "refunds", refund(2, 21), None, T0_US + 11 * S, 202),
    message("rogue", "run-7", 202, T0_US + 11 * S),
    change("c", "refunds", None, refund(2, 5), T0_US + 12 * S, 203),  # a human reuses the deleted key
    change("u", "refunds", refund(3, 30), refund(3, 31), T0_US + 13 * S, 204),
    message("other", "o-1", 204, T0_US + 13 * S),  # another agent writes the agent's row afterwards
    change("c", "notes", None, {"id": 9, "author": "rogue", "text": "x"}, T0_US + 14 * S, 205),
    change("u", "refunds", refund(1, 900), refund(1, 901), T0_US + 30 * S, 300),  # a human, much later
]


def history_file(tmp_path: Path, lines=HISTORY) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def whole_input(lines) -> list[RowEvent]:
    """The oracle: attribution with the whole input in hand (every message known before any row is named)."""
    names = {}
    for x in lines:
        if x["op"] == "m":
            body = json.loads(base64.b64decode(x["message"]["content"]))
            names.setdefault(str(x["source"]["txId"]), body)
    out = []
    for n, x in enumerate(lines, 1):
        if x["op"] == "m":
            continue
        table = f"public.{x['source']['table']}"
        row = x["before"] if x["op"] == "d" else x["after"]
        agent = row.get("author") if table == "public.notes" else None
        run, meta = None, {}
        tx = str(x["source"]["txId"])
        if agent is None and tx in names:
            body = names[tx]
            agent, run = body["agent_id"], body["run_id"]
            meta = {k: v for k, v in body.items() if k not in ("agent_id", "run_id")}
        src = x["source"]
        pos = f"{{path}}:{n}"
        ev = (table, {"id": row["id"]}, x["op"], x["before"], x["after"], src["ts_us"], tx, agent, run, pos, src["lsn"])
        out.append((ev, meta))
    return out


def events_of(oracle, path: Path) -> list[RowEvent]:
    return [RowEvent(*ev[:9], ev[9].format(path=path), ev[10], meta) for ev, meta in oracle]


def stream(path: Path, r: UndoReader | None = None, **kw) -> Iterator[RowEvent]:
    return iter_events_file(path, r or reader(), ReadStats(), **kw)


# --- the same scope as a whole-input read ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection",
    [
        Selection(agents=("rogue",)),
        Selection(runs=("run-7",)),
        Selection(agents=("other",)),
        Selection(since=ts(T0_US + 11 * S)),
        Selection(agents=("rogue",), until=ts(T0_US + 11 * S)),
    ],
)
def test_streaming_gives_the_scope_of_a_whole_input_read(tmp_path, selection) -> None:
    path = history_file(tmp_path)
    expected = build_scope(events_of(whole_input(HISTORY), path), selection, TABLES)
    got = build_scope(stream(path), selection, TABLES)
    assert got == expected
    assert got.rows  # every selection here selects something: the comparison is not of two empty scopes


def test_the_history_scope_has_its_conflicts_and_attribution(tmp_path) -> None:
    scope = build_scope(stream(history_file(tmp_path)), Selection(agents=("rogue",)), TABLES)
    by_key = {(r.table, r.key["id"]): r for r in scope.rows}
    assert set(by_key) == {("public.refunds", 1), ("public.refunds", 2), ("public.refunds", 3), ("public.notes", 9)}
    # The message after the rows named them, and kept the run's metadata.
    assert [(w.agent_id, w.run_id) for w in by_key["public.refunds", 1].writes] == [("rogue", "run-7")]
    assert [(r.run_id, r.metadata) for r in scope.runs if r.run_id] == [("run-7", {"version": "2.1"})]
    # Interleaved writers: the other writer's update before the agent's delete is no conflict; the key reuse is.
    assert [(w.op, w.agent_id) for w in by_key["public.refunds", 2].later] == [("c", None)]
    assert [(w.op, w.agent_id) for w in by_key["public.refunds", 3].later] == [("u", "other")]
    assert [(w.op, w.agent_id) for w in by_key["public.refunds", 1].later] == [("u", None)]
    assert by_key["public.refunds", 2].first_before == refund(2, 21)


def test_build_scope_reads_a_one_shot_iterator_once_as_it_comes(tmp_path) -> None:
    events = events_of(whole_input(HISTORY), history_file(tmp_path))
    seen: list[int] = []

    def gen() -> Iterator[RowEvent]:
        for ev in events:
            seen.append(ev.commit_ts_us)
            yield ev

    assert build_scope(gen(), Selection(agents=("rogue",)), TABLES) == build_scope(
        events, Selection(agents=("rogue",)), TABLES
    )
    assert seen == [e.commit_ts_us for e in events]


# --- the reader's hold queue ----------------------------------------------------------------------------------


def test_a_row_waiting_for_its_message_holds_the_rows_behind_it_and_the_order_stays() -> None:
    r = reader()
    r.feed(None, raw(change("c", "refunds", None, refund(1, 1), T0_US, 7)), "f:1")
    r.feed(None, raw(change("c", "refunds", None, refund(2, 2, agent_id="x"), T0_US + 1, 8)), "f:2")
    r.feed(None, raw(change("u", "notes", None, {"id": 3, "author": "bob"}, T0_US + 2, 9)), "f:3")
    assert r.take() == []  # the first row waits for transaction 7's message; the others stay behind it
    r.feed(None, raw(message("rogue", "r1", 7, T0_US)), "f:4")
    out = r.take()
    assert [(e.position, e.agent_id) for e in out] == [("f:1", "rogue"), ("f:2", "x"), ("f:3", "bob")]


def test_a_row_whose_message_does_not_come_within_the_hold_goes_on_unattributed() -> None:
    r = reader(hold_s=5.0)
    r.feed(None, raw(change("c", "refunds", None, refund(1, 1), T0_US, 7)), "f:1")
    r.feed(None, raw(change("c", "refunds", None, refund(2, 2), T0_US + 4 * S, 8)), "f:2")
    assert r.take() == []  # 4 s of commit time later: both still wait
    r.feed(None, raw(change("c", "notes", None, {"id": 3, "author": "bob"}, T0_US + 6 * S, 9)), "f:3")
    assert [(e.position, e.agent_id) for e in r.take()] == [("f:1", None)]  # past its hold; f:2 is not yet
    r.feed(None, raw(message("rogue", "r1", 7, T0_US + 6 * S)), "f:4")  # too late, as for the worker
    r.feed(None, raw(message("rogue", "r1", 8, T0_US + 6 * S)), "f:5")
    assert [(e.position, e.agent_id) for e in r.take()] == [("f:2", "rogue"), ("f:3", "bob")]
    assert r.finish() == []


def test_the_hold_queue_is_bounded_whatever_the_input() -> None:
    r = reader(max_held=100)
    for i in range(130):  # one commit time, no message ever: nothing expires by time
        r.feed(None, raw(change("c", "refunds", None, refund(i, 1), T0_US, 1000 + i)), f"f:{i}")
    out = r.take()
    assert len(out) == 30 and all(e.agent_id is None for e in out)
    assert [e.position for e in out] == [f"f:{i}" for i in range(30)]
    assert len(r.finish()) == 100


def test_rows_named_by_their_column_and_without_a_message_prefix_never_wait() -> None:
    r = UndoReader(TABLES)  # no worker.agent_messages: no row waits
    r.feed(None, raw(change("c", "refunds", None, refund(1, 1), T0_US, 7)), "f:1")
    assert [e.agent_id for e in r.take()] == [None]
    r = reader()
    r.feed(None, raw(change("c", "notes", None, {"id": 3, "author": "bob"}, T0_US, 9)), "f:1")
    assert [e.agent_id for e in r.take()] == ["bob"]


def test_the_reader_counts_rows_out_of_commit_order() -> None:
    r = UndoReader(TABLES)
    for n, at in enumerate([5, 9, 7, 9, 10], 1):
        r.feed(None, raw(change("c", "refunds", None, refund(n, 1), T0_US + at * S, n)), f"f:{n}")
    assert len(r.take()) == 5 and (r.out_of_order, r.first_out_of_order) == (1, "f:3")


# --- what a scan keeps --------------------------------------------------------------------------------------


def others(n: int, at_us: int, table: str = "public.refunds") -> Iterator[RowEvent]:
    """``n`` rows created by a writer outside the selection, each its own row, 1 µs apart."""
    for i in range(n):
        yield RowEvent(table, {"id": i}, "c", None, refund(i, i, note="n" * 200), at_us + i, f"t{i}", "bob")


def peak_bytes(events: Iterator[RowEvent], selection: Selection, **kw) -> int:
    tracemalloc.start()
    try:
        build_scope(events, selection, TABLES, **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_unselected_rows_before_the_window_leave_no_state() -> None:
    selection = Selection(agents=("rogue",), since=ts(T0_US + 100 * S))
    before = peak_bytes(others(20_000, T0_US), selection)
    inside = peak_bytes(others(20_000, T0_US + 100 * S), selection)  # the control: the same rows in the window
    assert before < 300_000, before
    assert inside > 4_000_000, inside  # the last images of rows others wrote in the window are kept...
    capped = peak_bytes(others(20_000, T0_US + 100 * S), selection, max_known=500)
    assert capped < 1_000_000, capped  # ... at most max_known of them


def test_a_prior_image_from_inside_the_window_is_used_and_one_forgotten_is_not() -> None:
    big = "x" * 5_000
    events = [
        RowEvent("public.refunds", {"id": 1}, "c", None, refund(1, 1, body=big), T0_US, "t1", "bob"),
        *others(10, T0_US + 1, "public.notes"),
        RowEvent("public.refunds", {"id": 1}, "u", None, refund(1, 2, body=TOAST), T0_US + 100, "t2", "rogue"),
    ]
    [row] = build_scope(events, Selection(agents=("rogue",)), TABLES).rows
    assert row.last_after is not None and row.last_after["body"] == big
    [row] = build_scope(events, Selection(agents=("rogue",)), TABLES, max_known=5).rows
    assert row.last_after is not None and row.last_after["body"] == TOAST


def test_the_compiled_selection_matches_as_the_model_does() -> None:
    at = [T0_US - 1, T0_US, T0_US + 5, T0_US + 10, T0_US + 11]
    who = [("a", "r1"), ("a", None), ("b", "r1"), (None, None), (None, "r2")]
    for sel in [
        Selection(agents=("a",)),
        Selection(runs=("r1",)),
        Selection(agents=("a", "b"), runs=("r1",)),
        Selection(since=ts(T0_US), until=ts(T0_US + 10)),
        Selection(agents=("a",), since=ts(T0_US + 5)),
    ]:
        m = matcher(sel)
        assert [m(g, r, t) for g, r in who for t in at] == [sel.matches(g, r, t) for g, r in who for t in at]


# --- files --------------------------------------------------------------------------------------------------


def test_lines_before_the_start_are_skipped_by_their_commit_time_alone(tmp_path) -> None:
    lines = [json.dumps(change("c", "refunds", None, refund(i, i), T0_US + i * S, i)) for i in range(5)]
    lines[1] = json.dumps({"op": "c", "source": {"ts_us": T0_US + S}})  # undecodable (no after), but early
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    out = list(iter_events_file(path, reader(), stats, start_us=T0_US + 3 * S))
    assert [e.key["id"] for e in out] == [3, 4]
    assert stats.before_window == 3 and not stats.undecodable and stats.lines == 5
    stats = ReadStats()
    assert len(list(iter_events_file(path, reader(), stats))) == 4 and stats.undecodable == {"missing_row": 1}


def test_peek_reads_the_commit_time_as_decode_does() -> None:
    assert peek_commit_us(raw(change("c", "refunds", None, refund(1, 1), 7, 1))) == 7
    assert peek_commit_us(raw({"payload": {"source": {"ts_ns": 5_000, "ts_ms": 9}}})) == 5
    assert peek_commit_us(raw({"op": "c", "ts_ms": 4})) is None  # no source: decode falls back, peek does not
    assert peek_commit_us(None) is None and peek_commit_us(b'{"source": 5}') is None


def test_split_line_keeps_key_and_value_bytes_and_refuses_other_shapes() -> None:
    assert split_line(b'{"key": {"id": 1}, "value": null}') == (b'{"id": 1}', None)
    assert split_line(b'{"key": null, "value": {"op": "d"}, "x": 1}') == (
        None,
        b'{"key": null, "value": {"op": "d"}, "x": 1}',
    )
    assert split_line(b"null") == (None, None)


# --- the command line: relative times and the tap -----------------------------------------------------------


def test_relative_times_are_before_now() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert _when("90s", now) == now - timedelta(seconds=90)
    assert _when("30m", now) == now - timedelta(minutes=30)
    assert _when("1h", now) == now - timedelta(hours=1)
    assert _when("7d", now) == now - timedelta(days=7)
    assert _when("1d12h", now) == now - timedelta(hours=36)
    assert _when("2026-03-01T10:00:00+01:00") == datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    for bad in ("5x", "h1", "-1h", "yesterday"):
        with pytest.raises(argparse.ArgumentTypeError):
            _when(bad, now)


CONFIG = """
tables:
  - name: public.refunds
    topic: shop.public.refunds
    key_columns: [id]
    features:
      - {name: amount, column: amount}
  - name: public.notes
    topic: shop.public.notes
    key_columns: [id]
    agent_id: row.author
worker:
  agent_messages:
    topic: shop.message
"""


def recent_history(now_us: int) -> list[dict]:
    """The agent's writes two hours ago and twenty minutes ago; a human's after both."""
    old, new = now_us - 7_200 * S, now_us - 1_200 * S
    return [
        change("c", "refunds", None, refund(1, 100), old, 1),
        message("rogue", "r1", 1, old),
        change("c", "refunds", None, refund(2, 200), new, 2),
        message("rogue", "r1", 2, new),
        change("u", "refunds", refund(2, 200), refund(2, 201), new + S, 3),
    ]


def test_scope_since_a_relative_time_selects_only_the_recent_writes(tmp_path, capsys) -> None:
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    events = history_file(tmp_path, recent_history(now_us))
    config = tmp_path / "wg.yaml"
    config.write_text(CONFIG)
    code = cli.main(["scope", "--events", str(events), "-c", str(config), "--agent", "rogue", "--since", "1h"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "public.refunds: 1 rows created, amount +200.00" in out.splitlines()
    assert "1 of 2 events selected, 1 rows, 1 conflicts" in out.splitlines()
    assert "(2 lines before --since skipped)" in err
    code = cli.main(["scope", "--events", str(events), "-c", str(config), "--since", "1h", "--until", "2h"])
    assert code == 2 and "is not before --until" in capsys.readouterr().err


def test_the_tap_sees_every_row_change_read_in_commit_order_and_the_scope_its_window(tmp_path, capsys) -> None:
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    lines = recent_history(now_us)
    events = history_file(tmp_path, lines)
    config = tmp_path / "wg.yaml"
    config.write_text(CONFIG)
    argv = ["scope", "--events", str(events), "-c", str(config), "--agent", "rogue", "--since", "1h"]
    args = cli.parser().parse_args(argv)
    seen: list[RowEvent] = []
    _, scope = _scope(args, tap=seen.append)
    assert [(e.key["id"], e.op, e.agent_id) for e in seen] == [(1, "c", "rogue"), (2, "c", "rogue"), (2, "u", None)]
    assert [e.commit_ts_us for e in seen] == sorted(e.commit_ts_us for e in seen)
    assert scope.events_read == 2 and [r.key for r in scope.rows] == [{"id": 2}]
    _, without = _scope(args)
    assert without == scope  # the tap changes what is read, not the scope
    assert "lines before --since skipped" in capsys.readouterr().err


def test_out_of_order_input_is_warned_about(tmp_path, capsys) -> None:
    lines = [change("c", "refunds", None, refund(i, 1), T0_US + at * S, i) for i, at in enumerate([1, 5, 3])]
    events = history_file(tmp_path, lines)
    config = tmp_path / "wg.yaml"
    config.write_text(CONFIG)
    assert cli.main(["scope", "--events", str(events), "-c", str(config), "--since", "2026-01-01T00:00:00Z"]) == 0
    assert f"1 row changes came after a later commit (first at {events}:3)" in capsys.readouterr().err


def test_rows_of_a_signed_undo_transaction_are_the_undos_whatever_their_agent_column_says() -> None:
    import base64
    import json

    from connectors.messages import UNDO_AGENT, undo_signature
    from connectors.undo_source import UndoReader
    from detectors.spec import TableSpec

    key = b"k" * 32

    def msg(tx: int, signing: bytes) -> bytes:
        body = {"agent_id": UNDO_AGENT, "run_id": "plan-1",
                "undo": {"plan_id": "plan-1", "batch": 1, "signature": undo_signature(signing, "plan-1", tx)}}
        content = base64.b64encode(json.dumps(body).encode()).decode()
        return json.dumps({"op": "m", "source": {"ts_ms": 5, "txId": tx},
                           "message": {"prefix": "wg", "content": content}}).encode()

    def row(tx: int, i: int) -> bytes:
        # An undo's delete of a row the rogue created: the before image names the rogue.
        return json.dumps({"op": "d", "before": {"id": i, "agent_id": "rogue"}, "after": None,
                           "source": {"schema": "public", "table": "t", "ts_ms": 5, "txId": tx}}).encode()

    spec = TableSpec(name="public.t", topic="db.public.t", key_columns=("id",))
    r = UndoReader([spec], message_prefix="wg", undo_keys=(key,))
    r.feed(None, msg(9, key), "f:1")
    r.feed(None, row(9, 1), "f:2")
    r.feed(None, msg(10, b"x" * 32), "f:3")  # signed with another key: a writer posing as the undo
    r.feed(None, row(10, 2), "f:4")
    got = {e.key["id"]: (e.agent_id, e.run_id) for e in [*r.take(), *r.finish()]}
    assert got == {1: (UNDO_AGENT, "plan-1"), 2: ("rogue", None)}, got
