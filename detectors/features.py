"""Turn one change event's row images into what detection needs: the agent, its run, numeric features.

Values come from the watched database and are untrusted: anything that is not a finite number is
skipped rather than guessed at.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from detectors.spec import FeatureSpec, FieldPath, TableSpec

Row = Mapping[str, Any]


def lookup(row: Row | None, keys: tuple[str, ...]) -> Any:
    cur: Any = row
    for k in keys:
        # A decoded row is a plain dict: the exact type check spares the ABC's isinstance on every column read.
        if type(cur) is not dict and not isinstance(cur, Mapping):
            return None
        cur = cur.get(k)
    return cur


def as_number(v: Any) -> float | None:
    """A finite float from a JSON number or a numeric string (Debezium's decimal.handling.mode=string)."""
    if type(v) is float:  # the common case first: a JSON number with a fraction
        return v if math.isfinite(v) else None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        try:
            f = float(v)
        except OverflowError:  # a JSON integer beyond 1.8e308
            return None
    elif isinstance(v, str):
        try:
            f = float(v)
        except (ValueError, OverflowError):
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def pick(path: FieldPath, op: str, before: Row | None, after: Row | None) -> Any:
    if path.image == "after":
        return lookup(after, path.keys)
    if path.image == "before":
        return lookup(before, path.keys)
    return lookup(before if op == "d" else after, path.keys)


ID_LIMIT = 256
DIGEST_MARK = "~sha256:"
# How much shorter than ``limit`` an over-long id's readable prefix is: its digest form is then ``limit + 16`` long.
_PREFIX_CUT = len(DIGEST_MARK) + 64 - 16


def identity(v: Any, limit: int = ID_LIMIT) -> str | None:
    """An id as text, bounded so that a hostile 10 MB value cannot become a key, yet never merged with another.

    An id longer than ``limit`` becomes its readable prefix (``limit - 56`` characters), ``~sha256:`` and the hex
    SHA-256 of the whole id. That form is longer than ``limit``, so it equals no id kept as it is (nor the form
    of another id, short of a SHA-256 collision), and a writer who sends it gets it digested again.

    >>> identity("agent-7"), identity(42), identity(""), identity(None), identity({"a": 1})
    ('agent-7', '42', None, None, None)
    >>> a, b = identity("x" * 300), identity("x" * 299 + "y")
    >>> a[:3], a[200:208], len(a), a == identity("x" * 300), a == b, identity(a) == a
    ('xxx', '~sha256:', 272, True, False, False)
    """
    if type(v) is str and 0 < len(v) <= limit:  # the common case first: a short id, kept as it is
        return v
    if v is None or isinstance(v, dict | list):
        return None
    try:
        s = v if isinstance(v, str) else str(v)
    except ValueError:  # an integer beyond Python's 4,300-digit limit for str(): no id anyone could use
        return None
    if not s:
        return None
    if len(s) <= limit:
        return s
    # surrogatepass: a lone surrogate (valid in a JSON string) must digest, not raise.
    digest = hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{s[: max(limit - _PREFIX_CUT, 0)]}{DIGEST_MARK}{digest}"


def typed_identity(text: str) -> str:
    """An agent id a person typed (``release``, ``--agent``), named as the worker names it: the digest form copied
    from an alert stays as it is, a raw over-long id becomes that form.

    >>> typed_identity("refund-bot-7"), typed_identity(identity("x" * 300)) == identity("x" * 300)
    ('refund-bot-7', True)
    >>> typed_identity("x" * 300) == identity("x" * 300)
    True
    """
    cut = ID_LIMIT - _PREFIX_CUT
    form = len(text) == cut + len(DIGEST_MARK) + 64 and text[cut : cut + len(DIGEST_MARK)] == DIGEST_MARK
    return text if form else (identity(text) or text)


class Extractor:
    """Compiled reader for one table's provenance fields and features.

    >>> from detectors.spec import TableSpec, FeatureSpec
    >>> spec = TableSpec(name="public.refunds", topic="shop.public.refunds",
    ...                  features=(FeatureSpec(name="amount", column="amount", transform="log"),
    ...                            FeatureSpec(name="amount_change", column="amount", delta=True, ops=("u",))))
    >>> ex = Extractor(spec)
    >>> ex.agent("u", {"agent_id": "a1", "amount": 10}, {"agent_id": "a1", "run_id": "r9", "amount": 25})
    ('a1', 'r9')
    >>> ex.features("u", {"amount": 10}, {"amount": 25})
    {'amount': 25.0, 'amount_change': 15.0}
    >>> ex.features("u", {"amount": 10}, {"amount": 10})  # unchanged: no delta
    {'amount': 10.0}
    >>> raise_ = Extractor(TableSpec(name="public.t", topic="t", features=(
    ...     FeatureSpec(name="limit_ratio", column="limit", relative=True, ops=("u",)),)))
    >>> round(raise_.features("u", {"limit": 5_000}, {"limit": 50_000})["limit_ratio"], 2)  # x10
    2.3
    >>> ex.categories("u", None, {"reason": "late"}) is None  # the spec names no categorical column
    True
    """

    __slots__ = ("_agent", "_cats", "_features", "_key", "_run")

    def __init__(self, spec: TableSpec) -> None:
        self._agent = _compile_path(FieldPath.parse(spec.agent_id))
        self._run = _compile_path(FieldPath.parse(spec.run_id)) if spec.run_id else None
        # Compiled once per table, read on every change: (name, kind, ops, keys, divide_by keys).
        self._features: tuple[tuple[str, int, frozenset[str], tuple[str, ...], tuple[str, ...] | None], ...] = tuple(
            (f.name, _kind(f), frozenset(f.ops), tuple(f.column.split(".")),
             tuple(f.divide_by.split(".")) if f.divide_by else None)
            for f in spec.features
        )  # fmt: skip
        self._cats = tuple((col, tuple(col.split(".")), "." not in col) for col in spec.categories)
        self._key = tuple(spec.idempotency_key.split(".")) if spec.idempotency_key else None

    def agent(self, op: str, before: Row | None, after: Row | None) -> tuple[str | None, str | None]:
        agent = identity(_pick(self._agent, op, before, after))
        run = identity(_pick(self._run, op, before, after)) if self._run is not None else None
        return agent, run

    def features(self, op: str, before: Row | None, after: Row | None) -> dict[str, float]:
        out: dict[str, float] = {}
        row = before if op == "d" else after
        for name, kind, ops, keys, per in self._features:
            if op not in ops:
                continue
            if kind == _COLUMN:  # a top-level column of a decoded row: lookup's loop, unrolled
                v = as_number(row.get(keys[0]) if type(row) is dict else lookup(row, keys))
                if v is not None:
                    out[name] = v
            elif kind == _PLAIN:
                v = as_number(lookup(row, keys))
                if v is not None:
                    out[name] = v
            elif kind == _RATIO:
                num, den = as_number(lookup(row, keys)), as_number(lookup(row, per))  # type: ignore[arg-type]
                # Two finite numbers can still divide or subtract to inf (1e308 / 1e-308): such a value has no
                # meaning for a model, and inf would not survive the JSON of the changes topic either.
                if num is not None and den and math.isfinite(q := num / den):
                    out[name] = q
            elif kind == _RELATIVE:
                a = as_number(lookup(after, keys))
                b = as_number(lookup(before, keys))
                if a is not None and b is not None and a != b:
                    r = math.copysign(math.log1p(abs(a)), a) - math.copysign(math.log1p(abs(b)), b)
                    if math.isfinite(r):
                        out[name] = r
            else:
                a = as_number(lookup(after, keys))
                b = as_number(lookup(before, keys))
                # An update that left the column as it was says nothing about the size of a change: learned as
                # zeros, a job's thousands of status-only updates would make every real change look extreme.
                if a is not None and b is not None and math.isfinite(d := a - b) and d != 0:
                    out[name] = d
        return out

    def categories(self, op: str, before: Row | None, after: Row | None) -> dict[str, str] | None:
        """Categorical columns as text; None when the table has none."""
        if not self._cats:
            return None
        row = before if op == "d" else after
        out: dict[str, str] = {}
        flat = type(row) is dict
        for col, keys, single in self._cats:
            v = identity(row.get(col) if flat and single else lookup(row, keys), 128)  # type: ignore[union-attr]
            if v is not None:
                out[col] = v
        return out

    def idempotency_key(self, op: str, before: Row | None, after: Row | None) -> str | None:
        """The idempotency key column as text; None when the table has none or the row lacks it."""
        if self._key is None:
            return None
        return identity(lookup(before if op == "d" else after, self._key), 256)


# What a feature computes from its column, decided once per table rather than per change.
_COLUMN, _PLAIN, _RATIO, _RELATIVE, _DELTA = range(5)  # _COLUMN: _PLAIN of a top-level column
_IMAGES = {"row": 0, "after": 1, "before": 2}


def _kind(f: FeatureSpec) -> int:
    if f.divide_by is not None:
        return _RATIO
    if f.relative:
        return _RELATIVE
    if f.delta:
        return _DELTA
    return _COLUMN if "." not in f.column else _PLAIN


def _compile_path(path: FieldPath) -> tuple[int, tuple[str, ...], bool]:
    return _IMAGES[path.image], path.keys, len(path.keys) == 1


def _pick(path: tuple[int, tuple[str, ...], bool], op: str, before: Row | None, after: Row | None) -> Any:
    image, keys, single = path
    if image == 0:
        row = before if op == "d" else after
    else:
        row = after if image == 1 else before
    if single and type(row) is dict:  # a top-level column of a decoded row: lookup's loop, unrolled
        return row.get(keys[0])
    return lookup(row, keys)
