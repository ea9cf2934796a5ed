"""Time connectors.debezium.decode on realistic Debezium PostgreSQL values.

Usage: ``python3 benchmarks/bench_decode.py``. Prints µs per event (best of 5 timeit runs) for a
~1 KB payload-only UPDATE and a ~4 KB schema+payload UPDATE, with plain parses of the same bytes
for scale. Numbers only, no assertions: timings belong to the machine they ran on.
"""

from __future__ import annotations

import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

REPEAT = 5

_ROW: dict[str, Any] = {
    "id": 918_273,
    "customer_id": 42_017,
    "status": "paid",
    "total_cents": 129_900,
    "tax_cents": 20_740,
    "discount_cents": 0,
    "currency": "EUR",
    "payment_method": "card",
    "shipping_country": "DE",
    "shipping_postcode": "10115",
    "items": 3,
    "priority": False,
    "note": "Customer asked for delivery after 17:00; leave with neighbour if absent.",
    "coupon_code": None,
    "updated_by": "agent:planner-7",
    "run_id": "run-2025-03-14T09:26:53Z-19",
    "created_at": "2025-03-14T09:20:01.123456Z",
    "updated_at": "2025-03-14T09:26:53.589793Z",
}
_INT_COLS = {"id", "customer_id", "total_cents", "tax_cents", "discount_cents", "items"}


def _source(txid: int, lsn: int) -> dict[str, Any]:
    return {
        "version": "3.0.7.Final",
        "connector": "postgresql",
        "name": "shop",
        "ts_ms": 1741944413589,
        "ts_us": 1741944413589793,
        "ts_ns": 1741944413589793000,
        "snapshot": "false",
        "db": "shopdb",
        "sequence": f'["{lsn - 232}","{lsn}"]',
        "schema": "public",
        "table": "orders",
        "txId": txid,
        "lsn": lsn,
        "xmin": None,
    }


def _payload(row: dict[str, Any]) -> dict[str, Any]:
    # An UPDATE under PostgreSQL's default REPLICA IDENTITY: no before image, the common case.
    return {
        "before": None,
        "after": row,
        "source": _source(571, 24023128),
        "transaction": {"id": "571:24023128", "total_order": 1, "data_collection_order": 1},
        "op": "u",
        "ts_ms": 1741944413740,
        "ts_us": 1741944413740120,
        "ts_ns": 1741944413740120000,
    }


def _field_schema(name: str) -> dict[str, Any]:
    if name in _INT_COLS:
        return {"type": "int64", "optional": name != "id", "field": name}
    if name == "priority":
        return {"type": "boolean", "optional": True, "field": name}
    if name.endswith("_at"):
        return {
            "type": "string",
            "optional": True,
            "name": "io.debezium.time.ZonedTimestamp",
            "version": 1,
            "field": name,
        }
    return {"type": "string", "optional": True, "field": name}


def _schema(row: dict[str, Any]) -> dict[str, Any]:
    fields = [_field_schema(c) for c in row]
    src = [
        {"type": t, "optional": opt, "field": f}
        for f, t, opt in [
            ("version", "string", False),
            ("connector", "string", False),
            ("name", "string", False),
            ("ts_ms", "int64", False),
            ("snapshot", "string", True),
            ("db", "string", False),
            ("sequence", "string", True),
            ("ts_us", "int64", True),
            ("ts_ns", "int64", True),
            ("schema", "string", False),
            ("table", "string", False),
            ("txId", "int64", True),
            ("lsn", "int64", True),
            ("xmin", "int64", True),
        ]
    ]
    return {
        "type": "struct",
        "fields": [
            {
                "type": "struct",
                "fields": fields,
                "optional": True,
                "name": "shop.public.orders.Value",
                "field": "before",
            },
            {
                "type": "struct",
                "fields": fields,
                "optional": True,
                "name": "shop.public.orders.Value",
                "field": "after",
            },
            {
                "type": "struct",
                "fields": src,
                "optional": False,
                "name": "io.debezium.connector.postgresql.Source",
                "version": 1,
                "field": "source",
            },
            {
                "type": "struct",
                "optional": True,
                "name": "event.block",
                "version": 1,
                "field": "transaction",
                "fields": [
                    {"type": "string", "optional": False, "field": "id"},
                    {"type": "int64", "optional": False, "field": "total_order"},
                    {"type": "int64", "optional": False, "field": "data_collection_order"},
                ],
            },
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
            {"type": "int64", "optional": True, "field": "ts_us"},
            {"type": "int64", "optional": True, "field": "ts_ns"},
        ],
        "optional": False,
        "name": "shop.public.orders.Envelope",
        "version": 2,
    }


def _bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()  # JsonConverter writes compact JSON


def _best_us(fn: Callable[[bytes], object], value: bytes) -> float:
    timer = timeit.Timer(lambda: fn(value))
    number, _ = timer.autorange()
    number = max(number, 10_000)
    return min(timer.repeat(repeat=REPEAT, number=number)) / number * 1e6


def main() -> None:
    import msgspec
    import orjson

    from connectors.debezium import ChangeEvent, decode

    payload_only = _bytes(_payload(_ROW))
    # The schema section grows twice as fast as the row (before and after are both described),
    # so a narrower table lands near 4 KB.
    narrow = {k: _ROW[k] for k in list(_ROW)[:15]}
    with_schema = _bytes({"schema": _schema(narrow), "payload": _payload(narrow)})
    cases = [("payload-only", payload_only), ("schema+payload", with_schema)]

    for _, value in cases:
        ev = decode(value)
        assert isinstance(ev, ChangeEvent) and ev.op == "u"

    print(f"python {sys.version.split()[0]}, msgspec {msgspec.__version__}, best of {REPEAT}, µs/event")
    print(f"{'event':<16}{'bytes':>7}{'decode()':>11}{'orjson.loads':>14}{'msgspec untyped':>17}")
    for name, value in cases:
        print(
            f"{name:<16}{len(value):>7}{_best_us(decode, value):>11.2f}"
            f"{_best_us(orjson.loads, value):>14.2f}{_best_us(msgspec.json.decode, value):>17.2f}"
        )


if __name__ == "__main__":
    main()
