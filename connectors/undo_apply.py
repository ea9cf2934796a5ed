"""``apply_plan``: run an undo plan against PostgreSQL, in batches, idempotently, with a ledger of every outcome.

Before any SQL: :func:`undo.plan.verify_plan_id` (a plan changed after it was made is refused), then the tables'
column types are read from pg_catalog once and every value the plan would write or compare is converted to its
column's type (:func:`connectors.undo_sql.db_value`); a missing table or column, a key that is not a unique key of
its table, or a value that cannot be written back refuses the plan (:class:`ApplyRefused`), nothing changed.

Each batch of ``batch_size`` steps is one transaction:

1. ``pg_advisory_xact_lock`` on the plan id: two applies of one plan never interleave;
2. the steps the ledger has as ``applied`` are skipped (``already_applied``). The ledger rows commit with the
   writes, so after a crash exactly the committed steps are skipped. A step that was not applied (precondition
   failed, key taken, skipped, conflict) is looked at again by the next run: a reviewer may have set ``force``;
3. ``SELECT ... FOR UPDATE`` of the batch's rows by key, per table, in key order;
4. each step whose decision is ``apply`` or ``force`` runs as one statement (pipelined: no round trip per step;
   steps of one shape share a prepared statement) whose WHERE clause carries the precondition (the columns still
   hold what the selection left, compared as their type compares). ``force`` drops the precondition, and a forced
   re-insert overwrites the row that took the key since. The row count says applied or ``precondition_failed``;
   a re-insert whose key exists is ``key_taken``;
5. every outcome goes to the ledger (what was written, the agent's values, what the row held when a step was not
   applied, the transaction id, who ran it, ``session_user``);
6. ``pg_logical_emit_message(true, <prefix>, <json>)`` names the agent ``writeguard-undo`` and the plan, with an
   HMAC over the plan id and the transaction's 32-bit xid (:func:`connectors.messages.undo_signature`): the
   compensating writes reach Kafka attributed to the undo, and the worker can tell a genuine undo transaction.
   It is emitted before step 3, so that it precedes the batch's rows in the WAL and in Debezium's output.

Then COMMIT, or ROLLBACK in a dry run (which therefore reports exactly what would change and changes nothing, not
even the ledger). After each commit the batch's corrections are published (:mod:`connectors.corrections`), and
their delivery recorded in the ledger; a run first publishes what an earlier run applied but never confirmed.

Values are Debezium's: a ``numeric`` column arrives as a double (``decimal.handling.mode=double``), so digits past
a double's 15-17 are not in the plan and cannot come back; an ``interval`` arrives as µs with months as 30.4375
days, and a ``timetz`` in UTC (its offset lost). Preconditions compare those as Debezium saw them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import orjson
import psycopg
from psycopg import sql

from connectors.corrections import Correction, Delivered
from connectors.messages import UNDO_AGENT, undo_signature
from connectors.undo_sql import (
    ColumnType,
    Shape,
    TableTypes,
    UnrestorableValue,
    compare_kind,
    compare_param,
    db_value,
    lock_sql,
    row_sql,
    shape_of,
    shape_params,
    shape_sql,
)
from undo.models import ApplyOutcome, ApplyReport, Plan, Step, StepOutcome
from undo.plan import verify_plan_id

DEFAULT_LEDGER: Final = "writeguard.undo_ledger"
# pg_advisory_xact_lock(int4, int4): this namespace, and 32 bits of the plan id ('wgud').
_LOCK_NAMESPACE: Final = 0x77677564
_LEDGER_LOCK: Final = 0  # the second key while creating the ledger
_DETAIL_LIMIT: Final = 500
_NOT_APPLIED: Final = frozenset({"precondition_failed", "key_taken"})


class ApplyRefused(ValueError):
    """The plan does not fit this database (a table, a column, a key, a value): nothing was run."""


class StepFailed(RuntimeError):
    """The database refused a batch; ``step`` is the step whose statement failed, when one did.

    The batch was rolled back: the ledger and the tables are as after the previous batch. The message holds the
    server's message, never the connection string.
    """

    def __init__(self, batch: int, steps: Sequence[Step], step: Step | None, error: psycopg.Error) -> None:
        self.batch = batch
        self.step = step
        self.sqlstate = error.sqlstate
        self.server_message = server_message(error)
        if step is not None:
            where = f"step {step.n} ({step.action} {step.table} {json.dumps(step.key, ensure_ascii=False)})"
        elif steps:
            where = f"batch {batch} (steps {steps[0].n}..{steps[-1].n})"
        else:
            where = f"batch {batch}"
        super().__init__(f"{where}: {self.server_message}")


def server_message(e: psycopg.Error) -> str:
    """PostgreSQL's own message (and detail), or the exception's class: never the DSN, bounded in length."""
    primary = e.diag.message_primary
    if not primary:
        return type(e).__name__
    detail = e.diag.message_detail
    text = primary + (f" ({detail})" if detail else "")
    return text if len(text) <= _DETAIL_LIMIT else text[:_DETAIL_LIMIT] + "..."


@dataclass(frozen=True, slots=True)
class BatchDone:
    """Progress after one batch: for progress lines (steps done, rows/s)."""

    batch: int
    steps_done: int
    steps_total: int
    seconds: float
    outcomes: Mapping[str, int]


class CorrectionSink(Protocol):
    topic: str

    def publish(self, corrections: Sequence[Correction]) -> list[Delivered]: ...


def split_name(name: str) -> tuple[str, str]:
    """``schema.table`` as its two parts (the schema is required: no search_path guessing).

    >>> split_name("writeguard.undo_ledger")
    ('writeguard', 'undo_ledger')
    """
    schema, dot, table = name.partition(".")
    if not dot or not schema or not table or "." in table:
        raise ApplyRefused(f"{name!r}: expected '<schema>.<table>'")
    return schema, table


def lock_keys(plan_id: str) -> tuple[int, int]:
    """The two int4 keys of the plan's advisory lock.

    >>> lock_keys("00000001" + "0" * 56)
    (2003268964, 1)
    """
    return _LOCK_NAMESPACE, int.from_bytes(bytes.fromhex(plan_id[:8]), "big", signed=True)


def ledger_ddl(ledger: str) -> list[sql.Composed]:
    """The ledger's schema and table: one row per (plan, step), the latest outcome; ``applied`` is final."""
    schema, table = split_name(ledger)
    ident = sql.Identifier(schema, table)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
    plan_id text NOT NULL,
    step integer NOT NULL,
    batch integer NOT NULL,
    table_name text NOT NULL,
    row_key jsonb NOT NULL,
    action text NOT NULL,
    decision text NOT NULL,
    outcome text NOT NULL
        CHECK (outcome IN ('applied', 'precondition_failed', 'key_taken', 'skipped', 'conflict')),
    detail text,
    restored jsonb,
    agent_values jsonb NOT NULL,
    now_columns jsonb NOT NULL DEFAULT '[]',
    found jsonb,
    tx_id bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL,
    session_user_name text NOT NULL DEFAULT session_user,
    attempts integer NOT NULL DEFAULT 1,
    published_at timestamptz,
    kafka_topic text,
    kafka_partition integer,
    kafka_offset bigint,
    PRIMARY KEY (plan_id, step)
)"""
        ).format(ident),
        sql.SQL("COMMENT ON TABLE {} IS {}").format(
            ident,
            sql.Literal(
                "writeguard undo apply: the outcome of each plan step (restored = values written back, found = what "
                "the row held when a step was not applied, tx_id = the 32-bit xid, as Debezium's source.txId)"
            ),
        ),
    ]


def ensure_ledger(conn: psycopg.Connection[Any], ledger: str) -> None:
    """Create the ledger if it is missing, in the caller's transaction (so a dry run's is rolled back too)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LEDGER_LOCK))
    if not ledger_exists(conn, ledger):
        for statement in ledger_ddl(ledger):
            conn.execute(statement)


def ledger_exists(conn: psycopg.Connection[Any], ledger: str) -> bool:
    name = sql.Identifier(*split_name(ledger)).as_string(conn)
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


# --- the database's side: column types and unique keys ------------------------------------------------------


def read_types(conn: psycopg.Connection[Any], tables: Iterable[str]) -> dict[str, dict[str, ColumnType]]:
    """Table -> column -> type, from pg_catalog, for the tables that exist (domains and arrays resolved)."""
    names = sorted(set(tables))
    parts = [split_name(t) for t in names]
    cols = conn.execute(
        """SELECT n.nspname, c.relname, a.attname, a.atttypid, a.atttypmod, a.attgenerated <> '', a.attidentity = 'a'
           FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           JOIN unnest(%s::text[], %s::text[]) AS w(s, t) ON w.s = n.nspname AND w.t = c.relname
           WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
           ORDER BY n.nspname, c.relname, a.attnum""",
        ([s for s, _ in parts], [t for _, t in parts]),
    ).fetchall()
    catalog: dict[int, tuple[str, str, str, int, int, str, int]] = {}
    wanted = {row[3] for row in cols}
    while wanted - set(catalog):
        rows = conn.execute(
            """SELECT t.oid, tn.nspname, t.typname, t.typtype, t.typbasetype, t.typelem, t.typcategory, t.typtypmod
               FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace
               WHERE t.oid = ANY(%s::oid[])""",
            (sorted(wanted - set(catalog)),),
        ).fetchall()
        if not rows:
            break
        for oid, nsp, name, kind, basetype, elem, category, typmod in rows:
            catalog[oid] = (nsp, name, kind, basetype, elem, category, typmod)
            wanted.update(x for x in (basetype, elem) if x)
    out: dict[str, dict[str, ColumnType]] = {}
    for nsp, rel, att, typoid, typmod, generated, identity in cols:
        nsp_t, name, *_ = catalog[typoid]
        base, array, domain_typmod = _resolve(typoid, catalog)
        out.setdefault(f"{nsp}.{rel}", {})[att] = ColumnType(
            schema=nsp_t,
            name=name,
            base=base,
            array=array,
            typmod=typmod if typmod != -1 else domain_typmod,
            generated=bool(generated),
            identity_always=bool(identity),
        )
    return out


def _resolve(oid: int, catalog: Mapping[int, tuple[str, str, str, int, int, str, int]]) -> tuple[str, bool, int]:
    """(built-in base type name or '', is an array, a domain's typmod) of a type."""
    typmod = -1

    def undomain(o: int) -> tuple[str, str, str, int, int, str, int]:
        nonlocal typmod
        t = catalog[o]
        while t[2] == "d" and t[3] in catalog:
            typmod = t[6] if typmod == -1 else typmod
            t = catalog[t[3]]
        return t

    t = undomain(oid)
    array = t[5] == "A" and t[4] != 0 and t[4] in catalog
    if array:
        t = undomain(t[4])
    base = t[1] if t[0] == "pg_catalog" and t[2] == "b" else ""
    return base, array, typmod


def unique_keys(conn: psycopg.Connection[Any], tables: Iterable[str]) -> dict[str, list[frozenset[str]]]:
    """Table -> the column sets of its unique, non-partial, plain-column indexes (the primary key among them)."""
    parts = [split_name(t) for t in sorted(set(tables))]
    rows = conn.execute(
        """SELECT n.nspname, c.relname,
                  array(SELECT a.attname::text FROM unnest(i.indkey) k
                        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k)
           FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           JOIN unnest(%s::text[], %s::text[]) AS w(s, t) ON w.s = n.nspname AND w.t = c.relname
           WHERE i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL""",
        ([s for s, _ in parts], [t for _, t in parts]),
    ).fetchall()
    out: dict[str, list[frozenset[str]]] = {}
    for nsp, rel, columns in rows:
        out.setdefault(f"{nsp}.{rel}", []).append(frozenset(columns))
    return out


def runs(step: Step) -> bool:
    """Whether the step's decision lets it run: ``apply``, or ``force`` on a reviewed conflict."""
    return step.decision in ("apply", "force")


def check_plan(
    plan: Plan, types: Mapping[str, TableTypes], uniques: Mapping[str, Sequence[frozenset[str]]]
) -> list[str]:
    """Why the plan cannot run against these tables (pure: for a plan and what pg_catalog said); [] when it can."""
    problems: list[str] = []
    keys: dict[str, tuple[str, ...]] = {}
    for s in plan.steps:
        if not runs(s):
            continue
        cols = types.get(s.table)
        if cols is None:
            problems.append(f"step {s.n}: table {s.table} does not exist (or is no table)")
            continue
        key = keys.setdefault(s.table, tuple(s.key))
        if set(s.key) != set(key):
            problems.append(f"step {s.n}: key columns {sorted(s.key)} differ from the table's other steps' {key}")
            continue
        if frozenset(key) not in uniques.get(s.table, ()):
            problems.append(
                f"step {s.n}: {s.table} has no unique index on exactly ({', '.join(key)}): a step could change "
                "several rows"
            )
            continue
        named = [*s.key, *(s.values or {}), *s.now_columns, *s.precondition.columns]
        missing = sorted({c for c in named if c not in cols})
        if missing:
            problems.append(f"step {s.n}: {s.table} has no column {', '.join(missing)}")
            continue
        if s.values is None:
            problems.append(f"step {s.n}: the values to write back are unknown")
            continue
        problems += _value_problems(s, cols)
        if len(problems) >= 20:
            break
    return problems


def _value_problems(s: Step, cols: TableTypes) -> list[str]:
    out = []
    items: list[tuple[str, str, Any, str | None]] = [("key", c, v, None) for c, v in s.key.items()]
    items += [("value", c, v, None) for c, v in (s.values or {}).items()]
    items += [("precondition", c, v, compare_kind(v, cols[c])) for c, v in s.precondition.columns.items()]
    for what, c, v, kind in items:
        try:
            if kind is None:
                db_value(v, cols[c])
            else:
                compare_param(v, cols[c], kind)
        except UnrestorableValue as e:
            out.append(f"step {s.n}: {what} of {s.table}.{c}: {e}")
    return out


# --- applying -------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One apply's settings and caches."""

    conn: psycopg.Connection[Any]
    plan: Plan
    dry_run: bool
    ledger: sql.Identifier
    ledger_name: str
    applied_by: str
    signing_key: bytes | None
    message_prefix: str
    lock_timeout_s: float
    types: Mapping[str, TableTypes]
    keys: dict[str, tuple[str, ...]]
    corrections: CorrectionSink | None
    create_ledger: bool
    queries: dict[Shape, bytes] = field(default_factory=dict)
    locks: dict[str, bytes] = field(default_factory=dict)
    rows: dict[str, bytes] = field(default_factory=dict)

    def query(self, shape: Shape) -> bytes:
        q = self.queries.get(shape)
        if q is None:
            q = self.queries[shape] = shape_sql(shape, self.types[shape.table]).as_bytes(self.conn)
        return q

    def lock_query(self, table: str) -> bytes:
        q = self.locks.get(table)
        if q is None:
            q = self.locks[table] = lock_sql(table, self.keys[table], self.types[table]).as_bytes(self.conn)
        return q

    def row_query(self, table: str) -> bytes:
        q = self.rows.get(table)
        if q is None:
            q = self.rows[table] = row_sql(table, self.keys[table], self.types[table]).as_bytes(self.conn)
        return q


class _Retry(Exception):
    """Control flow: run the batch again, statement by statement, so that an error names its step."""


class _AllOrNothing(Exception):
    """Control flow: an all-or-nothing plan had a step that could not be applied; roll everything back."""

    def __init__(self, outcomes: dict[int, tuple[ApplyOutcome, str | None]]) -> None:
        self.outcomes = outcomes


@dataclass
class _Batch:
    outcomes: dict[int, tuple[ApplyOutcome, str | None]]
    tx_id: int | None


def apply_plan(
    conn_or_dsn: psycopg.Connection[Any] | str,
    plan: Plan,
    *,
    applied_by: str,
    dry_run: bool = False,
    batch_size: int = 500,
    ledger: str = DEFAULT_LEDGER,
    signing_keys: Sequence[bytes] = (),
    message_prefix: str = "writeguard",
    corrections: CorrectionSink | None = None,
    lock_timeout_s: float = 30.0,
    on_batch: Callable[[BatchDone], None] | None = None,
) -> ApplyReport:
    """Apply (or with ``dry_run``, try and roll back) every step of ``plan``; see the module's docstring.

    ``conn_or_dsn``: a libpq connection string, or an autocommit connection (each batch is its own transaction).
    ``signing_keys``: the control signing keys, the first signs the undo messages (none: the messages are
    unsigned, and a worker cannot tell them from a forgery). ``corrections``: where to publish the corrections
    (ignored in a dry run). Raises :class:`undo.plan.PlanRejected` (the plan was changed), :class:`ApplyRefused`
    (it does not fit the database), :class:`StepFailed` (the database refused a batch; earlier batches stay
    committed and a re-run continues) and :class:`connectors.corrections.CorrectionsError`.
    """
    verify_plan_id(plan)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    with _connection(conn_or_dsn) as conn:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        run = _prepare(
            conn,
            plan,
            dry_run=dry_run,
            ledger=ledger,
            applied_by=applied_by,
            signing_key=signing_keys[0] if signing_keys else None,
            message_prefix=message_prefix,
            lock_timeout_s=lock_timeout_s,
            corrections=None if dry_run else corrections,
        )
        published = publish_pending(run) if run.corrections is not None else 0
        outcomes: dict[int, tuple[ApplyOutcome, str | None, int]] = {}
        steps = plan.steps
        size = len(steps) if plan.all_or_nothing else batch_size
        batches = 0
        rolled_back = False
        for start in range(0, len(steps), max(size, 1)):
            chunk = steps[start : start + size]
            batches += 1
            try:
                result = _batch(run, batches, chunk)
            except _AllOrNothing as e:
                rolled_back = True
                outcomes.update({n: (o, d, batches) for n, (o, d) in e.outcomes.items()})
                break
            outcomes.update({n: (o, d, batches) for n, (o, d) in result.outcomes.items()})
            if run.corrections is not None and not dry_run:
                published += publish_pending(run, [s.n for s in chunk])
            if on_batch is not None:
                done = start + len(chunk)
                counts = Counter[str](o for o, _, _ in outcomes.values())
                on_batch(BatchDone(batches, done, len(steps), time.perf_counter() - t0, dict(counts)))
        return _report(run, started, batches, outcomes, rolled_back, published)


@contextmanager
def _connection(conn_or_dsn: psycopg.Connection[Any] | str) -> Iterator[psycopg.Connection[Any]]:
    if isinstance(conn_or_dsn, str):
        with psycopg.connect(conn_or_dsn, autocommit=True) as conn:
            yield conn
        return
    if not conn_or_dsn.autocommit:
        raise ValueError("apply_plan needs an autocommit connection: each batch is its own transaction")
    yield conn_or_dsn


def _prepare(
    conn: psycopg.Connection[Any],
    plan: Plan,
    *,
    dry_run: bool,
    ledger: str,
    applied_by: str,
    signing_key: bytes | None,
    message_prefix: str,
    lock_timeout_s: float,
    corrections: CorrectionSink | None,
) -> _Run:
    tables = {s.table for s in plan.steps}
    for t in tables:
        split_name(t)
    types = read_types(conn, tables)
    problems = check_plan(plan, types, unique_keys(conn, tables))
    if problems:
        more = "" if len(problems) < 20 else "\n  ..."
        raise ApplyRefused("the plan does not fit the database, nothing was run:\n  " + "\n  ".join(problems) + more)
    create = False
    if not dry_run:
        with conn.transaction():
            ensure_ledger(conn, ledger)
    else:
        create = not ledger_exists(conn, ledger)
    keys: dict[str, tuple[str, ...]] = {}
    for s in plan.steps:
        keys.setdefault(s.table, tuple(s.key))
    return _Run(
        conn=conn,
        plan=plan,
        dry_run=dry_run,
        ledger=sql.Identifier(*split_name(ledger)),
        ledger_name=ledger,
        applied_by=applied_by,
        signing_key=signing_key,
        message_prefix=message_prefix,
        lock_timeout_s=lock_timeout_s,
        types=types,
        keys=keys,
        corrections=corrections,
        create_ledger=create,
    )


def _batch(run: _Run, batch: int, steps: Sequence[Step]) -> _Batch:
    """One transaction over ``steps``: pipelined, and on a database error once more statement by statement, so
    that the error names its step."""
    try:
        return _transaction(run, batch, steps, pipelined=True)
    except _Retry:
        return _transaction(run, batch, steps, pipelined=False)


def _transaction(run: _Run, batch: int, steps: Sequence[Step], *, pipelined: bool) -> _Batch:
    conn = run.conn
    try:
        with conn.transaction(force_rollback=run.dry_run):
            return _in_transaction(run, batch, steps, pipelined)
    except (_Retry, _AllOrNothing, StepFailed):
        raise
    except psycopg.Error as e:
        raise StepFailed(batch, steps, None, e) from None


def _in_transaction(run: _Run, batch: int, steps: Sequence[Step], pipelined: bool) -> _Batch:
    conn, plan = run.conn, run.plan
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(run.lock_timeout_s * 1000)}ms")))
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", lock_keys(plan.plan_id))
    if run.create_ledger:
        ensure_ledger(conn, run.ledger_name)
    done = {
        n
        for (n,) in conn.execute(
            sql.SQL("SELECT step FROM {} WHERE plan_id = %s AND step = ANY(%s::int4[]) AND outcome = 'applied'").format(
                run.ledger
            ),
            (plan.plan_id, [s.n for s in steps]),
        )
    }
    outcomes: dict[int, tuple[ApplyOutcome, str | None]] = {}
    todo: list[Step] = []
    for s in steps:
        if s.n in done:
            outcomes[s.n] = ("already_applied", None)
        elif s.decision == "skip":
            outcomes[s.n] = ("skipped", "the plan's decision is skip")
        elif s.decision == "conflict":
            outcomes[s.n] = ("conflict", s.conflict.detail if s.conflict is not None else None)
        else:
            todo.append(s)
    if len(done) == len(steps):
        return _Batch(outcomes, None)  # nothing left to do or record
    row = conn.execute("SELECT pg_current_xact_id()::xid::text::bigint").fetchone()
    assert row is not None
    tx_id = int(row[0])
    # The message before the rows: in the WAL, so in Debezium's output and in every reader that goes in commit and
    # LSN order (scope's merge), the transaction is known as the undo's before its first row arrives.
    _emit(run, batch, steps, tx_id)
    present = _lock_rows(run, todo)
    outcomes.update(_execute(run, batch, todo, present, pipelined))
    if plan.all_or_nothing and any(outcomes[s.n][0] in _NOT_APPLIED for s in todo):
        raise _AllOrNothing(outcomes)
    found = _found(run, [s for s in todo if outcomes[s.n][0] in _NOT_APPLIED and s.n in present])
    _record(run, batch, [s for s in steps if s.n not in done], outcomes, found, tx_id)
    return _Batch(outcomes, tx_id)


def _lock_rows(run: _Run, steps: Sequence[Step]) -> set[int]:
    """Lock the steps' rows that exist (per table, in key order); the step numbers whose row exists."""
    by_table: dict[str, list[Step]] = {}
    for s in steps:
        by_table.setdefault(s.table, []).append(s)
    present: set[int] = set()
    for table, ss in by_table.items():
        types = run.types[table]
        params: list[Any] = [[s.n for s in ss]]
        params += [[db_value(s.key[c], types[c]) for s in ss] for c in run.keys[table]]
        present.update(n for (n,) in run.conn.execute(run.lock_query(table), params))
    return present


def _execute(
    run: _Run, batch: int, steps: Sequence[Step], present: set[int], pipelined: bool
) -> dict[int, tuple[ApplyOutcome, str | None]]:
    conn = run.conn
    outcomes: dict[int, tuple[ApplyOutcome, str | None]] = {}
    issued: list[tuple[Step, psycopg.Cursor[Any]]] = []

    def issue(s: Step) -> None:
        force = s.decision == "force"
        if s.action == "insert":
            if s.n in present and not force:
                outcomes[s.n] = ("key_taken", "a row with the key exists")
                return
        elif s.n not in present:
            outcomes[s.n] = ("precondition_failed", "the row no longer exists")
            return
        shape = shape_of(s, run.types[s.table], force)
        issued.append((s, conn.execute(run.query(shape), shape_params(s, shape, run.types[s.table]))))

    if not pipelined:
        for s in steps:
            try:
                issue(s)
            except psycopg.Error as e:
                raise StepFailed(batch, steps, s, e) from None
    else:
        try:
            with conn.pipeline() as pipeline:
                try:
                    for s in steps:
                        issue(s)
                    pipeline.sync()
                except psycopg.Error:
                    # Read up to the sync point before leaving the block: leaving it mid-error makes psycopg log a
                    # warning that names the connection (host, port, user, database).
                    with suppress(psycopg.Error):
                        pipeline.sync()
                    raise
        except psycopg.Error:
            raise _Retry from None
    for s, cur in issued:
        if cur.rowcount > 0:
            outcomes[s.n] = ("applied", None)
        elif s.action == "insert":
            outcomes[s.n] = ("key_taken", "the key (or another unique value of the row) was taken")
        else:
            outcomes[s.n] = ("precondition_failed", "the row no longer holds what the selection left")
    return outcomes


def _found(run: _Run, steps: Sequence[Step]) -> dict[int, Any]:
    """What the rows of the steps that were not applied hold now (for the ledger: the later value)."""
    out: dict[int, Any] = {}
    for s in steps:
        types = run.types[s.table]
        row = run.conn.execute(
            run.row_query(s.table), [db_value(s.key[c], types[c]) for c in run.keys[s.table]]
        ).fetchone()
        out[s.n] = None if row is None else row[0]
    return out


def _record(
    run: _Run,
    batch: int,
    steps: Sequence[Step],
    outcomes: Mapping[int, tuple[ApplyOutcome, str | None]],
    found: Mapping[int, Any],
    tx_id: int,
) -> None:
    """Every outcome of the batch in one statement (the rows as one JSON array: no per-row round trip or dump)."""
    query = sql.SQL(
        """INSERT INTO {l} AS l (plan_id, step, batch, table_name, row_key, action, decision, outcome, detail,
                                 restored, agent_values, now_columns, found, tx_id, applied_by)
           SELECT %s, x.step, %s, x.table_name, x.row_key, x.action, x.decision, x.outcome, x.detail,
                  x.restored, x.agent_values, x.now_columns, x.found, %s, %s
           FROM jsonb_to_recordset(%s::jsonb) AS x(step int, table_name text, row_key jsonb, action text,
                decision text, outcome text, detail text, restored jsonb, agent_values jsonb, now_columns jsonb,
                found jsonb)
           ON CONFLICT (plan_id, step) DO UPDATE SET
               batch = EXCLUDED.batch, decision = EXCLUDED.decision, outcome = EXCLUDED.outcome,
               detail = EXCLUDED.detail, found = EXCLUDED.found, tx_id = EXCLUDED.tx_id,
               applied_by = EXCLUDED.applied_by, recorded_at = now(), session_user_name = session_user,
               attempts = l.attempts + 1
           WHERE l.outcome <> 'applied'"""
    ).format(l=run.ledger)
    rows = []
    for s in steps:
        outcome, detail = outcomes[s.n]
        rows.append(
            {
                "step": s.n,
                "table_name": s.table,
                "row_key": s.key,
                "action": s.action,
                "decision": s.decision,
                "outcome": outcome,
                "detail": detail,
                "restored": s.values,
                "agent_values": s.agent_values,
                "now_columns": s.now_columns,
                "found": found.get(s.n),
            }
        )
    # jsonb_to_recordset reads a JSON null as SQL NULL: a step without values has restored NULL, not 'null'.
    payload = orjson.dumps(rows).decode()
    run.conn.execute(query, (run.plan.plan_id, batch, tx_id, run.applied_by, payload))


def undo_message(plan_id: str, batch: int, steps: Sequence[Step], tx_id: int, key: bytes | None) -> str:
    """The content of a batch's logical decoding message (JSON).

    >>> undo_message("p1", 3, [], 728, None)
    '{"agent_id":"writeguard-undo","run_id":"p1","undo":{"plan_id":"p1","batch":3,"steps":[],"signature":null}}'
    """
    body = {
        "agent_id": UNDO_AGENT,
        "run_id": plan_id,
        "undo": {
            "plan_id": plan_id,
            "batch": batch,
            "steps": [steps[0].n, steps[-1].n] if steps else [],
            "signature": None if key is None else undo_signature(key, plan_id, tx_id),
        },
    }
    return json.dumps(body, separators=(",", ":"))


def _emit(run: _Run, batch: int, steps: Sequence[Step], tx_id: int) -> None:
    content = undo_message(run.plan.plan_id, batch, steps, tx_id, run.signing_key)
    run.conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (run.message_prefix, content))


def publish_pending(run: _Run, steps: Sequence[int] | None = None) -> int:
    """Publish the corrections of the plan's applied steps that Kafka has not confirmed yet; how many it did."""
    if run.corrections is None:
        return 0
    conn = run.conn
    select = sql.SQL(
        """SELECT step, table_name, row_key, action, restored, agent_values, now_columns, recorded_at, tx_id
           FROM {} WHERE plan_id = %s AND outcome = 'applied' AND published_at IS NULL {} ORDER BY step"""
    ).format(run.ledger, sql.SQL("") if steps is None else sql.SQL("AND step = ANY(%s::int4[])"))
    params: list[Any] = [run.plan.plan_id] if steps is None else [run.plan.plan_id, list(steps)]
    rows = conn.execute(select, params).fetchall()
    if not rows:
        return 0
    pending = [
        Correction.of(run.plan.plan_id, n, table, key, action, restored, agent, now, at, tx)
        for n, table, key, action, restored, agent, now, at, tx in rows
    ]
    delivered = run.corrections.publish(pending)
    update = sql.SQL(
        """UPDATE {} SET published_at = now(), kafka_topic = %s, kafka_partition = %s, kafka_offset = %s
           WHERE plan_id = %s AND step = %s"""
    ).format(run.ledger)
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(update, [(d.topic, d.partition, d.offset, run.plan.plan_id, d.step) for d in delivered])
    return len(delivered)


def _report(
    run: _Run,
    started: datetime,
    batches: int,
    outcomes: Mapping[int, tuple[ApplyOutcome, str | None, int]],
    rolled_back: bool,
    published: int,
) -> ApplyReport:
    steps = []
    counts: Counter[str] = Counter()
    tables: dict[str, Counter[str]] = {}
    for s in run.plan.steps:
        outcome, detail, batch = outcomes.get(s.n, ("skipped", "not reached: the plan was rolled back", 0))
        steps.append(
            StepOutcome(n=s.n, table=s.table, key=s.key, action=s.action, outcome=outcome, detail=detail, batch=batch)
        )
        counts[outcome] += 1
        tables.setdefault(s.table, Counter())[outcome] += 1
    return ApplyReport(
        plan_id=run.plan.plan_id,
        dry_run=run.dry_run,
        ledger=run.ledger_name,
        applied_by=run.applied_by,
        started_at=started,
        finished_at=datetime.now(UTC),
        batches=batches,
        outcomes=dict(counts),
        tables={t: dict(c) for t, c in tables.items()},
        rolled_back=rolled_back,
        corrections_published=published,
        steps=steps,
    )


# --- status -----------------------------------------------------------------------------------------------------

STATES: Final = ("applied", "precondition_failed", "key_taken", "skipped", "conflict", "not_yet_run")


@dataclass(frozen=True)
class PlanStatus:
    """What the ledger says of a plan: steps per state, and where its corrections went."""

    plan_id: str
    steps: int
    states: Mapping[str, int]
    unpublished: int = 0
    last_offsets: Mapping[tuple[str, int], int] = field(default_factory=dict)

    @property
    def all_run(self) -> bool:
        return self.states.get("not_yet_run", 0) == 0


def plan_status(conn: psycopg.Connection[Any], plan: Plan, ledger: str = DEFAULT_LEDGER) -> PlanStatus:
    """Per state the plan's steps, the applied steps whose correction is not confirmed, the last offsets."""
    states: Counter[str] = Counter()
    last: dict[tuple[str, int], int] = {}
    unpublished = 0
    seen: dict[int, str] = {}
    if ledger_exists(conn, ledger):
        rows = conn.execute(
            sql.SQL(
                "SELECT step, outcome, published_at IS NOT NULL, kafka_topic, kafka_partition, kafka_offset "
                "FROM {} WHERE plan_id = %s"
            ).format(sql.Identifier(*split_name(ledger))),
            (plan.plan_id,),
        ).fetchall()
        for step, outcome, published, topic, partition, offset in rows:
            seen[step] = outcome
            if outcome == "applied" and not published:
                unpublished += 1
            if published and topic is not None:
                k = (topic, partition)
                last[k] = max(last.get(k, -1), offset)
    for s in plan.steps:
        states[seen.get(s.n, "not_yet_run")] += 1
    return PlanStatus(plan.plan_id, len(plan.steps), dict(states), unpublished, last)
