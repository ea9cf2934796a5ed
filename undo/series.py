"""The review page's charts: per (table, numeric feature), the selected agents' values over commit time, bounded.

A :class:`SeriesCollector` is fed every row change in commit order (``add`` fits a scan's per-event callback) and
keeps, per (table, feature), the points of the agents the selection names: their writes inside the selection
(``selected``) and outside it (before ``since``, a run not selected), which show the reviewer what normal looked
like. Memory stays bounded whatever the scan's length: past ``4 * limit`` points a series is cut back to
``limit`` by :func:`downsample`, which keeps each bucket's extremes, so a spike is never averaged away. The
alert's triggering writes (:class:`AlertMark`, from :func:`alert_marks`) are marked and always kept.

>>> from detectors.spec import FeatureSpec, TableSpec
>>> from undo.events import RowEvent
>>> from undo.models import Selection
>>> from undo.scope import ts
>>> t = TableSpec(name="public.refunds", topic="shop.public.refunds",
...               features=(FeatureSpec(name="amount", column="amount"),))
>>> c = SeriesCollector(Selection(agents=("a1",), since=ts(2_000)), [t])
>>> for n, (who, at, amount) in enumerate([("a1", 1_000, 5), ("bob", 1_500, 9), ("a1", 2_000, 500)]):
...     c.add(RowEvent("public.refunds", {"id": n}, "c", None, {"id": n, "amount": amount}, at, agent_id=who))
>>> [(p.ts_us, p.value, p.selected) for p in c.series()[0].points]
[(1000, 5.0, False), (2000, 500.0, True)]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from detectors.features import as_number, lookup
from detectors.spec import TableSpec
from undo.events import RowEvent, RowOp
from undo.models import Selection
from undo.scope import numeric_columns

DEFAULT_LIMIT = 400  # points per chart: a few KB of SVG each, finer than the chart's pixels anyway
_MARK_SLACK_US = 1_000  # an alert's commit time went through a float: match it to the millisecond
_KAFKA_POSITION = re.compile(r"[A-Za-z0-9._-]+/\d+/\d+")
_FILE_POSITION = re.compile(r"(.*):(\d+)")


@dataclass(frozen=True, slots=True)
class AlertMark:
    """One triggering write of an alert: where and when it was read."""

    table: str
    agent_id: str
    commit_ts_us: int
    position: str | None = None  # 'path:line' (replay) or 'topic/partition/offset'
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class Point:
    """One write's value of one feature; ``key`` and ``position`` say which write, in the point's tooltip."""

    ts_us: int
    value: float
    selected: bool
    op: RowOp
    key: Mapping[str, Any] = field(default_factory=dict)
    position: str = ""
    alerted: bool = False


@dataclass(slots=True)
class Series:
    """A chart's data: ``points`` in commit order, at most about ``limit``; ``total`` says how many there were."""

    table: str
    feature: str
    column: str
    points: list[Point] = field(default_factory=list)
    total: int = 0
    selected_total: int = 0
    agents: list[str] = field(default_factory=list)


class _Trigger(Protocol):
    @property
    def topic(self) -> str | None: ...
    @property
    def partition(self) -> int | None: ...
    @property
    def offset(self) -> int | None: ...
    @property
    def source(self) -> str | None: ...
    @property
    def commit_ts(self) -> datetime: ...
    @property
    def score(self) -> float: ...


class AlertLike(Protocol):
    """What :func:`alert_marks` reads of an alert (``connectors.messages.Alert`` is one)."""

    @property
    def table(self) -> str: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def triggering_events(self) -> Sequence[_Trigger]: ...


def alert_marks(alert: AlertLike) -> list[AlertMark]:
    """The alert's triggering writes, each with its commit time and its position in the form scans write it."""
    out = []
    for t in alert.triggering_events:
        position = t.source
        if position is None and t.topic is not None:
            position = f"{t.topic}/{t.partition}/{t.offset}"
        at = t.commit_ts
        us = int(at.timestamp()) * 1_000_000 + at.microsecond
        out.append(AlertMark(alert.table, alert.agent_id, us, position, t.score))
    return out


def _kind(position: str) -> str:
    if _KAFKA_POSITION.fullmatch(position):
        return "kafka"
    return "file" if _FILE_POSITION.fullmatch(position) else "other"


def same_write(mark: AlertMark, table: str, agent_id: str | None, commit_ts_us: int, position: str) -> bool:
    """Whether a write is the mark's: same table, agent and commit time, and the same position when comparable.

    A file is often named differently by the alert (the path ``replay`` was given) and by the scan, so file
    positions compare by file name and line; positions of different kinds (an alert from Kafka, a scan of a
    file) cannot be compared, and the commit time decides.

    >>> m = AlertMark("public.t", "a1", 5_000_000, "/data/events.jsonl:7")
    >>> same_write(m, "public.t", "a1", 5_000_300, "events.jsonl:7"), same_write(m, "public.t", "a1", 5_000_000, "x:8")
    (True, False)
    >>> same_write(m, "public.t", "a1", 5_000_000, "shop.public.t/0/41")  # another kind: the time decides
    True
    """
    if table != mark.table or agent_id != mark.agent_id or abs(commit_ts_us - mark.commit_ts_us) > _MARK_SLACK_US:
        return False
    if not mark.position or not position:
        return True
    kind = _kind(mark.position)
    if kind != _kind(position):
        return True
    if kind == "file":
        a, b = _FILE_POSITION.fullmatch(mark.position), _FILE_POSITION.fullmatch(position)
        assert a is not None and b is not None  # the kind says they match
        return a.group(2) == b.group(2) and _basename(a.group(1)) == _basename(b.group(1))
    return mark.position == position


def downsample(points: Sequence[Point], limit: int) -> list[Point]:
    """At most ``limit`` points (at least 8) in commit order, keeping the alerted ones and every bucket's extremes.

    The points are cut into buckets of consecutive writes; each bucket keeps the lowest and the highest value of
    its selected writes and of its other writes. So the overall minimum and maximum, of the selected writes and of
    the others, always survive, and so does the shape of the selection next to what preceded it.

    >>> pts = [Point(i, float(v), i >= 50, "c") for i, v in enumerate([3] * 40 + [-7] + [3] * 59)]
    >>> kept = downsample(pts, 10)
    >>> len(kept) <= 10, min(p.value for p in kept), [p.ts_us for p in kept] == sorted(p.ts_us for p in kept)
    (True, -7.0, True)
    """
    limit = max(limit, 8)
    if len(points) <= limit:
        return list(points)
    pinned = [i for i, p in enumerate(points) if p.alerted][: limit // 2]
    buckets = max(1, (limit - len(pinned)) // 4)
    keep = set(pinned)
    size = -(-len(points) // buckets)  # ceiling: every point falls in one of the buckets
    for start in range(0, len(points), size):
        chunk = range(start, min(start + size, len(points)))
        for cls in (True, False):
            mine = [i for i in chunk if points[i].selected is cls]
            if mine:
                keep.add(min(mine, key=lambda i: points[i].value))
                keep.add(max(mine, key=lambda i: points[i].value))
    return [points[i] for i in sorted(keep)]


@dataclass
class SeriesCollector:
    """Collects the chart points of the selection's agents; ``add`` each row change in commit order.

    With no agent named (a selection by run or time only), the agents are those whose writes were selected so far.
    """

    selection: Selection
    tables: Sequence[TableSpec]
    marks: Sequence[AlertMark] = ()
    limit: int = DEFAULT_LIMIT
    _columns: dict[str, list[tuple[str, str, tuple[str, ...]]]] = field(default_factory=dict)
    _series: dict[tuple[str, str], Series] = field(default_factory=dict)
    _agents: dict[str, None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in self.tables:
            cols = [(name, ".".join(keys), keys) for name, keys in numeric_columns(t)]
            if cols:
                self._columns[t.name] = cols
        self._agents = dict.fromkeys(self.selection.agents)

    def add(self, ev: RowEvent) -> None:
        cols = self._columns.get(ev.table)
        if cols is None or ev.agent_id is None:
            return
        known = ev.agent_id in self._agents
        if not known and self.selection.agents:
            return  # another writer: the cheap test first, a scan feeds every event of every writer here
        selected = self.selection.matches(ev.agent_id, ev.run_id, ev.commit_ts_us)
        if not known:
            if not selected:
                return
            self._agents[ev.agent_id] = None
        image = ev.before if ev.op == "d" else ev.after
        alerted = any(same_write(m, ev.table, ev.agent_id, ev.commit_ts_us, ev.position) for m in self.marks)
        for name, column, keys in cols:
            value = as_number(lookup(image, keys))
            if value is None:
                continue
            s = self._series.get((ev.table, name))
            if s is None:
                s = self._series[(ev.table, name)] = Series(ev.table, name, column)
            s.points.append(Point(ev.commit_ts_us, value, selected, ev.op, ev.key, ev.position, alerted))
            s.total += 1
            s.selected_total += selected
            if len(s.points) > 4 * self.limit:
                s.points = downsample(s.points, self.limit)

    def series(self) -> list[Series]:
        """Every chart with points, in the config's table and feature order, each downsampled to ``limit``."""
        out = []
        for t in self.tables:
            for name, _, _ in self._columns.get(t.name, ()):
                s = self._series.get((t.name, name))
                if s is not None:
                    s.points = downsample(sorted(s.points, key=lambda p: p.ts_us), self.limit)
                    s.agents = list(self._agents)
                    out.append(s)
        return out


def collect(
    events: Iterable[RowEvent],
    selection: Selection,
    tables: Sequence[TableSpec],
    marks: Sequence[AlertMark] = (),
    limit: int = DEFAULT_LIMIT,
) -> list[Series]:
    """The charts of a whole event sequence (in commit order) at once."""
    c = SeriesCollector(selection, tables, marks, limit)
    for ev in events:
        c.add(ev)
    return c.series()


def _basename(path: str) -> str:
    # A file name from a position's path, by text: undo/ touches no file system.
    return path.rsplit("/", 1)[-1]
