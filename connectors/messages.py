"""Every message writeguard publishes on Kafka, as pydantic models with a JSON Schema in ``schemas/``.

Consumers of the alert, control and dead-letter topics can validate against those files; a test keeps
them equal to what these models generate (``writeguard schemas --write schemas`` refreshes them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class FeatureExplanation(BaseModel):
    feature: str
    value: float = Field(description="Observed value, in the column's own units.")
    expected_low: float | None = Field(None, description="Low end of what the model expected.")
    expected_high: float | None = Field(None, description="High end of what the model expected.")
    z: float | None = Field(None, description="Standard deviations from the agent's mean, where defined.")


class TriggeringEvent(BaseModel):
    topic: str | None = Field(None, description="Kafka topic of the change event (None in replay).")
    partition: int | None = None
    offset: int | None = None
    source: str | None = Field(None, description="'path:line' when the event came from a replayed file.")
    commit_ts: datetime
    score: float


class Alert(_Message):
    """One anomaly decision. Keyed by agent id on the alert topic."""

    alert_id: str = Field(
        description="uuid5 of table, agent, detector and the triggering event's coordinates: reprocessing repeats it."
    )
    agent_id: str
    run_id: str | None
    table: str = Field(description="'<schema>.<table>'")
    detector: str
    detector_kind: str
    scope: Literal["agent", "population"] = Field(
        description="'population': the agent was still warming up and was judged against its table's fleet."
    )
    severity: Literal["info", "warning", "critical"]
    score: float
    threshold: float
    summary: str = Field(description="One line for a human: the top feature against its expected range.")
    explanation: list[FeatureExplanation]
    commit_ts: datetime = Field(description="Commit time of the triggering event (Debezium source.ts_*).")
    detected_at: datetime
    lag_ms: float = Field(description="detected_at - commit_ts, in milliseconds.")
    triggering_events: list[TriggeringEvent] = Field(description="The anomalous events of this incident.")
    anomalous_events: int = Field(description="How many of the agent's writes were anomalous before this alert.")
    agent_events: int = Field(description="Events seen from this agent on this table, this one included.")
    actions: list[Literal["alert", "quarantine", "postgres", "webhook"]]
    quarantined: bool = Field(description="True when this alert quarantined the agent.")


class EnforcementResult(BaseModel):
    """What one enforcement action did, so that a release can undo exactly that."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["postgres", "webhook"]
    ok: bool
    detail: str = ""
    revocation: dict[str, Any] | None = Field(
        None, description="postgres: the role and the privileges taken away (what release grants back)."
    )


class ControlRecord(_Message):
    """The agent's state, keyed by agent id on the compacted control topic: the latest record wins."""

    agent_id: str
    state: Literal["quarantined", "released"]
    reason: str
    alert_id: str | None = None
    table: str | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    by: str = Field(description="Who wrote it: 'writeguard-worker' or the releasing user.")
    false_positive: bool = Field(
        False, description="On a release: the alert was wrong, and the agent's models learn its writes as normal."
    )
    enforcement: list[EnforcementResult] = Field(
        default_factory=list, description="Database and webhook actions taken (quarantine) or undone (release)."
    )

    @classmethod
    def quarantine(cls, alert: Alert, enforcement: list[EnforcementResult] | None = None) -> ControlRecord:
        """The worker's record that ``alert`` quarantined its agent, with what enforcement did so far."""
        return cls(
            agent_id=alert.agent_id,
            state="quarantined",
            reason=alert.summary,
            alert_id=alert.alert_id,
            table=alert.table,
            by="writeguard-worker",
            enforcement=list(enforcement or ()),
        )


class DeadLetter(_Message):
    """An input record that could not be decoded, with everything needed to replay it."""

    reason: str = Field(description="Stable code, also the Prometheus label: invalid_json, missing_op, ...")
    detail: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    key_b64: str | None = None
    value_b64: str | None = Field(None, description="The original value bytes, base64.")
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


PUBLISHED: dict[str, type[BaseModel]] = {
    "alert": Alert,
    "control-record": ControlRecord,
    "dead-letter": DeadLetter,
}
