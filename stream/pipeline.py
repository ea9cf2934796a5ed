"""From a Kafka record's value bytes to a :class:`~detectors.engine.Change`, and from a finding to an alert.

Shared by the Faust worker, the bare-consumer benchmark and ``writeguard replay`` so that all three
run the very same detection code.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from connectors.debezium import ChangeEvent, EnvelopeError, Heartbeat, Tombstone, TransactionMarker, decode
from connectors.messages import Alert, FeatureExplanation, TriggeringEvent
from detectors.engine import UNATTRIBUTED, Change, Coords, Finding, KafkaCoords, Trigger
from detectors.features import Extractor, identity
from detectors.models import Contribution
from detectors.spec import TableSpec

# Why an input record produced no Change; each is counted, none is an error.
SKIP_TOMBSTONE = "tombstone"
SKIP_HEARTBEAT = "heartbeat"
SKIP_TRANSACTION = "transaction"
SKIP_MESSAGE = "logical_message"
SKIP_UNATTRIBUTED = "unattributed"
SKIP_UNWATCHED = "unwatched_table"
SKIP_PENDING = "awaiting_transaction_agent"  # held until its transaction's agent message arrives


@dataclass(frozen=True, slots=True)
class _Watched:
    """A watched table, compiled."""

    name: str
    extractor: Extractor
    # Tables whose detectors judge whole transactions get the transaction id; the others do not carry it.
    with_tx: bool


class Router:
    """Finds the table of a change event (by topic, else by ``source``) and extracts what detection needs.

    The agent comes from the row (the table's ``agent_id`` path) or, when the row has none, from a
    ``pg_logical_emit_message(true, '<prefix>', '{"agent_id": ..., "run_id": ...}')`` in the same
    transaction, which Debezium emits as an op ``m`` event with the same ``source.txId``. The message and
    the rows travel on different topics, so either may arrive first: a row without an agent waits up to
    ``hold_s`` of commit time for its transaction's message (in ``pending``), then counts as unattributed.
    Changes released by a late message are put in ``ready`` for the caller to take.
    """

    __slots__ = ("_by_source", "_by_topic", "_prefix", "_tx_agents", "hold_s", "max_tx", "pending", "ready")

    def __init__(
        self,
        tables: tuple[TableSpec, ...] | list[TableSpec],
        *,
        message_prefix: str | None = None,
        hold_s: float = 5.0,
        max_tx: int = 100_000,
    ) -> None:
        compiled = [(t, _Watched(t.name, Extractor(t), _needs_tx(t))) for t in tables]
        self._by_topic = {t.topic: w for t, w in compiled}
        self._by_source = {t.name: w for t, w in compiled}
        self._prefix = message_prefix
        self.hold_s = hold_s
        self.max_tx = max_tx  # transactions remembered and transactions held: bounded, whatever the input
        self._tx_agents: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self.pending: OrderedDict[str, list[tuple[ChangeEvent, _Watched, Coords]]] = OrderedDict()
        self.ready: list[Change] = []

    def route(self, topic: str | None, value: bytes | None, coords: Coords) -> Change | str:
        """A Change, or the reason (SKIP_*) it is not one. Raises EnvelopeError for malformed input."""
        ev = decode(value)
        if not isinstance(ev, ChangeEvent):
            if isinstance(ev, Tombstone):
                return SKIP_TOMBSTONE
            if isinstance(ev, Heartbeat):
                return SKIP_HEARTBEAT
            assert isinstance(ev, TransactionMarker)
            return SKIP_TRANSACTION
        if ev.op == "m":
            return self._message(ev)
        hit = self._by_topic.get(topic) if topic is not None else None
        if hit is None:
            hit = self._by_source.get(f"{ev.schema}.{ev.table}")
            if hit is None:
                return SKIP_UNWATCHED
        agent, run = hit.extractor.agent(ev.op, ev.before, ev.after)
        if agent is None:
            if self._prefix is None or ev.tx_id is None:
                if ev.op != "t":
                    return SKIP_UNATTRIBUTED
                return _change(ev, hit, UNATTRIBUTED, None, coords)
            known = self._tx_agents.get(ev.tx_id)
            if known is None:
                held = self.pending.get(ev.tx_id)
                if held is None:
                    if len(self.pending) >= self.max_tx:
                        self.pending.popitem(last=False)
                    held = self.pending[ev.tx_id] = []
                held.append((ev, hit, coords))
                return SKIP_PENDING
            agent, run = known
        return _change(ev, hit, agent, run, coords)

    def _message(self, ev: ChangeEvent) -> str:
        if self._prefix is None or ev.message_prefix != self._prefix:
            return SKIP_MESSAGE
        try:
            body = orjson.loads(ev.message_content or b"")
        except orjson.JSONDecodeError:
            raise EnvelopeError("invalid_message", "writeguard message content is not JSON") from None
        agent = identity(body.get("agent_id")) if isinstance(body, dict) else None
        if agent is None or ev.tx_id is None:
            raise EnvelopeError("invalid_message", "writeguard message needs a transaction and an agent_id")
        run = identity(body.get("run_id"))
        self._tx_agents[ev.tx_id] = (agent, run)
        if len(self._tx_agents) > self.max_tx:
            self._tx_agents.popitem(last=False)
        for row, watched, coords in self.pending.pop(ev.tx_id, ()):
            self.ready.append(_change(row, watched, agent, run, coords))
        return SKIP_MESSAGE

    def expire(self, now_us: int) -> int:
        """Give up on held rows whose transaction committed more than ``hold_s`` before ``now_us``."""
        limit = now_us - int(self.hold_s * 1e6)
        dropped = 0
        while self.pending:
            tx, held = next(iter(self.pending.items()))
            if held[0][0].commit_ts_us > limit:
                break
            del self.pending[tx]
            for row, watched, coords in held:
                if row.op == "t":  # a truncate is never dropped: it is scored, unattributed
                    self.ready.append(_change(row, watched, UNATTRIBUTED, None, coords))
                else:
                    dropped += 1
        return dropped


def _needs_tx(spec: TableSpec) -> bool:
    return any(getattr(d, "max_rows_per_tx", None) for d in spec.detectors)


def _change(ev: ChangeEvent, watched: _Watched, agent: str, run: str | None, coords: Coords) -> Change:
    ex, op, before, after = watched.extractor, ev.op, ev.before, ev.after
    return Change(
        watched.name,
        op,
        agent,
        run,
        ex.features(op, before, after),
        ev.commit_ts_us,
        coords,
        ev.snapshot or op == "r",  # incremental snapshots are op r with snapshot=incremental
        ex.categories(op, before, after),
        ex.idempotency_key(op, before, after),
        ev.tx_id if watched.with_tx else None,
    )


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


def _trigger(t: Trigger) -> TriggeringEvent:
    c = t.coords
    if isinstance(c, KafkaCoords):
        return TriggeringEvent(
            topic=c.topic, partition=c.partition, offset=c.offset, commit_ts=_ts(t.commit_ts_us), score=t.score
        )
    return TriggeringEvent(source=str(c), commit_ts=_ts(t.commit_ts_us), score=t.score)


def _fmt(v: float) -> str:
    return f"{v:,.2f}" if abs(v) < 1e6 else f"{v:.3g}"


def summarize(c: Contribution) -> str:
    if c.expected_low is None or c.expected_high is None:
        return f"{c.feature} = {_fmt(c.value)}"
    if c.z is None:
        return f"{c.feature} = {_fmt(c.value)} (ceiling {_fmt(c.expected_high)})"
    return f"{c.feature} = {_fmt(c.value)} (expected {_fmt(c.expected_low)} to {_fmt(c.expected_high)}, z={c.z:+.1f})"


def build_alert(f: Finding, detected_at_us: int) -> Alert:
    top = f.contributions[0] if f.contributions else None
    who = f"agent {f.agent_id}" + (" (judged against the table's population)" if f.scope == "population" else "")
    summary = f"{f.table}: {who}: " + (summarize(top) if top else f"score {f.score:.3f}")
    return Alert(
        alert_id=f.alert_id,
        agent_id=f.agent_id,
        run_id=f.run_id,
        table=f.table,
        detector=f.detector,
        detector_kind=f.kind,
        scope=f.scope,
        severity=f.severity,
        score=f.score,
        threshold=f.threshold,
        summary=summary,
        explanation=[
            FeatureExplanation(
                feature=c.feature,
                value=c.value,
                expected_low=c.expected_low,
                expected_high=c.expected_high,
                z=c.z,
            )
            for c in f.contributions
        ],
        commit_ts=_ts(f.commit_ts_us),
        detected_at=_ts(detected_at_us),
        lag_ms=(detected_at_us - f.commit_ts_us) / 1000.0,
        triggering_events=[_trigger(t) for t in f.triggers],
        anomalous_events=len(f.triggers),
        agent_events=f.agent_events,
        actions=list(f.actions),
        quarantined=f.quarantine,
    )
