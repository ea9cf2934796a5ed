"""Online detectors, one small class per idea, with River's verbs.

Every detector has ``score_one(x, op, t) -> float`` (a score in [0, 1], higher is stranger),
``learn_one(x, op, t)`` and ``explain(x, op, t)``. ``x`` is a dict of numeric features of one change
event, ``op`` its Debezium op code and ``t`` its commit time in seconds. Value models ignore ``op`` and
``t``; the deterministic guards ignore ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from river import stats

Features = Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Contribution:
    """One feature's observed value against what the model expected: what a human reads first."""

    feature: str
    value: float
    expected_low: float | None
    expected_high: float | None
    z: float | None = None


class Detector(Protocol):
    n: int  # events learned

    def score_one(self, x: Features, op: str = "c", t: float = 0.0) -> float: ...
    def learn_one(self, x: Features, op: str = "c", t: float = 0.0) -> None: ...
    def explain(self, x: Features, op: str = "c", t: float = 0.0) -> list[Contribution]: ...


def signed_log1p(v: float) -> float:
    return math.copysign(math.log1p(abs(v)), v)


def signed_expm1(v: float) -> float:
    return math.copysign(math.expm1(abs(v)), v)


class ZScore:
    """Per-feature running mean and variance; the score is the largest |z| squashed into [0, 1].

    Each feature keeps a River ``stats.Var`` (Welford): about 1 KB per agent and well under a
    microsecond per feature, where a default HalfSpaceTrees holds ~1.5 MB. ``log_features`` are
    compared as sign(x)*log1p(|x|), so a heavy-tailed amount is judged on its order of magnitude.
    The score is ``z / (z + half_z)``: 0.5 at ``half_z`` standard deviations, 0.7 at 2.33 times that.

    >>> m = ZScore(log_features={"amount"})
    >>> for i in range(50):
    ...     m.learn_one({"amount": 20.0 + i % 5})
    >>> m.score_one({"amount": 22.0}) < 0.5
    True
    >>> m.score_one({"amount": 450.0}) > 0.7
    True
    >>> m.explain({"amount": 450.0})[0].feature
    'amount'
    """

    __slots__ = ("_log", "_min_count", "_min_std", "_only", "_stats", "half_z", "n")

    def __init__(
        self,
        features: Iterable[str] | None = None,
        log_features: Iterable[str] = (),
        half_z: float = 4.0,
        min_std: float = 0.05,
        min_count: int = 2,
    ) -> None:
        self._only = frozenset(features) if features is not None else None
        self._log = frozenset(log_features)
        self.half_z = half_z
        self._min_std = min_std
        # Per feature: a feature seen only on some ops (an update's delta) warms up more slowly than the rest.
        self._min_count = max(min_count, 2)
        self._stats: dict[str, stats.Var] = {}
        self.n = 0

    def _value(self, name: str, v: float) -> float:
        return signed_log1p(v) if name in self._log else v

    def _z(self, name: str, v: float) -> float | None:
        s = self._stats.get(name)
        if s is None or s.mean.n < self._min_count:
            return None
        std = max(math.sqrt(max(s.get(), 0.0)), self._min_std)
        return (self._value(name, v) - s.mean.get()) / std

    def learn_one(self, x: Features, op: str = "c", t: float = 0.0) -> None:
        only = self._only
        for name, v in x.items():
            if only is not None and name not in only:
                continue
            s = self._stats.get(name)
            if s is None:
                s = self._stats[name] = stats.Var()
            s.update(self._value(name, v))
        self.n += 1

    def score_one(self, x: Features, op: str = "c", t: float = 0.0) -> float:
        worst = 0.0
        only = self._only
        for name, v in x.items():
            if only is not None and name not in only:
                continue
            z = self._z(name, v)
            if z is not None and abs(z) > worst:
                worst = abs(z)
        return worst / (worst + self.half_z)

    def explain(self, x: Features, op: str = "c", t: float = 0.0) -> list[Contribution]:
        """Features by decreasing |z|, each with the mean +/- 3 std range in the data's own units."""
        out: list[Contribution] = []
        for name, v in x.items():
            z = self._z(name, v)
            s = self._stats.get(name)
            if z is None or s is None:
                continue
            mean = s.mean.get()
            std = max(math.sqrt(max(s.get(), 0.0)), self._min_std)
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
    ...     m.learn_one({"amount": 20.0 + i % 7, "items": 1.0 + i % 3})
    >>> 0.0 <= m.score_one({"amount": 22.0, "items": 2.0}) <= 1.0
    True
    """

    __slots__ = ("_model", "_only", "n")

    def __init__(
        self,
        model: str = "anomaly.HalfSpaceTrees",
        params: Mapping[str, Any] | None = None,
        scaler: str = "minmax",
        features: Iterable[str] | None = None,
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
        self.n = 0

    def _select(self, x: Features) -> dict[str, float]:
        if self._only is None:
            return dict(x)
        return {k: v for k, v in x.items() if k in self._only}

    def learn_one(self, x: Features, op: str = "c", t: float = 0.0) -> None:
        self._model.learn_one(self._select(x))
        self.n += 1

    def score_one(self, x: Features, op: str = "c", t: float = 0.0) -> float:
        return float(self._model.score_one(self._select(x)))

    def explain(self, x: Features, op: str = "c", t: float = 0.0) -> list[Contribution]:
        return [Contribution(k, float(v), None, None) for k, v in self._select(x).items()]


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
        idx = self._advance(t)
        n = len(self._counts)
        # A late event older than the window still counts in the oldest slot: undercounting would hide a burst.
        slot = idx if idx > self._head - n else self._head - n + 1
        self._counts[slot % n] += weight

    def count(self, t: float) -> int:
        self._advance(t)
        return sum(self._counts)


class RateCeiling:
    """Fires (score 1) when an agent's writes in the last ``window`` seconds exceed ``max_events``.

    Deterministic, so it covers an agent from its very first write, before any model has warmed up.

    >>> g = RateCeiling(max_events=3, window=60.0)
    >>> scores = []
    >>> for t in range(5):
    ...     scores.append(g.score_one({}, "c", float(t)))
    ...     g.learn_one({}, "c", float(t))
    >>> scores
    [0.0, 0.0, 0.0, 1.0, 1.0]
    """

    __slots__ = ("_counter", "max_events", "n", "window")

    def __init__(self, max_events: int, window: float = 60.0) -> None:
        self.n = 0
        self.max_events = max_events
        self.window = window
        self._counter = WindowCounter(window)

    def _weight(self, op: str) -> int:
        return 1

    def score_one(self, x: Features, op: str = "c", t: float = 0.0) -> float:
        w = self._weight(op)
        if w == 0:
            return 0.0
        return 1.0 if self._counter.count(t) + w > self.max_events else 0.0

    def learn_one(self, x: Features, op: str = "c", t: float = 0.0) -> None:
        w = self._weight(op)
        self.n += 1
        if w:
            self._counter.add(t, w)

    def explain(self, x: Features, op: str = "c", t: float = 0.0) -> list[Contribution]:
        label = f"events_per_{self.window:g}s"
        return [Contribution(label, float(self._counter.count(t) + self._weight(op)), 0.0, float(self.max_events))]


class OpBurstCeiling(RateCeiling):
    """Fires when destructive ops (deletes by default) in the window exceed ``max_events``.

    A truncate counts as a whole burst by itself: it removes every row at once.

    >>> g = OpBurstCeiling(max_events=2, ops=("d", "t"))
    >>> [g.score_one({}, op, 0.0) for op in ("c", "t")]
    [0.0, 1.0]
    """

    __slots__ = ("ops",)

    def __init__(self, max_events: int, window: float = 60.0, ops: Iterable[str] = ("d", "t")) -> None:
        super().__init__(max_events, window)
        self.ops = frozenset(ops)

    def _weight(self, op: str) -> int:
        if op not in self.ops:
            return 0
        return self.max_events + 1 if op == "t" else 1

    def explain(self, x: Features, op: str = "c", t: float = 0.0) -> list[Contribution]:
        label = f"{'/'.join(sorted(self.ops))}_per_{self.window:g}s"
        return [Contribution(label, float(self._counter.count(t) + self._weight(op)), 0.0, float(self.max_events))]
