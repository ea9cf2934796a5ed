"""Tests for connectors.debezium.decode.

The fixtures are modelled on Debezium 3.x PostgreSQL connector output through Kafka Connect's
JsonConverter (pgoutput, ``provide.transaction.metadata=true``), for a table ``public.orders`` on a
server with topic prefix ``shop``.
"""

from __future__ import annotations

import base64
import copy
import json
import pickle
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.debezium import (
    OPS,
    REASONS,
    ChangeEvent,
    EnvelopeError,
    Heartbeat,
    Tombstone,
    TransactionMarker,
    commit_ts_us_from_source,
    decode,
)

# --- fixtures: payload-only values (value.converter.schemas.enable=false) ---------------------------

CREATE = b"""{
  "before": null,
  "after": {"id": 1001, "customer_id": 42, "status": "pending", "total_cents": 129900,
            "currency": "EUR", "note": "first order", "updated_by": "agent:planner-7",
            "created_at": "2025-03-14T09:26:53.589793Z"},
  "source": {"version": "3.0.7.Final", "connector": "postgresql", "name": "shop",
             "ts_ms": 1741944413589, "ts_us": 1741944413589793, "ts_ns": 1741944413589793000,
             "snapshot": "false", "db": "shopdb", "sequence": "[\\"24023119\\",\\"24023128\\"]",
             "schema": "public", "table": "orders", "txId": 571, "lsn": 24023128, "xmin": null},
  "transaction": {"id": "571:24023128", "total_order": 1, "data_collection_order": 1},
  "op": "c",
  "ts_ms": 1741944413740, "ts_us": 1741944413740120, "ts_ns": 1741944413740120000
}"""

# REPLICA IDENTITY DEFAULT: pgoutput sends no old tuple, so before is null.
UPDATE = b"""{
  "before": null,
  "after": {"id": 1001, "customer_id": 42, "status": "paid", "total_cents": 129900,
            "currency": "EUR", "note": "first order", "updated_by": "agent:planner-7",
            "created_at": "2025-03-14T09:26:53.589793Z"},
  "source": {"version": "3.0.7.Final", "connector": "postgresql", "name": "shop",
             "ts_ms": 1741944414002, "ts_us": 1741944414002311, "ts_ns": 1741944414002311000,
             "snapshot": "false", "db": "shopdb", "sequence": "[\\"24023128\\",\\"24023360\\"]",
             "schema": "public", "table": "orders", "txId": 572, "lsn": 24023360, "xmin": null},
  "transaction": {"id": "572:24023360", "total_order": 1, "data_collection_order": 1},
  "op": "u",
  "ts_ms": 1741944414101, "ts_us": 1741944414101480, "ts_ns": 1741944414101480000
}"""

# REPLICA IDENTITY FULL: the old row comes along.
UPDATE_FULL = b"""{
  "before": {"id": 1001, "customer_id": 42, "status": "paid", "total_cents": 129900,
             "currency": "EUR", "note": "first order", "updated_by": "agent:planner-7",
             "created_at": "2025-03-14T09:26:53.589793Z"},
  "after": {"id": 1001, "customer_id": 42, "status": "refunded", "total_cents": 0,
            "currency": "EUR", "note": null, "updated_by": "agent:support-3",
            "created_at": "2025-03-14T09:26:53.589793Z"},
  "source": {"version": "3.0.7.Final", "connector": "postgresql", "name": "shop",
             "ts_ms": 1741944415300, "ts_us": 1741944415300007, "ts_ns": 1741944415300007000,
             "snapshot": "false", "db": "shopdb", "sequence": "[\\"24023360\\",\\"24023592\\"]",
             "schema": "public", "table": "orders", "txId": 573, "lsn": 24023592, "xmin": null},
  "transaction": {"id": "573:24023592", "total_order": 1, "data_collection_order": 1},
  "op": "u",
  "ts_ms": 1741944415388, "ts_us": 1741944415388051, "ts_ns": 1741944415388051000
}"""

# REPLICA IDENTITY DEFAULT: before carries the key columns only, the rest null.
DELETE = b"""{
  "before": {"id": 1001, "customer_id": null, "status": null, "total_cents": null,
             "currency": null, "note": null, "updated_by": null, "created_at": null},
  "after": null,
  "source": {"version": "3.0.7.Final", "connector": "postgresql", "name": "shop",
             "ts_ms": 1741944416010, "ts_us": 1741944416010442, "ts_ns": 1741944416010442000,
             "snapshot": "false", "db": "shopdb", "sequence": "[\\"24023592\\",\\"24023824\\"]",
             "schema": "public", "table": "orders", "txId": 574, "lsn": 24023824, "xmin": null},
  "transaction": {"id": "574:24023824", "total_order": 1, "data_collection_order": 1},
  "op": "d",
  "ts_ms": 1741944416077, "ts_us": 1741944416077990, "ts_ns": 1741944416077990000
}"""

READ = b"""{
  "before": null,
  "after": {"id": 977, "customer_id": 7, "status": "shipped", "total_cents": 4500,
            "currency": "EUR", "note": null, "updated_by": "web",
            "created_at": "2025-03-01T12:00:00Z"},
  "source": {"version": "3.0.7.Final", "connector": "postgresql", "name": "shop",
             "ts_ms": 1741944400120, "ts_us": 1741944400120000, "ts_ns": 1741944400120000000,
             "snapshot": "first", "db": "shopdb", "sequence": "[null,\\"24022960\\"]",
             "schema": "public", "table": "orders", "txId": 570, "lsn": 24022960, "xmin": null},
  "transaction": null,
  "op": "r",
  "ts_ms": 1741944400133, "ts_us": 1741944400133861, "ts_ns": 1741944400133861000
}"""

TRUNCATE = b"""{
  "source": {"version": "3.0.7.Final", "connector": "postgresql", "name": "shop",
             "ts_ms": 1741944417500, "ts_us": 1741944417500120, "ts_ns": 1741944417500120000,
             "snapshot": "false", "db": "shopdb", "sequence": "[\\"24023824\\",\\"24024056\\"]",
             "schema": "public", "table": "orders", "txId": 575, "lsn": 24024056, "xmin": null},
  "transaction": {"id": "575:24024056", "total_order": 1, "data_collection_order": 1},
  "op": "t",
  "ts_ms": 1741944417561, "ts_us": 1741944417561334, "ts_ns": 1741944417561334000
}"""

MESSAGE_CONTENT = b'{"agent_id":"planner-7","run_id":"r-19"}'

# pg_logical_emit_message(true, 'writeguard', '{"agent_id":...}'): schema and table are empty.
MESSAGE = (
    b"""{
  "op": "m",
  "ts_ms": 1741944418020, "ts_us": 1741944418020880, "ts_ns": 1741944418020880000,
  "source": {"version": "3.0.7.Final", "connector": "postgresql", "name": "shop",
             "ts_ms": 1741944418001, "ts_us": 1741944418001950, "ts_ns": 1741944418001950000,
             "snapshot": "false", "db": "shopdb", "sequence": "[\\"24024056\\",\\"24024288\\"]",
             "schema": "", "table": "", "txId": 576, "lsn": 24024288, "xmin": null},
  "message": {"prefix": "writeguard", "content": \""""
    + base64.b64encode(MESSAGE_CONTENT)
    + b"""\"}
}"""
)

HEARTBEAT = b'{"ts_ms": 1741944420000}'

TX_BEGIN = b"""{"status": "BEGIN", "id": "571:24023128", "ts_ms": 1741944413589,
  "event_count": null, "data_collections": null}"""

TX_END = b"""{"status": "END", "id": "571:24023128", "ts_ms": 1741944413589, "event_count": 2,
  "data_collections": [{"data_collection": "public.orders", "event_count": 2}]}"""

# --- the same, as schema+payload (value.converter.schemas.enable=true) ------------------------------

_ROW_FIELDS = b"""[
  {"type": "int64", "optional": false, "default": 0, "field": "id"},
  {"type": "int64", "optional": true, "field": "customer_id"},
  {"type": "string", "optional": true, "field": "status"},
  {"type": "int64", "optional": true, "field": "total_cents"},
  {"type": "string", "optional": true, "field": "currency"},
  {"type": "string", "optional": true, "field": "note"},
  {"type": "string", "optional": true, "field": "updated_by"},
  {"type": "string", "optional": true, "name": "io.debezium.time.ZonedTimestamp", "version": 1,
   "field": "created_at"}]"""

ORDERS_VALUE_SCHEMA = (
    b"""{"type": "struct", "fields": [
  {"type": "struct", "fields": """
    + _ROW_FIELDS
    + b""", "optional": true, "name": "shop.public.orders.Value", "field": "before"},
  {"type": "struct", "fields": """
    + _ROW_FIELDS
    + b""", "optional": true, "name": "shop.public.orders.Value", "field": "after"},
  {"type": "struct", "fields": [
    {"type": "string", "optional": false, "field": "version"},
    {"type": "string", "optional": false, "field": "connector"},
    {"type": "string", "optional": false, "field": "name"},
    {"type": "int64", "optional": false, "field": "ts_ms"},
    {"type": "string", "optional": true, "name": "io.debezium.data.Enum", "version": 1,
     "parameters": {
       "allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},
     "default": "false", "field": "snapshot"},
    {"type": "string", "optional": false, "field": "db"},
    {"type": "string", "optional": true, "field": "sequence"},
    {"type": "int64", "optional": true, "field": "ts_us"},
    {"type": "int64", "optional": true, "field": "ts_ns"},
    {"type": "string", "optional": false, "field": "schema"},
    {"type": "string", "optional": false, "field": "table"},
    {"type": "int64", "optional": true, "field": "txId"},
    {"type": "int64", "optional": true, "field": "lsn"},
    {"type": "int64", "optional": true, "field": "xmin"}],
   "optional": false, "name": "io.debezium.connector.postgresql.Source", "version": 1, "field": "source"},
  {"type": "struct", "fields": [
    {"type": "string", "optional": false, "field": "id"},
    {"type": "int64", "optional": false, "field": "total_order"},
    {"type": "int64", "optional": false, "field": "data_collection_order"}],
   "optional": true, "name": "event.block", "version": 1, "field": "transaction"},
  {"type": "string", "optional": false, "field": "op"},
  {"type": "int64", "optional": true, "field": "ts_ms"},
  {"type": "int64", "optional": true, "field": "ts_us"},
  {"type": "int64", "optional": true, "field": "ts_ns"}],
 "optional": false, "name": "shop.public.orders.Envelope", "version": 2}"""
)

HEARTBEAT_SCHEMA = b"""{"type": "struct", "fields": [{"type": "int64", "optional": false, "field": "ts_ms"}],
 "optional": false, "name": "io.debezium.connector.common.Heartbeat", "version": 1}"""

TX_SCHEMA = b"""{"type": "struct", "fields": [
  {"type": "string", "optional": false, "field": "status"},
  {"type": "string", "optional": false, "field": "id"},
  {"type": "int64", "optional": true, "field": "ts_ms"},
  {"type": "int64", "optional": true, "field": "event_count"},
  {"type": "array", "items": {"type": "struct", "fields": [
     {"type": "string", "optional": false, "field": "data_collection"},
     {"type": "int64", "optional": false, "field": "event_count"}],
   "optional": false, "name": "event.collection", "version": 1},
   "optional": true, "field": "data_collections"}],
 "optional": false, "name": "io.debezium.connector.common.TransactionMetadataValue", "version": 1}"""


def wrap(payload: bytes, schema: bytes = ORDERS_VALUE_SCHEMA) -> bytes:
    return b'{"schema": ' + schema + b', "payload": ' + payload + b"}"


def edit(fixture: bytes, change: Any) -> bytes:
    """The fixture as a dict, changed in place by ``change``, serialised again."""
    doc = json.loads(fixture)
    change(doc)
    return json.dumps(doc).encode()


def reason_of(value: bytes | None) -> str:
    with pytest.raises(EnvelopeError) as info:
        decode(value)
    assert info.value.reason in REASONS
    return info.value.reason


# --- change events --------------------------------------------------------------------------------


def _row(fixture: bytes, image: str) -> dict[str, Any] | None:
    """A row image of a fixture as written there: decode passes rows through untouched."""
    row = json.loads(fixture).get(image)
    assert row is None or isinstance(row, dict)
    return row


def _event(fixture: bytes, **fields: Any) -> ChangeEvent:
    base: dict[str, Any] = {
        "before": _row(fixture, "before"),
        "after": _row(fixture, "after"),
        "schema": "public",
        "table": "orders",
        "message_prefix": None,
        "message_content": None,
        "snapshot": False,
    }
    return ChangeEvent(**{**base, **fields})


# Every fixture with the event it must decode to; the op, times, transaction ids, LSNs and table are spelled out.
EXPECTED: dict[str, tuple[bytes, ChangeEvent]] = {
    "create": (
        CREATE,
        ChangeEvent(
            op="c",
            before=None,
            after={
                "id": 1001,
                "customer_id": 42,
                "status": "pending",
                "total_cents": 129900,
                "currency": "EUR",
                "note": "first order",
                "updated_by": "agent:planner-7",
                "created_at": "2025-03-14T09:26:53.589793Z",
            },
            schema="public",
            table="orders",
            commit_ts_us=1741944413589793,
            tx_id="571",
            lsn=24023128,
            message_prefix=None,
            message_content=None,
            snapshot=False,
        ),
    ),
    "update": (UPDATE, _event(UPDATE, op="u", commit_ts_us=1741944414002311, tx_id="572", lsn=24023360)),
    "update_full": (
        UPDATE_FULL,
        _event(UPDATE_FULL, op="u", commit_ts_us=1741944415300007, tx_id="573", lsn=24023592),
    ),
    "delete": (DELETE, _event(DELETE, op="d", commit_ts_us=1741944416010442, tx_id="574", lsn=24023824)),
    "read": (READ, _event(READ, op="r", commit_ts_us=1741944400120000, tx_id="570", lsn=24022960, snapshot=True)),
    "truncate": (TRUNCATE, _event(TRUNCATE, op="t", commit_ts_us=1741944417500120, tx_id="575", lsn=24024056)),
    "message": (
        MESSAGE,
        _event(
            MESSAGE,
            op="m",
            schema=None,
            table=None,
            commit_ts_us=1741944418001950,
            tx_id="576",
            lsn=24024288,
            message_prefix="writeguard",
            message_content=MESSAGE_CONTENT,
        ),
    ),
}


def test_the_fixtures_cover_every_op() -> None:
    assert {ev.op for _, ev in EXPECTED.values()} == OPS
    for raw, ev in EXPECTED.values():
        assert json.loads(raw)["op"] == ev.op  # each expectation is about its own fixture


@pytest.mark.parametrize("shape", ["payload-only", "schema+payload"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_op_in_both_shapes(name: str, shape: str) -> None:
    raw, expected = EXPECTED[name]
    ev = decode(raw if shape == "payload-only" else wrap(raw))
    assert isinstance(ev, ChangeEvent)
    assert ev.op == expected.op
    assert ev == expected  # every field: rows, table, commit time, tx id, LSN, message, snapshot flag
    src = json.loads(raw)["source"]
    assert ev.commit_ts_us == src["ts_ns"] // 1000
    assert ev.lsn == src["lsn"]
    assert ev.tx_id == str(src["txId"])


def test_create_fields() -> None:
    raw, expected = EXPECTED["create"]
    assert decode(raw) == expected
    assert decode(wrap(raw)) == expected


def test_update_with_before_null() -> None:
    ev = decode(UPDATE)
    assert isinstance(ev, ChangeEvent)
    assert ev.op == "u"
    assert ev.before is None
    assert ev.after is not None
    assert ev.after["status"] == "paid"
    assert ev.commit_ts_us == 1741944414002311


def test_update_with_full_replica_identity() -> None:
    ev = decode(wrap(UPDATE_FULL))
    assert isinstance(ev, ChangeEvent)
    assert ev.before is not None
    assert ev.after is not None
    assert (ev.before["status"], ev.after["status"]) == ("paid", "refunded")


def test_delete() -> None:
    ev = decode(DELETE)
    assert isinstance(ev, ChangeEvent)
    assert ev.op == "d"
    assert ev.after is None
    assert ev.before == {
        "id": 1001,
        "customer_id": None,
        "status": None,
        "total_cents": None,
        "currency": None,
        "note": None,
        "updated_by": None,
        "created_at": None,
    }


def test_snapshot_read() -> None:
    ev = decode(READ)
    assert isinstance(ev, ChangeEvent)
    assert (ev.op, ev.snapshot, ev.tx_id) == ("r", True, "570")
    assert ev.after is not None
    assert ev.after["id"] == 977


def test_truncate_has_no_rows() -> None:
    ev = decode(wrap(TRUNCATE))
    assert isinstance(ev, ChangeEvent)
    assert (ev.op, ev.before, ev.after, ev.schema, ev.table) == ("t", None, None, "public", "orders")


def test_logical_decoding_message() -> None:
    for raw in (MESSAGE, wrap(MESSAGE)):
        ev = decode(raw)
        assert isinstance(ev, ChangeEvent)
        assert ev.op == "m"
        assert ev.message_prefix == "writeguard"
        assert ev.message_content == MESSAGE_CONTENT
        # Messages are not bound to a table; the connector sends "" for both.
        assert (ev.schema, ev.table) == (None, None)
        assert ev.commit_ts_us == 1741944418001950


def test_logical_decoding_message_without_source_uses_envelope_ts() -> None:
    ev = decode(edit(MESSAGE, lambda d: d.pop("source")))
    assert isinstance(ev, ChangeEvent)
    assert ev.commit_ts_us == 1741944418020 * 1000
    assert (ev.tx_id, ev.lsn, ev.snapshot) == (None, None, False)
    assert ev.message_content == MESSAGE_CONTENT


def test_empty_message_content() -> None:
    ev = decode(edit(MESSAGE, lambda d: d["message"].update(content="")))
    assert isinstance(ev, ChangeEvent)
    assert ev.message_content == b""


def test_unknown_fields_are_ignored_everywhere() -> None:
    def add_noise(d: dict[str, Any]) -> None:
        d["headers"] = {"x": [1, 2, {"y": None}]}
        d["source"]["shard"] = "eu-1"
        d["source"]["ts_ps"] = "not an int, but not ours"
        d["transaction"]["extra"] = [1.5, True]
        d["op_type"] = 17

    assert decode(edit(CREATE, add_noise)) == decode(CREATE)


def test_rows_keep_arbitrary_values() -> None:
    weird = {"": [], "a.b": {"c": [1, 2.5, None, True, "é\u2028"]}, "big": 2**80, "neg": -1e300}
    ev = decode(edit(CREATE, lambda d: d.update(after=weird)))
    assert isinstance(ev, ChangeEvent)
    assert ev.after == weird


# --- snapshot, tx id, schema ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("first", True),
        ("last", True),
        ("first_in_data_collection", True),
        ("last_in_data_collection", True),
        (True, True),
        ("false", False),
        ("incremental", False),
        (False, False),
        (None, False),
    ],
)
def test_snapshot_flag(value: object, expected: bool) -> None:
    ev = decode(edit(READ, lambda d: d["source"].update(snapshot=value)))
    assert isinstance(ev, ChangeEvent)
    assert ev.snapshot is expected


def test_snapshot_flag_absent() -> None:
    ev = decode(edit(READ, lambda d: d["source"].pop("snapshot")))
    assert isinstance(ev, ChangeEvent)
    assert ev.snapshot is False


def test_tx_id_falls_back_to_transaction_block() -> None:
    def mysql_like(d: dict[str, Any]) -> None:
        src = d["source"]
        for k in ("txId", "lsn", "schema", "xmin", "sequence"):
            src.pop(k)
        src.update(connector="mysql", db="shop", file="binlog.000003", pos=154, server_id=223344)
        d["transaction"]["id"] = "file=binlog.000003,pos=154"

    ev = decode(edit(CREATE, mysql_like))
    assert isinstance(ev, ChangeEvent)
    assert ev.tx_id == "file=binlog.000003,pos=154"
    assert ev.lsn is None
    assert (ev.schema, ev.table) == ("shop", "orders")  # no schema level: db stands in


def test_tx_id_string_and_absent() -> None:
    ev = decode(edit(CREATE, lambda d: d["source"].update(txId="0a001b00c5030000")))
    assert isinstance(ev, ChangeEvent)
    assert ev.tx_id == "0a001b00c5030000"
    ev = decode(edit(READ, lambda d: d["source"].update(txId=None)))
    assert isinstance(ev, ChangeEvent)
    assert ev.tx_id is None


# --- timestamps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_ts", "envelope_ts_ms", "expected"),
    [
        ({"ts_ns": 1_000_000_001_999, "ts_us": 5, "ts_ms": 7}, 9, 1_000_000_001),
        ({"ts_ns": None, "ts_us": 1_000_000_002, "ts_ms": 7}, 9, 1_000_000_002),
        ({"ts_us": 1_000_000_002, "ts_ms": 7}, 9, 1_000_000_002),
        ({"ts_ms": 1_000_003}, 9, 1_000_003_000),
        ({"ts_ms": None}, 1_000_004, 1_000_004_000),
        ({}, 1_000_004, 1_000_004_000),
        ({"ts_ns": 0}, 9, 0),
    ],
)
def test_timestamp_precedence(source_ts: dict[str, Any], envelope_ts_ms: int, expected: int) -> None:
    def set_ts(d: dict[str, Any]) -> None:
        for k in ("ts_ms", "ts_us", "ts_ns"):
            d["source"].pop(k)
        d["source"].update(source_ts)
        d["ts_ms"] = envelope_ts_ms

    raw = edit(UPDATE, set_ts)
    for value in (raw, wrap(raw)):
        ev = decode(value)
        assert isinstance(ev, ChangeEvent)
        assert ev.commit_ts_us == expected
    assert commit_ts_us_from_source(json.loads(raw)["source"]) == (
        None if expected == envelope_ts_ms * 1000 else expected
    )


def test_commit_ts_us_from_source_ignores_non_integers() -> None:
    assert commit_ts_us_from_source({"ts_ns": "1", "ts_us": True, "ts_ms": 2}) == 2000
    assert commit_ts_us_from_source({"ts_ns": 1.5}) is None
    assert commit_ts_us_from_source({}) is None


# --- tombstones, heartbeats, transaction markers --------------------------------------------------


@pytest.mark.parametrize("value", [None, b"", b'{"schema": null, "payload": null}', b'{"payload": null}'], ids=repr)
def test_tombstones(value: bytes | None) -> None:
    assert decode(value) == Tombstone()


def test_heartbeat_in_both_shapes() -> None:
    assert decode(HEARTBEAT) == Heartbeat(1741944420000)
    assert decode(wrap(HEARTBEAT, HEARTBEAT_SCHEMA)) == Heartbeat(1741944420000)


def test_heartbeat_needs_an_integer_ts() -> None:
    assert reason_of(b'{"ts_ms": "1741944420000"}') == "missing_timestamp"
    assert reason_of(b'{"ts_ms": null}') == "missing_op"


def test_transaction_markers() -> None:
    begin = TransactionMarker("BEGIN", "571:24023128", None)
    end = TransactionMarker("END", "571:24023128", 2)
    assert decode(TX_BEGIN) == begin
    assert decode(TX_END) == end
    assert decode(wrap(TX_BEGIN, TX_SCHEMA)) == begin
    assert decode(wrap(TX_END, TX_SCHEMA)) == end


@pytest.mark.parametrize(
    "value",
    [
        b'{"status": "COMMIT", "id": "1"}',
        b'{"status": "END", "event_count": 2}',
        b'{"status": "END", "id": "", "event_count": 2}',
        b'{"status": "END", "id": 571, "event_count": 2}',
        b'{"status": "END", "id": "571", "event_count": "2"}',
        b'{"status": 1, "id": "571"}',
    ],
)
def test_malformed_transaction_markers(value: bytes) -> None:
    assert reason_of(value) == "invalid_message"


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"{",
        CREATE[:-5],
        b'{"op": "c",}',
        b"\xff\xfe{}",
        b" ",
        b"{}{}",
        b'{"op": NaN}',
        # Latin-1 bytes in a row value that is decoded:
        edit(CREATE, lambda d: d["after"].update(note="x")).replace(b'"x"', b'"caf\xe9"'),
        b'{"op": "c", "after": {"a": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_001 + b"}",
    ],
    ids=lambda v: repr(v[:24]),
)
def test_invalid_json(value: bytes) -> None:
    assert reason_of(value) == "invalid_json"


@pytest.mark.parametrize(
    "value",
    [b"[]", b"[1, 2]", b"42", b'"c"', b"null", b"true", b'{"schema": {}, "payload": [1]}', b'{"payload": 5}'],
)
def test_not_an_object(value: bytes) -> None:
    assert reason_of(value) == "not_an_object"


def test_missing_op() -> None:
    assert reason_of(b"{}") == "missing_op"
    assert reason_of(edit(CREATE, lambda d: d.pop("op"))) == "missing_op"
    assert reason_of(edit(CREATE, lambda d: d.update(op=None))) == "missing_op"
    assert reason_of(wrap(b"{}")) == "missing_op"
    # ts_ms alongside anything a change event carries is not a heartbeat
    assert reason_of(b'{"ts_ms": 1, "source": {"ts_ms": 1}}') == "missing_op"
    assert reason_of(edit(TX_END, lambda d: d.pop("status"))) == "missing_op"


@pytest.mark.parametrize("op", ["x", "", "C", "create", "cu", 1, ["c"], {"c": 1}])
def test_unknown_op(op: object) -> None:
    assert reason_of(edit(CREATE, lambda d: d.update(op=op))) == "unknown_op"


def test_unknown_op_detail_is_bounded() -> None:
    with pytest.raises(EnvelopeError) as info:
        decode(edit(CREATE, lambda d: d.update(op="z" * 100_000)))
    assert len(info.value.detail) < 200


@pytest.mark.parametrize("fixture", [CREATE, UPDATE, DELETE, READ, TRUNCATE])
@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("source"),
        lambda d: d.update(source=None),
        lambda d: d.update(source="shop.public.orders"),
        lambda d: d.update(source=[1]),
        lambda d: d["source"].update(table=7),
        lambda d: d["source"].update(txId=1.5),
        lambda d: d["source"].update(lsn="0/16B3748"),
        lambda d: d["source"].update(snapshot=1),
    ],
)
def test_missing_source(fixture: bytes, change: Any) -> None:
    assert reason_of(edit(fixture, change)) == "missing_source"


@pytest.mark.parametrize(
    "change",
    [
        lambda d: [d["source"].pop(k) for k in ("ts_ms", "ts_us", "ts_ns")] and d.pop("ts_ms"),
        lambda d: d["source"].update(ts_ms=None, ts_us=None, ts_ns=None) or d.update(ts_ms=None),
        lambda d: d["source"].update(ts_ns="1741944413589793000"),
        lambda d: d["source"].update(ts_us=1.5),
        lambda d: d["source"].update(ts_ms=True),
        lambda d: d.update(ts_ms="now"),
        # Integers, but not a time datetime can represent: downstream conversion would raise.
        lambda d: d["source"].update(ts_ns=10**30),
        lambda d: d["source"].update(ts_ns=-1000),
        lambda d: [d["source"].pop(k) for k in ("ts_ns", "ts_us")] and d["source"].update(ts_ms=253_402_300_799_999),
    ],
)
def test_missing_timestamp(change: Any) -> None:
    assert reason_of(edit(CREATE, change)) == "missing_timestamp"


def test_timestamp_bounds() -> None:
    for ts_us in (0, 253_402_214_400_000_000):
        ev = decode(edit(CREATE, lambda d, ts=ts_us: d["source"].update(ts_ns=ts * 1000)))
        assert isinstance(ev, ChangeEvent)
        assert ev.commit_ts_us == ts_us
        datetime.fromtimestamp(ev.commit_ts_us / 1e6, tz=UTC)  # what the pipeline does with it
    assert reason_of(b'{"ts_ms": -1}') == "missing_timestamp"
    assert reason_of(b'{"ts_ms": 253402300800000}') == "missing_timestamp"


@pytest.mark.parametrize(
    ("fixture", "change"),
    [
        (CREATE, lambda d: d.update(after=None)),
        (CREATE, lambda d: d.pop("after")),
        (READ, lambda d: d.update(after=None)),
        (UPDATE, lambda d: d.update(after=None)),
        (UPDATE, lambda d: d.update(after=[1, 2])),
        (DELETE, lambda d: d.update(before=None)),
        (DELETE, lambda d: d.pop("before")),
        (DELETE, lambda d: d.update(before="1001")),
        # A row image that is present must be an object or null, whatever the op needs.
        (CREATE, lambda d: d.update(before=5)),
        (TRUNCATE, lambda d: d.update(after=True)),
    ],
)
def test_missing_row(fixture: bytes, change: Any) -> None:
    assert reason_of(edit(fixture, change)) == "missing_row"
    assert reason_of(wrap(edit(fixture, change))) == "missing_row"


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["message"].update(content="not base64!"),
        lambda d: d["message"].update(content="YWJ"),
        lambda d: d["message"].update(content=12),
        lambda d: d["message"].update(prefix=["writeguard"]),
        lambda d: d.update(message="hello"),
        lambda d: d.pop("message"),
        lambda d: d.update(message=None),
    ],
)
def test_invalid_message(change: Any) -> None:
    assert reason_of(edit(MESSAGE, change)) == "invalid_message"


def test_envelope_error_is_a_value_error_that_pickles() -> None:
    with pytest.raises(ValueError, match=r"^unknown_op: ") as info:
        decode(b'{"op": "q"}')
    err = info.value
    assert isinstance(err, EnvelopeError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.detail, str(back)) == (err.reason, err.detail, str(err))


# --- fuzz -----------------------------------------------------------------------------------------

FIXTURES = [CREATE, UPDATE, UPDATE_FULL, DELETE, READ, TRUNCATE, MESSAGE, HEARTBEAT, TX_BEGIN, TX_END]
# Bytes that matter to a JSON parser or a UTF-8 decoder.
_JSON_BITS = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"null", b"-", b"1e999", b"\xc3", b"\xff"]
_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64,
    -(2**70),
    1.5,
    "",
    "c",
    "u",
    "d",
    "m",
    "t",
    "r",
    "BEGIN",
    "END",
    "YWJj",
    "\ud83d\ude00",
    [],
    [None],
    {},
    {"ts_ms": 1},
    {"a": {"b": [1]}},
]


def check(value: bytes | None) -> None:
    """decode either returns a well-formed result or raises EnvelopeError with a known reason."""
    try:
        ev = decode(value)
    except EnvelopeError as err:
        assert err.reason in REASONS, err.reason
        assert isinstance(err.detail, str)
        return
    if isinstance(ev, ChangeEvent):
        assert ev.op in OPS
        assert type(ev.commit_ts_us) is int
        datetime.fromtimestamp(ev.commit_ts_us / 1e6, tz=UTC)
        assert ev.before is None or isinstance(ev.before, dict)
        assert ev.after is None or isinstance(ev.after, dict)
        if ev.op in ("c", "r", "u"):
            assert isinstance(ev.after, dict)
        if ev.op == "d":
            assert isinstance(ev.before, dict)
        assert ev.schema is None or isinstance(ev.schema, str)
        assert ev.table is None or isinstance(ev.table, str)
        assert ev.tx_id is None or isinstance(ev.tx_id, str)
        assert ev.lsn is None or type(ev.lsn) is int
        assert ev.message_prefix is None or isinstance(ev.message_prefix, str)
        assert ev.message_content is None or isinstance(ev.message_content, bytes)
        assert type(ev.snapshot) is bool
    elif isinstance(ev, TransactionMarker):
        assert ev.status in ("BEGIN", "END")
        assert isinstance(ev.id, str)
        assert ev.id
    elif isinstance(ev, Heartbeat):
        assert type(ev.ts_ms) is int
    else:
        assert isinstance(ev, Tombstone)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        pos = rng.randrange(len(buf) + 1)
        if kind == 0 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif kind == 1:
            buf[pos:pos] = rng.choice(_JSON_BITS)
        elif kind == 2:
            del buf[pos : pos + rng.randint(1, 8)]
        else:
            buf = buf[:pos]
    return bytes(buf)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate_structure(rng: random.Random, data: bytes) -> bytes:
    doc: Any = json.loads(data)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(doc))
        if not path:
            doc = copy.deepcopy(rng.choice(_VALUES)) if rng.random() < 0.1 else doc
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[key]
        else:
            parent[key] = copy.deepcopy(rng.choice(_VALUES))
    out = json.dumps(doc).encode()
    return wrap(out) if rng.random() < 0.3 else out


def test_fuzz_random_bytes() -> None:
    rng = random.Random(20250314)
    for _ in range(3000):
        check(rng.randbytes(rng.randrange(64)))
        check(b"{" + rng.randbytes(rng.randrange(32)) + b"}")


def test_fuzz_mutated_fixtures() -> None:
    rng = random.Random(1741944413)
    seeds = FIXTURES + [wrap(f) for f in FIXTURES[:7]]
    for _ in range(5000):
        check(_mutate_bytes(rng, rng.choice(seeds)))


def test_fuzz_type_confusion() -> None:
    rng = random.Random(571)
    seen: set[str] = set()
    for _ in range(5000):
        value = _mutate_structure(rng, rng.choice(FIXTURES))
        check(value)
        try:
            decode(value)
        except EnvelopeError as err:
            seen.add(err.reason)
    # The structured fuzz reaches nearly every validation branch, not just the parser.
    assert seen >= REASONS - {"invalid_json"}


def test_all_reasons_are_documented() -> None:
    doc = EnvelopeError.__doc__ or ""
    for reason in REASONS:
        assert f"``{reason}``" in doc
