"""The worker's YAML config: Kafka settings, topic names, and per-table detectors.

A bad file is refused at start with the path of every offending key (``tables.0.detectors.1.threshold``).
Secrets stay out of the file: any string may say ``${ENV_VAR}`` and is filled from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator

from connectors.debezium_connector import DebeziumSettings, connector_config
from connectors.pg_enforce import Mode, RoleMapping
from connectors.webhook import WebhookSettings
from detectors.engine import Engine, is_reserved
from detectors.masking import ClientProperties
from detectors.spec import DETECTOR_KINDS, Suppression, TableSpec
from detectors.strict import Strict

# The commented example config, shipped with the package; `make demo` runs it.
EXAMPLE_CONFIG = Path(__file__).parent / "examples" / "writeguard.yaml"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and each bad key's path."""


class KafkaSettings(Strict):
    bootstrap_servers: str = Field("127.0.0.1:9092", alias="bootstrap.servers")
    group_id: str = Field("writeguard", alias="group.id", description="Consumer group and Faust app id.")
    # A dict, because it goes to confluent-kafka as it is; secret-looking keys are masked in repr and JSON.
    client: ClientProperties = Field(
        default_factory=ClientProperties,
        description="Passed to every Kafka client: security.protocol, sasl.mechanism, sasl.username, "
        "sasl.password, ssl.ca.location, ... Use ${ENV_VAR} for secrets.",
    )


class TopicSettings(Strict):
    alerts: str = "writeguard.alerts"
    control: str = Field("writeguard.control", description="Compacted; keyed by agent id.")
    dead_letter: str = "writeguard.dlq"
    changes: str = Field("writeguard.changes", description="Internal: change summaries keyed by agent id.")
    models: str = Field(
        "writeguard.models",
        description="Compacted: the (table, agent) model sets' checkpoints, keyed by table and agent id, each in the "
        "partition of the changes topic that carries the agent's events. Filled by workers and `writeguard learn`. "
        "Default: next to the changes topic ('<prefix>.changes' gives '<prefix>.models').",
    )
    partitions: int = Field(6, ge=1, description="Partitions of the topics writeguard creates.")

    @model_validator(mode="before")
    @classmethod
    def _models_beside_changes(cls, data: Any) -> Any:
        # Model sets belong to the agents of one changes topic: two deployments (or test stacks) that name their
        # own changes topic must not restore each other's agents from a shared default models topic.
        if isinstance(data, dict) and "models" not in data and isinstance(changes := data.get("changes"), str):
            data = {**data, "models": f"{changes.removesuffix('.changes')}.models"}
        return data


class MetricsSettings(Strict):
    host: str = "0.0.0.0"  # noqa: S104 - a metrics endpoint is scraped from outside the pod
    port: int = Field(9464, ge=0, le=65535)


class AgentMessages(Strict):
    """Agents named by a logical decoding message in their transaction instead of a column in the row."""

    topic: str = Field(description="Debezium's topic of logical decoding messages: '<topic.prefix>.message'.")
    prefix: str = Field("writeguard", description="The prefix argument of pg_logical_emit_message.")
    hold_s: float = Field(5.0, gt=0, description="How long a row without an agent waits for its message.")
    identity: Literal["writer", "database"] = Field(
        "writer",
        description="'writer': the agent is what the row's agent column or the writer's own message says (forgeable). "
        "'database': only the messages of `writeguard identity-sql`'s triggers name agents (from the session's "
        "login role); the row's column is ignored, a different claimed id is alerted as identity_mismatch, and "
        "rows whose role is no agent's are scored as '<role:NAME>'.",
    )


class WorkerSettings(Strict):
    repartition: bool = Field(
        True,
        description="Re-key changes by agent id so one worker sees all of an agent's events. Turn off only "
        "when the CDC topics are already keyed by the agent id (Debezium message.key.columns).",
    )
    metrics: MetricsSettings = MetricsSettings()
    agent_messages: AgentMessages | None = None
    max_agents: int | None = Field(
        100_000,
        ge=1,
        description="(table, agent) model sets kept in memory; the least recently active beyond it are "
        "checkpointed to the data folder and restored when the agent writes again. null: no limit.",
    )
    commit_interval_s: float = Field(1.0, gt=0, description="Faust broker_commit_interval.")
    checkpoint_interval_s: float | None = Field(
        5.0,
        gt=0,
        description="How often the model sets that changed are checkpointed to topics.models, from which a worker "
        "restores its partitions' agents before it scores them. null: no checkpoints, models start cold.",
    )
    fetch_max_wait_ms: int = Field(
        20, ge=1, le=1500, description="Longest a consumer fetch waits for data; bounds detection lag when idle."
    )
    fetch_min_bytes: int = Field(
        65_536,
        ge=1,
        le=52_428_800,
        description="Kafka fetch.min.bytes of the CDC consumer: the broker answers a fetch once it has this much "
        "(or after fetch_max_wait_ms). Under load, fewer and larger fetches cost the broker far less; when idle, "
        "a change waits at most fetch_max_wait_ms.",
    )
    # A killed worker keeps its partitions until the group coordinator stops hearing from it: Faust's 60 s
    # default session made a minute with nobody scoring them (measured 59.6-59.9 s).
    session_timeout_s: float = Field(
        6.0,
        ge=1,
        le=90,
        description="Kafka session.timeout.ms, in seconds: how long the group coordinator waits without a "
        "heartbeat before it gives a silent worker's partitions to the others. The broker accepts values "
        "between its group.min.session.timeout.ms (6 s by default) and group.max.session.timeout.ms.",
    )
    heartbeat_interval_s: float = Field(
        1.5,
        gt=0,
        description="Kafka heartbeat.interval.ms, in seconds: how often a worker tells the coordinator it is alive, "
        "and so how soon it hears of a rebalance. Below session_timeout_s; Kafka advises at most a third of it.",
    )
    rebalance_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Kafka's rebalance timeout (rebalance.timeout.ms of the JoinGroup request), in seconds: how "
        "long the coordinator waits for live workers to rejoin in a rebalance. A dead worker is dropped after "
        "session_timeout_s, whatever this says.",
    )

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> WorkerSettings:
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError(
                f"worker.heartbeat_interval_s ({self.heartbeat_interval_s}) must be below worker.session_timeout_s "
                f"({self.session_timeout_s}), or the coordinator drops live workers"
            )
        return self


class PostgresEnforcementSettings(Strict):
    dsn: SecretStr = Field(description="libpq connection string of a role allowed to GRANT/REVOKE; use ${ENV_VAR}.")
    roles: RoleMapping
    mode: Mode = "revoke_writes"
    terminate_sessions: bool = True


class EnforcementSettings(Strict):
    postgres: PostgresEnforcementSettings | None = None
    webhook: WebhookSettings | None = None


class ControlSettings(Strict):
    """How control records are authenticated: HMAC-SHA256 over each record's key and value, in a Kafka header."""

    signing_key: SecretStr = Field(
        description="Key that signs every control record writeguard writes, and verifies what it reads; at least "
        "32 characters, from the environment: ${WRITEGUARD_CONTROL_KEY}.",
        min_length=32,
    )
    previous_keys: tuple[SecretStr, ...] = Field(
        (), description="Keys still accepted when verifying (never used to sign), while a key is being rotated."
    )

    def keys(self) -> tuple[bytes, ...]:
        """Every key a record may be signed with, the signing key first."""
        return tuple(k.get_secret_value().encode() for k in (self.signing_key, *self.previous_keys))


class GuardSettings(Strict):
    """`writeguard guard-sql` installs the approval key in PostgreSQL; `writeguard approve` signs approvals with it.

    Its own key, not control.signing_key: the worker holds that one, and a compromised worker must not be able to
    approve a mass delete. The worker's copy of the config may leave this section out.
    """

    approval_key: SecretStr = Field(
        min_length=32,
        description="HMAC-SHA256 key of approval tokens, at least 32 characters, from the environment: "
        "${WRITEGUARD_APPROVAL_KEY}. Only humans who approve (and guard-sql) need it.",
    )
    max_ttl_s: float = Field(
        3600.0, gt=0, le=7 * 86400, description="The longest --ttl `writeguard approve` issues, in seconds."
    )


class UndoCorrections(Strict):
    """Correction records of ``writeguard undo apply``: one per applied step, keyed by the row's key."""

    topic: str = Field("writeguard.corrections", description="Created if missing, with topics.partitions.")
    downstream_groups: tuple[str, ...] = Field(
        (),
        description="Consumer groups that read the corrections (a billing sync, a search index): `writeguard undo "
        "status` reports a plan's fix complete once each has committed past its last correction.",
    )


class UndoSettings(Strict):
    """Where ``writeguard undo apply`` writes: the database of the watched tables, its ledger, and the corrections."""

    dsn: SecretStr | None = Field(
        None,
        description="libpq connection string of a role allowed to write the watched tables and to create the "
        "ledger; use ${WRITEGUARD_UNDO_DSN}. `--dsn` overrides it.",
    )
    ledger: str = Field(
        "writeguard.undo_ledger",
        pattern=r"^[^.]+\.[^.]+$",
        description="'<schema>.<table>' of the ledger, created if missing: one row per plan step and outcome.",
    )
    batch_size: int = Field(500, ge=1, le=10_000, description="Steps per transaction.")
    lock_timeout_s: float = Field(
        30.0, gt=0, description="How long a batch waits for a row another transaction holds before it fails."
    )
    corrections: UndoCorrections | None = Field(
        None, description="Publish correction records after each committed batch; none: no corrections."
    )


class Config(Strict):
    """Top-level writeguard config."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    worker: WorkerSettings = WorkerSettings()
    debezium: DebeziumSettings | None = None
    enforcement: EnforcementSettings = EnforcementSettings()
    control: ControlSettings | None = Field(
        None,
        description="Signing of the control topic's records. Required when a table's actions use postgres or "
        "webhook; without it records are written unsigned and read unverified.",
    )
    undo: UndoSettings = Field(
        default_factory=UndoSettings, description="`writeguard undo apply` and `undo status`: database, ledger."
    )
    guard: GuardSettings | None = Field(
        None, description="The approval key of the PostgreSQL guard rails (`writeguard guard-sql`, `approve`)."
    )
    suppressions: tuple[Suppression, ...] = Field(
        (), description="Windows of planned work: anomalies are scored and counted but not alerted on."
    )
    tables: tuple[TableSpec, ...]

    @model_validator(mode="after")
    def _unique(self) -> Config:
        if not self.tables:
            raise ValueError("tables: at least one table is needed")
        pg = self.enforcement.postgres
        for agent in pg.roles.map if pg is not None else ():
            if is_reserved(agent):
                # '<...>' names writes without an agent ('<unattributed>', '<role:NAME>'): never a real agent.
                raise ValueError(f"enforcement.postgres.roles.map: agent id {agent!r} is reserved (angle brackets)")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        topics = [t.topic for t in self.tables]
        if len(set(topics)) != len(topics):
            raise ValueError("each table needs its own CDC topic")
        for i, t in enumerate(self.tables):
            used = {a for acts in t.actions.values() for a in acts}
            for action in ("postgres", "webhook"):
                if action in used and getattr(self.enforcement, action) is None:
                    raise ValueError(f"tables.{i}.actions uses '{action}' but enforcement.{action} is not configured")
            if self.debezium is not None and t.topic != f"{self.debezium.topic_prefix}.{t.name}":
                raise ValueError(
                    f"tables.{i}.topic: Debezium writes {t.name} to '{self.debezium.topic_prefix}.{t.name}', "
                    f"not '{t.topic}'"
                )
        return self

    @model_validator(mode="after")
    def _control_signed_when_enforcing(self) -> Config:
        # With enforcement a control record changes the database (release grants back what it names) and pauses
        # or resumes agents: then anyone able to produce to the topic must not be able to write one.
        if self.control is not None:
            return self
        for i, t in enumerate(self.tables):
            used = {a for acts in t.actions.values() for a in acts}
            for action in ("postgres", "webhook"):
                if action in used:
                    raise ValueError(
                        f"control.signing_key: required because tables.{i}.actions uses '{action}' (set control: "
                        "{signing_key: ${WRITEGUARD_CONTROL_KEY}}, a random key of at least 32 characters)"
                    )
        return self

    def table_by_topic(self) -> dict[str, TableSpec]:
        return {t.topic: t for t in self.tables}

    def with_bootstrap(self, servers: str | None) -> Config:
        if not servers:
            return self
        return self.model_copy(update={"kafka": self.kafka.model_copy(update={"bootstrap_servers": servers})})

    def connector_config(self) -> dict[str, Any]:
        """The Kafka Connect request body (name + config) of the Debezium connector in ``debezium:``."""
        if self.debezium is None:
            raise ConfigError("the config has no 'debezium:' section (topic.prefix, database, ...)")
        try:
            return connector_config(self.debezium, self.tables)
        except ValueError as e:
            raise ConfigError(str(e)) from None


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, path: str, missing: list[str]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            got = os.environ.get(m.group(1))
            if got is None:
                missing.append(f"{path}: environment variable {m.group(1)} is not set")
                return ""
            return got

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{path}.{i}", missing) for i, v in enumerate(value)]
    return value


def parse_config(data: Any, source: str = "<config>") -> Config:
    missing: list[str] = []
    data = _expand(data, "", missing)
    if missing:
        raise ConfigError(f"{source}: " + "; ".join(missing))
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            # pydantic puts the union's tag (detector kind) in the path; the YAML has no such key.
            loc = [
                p
                for i, p in enumerate(err["loc"])
                if not (p in DETECTOR_KINDS and i and isinstance(err["loc"][i - 1], int))
            ]
            where = ".".join(str(p) for p in loc) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping with at least 'tables:'")
    return parse_config(data, str(p))


def config_json_schema() -> dict[str, Any]:
    return Config.model_json_schema(by_alias=True)


def client_settings(cfg: Config) -> dict[str, str | int | float | bool]:
    """confluent-kafka settings for our own producers and consumers (control topic, CLI, DLQ)."""
    return {"bootstrap.servers": cfg.kafka.bootstrap_servers, **cfg.kafka.client}


def make_engine(cfg: Config, store: MutableMapping[str, bytes] | None = None) -> Engine:
    """The detection engine for ``cfg``: its tables, suppression windows and memory bound."""
    return Engine(list(cfg.tables), suppressions=cfg.suppressions, max_states=cfg.worker.max_agents, store=store)
