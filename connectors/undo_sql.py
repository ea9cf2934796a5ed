"""The SQL of an undo plan's steps, built with psycopg ``sql``: identifiers always through ``sql.Identifier``.

``step_sql`` gives the statement with its values as placeholders and the parameters apart (what an apply binds);
``step_text`` renders the same statement with the values as literals, for people only (``writeguard undo show``).
Each statement carries its precondition in its WHERE clause (``IS NOT DISTINCT FROM`` the values the selection
left, so NULLs compare too): a row that changed since matches nothing and is not touched. A re-insert relies on
``ON CONFLICT DO NOTHING``: a key taken since inserts nothing.

>>> from datetime import UTC, datetime
>>> from undo.models import Precondition, Step
>>> s = Step(n=1, table="public.refunds", key={"id": 7}, action="update", values={"amount": 5},
...          precondition=Precondition(kind="row_matches", columns={"amount": 500}),
...          last_commit=datetime(2026, 1, 1, tzinfo=UTC))
>>> print(step_text(s))
UPDATE "public"."refunds" SET "amount" = 5 WHERE "id" = 7 AND "amount" IS NOT DISTINCT FROM 500
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final

import orjson
from psycopg import sql

from undo.models import Action, Step


def _table(name: str) -> sql.Identifier:
    schema, _, table = name.partition(".")
    return sql.Identifier(schema, table)


def _param(value: Any) -> Any:
    # A JSON object or array column's value as its JSON text: PostgreSQL casts it to the column's json/jsonb type.
    return orjson.dumps(value).decode() if isinstance(value, dict | list) else value


def step_sql(step: Step) -> tuple[sql.Composed, list[Any]]:
    """The step's statement with ``%s`` placeholders, and its parameters in order."""
    params: list[Any] = []

    def p(value: Any) -> sql.Placeholder:
        params.append(_param(value))
        return sql.Placeholder()

    table = _table(step.table)
    if step.action == "insert":
        row = step.values or {}
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in row)
        vals = sql.SQL(", ").join(p(v) for v in row.values())
        return sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(table, cols, vals), params
    sets: list[sql.Composable] = []
    if step.action != "delete":
        sets = [sql.SQL("{} = {}").format(sql.Identifier(c), p(v)) for c, v in (step.values or {}).items()]
        sets += [sql.SQL("{} = now()").format(sql.Identifier(c)) for c in step.now_columns]
    where: list[sql.Composable] = [sql.SQL("{} = {}").format(sql.Identifier(c), p(v)) for c, v in step.key.items()]
    where += [
        sql.SQL("{} IS NOT DISTINCT FROM {}").format(sql.Identifier(c), p(v))
        for c, v in step.precondition.columns.items()
        if c not in step.key
    ]
    cond = sql.SQL(" AND ").join(where)
    if step.action == "delete":
        return sql.SQL("DELETE FROM {} WHERE {}").format(table, cond), params
    return sql.SQL("UPDATE {} SET {} WHERE {}").format(table, sql.SQL(", ").join(sets), cond), params


def step_text(step: Step) -> str:
    """The step's statement with its values inlined as literals: for display only, never to execute."""
    query, params = step_sql(step)
    literals = iter([sql.Literal(v) for v in params])

    def fill(part: sql.Composable) -> sql.Composable:
        if isinstance(part, sql.Placeholder):
            return next(literals)
        if isinstance(part, sql.Composed):
            return sql.Composed([fill(x) for x in part])
        return part

    return fill(query).as_string(None)


# --- Applying: column types from pg_catalog, Debezium values as bound parameters, statements with typed casts ------
#
# A plan holds values as Debezium's JsonConverter wrote them (with writeguard's connector config: adaptive time
# precision, ``decimal.handling.mode=double``, bytes as base64), checked against Debezium 3.6.1's real output:
# timestamp -> µs since the epoch (ms for timestamp(0..3)), timestamptz -> ISO 8601 in UTC, date -> days since the
# epoch, time -> µs since midnight (ms for time(0..3)), timetz -> ISO in UTC, bytea -> base64, json/jsonb -> the JSON
# text (json keeps its exact text), numeric/money -> a double, interval -> µs (months as 365.25/12 days), arrays ->
# JSON arrays of the element's form, everything else (text, uuid, enums, inet, xml, ...) -> its text. Every
# parameter is cast to the column's own type, so PostgreSQL parses it as the column would.

_EPOCH: Final = datetime(1970, 1, 1)  # naive: a timestamp without time zone
_EPOCH_DATE: Final = date(1970, 1, 1)
_INTS: Final = frozenset({"int2", "int4", "int8", "oid"})
_FLOATS: Final = frozenset({"float4", "float8"})


class UnrestorableValue(ValueError):
    """A plan value that cannot be written back as the column's type (refused before any SQL runs)."""


@dataclass(frozen=True, slots=True)
class ColumnType:
    """A column's type as pg_catalog names it, and what decides how a Debezium value becomes its parameter.

    ``base`` is the built-in type under domains (and, for an array, of its elements), '' for a type that is not
    built in (an enum, an extension's type): its value is passed as Debezium gave it, as text.
    """

    schema: str
    name: str
    base: str
    array: bool = False
    typmod: int = -1
    generated: bool = False
    identity_always: bool = False

    def cast(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    def millis(self) -> bool:
        """timestamp(0..3) and time(0..3): Debezium's adaptive precision sends ms, not µs."""
        return self.base in ("timestamp", "time") and 0 <= self.typmod <= 3


TableTypes = Mapping[str, ColumnType]


def db_value(value: Any, col: ColumnType) -> Any:
    """The parameter that gives the column ``value`` (a Debezium JSON value) back exactly.

    >>> ts = ColumnType("pg_catalog", "timestamp", "timestamp")
    >>> db_value(1_772_368_496_123_456, ts), db_value(None, ts)
    (datetime.datetime(2026, 3, 1, 12, 34, 56, 123456), None)
    >>> db_value("AP8n", ColumnType("pg_catalog", "bytea", "bytea")).hex()
    '00ff27'
    >>> db_value(12345.67, ColumnType("pg_catalog", "numeric", "numeric"))
    Decimal('12345.67')
    >>> db_value([1_767_225_600_500_000], ColumnType("pg_catalog", "_timestamp", "timestamp", array=True))
    [datetime.datetime(2026, 1, 1, 0, 0, 0, 500000)]
    """
    if value is None:
        return None
    if col.array:
        if not isinstance(value, list):
            raise UnrestorableValue(f"expected a JSON array for {col.name}, got {type(value).__name__}")
        return [_scalar(v, col) for v in value]
    return _scalar(value, col)


def _scalar(value: Any, col: ColumnType) -> Any:
    if value is None:
        return None
    t = col.base
    if t in ("json", "jsonb"):
        # Debezium sends the JSON text (a json column's exact text); a parsed object is re-serialised.
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if isinstance(value, dict | list):
        raise UnrestorableValue(f"a JSON {type(value).__name__} cannot be written to a {col.name} column")
    if isinstance(value, bool):
        if t == "bool" or t == "":
            return value
        raise UnrestorableValue(f"a boolean cannot be written to a {col.name} column")
    if t == "bytea":
        if not isinstance(value, str):
            raise UnrestorableValue("bytea: expected base64 text")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise UnrestorableValue("bytea: not valid base64") from None
    if isinstance(value, int):
        return _from_int(value, col)
    if isinstance(value, float):
        if t in ("numeric", "money"):
            return Decimal(repr(value))  # the shortest text that is this double: 12345.67, not 12345.670000000000073
        if t in _FLOATS or t == "":
            return value
        raise UnrestorableValue(f"a number cannot be written to a {col.name} column")
    if t in _INTS or t in _FLOATS or t == "bool":
        raise UnrestorableValue(f"{col.name}: expected a JSON {'boolean' if t == 'bool' else 'number'}")
    if t == "numeric":
        try:
            return Decimal(value)  # decimal.handling.mode=string
        except ArithmeticError:
            raise UnrestorableValue(f"numeric: not a decimal number: {value[:40]!r}") from None
    return value  # text: PostgreSQL parses it as the column's type


def _from_int(value: int, col: ColumnType) -> Any:
    t = col.base
    try:
        if t == "timestamp":
            return _EPOCH + timedelta(milliseconds=value) if col.millis() else _EPOCH + timedelta(microseconds=value)
        if t == "date":
            return _EPOCH_DATE + timedelta(days=value)
        if t == "time":
            us = value * 1000 if col.millis() else value
            if not 0 <= us < 86_400_000_000:
                raise UnrestorableValue(f"time: {value} is not a time of day")
            return time(us // 3_600_000_000, us // 60_000_000 % 60, us // 1_000_000 % 60, us % 1_000_000)
        if t == "interval":
            return timedelta(microseconds=value)
    except OverflowError:
        raise UnrestorableValue(f"{col.name}: {value} is out of range") from None
    if t in _INTS or t in _FLOATS or t in ("numeric", "money", ""):
        return value
    if t in ("timestamptz", "timetz"):
        raise UnrestorableValue(f"{t}: expected ISO 8601 text (Debezium's ZonedTimestamp), got a number")
    return str(value) if t in ("text", "varchar", "bpchar") else value


CompareKind = str  # 'eq', 'jsonb', 'float8', 'utc', 'text': how a precondition column is compared


def compare_kind(value: Any, col: ColumnType) -> CompareKind:
    """How a column is compared with the value the selection left, so that equal values compare equal.

    >>> compare_kind("{}", ColumnType("pg_catalog", "json", "json"))  # json has no equality
    'jsonb'
    >>> compare_kind(0.1, ColumnType("pg_catalog", "numeric", "numeric"))  # Debezium rounded it to a double
    'float8'
    """
    if col.array:
        return "text" if col.base in ("json", "xml", "point") else "eq"
    if col.base in ("json", "jsonb"):
        return "jsonb"
    if col.base == "numeric" and isinstance(value, float):
        return "float8"
    if col.base == "timetz":
        return "utc"  # Debezium sends it in UTC: the writer's offset is not in the event
    if col.base in ("xml", "point"):
        return "text"
    return "eq"


def compare_param(value: Any, col: ColumnType, kind: CompareKind) -> Any:
    return value if kind == "float8" else db_value(value, col)


def _compare(column: str, col: ColumnType, kind: CompareKind) -> sql.Composed:
    c, p = sql.Identifier(column), sql.Placeholder()
    if kind == "jsonb":
        return sql.SQL("{}::jsonb IS NOT DISTINCT FROM {}::jsonb").format(c, p)
    if kind == "float8":
        return sql.SQL("{}::float8 IS NOT DISTINCT FROM {}::float8").format(c, p)
    if kind == "utc":
        return sql.SQL("timezone('UTC', {}) IS NOT DISTINCT FROM timezone('UTC', {}::{})").format(c, p, col.cast())
    if kind == "text":
        return sql.SQL("{}::text IS NOT DISTINCT FROM {}::{}::text").format(c, p, col.cast())
    return sql.SQL("{} IS NOT DISTINCT FROM {}::{}").format(c, p, col.cast())


@dataclass(frozen=True, slots=True)
class Shape:
    """What a step's statement looks like apart from its values: steps of one shape share one prepared statement."""

    table: str
    action: Action
    key: tuple[str, ...]
    sets: tuple[str, ...]
    now: tuple[str, ...]
    checks: tuple[tuple[str, CompareKind], ...]
    force: bool


def shape_of(step: Step, types: TableTypes, force: bool) -> Shape:
    """The step's statement shape. ``force``: a reviewed conflict, applied without its precondition."""
    values = step.values or {}
    sets = tuple(c for c in values if not types[c].generated)
    checks: tuple[tuple[str, CompareKind], ...] = ()
    if not force and step.action != "insert":
        checks = tuple(
            (c, compare_kind(v, types[c])) for c, v in step.precondition.columns.items() if c not in step.key
        )
    return Shape(step.table, step.action, tuple(step.key), sets, tuple(step.now_columns), checks, force)


def shape_params(step: Step, shape: Shape, types: TableTypes) -> list[Any]:
    """The step's parameters in the order of :func:`shape_sql`'s placeholders."""
    values = step.values or {}
    sets = [db_value(values[c], types[c]) for c in shape.sets]
    if shape.action == "insert":
        return sets
    keys = [db_value(step.key[c], types[c]) for c in shape.key]
    pre = step.precondition.columns
    checks = [compare_param(pre[c], types[c], kind) for c, kind in shape.checks]
    return [*([] if shape.action == "delete" else sets), *keys, *checks]


def shape_sql(shape: Shape, types: TableTypes) -> sql.Composed:
    """The statement of a shape, every value a cast placeholder; UPDATE and DELETE carry the precondition.

    >>> int4, text = ColumnType("pg_catalog", "int4", "int4"), ColumnType("pg_catalog", "text", "text")
    >>> s = Shape("public.t", "update", ("id",), ("note",), (), (("note", "eq"),), False)
    >>> print(shape_sql(s, {"id": int4, "note": text}).as_string(None).replace('"pg_catalog".', ""))
    UPDATE "public"."t" SET "note" = %s::"text" WHERE "id" = %s::"int4" AND "note" IS NOT DISTINCT FROM %s::"text"
    """
    table = _table(shape.table)
    p = sql.Placeholder()
    if shape.action == "insert":
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in shape.sets)
        vals = sql.SQL(", ").join(sql.SQL("{}::{}").format(p, types[c].cast()) for c in shape.sets)
        overriding = sql.SQL(" OVERRIDING SYSTEM VALUE" if any(types[c].identity_always for c in shape.sets) else "")
        others = [c for c in shape.sets if c not in shape.key]
        conflict: sql.Composable
        if shape.force and others:
            # A reviewed key reuse: the row written since under the key gets the plan's values.
            conflict = sql.SQL("ON CONFLICT ({}) DO UPDATE SET {}").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in shape.key),
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in others),
            )
        else:
            conflict = sql.SQL("ON CONFLICT DO NOTHING")
        return sql.SQL("INSERT INTO {} ({}){} VALUES ({}) {}").format(table, cols, overriding, vals, conflict)
    where: list[sql.Composable] = [
        sql.SQL("{} = {}::{}").format(sql.Identifier(c), p, types[c].cast()) for c in shape.key
    ]
    where += [_compare(c, types[c], kind) for c, kind in shape.checks]
    cond = sql.SQL(" AND ").join(where)
    if shape.action == "delete":
        return sql.SQL("DELETE FROM {} WHERE {}").format(table, cond)
    sets: list[sql.Composable] = [
        sql.SQL("{} = {}::{}").format(sql.Identifier(c), p, types[c].cast()) for c in shape.sets
    ]
    sets += [sql.SQL("{} = now()").format(sql.Identifier(c)) for c in shape.now]
    return sql.SQL("UPDATE {} SET {} WHERE {}").format(table, sql.SQL(", ").join(sets), cond)


def lock_sql(table: str, key: Sequence[str], types: TableTypes) -> sql.Composed:
    """Lock the rows of these keys (``FOR UPDATE``, in key order) and return the steps whose row exists.

    Parameters: an int4[] of step numbers, then one array per key column, in ``key`` order.
    """
    alias = sql.Identifier("_t")
    cols = [sql.Identifier(f"_k{i}") for i in range(len(key))]
    arrays = [sql.SQL("%s::int4[]")] + [sql.SQL("%s::{}[]").format(types[c].cast()) for c in key]
    on = sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}").format(alias, sql.Identifier(c), sql.Identifier("_u"), k)
        for c, k in zip(key, cols, strict=True)
    )
    order = sql.SQL(", ").join(sql.SQL("{}.{}").format(alias, sql.Identifier(c)) for c in key)
    return sql.SQL(
        "SELECT {u}.{n} FROM {table} AS {t} JOIN unnest({arrays}) AS {u}({n}, {cols}) ON {on} "
        "ORDER BY {order} FOR UPDATE OF {t}"
    ).format(
        u=sql.Identifier("_u"),
        n=sql.Identifier("_n"),
        table=_table(table),
        t=alias,
        arrays=sql.SQL(", ").join(arrays),
        cols=sql.SQL(", ").join(cols),
        on=on,
        order=order,
    )


def row_sql(table: str, key: Sequence[str], types: TableTypes) -> sql.Composed:
    """The row under a key as JSON (what a step that was not applied found there), one key value per parameter."""
    where = sql.SQL(" AND ").join(
        sql.SQL("{} = {}::{}").format(sql.Identifier(c), sql.Placeholder(), types[c].cast()) for c in key
    )
    return sql.SQL("SELECT to_jsonb({t}) FROM {} AS {t} WHERE {}").format(_table(table), where, t=sql.Identifier("_t"))
