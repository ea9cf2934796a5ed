"""The planner's input: one row change, already decoded and attributed, with no Kafka or Debezium JSON left in it.

:func:`key_of` finds a row's primary key, from the Debezium message key or from the table's configured
``key_columns``; the adapter that turns a decoded Debezium event into a :class:`RowEvent` lives in
``connectors/undo_source.py`` (this package sits below connectors and may not import them).

>>> key_of({"schema": {}, "payload": {"id": 7}}, None, "c", None, {"id": 7, "amount": 5})
{'id': 7}
>>> key_of(None, ("region", "id"), "d", {"region": "eu", "id": 7, "amount": 5}, None)
{'region': 'eu', 'id': 7}
>>> key_of(None, None, "c", None, {"id": 7}) is None
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec
import orjson

RowOp = Literal["c", "u", "d"]

# What Debezium writes for a column whose value it does not have: an unchanged TOASTed value that PostgreSQL's
# logical decoding leaves out (``unavailable.value.placeholder``). As a string column's value, and base64 for bytes.
TOAST_PLACEHOLDER: Final = "__debezium_unavailable_value"
TOAST_PLACEHOLDER_B64: Final = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="


def is_placeholder(value: object) -> bool:
    """A value Debezium did not have (unchanged TOAST): never restore it, never compare with it.

    >>> is_placeholder("__debezium_unavailable_value"), is_placeholder("x"), is_placeholder(None)
    (True, False, False)
    """
    return isinstance(value, str) and value in (TOAST_PLACEHOLDER, TOAST_PLACEHOLDER_B64)


class RowEvent(msgspec.Struct, frozen=True, gc=False):
    """One committed row change (insert, update or delete) by a known writer.

    ``agent_id`` is None for a writer that named no agent (a human, a batch job); ``position`` says where the event
    was read (``file:line`` or ``topic/partition/offset``), for people. ``meta`` holds what the writer's logical
    decoding message said besides agent and run (an agent version, a model name), for the scope's runs.

    A msgspec Struct rather than a dataclass: a scan makes one per change event, and a Struct is made in a tenth
    of the time (gc=False: it only holds decoded JSON, which forms no cycles).
    """

    table: str
    key: Mapping[str, Any]
    op: RowOp
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    commit_ts_us: int
    tx_id: str | None = None
    agent_id: str | None = None
    run_id: str | None = None
    position: str = ""
    lsn: int | None = None
    meta: Mapping[str, str] = msgspec.field(default_factory=dict)

    def row_id(self) -> tuple[str, str]:
        """(table, canonical key JSON): the same row whatever the key dict's order."""
        return self.table, canonical_key(self.key)


def canonical_key(key: Mapping[str, Any]) -> str:
    """The key as compact JSON with sorted names: one text per row.

    >>> canonical_key({"b": 1, "a": "x"})
    '{"a":"x","b":1}'
    """
    return orjson.dumps(key if type(key) is dict else dict(key), option=orjson.OPT_SORT_KEYS).decode()


def key_of(
    message_key: object,
    key_columns: tuple[str, ...] | None,
    op: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """The row's primary key: the configured ``key_columns`` if any, else the message key, else None.

    Configured columns win: they are what the user said identifies the row (Debezium's key may be replaced by
    ``message.key.columns``, e.g. the agent id for partitioning). A message key is a JSON object, with or without
    ``JsonConverter``'s ``schema``/``payload`` envelope. A delete reads its before image, other ops their after.
    """
    if key_columns:
        row = before if op == "d" else after
        if row is None:
            return None
        try:
            return {c: row[c] for c in key_columns}
        except KeyError:
            return None
    if type(message_key) is dict or isinstance(message_key, Mapping):
        # JsonConverter's envelope is exactly these two names; a table's own key column may be called "payload".
        enveloped = len(message_key) == 2 and "schema" in message_key and "payload" in message_key
        payload = message_key["payload"] if enveloped else message_key
        if (type(payload) is dict or isinstance(payload, Mapping)) and payload:
            return dict(payload)
    return None
