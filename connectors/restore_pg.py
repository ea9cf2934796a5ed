"""The edges of ``writeguard restore``: a table's change events in (Kafka by offsets, or a JSONL file), its rows out
into PostgreSQL.

Reading: one table's CDC topic, every partition from its earliest retained offset to the high watermark taken at
the start, with a consumer that joins no group and commits nothing (the settings and the offset planning of
:mod:`connectors.undo_kafka`). Partitions are merged into commit order by (commit time, LSN), each with a bounded
buffer (a partition far ahead is paused): a truncate lands on one partition and must fall between the rows of
the others in the right place. Records are decoded by :func:`connectors.debezium.decode`; a snapshot read's
``source.snapshot`` marker (first/last), which the decoder folds into a boolean, is read apart from its value.

Writing: :func:`write_rows` creates the target table if it does not exist (the last known column set; types from
pg_catalog of the original table when it still exists, else inferred from the values, see :func:`infer_type`),
then upserts the rows in batches, one transaction each: ``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE`` the
row differs, so a second run changes nothing. Identifiers through ``sql.Identifier``, values bound, each cast to
the column's type (converted from Debezium's JSON encodings by :func:`connectors.undo_sql.db_value`).
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import orjson
import psycopg
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from psycopg import sql

from connectors.debezium import ChangeEvent, Decoded, EnvelopeError, decode
from connectors.undo_apply import read_types, split_name, unique_keys
from connectors.undo_kafka import (
    KafkaScanError,
    PartitionMerge,
    PartitionRead,
    consumer_settings,
    offsets_read,
    plan_reads,
)
from connectors.undo_source import split_line
from connectors.undo_sql import ColumnType, UnrestorableValue, db_value
from undo.events import key_of
from undo.restore import Change, PartitionStart, Row

_PARTITION_EOF: Final = getattr(KafkaError, "_PARTITION_EOF")  # noqa: B009
_BATCH: Final = 500


class RestoreInputError(ValueError):
    """The events cannot be read as the table's history (no row key, the topic cannot be read, ...)."""


# --- from a decoded record to a Change ---------------------------------------------------------------------


class _MarkerSource(msgspec.Struct, gc=False):
    snapshot: str | bool | None = None


class _MarkerPayload(msgspec.Struct, gc=False):
    source: _MarkerSource | None = None


class _Marker(msgspec.Struct, gc=False):
    source: _MarkerSource | None = None
    payload: _MarkerPayload | None = None


_marker: Final = msgspec.json.Decoder(_Marker)


def snapshot_marker(value: bytes | None) -> str | None:
    """Debezium's ``source.snapshot`` of a value, as text (the row images are skipped unparsed).

    >>> snapshot_marker(b'{"op": "r", "after": {"id": 1}, "source": {"snapshot": "last"}}')
    'last'
    >>> snapshot_marker(b'{"payload": {"source": {"snapshot": true}}}'), snapshot_marker(b'{"op": "c"}')
    ('true', None)
    """
    if not value:
        return None
    try:
        m = _marker.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    src = m.payload.source if m.payload is not None else m.source
    if src is None or src.snapshot is None:
        return None
    s = src.snapshot
    return ("true" if s else "false") if isinstance(s, bool) else s


def _json(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


@dataclass
class ChangeReader:
    """Turns one table's decoded records into :class:`~undo.restore.Change` (None: not one of its row events).

    ``key_columns``: the table's configured row key (else the message key, the primary key Debezium keys by);
    ``message_keys`` False when the message keys are not row keys (``debezium.key_by_agent``).

    >>> r = ChangeReader("public.t")
    >>> ev = decode(b'{"op":"c","after":{"id":1,"n":2},"source":{"schema":"public","table":"t","ts_us":5}}')
    >>> r.change(ev, b'{"id":1}', None, "f:1")
    Change(op='c', key={'id': 1}, after={'id': 1, 'n': 2}, commit_ts_us=5, position='f:1', snapshot=None)
    """

    table: str
    key_columns: tuple[str, ...] | None = None
    message_keys: bool = True
    skipped: Counter[str] = field(default_factory=Counter)

    def change(self, ev: object, key: bytes | None, value: bytes | None, position: str) -> Change | None:
        if type(ev) is not ChangeEvent:
            self.skipped[type(ev).__name__.lower()] += 1
            return None
        op = ev.op
        if op == "m":
            self.skipped["logical_message"] += 1
            return None
        if f"{ev.schema}.{ev.table}" != self.table:
            self.skipped["other_table"] += 1
            return None
        if op == "t":
            return Change("t", None, None, ev.commit_ts_us, position)
        row_key = key_of(_json(key) if self.message_keys else None, self.key_columns, op, ev.before, ev.after)
        if row_key is None:
            raise RestoreInputError(
                f"{position}: a {self.table} change without a usable row key (no message key, or "
                "debezium.key_by_agent) and the table's key_columns are not set in the config"
            )
        marker = snapshot_marker(value) if op == "r" else None
        return Change(op, row_key, ev.after if op != "d" else None, ev.commit_ts_us, position, marker)


# --- a JSONL file ------------------------------------------------------------------------------------------


@dataclass
class ReadStats:
    source: str = ""
    records: int = 0
    changes: int = 0
    seconds: float = 0.0
    undecodable: Counter[str] = field(default_factory=Counter)
    starts: list[PartitionStart] = field(default_factory=list)
    partitions: list[PartitionRead] = field(default_factory=list)
    missing: bool = False  # the topic does not exist


def iter_changes_file(
    path: str,
    reader: ChangeReader,
    stats: ReadStats,
    progress: Callable[[str], None] | None = None,
    every_s: float = 2.0,
) -> Generator[Change, None, None]:
    """The table's changes in a file of Debezium values (or ``{"key", "value"}`` lines), in the file's order."""
    started = last = time.perf_counter()
    stats.source = path
    first: Change | None = None
    try:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                stats.records = n
                line = raw.strip()
                if not line:
                    continue
                key, value = split_line(line)
                try:
                    ev = decode(value)
                except EnvelopeError as e:
                    stats.undecodable[e.reason] += 1
                    continue
                ch = reader.change(ev, key, value, f"{path}:{n}")
                if ch is None:
                    continue
                if first is None:
                    first = ch
                    stats.starts = [PartitionStart(path, 0, ch)]
                stats.changes += 1
                yield ch
                if progress is not None and n & 0xFFF == 0 and (now := time.perf_counter()) - last >= every_s:
                    last = now
                    progress(f"restore: {n:,} lines read, {n / (now - started):,.0f} lines/s, at {path}:{n}")
        if not stats.starts:
            stats.starts = [PartitionStart(path, 0, None)]
    finally:
        stats.seconds = time.perf_counter() - started


# --- Kafka, by offsets -------------------------------------------------------------------------------------

_Item = tuple[int, int, int, Change]


def _changes_of(
    reader: ChangeReader, first: list[Change | None]
) -> Callable[[Decoded, Message, int, str], _Item | None]:
    """The merge item of a restore: the table's Change, ordered by (commit time, LSN, partition); the first of
    each partition is kept in ``first`` (it decides whether the partition's history is whole)."""
    change = reader.change

    def item(ev: Decoded, m: Message, i: int, position: str) -> _Item | None:
        ch = change(ev, m.key(), m.value(), position)
        if ch is None:
            return None
        if first[i] is None:
            first[i] = ch
        lsn = (ev.lsn or 0) if type(ev) is ChangeEvent else 0
        return (ch.commit_ts_us, lsn, i, ch)

    return item


def iter_changes_kafka(
    client: Mapping[str, Any],
    topic: str,
    reader: ChangeReader,
    stats: ReadStats,
    *,
    progress: Callable[[str], None] | None = None,
    every_s: float = 2.0,
    timeout_s: float = 30.0,
) -> Generator[Change, None, None]:
    """Every change of the table in ``topic``, from each partition's earliest retained offset, in commit order.

    ``stats.starts`` says, once the first change has been given, where each partition starts (its low watermark)
    and its first change (read from the buffers: every partition's head is fetched before the merge gives its
    first change); ``stats.missing`` is set when the topic does not exist.
    """
    started = time.perf_counter()
    stats.source = topic
    consumer = Consumer(consumer_settings(client))
    try:
        found = plan_reads(consumer, [topic], None, timeout_s)
        stats.partitions = found.partitions
        stats.missing = bool(found.missing_topics)
        reads = [p for p in found.partitions if p.start < p.end]
        first: list[Change | None] = [None] * len(reads)
        merge = PartitionMerge(consumer, reads, stats.undecodable, timeout_s, _changes_of(reader, first))
        if reads:
            consumer.assign([TopicPartition(p.topic, p.partition, p.start) for p in reads])
        streams = [merge.stream(i) for i in range(len(reads))]
        # Prime every partition: its first record decides whether its history is whole, before anything is folded.
        heads: list[_Item] = []
        for s in streams:
            item = next(s, None)
            if item is not None:
                heads.append(item)
        index = {p.partition: i for i, p in enumerate(reads)}
        firsts = {p.partition: first[index[p.partition]] for p in reads}
        stats.starts = [
            PartitionStart(f"{p.topic}/{p.partition}", p.low, firsts.get(p.partition)) for p in found.partitions
        ]
        rest = [_chain(h, streams[h[2]]) for h in heads]
        last = started
        n = 0
        for _, _, _, ch in heapq.merge(*rest, key=lambda it: (it[0], it[1], it[2])):
            n += 1
            stats.changes = n
            yield ch
            if progress is not None and n & 0xFFF == 0 and (now := time.perf_counter()) - last >= every_s:
                last = now
                read = sum(p.read for p in reads)
                progress(f"restore: {read:,} records read, {read / (now - started):,.0f} records/s; offsets read: "
                         f"{offsets_read(reads)}")  # fmt: skip
    finally:
        stats.records = sum(p.read for p in stats.partitions)
        stats.seconds = time.perf_counter() - started
        consumer.close()


def _chain(head: _Item, rest: Iterator[_Item]) -> Iterator[_Item]:
    yield head
    yield from rest


def topic_compacted(client: Mapping[str, Any], topic: str, timeout_s: float = 30.0) -> bool | None:
    """Whether the topic's ``cleanup.policy`` includes ``compact`` (None: it cannot be told)."""
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # type: ignore[attr-defined]

    try:
        admin = AdminClient(dict(client))
        res = ConfigResource(ResourceType.TOPIC, topic)
        configs = admin.describe_configs([res], request_timeout=timeout_s)[res].result(timeout=timeout_s)
    except Exception:  # any failure only means "unknown": the caller assumes not compacted
        return None
    entry = configs.get("cleanup.policy")
    return None if entry is None else "compact" in str(entry.value)


# --- PostgreSQL --------------------------------------------------------------------------------------------

# Types of a new table when the original no longer exists, from the values Debezium's JSON gave: the encodings
# stay as they are (a timestamp column's microseconds since the epoch become a bigint, a date's days an int).
INFERRED: Final[Mapping[str, ColumnType]] = {
    "boolean": ColumnType("pg_catalog", "bool", "bool"),
    "bigint": ColumnType("pg_catalog", "int8", "int8"),
    "double precision": ColumnType("pg_catalog", "float8", "float8"),
    "text": ColumnType("pg_catalog", "text", "text"),
    "jsonb": ColumnType("pg_catalog", "jsonb", "jsonb"),
}


def infer_type(values: Iterable[Any]) -> str:
    """The type a new column gets from its values (one of :data:`INFERRED`): all booleans ``boolean``, all
    integers ``bigint``, numbers ``double precision``, strings ``text``, objects and arrays ``jsonb``, and so are
    strings that all are JSON objects or arrays (Debezium sends a json/jsonb column as its JSON text); a mix (or
    only NULLs) ``text``, non-strings as their JSON text.

    >>> infer_type([1, None, 2]), infer_type([1, 2.5]), infer_type(["a"]), infer_type([{"a": 1}]), infer_type([1, "a"])
    ('bigint', 'double precision', 'text', 'jsonb', 'text')
    >>> infer_type(['{"a": 1}', "[2]"]), infer_type(['{"a": 1}', "x"]), infer_type(["[1, 2"])
    ('jsonb', 'text', 'text')
    """
    kinds: set[str] = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("boolean")
        elif isinstance(v, int):
            kinds.add("bigint")
        elif isinstance(v, float):
            kinds.add("double precision")
        elif isinstance(v, str):
            kinds.add("jsonb" if v[:1] in ("{", "[") and _json_container(v) else "text")
        else:
            kinds.add("jsonb")
        if len(kinds) > 2:
            return "text"
    if len(kinds) == 1:
        return kinds.pop()
    if kinds == {"bigint", "double precision"}:
        return "double precision"
    return "text"


def _json_container(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict | list)
    except orjson.JSONDecodeError:
        return False


class WriteRefused(RuntimeError):
    """The rows cannot be written to the target as it is (no unique key on the row key, no columns known)."""


@dataclass
class Written:
    """What :func:`write_rows` did."""

    inserted: int = 0
    updated: int = 0
    equal: int = 0
    extra: int = 0
    batches: int = 0
    created: bool = False
    columns: list[str] = field(default_factory=list)
    types_from: str = ""
    unconvertible: Counter[str] = field(default_factory=Counter)  # column -> rows
    not_in_target: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Target:
    """The target table's columns as written: their Debezium decoding type, their cast type, and the key."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    decode_as: Mapping[str, ColumnType]
    cast_as: Mapping[str, ColumnType]
    json_text: frozenset[str] = frozenset()  # inferred mixed columns: non-string values written as JSON text
    generated: frozenset[str] = frozenset()
    identity_always: bool = False


def create_sql(t: Target) -> sql.Composed:
    """``CREATE TABLE`` for the target, its key as the primary key.

    >>> i8, tx = INFERRED["bigint"], INFERRED["text"]
    >>> t = Target('public.r x"y', ("id", "n"), ("id",), {}, {"id": i8, "n": tx})
    >>> print(create_sql(t).as_string(None))
    CREATE TABLE "public"."r x""y" ("id" "pg_catalog"."int8", "n" "pg_catalog"."text", PRIMARY KEY ("id"))
    """
    cols = [sql.SQL("{} {}").format(sql.Identifier(c), t.cast_as[c].cast()) for c in t.columns]
    cols.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(sql.Identifier(c) for c in t.key)))
    return sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(*split_name(t.name)), sql.SQL(", ").join(cols))


def _differs(c: str, col: ColumnType) -> sql.Composed:
    old, new = sql.Identifier("_t", c), sql.SQL("EXCLUDED.{}").format(sql.Identifier(c))
    if col.base in ("json", "jsonb") and not col.array:
        return sql.SQL("{}::jsonb IS DISTINCT FROM {}::jsonb").format(old, new)  # json has no equality operator
    if col.base in ("json", "xml", "point") or col.base == "":
        return sql.SQL("{}::text IS DISTINCT FROM {}::text").format(old, new)
    return sql.SQL("{} IS DISTINCT FROM {}").format(old, new)


def upsert_sql(t: Target, columns: Sequence[str]) -> sql.Composed:
    """The upsert of rows holding ``columns`` (the key among them): an insert, or an update only where a value
    differs; ``RETURNING`` true for an insert, false for an update, nothing for a row already equal.

    >>> i8, tx = INFERRED["bigint"], INFERRED["text"]
    >>> t = Target("public.r", ("id", "n"), ("id",), {}, {"id": i8, "n": tx})
    >>> print(upsert_sql(t, ("id", "n")).as_string(None).replace('"pg_catalog".', ""))  # doctest: +NORMALIZE_WHITESPACE
    INSERT INTO "public"."r" AS "_t" ("id", "n") VALUES (%s::"int8", %s::"text") ON CONFLICT ("id") DO UPDATE
    SET "n" = EXCLUDED."n" WHERE "_t"."n" IS DISTINCT FROM EXCLUDED."n" RETURNING (xmax = 0)
    """
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    vals = sql.SQL(", ").join(sql.SQL("%s::{}").format(t.cast_as[c].cast()) for c in columns)
    overriding = sql.SQL(" OVERRIDING SYSTEM VALUE" if t.identity_always else "")
    key = sql.SQL(", ").join(sql.Identifier(c) for c in t.key)
    others = [c for c in columns if c not in t.key]
    if not others:
        conflict = sql.SQL("ON CONFLICT ({}) DO NOTHING").format(key)
    else:
        conflict = sql.SQL("ON CONFLICT ({}) DO UPDATE SET {} WHERE {}").format(
            key,
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in others),
            sql.SQL(" OR ").join(_differs(c, t.cast_as[c]) for c in others),
        )
    return sql.SQL("INSERT INTO {} AS {} ({}){} VALUES ({}) {} RETURNING (xmax = 0)").format(
        sql.Identifier(*split_name(t.name)), sql.Identifier("_t"), cols, overriding, vals, conflict
    )


def plan_target(
    conn: psycopg.Connection[Any],
    table: str,
    into: str,
    columns: Sequence[str],
    key: Sequence[str],
    rows: Sequence[Row],
) -> tuple[Target, bool, str, list[str]]:
    """The target's shape: (target, whether it must be created, where the types come from, columns it lacks)."""
    split_name(table), split_name(into)  # refuse a name without its schema before any SQL
    types = read_types(conn, {table, into})
    orig, existing = types.get(table), types.get(into)
    cols = list(columns)
    if not cols:
        cols = list(existing or orig or {})
    if not cols:
        raise WriteRefused(f"no column of {table} is known: no row image was read, and neither it nor {into} exist")
    missing_key = [k for k in key if k not in cols]
    cols = [*missing_key, *cols]
    decode_as: dict[str, ColumnType] = {}
    json_text: set[str] = set()
    inferred = False
    for c in cols:
        found = (orig or {}).get(c) or (existing or {}).get(c)
        if found is None:
            kind = infer_type(r.values.get(c) if c in r.values else r.key.get(c) for r in rows)
            found = INFERRED[kind]
            inferred = True
            if kind == "text":
                json_text.add(c)
        decode_as[c] = found
    types_from = f"catalog:{table}" if orig else f"catalog:{into}" if existing else "inferred"
    if inferred and (orig or existing):
        types_from += " (and inferred for columns it lacks)"
    not_in_target: list[str] = []
    if existing is not None:
        not_in_target = [c for c in cols if c not in existing]
        cols = [c for c in cols if c in existing]
        uniques = unique_keys(conn, [into]).get(into, [])
        if frozenset(key) not in uniques:
            raise WriteRefused(
                f"{into} has no primary key or unique index on exactly ({', '.join(key)}): the rows cannot be "
                "upserted idempotently; add one (or restore into a new table)"
            )
        generated = frozenset(c for c in cols if existing[c].generated)
        target = Target(into, tuple(cols), tuple(key), decode_as, existing, frozenset(json_text), generated,
                        any(existing[c].identity_always for c in cols))  # fmt: skip
        return target, False, types_from, not_in_target
    cast_as = {c: decode_as[c] for c in cols}
    return Target(into, tuple(cols), tuple(key), decode_as, cast_as, frozenset(json_text)), True, types_from, []


def row_params(t: Target, row: Row, unconvertible: Counter[str]) -> tuple[tuple[str, ...], list[Any]]:
    """The row's columns (those with a known, convertible value) and their parameters."""
    cols: list[str] = []
    params: list[Any] = []
    values, key = row.values, row.key
    for c in t.columns:
        if c in t.generated:
            continue
        if c in values:
            v = values[c]
        elif c in key:
            v = key[c]
        else:
            continue  # not in the row's image: the column's default
        if c in t.json_text and v is not None and not isinstance(v, str):
            params.append(orjson.dumps(v).decode())
            cols.append(c)
            continue
        try:
            params.append(db_value(v, t.decode_as[c]))
        except UnrestorableValue:
            if c in t.key:
                raise WriteRefused(f"key column {c} of row {key}: its value cannot be written as its type") from None
            unconvertible[c] += 1
            continue
        cols.append(c)
    return tuple(cols), params


BatchProgress = Callable[[int, int, "Written"], None]  # (rows done, rows total, the counts so far)


def write_rows(
    conn: psycopg.Connection[Any],
    table: str,
    into: str,
    columns: Sequence[str],
    key: Sequence[str],
    rows: Sequence[Row],
    *,
    batch_size: int = 1000,
    dry_run: bool = False,
    on_batch: BatchProgress | None = None,
) -> Written:
    """Create ``into`` if missing and upsert ``rows`` into it in batches, one transaction each (``conn`` in
    autocommit). ``dry_run``: everything in one transaction, rolled back at the end: the counts say what would
    change, and nothing does."""
    started = time.perf_counter()
    out = Written()
    try:
        if dry_run:
            with conn.transaction():
                _write(conn, table, into, columns, key, rows, batch_size, on_batch, out)
                raise psycopg.Rollback()
        else:
            _write(conn, table, into, columns, key, rows, batch_size, on_batch, out)
    finally:
        out.seconds = time.perf_counter() - started
    return out


def _write(
    conn: psycopg.Connection[Any],
    table: str,
    into: str,
    columns: Sequence[str],
    key: Sequence[str],
    rows: Sequence[Row],
    batch_size: int,
    on_batch: BatchProgress | None,
    out: Written,
) -> None:
    target, create, out.types_from, out.not_in_target = plan_target(conn, table, into, columns, key, rows)
    out.columns = [c for c in target.columns if c not in target.generated]
    if create:
        with conn.transaction():
            conn.execute(create_sql(target))
        out.created = True
    queries: dict[tuple[str, ...], bytes] = {}
    total = len(rows)
    for start in range(0, total, batch_size):
        by_shape: dict[tuple[str, ...], list[list[Any]]] = {}
        for r in rows[start : start + batch_size]:
            cols, params = row_params(target, r, out.unconvertible)
            by_shape.setdefault(cols, []).append(params)
        with conn.transaction(), conn.cursor() as cur:
            for cols, params_list in by_shape.items():
                q = queries.get(cols)
                if q is None:
                    q = queries[cols] = upsert_sql(target, cols).as_bytes(conn)
                cur.executemany(q, params_list, returning=True)
                changed = 0
                while True:
                    got = cur.fetchone()
                    if got is not None:
                        changed += 1
                        if got[0]:
                            out.inserted += 1
                        else:
                            out.updated += 1
                    if not cur.nextset():
                        break
                out.equal += len(params_list) - changed
        out.batches += 1
        if on_batch is not None:
            on_batch(min(start + batch_size, total), total, out)
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*split_name(into)))).fetchone()
    out.extra = max(0, (row[0] if row else 0) - total)


def find_alert(client: Mapping[str, Any], topic: str, alert_id: str, timeout_s: float = 30.0) -> bytes | None:
    """The value of the alert with this id on the alerts topic (read from its start, no group), or None."""
    consumer = Consumer(consumer_settings(client))
    try:
        found = plan_reads(consumer, [topic], None, timeout_s)
        reads = {(p.topic, p.partition): p for p in found.partitions if p.start < p.end}
        if not reads:
            return None
        consumer.assign([TopicPartition(p.topic, p.partition, p.start) for p in reads.values()])
        deadline = time.monotonic() + timeout_s
        while reads:
            msgs = consumer.consume(_BATCH, timeout=0.5)
            if not msgs and time.monotonic() > deadline:
                raise KafkaScanError(f"{topic}: no records for {timeout_s:.0f} s before its end")
            for m in msgs:
                p = reads.get((m.topic(), m.partition()))  # type: ignore[arg-type]  # a record has both
                if p is None:
                    continue
                deadline = time.monotonic() + timeout_s
                if m.error() is None:
                    value = m.value()
                    try:
                        body = orjson.loads(value or b"null")
                    except orjson.JSONDecodeError:
                        body = None
                    if isinstance(body, dict) and body.get("alert_id") == alert_id:
                        return value
                    off: int = m.offset()  # type: ignore[assignment]  # a record's offset is never None
                    if off + 1 < p.end:
                        continue
                elif m.error().code() != _PARTITION_EOF:  # type: ignore[union-attr]  # not None here
                    continue
                del reads[(p.topic, p.partition)]
        return None
    finally:
        consumer.close()
