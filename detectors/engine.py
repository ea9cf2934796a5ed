"""Score-then-learn over every change, one set of models per (table, agent id).

The engine is pure: it takes :class:`Change` records and returns :class:`Finding` decisions. Kafka,
files and metrics stay in ``stream``; the same engine serves the Faust worker and ``writeguard replay``.
"""

from __future__ import annotations

import pickle
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice

import msgspec

from detectors import pickling
from detectors.features import Extractor
from detectors.models import (
    CategoricalNovelty,
    Contribution,
    Cusum,
    Detector,
    RateCeiling,
    Rhythm,
    TableCeiling,
    TableTraffic,
    TableValues,
    ZScore,
    median_levels,
    regime_shift,
)
from detectors.spec import QUARANTINING, SEVERITY_RANK, AnyDetector, Suppression, TableSpec, detector_name
from detectors.write import Op, Write

pickling.register()  # checkpoints must not slow down the model sets they copy (detectors/pickling.py)

# Alert ids are uuid5 in this namespace, so the same triggering event always yields the same alert id.
ALERT_NAMESPACE = uuid.UUID("6f1c3d2e-52a8-4c1b-9d0e-77a1c0ffee42")
# Reserved identities, for writes that name no agent: in angle brackets, which the router never accepts from a row
# or a writer's message, so no agent can take one (and hide in it). They are scored like any agent, never quarantined.
UNATTRIBUTED = "<unattributed>"
IDENTITY_MISMATCH = "identity_mismatch"
GUARD_REFUSAL = "guard_refusal"  # a destructive statement the guard rails refused: an attempt is itself a signal


def role_identity(role: str) -> str:
    """The reserved identity of a database role that maps to no agent (the owner, a human, a service).

    >>> role_identity("app_owner"), is_reserved(role_identity("app_owner")), is_reserved("agent_7")
    ('<role:app_owner>', True, False)
    """
    return f"<role:{role}>"


def is_reserved(agent_id: str) -> bool:
    return agent_id.startswith("<") and agent_id.endswith(">")


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
    # op "m" only: the id the writer claimed where the database named ``agent_id`` (an impersonation attempt).
    claimed: str | None = None
    # op "m" only: a statement the guard rails (`writeguard guard-sql`) refused this agent, "<kind>: <command>".
    refused: str | None = None


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
    claimed: str | None = None  # identity_mismatch: the id the writer claimed (agent_id is the database's)
    refused: str | None = None  # guard_refusal: what the database refused the agent, "<kind>: <command>"
    # The model that judged is in its learning period: severity at most warning, and it never quarantines.
    learning: bool = False
    # The event that quarantined the agent, scored again (a restart re-reads from the committed offset): the
    # alert repeats as it was (quarantined), though no second quarantine is sent.
    requarantine: bool = False


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
    # A table-wide ceiling: its incident state is the table's, not an agent's, or every fresh id would re-alert.
    table_scope: bool = False
    table_mask: int = 0
    table_open: bool = False
    # The learning period (detectors.spec.Learning): a statistical detector's findings only warn until its
    # model has seen learn_writes writes and learn_us of commit time since its first one.
    learns: bool = False
    ceiling: float = float("inf")  # scores at or above it are the detector's hard ceiling: never learning
    learn_writes: int = 0
    learn_us: int = 0
    population_agents: int = 0  # the population's own warm-up, before it judges anyone
    population_writes: int = 0
    population_first_us: int | None = None
    population_seen: set[str] = field(default_factory=set)  # agents it learned from, until population_agents
    # Regime change (detectors.spec.Scoring.regime_writes): writes with an incident open and no quarantine after
    # which the agent's model re-baselines; 0: never. Its triggers keep their writes, to re-baseline on.
    regime: int = 0
    keep_write: bool = False
    # The table's writes per bucket of time, for a detector that judges an agent against how busy its table is
    # (rhythm): one instance per table, which each agent's detector links to and adds its writes to.
    traffic: TableTraffic | None = None

    def learning(self, n: int, first_us: int, now_us: int) -> bool:
        return self.learns and (n < self.learn_writes or now_us - first_us < self.learn_us)

    def population_ready(self) -> bool:
        n = self.population_n[0]
        return n >= self.warmup and n >= self.population_writes and len(self.population_seen) >= self.population_agents

    def population_learning(self, now_us: int) -> bool:
        first = self.population_first_us
        return first is None or self.learning(self.population_n[0], first, now_us)


@dataclass(slots=True)
class _Table:
    spec: TableSpec
    extractor: Extractor
    plans: list[_Plan]
    known: TableValues
    # The longest learning period of its statistical detectors: a model set learns until all of them have passed.
    learn_writes: int = 0
    learn_us: int = 0
    learning: int = 0  # model sets of this table still learning, in memory
    regime: bool = False  # some detector of the table re-baselines on a regime change
    # Agents whose model set is in the engine's store and still learning: with ``learning``, the learning count.
    stored_learning: set[str] = field(default_factory=set)
    last_us: int = 0  # the latest commit time seen, for the population models' learning period


class _AgentState:
    __slots__ = ("dets", "first_us", "held", "learning", "lopen", "masks", "n", "open", "recent")

    def __init__(self, plans: list[_Plan]) -> None:
        # A table-level detector is not copied per agent: its slot points at the shared instance.
        self.dets: list[Detector] = [p.shared if p.shared is not None else p.make() for p in plans]
        self.masks = [0] * len(plans)
        self.open = 0  # bit i set: an incident is open for detector i, so further anomalies do not re-alert
        self.lopen = 0  # bit i set: that incident was opened by a learning finding (a later full one may follow)
        self.recent: list[list[Trigger]] | None = None
        # Regime changes: detector index -> [the agent's write that opened its incident, the last one seen open].
        self.held: dict[int, list[int]] | None = None
        self.n = 0
        self.first_us = 0
        self.learning = False
        _link_priors(self, plans)


def _link_priors(st: _AgentState, plans: list[_Plan]) -> None:
    """Point each agent zscore at its table's population model, whose pooled spread is its prior, and each rhythm
    at its table's traffic."""
    for i, p in enumerate(plans):
        det = st.dets[i]
        if isinstance(det, ZScore) and p.shared is None and isinstance(p.population, ZScore):
            det.prior = p.population
        elif isinstance(det, Rhythm):
            det.table = p.traffic


def _plan(table: TableSpec, d: AnyDetector, known: TableValues, table_scope: bool = False) -> _Plan:
    s = d.scoring()
    make: Callable[[], Detector] = partial(d.build, table, known)
    if table_scope:
        make = partial(_table_ceiling, make)
    learning = s.learning or table.learning
    regime = (s.regime_writes or 0) if s.learns and not table_scope else 0
    population = make() if s.population else None
    shared = make() if s.per_table or table_scope else None
    if population is None and shared is None:
        # One throwaway build now, so that the first change does not pay a detector's imports: river.drift (and
        # with it scipy.stats) takes over a second, which would be the first alert's lag and replay's clock.
        make()
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
        population=population,
        shared=shared,
        table_scope=table_scope,
        learns=s.learns and not table_scope,
        ceiling=s.ceiling if s.ceiling is not None else float("inf"),
        learn_writes=learning.writes,
        learn_us=int(learning.seconds * 1e6),
        population_agents=s.population_agents,
        population_writes=s.population_writes,
        regime=regime,
        keep_write=s.learned or regime > 0,
        traffic=d.table_traffic(),
    )


def _table_ceiling(make: Callable[[], Detector]) -> Detector:
    inner = make()
    assert isinstance(inner, RateCeiling), "only the rate and op_burst ceilings have a table-wide twin"
    return TableCeiling(inner)


def compile_table(spec: TableSpec) -> _Table:
    known = TableValues()  # the table's categorical values, shared by its agents' novelty detectors
    plans = []
    for d in spec.detectors:
        plans.append(_plan(spec, d, known))
        if (wide := d.table_wide()) is not None:
            plans.append(_plan(spec, wide, known, table_scope=True))
    learners = [p for p in plans if p.learns]
    return _Table(
        spec,
        Extractor(spec),
        plans,
        known,
        learn_writes=max((p.learn_writes for p in learners), default=0),
        learn_us=max((p.learn_us for p in learners), default=0),
        regime=any(p.regime for p in plans),
    )


def _traffics(tab: _Table) -> list[tuple[int, str, TableTraffic]]:
    """The table's traffic counts (rhythm), by plan: part of its table checkpoint."""
    return [(i, p.name, p.traffic) for i, p in enumerate(tab.plans) if p.traffic is not None]


def _traffic_n(tab: _Table) -> int:
    return sum(p.traffic.n for p in tab.plans if p.traffic is not None)


def _restore_traffics(tab: _Table, traffics: list[tuple[int, str, TableTraffic]]) -> None:
    """Take a table checkpoint's traffic counts for the plans that still have the same name and bucket width."""
    for i, pname, traffic in traffics:
        if i < len(tab.plans) and tab.plans[i].name == pname:
            mine = tab.plans[i].traffic
            if mine is not None and isinstance(traffic, TableTraffic) and traffic.width == mine.width:
                tab.plans[i].traffic = traffic


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
        elif isinstance(det, ZScore):
            det.prior = None
        elif isinstance(det, Rhythm):
            det.table = None
    return st


def _relink(st: _AgentState, tab: _Table) -> None:
    for i, p in enumerate(tab.plans):
        det = st.dets[i]
        if p.shared is not None:
            st.dets[i] = p.shared
        elif isinstance(det, CategoricalNovelty):
            det.known = tab.known
    _link_priors(st, tab.plans)


class _NoDetector:
    """Stands in for a detector where the finding is the router's (identity_mismatch): nothing to score or learn."""

    n = 0

    def score_one(self, w: Write) -> float:
        return 1.0

    def learn_one(self, w: Write) -> None:
        return None

    def explain(self, w: Write) -> list[Contribution]:
        return []


_NO_DETECTOR = _NoDetector()


def alert_id(table: str, agent_id: str, detector: str, coords: Coords) -> str:
    return str(uuid.uuid5(ALERT_NAMESPACE, f"{table}\x1f{agent_id}\x1f{detector}\x1f{coords}"))


class Engine:
    """Per-(table, agent) detectors, a population model per table, and the quarantine state.

    A model set in its learning period (200 writes and a day by default) only warns; this one has none:

    >>> from detectors.spec import TableSpec, FeatureSpec, Learning, ZScoreSpec
    >>> spec = TableSpec(name="public.refunds", topic="shop.public.refunds",
    ...                  features=(FeatureSpec(name="amount", column="amount", transform="log"),),
    ...                  detectors=(ZScoreSpec(warmup=20),), learning=Learning(writes=0, seconds=0))
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
        track_dirty: bool = False,
    ) -> None:
        self.tables: dict[str, _Table] = {t.name: compile_table(t) for t in tables}
        # Least recently active last-touched order: evicting the head frees the agents idle the longest.
        self.states: OrderedDict[tuple[str, str], _AgentState] = OrderedDict()
        self.quarantined: dict[str, Quarantine] = {}
        self._released: dict[str, str] = {}  # agent id -> the alert id of its last lifted quarantine
        self._mismatches: dict[tuple[str, str, str, str], None] = {}  # open identity_mismatch incidents, oldest first
        self.suppressions = tuple(suppressions)
        self.suppressed = 0  # findings not published because a suppression window covered them
        self.max_states = max_states
        self.store: MutableMapping[str, bytes] = store if store is not None else {}
        self.evicted = 0
        self.restored = 0
        # (table, agent) model sets changed since the last take_dirty(), oldest first: what a checkpoint writes.
        self.dirty: dict[tuple[str, str], None] | None = {} if track_dirty else None

    def _state(self, tab: _Table, key: tuple[str, str]) -> _AgentState:
        st = self.states.get(key)
        if st is not None:
            if self.max_states is not None:
                self.states.move_to_end(key)
            return st
        # Only get and del: a dbm object (whichever module the Python build has) lacks pop and most of the rest.
        # The store holds evicted model sets and those preloaded from checkpoints, whatever max_states says.
        skey = _store_key(key)
        blob = self.store.get(skey)
        if blob is not None:
            del self.store[skey]
            st = pickle.loads(blob)  # noqa: S301 - our own checkpoint (_evict, or a verified one from preload)
            _relink(st, tab)
            tab.stored_learning.discard(key[1])
            if st.learning:
                tab.learning += 1
            self.restored += 1
        else:
            st = _AgentState(tab.plans)
            if tab.learn_writes > 0 or tab.learn_us > 0:
                st.learning = True
                tab.learning += 1
        self.states[key] = st
        if self.max_states is not None and len(self.states) > self.max_states:
            self._evict()
        return st

    def _held(self, tab: _Table, key: tuple[str, str]) -> _AgentState | None:
        """The agent's state in memory or in the store of evicted ones; None if it never wrote to the table."""
        if key in self.states or self.store.get(_store_key(key)) is not None:
            return self._state(tab, key)
        return None

    def _evict(self) -> None:
        assert self.max_states is not None
        while len(self.states) > self.max_states:
            key, st = self.states.popitem(last=False)
            tab = self.tables[key[0]]
            if st.learning:
                tab.learning -= 1
                tab.stored_learning.add(key[1])
            self.store[_store_key(key)] = pickle.dumps(_detached(st, tab), protocol=5)
            self.evicted += 1

    # Checkpoints: the worker writes the model sets that changed to a topic and preloads them on another worker.

    def take_dirty(self, limit: int | None = None) -> list[tuple[str, str]]:
        """The (table, agent) keys whose model set changed since they were last taken, oldest first, at most
        ``limit`` of them (needs ``track_dirty``); the others stay, and a key that changes again goes last."""
        if not self.dirty:
            return []
        if limit is None or limit >= len(self.dirty):
            keys = list(self.dirty)
            self.dirty.clear()
            return keys
        keys = list(islice(self.dirty, limit))
        for key in keys:
            del self.dirty[key]
        return keys

    def checkpoint(self, key: tuple[str, str]) -> tuple[bytes, bool] | None:
        """The model set of ``key`` as a blob that :meth:`preload` takes, and whether it is still learning;
        None if the engine holds none (it never wrote to the table, or was forgotten)."""
        tab = self.tables.get(key[0])
        if tab is None:
            return None
        st = self.states.get(key)
        if st is not None:
            blob = pickle.dumps(_detached(st, tab), protocol=5)
            _relink(st, tab)  # _detached takes the shared parts out of the live state: put them back
            return blob, st.learning
        stored = self.store.get(_store_key(key))
        if stored is None:
            return None
        return stored, key[1] in tab.stored_learning

    def preload(self, items: Iterable[tuple[tuple[str, str], bytes, bool]]) -> int:
        """Put checkpointed model sets (key, blob, learning) in the store, where an agent's first event finds
        them; a key whose model set is in memory keeps it (it is at least as recent). Returns how many were put.

        The blobs are unpickled: only checkpoints this engine's code wrote, read from a trusted (signed) source.
        """
        put: dict[str, bytes] = {}
        for key, blob, learning in items:
            tab = self.tables.get(key[0])
            if tab is None or key in self.states:
                continue
            put[_store_key(key)] = blob
            if learning:
                tab.stored_learning.add(key[1])
            else:
                tab.stored_learning.discard(key[1])
        many = getattr(self.store, "put_many", None)
        if many is not None:
            many(put.items())  # one transaction for the lot (stream.modelstore.ModelStore)
        else:
            self.store.update(put)
        return len(put)

    def forget(self, agent_ids: Iterable[str]) -> int:
        """Drop every model set of these agents from memory and the store (their partition moved to another
        worker, which restores them from their checkpoints). Returns how many model sets were dropped."""
        dropped = 0
        for agent in agent_ids:
            for name, tab in self.tables.items():
                key = (name, agent)
                st = self.states.pop(key, None)
                if st is not None:
                    dropped += 1
                    if st.learning:
                        tab.learning -= 1
                skey = _store_key(key)
                if self.store.get(skey) is not None:
                    del self.store[skey]
                    dropped += st is None
                tab.stored_learning.discard(agent)
                if self.dirty is not None:
                    self.dirty.pop(key, None)
        return dropped

    def table_version(self, name: str) -> int:
        """Grows whenever the table's shared models learn: a table checkpoint is due when it has changed."""
        tab = self.tables[name]
        return sum(p.population_n[0] for p in tab.plans) + tab.known.n + _traffic_n(tab)

    def table_checkpoint(self, name: str) -> bytes:
        """The table's population models and categorical values (what every agent's model set links to)."""
        tab = self.tables[name]
        pops = [
            (i, p.name, p.population, p.population_n[0], p.population_first_us, p.population_seen)
            for i, p in enumerate(tab.plans)
            if p.population is not None
        ]
        # The traffic counts (rhythm) only where the table has them: without, the blob is what older workers read.
        traffics = _traffics(tab)
        state = (pops, tab.known, tab.last_us, traffics) if traffics else (pops, tab.known, tab.last_us)
        return pickle.dumps(state, protocol=5)

    def restore_table(self, name: str, blob: bytes) -> bool:
        """Take a table checkpoint's population models and values if this engine's are colder (it has learned
        fewer writes) and none of the table's model sets is in memory (they link to the models replaced)."""
        tab = self.tables.get(name)
        if tab is None or any(k[0] == name for k in self.states):
            return False
        pops, known, last_us, *rest = pickle.loads(blob)  # noqa: S301 - a verified checkpoint of this code (preload)
        traffics: list[tuple[int, str, TableTraffic]] = rest[0] if rest else []  # none in older checkpoints
        theirs = sum(n for _, _, _, n, _, _ in pops) + known.n if isinstance(known, TableValues) else -1
        theirs += sum(t.n for _, _, t in traffics)
        if theirs <= self.table_version(name):
            return False
        for i, pname, pop, n, first, seen in pops:
            if i >= len(tab.plans) or tab.plans[i].name != pname:
                continue  # the table's detectors changed since: that plan starts afresh
            plan = tab.plans[i]
            if plan.population is None or type(pop) is not type(plan.population):
                continue
            plan.population, plan.population_n[0], plan.population_first_us, plan.population_seen = pop, n, first, seen
        _restore_traffics(tab, traffics)
        for attr in TableValues.__slots__:
            setattr(tab.known, attr, getattr(known, attr))  # in place: the plans' factories hold this object
        tab.last_us = max(tab.last_us, last_us)
        return True

    def learn(self, ch: Change) -> int:
        """Learn-only (``writeguard learn``): score and learn ``ch`` as :meth:`process` does, but alert nobody:
        no quarantine is kept and no incident stays open, so later writes are learned and a live worker that
        restores the model set alerts an ongoing incident afresh. Returns how many findings were dropped.

        >>> from detectors.spec import TableSpec, FeatureSpec, Learning, ZScoreSpec
        >>> spec = TableSpec(name="public.refunds", topic="shop.public.refunds",
        ...                  features=(FeatureSpec(name="amount", column="amount", transform="log"),),
        ...                  detectors=(ZScoreSpec(warmup=5),), learning=Learning(writes=0, seconds=0))
        >>> eng = Engine([spec])
        >>> def ch(i: int, amount: float) -> Change:
        ...     return Change("public.refunds", "c", "a1", None, {"amount": amount}, i, KafkaCoords("t", 0, i))
        >>> _ = [eng.learn(ch(i, 10.0 + i % 3)) for i in range(30)]
        >>> [eng.learn(ch(30 + i, 1e6)) for i in range(3)], eng.quarantined
        ([0, 1, 1], {})
        """
        findings = self.process(ch)
        if findings:
            self.quarantined.pop(ch.agent_id, None)
            st = self.states.get((ch.table, ch.agent_id))
            if st is not None:
                st.open = st.lopen = 0
        return len(findings)

    def table(self, name: str) -> _Table | None:
        return self.tables.get(name)

    def process(self, ch: Change, scores: list[tuple[str, float]] | None = None) -> list[Finding]:
        """Score ``ch`` with every detector of its table, then learn from it; return alert decisions."""
        tab = self.tables[ch.table]
        if ch.op == "m":
            return self._mismatch(tab, ch)
        agent = ch.agent_id
        key = (ch.table, agent)
        st = self._state(tab, key)
        if self.dirty is not None:
            self.dirty[key] = None
        st.n += 1
        now = ch.commit_ts_us
        if st.n == 1:
            st.first_us = now
        if now > tab.last_us:
            tab.last_us = now
        if st.learning and st.n >= tab.learn_writes and now - st.first_us >= tab.learn_us:
            st.learning = False
            tab.learning -= 1
        x = ch.x
        snapshot = ch.snapshot
        w = Write(x, ch.op, now / 1e6, ch.categories, ch.idempotency_key, ch.tx_id, agent)
        quarantine = self.quarantined.get(agent)
        findings: list[Finding] = []
        value_anomaly = False
        any_anomaly = False
        # Once per change, for every detector: local names instead of attribute look-ups in the loop.
        plans = tab.plans
        dets = st.dets
        masks = st.masks
        for i, p in enumerate(plans):
            det = dets[i]
            scope = "agent"
            limit = p.threshold
            if p.learned:
                if not x:
                    continue
                if det.n < p.warmup:
                    population = p.population
                    if population is None or not p.population_ready():
                        continue
                    det, scope, limit = population, "population", p.population_threshold
            score = det.score_one(w)
            if scores is not None:
                scores.append((p.name, score))
            anomalous = score >= limit and not snapshot
            if p.table_scope:
                if self._table_wide(tab, p, ch, w, det, score, anomalous, st.n, findings):
                    any_anomaly = True
                continue
            mask = ((masks[i] << 1) | anomalous) & p.nmask
            masks[i] = mask
            if not anomalous:
                if mask == 0:
                    bit = 1 << i
                    # A quarantined agent keeps its incidents open: late, out-of-order normal events from other
                    # CDC partitions must not close them and re-alert on the same burst.
                    if not (st.open & bit and quarantine is not None):
                        st.open &= ~bit
                        if st.recent is not None and st.recent[i]:
                            st.recent[i].clear()  # a lone outlier long ago is not part of a later incident
                continue
            bit = 1 << i
            any_anomaly = True
            value_anomaly = value_anomaly or p.learned
            if st.recent is None:
                st.recent = [[] for _ in plans]
            recent = st.recent[i]
            recent.append(Trigger(ch.coords, now, score, w if p.keep_write else None))
            if len(recent) > 64:
                del recent[0]
            if mask.bit_count() < p.k:
                continue
            learning = p.learns and score < p.ceiling
            if learning:
                if scope == "population":
                    learning = p.population_learning(now)
                else:
                    learning = p.learning(st.n, st.first_us, now)
            # An incident opened while the model learned is alerted again once a full finding may be made.
            if st.open & bit and (learning or not st.lopen & bit):
                continue
            if self.suppressions and self.suppressed_by(ch, p.name) is not None:
                # Planned work: scored and counted, never alerted on. The incident stays closed, so an anomaly
                # that goes on after the window is alerted then.
                self.suppressed += 1
                continue
            st.open |= bit
            if learning:
                st.lopen |= bit
            else:
                st.lopen &= ~bit
            findings.append(
                self._finding(tab, p, ch, w, det, scope, score, list(recent), st.n, quarantine, learning=learning)
            )
        if quarantine is not None:
            quarantine.events_after += 1
            quarantine.anomalous_after += any_anomaly
        learn_values = bool(x) and not value_anomaly and quarantine is None
        for i, p in enumerate(plans):
            if not p.learned:
                if not snapshot:  # a snapshot replays history: those rows were not written just now
                    dets[i].learn_one(w)
            elif learn_values:
                dets[i].learn_one(w)
                population = p.population
                if population is not None:
                    population.learn_one(w)
                    p.population_n[0] += 1
                    if p.population_first_us is None:
                        p.population_first_us = now
                    if len(p.population_seen) < p.population_agents:
                        p.population_seen.add(agent)
        if st.open and tab.regime and quarantine is None:
            self._regime(tab, st, ch, findings)
        return findings

    def _regime(self, tab: _Table, st: _AgentState, ch: Change, findings: list[Finding]) -> None:
        """Regime changes. A model does not learn the writes it finds anomalous, so after a lasting, legitimate
        shift that nobody quarantined (a warning or an info finding) its incident would stay open and
        the agent would never be judged again. Once an incident has stayed open for the plan's ``regime`` writes of
        the agent with no quarantine, say so (one info alert, the level before and after) and re-baseline."""
        if ch.agent_id in self.quarantined:  # quarantined by this very write
            return
        held = getattr(st, "held", None)  # a checkpoint from before regime changes has no such slot
        if held is None:
            held = st.held = {}
        for i, p in enumerate(tab.plans):
            if not p.regime:
                continue
            bit = 1 << i
            # An incident opened while learning is not a regime: it is alerted in full when the period ends (a rogue
            # from a deployment's first day must not become the agent's normal by going on long enough).
            if not st.open & bit or st.lopen & bit:
                held.pop(i, None)
                continue
            since = held.get(i)
            if since is None or since[1] != st.n - 1:  # newly open, or closed (or quarantined) in between
                since = held[i] = [st.n, st.n]
            since[1] = st.n
            if st.n - since[0] + 1 >= p.regime:
                del held[i]
                f = self._rebaseline(tab, p, i, st, ch)
                if self.suppressions and self.suppressed_by(ch, f.detector) is not None:
                    self.suppressed += 1
                else:
                    findings.append(f)

    def _rebaseline(self, tab: _Table, p: _Plan, i: int, st: _AgentState, ch: Change) -> Finding:
        """Restart detector ``i``'s model of the agent from the writes of its open incident, close the incident,
        and return the info finding that says so."""
        recent = st.recent[i] if st.recent is not None else []
        triggers = list(recent)
        writes = [t.write for t in triggers if t.write is not None and t.write.x]
        old = st.dets[i]
        before = old.levels() if isinstance(old, ZScore | Cusum) else {}
        if p.learned:
            new = p.make()
            if isinstance(new, ZScore) and isinstance(p.population, ZScore):
                new.prior = p.population
            for w in writes:
                new.learn_one(w)
            st.dets[i] = new
        elif isinstance(old, Cusum):
            old.restart(writes)
        after = median_levels(writes)
        if isinstance(old, Cusum):
            after = {k: v for k, v in after.items() if k == old.feature}
        bit = 1 << i
        st.open &= ~bit
        st.lopen &= ~bit
        st.masks[i] = 0
        recent.clear()
        name = f"{p.name}.regime"
        return Finding(
            alert_id=alert_id(ch.table, ch.agent_id, name, ch.coords),
            table=ch.table,
            agent_id=ch.agent_id,
            run_id=ch.run_id,
            detector=name,
            kind=p.kind,
            scope="agent",
            severity="info",
            score=float(p.regime),  # writes the incident stayed open ...
            threshold=float(p.regime),  # ... out of those that make a new regime
            contributions=regime_shift(before, after, p.regime)[:5],
            triggers=triggers or [Trigger(ch.coords, ch.commit_ts_us, 1.0)],
            actions=("alert",),  # telling, never stopping: the agent was judged all along and nobody stopped it
            quarantine=False,
            commit_ts_us=ch.commit_ts_us,
            agent_events=st.n,
        )

    def _table_wide(
        self,
        tab: _Table,
        p: _Plan,
        ch: Change,
        w: Write,
        det: Detector,
        score: float,
        anomalous: bool,
        n: int,
        findings: list[Finding],
    ) -> bool:
        """A table-wide ceiling: one incident per table, whichever (fresh) ids the writes carry."""
        if not anomalous and isinstance(det, TableCeiling) and not det.counts(w):
            # An insert amid a delete burst says nothing about the burst: only writes the ceiling counts may close
            # its incident (the changes topic's partitions interleave the agents' writes in any order).
            return False
        p.table_mask = ((p.table_mask << 1) | anomalous) & p.nmask
        if not anomalous:
            if p.table_mask == 0:
                p.table_open = False
            return False
        if p.table_open or p.table_mask.bit_count() < p.k:
            return True
        if self.suppressions and self.suppressed_by(ch, p.name) is not None:
            self.suppressed += 1
            return True
        p.table_open = True
        f = self._finding(tab, p, ch, w, det, "table", score, [Trigger(ch.coords, ch.commit_ts_us, score)], n, None)
        findings.append(f)
        return True

    def _mismatch(self, tab: _Table, ch: Change) -> list[Finding]:
        """The router's finding on an op ``m`` Change, once per open incident: the database named ``ch.agent_id``
        where the writer claimed ``ch.claimed``, or the guard rails refused the agent ``ch.refused``."""
        name = GUARD_REFUSAL if ch.refused is not None else IDENTITY_MISMATCH
        key = (ch.table, ch.agent_id, name, ch.refused or ch.claimed or "")
        if key in self._mismatches:
            return []
        self._mismatches[key] = None
        while len(self._mismatches) > 10_000:  # bounded, whatever the writers claim
            del self._mismatches[next(iter(self._mismatches))]
        p = _Plan(
            name=name,
            kind=name,
            severity="critical",
            threshold=1.0,
            population_threshold=1.0,
            warmup=0,
            k=1,
            nmask=1,
            learned=False,
            make=lambda: _NO_DETECTOR,
            population=None,
            shared=None,
        )
        w = Write({}, "m", ch.commit_ts_us / 1e6, None, None, None, ch.agent_id)
        st = self._held(tab, (ch.table, ch.agent_id))
        trig = [Trigger(ch.coords, ch.commit_ts_us, 1.0)]
        n = st.n if st is not None else 0
        return [self._finding(tab, p, ch, w, _NO_DETECTOR, "agent", 1.0, trig, n, self.quarantined.get(ch.agent_id))]

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
        learning: bool = False,
    ) -> Finding:
        name = p.name if scope != "population" else f"{p.name}.population"
        severity = p.severity
        if learning and SEVERITY_RANK[severity] > SEVERITY_RANK["warning"]:
            severity = "warning"
        actions = tab.spec.actions.get(p.severity, ("alert",))  # type: ignore[call-overload]
        if learning:
            # A model still learning has not seen enough to take an agent's writes away: it only tells.
            actions = ("alert",)
        elif scope == "table" or is_reserved(ch.agent_id):
            # No single agent is to blame for a table-wide ceiling, and a reserved identity is no agent's role:
            # quarantining the writer at hand (or the role "<unattributed>") would stop the wrong party.
            actions = ("alert",)
        aid = alert_id(ch.table, ch.agent_id, name, ch.coords)
        # Read the live state: two detectors firing on one event must quarantine once.
        quarantining = not QUARANTINING.isdisjoint(actions)
        current = self.quarantined.get(ch.agent_id)
        quarantines = quarantining and current is None
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
            severity=severity,
            score=score,
            threshold=p.threshold if scope == "agent" else p.population_threshold,
            contributions=det.explain(w)[:5],
            triggers=triggers,
            actions=tuple(actions),
            quarantine=quarantines,
            commit_ts_us=ch.commit_ts_us,
            agent_events=n,
            claimed=ch.claimed if ch.op == "m" else None,
            refused=ch.refused if ch.op == "m" else None,
            learning=learning,
            requarantine=quarantining and current is not None and current.alert_id == aid,
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
            for k in [k for k in self._mismatches if k[1] == agent_id]:
                del self._mismatches[k]
            lifted = alert_id or (q.alert_id if q is not None else None)
            if lifted is not None:
                self._released[agent_id] = lifted
            # A released agent starts with a clean slate: if it misbehaves again, it is alerted again.
            for name, tab in self.tables.items():
                st = self._held(tab, (name, agent_id))
                if st is None:
                    continue
                if self.dirty is not None:
                    self.dirty[(name, agent_id)] = None
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
                st.lopen = 0
                st.masks = [0] * len(st.masks)
                st.recent = None
                st.held = None

    def suppressed_by(self, ch: Change, detector: str) -> Suppression | None:
        t = ch.commit_ts_us / 1e6
        for s in self.suppressions:
            if s.covers(ch.table, ch.agent_id, detector, t):
                return s
        return None

    @property
    def active_models(self) -> int:
        return len(self.states)

    def learning_models(self) -> Mapping[str, int]:
        """Model sets still in their learning period, by table: agents' (until their next write after it ends,
        in memory or checkpointed) and the table's population models."""
        counts: dict[str, int] = {}
        for name, tab in self.tables.items():
            pops = sum(
                1
                for p in tab.plans
                if p.population is not None
                and p.learns
                and (not p.population_ready() or p.population_learning(tab.last_us))
            )
            counts[name] = tab.learning + len(tab.stored_learning) + pops
        return counts

    def models_by_table(self) -> Mapping[str, int]:
        counts: dict[str, int] = dict.fromkeys(self.tables, 0)
        for table, _ in self.states:
            counts[table] += 1
        return counts


def max_severity(findings: list[Finding]) -> str | None:
    if not findings:
        return None
    return max(findings, key=lambda f: SEVERITY_RANK[f.severity]).severity
