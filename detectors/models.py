"""Online detectors, one small class per idea, with River's verbs.

Every detector has ``learn_one(w)``, ``score_one(w) -> float`` (a score in [0, 1], higher is stranger) and
``explain(w) -> list[Contribution]``, over one :class:`~detectors.write.Write`: the numeric features ``w.x``,
the Debezium op code ``w.op``, the commit time ``w.t`` in seconds, the categorical columns, the idempotency
key and the transaction id. Each detector reads the fields its idea needs.
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from river import stats

from detectors.write import Write

Features = Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Contribution:
    """One feature's observed value against what the model expected: what a human reads first."""

    feature: str
    value: float
    expected_low: float | None
    expected_high: float | None
    z: float | None = None
    text: str | None = None  # the finding in words and the column's units, where the numbers alone mislead


def num(v: float) -> str:
    """A number for people: integers without decimals, thousands separated, huge ones in exponent form.

    >>> num(1201.0), num(16.4321), num(-0.5), num(3.2e9)
    ('1,201', '16.43', '-0.50', '3.2e+09')
    """
    if abs(v) >= 1e6:
        return f"{v:.3g}"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.2f}"


OP_NAMES = {"c": "inserts", "u": "updates", "d": "deletes", "t": "truncates", "r": "snapshot reads"}


def pct(v: float) -> str:
    return f"{100 * v:.0f}%"


class Detector(Protocol):
    """What the engine calls on every detector, as River does: score a write first, then learn from it.

    >>> g = RateCeiling(max_events=1)
    >>> w = Write(op="c", t=0.0)
    >>> g.score_one(w), g.learn_one(w), g.score_one(w), g.explain(w)[0].value
    (0.0, None, 1.0, 2.0)
    """

    n: int  # events learned

    def learn_one(self, w: Write) -> None: ...
    def score_one(self, w: Write) -> float: ...
    def explain(self, w: Write) -> list[Contribution]: ...


def signed_log1p(v: float) -> float:
    return math.copysign(math.log1p(abs(v)), v)


def signed_expm1(v: float) -> float:
    return math.copysign(math.expm1(abs(v)), v)


# On the per-write paths below, max() and min() of two floats are spelled as conditional expressions: each builtin
# call packs its arguments in a tuple, and these run for every feature of every write. ``max(a, b)`` is
# ``b if b > a else a`` and ``min(a, b)`` is ``b if b < a else a``: the same value, ties and signed zeros included.

# The 0.999 quantile of the standard normal: the level at which a Student-t range is compared with it.
_Z999 = 3.090232306167813


def t_over_z(df: int) -> float:
    """How much wider a Student-t range with ``df`` degrees of freedom is than the normal one, at the 0.999 level.

    The Cornish-Fisher expansion of the t quantile (Abramowitz and Stegun 26.7.5): within 2% of the exact
    quantile from df = 5 on and 0.3% from df = 9; below 5 it understates the width, still far above 1.

    >>> round(t_over_z(29), 2), round(t_over_z(100_000), 3)
    (1.1, 1.0)
    """
    if df >= 100_000:
        return 1.0
    z = _Z999
    nu = float(max(df, 1))
    t = z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
    t += (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3)
    return t / z


@lru_cache(maxsize=64)  # past the table: a population model's n, scored for several features and agents in a row
def _widen_exact(n: int) -> float:
    return t_over_z(n - 1) * math.sqrt(1 + 1 / n)


# Precomputed for the first writes, where it matters and where every agent's model is scored: a table at import.
_WIDEN = tuple(_widen_exact(n) for n in range(1, 4097))


def _widen(n: int) -> float:
    """Student-t over normal width at ``n`` observations, with the mean's own uncertainty: on every score."""
    return _WIDEN[n - 1] if 0 < n <= 4096 else _widen_exact(max(n, 1))


class ZScore:
    """Per-feature running mean and variance; the score is the largest |z| squashed into [0, 1].

    Each feature keeps a River ``stats.Var`` (Welford): about 1 KB per agent and well under a
    microsecond per feature, where a default HalfSpaceTrees holds ~1.5 MB. ``log_features`` are
    compared as sign(x)*log1p(|x|), so a heavy-tailed amount is judged on its order of magnitude.
    The score is ``z / (z + half_z)``: 0.5 at ``half_z`` standard deviations, 0.7 at 2.33 times that.

    >>> m = ZScore(log_features={"amount"})
    >>> for i in range(50):
    ...     m.learn_one(Write({"amount": 20.0 + i % 5}))
    >>> m.score_one(Write({"amount": 22.0})) < 0.5
    True
    >>> m.score_one(Write({"amount": 450.0})) > 0.7
    True
    >>> m.explain(Write({"amount": 450.0}))[0].feature
    'amount'
    """

    __slots__ = ("_log", "_min_count", "_min_std", "_only", "_prior_writes", "_stats", "half_z", "n", "prior", "spread")

    def __init__(
        self,
        features: Iterable[str] | None = None,
        log_features: Iterable[str] = (),
        half_z: float = 4.0,
        min_std: float = 0.05,
        min_count: int = 2,
        prior_writes: float = 0.0,
    ) -> None:
        self._only = frozenset(features) if features is not None else None
        self._log = frozenset(log_features)
        self.half_z = half_z
        self._min_std = min_std
        # Per feature: a feature seen only on some ops (an update's delta) warms up more slowly than the rest.
        self._min_count = max(min_count, 2)
        self._stats: dict[str, stats.Var] = {}
        self.n = 0
        self._prior_writes = prior_writes
        # The table's population model (set by the engine): where an agent with few writes borrows its spread.
        self.prior: ZScore | None = None
        # On a population model: each agent's deviations from its own running mean, pooled over the fleet. That is
        # the typical within-agent spread, tails included, which the fleet-wide variance (agents' levels differ)
        # would overstate.
        self.spread: dict[str, stats.Var] = {}

    def _value(self, name: str, v: float) -> float:
        return signed_log1p(v) if name in self._log else v

    def _std(self, name: str, s: stats.Var) -> float:
        n = s.mean.n
        var = s.get()
        var = 0.0 if 0.0 > var else var  # max(var, 0.0)
        prior = self.prior
        if prior is not None and self._prior_writes > 0:
            pooled = prior.spread.get(name)
            # Only a prior from a good many deviations: a handful from the first agents says little more.
            if pooled is not None and pooled.mean.n >= 4 * self._prior_writes:
                # Shrinkage: with n0 = prior_writes, the estimate is the fleet's until n0 writes, then the agent's.
                w0 = self._prior_writes / (self._prior_writes + n)
                pvar = pooled.get()
                var = w0 * (0.0 if 0.0 > pvar else pvar) + (1 - w0) * var
        # The predictive range of a new value from n observations: Student-t with n-1 degrees of freedom, and
        # the mean's own uncertainty (1 + 1/n), so that 30 writes give a wider range than 3,000 (_widen, inlined:
        # this runs for every feature of every write).
        k = int(n)
        widen = _WIDEN[k - 1] if 0 < k <= 4096 else _widen_exact(max(k, 1))
        std = math.sqrt(var) * widen
        return self._min_std if self._min_std > std else std  # max(std, min_std)

    def _z(self, name: str, v: float) -> float | None:
        s = self._stats.get(name)
        if s is None or s.mean.n < self._min_count:
            return None
        return (self._value(name, v) - s.mean.get()) / self._std(name, s)

    def learn_one(self, w: Write) -> None:
        only = self._only
        prior = self.prior
        log = self._log
        by_name = self._stats
        for name, v in w.x.items():
            if only is not None and name not in only:
                continue
            s = by_name.get(name)
            if s is None:
                s = by_name[name] = stats.Var()
            x = math.copysign(math.log1p(abs(v)), v) if name in log else v  # _value, inlined
            mean = s.mean
            if prior is not None and mean.n >= 2:
                # A deviation from the agent's own mean (scaled so that its variance is the agent's variance).
                d = (x - mean.get()) * math.sqrt(mean.n / (mean.n + 1))
                pooled = prior.spread.get(name)
                if pooled is None:
                    pooled = prior.spread[name] = stats.Var()
                pooled.update(d)
            s.update(x)
        self.n += 1

    def score_one(self, w: Write) -> float:
        worst = 0.0
        only = self._only
        log = self._log
        by_name = self._stats
        min_count = self._min_count
        for name, v in w.x.items():
            if only is not None and name not in only:
                continue
            # _z and _value, inlined: the hottest loop of the engine (every feature, every write, agent and table).
            s = by_name.get(name)
            if s is None or s.mean.n < min_count:
                continue
            x = math.copysign(math.log1p(abs(v)), v) if name in log else v
            z = abs((x - s.mean.get()) / self._std(name, s))
            if z > worst:
                worst = z
        return worst / (worst + self.half_z)

    def levels(self) -> dict[str, float]:
        """Each feature's learned mean in the column's own units (a log feature's is a geometric mean)."""
        out: dict[str, float] = {}
        for name, s in self._stats.items():
            if s.mean.n >= 1:
                m = s.mean.get()
                out[name] = signed_expm1(m) if name in self._log else m
        return out

    def explain(self, w: Write) -> list[Contribution]:
        """Features by decreasing |z|, each with the mean +/- 3 std range in the data's own units."""
        out: list[Contribution] = []
        for name, v in w.x.items():
            z = self._z(name, v)
            s = self._stats.get(name)
            if z is None or s is None:
                continue
            mean = s.mean.get()
            std = self._std(name, s)
            lo, hi = mean - 3 * std, mean + 3 * std
            if name in self._log:
                lo, hi = signed_expm1(lo), signed_expm1(hi)
            out.append(Contribution(name, float(v), lo, hi, z))
        out.sort(key=lambda c: -abs(c.z or 0.0))
        return out


class RiverModel:
    """Any River anomaly model (``anomaly.HalfSpaceTrees`` by default) behind an online scaler.

    River's HalfSpaceTrees assumes features in [0, 1], hence the ``MinMaxScaler`` in front of it.
    Mind the memory: a default HalfSpaceTrees holds ~1.5 MB once trained, so prefer small trees
    (``n_trees=5, height=6``: ~190 KB) when there is one model per agent.

    >>> m = RiverModel("anomaly.HalfSpaceTrees", {"n_trees": 5, "height": 6, "window_size": 50, "seed": 1})
    >>> for i in range(200):
    ...     m.learn_one(Write({"amount": 20.0 + i % 7, "items": 1.0 + i % 3}))
    >>> 0.0 <= m.score_one(Write({"amount": 22.0, "items": 2.0})) <= 1.0
    True
    """

    __slots__ = ("_log", "_model", "_only", "n")

    def __init__(
        self,
        model: str = "anomaly.HalfSpaceTrees",
        params: Mapping[str, Any] | None = None,
        scaler: str = "minmax",
        features: Iterable[str] | None = None,
        log_features: Iterable[str] = (),
    ) -> None:
        from river import anomaly, compose, preprocessing

        _, _, cls_name = model.partition(".")
        cls = getattr(anomaly, cls_name, None)
        if cls is None:
            raise ValueError(f"river has no anomaly model {cls_name!r}")
        est: Any = cls(**dict(params or {}))
        if scaler == "minmax":
            est = compose.Pipeline(preprocessing.MinMaxScaler(), est)
        elif scaler == "standard":
            est = compose.Pipeline(preprocessing.StandardScaler(), est)
        self._model = est
        self._only = frozenset(features) if features is not None else None
        # A heavy tail would squash every other value into a corner of the scaler's [0, 1].
        self._log = frozenset(log_features)
        self.n = 0

    def _select(self, x: Features) -> dict[str, float]:
        only, log = self._only, self._log
        return {k: (signed_log1p(v) if k in log else v) for k, v in x.items() if only is None or k in only}

    def learn_one(self, w: Write) -> None:
        self._model.learn_one(self._select(w.x))
        self.n += 1

    def score_one(self, w: Write) -> float:
        return float(self._model.score_one(self._select(w.x)))

    def explain(self, w: Write) -> list[Contribution]:
        only = self._only
        return [Contribution(k, float(v), None, None) for k, v in w.x.items() if only is None or k in only]


class WindowCounter:
    """Approximate count of events in the last ``window`` seconds of commit time, in O(1) memory.

    The window is split into ``buckets`` slots, so the count is exact to one slot's width.

    >>> w = WindowCounter(60.0)
    >>> for t in range(10):
    ...     w.add(float(t))
    >>> w.count(10.0)
    10
    >>> w.count(200.0)
    0
    """

    __slots__ = ("_counts", "_head", "_width")

    def __init__(self, window: float, buckets: int = 8) -> None:
        self._width = window / buckets
        self._counts = [0] * buckets
        self._head = 0

    def _advance(self, t: float) -> int:
        idx = int(t // self._width)
        gap = idx - self._head
        if gap > 0:
            n = len(self._counts)
            for i in range(1, min(gap, n) + 1):
                self._counts[(self._head + i) % n] = 0
            self._head = idx
        return idx

    def add(self, t: float, weight: int = 1) -> None:
        idx = int(t // self._width)
        if idx > self._head:  # most writes land in the current slot: nothing to advance
            self._advance(t)
        n = len(self._counts)
        # A late event older than the window still counts in the oldest slot: undercounting would hide a burst.
        slot = idx if idx > self._head - n else self._head - n + 1
        self._counts[slot % n] += weight

    def count(self, t: float) -> int:
        if int(t // self._width) > self._head:
            self._advance(t)
        return sum(self._counts)


class RateCeiling:
    """Fires (score 1) when an agent's writes in the last ``window`` seconds exceed ``max_events``.

    Deterministic, so it covers an agent from its very first write, before any model has warmed up.

    >>> g = RateCeiling(max_events=3, window=60.0)
    >>> scores = []
    >>> for t in range(5):
    ...     w = Write(op="c", t=float(t))
    ...     scores.append(g.score_one(w))
    ...     g.learn_one(w)
    >>> scores
    [0.0, 0.0, 0.0, 1.0, 1.0]
    """

    __slots__ = ("_counter", "max_events", "n", "window")

    def __init__(self, max_events: int, window: float = 60.0) -> None:
        self.n = 0
        self.max_events = max_events
        self.window = window
        self._counter = WindowCounter(window)

    def weight(self, op: str) -> int:
        return 1

    def score_one(self, w: Write) -> float:
        weight = self.weight(w.op)
        if weight == 0:
            return 0.0
        return 1.0 if self._counter.count(w.t) + weight > self.max_events else 0.0

    def learn_one(self, w: Write) -> None:
        weight = self.weight(w.op)
        self.n += 1
        if weight:
            self._counter.add(w.t, weight)

    def _label(self) -> str:
        return f"events_per_{self.window:g}s"

    def _what(self) -> str:
        return "writes"

    def explain(self, w: Write) -> list[Contribution]:
        count = float(self._counter.count(w.t) + self.weight(w.op))
        text = f"{num(count)} {self._what()} in {num(self.window)} s (ceiling {num(self.max_events)})"
        return [Contribution(self._label(), count, 0.0, float(self.max_events), text=text)]


class OpBurstCeiling(RateCeiling):
    """Fires when destructive ops (deletes by default) in the window exceed ``max_events``.

    A truncate counts as a whole burst by itself: it removes every row at once.

    >>> g = OpBurstCeiling(max_events=2, ops=("d", "t"))
    >>> [g.score_one(Write(op=op)) for op in ("c", "t")]
    [0.0, 1.0]
    """

    __slots__ = ("ops",)

    def __init__(self, max_events: int, window: float = 60.0, ops: Iterable[str] = ("d", "t")) -> None:
        super().__init__(max_events, window)
        self.ops = frozenset(ops)

    def weight(self, op: str) -> int:
        if op not in self.ops:
            return 0
        return self.max_events + 1 if op == "t" else 1

    def _label(self) -> str:
        return f"{'/'.join(sorted(self.ops))}_per_{self.window:g}s"

    def _what(self) -> str:
        return " and ".join(OP_NAMES.get(op, op) for op in sorted(self.ops))


class TableCeiling:
    """A rate or op-burst ceiling counted over every agent of a table; it names the agents that filled it.

    One instance per table: spreading writes over fresh agent ids does not escape it, as it does a per-agent one.

    >>> g = TableCeiling(RateCeiling(max_events=3))
    >>> for t, a in enumerate(["a", "b", "c"]):
    ...     g.learn_one(Write(op="c", t=float(t), agent_id=a))
    >>> w = Write(op="c", t=3.0, agent_id="a")
    >>> g.score_one(w), [(c.feature, c.value) for c in g.explain(w)]
    (1.0, [('events_per_60s', 4.0), ('agent a', 2.0), ('agent b', 1.0), ('agent c', 1.0)])
    """

    __slots__ = ("_by_agent", "_recent", "inner", "n")

    TOP = 5

    def __init__(self, inner: RateCeiling) -> None:
        self.inner = inner
        self.n = 0
        self._recent: deque[tuple[float, str, int]] = deque()  # (t, agent, weight) within the window
        self._by_agent: Counter[str] = Counter()

    def _expire(self, t: float) -> None:
        limit = t - self.inner.window
        while self._recent and self._recent[0][0] <= limit:
            _, agent, weight = self._recent.popleft()
            self._by_agent[agent] -= weight
            if self._by_agent[agent] <= 0:
                del self._by_agent[agent]

    def counts(self, w: Write) -> bool:
        """Whether the ceiling counts this write at all (an op_burst ceiling counts only its ops)."""
        return self.inner.weight(w.op) > 0

    def score_one(self, w: Write) -> float:
        return self.inner.score_one(w)

    def learn_one(self, w: Write) -> None:
        self.n += 1
        self.inner.learn_one(w)
        weight = self.inner.weight(w.op)
        if weight:
            agent = w.agent_id or "?"
            self._recent.append((w.t, agent, weight))
            self._by_agent[agent] += weight
        self._expire(w.t)

    def explain(self, w: Write) -> list[Contribution]:
        self._expire(w.t)
        top = Counter(self._by_agent)
        if w.agent_id is not None and (weight := self.inner.weight(w.op)):
            top[w.agent_id] += weight
        return self.inner.explain(w) + [
            Contribution(f"agent {a}", float(c), None, None) for a, c in top.most_common(self.TOP)
        ]


class TableValues:
    """The values a whole table has seen per categorical column, and how many writes it has seen.

    Each column keeps at most ``cap`` values, with how often each was written. A full column does not stop
    learning (a frozen set would make every value that became common later score as new for every agent,
    forever, once junk had filled it): it forgets the quarter of its values written least often, the oldest
    first among equals, and then takes the new one. So values written once age out under a flood of them, and
    a value that keeps being written stays known. Counts are halved at most once per ``8 * cap`` table writes,
    when room is made, so that what was common long ago does not outrank what is common now forever. Making
    room costs O(cap log cap) once per ``cap / 4`` new values, nothing while a column has room.

    >>> t = TableValues()
    >>> for v in ["late", "late", "damaged"] + [f"junk{i}" for i in range(100)]:
    ...     t.learn("reason", v, cap=8)
    >>> len(t.values["reason"]), "late" in t.values["reason"], "damaged" in t.values["reason"]
    (8, True, False)
    >>> "junk99" in t.values["reason"], "junk10" in t.values["reason"]
    (True, False)
    """

    __slots__ = ("_aged", "n", "values")

    COUNT_MAX = 1 << 16  # counts only rank values; a cap keeps a burst long ago from outranking years of aging

    def __init__(self) -> None:
        self.values: dict[str, dict[str, int]] = {}  # column -> value -> times written (insertion order: oldest first)
        self.n = 0
        self._aged: dict[str, int] = {}  # column -> self.n when its counts were last halved

    def learn(self, col: str, v: str, cap: int) -> None:
        """Count one write of ``v`` in ``col``; make room first if ``col`` holds ``cap`` values."""
        table = self.values.get(col)
        if table is None:
            table = self.values[col] = {}
        c = table.get(v)
        if c is not None:
            if c < self.COUNT_MAX:
                table[v] = c + 1
            return
        if len(table) >= cap:
            self._make_room(col, table, cap)
        table[v] = 1

    def _make_room(self, col: str, table: dict[str, int], cap: int) -> None:
        # Free a quarter at once, so that a flood costs one sort per cap/4 new values, not one per value.
        keep = cap - max(1, cap // 4)
        if self.n - self._aged.get(col, 0) >= 8 * cap:
            self._aged[col] = self.n
            for v, c in table.items():
                table[v] = (c + 1) // 2
        items = list(table.items())
        # The most often written, the newest first among equal counts; kept in their original (age) order.
        ranked = sorted(range(len(items)), key=lambda i: (items[i][1], i), reverse=True)[:keep]
        ranked.sort()
        table.clear()
        for i in ranked:
            v, c = items[i]
            table[v] = c


class CategoricalNovelty:
    """Scores 1 for a value of a watched column that this agent (or the whole table) never used before.

    ``known`` holds the table's values per column, shared by every agent's detector. Once the table has
    seen ``warmup`` writes, a value nobody ever wrote counts from an agent's first write. A value that is
    only new to this agent counts after the agent's own ``warmup`` writes.

    >>> table = TableValues()
    >>> a = CategoricalNovelty(["reason"], warmup=3, known=table)
    >>> for r in ["late", "damaged", "late"]:
    ...     a.learn_one(Write(categories={"reason": r}))
    >>> a.score_one(Write(categories={"reason": "late"})), a.score_one(Write(categories={"reason": "goodwill"}))
    (0.0, 1.0)

    The table keeps ``16 * max_values`` values per column and keeps learning when they are full: after a flood
    of junk values, a value that agents start to write is known again from its first write.

    >>> table = TableValues()
    >>> flood = CategoricalNovelty(["reason"], warmup=3, known=table, max_values=4)
    >>> for i in range(1000):
    ...     flood.learn_one(Write(categories={"reason": f"junk{i}"}))
    >>> other = CategoricalNovelty(["reason"], warmup=3, known=table, max_values=4, agent_scope=False)
    >>> other.score_one(Write(categories={"reason": "goodwill"}))
    1.0
    >>> other.learn_one(Write(categories={"reason": "goodwill"}))
    >>> other.score_one(Write(categories={"reason": "goodwill"})), len(table.values["reason"]) <= 16 * 4
    (0.0, True)
    """

    __slots__ = ("_agent_scope", "_columns", "_max", "_seen", "_table_scope", "known", "n", "warmup")

    def __init__(
        self,
        columns: Iterable[str],
        warmup: int = 30,
        known: TableValues | None = None,
        table_scope: bool = True,
        max_values: int = 256,
        agent_scope: bool = True,
    ) -> None:
        self._columns = tuple(columns)
        self._agent_scope = agent_scope
        self._seen: dict[str, set[str]] = {}
        self.known = known if known is not None else TableValues()
        self._table_scope = table_scope
        self._max = max_values
        self.warmup = warmup
        self.n = 0

    def _new(self, c: Mapping[str, str] | None) -> list[tuple[str, str]]:
        if not c:
            return []
        out = []
        for col in self._columns:
            v = c.get(col)
            if v is None:
                continue
            known = self.known
            table_new = self._table_scope and known.n >= self.warmup and v not in known.values.get(col, ())
            mine_new = self._agent_scope and self.n >= self.warmup and v not in self._seen.get(col, ())
            if table_new or mine_new:
                out.append((col, v))
        return out

    def score_one(self, w: Write) -> float:
        return 1.0 if self._new(w.categories) else 0.0

    def learn_one(self, w: Write) -> None:
        self.n += 1
        known = self.known
        known.n += 1
        c = w.categories
        if not c:
            return
        seen = self._seen
        for col in self._columns:
            v = c.get(col)
            if v is None:
                continue
            mine = seen.get(col)
            if mine is None:
                mine = seen[col] = set()
            if v not in mine and len(mine) < self._max:
                mine.add(v)
            known.learn(col, v, self._max * 16)

    def explain(self, w: Write) -> list[Contribution]:
        out = []
        for col, v in self._new(w.categories):
            mine = len(self._seen.get(col, ()))
            if v not in self.known.values.get(col, ()):
                text = f"{col}={v!r}: a value no agent of the table ever wrote"
            else:
                text = f"{col}={v!r}: a value this agent never wrote (it wrote {mine} other{'s' if mine != 1 else ''})"
            out.append(Contribution(f"{col}={v!r} (new)", float(mine), None, None, text=text))
        return out


@lru_cache(maxsize=16)  # a key is hashed when scored and again when learned, a few calls apart
def _key_hash(key: str) -> int:
    # Stable across processes (unlike hash()), so a checkpointed detector still recognises its keys.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class DuplicateKey:
    """Scores 1 when a write's idempotency key was already applied within ``horizon`` seconds.

    One instance per table (keys are unique per effect, whichever agent wrote them), bounded to ``max_keys``
    keys (oldest forgotten first), each kept as a 64-bit hash.

    >>> d = DuplicateKey(horizon=600.0)
    >>> d.score_one(Write(t=0.0, idempotency_key="k1"))
    0.0
    >>> d.learn_one(Write(t=0.0, idempotency_key="k1"))
    >>> d.score_one(Write(t=30.0, idempotency_key="k1")), d.score_one(Write(t=900.0, idempotency_key="k1"))
    (1.0, 0.0)
    """

    __slots__ = ("_keys", "_max", "horizon", "n", "ops")

    def __init__(self, horizon: float = 3600.0, max_keys: int = 200_000, ops: Iterable[str] = ("c",)) -> None:
        from collections import OrderedDict

        self.horizon = horizon
        self._max = max_keys
        self._keys: OrderedDict[int, float] = OrderedDict()
        self.ops = frozenset(ops)
        self.n = 0

    def _first_seen(self, w: Write) -> float | None:
        if w.op not in self.ops or (key := w.idempotency_key) is None:
            return None
        return self._keys.get(_key_hash(key))

    def score_one(self, w: Write) -> float:
        seen = self._first_seen(w)
        return 1.0 if seen is not None and w.t - seen <= self.horizon else 0.0

    def learn_one(self, w: Write) -> None:
        self.n += 1
        if w.op not in self.ops or (key := w.idempotency_key) is None:
            return
        t = w.t
        h = _key_hash(key)
        if h not in self._keys:
            self._keys[h] = t
        keys = self._keys
        while keys and (len(keys) > self._max or next(iter(keys.values())) < t - self.horizon):
            keys.popitem(last=False)

    def explain(self, w: Write) -> list[Contribution]:
        seen = self._first_seen(w)
        age = w.t - seen if seen is not None else 0.0
        ago = num(round(age, 1))
        text = f"idempotency key applied again {ago} s after its first use (horizon {num(self.horizon)} s)"
        return [Contribution("seconds_since_first_use_of_key", age, self.horizon, None, text=text)]


class LevelDrift:
    """River's ADWIN on one feature: scores 1 on the write after ADWIN saw the feature's level change.

    For slow drifts that no single write shows; its alerts are meant to be low severity.

    >>> d = LevelDrift("amount", warmup=50)
    >>> fired = []
    >>> for i in range(2000):
    ...     v = 10.0 + (i % 5) if i < 1000 else 30.0 + (i % 5)
    ...     w = Write({"amount": v})
    ...     fired.append(d.score_one(w))
    ...     d.learn_one(w)
    >>> 1000 < fired.index(1.0) < 1100
    True
    """

    __slots__ = ("_adwin", "_before", "_drifted", "_log", "feature", "n", "warmup")

    def __init__(self, feature: str, delta: float = 0.002, warmup: int = 100, log: bool = False) -> None:
        self.feature = feature
        self._log = log  # watch the level of sign(x)*log1p(|x|): heavy tails would hide a drift
        # Imported here: river.drift also loads KSWIN and with it scipy.stats, 1.4 s that every command would pay.
        from river import drift

        self._adwin = drift.ADWIN(delta=delta)  # type: ignore[no-untyped-call]
        self._drifted = False
        self._before = 0.0
        self.warmup = warmup
        self.n = 0

    def score_one(self, w: Write) -> float:
        return 1.0 if self._drifted else 0.0

    def learn_one(self, w: Write) -> None:
        v = w.x.get(self.feature)
        self._drifted = False
        if v is None:
            return
        self.n += 1
        before = self._adwin.estimation
        self._adwin.update(signed_log1p(v) if self._log else v)  # type: ignore[no-untyped-call]
        if self._adwin.drift_detected and self.n > self.warmup:
            self._drifted = True
            self._before = before

    def explain(self, w: Write) -> list[Contribution]:
        now, was = float(self._adwin.estimation), self._before
        if self._log:
            now, was = signed_expm1(now), signed_expm1(was)
        text = f"{self.feature}: its level moved from about {num(was)} to {num(now)} (ADWIN)"
        return [Contribution(f"{self.feature}_level", now, was, was, text=text)]


class Cusum:
    """A sustained shift of one feature: a two-sided CUSUM over the agent's standardised values.

    Each value is standardised against the agent's own reference (mean and variance, with the same Student-t
    widening as ``ZScore`` while it has few writes); ``S+ = max(0, S+ + z - k)`` and its mirror ``S-`` add up
    what exceeds ``k`` standard deviations, so 20 writes at +3 std, none of which a 6-std ``zscore`` flags, reach
    ``h`` = 10 in 5 or 6 writes, while a normal agent's ``S`` stays near 0 (Page, 1954). The score is ``S / h``
    (capped at 1): anomalous from ``h``. The reference learns only while ``S`` is below ``h/2``, so a shift is
    not learned as normal; after ``rebase`` writes in a row past ``h`` the shift is the agent's new level: the
    reference starts again from it (and says so by closing the incident).

    >>> c = Cusum("amount", warmup=30)
    >>> import random
    >>> rng = random.Random(1)
    >>> for _ in range(300):
    ...     w = Write({"amount": rng.gauss(100.0, 10.0)})
    ...     _ = c.score_one(w); c.learn_one(w)
    >>> c.score_one(Write({"amount": 100.0}))
    0.0
    >>> scores = []
    >>> for _ in range(8):                      # +3 std for 8 writes
    ...     w = Write({"amount": 130.0})
    ...     scores.append(c.score_one(w)); c.learn_one(w)
    >>> scores.index(1.0) + 1  # about (h / (3 - k)) writes
    6
    """

    __slots__ = (
        "_hi",
        "_lo",
        "_log",
        "_over",
        "_ref",
        "feature",
        "h",
        "k",
        "n",
        "ops",
        "rebase",
        "reference",
        "warmup",
    )

    def __init__(
        self,
        feature: str,
        k: float = 1.0,
        h: float = 10.0,
        warmup: int = 30,
        log: bool = False,
        rebase: int = 200,
        reference: int | None = None,
        ops: Iterable[str] | None = None,
    ) -> None:
        self.feature = feature
        self.k, self.h = k, h
        self.warmup = warmup
        self._log = log
        self._ref = stats.Var()
        self._hi = self._lo = 0.0
        self._over = 0  # writes in a row with S past h
        self.rebase = rebase
        # A frozen reference: learned from this many writes, then fixed, so that a slow drift is not followed.
        self.reference = reference
        # Only these ops' values: an update re-reports a row written before, and its repeats are not independent.
        self.ops = frozenset(ops) if ops is not None else None
        self.n = 0

    def _x(self, w: Write) -> float | None:
        v = w.x.get(self.feature)
        if v is None:
            return None
        ops = getattr(self, "ops", None)  # None in a checkpoint from before the option
        if ops is not None and w.op not in ops:
            return None
        return signed_log1p(v) if self._log else v

    def _z(self, x: float) -> float | None:
        ref = self._ref
        n = int(ref.mean.n)
        if n < self.warmup:
            return None
        std = max(math.sqrt(max(ref.get(), 0.0)) * _widen(n), 1e-9)
        return (x - ref.mean.get()) / std

    def _next(self, x: float) -> tuple[float, float] | None:
        z = self._z(x)
        if z is None:
            return None
        return max(0.0, self._hi + z - self.k), max(0.0, self._lo - z - self.k)

    def score_one(self, w: Write) -> float:
        # _x, _next and _z, inlined (each write); the same arithmetic.
        v = w.x.get(self.feature)
        if v is None:
            return 0.0
        ops = getattr(self, "ops", None)  # None in a checkpoint from before the option
        if ops is not None and w.op not in ops:
            return 0.0
        ref = self._ref
        n = int(ref.mean.n)
        if n < self.warmup:
            return 0.0
        x = math.copysign(math.log1p(abs(v)), v) if self._log else v
        var = ref.get()
        std = math.sqrt(0.0 if 0.0 > var else var) * _widen(n)
        if 1e-9 > std:
            std = 1e-9
        z = (x - ref.mean.get()) / std
        hi, lo = self._hi + z - self.k, self._lo - z - self.k
        nxt = hi if hi > 0.0 else 0.0, lo if lo > 0.0 else 0.0  # max(0.0, hi), max(0.0, lo)
        global _cusum_scored
        _cusum_scored = (self, w, nxt)
        q = (nxt[1] if nxt[1] > nxt[0] else nxt[0]) / self.h
        return 1.0 if 1.0 < q else q

    def learn_one(self, w: Write) -> None:
        x = self._x(w)
        if x is None:
            return
        self.n += 1
        global _cusum_scored
        last = _cusum_scored
        if last[0] is self:
            # The sums score_one just computed for this very write, from the same state: not computed twice.
            nxt = last[2] if last[1] is w else self._next(x)
            _cusum_scored = _NOTHING_SCORED  # this learn changes the state they came from
        else:
            nxt = self._next(x)
        if nxt is None:
            self._ref.update(x)
            return
        self._hi, self._lo = nxt
        s = max(nxt)
        if s >= self.h:
            self._over += 1
            if self._over >= self.rebase:
                self._ref, self._hi, self._lo, self._over = stats.Var(), 0.0, 0.0, 0
                self._ref.update(x)
            return
        self._over = 0
        frozen = getattr(self, "reference", None)  # None in a checkpoint from before the option
        if s < self.h / 2 and (frozen is None or self._ref.mean.n < frozen):
            self._ref.update(x)

    def levels(self) -> dict[str, float]:
        """The reference level of its feature, in the column's own units."""
        if self._ref.mean.n < 1:
            return {}
        m = self._ref.mean.get()
        return {self.feature: signed_expm1(m) if self._log else m}

    def restart(self, writes: Iterable[Write]) -> None:
        """Re-baseline on a regime change: the reference starts again from ``writes``, the sums from 0."""
        self._ref, self._hi, self._lo, self._over = stats.Var(), 0.0, 0.0, 0
        for w in writes:
            x = self._x(w)
            if x is not None:
                self._ref.update(x)

    def explain(self, w: Write) -> list[Contribution]:
        ref = self._ref
        mean, std = ref.mean.get(), math.sqrt(max(ref.get(), 0.0))
        lo, hi = mean - 3 * std, mean + 3 * std
        if self._log:
            lo, hi = signed_expm1(lo), signed_expm1(hi)
        x = w.x.get(self.feature)
        nxt = self._next(self._x(w) or 0.0) if x is not None else None
        s = max(nxt) if nxt is not None else 0.0
        text = (
            f"{self.feature} = {num(float(x or 0.0))}, one of a run of writes off its usual {num(lo)} to {num(hi)} "
            f"(sustained shift: summed excess {s:.1f} std, alerts at {self.h:g})"
        )
        return [Contribution(f"{self.feature} (sustained shift)", float(x or 0.0), lo, hi, s, text=text)]


def median_levels(writes: Iterable[Write]) -> dict[str, float]:
    """Each feature's median over ``writes``, in the column's own units: an agent's level in a run of writes.

    >>> median_levels([Write({"amount": 10.0}), Write({"amount": 30.0, "items": 2.0}), Write({"amount": 20.0})])
    {'amount': 20.0, 'items': 2.0}
    """
    values: dict[str, list[float]] = {}
    for w in writes:
        for name, v in w.x.items():
            values.setdefault(name, []).append(v)
    return {name: statistics.median(vs) for name, vs in values.items()}


def regime_shift(before: Mapping[str, float], after: Mapping[str, float], writes: int) -> list[Contribution]:
    """What a regime-change alert says: each feature's level before and after, the largest move first.

    ``before`` is what the model had learned (empty when the model keeps no level), ``after`` the level of the
    writes it re-baselines on; both in the column's units.

    >>> c = regime_shift({"amount": 45.0}, {"amount": 900.0}, 50)[0]
    >>> c.feature, c.value, c.expected_low
    ('amount level', 900.0, 45.0)
    >>> print(c.text)  # doctest: +NORMALIZE_WHITESPACE
    amount: the agent's level moved from about 45 to about 900 and stayed there for 50 writes with no quarantine:
    a new regime, its model re-baselined on its recent writes (judged against the new level from now on)
    """
    tail = (
        f"stayed there for {writes} writes with no quarantine: a new regime, its model re-baselined on its recent "
        "writes (judged against the new level from now on)"
    )

    def move(name: str) -> float:
        a, b = after[name], before.get(name)
        if b is None:
            return 0.0
        return abs(signed_log1p(a) - signed_log1p(b))

    out: list[Contribution] = []
    for name in sorted(after, key=move, reverse=True):
        a, b = after[name], before.get(name)
        if b is None:
            text = f"{name}: the agent's level is now about {num(a)} and {tail}"
        else:
            text = f"{name}: the agent's level moved from about {num(b)} to about {num(a)} and {tail}"
        out.append(Contribution(f"{name} level", a, b, b, text=text))
    return out

# The last Cusum.score_one: (detector, write, next sums). The engine scores a write, then learns it, and the sums
# are the same both times. Kept here rather than on the detector so that no checkpoint carries it.
_NOTHING_SCORED: tuple[Cusum | None, Write | None, tuple[float, float] | None] = (None, None, None)
_cusum_scored: tuple[Cusum | None, Write | None, tuple[float, float] | None] = _NOTHING_SCORED

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}


class Rule:
    """Structured conditions from the config (no code is evaluated), fired on ``count`` matches per window.

    >>> r = Rule([("amount", ">", 500.0)], ops=("c",), count=2, window=60.0)
    >>> out = []
    >>> for t, amount in enumerate([900.0, 10.0, 800.0]):
    ...     w = Write({"amount": amount}, "c", float(t))
    ...     out.append(r.score_one(w))
    ...     r.learn_one(w)
    >>> out
    [0.0, 0.0, 1.0]
    """

    __slots__ = ("_counter", "conditions", "count", "n", "ops")

    def __init__(
        self,
        conditions: Iterable[tuple[str, str, Any]],
        ops: Iterable[str] | None = None,
        count: int = 1,
        window: float = 60.0,
    ) -> None:
        self.conditions = tuple((f, _COMPARE[o], v, o) for f, o, v in conditions)
        self.ops = frozenset(ops) if ops is not None else None
        self.count = count
        self._counter = WindowCounter(window)
        self.n = 0

    def matches(self, w: Write) -> bool:
        if self.ops is not None and w.op not in self.ops:
            return False
        x, c = w.x, w.categories
        for field, cmp, value, _ in self.conditions:
            got: Any = x.get(field)
            if got is None and c:
                got = c.get(field)
            if got is None:
                return False
            try:
                if not cmp(got, value):
                    return False
            except TypeError:  # a number against text: the condition does not hold
                return False
        return True

    def score_one(self, w: Write) -> float:
        if not self.matches(w):
            return 0.0
        return 1.0 if self._counter.count(w.t) + 1 >= self.count else 0.0

    def learn_one(self, w: Write) -> None:
        self.n += 1
        if self.matches(w):
            self._counter.add(w.t)

    def explain(self, w: Write) -> list[Contribution]:
        text = " and ".join(f"{f} {o} {v!r}" for f, _, v, o in self.conditions) or "any write"
        return [Contribution(f"matches: {text}", float(self._counter.count(w.t) + 1), None, float(self.count))]


class _Windows:
    """Counts per fixed window of commit time; hands each closed window to ``on_close``, gaps as zeros."""

    __slots__ = ("_counts", "_index", "width")

    def __init__(self, width: float) -> None:
        self.width = width
        self._index = -1
        self._counts: dict[str, int] = {}

    def roll(self, t: float, on_close: Callable[[dict[str, int], float], None], max_gap: int = 3) -> None:
        """Close the current window if ``t`` is past it: ``on_close(counts, window start)``."""
        idx = int(t // self.width)
        if 0 <= idx <= self._index:  # still the current window (or a late write): the common case
            return
        if self._index < 0:
            self._index = idx
        elif idx > self._index:
            on_close(self._counts, self._index * self.width)
            for k in range(1, min(idx - self._index - 1, max_gap) + 1):  # quiet windows are part of the baseline
                on_close({}, (self._index + k) * self.width)
            self._counts = {}
            self._index = idx

    def start(self) -> float:
        """Commit time (s) at which the current window began."""
        return max(self._index, 0) * self.width

    def add(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    def total(self) -> int:
        return sum(self._counts.values())


class EWMeanVar:
    """An exponentially weighted mean and variance that start as a plain mean: the baseline of ``Volume``
    and ``OpMix``, one update per closed window.

    Each update weighs the new value by ``max(alpha, 1/n)``: the first ``1/alpha`` windows are averaged
    equally, later ones fade at ``alpha``. River's ``stats.EWMean``/``EWVar`` do not fit, for two reasons
    that would change every score: they weigh the second value by the fixed ``fading_factor`` already (a
    baseline with alpha 0.05 would trust its very first window for dozens of windows), and ``EWVar`` is
    E[x²] - E[x]², which cancels badly for large counts; the incremental form here (Finch, 2009, the
    reference River cites) stays non-negative.

    >>> s = EWMeanVar(alpha=0.05)
    >>> for v in (4.0, 6.0):
    ...     s.update(v)
    >>> s.mean, s.var, s.n
    (5.0, 1.0, 2)
    """

    __slots__ = ("alpha", "mean", "n", "var")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.mean = 0.0
        self.var = 0.0
        self.n = 0

    def update(self, v: float) -> None:
        self.n += 1
        a = max(self.alpha, 1.0 / self.n)
        d = v - self.mean
        self.mean += a * d
        self.var = (1 - a) * (self.var + a * d * d)


class DailyProfile:
    """A window statistic per hour of the day (UTC): what the agent does at this time on previous days.

    ``Volume`` and ``OpMix`` judge a window against their overall baseline and, once this hour has been seen on
    a previous day, also against the same hour of previous days, and call it anomalous only when it stands out
    from both. So a nightly batch job is judged by its own previous runs, and a fleet-wide peak at an unusual
    hour still has to stand out from the agent's whole day (judging by the hour alone, measured on the scenario
    suite, made a benign x3 traffic spike 70 false alarms); its first run falls in
    the model's learning period (which covers a day) and only warns. An hour counts from the day after its first
    window: until then it holds only today. The same weighting as ``EWMeanVar``, kept in one flat array (24 x
    n, mean, var, first day, as float32): about 450 bytes per detector.

    >>> d = DailyProfile(alpha=0.05)
    >>> d.update(2 * 3600.0, 300.0)
    >>> d.get(2 * 3600.0 + 60) is None  # the same day: not yet a previous run
    True
    >>> for day in (1, 2):
    ...     d.update(day * 86_400 + 2 * 3600.0, 300.0 + day)
    >>> n, mean, var = d.get(3 * 86_400 + 2 * 3600.0 + 60)
    >>> n, mean, round(var, 3)
    (3.0, 301.0, 0.667)
    """

    __slots__ = ("_s", "alpha")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self._s: array[float] | None = None  # allocated at the first closed window

    @staticmethod
    def _slot(t: float) -> int:
        return int(t % 86_400 // 3_600) * 4

    def update(self, t: float, v: float) -> None:
        s = self._s
        if s is None:
            s = self._s = array("f", bytes(4 * 96))
        i = self._slot(t)
        if s[i] == 0:
            s[i + 3] = t // 86_400
        n = s[i] + 1
        a = max(self.alpha, 1.0 / n)
        d = v - s[i + 1]
        s[i], s[i + 1], s[i + 2] = n, s[i + 1] + a * d, (1 - a) * (s[i + 2] + a * d * d)

    def get(self, t: float) -> tuple[float, float, float] | None:
        """(windows seen, mean, variance) at this hour of the day, or None before the first."""
        s = self._s
        if s is None:
            return None
        i = int(t % 86_400 // 3_600) * 4  # _slot, inlined: on every score of Volume and OpMix
        return None if s[i] == 0 or t // 86_400 <= s[i + 3] else (s[i], s[i + 1], s[i + 2])


class Volume:
    """An agent's writes per window against its own learned baseline (a slowly moving mean and variance).

    Counts are Poisson-like, so the deviation is measured against ``max(std, sqrt(mean), 1)``; the score is
    ``z / (z + half_z)`` as for ``ZScore``. ``max_events`` adds an optional hard ceiling (score 1).

    >>> v = Volume(window=60.0, warmup=10)
    >>> for minute in range(30):          # 5 writes a minute
    ...     for i in range(5):
    ...         v.learn_one(Write(t=minute * 60.0 + i))
    >>> v.score_one(Write(t=30 * 60.0)) < 0.5
    True
    >>> for i in range(80):               # then 80 in one minute
    ...     v.learn_one(Write(t=31 * 60.0 + i * 0.5))
    >>> v.score_one(Write(t=31 * 60.0 + 41)) > 0.7
    True
    """

    __slots__ = ("_baseline", "_daily", "_win", "half_z", "max_events", "n", "warmup")

    def __init__(
        self,
        window: float = 60.0,
        warmup: int = 30,
        half_z: float = 4.0,
        alpha: float = 0.05,
        max_events: int | None = None,
        daily: bool = True,
    ) -> None:
        self._win = _Windows(window)
        # alpha: the weight of each closed window, so that the baseline follows daily seasonality slowly.
        self._baseline = EWMeanVar(alpha)
        self._daily = DailyProfile(alpha) if daily else None
        self.warmup = warmup
        self.half_z = half_z
        self.max_events = max_events
        self.n = 0

    def _close(self, counts: dict[str, int], start: float) -> None:
        total = float(sum(counts.values()))
        self._baseline.update(total)
        if self._daily is not None:
            self._daily.update(start, total)

    def _std(self) -> float:
        b = self._baseline
        return max(math.sqrt(b.var), math.sqrt(max(b.mean, 0.0)), 1.0)

    def _z(self, count: int) -> float:
        b = self._baseline
        z = (count - b.mean) / _count_std(b.var, b.mean)
        day = self._daily.get(self._win.start()) if self._daily is not None else None
        if day is not None:
            _, mean, var = day
            zd = (count - mean) / _count_std(var, mean)
            z = zd if zd < z else z  # min(z, zd)
        return z

    def score_one(self, w: Write) -> float:
        self._win.roll(w.t, self._close)
        count = self._win.total() + 1
        if self.max_events is not None and count > self.max_events:
            return 1.0
        if self._baseline.n < self.warmup:
            return 0.0
        z = self._z(count)
        return z / (z + self.half_z) if z > 0 else 0.0

    def learn_one(self, w: Write) -> None:
        self.n += 1
        self._win.roll(w.t, self._close)
        self._win.add("all")

    def explain(self, w: Write) -> list[Contribution]:
        count = self._win.total() + 1
        high = self._baseline.mean + 3 * self._std()
        text = f"{num(count)} writes in {num(self._win.width)} s (usually up to {num(round(high))})"
        return [
            Contribution(f"writes_per_{self._win.width:g}s", float(count), 0.0, high, self._z(count), text=text)
        ]


def _count_std(var: float, mean: float) -> float:
    """``max(sqrt(var), sqrt(max(mean, 0)), 1)``: a window count's spread, at least Poisson's, at least one."""
    sd = math.sqrt(var)
    poisson = math.sqrt(0.0 if 0.0 > mean else mean)
    sd = poisson if poisson > sd else sd
    return 1.0 if 1.0 > sd else sd


def _share_z(share: float, mean: float, var: float, total: int) -> float:
    # Binomial noise at this window's size, so small windows do not look extreme.
    noise = math.sqrt(max(mean * (1 - mean), 0.01) / total)
    return (share - mean) / max(math.sqrt(var), noise)


class OpMix:
    """The share of destructive ops (deletes, updates by default) in the current window against the agent's usual
    share, once the window holds ``min_events`` writes; also fires on a mass change in one transaction.

    >>> m = OpMix(window=60.0, warmup=5, min_events=10, max_rows_per_tx=50)
    >>> for minute in range(20):                      # 1 update in 10
    ...     for i in range(10):
    ...         m.learn_one(Write(op="u" if i == 0 else "c", t=minute * 60.0 + i))
    >>> m.score_one(Write(op="d", t=20 * 60.0 + 11))
    0.0
    >>> for i in range(10):                           # then a minute of deletes only
    ...     m.learn_one(Write(op="d", t=21 * 60.0 + i))
    >>> m.score_one(Write(op="d", t=21 * 60.0 + 11)) > 0.7
    True
    >>> for i in range(50):                           # 50 rows deleted in one transaction, then one more
    ...     m.learn_one(Write(op="d", t=22 * 60.0, tx_id="tx-9"))
    >>> m.score_one(Write(op="d", t=22 * 60.0, tx_id="tx-9"))
    1.0
    """

    __slots__ = (
        "_baseline",
        "_daily",
        "_tx",
        "_tx_rows",
        "_win",
        "half_z",
        "max_rows_per_tx",
        "min_events",
        "n",
        "ops",
        "warmup",
    )

    def __init__(
        self,
        ops: Iterable[str] = ("d", "u"),
        window: float = 60.0,
        warmup: int = 30,
        min_events: int = 10,
        half_z: float = 4.0,
        max_rows_per_tx: int | None = None,
        alpha: float = 0.05,
        daily: bool = True,
    ) -> None:
        self.ops = frozenset(ops)
        self._win = _Windows(window)
        self._baseline = EWMeanVar(alpha)  # of the destructive share, over windows of at least min_events
        self._daily = DailyProfile(alpha) if daily else None
        self.warmup = warmup
        self.min_events = min_events
        self.half_z = half_z
        self.max_rows_per_tx = max_rows_per_tx
        self._tx: str | None = None
        self._tx_rows = 0
        self.n = 0

    def _close(self, counts: dict[str, int], start: float) -> None:
        total = sum(counts.values())
        if total < self.min_events:
            return  # too few writes to say anything about a share
        share = counts.get("destructive", 0) / total
        self._baseline.update(share)
        if self._daily is not None:
            self._daily.update(start, share)

    def _share_z(self, op: str) -> float:
        total = self._win.total() + 1
        b = self._baseline
        if total < self.min_events or b.n < self.warmup:
            return 0.0
        share = (self._win.get("destructive") + (op in self.ops)) / total
        z = _share_z(share, b.mean, b.var, total)
        day = self._daily.get(self._win.start()) if self._daily is not None else None
        if day is not None:
            z = min(z, _share_z(share, day[1], day[2], total))
        return z

    def score_one(self, w: Write) -> float:
        self._win.roll(w.t, self._close)
        op, tx = w.op, w.tx_id
        if (
            self.max_rows_per_tx is not None
            and op in self.ops
            and tx is not None
            and tx == self._tx
            and self._tx_rows + 1 > self.max_rows_per_tx
        ):
            return 1.0
        z = self._share_z(op)
        return z / (z + self.half_z) if z > 0 else 0.0

    def learn_one(self, w: Write) -> None:
        self.n += 1
        self._win.roll(w.t, self._close)
        op, tx = w.op, w.tx_id
        self._win.add("destructive" if op in self.ops else "other")
        if op in self.ops and tx is not None:
            if tx != self._tx:
                self._tx, self._tx_rows = tx, 0
            self._tx_rows += 1

    def explain(self, w: Write) -> list[Contribution]:
        total = self._win.total() + 1
        share = (self._win.get("destructive") + (w.op in self.ops)) / total
        label = f"{'/'.join(sorted(self.ops))}_share"
        ops = " and ".join(OP_NAMES.get(op, op) for op in sorted(self.ops))
        b = self._baseline
        spread = 3 * max(math.sqrt(b.var), math.sqrt(max(b.mean * (1 - b.mean), 0.01) / total))
        lo, hi = max(b.mean - spread, 0.0), min(b.mean + spread, 1.0)
        text = f"{ops}: {pct(share)} of this window's {num(total)} writes (usually {pct(lo)} to {pct(hi)})"
        out = [Contribution(label, share, lo, hi, self._share_z(w.op), text=text)]
        if self._tx_rows and self.max_rows_per_tx is not None:
            rows = float(self._tx_rows + 1)
            tx = Contribution(
                "rows_changed_in_transaction",
                rows,
                0.0,
                float(self.max_rows_per_tx),
                text=f"{num(rows)} rows ({ops}) in one transaction (limit {num(self.max_rows_per_tx)})",
            )
            # The mass change is what fired when this write is part of it: say that first.
            fired = w.tx_id is not None and w.tx_id == self._tx and rows > self.max_rows_per_tx
            out = [tx, *out] if fired else [*out, tx]
        return out


# Op codes OpHabit keeps a habit of: a snapshot read ("r") is not something the agent did.
_HABIT_OPS = ("c", "u", "d", "t")
_HABIT_INDEX = {op: j for j, op in enumerate(_HABIT_OPS)}
_HABIT_NAMES = {"c": "inserts", "u": "updates", "d": "hard deletes", "t": "truncates"}


def beta_binomial_tail(k: int, n: int, a: float, b: float) -> float:
    """P(X >= k) for X ~ Beta-Binomial(n, a, b): ``k`` or more of ``n`` writes are one op, when its share is only
    known as Beta(a, b) (a share learned from counts, whose own uncertainty widens the tail).

    Summed from ``k`` upwards, term by term (the ratio of consecutive terms is exact), until the terms no longer
    matter; called only for counts above the mean, where they fall quickly.

    >>> round(beta_binomial_tail(1, 1, 1.0, 3.0), 6)  # one write, a share of mean 1/4
    0.25
    >>> f"{beta_binomial_tail(3, 40, 0.5, 2000.5):.1e}"   # 3 of 40, for an op seen 0 times in 2,000 writes
    '2.2e-06'
    >>> beta_binomial_tail(0, 10, 0.5, 9.5)
    1.0
    """
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    lg = math.lgamma
    log_pmf = (
        lg(n + 1) - lg(k + 1) - lg(n - k + 1) + lg(k + a) + lg(n - k + b) - lg(n + a + b) + lg(a + b) - lg(a) - lg(b)
    )
    term = math.exp(log_pmf)
    total = term
    for j in range(k, n):
        term *= (n - j) / (j + 1) * (j + a) / (n - j - 1 + b)
        total += term
        if term < total * 1e-9:
            break
    return min(total, 1.0)


class OpHabit:
    """Each op's count in the last ``window`` seconds against the agent's habit of that op, one op at a time.

    ``OpMix`` judges one share of several ops together, so an agent that soft-deletes (updates) and starts to
    hard-delete keeps its share and goes unseen. Here every op has its own long-run count, of the agent's writes
    that have left the window, with a Dirichlet prior of ``prior`` writes per op: the op's share is known as
    Beta(count + prior, others + 3 prior). A write of op ``o`` is scored by how unlikely its window's count of ``o``
    (this write included) is under that habit: the Beta-Binomial upper tail ``p``, as ``L = -log10 p``, squashed
    into ``L / (L + L*)`` with ``L* = -log10(p_value)``, so that 0.5 is ``p = p_value``. An op the agent never
    used is very unlikely three times in an hour; a rare op at its usual rate is not; the share's own uncertainty
    (0 in 100 writes is less surely rare than 0 in 10,000) is in the tail. Judged only after ``warmup`` writes have
    left the window, from ``min_count`` of the op in the window, and only for rare ops (a habitual share below
    ``max_share``: a common op's share is ``OpMix``'s). Inserts are not judged by default: they change no existing
    row, and an agent whose nightly batch of updates dwarfs its day would find its own daytime inserts rare.
    Memory: the window's counts in 8 time buckets per op, and four long-run counts.

    >>> h = OpHabit(window=3600.0, warmup=100)
    >>> for i in range(2000):                         # 17 hours of inserts and soft deletes (updates)
    ...     h.learn_one(Write(op="u" if i % 3 else "c", t=i * 30.0))
    >>> t = 2000 * 30.0
    >>> scores = []
    >>> for i in range(4):                            # then four hard deletes within the hour
    ...     w = Write(op="d", t=t + i * 600.0)
    ...     scores.append(round(h.score_one(w), 2)); h.learn_one(w)
    >>> scores                                        # the third is past p_value (2e-5): score 0.5
    [0.0, 0.0, 0.51, 0.59]
    >>> print(h.explain(Write(op="d", t=t + 1800.0))[0].text)   # a fifth
    5 hard deletes among this agent's 55 writes in the last hour; its usual share of deletes is 0% (none in 1,950 \
writes); at that share, 5 or more in 55 writes has a chance of 3.2e-09
    """

    __slots__ = (
        "_counts",
        "_habit",
        "_head",
        "_width",
        "max_share",
        "min_count",
        "n",
        "ops",
        "p_value",
        "prior",
        "warmup",
        "window",
    )

    BUCKETS = 8

    def __init__(
        self,
        window: float = 3600.0,
        warmup: int = 100,
        min_count: int = 3,
        p_value: float = 2e-5,
        prior: float = 0.5,
        max_share: float = 0.02,
        ops: Iterable[str] = ("u", "d", "t"),
    ) -> None:
        self.window = window
        self._width = window / self.BUCKETS
        self.ops = frozenset(ops) & frozenset(_HABIT_OPS)
        self.warmup = warmup
        self.min_count = min_count
        self.p_value = p_value
        self.prior = prior
        self.max_share = max_share
        # The window: per bucket of commit time, a count per op (bucket-major, ops in _HABIT_OPS order).
        self._counts = array("I", bytes(4 * 4 * self.BUCKETS))
        self._head: int | None = None  # index of the newest bucket
        self._habit = [0, 0, 0, 0]  # per op, the agent's writes that have left the window
        self.n = 0

    def _advance(self, t: float) -> int:
        """Move the window to ``t``: buckets that fall out of it go to the long-run habit."""
        idx = int(t // self._width)
        head = self._head
        if head is None:
            self._head = idx
            return idx
        gap = idx - head
        if gap > 0:
            c, habit, nb = self._counts, self._habit, self.BUCKETS
            for i in range(1, min(gap, nb) + 1):
                base = (head + i) % nb * 4
                for j in range(4):
                    habit[j] += c[base + j]
                    c[base + j] = 0
            self._head = idx
        return idx

    def _window(self, j: int) -> tuple[int, int]:
        """(writes of op ``j``, all writes) in the window."""
        c = self._counts
        return sum(c[j::4]), sum(c)

    def _judge(self, w: Write) -> tuple[int, int, int, int, float] | None:
        """(op's count in the window with ``w``, writes in it, op's habit, habit writes, tail p), or None."""
        op = w.op
        if op not in self.ops:
            return None
        self._advance(w.t)
        j = _HABIT_INDEX[op]
        habit_n = sum(self._habit)
        if habit_n < self.warmup:
            return None
        k, n = self._window(j)
        k, n = k + 1, n + 1
        if k < self.min_count:
            return None
        h = self._habit[j]
        a, b = h + self.prior, habit_n - h + 3 * self.prior
        share = a / (a + b)
        if share >= self.max_share or k <= n * share:
            return None
        return k, n, h, habit_n, beta_binomial_tail(k, n, a, b)

    def score_one(self, w: Write) -> float:
        judged = self._judge(w)
        if judged is None:
            return 0.0
        surprise = -math.log10(max(judged[4], 1e-300))
        return surprise / (surprise - math.log10(self.p_value))

    def learn_one(self, w: Write) -> None:
        self.n += 1
        j = _HABIT_INDEX.get(w.op)
        if j is None:
            return
        idx = self._advance(w.t)
        head = self._head if self._head is not None else idx
        # A late write older than the window still counts in the oldest bucket, as WindowCounter does.
        slot = idx if idx > head - self.BUCKETS else head - self.BUCKETS + 1
        self._counts[slot % self.BUCKETS * 4 + j] += 1

    def _span(self) -> str:
        s = self.window
        if s == 3600:
            return "the last hour"
        if s % 3600 == 0:
            return f"the last {num(s / 3600)} hours"
        if s % 60 == 0:
            return f"the last {num(s / 60)} minutes"
        return f"the last {num(s)} s"

    def explain(self, w: Write) -> list[Contribution]:
        op = w.op if w.op in _HABIT_OPS else "d"
        j = _HABIT_OPS.index(op)
        self._advance(w.t)
        k, n = self._window(j)
        k, n = k + (w.op == op), n + 1
        h, habit_n = self._habit[j], sum(self._habit)
        a, b = h + self.prior, habit_n - h + 3 * self.prior
        share = a / (a + b)
        p = beta_binomial_tail(k, n, a, b)
        # The usual range: the most writes of this op in a window of n that its habit makes unsurprising.
        high = next(
            (i - 1 for i in range(max(math.ceil(n * share), 1), n + 1) if beta_binomial_tail(i, n, a, b) < 1e-3), n
        )
        usual = f"{100 * h / habit_n:.2g}%" if habit_n else "unknown"
        seen = f"{num(h)} in {num(habit_n)} writes" if h else f"none in {num(habit_n)} writes"
        text = (
            f"{num(k)} {_HABIT_NAMES[op]} among this agent's {num(n)} writes in {self._span()}; its usual share of "
            f"{OP_NAMES[op]} is {usual} ({seen}); at that share, {num(k)} or more in {num(n)} writes has a chance "
            f"of {p:.1e}"
        )
        return [Contribution(f"{op}_per_{self.window:g}s", float(k), 0.0, float(high), None, text=text)]


def negative_binomial_tail(k: int, mean: float, shape: float) -> float:
    """P(X >= k) for a count X whose rate is Gamma-distributed: Negative-Binomial with this ``mean`` and ``shape``
    (variance ``mean + mean² / shape``; a large shape is Poisson).

    Summed from ``k`` upwards, term by term (the ratio of consecutive terms is exact), until they no longer matter;
    called only for counts above the mean, where they fall geometrically.

    >>> f"{negative_binomial_tail(12, 0.5, 1e9):.1e}"   # Poisson(0.5): 12 or more
    '3.2e-13'
    >>> f"{negative_binomial_tail(12, 0.5, 3.0):.1e}"   # the same mean with a rate that swings
    '5.0e-09'
    >>> negative_binomial_tail(0, 4.0, 2.0)
    1.0
    """
    if k <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    q = mean / (mean + shape)  # the chance of one more write, in the Negative-Binomial's own terms
    lg = math.lgamma
    log_pmf = lg(k + shape) - lg(shape) - lg(k + 1) + shape * math.log1p(-q) + k * math.log(q)
    if log_pmf < -745:
        return 0.0
    term = math.exp(log_pmf)
    total = term
    j = k
    while j < k + 100_000:
        term *= (j + shape) / (j + 1) * q
        total += term
        j += 1
        if term < total * 1e-9:
            break
    return min(total, 1.0)


def negative_binomial_quantile(level: float, mean: float, shape: float) -> int:
    """The smallest count whose cumulative chance reaches ``level``: the top of the usual range of a count.

    >>> negative_binomial_quantile(0.999, 0.5, 1e9), negative_binomial_quantile(0.999, 10.0, 4.0)
    (4, 37)
    """
    if mean <= 0:
        return 0
    q = mean / (mean + shape)
    term = math.exp(shape * math.log1p(-q))
    total, j = term, 0
    while total < level and j < 1_000_000:
        term *= (j + shape) / (j + 1) * q
        total += term
        j += 1
    return j


def _ring_sum(c: array[int], lo: int, hi: int) -> int:
    """The sum of ring buckets ``lo`` to ``hi`` (indices that wrap around ``len(c)``), in slices rather than a loop."""
    nb, n = len(c), hi - lo + 1
    if n <= 0:
        return 0
    if n >= nb:
        return sum(c)
    a, b = lo % nb, hi % nb
    if n == 2:
        return c[a] + c[b]
    return sum(c[a : b + 1]) if a <= b else sum(c[a:]) + sum(c[: b + 1])


class TableTraffic:
    """A table's writes per bucket of commit time, over all its agents, and its usual count per bucket at each hour
    of the day (UTC): how busy the table is now relative to its own usual at this hour.

    One instance per table, shared by the agents' ``Rhythm`` detectors: each adds its agent's writes, so the table
    sees them all. It keeps the last day of buckets (the counts an agent's closing bucket is compared with) and 24
    slowly moving means. Memory: about 1.3 KB per table at 5-minute buckets.

    >>> tt = TableTraffic(bucket=300.0)
    >>> for day in range(3):                        # 10 writes in each 5 minutes, around the clock
    ...     for i in range(2880):
    ...         tt.add(day * 86_400 + i * 30.0)
    >>> tt.usual(3 * 86_400 + 7200.0)
    10.0
    >>> for i in range(30):                         # then 30 in 5 minutes: three times as busy
    ...     tt.add(3 * 86_400 + 7200.0 + i * 10.0)
    >>> t = 3 * 86_400 + 7_290.0
    >>> tt.count(t // 300, 1), tt.busy(t, 1, 0, 300.0)   # 30 in this bucket, 10 usual: (30 + 10) / (10 + 10)
    (30, 2.0)
    """

    __slots__ = ("_counts", "_head", "_usual", "_usual_n", "alpha", "n", "width")

    def __init__(self, bucket: float = 300.0, memory_days: float = 7.0) -> None:
        self.width = bucket
        self.alpha = 1.0 / max(memory_days, 1e-9)  # per day: one update per bucket of each hour, each day
        nb = max(math.ceil(86_400 / bucket), 1)
        self._counts = array("I", bytes(4 * nb))
        self._head: int | None = None  # index of the newest bucket
        self._usual = array("f", bytes(4 * 24))  # mean count per bucket, by hour of the day
        self._usual_n = array("I", bytes(4 * 24))  # closed buckets at that hour, for the plain mean at first
        self.n = 0

    def _hour(self, idx: int) -> int:
        return int(idx * self.width % 86_400 // 3_600)

    def _advance(self, idx: int) -> None:
        """Move the newest bucket to ``idx``: the buckets closed on the way join their hour's usual count."""
        head = self._head
        if head is None:
            self._head = idx
            return
        gap = idx - head
        if gap <= 0:
            return
        c, nb, usual, seen = self._counts, len(self._counts), self._usual, self._usual_n
        step = self.alpha * self.width / 3_600  # one update per bucket, so a day of an hour is 3600/width of them
        for b in range(head, head + min(gap, nb)):
            count = c[b % nb] if b == head else 0  # the buckets after the head were never written: quiet ones
            h = self._hour(b)
            n = seen[h] = min(seen[h] + 1, 1_000_000)
            usual[h] += max(step, 1.0 / n) * (count - usual[h])
        for b in range(head + 1, head + min(gap, nb) + 1):
            c[b % nb] = 0
        self._head = idx

    def add(self, t: float) -> None:
        self.n += 1
        idx = int(t // self.width)
        self._advance(idx)
        head = self._head if self._head is not None else idx
        nb = len(self._counts)
        if idx > head - nb:  # a late write within the last day counts in its own bucket; an older one is dropped
            self._counts[idx % nb] += 1

    def count(self, idx: float, buckets: int) -> int:
        """Writes in the ``buckets`` buckets that end with bucket ``idx`` (as far as the last day reaches)."""
        i = int(idx)
        head = self._head
        if head is None:
            return 0
        return _ring_sum(self._counts, max(i - buckets + 1, head - len(self._counts) + 1), min(i, head))

    def usual(self, t: float) -> float | None:
        """The table's usual writes per bucket at the hour of ``t``, once that hour has closed a bucket on a previous
        day (a day's worth of buckets) ; None before."""
        h = int(t % 86_400 // 3_600)
        per_day = 3_600 / self.width
        return float(self._usual[h]) if self._usual_n[h] >= per_day else None

    def busy(self, t: float, buckets: int, own: int, span: float, slack: float = 10.0) -> float:
        """How many times busier than usual at this hour the table's other agents are in the ``buckets`` buckets up
        to ``t`` (``own``: the agent's own writes there, left out so that its burst does not excuse itself), over
        ``span`` seconds; ``slack`` writes on both sides keep a quiet table's noise from moving it. Never below 1:
        a quiet fleet does not make an agent's usual count suspect, and a worker that sees fewer partitions of the
        table than it used to does not raise every agent's score."""
        usual = self.usual(t)
        if usual is None:
            return 1.0
        others = self.count(t // self.width, buckets) - own
        expected = usual * span / self.width
        return max(1.0, (others + slack) / (expected + slack))


@functools.cache
def _rhythm_windows(windows: tuple[float, ...]) -> tuple[tuple[float, ...], float, tuple[int, ...]]:
    """(windows in order, bucket width, buckets per window): one tuple for all the agents of a spec."""
    ordered = tuple(sorted(windows))
    width = ordered[0] / 2
    return ordered, width, tuple(max(2, round(w / width)) for w in ordered)


class Rhythm:
    """An agent's writes in a short and a long window against what this agent does at this hour of the day, scaled
    by how busy its table is now: a burst is judged against the agent's own rhythm while the fleet is as busy as it
    is.

    ``Volume`` compares a window with a baseline whose variance absorbs the daily cycle, so a low-rate agent's
    10-minute burst hides in it, and a fleet-wide peak (a sale) looks like a burst of every agent. Here the agent's
    rate is learned per hour of the day (UTC), in writes per second of its past 5-minute buckets, each divided by
    how busy the table's other agents were then relative to their usual at that hour (``TableTraffic``, shared by
    the table's agents). A window's count, this write included, is judged against that rate (the highest of this
    hour and its two neighbours, so that a job a few minutes early or late is still its own habit) times the
    window's span times how busy the table's other agents are now (never below 1). The count's chance is a
    Negative-Binomial upper tail: the rate's own uncertainty (its Gamma posterior, from the writes behind it) and
    the agent's ordinary swing from one day to the next (``dispersion``, a Gamma shape: 4 is about +-50%) widen it.
    Scored as ``OpHabit`` is, ``L / (L + L*)`` with ``L = -log10 p`` and ``L* = -log10(p_value)``: 0.5 at
    ``p_value``. Judged once the agent's first write is ``warmup`` seconds old, from ``min_count`` writes in the
    window. A window no more than ``PEAK_MARGIN`` (2) times the agent's biggest at this hour on previous days is
    its habit, whatever the rate says: a nightly job that runs in 20 minutes of an hour, whose hour's rate spreads
    it over the hour. The windows' buckets are half the short window wide, so a window covers between half and all
    of its length, and is judged over the part it covers. The counts are plain sums in a float32 array rather than
    River's ``stats``: 170 of them per agent (rates and peaks by hour) would be about 27 KB as River EWMeans.
    Memory: the windows' buckets and that array, about 1.3 KB per agent.

    >>> table = TableTraffic(bucket=300.0)
    >>> quiet, busy = Rhythm(warmup=86_400, table=table), Rhythm(warmup=86_400, table=table)
    >>> for i in range(3 * 288):                      # 3 days: a quiet agent writes once in 10 minutes ...
    ...     t = i * 300.0
    ...     if i % 2 == 0:
    ...         quiet.learn_one(Write(t=t + 7.0))
    ...     for j in range(10):                       # ... among the rest of the fleet's 10 writes in 5 minutes
    ...         busy.learn_one(Write(t=t + 30.0 * j))
    >>> t = 3 * 86_400.0 + 12 * 3_600
    >>> scores = []
    >>> for i in range(20):                           # then 20 writes in 10 minutes: x20
    ...     w = Write(t=t + 30.0 * i)
    ...     scores.append(round(quiet.score_one(w), 2)); quiet.learn_one(w)
    >>> scores.index(next(s for s in scores if s >= 0.5)) + 1   # the write that passes p_value (1e-6)
    11
    >>> print(quiet.explain(Write(t=t + 590.0))[0].text)
    21 writes in the last 10 minutes (usually 0 to 6 at this hour); a chance of 7.2e-12
    """

    __slots__ = (
        "_counts",
        "_first",
        "_head",
        "_s",
        "dispersion",
        "memory_days",
        "min_count",
        "n",
        "p_value",
        "prior_seconds",
        "spans",
        "table",
        "warmup",
        "width",
        "windows",
    )

    SLACK = 10.0  # writes added to both sides of the table's busy ratio (TableTraffic.busy)
    # A window within twice the agent's biggest at this hour on previous days is its habit (a job's night-to-night
    # swing of x2 included), whatever the hour's rate says.
    PEAK_MARGIN = 2.0
    _RC, _RS, _ALL, _DAY, _PEAK = 0, 24, 48, 50, 74  # offsets in the state array

    def __init__(
        self,
        windows: tuple[float, ...] = (600.0, 3600.0),
        warmup: float = 86_400.0,
        p_value: float = 1e-6,
        dispersion: float = 4.0,
        min_count: int = 5,
        prior_seconds: float = 1_800.0,
        memory_days: float = 7.0,
        table: TableTraffic | None = None,
    ) -> None:
        self.windows, self.width, self.spans = _rhythm_windows(tuple(windows))
        self.warmup = warmup
        self.p_value = p_value
        self.dispersion = dispersion
        self.min_count = min_count
        self.prior_seconds = prior_seconds
        self.memory_days = memory_days
        self.table = table  # the engine links its table's one instance (None: judged as if the table were steady)
        self._counts = array("I", bytes(4 * max(self.spans)))  # the agent's writes per bucket, a ring
        self._head: int | None = None
        # One flat float32 array (as DailyProfile): per hour of the day, the agent's writes (each divided by how busy
        # its table was) at _RC and bucket seconds at _RS, both fading by memory_days; the same over all hours at
        # _ALL, the prior of an hour not yet seen. Then per hour the day of its peaks (_DAY), and per window and
        # hour the most writes the agent had in that window at that hour on previous days (_PEAK, fading by
        # memory_days a day) and today so far (after those): a job that runs in a few minutes of one hour is a
        # habit of that hour, not a burst, although the hour's rate spreads it out.
        self._s = array("f", bytes(4 * (self._PEAK + 48 * len(self.spans))))
        self._first: float | None = None
        self.n = 0

    def _note_peaks(self, b: int) -> None:
        """Bucket ``b``, the newest, is over: each window that ends with it may be today's peak of its hour."""
        c, width = self._counts, self.width
        h, day = int(b * width % 86_400 // 3_600), int(b * width // 86_400)
        self._fold(h, day)
        for j, m in enumerate(self.spans):
            count = _ring_sum(c, b - m + 1, b)
            i = self._PEAK + 24 * (len(self.spans) + j) + h
            if count > self._s[i]:
                self._s[i] = count

    def _fold(self, h: int, day: int) -> None:
        """A new day for hour ``h``: yesterday's peaks join the previous days'."""
        st = self._s
        if st[self._DAY + h] >= day:
            return
        keep = 1.0 - 1.0 / max(self.memory_days, 1.0)
        nw = len(self.spans)
        for j in range(nw):
            prev, now = self._PEAK + 24 * j + h, self._PEAK + 24 * (nw + j) + h
            st[prev], st[now] = max(st[prev] * keep, st[now]), 0.0
        st[self._DAY + h] = day

    def _peak(self, j: int, t: float) -> float:
        """The most writes in window ``j`` at this hour or its neighbours on previous days."""
        h, day = int(t % 86_400 // 3_600), int(t // 86_400)
        best = 0.0
        for k in (h - 1, h, (h + 1) % 24):
            self._fold(k % 24, day)
            best = max(best, self._s[self._PEAK + 24 * j + k % 24])
        return best

    def _close(self, b: int, count: int) -> None:
        """Bucket ``b`` of the agent is over with ``count`` writes: it joins its hour's rate."""
        busy = 1.0
        table = self.table
        if count and table is not None and table.width == self.width:
            usual = table.usual(b * self.width)
            if usual is not None:
                others = table.count(b, 1) - count
                busy = max(1.0, (others + self.SLACK) / (usual + self.SLACK))
        x, width = count / busy, self.width
        h = int(b * width % 86_400 // 3_600)
        fade = 1.0 - width / (3_600 * self.memory_days)  # about 12 buckets of an hour a day, over memory_days
        st, fade_all = self._s, 1.0 - width / (86_400 * self.memory_days)
        st[h] = st[h] * fade + x
        st[self._RS + h] = st[self._RS + h] * fade + width
        st[self._ALL] = st[self._ALL] * fade_all + x
        st[self._ALL + 1] = st[self._ALL + 1] * fade_all + width

    def _advance(self, t: float) -> int:
        idx = int(t // self.width)
        head = self._head
        if head is None:
            self._head = idx
            return idx
        gap = idx - head
        if gap > 0:
            self._note_peaks(head)
            c, nb = self._counts, len(self._counts)
            # Buckets that leave the ring are closed; after a long silence, a day of quiet buckets at most.
            quiet = min(gap, int(86_400 // self.width))
            for b in range(head - nb + 1, head - nb + 1 + min(gap, nb)):
                self._close(b, c[b % nb])
                c[b % nb] = 0
            for b in range(head + 1, head + 1 + max(quiet - nb, 0)):
                self._close(b, 0)
            self._head = idx
        return idx

    def _rate(self, t: float) -> tuple[float, float]:
        """(writes per second, Gamma shape of that rate) at the hour of ``t``: the busiest of it and its neighbours."""
        st = self._s
        c_all, s_all = st[self._ALL], st[self._ALL + 1]
        prior = c_all / s_all if s_all > 0 else 0.0
        h = int(t % 86_400 // 3_600)
        best = (0.0, 0.0)
        for j in (h - 1, h, (h + 1) % 24):
            shape = st[self._RC + j] + prior * self.prior_seconds
            rate = shape / (st[self._RS + j] + self.prior_seconds)
            if rate > best[0]:
                best = (rate, shape)
        return best

    def _judge(self, w: Write) -> list[tuple[float, int, float, float, float, float, bool]]:
        """Per window: (span seconds, count with ``w``, expected mean, NB shape, table's busy factor, tail p, within
        the agent's habit at this hour); empty before the warm-up. A window whose count is well within its usual
        gets p = 1 (not computed)."""
        t = w.t
        if self._first is None or t - self._first < self.warmup:
            return []  # learn_one moves the buckets on meanwhile
        idx = self._advance(t)
        rate, shape = self._rate(t)
        r = 1.0 / (1.0 / max(shape, 1e-9) + 1.0 / self.dispersion)
        c = self._counts
        table = self.table if self.table is not None and self.table.width == self.width else None
        out = []
        for j, m in enumerate(self.spans):
            own = _ring_sum(c, idx - m + 1, idx)
            k = own + 1
            span = t - (idx - m + 1) * self.width
            busy = table.busy(t, m, own, span, self.SLACK) if table is not None else 1.0
            mean = rate * span * busy
            p, habit = 1.0, False
            if k >= self.min_count and k > mean * (1 + 2 / math.sqrt(r)) + 2:
                p = negative_binomial_tail(k, mean, r)
                habit = p < self.p_value and self._habit(j, t, k, span, busy)
            out.append((span, k, mean, r, busy, p, habit))
        return out

    def _habit(self, j: int, t: float, k: int, span: float, busy: float) -> bool:
        """Whether a window that stands out from the hour's rate is still within this agent's habit at this hour:
        no more than ``PEAK_MARGIN`` times its biggest such window at this hour on previous days (for the part of
        the window it covers, and as busy as the table is). A job that runs in a few minutes of one hour is such a
        habit, though the hour's rate spreads it over the hour; an ordinary agent's peaks are its rate's noise, a
        few writes, and hardly move the count at which its bursts alert."""
        peak = self._peak(j, t)
        return k <= self.PEAK_MARGIN * peak * min(span / self.windows[j], 1.0) * busy

    def score_one(self, w: Write) -> float:
        judged = self._judge(w)
        if not judged:
            return 0.0
        p = min(1.0 if j[6] else j[5] for j in judged)
        if p >= 1.0:
            return 0.0
        surprise = -math.log10(max(p, 1e-300))
        return surprise / (surprise - math.log10(self.p_value))

    def learn_one(self, w: Write) -> None:
        self.n += 1
        if self._first is None:
            self._first = w.t
        idx = int(w.t // self.width)
        if idx != self._head:
            self._advance(w.t)
        head = self._head if self._head is not None else idx
        nb = len(self._counts)
        # A late write older than the ring still counts in its oldest bucket, as WindowCounter does.
        slot = idx if idx > head - nb else head - nb + 1
        self._counts[slot % nb] += 1
        if self.table is not None:
            self.table.add(w.t)

    def explain(self, w: Write) -> list[Contribution]:
        judged = self._judge(w)
        if not judged:
            return []
        out = []
        ranked = sorted(zip(self.windows, judged, strict=True), key=lambda j: (j[1][6], j[1][5]))
        for window, (span, k, mean, r, busy, p, habit) in ranked:
            if p == 1.0:
                p = negative_binomial_tail(k, mean, r)
            lo, hi = negative_binomial_quantile(0.001, mean, r), negative_binomial_quantile(0.999, mean, r)
            minutes = max(round(span / 60), 1)
            fleet = f" with the table {busy:.1f}x as busy as usual" if busy >= 1.05 else ""
            text = (
                f"{num(k)} writes in the last {num(minutes)} minutes (usually {num(lo)} to {num(hi)} at this hour"
                f"{fleet}); a chance of {p:.1e}"
            )
            if habit:
                text += ", but no more than twice its biggest at this hour on previous days (its habit)"
            out.append(Contribution(f"writes_per_{window:g}s", float(k), float(lo), float(hi), None, text=text))
        return out
