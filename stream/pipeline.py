"""From a Kafka record's value bytes to a :class:`~detectors.engine.Change`, and from a finding to an alert.

Shared by the Faust worker, the bare-consumer benchmark and ``writeguard replay`` so that all three
run the very same detection code.
"""

from __future__ import annotations

from datetime import UTC, datetime

from connectors.debezium import ChangeEvent, Heartbeat, Tombstone, TransactionMarker, decode
from connectors.messages import Alert, FeatureExplanation, TriggeringEvent
from detectors.engine import UNATTRIBUTED, Change, Finding
from detectors.features import Extractor
from detectors.models import Contribution
from detectors.spec import TableSpec

# Why an input record produced no Change; each is counted, none is an error.
SKIP_TOMBSTONE = "tombstone"
SKIP_HEARTBEAT = "heartbeat"
SKIP_TRANSACTION = "transaction"
SKIP_MESSAGE = "logical_message"
SKIP_UNATTRIBUTED = "unattributed"
SKIP_UNWATCHED = "unwatched_table"


class Router:
    """Finds the table of a change event (by topic, else by ``source``) and extracts what detection needs."""

    __slots__ = ("_by_source", "_by_topic")

    def __init__(self, tables: tuple[TableSpec, ...] | list[TableSpec]) -> None:
        compiled = [(t, Extractor(t)) for t in tables]
        self._by_topic = {t.topic: (t.name, ex) for t, ex in compiled}
        self._by_source = {t.name: (t.name, ex) for t, ex in compiled}

    def route(self, topic: str | None, value: bytes | None, coords: str) -> Change | str:
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
            return SKIP_MESSAGE
        hit = self._by_topic.get(topic) if topic is not None else None
        if hit is None:
            hit = self._by_source.get(f"{ev.schema}.{ev.table}")
            if hit is None:
                return SKIP_UNWATCHED
        table, ex = hit
        agent, run = ex.agent(ev.op, ev.before, ev.after)
        if agent is None:
            if ev.op != "t":
                return SKIP_UNATTRIBUTED
            agent = UNATTRIBUTED  # a truncate has no row; issue #3 attributes it through the transaction
        return Change(
            table,
            ev.op,
            agent,
            run,
            ex.features(ev.op, ev.before, ev.after),
            ev.commit_ts_us,
            coords,
            ev.snapshot or ev.op == "r",  # incremental snapshots are op r with snapshot=incremental
        )


def coords_of(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


def _trigger(coords: str, commit_ts_us: int, score: float) -> TriggeringEvent:
    if coords.count("/") >= 2 and ":" not in coords.rsplit("/", 2)[-2]:
        topic, part, off = coords.rsplit("/", 2)
        if part.isdigit() and off.isdigit():
            return TriggeringEvent(
                topic=topic, partition=int(part), offset=int(off), commit_ts=_ts(commit_ts_us), score=score
            )
    return TriggeringEvent(source=coords, commit_ts=_ts(commit_ts_us), score=score)


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
        triggering_events=[_trigger(t.coords, t.commit_ts_us, t.score) for t in f.triggers],
        anomalous_events=len(f.triggers),
        agent_events=f.agent_events,
        actions=list(f.actions),
        quarantined=f.quarantine,
    )
