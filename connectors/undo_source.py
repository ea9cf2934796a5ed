"""From Debezium records to the undo planner's :class:`~undo.events.RowEvent`, each attributed to its writer.

The planner (:mod:`undo`) is pure and knows no Debezium JSON; this is the one place that turns a decoded change
event and its message key into its input. Attribution follows the worker's router (stream/pipeline.py): the
row's agent column, else the agent that a ``pg_logical_emit_message`` in the same transaction names (with
``database_identity``, only that message). A row whose writer named no agent gets ``agent_id`` None: a human,
a job, another service; those are the later writers that make conflicts.

Streaming: :class:`UndoReader` gives its events as it is fed, in the order fed. Only a row that waits for its
transaction's message is held (and the rows behind it, so that the order stays the commit order): until the
message arrives, or until the input has moved ``hold_s`` of commit time past the row, when it goes on
unattributed, as the worker scores it. Memory is bounded by what that window holds, not by the input's length.

Files: :func:`iter_events_file` reads what ``writeguard replay`` reads, one Debezium message value per line, and
also ``{"key": <message key>, "value": <message value>}`` lines, for a file that kept the message keys (a Kafka
dump). Without keys, a table's ``key_columns`` in the config say which columns identify a row.
"""

from __future__ import annotations

import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import msgspec
import orjson

from connectors.debezium import ChangeEvent, Decoded, EnvelopeError, decode
from connectors.messages import UNDO_AGENT, verify_undo_message
from detectors.engine import is_reserved
from detectors.features import identity, lookup
from detectors.spec import FieldPath, TableSpec
from undo.events import RowEvent, RowOp, key_of

_META_LIMIT = 16  # metadata fields kept per message, and their length: a hostile message cannot bloat the scope
# The wrapped line form starts with its "key" or "value" field; only such lines are parsed as that form.
_WRAPPED = re.compile(rb'\{\s*"(?:key|value)"\s*:')
_NO_META: Final[Mapping[str, str]] = MappingProxyType({})  # shared, so read-only


class MissingKey(ValueError):
    """A change event of a table whose row cannot be identified: no message key and no ``key_columns``."""


Getter = Callable[[str, "dict[str, Any] | None", "dict[str, Any] | None"], "str | None"]


def _getter(text: str | None) -> Getter:
    """``identity(pick(path, op, before, after))`` of :class:`~detectors.features.Extractor`, compiled.

    The common path (``row.<column>``) reads one dict entry; deeper paths go through ``lookup``.

    >>> g = _getter("row.agent_id")
    >>> g("c", None, {"agent_id": "a1"}), g("d", {"agent_id": "a2"}, None), g("c", None, {"agent_id": 7})
    ('a1', 'a2', '7')
    >>> _getter("after.meta.run")("u", None, {"meta": {"run": "r1"}}), _getter(None)("c", None, {"x": 1})
    ('r1', None)
    """
    if text is None:
        return lambda op, before, after: None
    path = FieldPath.parse(text)
    keys, image = path.keys, path.image
    if len(keys) == 1 and image == "row":
        k = keys[0]

        def row(op: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> str | None:
            img = before if op == "d" else after
            return None if img is None else identity(img.get(k))

        return row

    def deep(op: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> str | None:
        img = after if image == "after" else before if image == "before" else before if op == "d" else after
        return identity(lookup(img, keys))

    return deep


@dataclass(frozen=True, slots=True)
class _Table:
    index: int
    spec: TableSpec
    key_columns: tuple[str, ...] | None
    agent: Getter
    run: Getter


@dataclass(slots=True)
class _Held:
    """A row change in the hold queue; ``event`` is None while it waits for its transaction's message."""

    ev: ChangeEvent
    table: str
    key: dict[str, Any]
    agent: str | None
    run: str | None
    position: str
    event: RowEvent | None = None


def _row_event(h: _Held, agent: str | None, run: str | None, meta: Mapping[str, str]) -> RowEvent:
    ev = h.ev
    op: RowOp = ev.op  # type: ignore[assignment]  # only row ops are held
    return RowEvent(h.table, h.key, op, ev.before, ev.after, ev.commit_ts_us, ev.tx_id, agent, run, h.position,
                    ev.lsn, meta)  # fmt: skip


@dataclass
class UndoReader:
    """Feed it records in commit order; ``take()`` gives the watched tables' row changes so far, attributed.

    >>> from detectors.spec import TableSpec
    >>> r = UndoReader([TableSpec(name="public.t", topic="db.public.t", key_columns=("id",))], message_prefix="wg")
    >>> r.feed(None, b'{"op":"c","after":{"id":1},"source":{"schema":"public","table":"t","ts_ms":5,"txId":9}}', "f:1")
    >>> r.take()  # waits for transaction 9's message
    []
    >>> r.feed(None, b'{"op":"m","source":{"ts_ms":5,"txId":9},"message":{"prefix":"wg","content":"'
    ...              b'eyJhZ2VudF9pZCI6ImExIn0="}}', "f:2")
    >>> [(e.table, e.key, e.op, e.agent_id, e.commit_ts_us) for e in r.take()]
    [('public.t', {'id': 1}, 'c', 'a1', 5000)]
    """

    tables: Sequence[TableSpec]
    message_prefix: str | None = None
    database_identity: bool = False
    # False when the message keys are not the rows' keys (debezium.key_by_agent keys records by the agent id).
    message_keys: bool = True
    # How long (commit time) a row without an agent waits for its transaction's message: worker.agent_messages.
    hold_s: float = 5.0
    max_held: int = 100_000  # rows held and transactions remembered: bounded, whatever the input
    # The control signing keys: a transaction whose writeguard-undo message they signed is the undo's, whatever
    # its rows' agent columns say (an undo restores them to the values of their earlier writer).
    undo_keys: tuple[bytes, ...] = ()
    skipped: Counter[str] = field(default_factory=Counter)
    out_of_order: int = 0  # row changes that came after a later commit: the input was not in commit order
    first_out_of_order: str | None = None
    ready: list[RowEvent] = field(default_factory=list)
    _tables: dict[str, _Table] = field(default_factory=dict)
    _tx: OrderedDict[str, tuple[str, str | None, Mapping[str, str], int]] = field(default_factory=OrderedDict)
    _undo: OrderedDict[str, str] = field(default_factory=OrderedDict)  # txId -> plan id
    _held: deque[_Held] = field(default_factory=deque)
    _waiting: dict[str, list[_Held]] = field(default_factory=dict)
    _now: int = -(2**63)  # the latest commit time fed
    _last: int = -(2**63)  # the latest commit time given out

    def __post_init__(self) -> None:
        self._tables = {
            t.name: _Table(i, t, t.key_columns or None, _getter(t.agent_id), _getter(t.run_id))
            for i, t in enumerate(self.tables)
        }
        self._hold_us = int(self.hold_s * 1e6)

    def feed(self, key: bytes | None, value: bytes | None, position: str) -> None:
        """One record. Raises EnvelopeError for a value that is no Debezium event, MissingKey for an unkeyed row."""
        self.feed_decoded(decode(value), key, position)

    def feed_decoded(self, ev: Decoded, key: bytes | None, position: str) -> None:
        """One record already decoded (by :func:`connectors.debezium.decode`)."""
        if type(ev) is not ChangeEvent:
            self.skipped[type(ev).__name__.lower()] += 1
            return
        at = ev.commit_ts_us
        if at > self._now:
            self._now = at
        op = ev.op
        if op == "m":
            self._message(ev)
            if self._held:
                self._release()
            return
        table = f"{ev.schema}.{ev.table}"
        t = self._tables.get(table)
        if t is None:
            self.skipped["unwatched_table"] += 1
            return
        if op != "c" and op != "u" and op != "d":  # spelled out, so that the type narrows
            # A snapshot read is no write; a truncate cannot be undone from the change events (they hold no rows).
            self.skipped["snapshot" if op == "r" else "truncate"] += 1
            return
        before, after = ev.before, ev.after
        cols = t.key_columns
        if cols is not None:
            row_key = key_of(None, cols, op, before, after)
        else:
            row_key = key_of(_json(key) if self.message_keys else None, None, op, before, after)
        if row_key is None:
            raise MissingKey(
                f"{position}: a {table} change without a usable message key (none, or debezium.key_by_agent), and "
                f"tables.{t.index}.key_columns is not set "
                '(name the columns that identify a row, or keep the keys: {"key": ..., "value": ...} lines)'
            )
        agent: str | None = None
        run: str | None = None
        tx = ev.tx_id
        if not self.database_identity:
            agent, run = t.agent(op, before, after), t.run(op, before, after)
            if agent is not None and is_reserved(agent):
                agent, run = None, None  # a reserved identity is never taken from a row
        if tx is not None and self._undo and (plan := self._undo.get(tx)) is not None:
            agent, run = UNDO_AGENT, plan
        meta = _NO_META
        wait = False
        if agent is None and tx is not None and self.message_prefix is not None:
            known = self._tx.get(tx)
            if known is None:
                wait = True
            else:
                agent, run, meta, _ = known
        if not wait and not self._held:
            self._emit(RowEvent(table, row_key, op, before, after, at, tx, agent, run, position, ev.lsn, meta))
            return
        h = _Held(ev, table, row_key, agent, run, position)
        if wait:
            assert tx is not None
            self._waiting.setdefault(tx, []).append(h)
        else:
            h.event = _row_event(h, agent, run, meta)
        self._held.append(h)
        self._release()

    def _message(self, ev: ChangeEvent) -> None:
        if self.message_prefix is None or ev.message_prefix != self.message_prefix or ev.tx_id is None:
            self.skipped["logical_message"] += 1
            return
        try:
            body = orjson.loads(ev.message_content or b"")
        except orjson.JSONDecodeError:
            raise EnvelopeError("invalid_message", "writeguard message content is not JSON") from None
        if not isinstance(body, dict):
            raise EnvelopeError("invalid_message", "writeguard message content is not a JSON object")
        if self.undo_keys and body.get("agent_id") == UNDO_AGENT:
            plan = verify_undo_message(self.undo_keys, body, ev.tx_id)
            if plan is not None:
                self._undo[ev.tx_id] = plan
                while len(self._undo) > self.max_held:
                    self._undo.popitem(last=False)
                self._tx[ev.tx_id] = (UNDO_AGENT, plan, {}, ev.commit_ts_us)
                for h in self._waiting.pop(ev.tx_id, ()):
                    h.event = _row_event(h, UNDO_AGENT, plan, _NO_META)
                return
        if self.database_identity and "role" not in body:
            self.skipped["claimed_identity"] += 1  # a writer's own message: a claim, never believed
            return
        agent = identity(body.get("agent_id"))
        if agent is None or is_reserved(agent):
            self.skipped["logical_message"] += 1
            return
        tx = ev.tx_id
        if tx in self._tx:
            return  # the transaction's first message names it
        run = identity(body.get("run_id"))
        meta = {
            str(k)[:64]: str(v)[:256]
            for k, v in list(body.items())[:_META_LIMIT]
            if k not in ("agent_id", "run_id") and isinstance(v, str | int | float | bool)
        }
        self._tx[tx] = (agent, run, meta, ev.commit_ts_us)
        # Transactions remembered: those within hold_s of commit time, as rows wait for messages that long.
        limit = self._now - self._hold_us
        while self._tx and (len(self._tx) > self.max_held or next(iter(self._tx.values()))[3] < limit):
            self._tx.popitem(last=False)
        for h in self._waiting.pop(tx, ()):
            h.event = _row_event(h, agent, run, meta)

    def _release(self) -> None:
        """Give out the held rows from the front, up to the first one still waiting within its hold."""
        held = self._held
        limit = self._now - self._hold_us
        while held:
            h = held[0]
            if h.event is None:
                if h.ev.commit_ts_us >= limit and len(held) <= self.max_held:
                    return
                self._expire(h)
            held.popleft()
            assert h.event is not None
            self._emit(h.event)

    def _expire(self, h: _Held) -> None:
        """No message for the row's transaction within the hold: it and its transaction's other rows go unnamed."""
        for w in self._waiting.pop(h.ev.tx_id or "", [h]):
            if w.event is None:
                w.event = _row_event(w, None, None, _NO_META)

    def _emit(self, ev: RowEvent) -> None:
        if ev.commit_ts_us < self._last:
            self.out_of_order += 1
            if self.first_out_of_order is None:
                self.first_out_of_order = ev.position
        else:
            self._last = ev.commit_ts_us
        self.ready.append(ev)

    def take(self) -> list[RowEvent]:
        """The row changes ready so far, in the order fed (held rows excepted); they are given out once."""
        out = self.ready
        self.ready = []
        return out

    def finish(self) -> list[RowEvent]:
        """The end of the input: every held row goes out, unattributed if its message never came."""
        while self._held:
            h = self._held.popleft()
            if h.event is None:
                self._expire(h)
            assert h.event is not None
            self._emit(h.event)
        return self.take()

    def events(self) -> list[RowEvent]:
        """Everything not taken yet, held rows included: for a reader fed a whole, finished input."""
        return self.finish()


def _json(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None  # a key that is no JSON (a string or Avro key): not usable, key_columns must name the row


class _Wrapped(msgspec.Struct, forbid_unknown_fields=True):
    # Raw: the key and value stay bytes, unparsed; the value is decoded once, by decode().
    key: msgspec.Raw
    value: msgspec.Raw


_wrapped: Final = msgspec.json.Decoder(_Wrapped)


def _raw(r: msgspec.Raw) -> bytes | None:
    b = bytes(r)
    if b == b"null":
        return None
    if b[:1] == b'"':  # a value kept as a JSON string of the JSON
        try:
            text = orjson.loads(b)
        except orjson.JSONDecodeError:
            return b
        return text.encode() if isinstance(text, str) else b
    return b


def split_line(line: bytes) -> tuple[bytes | None, bytes | None]:
    """(key, value) of one line: a bare Debezium value, or ``{"key": ..., "value": ...}``.

    >>> split_line(b'{"key": {"id": 1}, "value": {"op": "d"}}')
    (b'{"id": 1}', b'{"op": "d"}')
    >>> split_line(b'{"op": "d"}')
    (None, b'{"op": "d"}')
    >>> split_line(b'{"key": null, "value": "{\\\\"op\\\\": \\\\"d\\\\"}"}')
    (None, b'{"op": "d"}')
    """
    if line == b"null":
        return None, None
    if _WRAPPED.match(line):
        try:
            w = _wrapped.decode(line)
        except msgspec.DecodeError:  # also a ValidationError: not exactly the two fields
            return None, line  # decode() reports what is wrong with it
        # No Debezium value has exactly these two fields, so the wrapped form cannot be mistaken for one.
        return _raw(w.key), _raw(w.value)
    return None, line


class _PeekSource(msgspec.Struct, gc=False):
    ts_ms: int | None = None
    ts_us: int | None = None
    ts_ns: int | None = None


class _Peek(msgspec.Struct, gc=False):
    source: _PeekSource | None = None
    payload: _Peek | None = None


_peek: Final = msgspec.json.Decoder(_Peek)


def peek_commit_us(value: bytes | None) -> int | None:
    """The commit time of a Debezium value from its ``source`` alone, the row images skipped unparsed; else None.

    >>> peek_commit_us(b'{"op": "c", "after": {"id": 1}, "source": {"ts_ms": 5, "ts_us": 5001}}')
    5001
    >>> peek_commit_us(b'{"schema": {}, "payload": {"source": {"ts_ms": 5}}}'), peek_commit_us(b'oops')
    (5000, None)
    """
    if not value:
        return None
    try:
        p = _peek.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    src = p.payload.source if p.payload is not None else p.source
    if src is None:
        return None
    if src.ts_ns is not None:
        return src.ts_ns // 1000
    if src.ts_us is not None:
        return src.ts_us
    return None if src.ts_ms is None else src.ts_ms * 1000


@dataclass
class ReadStats:
    lines: int = 0
    seconds: float = 0.0
    before_window: int = 0  # lines committed before the scan's start, skipped undecoded
    undecodable: Counter[str] = field(default_factory=Counter)


def iter_events_file(
    path: str | Path,
    reader: UndoReader,
    stats: ReadStats,
    *,
    start_us: int | None = None,
    progress: Callable[[str], None] | None = None,
    every_s: float = 2.0,
) -> Iterator[RowEvent]:
    """Every row change in the file, attributed, as it is read; undecodable lines are counted by reason, not fatal.

    With ``start_us``, the lines at the head of the file committed before it are skipped after reading only their
    commit time (the file is in commit order: once a line is at or after the start, every later line is decoded).
    """
    started = last = time.perf_counter()
    name = str(path)
    skip = start_us is not None
    start = start_us if start_us is not None else 0
    feed = reader.feed
    try:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                stats.lines = n
                line = raw.strip()
                if not line:
                    continue
                key, value = split_line(line)
                if skip:
                    at = peek_commit_us(value)
                    if at is not None:
                        if at < start:
                            stats.before_window += 1
                            continue
                        skip = False
                try:
                    feed(key, value, f"{name}:{n}")
                except EnvelopeError as e:
                    stats.undecodable[e.reason] += 1
                if reader.ready:
                    yield from reader.take()
                if progress is not None and n & 0xFFF == 0 and (now := time.perf_counter()) - last >= every_s:
                    last = now
                    progress(f"scope: {n:,} events read, {n / (now - started):,.0f} events/s, at {name}:{n}")
        yield from reader.finish()
    finally:
        stats.seconds = time.perf_counter() - started


def read_events_file(
    path: str | Path,
    reader: UndoReader,
    progress: Callable[[str], None] | None = None,
    every_s: float = 2.0,
) -> tuple[list[RowEvent], ReadStats]:
    """Every row change in the file at once (a list: for small files and tests; scope streams them)."""
    stats = ReadStats()
    events = list(iter_events_file(path, reader, stats, progress=progress, every_s=every_s))
    return events, stats
