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
from functools import partial

import msgspec

from detectors.features import Extractor
from detectors.models import CategoricalNovelty, Contribution, Detector, TableValues
from detectors.spec import QUARANTINING, SEVERITY_RANK, AnyDetector, Suppression, TableSpec, detector_name
from detectors.write import Op, Write

# Alert ids are uuid5 in this namespace, so the same triggering event always yields the same alert id.
ALERT_NAMESPACE = uuid.UUID("6f1c3d2e-52a8-4c1b-9d0e-77a1c0ffee42")
UNATTRIBUTED = "unattributed"


# Event coordinates: where a change event was read, so that an alert points at it and its id repeats when the
# same event is processed again. Short tags keep them compact on the changes topic (msgspec needs a tag to
# tell two array-like structs apart).


class KafkaCoords(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="k"):
    """A Kafka record: its topic, partition and offset.

    >>> str(KafkaCoords("shop.public.refunds", 0, 42))
    'shop.public.refunds/0/42'
    """

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        # The canonical text, hashed into alert ids: do not change it.
        return f"{self.topic}/{self.partition}/{self.offset}"


class FileCoords(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="f"):
    """A line of a file of Debezium message values (``writeguard replay``).

    >>> str(FileCoords("/data/events.jsonl", 7))
    '/data/events.jsonl:7'
    """

    path: str
    line: int

    def __str__(self) -> str:
        # The canonical text, hashed into alert ids: do not change it.
        return f"{self.path}:{self.line}"


Coords = KafkaCoords | FileCoords


class Change(msgspec.Struct, array_like=True, gc=False):
    """What detection needs from one change event; also the wire format of the internal changes topic."""

    table: str
    op: Op
    agent_id: str
    run_id: str | None
    x: dict[str, float]
    commit_ts_us: int
    coords: Coords
    snapshot: bool = False
    categories: dict[str, str] | None = None  # when the table has categorical columns
    idempotency_key: str | None = None  # when the table has an idempotency key column
    tx_id: str | None = None  # only for tables whose detectors judge whole transactions (compact otherwise)


@dataclass(frozen=True, slots=True)
class Trigger:
    coords: Coords
    commit_ts_us: int
    score: float
    write: Write | None = None  # a value model's input: what a false-positive mark teaches the agent's model


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


@dataclass(slots=True, kw_only=True)
class _Plan:
    """One detector of a table, compiled from its spec's :class:`~detectors.spec.Scoring`."""

    name: str
    kind: str
    severity: str
    threshold: float
    population_threshold: float
    warmup: int
    k: int  # debounce: alert when k of the agent's last n scores were anomalous ...
    nmask: int  # ... n as a bit mask
    learned: bool
    make: Callable[[], Detector]
    population: Detector | None  # the table's model, for agents still in warm-up
    shared: Detector | None  # the table's one instance, when the detector is per table
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


def _plan(table: TableSpec, d: AnyDetector, known: TableValues) -> _Plan:
    s = d.scoring()
    make = partial(d.build, table, known)
    return _Plan(
        name=detector_name(d),
        kind=d.kind,
        severity=d.severity,
        threshold=s.threshold,
        population_threshold=s.population_threshold or s.threshold,
        warmup=s.warmup,
        k=s.debounce.k,
        nmask=(1 << s.debounce.n) - 1,
        learned=s.learned,
        make=make,
        population=make() if s.population else None,
        shared=make() if s.per_table else None,
    )


def compile_table(spec: TableSpec) -> _Table:
    known = TableValues()  # the table's categorical values, shared by its agents' novelty detectors
    return _Table(spec, Extractor(spec), [_plan(spec, d, known) for d in spec.detectors], known)


def _store_key(key: tuple[str, str]) -> str:
    return f"{key[0]}\x1f{key[1]}"


def _detached(st: _AgentState, tab: _Table) -> _AgentState:
    """The state without what it shares with its table (which must not be copied into every checkpoint)."""
    for i, p in enumerate(tab.plans):
        det = st.dets[i]
        if p.shared is not None:
            st.dets[i] = None  # type: ignore[call-overload]
        elif isinstance(det, CategoricalNovelty):
            det.known = None  # type: ignore[assignment]
    return st


def _relink(st: _AgentState, tab: _Table) -> None:
    for i, p in enumerate(tab.plans):
        det = st.dets[i]
        if p.shared is not None:
            st.dets[i] = p.shared
        elif isinstance(det, CategoricalNovelty):
            det.known = tab.known


def alert_id(table: str, agent_id: str, detector: str, coords: Coords) -> str:
    return str(uuid.uuid5(ALERT_NAMESPACE, f"{table}\x1f{agent_id}\x1f{detector}\x1f{coords}"))


class Engine:
    """Per-(table, agent) detectors, a population model per table, and the quarantine state.

    >>> from detectors.spec import TableSpec, FeatureSpec, ZScoreSpec
    >>> spec = TableSpec(name="public.refunds", topic="shop.public.refunds",
    ...                  features=(FeatureSpec(name="amount", column="amount", transform="log"),),
    ...                  detectors=(ZScoreSpec(warmup=20),))
    >>> eng = Engine([spec])
    >>> def change(i: int, amount: float) -> Change:
    ...     return Change("public.refunds", "c", "a1", None, {"amount": amount}, i, KafkaCoords("t", 0, i))
    >>> for i in range(40):
    ...     _ = eng.process(change(i, 30.0 + i % 9))
    >>> eng.process(change(41, 900.0))
    []
    >>> [(f.quarantine, str(f.triggers[-1].coords)) for f in eng.process(change(42, 990.0))]
    [(True, 't/0/42')]
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
        x = ch.x
        w = Write(x, ch.op, ch.commit_ts_us / 1e6, ch.categories, ch.idempotency_key, ch.tx_id)
        quarantine = self.quarantined.get(ch.agent_id)
        findings: list[Finding] = []
        value_anomaly = False
        any_anomaly = False
        for i, p in enumerate(tab.plans):
            det = st.dets[i]
            scope = "agent"
            if p.learned:
                if not x:
                    continue
                if det.n < p.warmup:
                    if p.population is None or p.population_n[0] < p.warmup:
                        continue
                    det, scope = p.population, "population"
            score = det.score_one(w)
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
            value_anomaly = value_anomaly or p.learned
            if st.recent is None:
                st.recent = [[] for _ in tab.plans]
            recent = st.recent[i]
            recent.append(Trigger(ch.coords, ch.commit_ts_us, score, w if p.learned else None))
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
            findings.append(self._finding(tab, p, ch, w, det, scope, score, list(recent), st.n, quarantine))
        if quarantine is not None:
            quarantine.events_after += 1
            quarantine.anomalous_after += any_anomaly
        for i, p in enumerate(tab.plans):
            if not p.learned:
                if not ch.snapshot:  # a snapshot replays history: those rows were not written just now
                    st.dets[i].learn_one(w)
            elif x and not value_anomaly and quarantine is None:
                st.dets[i].learn_one(w)
                if p.population is not None:
                    p.population.learn_one(w)
                    p.population_n[0] += 1
        return findings

    def _finding(
        self,
        tab: _Table,
        p: _Plan,
        ch: Change,
        w: Write,
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
            contributions=det.explain(w)[:5],
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
                        if not p.learned:
                            continue
                        for trig in st.recent[i]:
                            if trig.write is not None and trig.write.x:
                                st.dets[i].learn_one(trig.write)
                                if p.population is not None:
                                    p.population.learn_one(trig.write)
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
