"""The Debezium PostgreSQL connector that feeds writeguard, rendered for Kafka Connect's REST API.

``writeguard connector-config`` prints it from the config's ``debezium:`` section (:class:`DebeziumSettings`)
and its tables; the local stack of the testbed PUTs the same body to its Kafka Connect. The settings chosen
here are the ones :mod:`connectors.debezium` decodes: payload-only JSON, NUMERIC as numbers, truncates kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from pydantic import Field, SecretStr

from detectors.masking import ClientProperties
from detectors.spec import FieldPath, TableSpec
from detectors.strict import Strict

__all__ = [
    "JSON_CONVERTER",
    "POSTGRES_CONNECTOR_CLASS",
    "DebeziumDatabase",
    "DebeziumSettings",
    "connector_config",
    "debezium_postgres_config",
]

JSON_CONVERTER: Final = "org.apache.kafka.connect.json.JsonConverter"
POSTGRES_CONNECTOR_CLASS: Final = "io.debezium.connector.postgresql.PostgresConnector"


class DebeziumDatabase(Strict):
    hostname: str
    port: int = Field(5432, ge=1, le=65535)
    user: str
    # Rendered as it is: the real value, or a Connect config-provider reference such as ${env:PG_PASSWORD}
    # (which Connect resolves itself, so the password never leaves its host). Never shown in repr or JSON.
    password: SecretStr = Field(
        SecretStr(""), description="Use ${ENV_VAR}, or a Kafka Connect config provider: ${env:PG_PASSWORD}."
    )
    dbname: str


class DebeziumSettings(Strict):
    """What ``writeguard connector-config`` needs to render the Debezium PostgreSQL connector."""

    name: str = Field("writeguard-postgres", description="Kafka Connect connector name.")
    topic_prefix: str = Field(alias="topic.prefix")
    database: DebeziumDatabase
    slot_name: str = Field("writeguard", alias="slot.name")
    publication_name: str = Field("writeguard", alias="publication.name")
    snapshot_mode: str = Field("no_data", alias="snapshot.mode")
    key_by_agent: bool = Field(
        False, description="Key CDC records by the agent-id column (message.key.columns); then repartition can be off."
    )
    extra: ClientProperties = Field(
        default_factory=ClientProperties, description="More connector properties, set last."
    )


def connector_config(settings: DebeziumSettings, tables: Sequence[TableSpec]) -> dict[str, Any]:
    """The Kafka Connect request body (name + config) of the connector that captures ``tables``.

    Raises ValueError, naming the table's ``agent_id`` path, when ``key_by_agent`` meets an agent id that is
    not a plain column: Debezium can key records only by columns.

    >>> db = DebeziumDatabase(hostname="db", user="cdc", dbname="shop")
    >>> d = DebeziumSettings(topic_prefix="shop", database=db)
    >>> body = connector_config(d, [TableSpec(name="public.refunds", topic="shop.public.refunds")])
    >>> body["name"], body["config"]["table.include.list"], body["config"]["topic.prefix"]
    ('writeguard-postgres', 'public.refunds', 'shop')
    """
    key_columns: dict[str, str] | None = None
    if settings.key_by_agent:
        key_columns = {}
        for i, t in enumerate(tables):
            path = FieldPath.parse(t.agent_id)
            if len(path.keys) != 1:
                raise ValueError(f"tables.{i}.agent_id: key_by_agent needs a plain column, not {t.agent_id!r}")
            key_columns[t.name] = path.keys[0]
    db = settings.database
    conf = debezium_postgres_config(
        hostname=db.hostname,
        port=db.port,
        user=db.user,
        password=db.password.get_secret_value(),
        dbname=db.dbname,
        topic_prefix=settings.topic_prefix,
        tables=[t.name for t in tables],
        slot_name=settings.slot_name,
        publication_name=settings.publication_name,
        snapshot_mode=settings.snapshot_mode,
        key_columns=key_columns,
        extra=settings.extra,
    )
    return {"name": settings.name, "config": conf}


def debezium_postgres_config(
    *,
    hostname: str,
    port: int | str,
    user: str,
    password: str,
    dbname: str,
    topic_prefix: str,
    tables: Sequence[str],
    slot_name: str = "writeguard",
    publication_name: str = "writeguard",
    snapshot_mode: str = "no_data",
    key_columns: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A Debezium PostgreSQL connector config in the shape writeguard decodes, tuned for latency.

    ``tables`` are ``schema.table`` names (Debezium treats each as an anchored regular expression).
    ``key_columns`` maps a table to the column(s) (comma-separated) that make the Kafka record key,
    e.g. ``{"public.refunds": "agent_id"}``, so one agent's changes land in one partition in order.
    ``extra`` is merged last and wins, e.g. ``{"provide.transaction.metadata": "true"}``.

    Needs a PostgreSQL with ``wal_level=logical`` (10+; logical decoding messages need 14+) and a
    user allowed to replicate and, for ``publication.autocreate.mode=filtered``, to create the
    publication (owner of the tables, or superuser).  For full ``before`` images on update and
    delete, the tables need ``REPLICA IDENTITY FULL`` (the connector does not change it unless told
    to with ``replica.identity.autoset.values``); by default ``before`` is null on update and holds
    only the primary key on delete.
    """
    if not tables:
        raise ValueError("tables must name at least one schema.table")
    config = {
        "connector.class": POSTGRES_CONNECTOR_CLASS,
        # The connector reads one replication slot, so it only ever runs one task.
        "tasks.max": "1",
        # pgoutput ships with PostgreSQL 10+; the default, decoderbufs, is a server extension
        # that Debian's and most managed PostgreSQLs do not have.
        "plugin.name": "pgoutput",
        "database.hostname": hostname,
        "database.port": str(port),
        "database.user": user,
        "database.password": password,
        "database.dbname": dbname,
        # Topics are <prefix>.<schema>.<table>; logical decoding messages go to <prefix>.message.
        "topic.prefix": topic_prefix,
        "table.include.list": ",".join(tables),
        "slot.name": slot_name,
        "publication.name": publication_name,
        # A publication for exactly the captured tables (created if missing, its table list
        # updated to match on start): the WAL sender then decodes and ships only their
        # changes, so a busy, uncaptured table does not delay (or flood) the captured ones.
        "publication.autocreate.mode": "filtered",
        # no_data: no initial copy of the tables, stream from the slot's creation on, so a
        # new connector is RUNNING and streaming within seconds whatever the table size.
        "snapshot.mode": snapshot_mode,
        # The default skips truncate ("t"); TRUNCATE by an agent is exactly what to catch.
        "skipped.operations": "none",
        # NUMERIC as a JSON number instead of base64 of the unscaled BigDecimal bytes (the
        # default, "precise"), which writeguard's features could not use.
        "decimal.handling.mode": "double",
        # Payload-only JSON: no per-record "schema" section (4x smaller, 4x faster to decode).
        "key.converter": JSON_CONVERTER,
        "key.converter.schemas.enable": "false",
        "value.converter": JSON_CONVERTER,
        "value.converter.schemas.enable": "false",
        # A delete is followed by a null-valued record with the same key, for compaction.
        "tombstones.on.delete": "true",
        # Latency: when the replication stream has nothing pending, the streaming loop sleeps
        # poll.interval.ms before it reads again (default 500 ms), and the hand-off to Connect
        # waits as long unless a batch fills up: two waits in a row per commit. Measured with
        # benchmarks/bench_postgres.py at 100 commits/s: commit -> alert p50 80 ms at 50, 32 ms
        # at 10, for about 12% more of a core in the Connect worker.
        "poll.interval.ms": "10",
    }
    if key_columns:
        # Debezium's format: "<schema.table>:<col>[,<col>...];<schema.table>:<col>..."
        config["message.key.columns"] = ";".join(f"{table}:{cols}" for table, cols in key_columns.items())
    if extra:
        config.update({str(k): str(v) for k, v in extra.items()})
    return config
