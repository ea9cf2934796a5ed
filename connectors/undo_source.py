"""From Debezium records to the undo planner's :class:`~undo.events.RowEvent`, each attributed to its writer.

The planner (:mod:`undo`) is pure and knows no Debezium JSON; this is the one place that turns a decoded change
event and its message key into its input. Attribution follows the worker's router (stream/pipeline.py): the
row's agent column, else the agent that a ``pg_logical_emit_message`` in the same transaction names (with
``database_identity``, only that message). A row whose writer named no agent gets ``agent_id`` None: a human,
a job, another service; those are the later writers that make conflicts.

Files: ``read_events_file`` reads what ``writeguard replay`` reads, one Debezium message value per line, and also
``{"key": <message key>, "value": <message value>}`` lines, for a file that kept the message keys (a Kafka dump).
Without keys, a table's ``key_columns`` in the config say which columns identify a row.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from connectors.debezium import ChangeEvent, EnvelopeError, decode
from detectors.engine import is_reserved
from detectors.features import Extractor, identity
from detectors.spec import TableSpec
from undo.events import RowEvent, key_of

_META_LIMIT = 16  # metadata fields kept per message, and their length: a hostile message cannot bloat the scope
_ROW_OPS = frozenset({"c", "u", "d"})
# The wrapped line form starts with its "key" or "value" field; only such lines are parsed twice.
_WRAPPED = re.compile(rb'\{\s*"(?:key|value)"\s*:')


class MissingKey(ValueError):
    """A change event of a table whose row cannot be identified: no message key and no ``key_columns``."""


@dataclass
class _Held:
    ev: ChangeEvent
    table: str
    key: dict[str, Any]
    agent: str | None
    run: str | None
    position: str


@dataclass
class UndoReader:
    """Feed it records in commit order; ``events()`` gives the watched tables' row changes, attributed.

    Records are kept until ``events()`` because a transaction's agent message may come after its rows.

    >>> from detectors.spec import TableSpec
    >>> r = UndoReader([TableSpec(name="public.t", topic="db.public.t", key_columns=("id",))])
    >>> r.feed(None, b'{"op":"c","after":{"id":1,"agent_id":"a1"},"source":{"schema":"public","table":"t",'
    ...              b'"ts_ms":5,"txId":9}}', "f:1")
    >>> [(e.table, e.key, e.op, e.agent_id, e.commit_ts_us) for e in r.events()]
    [('public.t', {'id': 1}, 'c', 'a1', 5000)]
    """

    tables: Sequence[TableSpec]
    message_prefix: str | None = None
    database_identity: bool = False
    # False when the message keys are not the rows' keys (debezium.key_by_agent keys records by the agent id).
    message_keys: bool = True
    skipped: Counter[str] = field(default_factory=Counter)
    _rows: list[_Held] = field(default_factory=list)
    _tx: dict[str, tuple[str, str | None, dict[str, str]]] = field(default_factory=dict)
    _specs: dict[str, tuple[int, TableSpec, Extractor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._specs = {t.name: (i, t, Extractor(t)) for i, t in enumerate(self.tables)}

    def feed(self, key: bytes | None, value: bytes | None, position: str) -> None:
        """One record. Raises EnvelopeError for a value that is no Debezium event, MissingKey for an unkeyed row."""
        ev = decode(value)
        if not isinstance(ev, ChangeEvent):
            self.skipped[type(ev).__name__.lower()] += 1
            return
        if ev.op == "m":
            self._message(ev)
            return
        table = f"{ev.schema}.{ev.table}"
        found = self._specs.get(table)
        if found is None:
            self.skipped["unwatched_table"] += 1
            return
        if ev.op not in _ROW_OPS:
            # A snapshot read is no write; a truncate cannot be undone from the change events (they hold no rows).
            self.skipped["snapshot" if ev.op == "r" else "truncate"] += 1
            return
        i, spec, extractor = found
        message_key = _json(key) if self.message_keys else None
        row_key = key_of(message_key, spec.key_columns, ev.op, ev.before, ev.after)
        if row_key is None:
            raise MissingKey(
                f"{position}: a {table} change without a usable message key (none, or debezium.key_by_agent), and "
                f"tables.{i}.key_columns is not set "
                '(name the columns that identify a row, or keep the keys: {"key": ..., "value": ...} lines)'
            )
        agent, run = (None, None) if self.database_identity else extractor.agent(ev.op, ev.before, ev.after)
        if agent is not None and is_reserved(agent):
            agent, run = None, None  # a reserved identity is never taken from a row
        self._rows.append(_Held(ev, table, row_key, agent, run, position))

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
        if self.database_identity and "role" not in body:
            self.skipped["claimed_identity"] += 1  # a writer's own message: a claim, never believed
            return
        agent = identity(body.get("agent_id"))
        if agent is None or is_reserved(agent):
            self.skipped["logical_message"] += 1
            return
        meta = {
            str(k)[:64]: str(v)[:256]
            for k, v in list(body.items())[:_META_LIMIT]
            if k not in ("agent_id", "run_id") and isinstance(v, str | int | float | bool)
        }
        self._tx.setdefault(ev.tx_id, (agent, identity(body.get("run_id")), meta))

    def events(self) -> list[RowEvent]:
        out: list[RowEvent] = []
        for h in self._rows:
            agent, run = h.agent, h.run
            meta: dict[str, str] = {}
            if agent is None and h.ev.tx_id is not None and (known := self._tx.get(h.ev.tx_id)) is not None:
                agent, run, meta = known
            op = h.ev.op
            assert op == "c" or op == "u" or op == "d"  # feed keeps only row ops
            out.append(
                RowEvent(
                    h.table,
                    h.key,
                    op,
                    h.ev.before,
                    h.ev.after,
                    h.ev.commit_ts_us,
                    h.ev.tx_id,
                    agent,
                    run,
                    h.position,
                    h.ev.lsn,
                    meta,
                )
            )
        return out


def _json(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None  # a key that is no JSON (a string or Avro key): not usable, key_columns must name the row


def split_line(line: bytes) -> tuple[bytes | None, bytes | None]:
    """(key, value) of one line: a bare Debezium value, or ``{"key": ..., "value": ...}``.

    >>> split_line(b'{"key": {"id": 1}, "value": {"op": "d"}}')
    (b'{"id":1}', b'{"op":"d"}')
    >>> split_line(b'{"op": "d"}')
    (None, b'{"op": "d"}')
    """
    if line == b"null":
        return None, None
    if _WRAPPED.match(line):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None, line  # decode() reports it
        # No Debezium value has exactly these two fields, so the wrapped form cannot be mistaken for one.
        if isinstance(obj, dict) and set(obj) == {"key", "value"}:
            key, value = obj["key"], obj["value"]
            return (
                None if key is None else orjson.dumps(key),
                None if value is None else (value.encode() if isinstance(value, str) else orjson.dumps(value)),
            )
    return None, line


@dataclass
class ReadStats:
    lines: int = 0
    seconds: float = 0.0
    undecodable: Counter[str] = field(default_factory=Counter)


def read_events_file(
    path: str | Path,
    reader: UndoReader,
    progress: Callable[[str], None] | None = None,
    every_s: float = 2.0,
) -> tuple[list[RowEvent], ReadStats]:
    """Every row change in the file, attributed; undecodable lines are counted by reason, not fatal."""
    stats = ReadStats()
    started = last = time.perf_counter()
    name = str(path)
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            stats.lines = n
            line = raw.strip()
            if not line:
                continue
            key, value = split_line(line)
            try:
                reader.feed(key, value, f"{name}:{n}")
            except EnvelopeError as e:
                stats.undecodable[e.reason] += 1
            if progress is not None and n & 0xFFF == 0 and (now := time.perf_counter()) - last >= every_s:
                last = now
                progress(f"scope: {n:,} events read, {n / (now - started):,.0f} events/s, at {name}:{n}")
    stats.seconds = time.perf_counter() - started
    return reader.events(), stats
