"""Decode the value of a Debezium record (Kafka Connect ``JsonConverter`` output) into a typed event.

This runs once per consumed record, so it decodes straight into msgspec Structs that declare only the
fields detection reads; everything else, including the whole ``schema`` section, is skipped by the
parser without being materialised.

Shapes handled (all from ``JsonConverter``, with ``schemas.enable`` true or false):

* schema+payload: ``{"schema": {...}, "payload": {...}}``. Recognised by a top-level ``payload`` key;
  ``"payload": null`` is a tombstone.
* payload-only (``schemas.enable=false``): the payload's fields at the top level.

Payloads, whichever shape carries them:

* change event: ``{"before", "after", "source", "op", "ts_ms", "ts_us", "ts_ns", "transaction"}``.
  ``op`` is one of :data:`OPS`: ``c`` create and ``r`` snapshot read (``after``), ``u`` update
  (``after``; ``before`` is null unless the table has ``REPLICA IDENTITY FULL``), ``d`` delete
  (``before``), ``t`` truncate (neither), ``m`` logical decoding message from
  ``pg_logical_emit_message`` (``{"op": "m", "source", "message": {"prefix", "content": <base64>}}``).
* heartbeat (topic ``__debezium-heartbeat.<prefix>``): ``{"ts_ms": N}`` and nothing a change event
  or a transaction marker carries.
* transaction marker (topic ``<prefix>.transaction``):
  ``{"status": "BEGIN"|"END", "id", "ts_ms", "event_count", "data_collections"}``.
* tombstone: a null or empty value, the compaction marker Debezium sends after a delete.

Everything else raises :class:`EnvelopeError`, whose ``reason`` is a stable code for metrics and the
dead-letter topic. Input bytes are untrusted: no input makes :func:`decode` raise anything else.

Limits, accepted for speed: UTF-8 is validated in every string that is decoded (all the fields above,
every key and value of ``before``/``after``), not inside skipped sections such as ``schema``; when a
record has several problems, which one is reported is unspecified. MongoDB's envelope (``after`` as an
extended-JSON string) is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeGuard, get_args

import msgspec
from msgspec import UNSET, UnsetType

from detectors.write import OPS, Op

__all__ = [
    "OPS",
    "REASONS",
    "ChangeEvent",
    "Decoded",
    "EnvelopeError",
    "Heartbeat",
    "Tombstone",
    "TransactionMarker",
    "commit_ts_us_from_source",
    "decode",
]

Reason = Literal[
    "invalid_json",
    "not_an_object",
    "missing_op",
    "unknown_op",
    "missing_source",
    "missing_timestamp",
    "missing_row",
    "invalid_message",
]
# Lets metrics pre-register every label value, so a reason that never fired still shows as 0.
REASONS: Final[frozenset[str]] = frozenset(get_args(Reason))

# Debezium's snapshot marker is a string enum; "false" and "incremental" (incremental-snapshot
# reads, already op "r") are not in it. Older connectors and some tools emit a JSON boolean.
_SNAPSHOT_TRUE: Final[frozenset[str | bool]] = frozenset(
    {"true", "first", "last", "first_in_data_collection", "last_in_data_collection", True}
)


class EnvelopeError(ValueError):
    """A record value that is not a Debezium event this decoder understands.

    ``reason`` is one of :data:`REASONS`:

    * ``invalid_json``: not JSON, not UTF-8, or nested too deep to decode.
    * ``not_an_object``: JSON, but the value (or its ``payload``) is not an object.
    * ``missing_op``: no ``op`` and not a heartbeat or transaction marker either.
    * ``unknown_op``: ``op`` is not one of :data:`OPS`.
    * ``missing_source``: ``source`` missing or not an object (required except for ``m``), or one of
      its fields has the wrong type.
    * ``missing_timestamp``: none of ``source.ts_ns``/``ts_us``/``ts_ms`` nor ``ts_ms`` is set, one
      that is set is not an integer, or the commit time it gives is before 1970 or after 9999.
    * ``missing_row``: the row image the op needs is not an object, or a row image is neither an
      object nor null.
    * ``invalid_message``: a bad ``m`` message (no ``message`` object, bad base64), a malformed
      transaction marker or ``transaction`` block: anything malformed that fits no code above.
    """

    reason: Reason
    detail: str

    def __init__(self, reason: Reason, detail: str) -> None:
        # Both in args, so the exception survives pickling (multiprocessing, faust) intact.
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(slots=True)
class ChangeEvent:
    """One row change (or truncate, or logical decoding message) as detection sees it."""

    op: Op
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    schema: str | None
    table: str | None
    commit_ts_us: int
    tx_id: str | None
    lsn: int | None
    message_prefix: str | None
    message_content: bytes | None
    snapshot: bool


@dataclass(slots=True)
class Tombstone:
    """A null or empty value: the compaction marker that follows a delete."""


@dataclass(slots=True)
class Heartbeat:
    """A Debezium heartbeat: the connector is alive and has read up to ``ts_ms``."""

    ts_ms: int


@dataclass(slots=True)
class TransactionMarker:
    """BEGIN or END of a source transaction (``provide.transaction.metadata=true``)."""

    status: str
    id: str
    event_count: int | None


Decoded = ChangeEvent | Tombstone | Heartbeat | TransactionMarker


# The wire model. Fields default to None so that absent and null are the same thing; types are what
# every Debezium relational connector emits, so a type mismatch means a corrupt or foreign record.
# gc=False: decoded JSON cannot form reference cycles, and untracked structs cost the collector nothing.


class _Source(msgspec.Struct, gc=False):
    schema: str | None = None
    db: str | None = None
    table: str | None = None
    ts_ms: int | None = None
    ts_us: int | None = None
    ts_ns: int | None = None
    # An int on PostgreSQL, a hex string on Oracle; absent on MySQL, which uses transaction.id.
    tx_id: int | str | None = msgspec.field(default=None, name="txId")
    lsn: int | None = None
    snapshot: str | bool | None = None


class _Transaction(msgspec.Struct, gc=False):
    id: str | None = None


class _LogicalMessage(msgspec.Struct, gc=False):
    prefix: str | None = None
    # JsonConverter writes BYTES as base64; msgspec decodes and validates it in C.
    content: bytes | None = None


class _Payload(msgspec.Struct, gc=False):
    op: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    source: _Source | None = None
    ts_ms: int | None = None
    transaction: _Transaction | None = None
    message: _LogicalMessage | None = None
    # Transaction-marker fields share the struct so that a marker needs no second parse.
    status: str | None = None
    id: str | None = None
    event_count: int | None = None


class _Value(_Payload, gc=False):
    # UNSET tells "no payload key" (payload-only shape) from "payload": null (a tombstone).
    # "schema" is deliberately not declared: the parser skips it without building anything.
    payload: _Payload | UnsetType | None = UNSET


_decoder: Final = msgspec.json.Decoder(_Value)

_FIELD_REASONS: Final[dict[str, Reason]] = {
    "op": "unknown_op",  # present (else it would be None) but not a string
    "before": "missing_row",
    "after": "missing_row",
    "source": "missing_source",
    "ts_ms": "missing_timestamp",
    "message": "invalid_message",
}
_TS_FIELDS: Final = frozenset({"ts_ms", "ts_us", "ts_ns"})
_NEEDS_AFTER: Final = frozenset({"c", "r", "u"})
# 9999-12-31T00:00:00Z. Anything later (or before the epoch) is corrupt, and would make
# datetime.fromtimestamp raise downstream instead of the record being dead-lettered here; the last
# day of 9999 is left out because us / 1e6 rounds up into year 10000 there.
_MAX_TS_US: Final = 253_402_214_400_000_000
_AT: Final = " - at `$"


def _validation_reason(message: str) -> Reason:
    """Map a msgspec validation error to a reason through the JSON path it names."""
    at = message.rfind(_AT)
    if at < 0:
        return "not_an_object"  # an error without a path is about the root value
    path = message[at + len(_AT) : -1]
    if path.startswith(".payload"):
        path = path[len(".payload") :]
    # path is now "", ".before", ".before[...]", ".source.ts_ns", ".message.content", ...
    parts = path.replace("[", ".[").split(".")
    if len(parts) < 2:
        return "not_an_object"  # the payload itself
    field = parts[1]
    if field == "source" and len(parts) > 2 and parts[2] in _TS_FIELDS:
        return "missing_timestamp"
    return _FIELD_REASONS.get(field, "invalid_message")


def _short(value: object, limit: int = 60) -> str:
    # Details land in logs and dead letters; an attacker-sized op must not.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _commit_ts_us(ts_ns: int | None, ts_us: int | None, ts_ms: int | None) -> int | None:
    if ts_ns is not None:
        return ts_ns // 1000
    if ts_us is not None:
        return ts_us
    if ts_ms is not None:
        return ts_ms * 1000
    return None


def commit_ts_us_from_source(source: Mapping[str, object]) -> int | None:
    """Commit time in µs since the epoch from a Debezium ``source`` block, or None.

    The most precise of ``ts_ns`` > ``ts_us`` > ``ts_ms`` wins; values that are not integers are
    ignored. For callers holding a plain dict; :func:`decode` applies the same rule to its structs.
    """

    def _int(key: str) -> int | None:
        v = source.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    return _commit_ts_us(_int("ts_ns"), _int("ts_us"), _int("ts_ms"))


def _is_op(op: str) -> TypeGuard[Op]:
    return op in OPS


def decode(value: bytes | None) -> Decoded:
    """Decode one record value. Raises :class:`EnvelopeError` for anything that is not a Debezium event."""
    if not value:
        return Tombstone()
    try:
        top = _decoder.decode(value)
    except msgspec.ValidationError as exc:  # before DecodeError: it is a subclass
        raise EnvelopeError(_validation_reason(str(exc)), str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise EnvelopeError("invalid_json", str(exc)) from exc
    except UnicodeDecodeError as exc:  # invalid UTF-8 inside a string msgspec materialises
        raise EnvelopeError("invalid_json", str(exc)) from exc
    except RecursionError as exc:  # valid JSON nested deeper than the interpreter's stack allows
        raise EnvelopeError("invalid_json", "JSON nested too deep") from exc

    env: _Payload
    if top.payload is UNSET:
        env = top
    elif top.payload is None:
        return Tombstone()
    else:
        env = top.payload

    op = env.op
    if op is None:
        return _decode_non_change(env)
    if not _is_op(op):
        raise EnvelopeError("unknown_op", f"op {_short(op)} is not one of c, u, d, r, t, m")

    src = env.source
    if src is None and op != "m":
        raise EnvelopeError("missing_source", f"op {op!r} without a source object")
    if op == "d":
        if env.before is None:
            raise EnvelopeError("missing_row", "op 'd' without a before object")
    elif op in _NEEDS_AFTER and env.after is None:
        raise EnvelopeError("missing_row", f"op {op!r} without an after object")

    commit_ts_us = None if src is None else _commit_ts_us(src.ts_ns, src.ts_us, src.ts_ms)
    if commit_ts_us is None:
        # The envelope's ts_ms is when Debezium processed the change, not when it committed.
        if env.ts_ms is None:
            raise EnvelopeError("missing_timestamp", "no source.ts_ns, ts_us or ts_ms, nor ts_ms")
        commit_ts_us = env.ts_ms * 1000
    if not 0 <= commit_ts_us <= _MAX_TS_US:
        raise EnvelopeError("missing_timestamp", f"commit time {_short(commit_ts_us)} µs is not in 1970..9999")

    prefix: str | None = None
    content: bytes | None = None
    if op == "m":
        msg = env.message
        if msg is None:
            raise EnvelopeError("invalid_message", "op 'm' without a message object")
        prefix = msg.prefix
        content = msg.content

    schema: str | None = None
    table: str | None = None
    tx: int | str | None = None
    lsn: int | None = None
    snapshot = False
    if src is not None:
        # MySQL has no schema level and names the database "db"; "" is what m events carry.
        schema = (src.schema if src.schema is not None else src.db) or None
        table = src.table or None
        tx = src.tx_id
        lsn = src.lsn
        snapshot = src.snapshot in _SNAPSHOT_TRUE
    if tx is None and env.transaction is not None:
        tx = env.transaction.id

    return ChangeEvent(
        op,
        env.before,
        env.after,
        schema,
        table,
        commit_ts_us,
        tx if tx is None or type(tx) is str else str(tx),
        lsn,
        prefix,
        content,
        snapshot,
    )


def _decode_non_change(env: _Payload) -> Heartbeat | TransactionMarker:
    if env.status is not None:
        if env.status not in ("BEGIN", "END"):
            raise EnvelopeError("invalid_message", f"transaction status {_short(env.status)} not BEGIN/END")
        if not env.id:
            raise EnvelopeError("invalid_message", "transaction marker without an id")
        return TransactionMarker(env.status, env.id, env.event_count)
    if (
        env.ts_ms is not None
        and env.before is None
        and env.after is None
        and env.source is None
        and env.message is None
        and env.transaction is None
        and env.id is None
        and env.event_count is None
    ):
        if not 0 <= env.ts_ms <= _MAX_TS_US // 1000:
            raise EnvelopeError("missing_timestamp", f"heartbeat ts_ms {_short(env.ts_ms)} is not in 1970..9999")
        return Heartbeat(env.ts_ms)
    raise EnvelopeError("missing_op", "no op, and neither a heartbeat nor a transaction marker")
