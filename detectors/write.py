"""What every detector is given: one write, as a :class:`Write`; and Debezium's op codes.

The lowest layer of writeguard: the Debezium decoding, the config specs, the detectors and the engine all
name ops through :data:`Op`, so an op code is defined here and nowhere else.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

import msgspec

# Ops that change rows: create, update, delete, snapshot read, truncate. The ones a config may name.
RowOp = Literal["c", "u", "d", "r", "t"]
# Every op code Debezium emits: ``m`` is a logical decoding message (pg_logical_emit_message), not a row.
Op = Literal[RowOp, "m"]
OPS: Final[frozenset[str]] = frozenset(get_args(Op))


class Write(msgspec.Struct, frozen=True, gc=False):
    """One change event as a detector sees it: ``learn_one(w)``, ``score_one(w)``, ``explain(w)``.

    A value model reads ``x``; a guard reads ``op`` and ``t``; each detector reads what its idea needs.

    >>> w = Write({"amount": 25.0}, "u", 1_700_000_000.5, {"reason": "late"})
    >>> w.x["amount"], w.op, w.idempotency_key
    (25.0, 'u', None)
    >>> Write(op="t", t=3.0).x
    {}
    """

    x: dict[str, float] = {}  # numeric features of the row, by feature name (River's x)
    op: Op = "c"
    t: float = 0.0  # commit time, in seconds since the epoch
    categories: dict[str, str] | None = None  # the table's categorical columns, as text, when it has any
    idempotency_key: str | None = None  # the table's idempotency key column, when it has one
    tx_id: str | None = None  # the source transaction, for tables whose detectors judge whole transactions
    agent_id: str | None = None  # who wrote it: read only by table-wide ceilings, to name the top writers
