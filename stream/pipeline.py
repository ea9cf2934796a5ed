"""From a Kafka record's value bytes to a :class:`~detectors.engine.Change`, and from a finding to an alert.

Shared by the Faust worker, the bare-consumer benchmark and ``writeguard replay`` so that all three
run the very same detection code.
"""

from __future__ import annotations

import logging
import shlex
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from connectors.debezium import ChangeEvent, EnvelopeError, Heartbeat, Tombstone, TransactionMarker, decode
from connectors.messages import UNDO_AGENT, Alert, FeatureExplanation, TriggeringEvent, verify_undo_message
from connectors.pg_guard import REFUSED_PREFIX, parse_refusal
from detectors.engine import UNATTRIBUTED, Change, Coords, Finding, KafkaCoords, Trigger, is_reserved, role_identity
from detectors.features import Extractor, identity
from detectors.models import Contribution
from detectors.spec import TableSpec
from stream.config import Config

log = logging.getLogger("writeguard.pipeline")

# Why an input record produced no Change; each is counted, none is an error.
SKIP_TOMBSTONE = "tombstone"
SKIP_HEARTBEAT = "heartbeat"
SKIP_TRANSACTION = "transaction"
SKIP_MESSAGE = "logical_message"
SKIP_UNWATCHED = "unwatched_table"
SKIP_PENDING = "awaiting_transaction_agent"  # held until its transaction's agent message arrives
# A row of a `writeguard undo apply` transaction (its signed message): compensation, neither scored nor learned.
SKIP_UNDO = "undo"


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
    ``hold_s`` of commit time for its transaction's message (in ``pending``), then is scored as unattributed.
    With ``arrival_clock`` set (the worker) it waits ``hold_s`` from when it was read instead: a backlog read after
    a restart or from a lagging connector is old by commit time, yet its messages are just as near.
    Changes released by a late message are put in ``ready`` for the caller to take. A row that names no agent
    is scored under the reserved identity ``UNATTRIBUTED``, never dropped: otherwise a NULL agent id escapes.

    With ``database_identity`` (``worker.agent_messages.identity: database``) only the messages of the triggers
    that ``writeguard identity-sql`` installs name agents: ``{"agent_id", "role", "table", "claimed"?}``, from the
    session's login role. The row's agent column is ignored for attribution; a role that is no agent's is scored as
    ``<role:NAME>``; a different id claimed by the writer (the column it wrote, which the trigger reports before it
    overwrites it, or a message of its own) becomes an op ``m`` Change with ``claimed`` set, which the engine
    alerts as ``identity_mismatch``. A snapshot read has no transaction to join: it keeps the row's column (it is
    learned, never alerted on).

    With several workers a row and its transaction's message may be read by different members of the ingest group.
    Then every member also reads all of the messages topic for the join alone (:meth:`join`, from
    :class:`stream.join.MessageJoiner`); the member that reads a message through the group does the rest with it
    (dead letters, refusal and mismatch alerts: from that one member). A message joined twice (by both readers of
    one member) changes nothing the second time.
    """

    __slots__ = (
        "_by_source",
        "_by_topic",
        "_claims",
        "_held_at",
        "_prefix",
        "_tx_agents",
        "_tx_identity",
        "_undo_keys",
        "_undo_tx",
        "arrival_clock",
        "database_identity",
        "hold_s",
        "max_tx",
        "pending",
        "ready",
    )

    def __init__(
        self,
        tables: tuple[TableSpec, ...] | list[TableSpec],
        *,
        message_prefix: str | None = None,
        hold_s: float = 5.0,
        max_tx: int = 100_000,
        database_identity: bool = False,
        undo_keys: tuple[bytes, ...] = (),
    ) -> None:
        if database_identity and message_prefix is None:
            raise ValueError("database identity needs the message prefix of the identity triggers")
        self.database_identity = database_identity
        # Ids a writer's own message claimed in a transaction whose database identity has not arrived yet.
        self._claims: OrderedDict[str, list[tuple[str, int, Coords]]] = OrderedDict()
        compiled = [(t, _Watched(t.name, Extractor(t), _needs_tx(t))) for t in tables]
        self._by_topic = {t.topic: w for t, w in compiled}
        self._by_source = {t.name: w for t, w in compiled}
        self._prefix = message_prefix
        self.hold_s = hold_s
        self.max_tx = max_tx  # transactions remembered and transactions held: bounded, whatever the input
        self._tx_agents: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # the join: txId -> agent, run
        # The database's identity per transaction as the checks saw it: a second one is a forged message. Apart from
        # the join's, which :meth:`join` also feeds, from another reader of the same messages.
        self._tx_identity: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self.pending: OrderedDict[str, list[tuple[ChangeEvent, _Watched, Coords]]] = OrderedDict()
        self.ready: list[Change] = []
        self.arrival_clock: Callable[[], int] | None = None  # µs; None: rows wait by commit time
        self._held_at: dict[str, int] = {}  # txId -> when its first row was held, by arrival_clock
        # The control signing keys: an undo message counts only with their HMAC over its plan and transaction, so
        # an agent cannot pass its own writes off as an undo's.
        self._undo_keys = undo_keys
        self._undo_tx: OrderedDict[str, str] = OrderedDict()  # txId -> plan id

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
            return self._message(ev, coords)
        hit = self._by_topic.get(topic) if topic is not None else None
        if hit is None:
            hit = self._by_source.get(f"{ev.schema}.{ev.table}")
            if hit is None:
                return SKIP_UNWATCHED
        if ev.tx_id is not None and ev.tx_id in self._undo_tx:
            return SKIP_UNDO
        agent, run = hit.extractor.agent(ev.op, ev.before, ev.after)
        if agent is not None and is_reserved(agent):
            agent = None  # a reserved identity is never taken from a row: it would hide a writer among the unnamed
        if self.database_identity and ev.tx_id is not None:
            agent = None  # the database names the agent; what the row says is only checked against it
        if agent is None:
            if self._prefix is None or ev.tx_id is None:
                return _change(ev, hit, UNATTRIBUTED, None, coords)
            known = self._tx_agents.get(ev.tx_id)
            if known is None:
                held = self.pending.get(ev.tx_id)
                if held is None:
                    if len(self.pending) >= self.max_tx:
                        self._held_at.pop(self.pending.popitem(last=False)[0], None)
                    held = self.pending[ev.tx_id] = []
                    if self.arrival_clock is not None:
                        self._held_at[ev.tx_id] = self.arrival_clock()
                held.append((ev, hit, coords))
                return SKIP_PENDING
            agent, run = known
            if self.database_identity:
                self._check_row(ev, hit, agent, run, coords)
        return _change(ev, hit, agent, run, coords)

    def _check_row(self, ev: ChangeEvent, hit: _Watched, agent: str, run: str | None, coords: Coords) -> None:
        """A row written (c/u) with another agent id than the database's: the identity trigger was not in place."""
        if ev.op not in ("c", "u"):
            return  # a delete's before image names the last writer, not a claim of this one
        row_agent, _ = hit.extractor.agent(ev.op, ev.before, ev.after)
        # The old image as both images: the column's value before the update, whichever image the path names.
        if ev.op == "u" and row_agent == hit.extractor.agent("d", ev.before, ev.before)[0]:
            return  # unchanged by this update
        if row_agent is not None and row_agent != agent:
            self.ready.append(_mismatch(hit.name, agent, run, row_agent, ev.commit_ts_us, coords))

    def join(self, value: bytes | None, coords: Coords) -> None:
        """A record of the messages topic, for the join only: a transaction's agent (or undo) is noted.

        Rows it concerns are released to ``ready``. Nothing else happens here: no dead letter, no alert, no count,
        since every member of the group reads every message this way and the group's reader of its partition
        does the rest (:meth:`route`).
        """
        try:
            ev = decode(value)
            if isinstance(ev, ChangeEvent) and ev.op == "m":
                self._message(ev, coords, check=False)
        except EnvelopeError:
            pass  # dead-lettered by the group's reader of this partition

    def _message(self, ev: ChangeEvent, coords: Coords, *, attribute: bool = True, check: bool = True) -> str:
        """An op m event: ``attribute`` joins it to its rows, ``check`` raises dead letters and emits alerts."""
        if ev.message_prefix == REFUSED_PREFIX and self._prefix is not None:
            return self._refusal(ev, coords) if check else SKIP_MESSAGE
        if self._prefix is None or ev.message_prefix != self._prefix:
            return SKIP_MESSAGE
        try:
            body = orjson.loads(ev.message_content or b"")
        except orjson.JSONDecodeError:
            raise EnvelopeError("invalid_message", "writeguard message content is not JSON") from None
        if not isinstance(body, dict):
            raise EnvelopeError("invalid_message", "writeguard message content is not a JSON object")
        if self._undo_keys and ev.tx_id is not None and body.get("agent_id") == UNDO_AGENT:
            plan = verify_undo_message(self._undo_keys, body, ev.tx_id)
            if plan is not None:
                if attribute:
                    self._undo_tx[ev.tx_id] = plan
                    if len(self._undo_tx) > self.max_tx:
                        self._undo_tx.popitem(last=False)
                    self.pending.pop(ev.tx_id, None)  # its rows, held for an agent: compensation, not scored
                    self._held_at.pop(ev.tx_id, None)
                return SKIP_MESSAGE
            # Unsigned or signed for another transaction: a writer claiming to be the undo. Scored as what it is.
        agent = identity(body.get("agent_id"))
        if agent is not None and is_reserved(agent):
            agent = None
        role = identity(body.get("role")) if self.database_identity else None
        if ev.tx_id is None or (agent is None and role is None):
            raise EnvelopeError("invalid_message", "writeguard message needs a transaction and an agent_id")
        run = identity(body.get("run_id"))
        tx = ev.tx_id
        if self.database_identity:
            if role is None:
                # Not the triggers' message (they always name the role): a writer emitting its own, which only a
                # role that kept EXECUTE on pg_logical_emit_message can do. It is a claim, checked, never believed.
                assert agent is not None
                if check:
                    self._claim(tx, agent, body, ev.commit_ts_us, coords)
                return SKIP_MESSAGE
            agent = agent or role_identity(role)
            if check and not self._identify(tx, agent, run, body, ev.commit_ts_us, coords):
                return SKIP_MESSAGE
            if attribute and tx in self._tx_agents:
                return SKIP_MESSAGE  # the first identity of a transaction names it (its rows are out already)
        if not attribute:
            return SKIP_MESSAGE
        assert agent is not None
        self._tx_agents[tx] = (agent, run)
        if len(self._tx_agents) > self.max_tx:
            self._tx_agents.popitem(last=False)
        self._held_at.pop(tx, None)
        for row, watched, at in self.pending.pop(tx, ()):
            self.ready.append(_change(row, watched, agent, run, at))
            if self.database_identity:
                self._check_row(row, watched, agent, run, at)
        return SKIP_MESSAGE

    def _claim(self, tx: str, agent: str, body: dict[str, object], ts_us: int, coords: Coords) -> None:
        """A writer's own message naming ``agent``: a mismatch if the database named another, or kept for later."""
        known = self._tx_identity.get(tx)
        if known is None:
            self._claims.setdefault(tx, []).append((agent, ts_us, coords))
            if len(self._claims) > self.max_tx:
                self._claims.popitem(last=False)
        elif known[0] != agent:
            self.ready.append(_mismatch(self._table_of(body), known[0], known[1], agent, ts_us, coords))

    def _identify(
        self, tx: str, agent: str, run: str | None, body: dict[str, object], ts_us: int, coords: Coords
    ) -> bool:
        """The triggers' message naming ``agent``: checks against claims and earlier identities; False when the
        transaction already had one (a forged second message)."""
        table = self._table_of(body)
        claimed = identity(body.get("claimed"))
        if claimed is not None and claimed != agent:
            self.ready.append(_mismatch(table, agent, run, claimed, ts_us, coords))
        known = self._tx_identity.get(tx)
        if known is not None:
            # One transaction has one session, so one login role: a second identity is a forged message.
            if known[0] != agent:
                self.ready.append(_mismatch(table, known[0], known[1], agent, ts_us, coords))
            return False
        self._tx_identity[tx] = (agent, run)
        if len(self._tx_identity) > self.max_tx:
            self._tx_identity.popitem(last=False)
        for forged, ts, at in self._claims.pop(tx, ()):
            if forged != agent:
                self.ready.append(_mismatch(table, agent, run, forged, ts, at))
        return True

    def _refusal(self, ev: ChangeEvent, coords: Coords) -> str:
        """A statement the guard rails refused (``writeguard guard-sql``): an op ``m`` Change with ``refused``.

        The guard's functions write it, outside the refused transaction (non-transactional), naming the session's
        login role; the agent comes from that role, never from a name the row or the session claimed.
        """
        try:
            r = parse_refusal(ev.message_content or b"")
        except ValueError as e:
            raise EnvelopeError("invalid_message", f"guard refusal: {str(e).splitlines()[0]}") from None
        if r.table not in self._by_source:
            return SKIP_UNWATCHED
        agent = identity(r.agent_id)
        if agent is None or is_reserved(agent):
            agent = role_identity(r.role)
        self.ready.append(
            Change(r.table, "m", agent, None, {}, ev.commit_ts_us, coords, refused=f"{r.kind}: {r.command}")
        )
        return SKIP_MESSAGE

    def _table_of(self, body: dict[str, object]) -> str:
        """The watched table a message names; else the first one (a writer's message names none we can trust)."""
        t = body.get("table")
        if isinstance(t, str) and t in self._by_source:
            return t
        return next(iter(self._by_source))

    def forget(self, partitions: set[tuple[str, int]]) -> int:
        """Drop the held rows read from ``partitions`` (revoked: their next owner reads them again, as their
        offsets were not committed past them); returns how many."""
        dropped = 0
        for tx in list(self.pending):
            held = self.pending[tx]
            kept = [h for h in held if not _read_from(h[2], partitions)]
            if len(kept) != len(held):
                dropped += len(held) - len(kept)
                if kept:
                    self.pending[tx] = kept
                else:
                    del self.pending[tx]
                    self._held_at.pop(tx, None)
        return dropped

    def expire(self, now_us: int) -> int:
        """Release held rows whose transaction committed (or with ``arrival_clock``, was held) more than ``hold_s``
        before ``now_us``.

        They are scored as ``UNATTRIBUTED`` (put in ``ready``), never dropped; returns how many.
        """
        limit = now_us - int(self.hold_s * 1e6)
        released = 0
        while self.pending:
            tx, held = next(iter(self.pending.items()))
            if self._held_at.get(tx, held[0][0].commit_ts_us) > limit:
                break
            del self.pending[tx]
            self._held_at.pop(tx, None)
            self._claims.pop(tx, None)
            for row, watched, coords in held:
                self.ready.append(_change(row, watched, UNATTRIBUTED, None, coords))
                released += 1
        return released


def _read_from(coords: Coords, partitions: set[tuple[str, int]]) -> bool:
    return isinstance(coords, KafkaCoords) and (coords.topic, coords.partition) in partitions


def _mismatch(table: str, agent: str, run: str | None, claimed: str, ts_us: int, coords: Coords) -> Change:
    return Change(table, "m", agent, run, {}, ts_us, coords, claimed=claimed)


class Intake:
    """Route -> Change, the first half of the pipeline, written once for the worker and for ``writeguard replay``.

    :meth:`feed` one input record at a time; each becomes a Change for ``sink``, a skip reason for ``skipped``
    (tombstones, heartbeats, held rows, ...), or a dead letter for ``dead`` (reason, detail) that the caller
    keeps with the record; the record is never lost and the stream goes on. :meth:`release` hands over, as
    unattributed, the rows held longer than the router's ``hold_s`` for their transaction's agent message, and
    the rows a late message released. The worker's ingest feeds Kafka records; replay feeds file lines.

    >>> from stream.config import EXAMPLE_CONFIG, load_config
    >>> out, skips, dead = [], [], []
    >>> intake = Intake(router_for(load_config(EXAMPLE_CONFIG)), out.append, skips.append,
    ...                 lambda reason, detail: dead.append(reason))
    >>> intake.feed(None, None, KafkaCoords("t", 0, 1)), intake.feed(None, b"{not json", KafkaCoords("t", 0, 2))
    (False, False)
    >>> skips, dead
    (['tombstone'], ['invalid_json'])
    """

    __slots__ = ("dead", "router", "sink", "skipped")

    def __init__(
        self,
        router: Router,
        sink: Callable[[Change], object],
        skipped: Callable[[str], object],
        dead: Callable[[str, str], object],
    ) -> None:
        self.router = router
        self.sink = sink
        self.skipped = skipped
        self.dead = dead

    def feed(self, topic: str | None, value: bytes | None, coords: Coords) -> bool:
        """Route one record; True when it became a Change (given to ``sink``)."""
        try:
            out = self.router.route(topic, value, coords)
        except EnvelopeError as e:
            self.dead(e.reason, e.detail)
            return False
        except Exception as e:  # never let one record stop the stream: it is kept, with its reason
            log.exception("unexpected error on %s", coords)
            self.dead("internal_error", repr(e)[:2000])
            return False
        if isinstance(out, str):
            self.skipped(out)
            return False
        self.sink(out)
        return True

    def release(self, now_us: int | None) -> None:
        """Rows held past ``hold_s`` before ``now_us`` (commit time) as unattributed, and those a message freed
        (only those with ``None``)."""
        router = self.router
        if router.pending and now_us is not None:
            router.expire(now_us)
        if router.ready:
            ready, router.ready = router.ready, []
            for ch in ready:
                self.sink(ch)


def router_for(cfg: Config) -> Router:
    """The router of a config: its tables, and how agents are named (worker.agent_messages)."""
    msgs = cfg.worker.agent_messages
    keys = cfg.control.keys() if cfg.control is not None else ()
    if msgs is None:
        return Router(cfg.tables, undo_keys=keys)
    return Router(
        cfg.tables,
        message_prefix=msgs.prefix,
        hold_s=msgs.hold_s,
        database_identity=msgs.identity == "database",
        undo_keys=keys,
    )


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
    if c.text is not None:
        return c.text
    if c.expected_low is None or c.expected_high is None:
        return f"{c.feature} = {_fmt(c.value)}"
    if c.z is None:
        return f"{c.feature} = {_fmt(c.value)} (ceiling {_fmt(c.expected_high)})"
    return f"{c.feature} = {_fmt(c.value)} (expected {_fmt(c.expected_low)} to {_fmt(c.expected_high)}, z={c.z:+.1f})"


def build_alert(f: Finding, detected_at_us: int) -> Alert:
    top = f.contributions[0] if f.contributions else None
    who = f"agent {f.agent_id}" + (" (judged against the table's population)" if f.scope == "population" else "")
    if f.learning:
        who += " (learning)"
    summary = f"{f.table}: {who}: " + (summarize(top) if top else f"score {f.score:.3f}")
    if f.claimed is not None:
        summary = f"{f.table}: the database names agent {f.agent_id}, the writer claimed to be {f.claimed}"
    elif f.refused is not None:
        summary = f"{f.table}: the guard rails refused agent {f.agent_id} a statement ({f.refused})"
    elif f.scope == "table":
        tops = ", ".join(f"{c.feature.removeprefix('agent ')} {c.value:g}" for c in f.contributions[1:])
        summary = f"{f.table}: all agents together: {summarize(top) if top else ''}; top agents: {tops}"
    quarantined = f.quarantine or f.requarantine  # a repeat of the quarantining alert says so too
    undo = undo_command(f) if quarantined else None
    if undo is not None:
        summary += f"; quarantined: plan its undo with `{undo}`"
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
                text=c.text,
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
        quarantined=quarantined,
        learning=f.learning,
        undo_command=undo,
    )


def undo_command(f: Finding) -> str:
    """The command that plans the undo of what the agent wrote since its incident began, shell-quoted: the agent
    id comes from the data."""
    first = min((t.commit_ts_us for t in f.triggers), default=f.commit_ts_us)
    since = _ts(first).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"writeguard undo plan -c CONFIG --agent {shlex.quote(f.agent_id)} --since {since} -o undo-plan.json"
