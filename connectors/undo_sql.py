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

from typing import Any

import orjson
from psycopg import sql

from undo.models import Step


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
