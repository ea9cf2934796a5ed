"""Every message writeguard publishes on Kafka, as pydantic models with a JSON Schema in ``schemas/``.

Consumers of the alert, control and dead-letter topics can validate against those files; a test keeps
them equal to what these models generate (``writeguard schemas --write schemas`` refreshes them).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from undo.models import Plan, Scope


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
    text: str | None = Field(None, description="The finding in words, in the column's own units (the summary's).")


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
    scope: Literal["agent", "population", "table"] = Field(
        description="'population': the agent was still warming up and was judged against its table's fleet. "
        "'table': a table-wide ceiling counted over all agents (the explanation lists the top ones)."
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
    learning: bool = Field(
        False,
        description="The model that judged is still in its learning period (too few writes or too little time "
        "since its first): severity at most warning, and it never quarantines. Deterministic guards never learn.",
    )
    undo_command: str | None = Field(
        None,
        description="On a quarantine: the `writeguard undo plan` command that computes the compensation of what the "
        "agent wrote since its incident began (CONFIG stands for the worker's config file).",
    )


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

    def stale_for(self, quarantined_by: str | None) -> bool:
        """Whether this is a ``released`` record of another quarantine than the agent's current one.

        ``quarantined_by`` is the alert id of the agent's quarantine in force (None when it has none). A release
        names the alert it lifts, so an old signed release replayed later cannot lift a newer quarantine.
        """
        return self.state == "released" and quarantined_by is not None and self.alert_id != quarantined_by

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


CONTROL_SIGNATURE_HEADER = "writeguard-signature"
"""Kafka header of every control record: ``v1=`` and the hex HMAC-SHA256 of :func:`control_signed_bytes`."""

RejectReason = Literal["unsigned", "bad_signature", "invalid_record", "key_mismatch", "stale_release"]
"""Why a control record was not applied; the ``reason`` label of ``writeguard_control_records_rejected_total``."""


class ControlRejected(ValueError):
    """A control record that must not be applied: unsigned, badly signed, malformed, or under another key."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason


def control_signed_bytes(key: bytes, value: bytes) -> bytes:
    """What a control record's signature covers: its Kafka key and its exact value bytes.

    The key is covered because the topic is compacted by key: a signed record replayed under another agent's
    key would otherwise replace that agent's latest state. Its length comes first, so no split of key and
    value can be read another way.

    >>> control_signed_bytes(b"a1", b"{}")
    b'writeguard-control-v1\\n2\\na1{}'
    """
    return b"writeguard-control-v1\n%d\n" % len(key) + key + value


def sign_control(secret: bytes, key: bytes, value: bytes) -> bytes:
    """The value of the :data:`CONTROL_SIGNATURE_HEADER` header for this key and value."""
    return b"v1=" + hmac.new(secret, control_signed_bytes(key, value), hashlib.sha256).hexdigest().encode()


HeaderValue = str | bytes | None
Headers = Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]] | None
"""Kafka headers as confluent-kafka gives them (a list of pairs) or as a mapping."""


def _header(headers: Headers, name: str) -> bytes | None:
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    found = [v for k, v in pairs if isinstance(k, str) and k.lower() == name]
    # Two signature headers: which one a reader would check is ambiguous, so neither is trusted.
    if len(found) != 1 or found[0] is None:
        return None
    v = found[0]
    return v.encode("utf-8", "replace") if isinstance(v, str) else v


def verify_control(
    secrets: Sequence[bytes],
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
) -> ControlRecord:
    """The control record in a Kafka message, if one of ``secrets`` signed it; :class:`ControlRejected` if not.

    Agent orchestrators that act on the control topic check every record with this before they act on it
    (``msg.key()``, ``msg.value()``, ``msg.headers()`` of a confluent-kafka message). The record's agent id
    must also be its Kafka key. Never raises anything else, whatever the bytes.
    """
    if value is None:
        raise ControlRejected("invalid_record", "no value (a tombstone)")
    sig = _header(headers, CONTROL_SIGNATURE_HEADER)
    if sig is None:
        raise ControlRejected("unsigned", f"no single {CONTROL_SIGNATURE_HEADER} header")
    k = key or b""
    if not isinstance(sig, bytes) or not any(hmac.compare_digest(sign_control(s, k, value), sig) for s in secrets):
        raise ControlRejected("bad_signature", "the signature does not match any configured key")
    try:
        rec = ControlRecord.model_validate_json(value)
    except ValidationError as e:
        raise ControlRejected("invalid_record", str(e).splitlines()[0]) from None
    if rec.agent_id.encode() != k:
        raise ControlRejected("key_mismatch", "the record's agent_id is not its Kafka key")
    return rec


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

    @classmethod
    def of(
        cls,
        reason: str,
        detail: str,
        coords: tuple[str, int, int],
        timestamp_ms: int | None,
        key: bytes | None,
        value: bytes | None,
    ) -> DeadLetter:
        """The dead letter of the record at ``coords`` (topic, partition, offset), its bytes kept in base64.

        >>> d = DeadLetter.of("invalid_json", "not JSON", ("shop.public.refunds", 2, 7), 5, b"k", b"{x")
        >>> (d.topic, d.partition, d.offset, d.key_b64, d.value_b64)
        ('shop.public.refunds', 2, 7, 'aw==', 'e3g=')
        """
        import base64

        topic, partition, offset = coords
        return cls(
            reason=reason,
            detail=detail,
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
            key_b64=base64.b64encode(key).decode() if isinstance(key, bytes) else None,
            value_b64=base64.b64encode(value).decode() if isinstance(value, bytes) else None,
        )


PUBLISHED: dict[str, type[BaseModel]] = {
    "alert": Alert,
    "control-record": ControlRecord,
    "dead-letter": DeadLetter,
    # Files rather than topics (`writeguard scope --json`, `writeguard undo plan -o`), published all the same.
    "undo-scope": Scope,
    "undo-plan": Plan,
}


UNDO_AGENT = "writeguard-undo"
"""The agent that the logical decoding message of every ``writeguard undo apply`` transaction names."""


def undo_signed_bytes(plan_id: str, tx_id: int | str) -> bytes:
    """What an undo message's signature covers: the plan id and the transaction's 32-bit xid.

    The xid is Debezium's ``source.txId``: PostgreSQL's 32-bit transaction id (``pg_current_xact_id()::xid``).
    ``txid_current()`` and ``pg_current_xact_id()`` add the xid epoch in the high 32 bits, which is dropped: on a
    cluster with epoch 7, Debezium 3.6.1 reported txId 728 for the transaction whose txid_current() was
    30064771800 (7 * 2**32 + 728). Binding it makes a copied message worthless in any other transaction.

    >>> undo_signed_bytes("p1", 728) == undo_signed_bytes("p1", 7 * 2**32 + 728)
    True
    """
    return b"writeguard-undo-v1\n%d\n" % (int(tx_id) % 2**32) + plan_id.encode()


def undo_signature(key: bytes, plan_id: str, tx_id: int | str) -> str:
    """The ``signature`` of the undo message of plan ``plan_id`` in transaction ``tx_id``: ``v1=`` and hex HMAC."""
    return "v1=" + hmac.new(key, undo_signed_bytes(plan_id, tx_id), hashlib.sha256).hexdigest()


def verify_undo_message(keys: Sequence[bytes], body: Mapping[str, Any] | bytes | str, tx_id: int | str) -> str | None:
    """The plan id, when ``body`` is an undo message that one of ``keys`` signed for transaction ``tx_id``; else None.

    ``body`` is the message's content (JSON bytes or text, or already parsed), ``tx_id`` the transaction id of the
    change events it came with (Debezium's ``source.txId``). Never raises, whatever the input.

    >>> k = b"k" * 32
    >>> body = {"agent_id": UNDO_AGENT, "run_id": "p1", "undo": {"plan_id": "p1", "batch": 1,
    ...         "signature": undo_signature(k, "p1", 728)}}
    >>> verify_undo_message([k], body, 728), verify_undo_message([k], body, 729), verify_undo_message([b"x"], body, 728)
    ('p1', None, None)
    """
    import json  # here, not at the top: this block of functions is all this module adds for the undo

    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if not isinstance(body, Mapping) or body.get("agent_id") != UNDO_AGENT:
        return None
    undo = body.get("undo")
    if not isinstance(undo, Mapping):
        return None
    plan_id, sig = undo.get("plan_id"), undo.get("signature")
    if not isinstance(plan_id, str) or not plan_id or not isinstance(sig, str) or body.get("run_id") != plan_id:
        return None
    try:
        signed = undo_signed_bytes(plan_id, tx_id)
    except (TypeError, ValueError):
        return None
    for key in keys:
        expected = "v1=" + hmac.new(key, signed, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            return plan_id
    return None
