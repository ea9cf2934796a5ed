"""Score-then-learn over every change, one set of models per (table, agent id).

The engine is pure: it takes :class:`Change` records and returns :class:`Finding` decisions. Kafka,
files and metrics stay in ``stream``; the same engine serves the Faust worker and ``writeguard replay``.
"""

from __future__ import annotations

import pickle
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import msgspec

from detectors.features import Extractor
from detectors.models import (
    CategoricalNovelty,
    Contribution,
    Detector,
    DuplicateKey,
    LevelDrift,
    OpBurstCeiling,
    OpMix,
    RateCeiling,
    RiverModel,
    Rule,
    TableValues,
    Volume,
    ZScore,
)
from detectors.spec import (
    QUARANTINING,
    SEVERITY_RANK,
    AnyDetector,
    DriftSpec,
    DuplicateSpec,
    NoveltySpec,
    OpBurstSpec,
    OpMixSpec,
    RateSpec,
    RiverModelSpec,
    RuleSpec,
    Suppression,
    TableSpec,
    VolumeSpec,
    ZScoreSpec,
    detector_name,
)

# Alert ids are uuid5 in this namespace, so the same triggering event always yields the same alert id.
ALERT_NAMESPACE = uuid.UUID("6f1c3d2e-52a8-4c1b-9d0e-77a1c0ffee42")
UNATTRIBUTED = "unattributed"


class Change(msgspec.Struct, array_like=True, gc=False):
    """What detection needs from one change event; also the repartition topic's wire format."""

    table: str
    op: str
    agent_id: str
    run_id: str | None
    x: dict[str, float]
    commit_ts_us: int
    coords: str  # "topic/partition/offset" on Kafka, "path:line" in replay
    snapshot: bool = False
    c: dict[str, str] | None = None  # categorical columns and the idempotency key ("_key"), when configured


@dataclass(frozen=True, slots=True)
class Trigger:
    coords: str
    commit_ts_us: int
    score: float
    x: Mapping[str, float] | None = None  # what a false-positive mark teaches the agent's model


@dataclass(slots=True)
class Finding:
    """A decision to alert, with everything the alert message needs."""

    alert_id: str
    table: str
    agent_id: str
    run_id: str | None
    detector: str
    kind: str
    scope: str  # "agent": its own model; "population": the table's model, while the agent warms up
    severity: str
    score: float
    threshold: float
    contributions: list[Contribution]
    triggers: list[Trigger]
    actions: tuple[str, ...]
    quarantine: bool  # this finding quarantines the agent (False when it already is)
    commit_ts_us: int
    agent_events: int


@dataclass(slots=True)
class Quarantine:
    alert_id: str | None
    reason: str
    since_us: int
    events_after: int = 0
    anomalous_after: int = 0


@dataclass(slots=True)
class _Plan:
    name: str
    kind: str
    severity: str
    threshold: float
    warmup: int
    k: int
    nmask: int
    value: bool  # a learned value model (skips anomalous events when learning)
    make: Callable[[], Detector]
    population: Detector | None
    shared: Detector | None = None
    population_threshold: float = 1.0  # one instance for the whole table (duplicate keys), instead of per agent
    population_n: list[int] = field(default_factory=lambda: [0])


@dataclass(slots=True)
class _Table:
    spec: TableSpec
    extractor: Extractor
    plans: list[_Plan]
    known: TableValues


class _AgentState:
    __slots__ = ("dets", "masks", "n", "open", "recent")

    def __init__(self, plans: list[_Plan]) -> None:
        # A table-level detector is not copied per agent: its slot points at the shared instance.
        self.dets: list[Detector] = [p.shared if p.shared is not None else p.make() for p in plans]
        self.masks = [0] * len(plans)
        self.open = 0  # bit i set: an incident is open for detector i, so further anomalies do not re-alert
        self.recent: list[list[Trigger]] | None = None
        self.n = 0


def _factory(spec: TableSpec, d: AnyDetector, known: TableValues) -> Callable[[], Detector]:
    log = frozenset(f.name for f in spec.features if f.transform == "log")
    if isinstance(d, NoveltySpec):
        cols, nw, scope, mv, mine = d.columns, d.warmup, d.table_scope, d.max_values, d.agent_scope
        return lambda: CategoricalNovelty(cols, nw, known, scope, mv, mine)
    if isinstance(d, DuplicateSpec):
        hz, mk, dops = d.horizon_seconds, d.max_keys, d.ops
        return lambda: DuplicateKey(hz, mk, dops)
    if isinstance(d, DriftSpec):
        feat, delta, dw, dlog = d.feature, d.delta, d.warmup, d.feature in log
        return lambda: LevelDrift(feat, delta, dw, dlog)
    if isinstance(d, VolumeSpec):
        vw, vwu, vhz, va, vmx = d.window_seconds, d.warmup, d.half_z, d.alpha, d.max_events
        return lambda: Volume(vw, vwu, vhz, va, vmx)
    if isinstance(d, OpMixSpec):
        mops, mw, mwu, mmin, mhz, mtx = d.ops, d.window_seconds, d.warmup, d.min_events, d.half_z, d.max_rows_per_tx
        return lambda: OpMix(mops, mw, mwu, mmin, mhz, mtx)
    if isinstance(d, RuleSpec):
        conds = [(c.field, c.op, c.value) for c in d.when]
        rops, cnt, rw = d.ops, d.count, d.window_seconds
        return lambda: Rule(conds, rops, cnt, rw)
    if isinstance(d, ZScoreSpec):
        feats, half_z, min_std, warmup = d.features, d.half_z, d.min_std, d.warmup
        return lambda: ZScore(feats, log, half_z, min_std, warmup)
    if isinstance(d, RiverModelSpec):
        model, params, scaler, rfeats = d.model, d.params, d.scaler, d.features
        return lambda: RiverModel(model, params, scaler, rfeats, log)
    if isinstance(d, OpBurstSpec):
        ops, mx, w = d.ops, d.max_events, d.window_seconds
        return lambda: OpBurstCeiling(mx, w, ops)
    assert isinstance(d, RateSpec)
    mx2, w2 = d.max_events, d.window_seconds
    return lambda: RateCeiling(mx2, w2)


def compile_table(spec: TableSpec) -> _Table:
    plans: list[_Plan] = []
    known = TableValues()  # the table's categorical values, shared by its agents' novelty detectors
    for d in spec.detectors:
        make = _factory(spec, d, known)
        value = isinstance(d, ZScoreSpec | RiverModelSpec)
        if isinstance(d, ZScoreSpec | RiverModelSpec):
            threshold, warmup, k, n = d.threshold, d.warmup, d.debounce.k, d.debounce.n
        elif isinstance(d, NoveltySpec | DuplicateSpec):
            threshold, warmup, k, n = 1.0, 0, d.debounce.k, d.debounce.n
        elif isinstance(d, VolumeSpec | OpMixSpec):
            threshold, warmup, k, n = d.threshold, 0, d.debounce.k, d.debounce.n
        else:
            # A guard's incident stays open until 16 writes in a row are back under the ceiling.
            threshold, warmup, k, n = 1.0, 0, 1, 16
        pop = make() if isinstance(d, ZScoreSpec) and d.population else None
        shared = make() if isinstance(d, DuplicateSpec) else None
        pop_threshold = d.population_threshold if isinstance(d, ZScoreSpec) and d.population_threshold else threshold
        plans.append(
            _Plan(
                detector_name(d),
                d.kind,
                d.severity,
                threshold,
                warmup,
                k,
                (1 << n) - 1,
                value,
                make,
                pop,
                shared,
                pop_threshold,
            )
        )
    return _Table(spec, Extractor(spec), plans, known)


def _store_key(key: tuple[str, str]) -> str:
    return f"{key[0]}\x1f{key[1]}"


def _detached(st: _AgentState, tab: _Table) -> _AgentState:
    """The state without what it shares with its table (which must not be copied into every checkpoint)."""
    for i, p in enumerate(tab.plans):
        det = st.dets[i]
        if p.shared is not None:
            st.dets[i] = None  # type: ignore[call-overload]
        elif isinstance(det, CategoricalNovelty):
            det._known = None  # type: ignore[assignment]
    return st


def _relink(st: _AgentState, tab: _Table) -> None:
    for i, p in enumerate(tab.plans):
        det = st.dets[i]
        if p.shared is not None:
            st.dets[i] = p.shared
        elif isinstance(det, CategoricalNovelty):
            det._known = tab.known


def alert_id(table: str, agent_id: str, detector: str, coords: str) -> str:
    return str(uuid.uuid5(ALERT_NAMESPACE, f"{table}\x1f{agent_id}\x1f{detector}\x1f{coords}"))


class Engine:
    """Per-(table, agent) detectors, a population model per table, and the quarantine state.

    >>> from detectors.spec import TableSpec, FeatureSpec, ZScoreSpec
    >>> spec = TableSpec(name="public.refunds", topic="shop.public.refunds",
    ...                  features=(FeatureSpec(name="amount", column="amount", transform="log"),),
    ...                  detectors=(ZScoreSpec(warmup=20),))
    >>> eng = Engine([spec])
    >>> for i in range(40):
    ...     _ = eng.process(Change("public.refunds", "c", "a1", None, {"amount": 30.0 + i % 9}, i, f"t/0/{i}"))
    >>> eng.process(Change("public.refunds", "c", "a1", None, {"amount": 900.0}, 41, "t/0/41"))
    []
    >>> [f.quarantine for f in eng.process(Change("public.refunds", "c", "a1", None, {"amount": 990.0}, 42, "t/0/42"))]
    [True]
    """

    def __init__(
        self,
        tables: list[TableSpec],
        *,
        suppressions: Sequence[Suppression] = (),
        max_states: int | None = None,
        store: MutableMapping[str, bytes] | None = None,
    ) -> None:
        self.tables: dict[str, _Table] = {t.name: compile_table(t) for t in tables}
        # Least recently active last-touched order: evicting the head frees the agents idle the longest.
        self.states: OrderedDict[tuple[str, str], _AgentState] = OrderedDict()
        self.quarantined: dict[str, Quarantine] = {}
        self._released: dict[str, str] = {}  # agent id -> the alert id of its last lifted quarantine
        self.suppressions = tuple(suppressions)
        self.suppressed = 0  # findings not published because a suppression window covered them
        self.max_states = max_states
        self.store: MutableMapping[str, bytes] = store if store is not None else {}
        self.evicted = 0
        self.restored = 0

    def _state(self, tab: _Table, key: tuple[str, str]) -> _AgentState:
        st = self.states.get(key)
        if st is not None:
            if self.max_states is not None:
                self.states.move_to_end(key)
            return st
        # Only get and del: a dbm object (whichever module the Python build has) lacks pop and most of the rest.
        skey = _store_key(key)
        blob = self.store.get(skey) if self.max_states is not None else None
        if blob is not None:
            del self.store[skey]
            st = pickle.loads(blob)  # noqa: S301 - our own checkpoint, written by _evict below
            _relink(st, tab)
            self.restored += 1
        else:
            st = _AgentState(tab.plans)
        self.states[key] = st
        if self.max_states is not None and len(self.states) > self.max_states:
            self._evict()
        return st

    def _held(self, tab: _Table, key: tuple[str, str]) -> _AgentState | None:
        """The agent's state in memory or in the store of evicted ones; None if it never wrote to the table."""
        if key in self.states or (self.max_states is not None and self.store.get(_store_key(key)) is not None):
            return self._state(tab, key)
        return None

    def _evict(self) -> None:
        assert self.max_states is not None
        while len(self.states) > self.max_states:
            key, st = self.states.popitem(last=False)
            self.store[_store_key(key)] = pickle.dumps(_detached(st, self.tables[key[0]]), protocol=5)
            self.evicted += 1

    def table(self, name: str) -> _Table | None:
        return self.tables.get(name)

    def process(self, ch: Change, scores: list[tuple[str, float]] | None = None) -> list[Finding]:
        """Score ``ch`` with every detector of its table, then learn from it; return alert decisions."""
        tab = self.tables[ch.table]
        key = (ch.table, ch.agent_id)
        st = self._state(tab, key)
        st.n += 1
        t = ch.commit_ts_us / 1e6
        x = ch.x
        quarantine = self.quarantined.get(ch.agent_id)
        findings: list[Finding] = []
        value_anomaly = False
        any_anomaly = False
        for i, p in enumerate(tab.plans):
            det = st.dets[i]
            scope = "agent"
            if p.value:
                if not x:
                    continue
                if det.n >= p.warmup:
                    score = det.score_one(x)
                elif p.population is not None and p.population_n[0] >= p.warmup:
                    det, scope = p.population, "population"
                    score = det.score_one(x)
                else:
                    continue
            else:
                score = det.score_one(x, ch.op, t, ch.c)
            if scores is not None:
                scores.append((p.name, score))
            limit = p.threshold if scope == "agent" else p.population_threshold
            anomalous = score >= limit and not ch.snapshot
            mask = ((st.masks[i] << 1) | anomalous) & p.nmask
            st.masks[i] = mask
            bit = 1 << i
            if not anomalous:
                # A quarantined agent keeps its incidents open: late, out-of-order normal events from other
                # CDC partitions must not close them and re-alert on the same burst.
                if mask == 0 and not (st.open & bit and quarantine is not None):
                    st.open &= ~bit
                    if st.recent is not None:
                        st.recent[i].clear()  # a lone outlier long ago is not part of a later incident
                continue
            any_anomaly = True
            value_anomaly = value_anomaly or p.value
            if st.recent is None:
                st.recent = [[] for _ in tab.plans]
            recent = st.recent[i]
            recent.append(Trigger(ch.coords, ch.commit_ts_us, score, x if p.value else None))
            if len(recent) > 64:
                del recent[0]
            if st.open & bit or mask.bit_count() < p.k:
                continue
            if self.suppressions and self.suppressed_by(ch, p.name) is not None:
                # Planned work: scored and counted, never alerted on. The incident stays closed, so an anomaly
                # that goes on after the window is alerted then.
                self.suppressed += 1
                continue
            st.open |= bit
            findings.append(self._finding(tab, p, ch, det, scope, score, list(recent), st.n, quarantine))
        if quarantine is not None:
            quarantine.events_after += 1
            quarantine.anomalous_after += any_anomaly
        for i, p in enumerate(tab.plans):
            if not p.value:
                if not ch.snapshot:  # a snapshot replays history: those rows were not written just now
                    st.dets[i].learn_one(x, ch.op, t, ch.c)
            elif x and not value_anomaly and quarantine is None:
                st.dets[i].learn_one(x)
                if p.population is not None:
                    p.population.learn_one(x)
                    p.population_n[0] += 1
        return findings

    def _finding(
        self,
        tab: _Table,
        p: _Plan,
        ch: Change,
        det: Detector,
        scope: str,
        score: float,
        triggers: list[Trigger],
        n: int,
        quarantine: Quarantine | None,
    ) -> Finding:
        name = p.name if scope == "agent" else f"{p.name}.population"
        actions = tab.spec.actions.get(p.severity, ("alert",))  # type: ignore[call-overload]
        aid = alert_id(ch.table, ch.agent_id, name, ch.coords)
        # Read the live state: two detectors firing on one event must quarantine once.
        quarantines = not QUARANTINING.isdisjoint(actions) and ch.agent_id not in self.quarantined
        if quarantines:
            self.quarantined[ch.agent_id] = Quarantine(aid, f"{name} on {ch.table}", ch.commit_ts_us)
        return Finding(
            alert_id=aid,
            table=ch.table,
            agent_id=ch.agent_id,
            run_id=ch.run_id,
            detector=name,
            kind=p.kind,
            scope=scope,
            severity=p.severity,
            score=score,
            threshold=p.threshold if scope == "agent" else p.population_threshold,
            contributions=det.explain(ch.x, ch.op, ch.commit_ts_us / 1e6, ch.c)[:5],
            triggers=triggers,
            actions=tuple(actions),
            quarantine=quarantines,
            commit_ts_us=ch.commit_ts_us,
            agent_events=n,
        )

    def apply_control(
        self,
        agent_id: str,
        state: str,
        alert_id: str | None,
        reason: str,
        at_us: int,
        false_positive: bool = False,
    ) -> None:
        """Follow the control topic: a record written by any worker or by ``writeguard release``.

        A release marked ``false_positive`` also teaches the agent's value models the writes that alerted,
        so that the same behaviour is normal from now on.
        """
        if state == "quarantined":
            # An enforcement outcome that lands after the release repeats the released alert: it stays released.
            if agent_id not in self.quarantined and (alert_id is None or self._released.get(agent_id) != alert_id):
                self.quarantined[agent_id] = Quarantine(alert_id, reason, at_us)
        elif state == "released":
            q = self.quarantined.pop(agent_id, None)
            lifted = alert_id or (q.alert_id if q is not None else None)
            if lifted is not None:
                self._released[agent_id] = lifted
            # A released agent starts with a clean slate: if it misbehaves again, it is alerted again.
            for name, tab in self.tables.items():
                st = self._held(tab, (name, agent_id))
                if st is None:
                    continue
                if false_positive and st.recent is not None:
                    for i, p in enumerate(tab.plans):
                        if not p.value:
                            continue
                        for trig in st.recent[i]:
                            if trig.x:
                                st.dets[i].learn_one(trig.x)
                                if p.population is not None:
                                    p.population.learn_one(trig.x)
                st.open = 0
                st.masks = [0] * len(st.masks)
                st.recent = None

    def suppressed_by(self, ch: Change, detector: str) -> Suppression | None:
        t = ch.commit_ts_us / 1e6
        for s in self.suppressions:
            if s.covers(ch.table, ch.agent_id, detector, t):
                return s
        return None

    @property
    def active_models(self) -> int:
        return len(self.states)

    def models_by_table(self) -> Mapping[str, int]:
        counts: dict[str, int] = dict.fromkeys(self.tables, 0)
        for table, _ in self.states:
            counts[table] += 1
        return counts


def max_severity(findings: list[Finding]) -> str | None:
    if not findings:
        return None
    return max(findings, key=lambda f: SEVERITY_RANK[f.severity]).severity
