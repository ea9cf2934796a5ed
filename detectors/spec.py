"""Per-table detection settings, as they appear under ``tables:`` in the YAML config.

``stream.config`` reads the file into these models. Each detector spec builds its own detector
(:meth:`build`) and says how the engine turns that detector's scores into alerts (:meth:`scoring`), so
``detectors.engine`` needs no list of kinds. Field names follow Debezium's vocabulary (``before``/``after``,
op codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from detectors.models import (
    CategoricalNovelty,
    Cusum,
    Detector,
    DuplicateKey,
    LevelDrift,
    OpBurstCeiling,
    OpHabit,
    OpMix,
    RateCeiling,
    Rhythm,
    RiverModel,
    Rule,
    TableTraffic,
    TableValues,
    Volume,
    ZScore,
)
from detectors.strict import Strict
from detectors.write import RowOp

Severity = Literal["info", "warning", "critical"]
# "postgres" (revoke the agent's role's writes) and "webhook" (call the orchestrator's pause endpoint) are
# enforcement on top of "quarantine" and imply it.
Action = Literal["alert", "quarantine", "postgres", "webhook"]
QUARANTINING: frozenset[str] = frozenset({"quarantine", "postgres", "webhook"})
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}


class FieldPath(Strict):
    """Where a value lives in a change event: ``after.agent_id``, ``before.meta.run``, or ``row.agent_id``.

    ``row`` means the row image that exists: ``after`` for c/u/r, ``before`` for d.
    """

    image: Literal["row", "after", "before"]
    keys: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> FieldPath:
        image, _, rest = text.partition(".")
        if image not in ("row", "after", "before") or not rest:
            raise ValueError(f"field path must look like 'after.column' (row/after/before), got {text!r}")
        return cls(image=image, keys=tuple(rest.split(".")))


class FeatureSpec(Strict):
    """One numeric feature taken from a column of the row image."""

    name: str = Field(description="Feature name, as it appears in alerts.")
    column: str = Field(description="Column in the row image (dots reach into JSON objects).")
    transform: Literal["none", "log"] = Field(
        "none", description="'log' = sign(x)*log1p(|x|): money and counts are heavy-tailed."
    )
    delta: bool = Field(
        False,
        description="Use after - before on updates instead of the value; an update that leaves the column "
        "unchanged has no such feature.",
    )
    relative: bool = Field(
        False,
        description="On updates, how many times the value was multiplied: sign(x)*log1p(|x|) of after minus that "
        "of before, about log(after/before) for values well above 1, defined at 0 and across signs; a x10 raise "
        "is 2.3 whatever the row's size. An update that leaves the column unchanged has no such feature.",
    )
    divide_by: str | None = Field(
        None, description="Another column to divide by, e.g. total / items = a unit price (skipped when 0)."
    )
    ops: tuple[RowOp, ...] = Field(("c", "u", "r", "d"), description="Ops whose row image gives this feature.")

    @model_validator(mode="after")
    def _one_kind(self) -> FeatureSpec:
        if self.relative and (self.delta or self.divide_by is not None or self.transform != "none"):
            raise ValueError("relative: already a log ratio; it takes no delta, divide_by or transform")
        return self


class Debounce(Strict):
    """Alert only when ``k`` of the agent's last ``n`` scored events were anomalous."""

    k: int = Field(2, ge=1)
    n: int = Field(4, ge=1, le=64)

    @model_validator(mode="after")
    def _k_le_n(self) -> Debounce:
        if self.k > self.n:
            raise ValueError("debounce.k must be <= debounce.n")
        return self


class Learning(Strict):
    """A model's learning period: until both have passed, its findings only warn (``learning: true``).

    The defaults cover a daily cycle: 200 writes give a few hundred values to estimate from, and 24 hours of
    commit time since the model's first write mean it has seen a night, a morning peak and any nightly job
    before it may quarantine anyone. ``{writes: 0, seconds: 0}`` turns it off.
    """

    writes: int = Field(200, ge=0, description="Writes the model set must have learned from.")
    seconds: float = Field(86_400.0, ge=0, description="Commit time since the model's first write.")


# A guard's incident stays open until 16 writes in a row are back under its limit.
_GUARD_DEBOUNCE = Debounce(k=1, n=16)


@dataclass(frozen=True, slots=True)
class Scoring:
    """How the engine turns one detector's scores into alerts. The defaults are a deterministic guard's."""

    threshold: float = 1.0  # a score at or above it is anomalous
    debounce: Debounce = _GUARD_DEBOUNCE
    # A model of the agent's normal values: scored once it has learned ``warmup`` writes, and it learns only
    # from writes that no value model found anomalous, while the agent is not quarantined.
    learned: bool = False
    warmup: int = 0
    population: bool = False  # agents still in warm-up are scored against one model of the whole table
    population_threshold: float | None = None  # defaults to threshold
    per_table: bool = False  # one detector for the whole table, shared by its agents, instead of one per agent
    # A statistical detector (it judges against what it learned): its findings only warn during its learning
    # period. Deterministic guards (ceilings, rules, duplicates) leave it False and keep their full severity.
    learns: bool = False
    # Scores at or above it come from the detector's hard ceiling (volume max_events, op_mix max_rows_per_tx):
    # deterministic, so full severity even while the rest of the detector learns.
    ceiling: float | None = None
    learning: Learning | None = None  # the detector's own learning period; None: its table's
    population_agents: int = 0  # the population model judges no one before it has learned from this many agents
    population_writes: int = 0  # ... and this many writes
    prior_writes: float = 0.0  # n0: weight, in writes, of the population's spread in an agent's own zscore
    # Regime change: after an incident of this detector has stayed open for this many of the agent's writes with
    # no quarantine, the engine says so (an info alert) and re-baselines the agent's model from its recent writes.
    regime_writes: int | None = None


# Writes with an incident open and no quarantine before a statistical model accepts the shift as the agent's new
# regime: long enough that a person has seen the warning, short enough that the agent is not left unjudged long.
_REGIME_WRITES = 50
_REGIME_DESCRIPTION = (
    "Regime change: when an incident of this detector has stayed open for this many of the agent's writes and the "
    "agent is not quarantined (a warning or info finding, not one opened while learning), publish one info alert "
    "'<name>.regime' with the level before and after, and re-baseline the agent's model from the incident's "
    "writes, so that it is judged against its new normal. null: never (the incident stays open)."
)


class _DetectorBase(Strict):
    name: str | None = Field(None, description="Defaults to the kind; must be unique per table.")
    severity: Severity = "critical"

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        """A new detector of this kind for one agent of ``table`` (``known``: the table's categorical values)."""
        raise NotImplementedError

    def scoring(self) -> Scoring:
        return Scoring()

    def conflict(self, table: TableSpec) -> str | None:
        """Why this detector cannot judge ``table`` (a column or feature it names is not there), or None."""
        return None

    def table_wide(self) -> Self | None:
        """The table-wide twin of this detector (one instance over all agents), when it has a table limit."""
        return None

    def table_traffic(self) -> TableTraffic | None:
        """The table's shared traffic counts that this kind's detectors judge against (one per table), if any."""
        return None


class _CeilingBase(_DetectorBase):
    table_max_events: int | None = Field(
        None,
        ge=1,
        description="Also a ceiling over all agents of the table together (detector '<name>.table'), so that "
        "spreading writes over fresh agent ids does not escape it. Its alert names the top agents; it "
        "quarantines no one.",
    )

    def table_wide(self) -> Self | None:
        if self.table_max_events is None:
            return None
        name = f"{self.name or getattr(self, 'kind', '')}.table"
        return self.model_copy(update={"name": name, "max_events": self.table_max_events, "table_max_events": None})


def _unknown_features(name: str, wanted: tuple[str, ...] | None, table: TableSpec) -> str | None:
    feats = {f.name for f in table.features}
    missing = [f for f in wanted or () if f not in feats]
    return f"detector {name!r} names unknown features {missing}" if missing else None


class ZScoreSpec(_DetectorBase):
    """Per-feature running mean/variance (River ``stats.Var``), the default value model."""

    kind: Literal["zscore"] = "zscore"
    features: tuple[str, ...] | None = Field(None, description="Feature names; all features by default.")
    threshold: float = Field(0.7, gt=0, lt=1, description="Score in [0,1]; 0.7 is |z| >= 9.3 at half_z=4.")
    half_z: float = Field(4.0, gt=0, description="The |z| that maps to score 0.5 (score = z/(z+half_z)).")
    min_std: float = Field(0.05, gt=0, description="Std floor in transformed units, for features that never vary.")
    warmup: int = Field(30, ge=2, description="Events of this agent before its own model may alert.")
    debounce: Debounce = Debounce()
    population: bool = Field(True, description="Score agents in warm-up against the table's population model.")
    population_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Threshold for the population model (default: threshold). Agents differ more from each other "
        "than from themselves, so a first-day rogue may need a lower one.",
    )
    population_agents: int = Field(
        20, ge=1, description="Agents the population model must have learned from before it judges anyone."
    )
    population_writes: int = Field(
        200,
        ge=1,
        description="Writes the population model must have learned from before it judges anyone. Its findings "
        "stay learning warnings for its learning period, so a small number only lets it warn early; an agent already "
        "rogue when writeguard starts is judged by it alone.",
    )
    prior_writes: float = Field(
        30.0,
        ge=0,
        description="n0: an agent's own variance is shrunk toward the fleet's typical within-agent variance "
        "with weight n0/(n0+n), so that a range learned from few writes is not narrower than the data warrants.",
    )
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")
    regime_writes: int | None = Field(_REGIME_WRITES, ge=1, description=_REGIME_DESCRIPTION)

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        # The warm-up counts per feature too: one seen only on some ops (an update's delta) is scored later.
        return ZScore(
            self.features,
            log_features=table.log_features(),
            half_z=self.half_z,
            min_std=self.min_std,
            min_count=self.warmup,
            prior_writes=self.prior_writes,
        )

    def scoring(self) -> Scoring:
        return Scoring(
            threshold=self.threshold,
            debounce=self.debounce,
            learned=True,
            warmup=self.warmup,
            population=self.population,
            population_threshold=self.population_threshold,
            learns=True,
            learning=self.learning,
            population_agents=self.population_agents,
            population_writes=self.population_writes,
            prior_writes=self.prior_writes,
            regime_writes=self.regime_writes,
        )

    def conflict(self, table: TableSpec) -> str | None:
        return _unknown_features(detector_name(self), self.features, table)


class RiverModelSpec(_DetectorBase):
    """Any River anomaly model by name, e.g. ``anomaly.HalfSpaceTrees`` with ``params``."""

    kind: Literal["river"] = "river"
    model: str = Field("anomaly.HalfSpaceTrees", description="Name under river, e.g. 'anomaly.OneClassSVM'.")
    params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    scaler: Literal["minmax", "standard", "none"] = Field(
        "minmax", description="HalfSpaceTrees assumes features in [0,1]; minmax gets them there online."
    )
    features: tuple[str, ...] | None = None
    threshold: float = Field(0.9, gt=0)
    warmup: int = Field(100, ge=1)
    debounce: Debounce = Debounce()
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")
    regime_writes: int | None = Field(_REGIME_WRITES, ge=1, description=_REGIME_DESCRIPTION)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from river import anomaly

        module, _, name = v.partition(".")
        if module != "anomaly" or not name.isidentifier() or not isinstance(getattr(anomaly, name, None), type):
            raise ValueError(f"model must be 'anomaly.<ClassName>' of a River anomaly model, got {v!r}")
        return v

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        return RiverModel(self.model, self.params, self.scaler, self.features, table.log_features())

    def scoring(self) -> Scoring:
        return Scoring(
            threshold=self.threshold,
            debounce=self.debounce,
            learned=True,
            warmup=self.warmup,
            learns=True,
            learning=self.learning,
            regime_writes=self.regime_writes,
        )

    def conflict(self, table: TableSpec) -> str | None:
        return _unknown_features(detector_name(self), self.features, table)


class RateSpec(_CeilingBase):
    """Hard ceiling on an agent's writes per window of commit time; covers agents from their first write."""

    kind: Literal["rate"] = "rate"
    max_events: int = Field(ge=1)
    window_seconds: float = Field(60.0, gt=0)

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        g = RateCeiling(self.max_events, self.window_seconds)
        return g


class OpBurstSpec(_CeilingBase):
    """Hard ceiling on destructive ops (deletes, truncates) per window; a truncate alone fires it."""

    kind: Literal["op_burst"] = "op_burst"
    ops: tuple[RowOp, ...] = ("d", "t")
    max_events: int = Field(ge=1)
    window_seconds: float = Field(60.0, gt=0)

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        g = OpBurstCeiling(self.max_events, self.window_seconds, self.ops)
        return g


class NoveltySpec(_DetectorBase):
    """A value of a categorical column never seen before for this agent (after its warm-up) or this table."""

    kind: Literal["novelty"] = "novelty"
    columns: tuple[str, ...] = Field(min_length=1, description="Columns listed in the table's 'categories'.")
    warmup: int = Field(30, ge=1, description="Writes of an agent before its own unseen values count.")
    table_scope: bool = Field(True, description="A value the whole table never saw counts from the first write.")
    agent_scope: bool = Field(
        True, description="A value this agent never used counts after its warm-up (noisy for long-tailed columns)."
    )
    max_values: int = Field(256, ge=1, description="Values remembered per column and agent (memory bound).")
    severity: Severity = "warning"
    debounce: Debounce = Debounce(k=1, n=16)
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        return CategoricalNovelty(
            self.columns,
            warmup=self.warmup,
            known=known,
            table_scope=self.table_scope,
            max_values=self.max_values,
            agent_scope=self.agent_scope,
        )

    def scoring(self) -> Scoring:
        return Scoring(debounce=self.debounce, learns=True, learning=self.learning)

    def conflict(self, table: TableSpec) -> str | None:
        bad = [c for c in self.columns if c not in table.categories]
        return f"detector {detector_name(self)!r}: columns {bad} are not in the table's categories" if bad else None


class DuplicateSpec(_DetectorBase):
    """The same idempotency key applied again within a horizon: a retried tool call whose effect landed twice."""

    kind: Literal["duplicate"] = "duplicate"
    horizon_seconds: float = Field(3600.0, gt=0)
    max_keys: int = Field(200_000, ge=1, description="Keys remembered per table (memory bound, oldest first).")
    ops: tuple[RowOp, ...] = Field(("c",), description="Ops whose key counts: a retry re-creates.")
    debounce: Debounce = Debounce(k=2, n=8)

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        return DuplicateKey(self.horizon_seconds, self.max_keys, self.ops)

    def scoring(self) -> Scoring:
        # Keys are unique per effect, whichever agent wrote them: a retry by another agent is a duplicate too.
        return Scoring(debounce=self.debounce, per_table=True)

    def conflict(self, table: TableSpec) -> str | None:
        if table.idempotency_key is None:
            return f"detector {detector_name(self)!r} needs the table's idempotency_key column"
        return None


class DriftSpec(_DetectorBase):
    """A change in a feature's level over time (River ADWIN), for slow drifts no single write shows."""

    kind: Literal["drift"] = "drift"
    feature: str
    delta: float = Field(0.002, gt=0, lt=1, description="ADWIN's confidence: smaller is more conservative.")
    warmup: int = Field(100, ge=1)
    severity: Severity = "info"
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        return LevelDrift(self.feature, self.delta, self.warmup, log=self.feature in table.log_features())

    def scoring(self) -> Scoring:
        return Scoring(learns=True, learning=self.learning)

    def conflict(self, table: TableSpec) -> str | None:
        if self.feature not in {f.name for f in table.features}:
            return f"detector {detector_name(self)!r} names unknown feature {self.feature!r}"
        return None


class CusumSpec(_DetectorBase):
    """A sustained shift of one feature (two-sided CUSUM on the agent's standardised values): many writes a few
    standard deviations off, none of them extreme on its own."""

    kind: Literal["cusum"] = "cusum"
    feature: str
    k: float = Field(1.0, gt=0, description="Allowance in standard deviations: shifts above about 2k are sought.")
    h: float = Field(10.0, gt=0, description="Decision level: the summed excess that alerts.")
    warmup: int = Field(30, ge=2, description="The agent's writes with the feature before it may alert.")
    rebase: int = Field(
        200, ge=1, description="Writes in a row past h after which the shift is the agent's new level (re-baseline)."
    )
    reference_writes: int | None = Field(
        None,
        ge=2,
        description="Freeze the reference after this many writes (null: it keeps learning the writes under h/2). "
        "A slow cusum (k: 0.25, a high h, info) against a frozen reference sums a drift of a few percent an hour "
        "that a learning reference would follow.",
    )
    ops: tuple[RowOp, ...] | None = Field(
        None,
        description="Only these ops' values are summed (all by default). ['c'] for a table whose updates re-report "
        "rows written before: repeats of one row are not independent writes and make a slow sum wander.",
    )
    severity: Severity = "critical"
    debounce: Debounce = Debounce(k=1, n=16)
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")
    regime_writes: int | None = Field(_REGIME_WRITES, ge=1, description=_REGIME_DESCRIPTION)

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        log = self.feature in table.log_features()
        return Cusum(
            self.feature,
            self.k,
            self.h,
            self.warmup,
            log=log,
            rebase=self.rebase,
            reference=self.reference_writes,
            ops=self.ops,
        )

    def scoring(self) -> Scoring:
        return Scoring(
            threshold=1.0,
            debounce=self.debounce,
            learns=True,
            learning=self.learning,
            regime_writes=self.regime_writes,
        )

    def conflict(self, table: TableSpec) -> str | None:
        if self.feature not in {f.name for f in table.features}:
            return f"detector {detector_name(self)!r} names unknown feature {self.feature!r}"
        return None


class VolumeSpec(_DetectorBase):
    """An agent's writes per window against its own learned baseline, with an optional hard ceiling."""

    kind: Literal["volume"] = "volume"
    window_seconds: float = Field(60.0, gt=0)
    warmup: int = Field(30, ge=1, description="Windows of the agent's history before it may alert.")
    threshold: float = Field(0.7, gt=0, lt=1, description="Score z/(z+half_z); 0.7 is z >= 9.3.")
    half_z: float = Field(4.0, gt=0)
    alpha: float = Field(0.05, gt=0, le=1, description="Weight of each closed window in the baseline.")
    max_events: int | None = Field(None, ge=1, description="Hard ceiling per window (score 1).")
    daily: bool = Field(
        True,
        description="Also compare each window with the same hour of previous days, and alert only when it stands "
        "out from both: a nightly job is judged by its own previous runs, not by the agent's daytime behaviour.",
    )
    severity: Severity = "warning"
    debounce: Debounce = Debounce()
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        return Volume(self.window_seconds, self.warmup, self.half_z, self.alpha, self.max_events, self.daily)

    def scoring(self) -> Scoring:
        # Volume scores its hard ceiling 1.0 and its baseline's z below 1.
        ceiling = 1.0 if self.max_events is not None else None
        return Scoring(
            threshold=self.threshold, debounce=self.debounce, learns=True, learning=self.learning, ceiling=ceiling
        )


class OpMixSpec(_DetectorBase):
    """Share of destructive ops per window against the agent's usual share; mass changes in one transaction."""

    kind: Literal["op_mix"] = "op_mix"
    ops: tuple[RowOp, ...] = ("d", "u")
    window_seconds: float = Field(60.0, gt=0)
    warmup: int = Field(30, ge=1, description="Windows (of at least min_events writes) before it may alert.")
    min_events: int = Field(10, ge=1, description="Writes a window needs before its share is judged.")
    threshold: float = Field(0.7, gt=0, lt=1)
    half_z: float = Field(4.0, gt=0)
    max_rows_per_tx: int | None = Field(
        None, ge=1, description="Rows one transaction may update or delete before it counts as a mass change."
    )
    daily: bool = Field(
        True,
        description="Also compare each window with the same hour of previous days, and alert only when it stands "
        "out from both: a nightly job is judged by its own previous runs, not by the agent's daytime behaviour.",
    )
    severity: Severity = "critical"
    debounce: Debounce = Debounce(k=1, n=16)
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        return OpMix(
            self.ops,
            self.window_seconds,
            self.warmup,
            self.min_events,
            self.half_z,
            self.max_rows_per_tx,
            daily=self.daily,
        )

    def scoring(self) -> Scoring:
        # A mass change in one transaction scores 1.0 (a guard); the share's z scores below 1 (learned).
        ceiling = 1.0 if self.max_rows_per_tx is not None else None
        return Scoring(
            threshold=self.threshold, debounce=self.debounce, learns=True, learning=self.learning, ceiling=ceiling
        )


class OpHabitSpec(_DetectorBase):
    """Each rare op's count per window against the agent's habit of that op, one op at a time: an agent that
    soft-deletes (updates) and starts to hard-delete, which ``op_mix``'s share of several ops together misses."""

    kind: Literal["op_habit"] = "op_habit"
    ops: tuple[Literal["c", "u", "d", "t"], ...] = Field(
        ("u", "d", "t"),
        description="Ops judged (each keeps its habit either way). Inserts change no existing row, and an agent "
        "whose nightly batch of updates dwarfs its day would find its daytime inserts rare.",
    )
    window_seconds: float = Field(3600.0, gt=0, description="The window whose count of each op is judged.")
    warmup: int = Field(100, ge=1, description="The agent's writes, older than the window, before it may alert.")
    min_count: int = Field(3, ge=1, description="An op's writes in the window before its count is judged.")
    p_value: float = Field(
        2e-5,
        gt=0,
        lt=1,
        description="Anomalous when so many writes of the op in the window have a smaller chance than this under "
        "the agent's habit (score 0.5 at it).",
    )
    max_share: float = Field(
        0.02,
        gt=0,
        le=1,
        description="Only ops the agent uses for less than this share of its writes are judged: a rare op; a common "
        "op's share is op_mix's.",
    )
    prior: float = Field(0.5, gt=0, description="Pseudo-writes per op in the habit (a Dirichlet prior).")
    severity: Severity = "critical"
    debounce: Debounce = Debounce(k=1, n=16)
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        return OpHabit(
            self.window_seconds, self.warmup, self.min_count, self.p_value, self.prior, self.max_share, self.ops
        )

    def scoring(self) -> Scoring:
        # It learns every write (a delete need not carry features); its own warm-up is in writes.
        return Scoring(threshold=0.5, debounce=self.debounce, learns=True, learning=self.learning)


class RhythmSpec(_DetectorBase):
    """An agent's writes in a short and a long window against what this agent does at this hour of the day, scaled
    by how busy its table is now relative to its usual at this hour: a low-rate agent's 10-minute burst stands out,
    a fleet-wide peak (a sale) does not. ``volume``'s hourly baseline absorbs the daily cycle and misses the first,
    and fires on the second."""

    kind: Literal["rhythm"] = "rhythm"
    windows_seconds: tuple[float, ...] = Field(
        (600.0, 3600.0),
        min_length=1,
        description="The windows whose counts are judged, each on its own: a short one alerts within a burst, a "
        "long one sees a steadier excess. They are counted in buckets half the shortest wide, so each covers "
        "between half and all of its length (judged over what it covers).",
    )
    warmup_seconds: float = Field(
        86_400.0, ge=0, description="Commit time since the agent's first write before it may alert: a day's rhythm."
    )
    p_value: float = Field(
        1e-6,
        gt=0,
        lt=1,
        description="Anomalous when a window's count has a smaller chance than this at the agent's usual rate for "
        "this hour and the table's current busyness (score 0.5 at it).",
    )
    dispersion: float = Field(
        4.0,
        gt=0,
        description="The agent's ordinary swing from one day to the next at the same hour, as a Gamma shape on its "
        "rate: 4 is about +-50% (a benign doubling for an hour stays far from p_value); larger is stricter.",
    )
    min_count: int = Field(5, ge=1, description="Writes in a window before its count is judged.")
    prior_seconds: float = Field(
        1_800.0,
        gt=0,
        description="Weight, in seconds of history, of the agent's rate over all hours in an hour's own rate: an "
        "hour seen little borrows the agent's day.",
    )
    memory_days: float = Field(7.0, gt=0, description="How many days of an hour's history its rate mostly reflects.")
    severity: Severity = "warning"
    debounce: Debounce = Debounce(k=1, n=16)
    learning: Learning | None = Field(None, description="This detector's learning period (default: the table's).")

    @field_validator("windows_seconds")
    @classmethod
    def _windows(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(w <= 0 for w in v):
            raise ValueError("windows_seconds must be positive")
        if max(v) > 288 * min(v) / 2:
            raise ValueError("the longest window may span at most 288 buckets of half the shortest")
        return v

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        # The engine links the table's one TableTraffic (table_traffic) into every agent's detector.
        return Rhythm(
            self.windows_seconds,
            self.warmup_seconds,
            self.p_value,
            self.dispersion,
            self.min_count,
            self.prior_seconds,
            self.memory_days,
        )

    def table_traffic(self) -> TableTraffic | None:
        return TableTraffic(min(self.windows_seconds) / 2, self.memory_days)

    def scoring(self) -> Scoring:
        # It learns every write (counts need no features); its own warm-up is in commit time.
        return Scoring(threshold=0.5, debounce=self.debounce, learns=True, learning=self.learning)


class Condition(Strict):
    """``field <op> value``; ``field`` is a feature or a categorical column."""

    field: str
    op: Literal[">", ">=", "<", "<=", "==", "!=", "in", "not in"]
    value: float | str | tuple[float | str, ...]


class RuleSpec(_DetectorBase):
    """A structured condition from the YAML (no code is evaluated), optionally counted over a window."""

    kind: Literal["rule"] = "rule"
    when: tuple[Condition, ...] = ()
    ops: tuple[RowOp, ...] | None = Field(None, description="Only these ops match (all by default).")
    count: int = Field(1, ge=1, description="Fire when at least this many matching writes fall in the window.")
    window_seconds: float = Field(60.0, gt=0)

    def build(self, table: TableSpec, known: TableValues) -> Detector:
        return Rule([(c.field, c.op, c.value) for c in self.when], self.ops, self.count, self.window_seconds)

    def conflict(self, table: TableSpec) -> str | None:
        known = {f.name for f in table.features} | set(table.categories)
        bad = [c.field for c in self.when if c.field not in known]
        return f"detector {detector_name(self)!r}: {bad} are neither features nor categories" if bad else None


AnyDetector = (
    ZScoreSpec
    | RiverModelSpec
    | RateSpec
    | OpBurstSpec
    | NoveltySpec
    | DuplicateSpec
    | DriftSpec
    | CusumSpec
    | RuleSpec
    | VolumeSpec
    | OpMixSpec
    | OpHabitSpec
    | RhythmSpec
)
DetectorSpec = Annotated[AnyDetector, Field(discriminator="kind")]
# Every detector kind, from the union above: the config's error messages need them.
DETECTOR_KINDS: frozenset[str] = frozenset(spec.model_fields["kind"].default for spec in get_args(AnyDetector))


def detector_name(spec: AnyDetector) -> str:
    return spec.name or spec.kind


class Suppression(Strict):
    """A window of planned work: matching anomalies are scored and counted, but not alerted on."""

    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    reason: str
    tables: tuple[str, ...] | None = Field(None, description="All tables when omitted.")
    agents: tuple[str, ...] | None = Field(None, description="All agents when omitted.")
    detectors: tuple[str, ...] | None = Field(None, description="All detectors when omitted.")

    @model_validator(mode="after")
    def _ordered(self) -> Suppression:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("from and to need a time zone, e.g. 2026-11-28T22:00:00Z")
        if self.end <= self.start:
            raise ValueError("'to' must be after 'from'")
        return self

    def covers(self, table: str, agent: str, detector: str, t: float) -> bool:
        base = detector.removesuffix(".population")
        return (
            self.start.timestamp() <= t < self.end.timestamp()
            and (self.tables is None or table in self.tables)
            and (self.agents is None or agent in self.agents)
            and (self.detectors is None or base in self.detectors)
        )


def _default_actions() -> dict[Severity, tuple[Action, ...]]:
    return {"info": ("alert",), "warning": ("alert",), "critical": ("alert", "quarantine")}


class SoftDelete(Strict):
    """A table whose rows are deleted by marking a column: undo then marks or clears it instead of deleting.

    ``timestamp``: NULL means live, a time means deleted (undo sets ``now()``). ``boolean``: false means live.
    """

    column: str = Field(description="The soft-delete column, e.g. 'deleted_at'.")
    kind: Literal["timestamp", "boolean"] = Field("timestamp", description="How the column marks a deleted row.")


class GuardSpec(Strict):
    """The table's guard rails in PostgreSQL (``writeguard guard-sql``): what an agent role may not do to it.

    >>> GuardSpec(max_rows_per_statement=100, max_delete_rows=10).limit("delete"), GuardSpec().limit("update")
    (10, 1000)
    """

    max_rows_per_statement: int | None = Field(
        1000,
        ge=0,
        description="An agent role's UPDATE or DELETE touching more rows than this in one statement is refused "
        "unless its transaction carries a human's approval (`writeguard approve`); null: no limit.",
    )
    max_delete_rows: int | None = Field(None, ge=0, description="DELETE's own limit; default max_rows_per_statement.")
    max_update_rows: int | None = Field(None, ge=0, description="UPDATE's own limit; default max_rows_per_statement.")
    refuse_truncate: bool = Field(True, description="Refuse TRUNCATE by agent roles (no approval allows it).")
    refuse_ddl: bool = Field(
        True,
        description="Refuse DROP and ALTER of the table (and triggers, rules, policies on it) by agent roles.",
    )

    def limit(self, op: Literal["delete", "update"]) -> int | None:
        """The most rows one agent statement of ``op`` may touch without approval; None: no limit."""
        own = self.max_delete_rows if op == "delete" else self.max_update_rows
        return own if own is not None else self.max_rows_per_statement


class TableSpec(Strict):
    """How one watched table is read and judged."""

    name: str = Field(description="'<schema>.<table>' as in Debezium's source block, e.g. 'public.refunds'.")
    topic: str = Field(description="CDC topic, Debezium's '<topic.prefix>.<schema>.<table>'.")
    agent_id: str = Field("row.agent_id", description="Field path of the agent id.")
    run_id: str | None = Field("row.run_id", description="Field path of the run id (optional).")
    features: tuple[FeatureSpec, ...] = ()
    categories: tuple[str, ...] = Field((), description="Categorical columns (compared as text), for novelty.")
    idempotency_key: str | None = Field(None, description="Column holding the write's idempotency key.")
    detectors: tuple[DetectorSpec, ...] = (ZScoreSpec(),)
    actions: dict[Severity, tuple[Action, ...]] = Field(
        default_factory=_default_actions,
        description="What each severity does. Every alert is published; 'quarantine' also stops the agent.",
    )
    key_columns: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="Undo: the columns that identify a row, when the change events' message keys are not available "
        "(a file of message values) or are not the primary key (debezium.key_by_agent).",
    )
    soft_delete: SoftDelete | None = Field(None, description="Undo: the table's soft-delete column, if it has one.")
    learning: Learning = Field(
        default_factory=Learning,
        description="Learning period of the table's statistical models (each agent's, and the population's): "
        "their findings only warn until it has passed. A detector's own 'learning' overrides it.",
    )
    guard: GuardSpec = Field(
        default_factory=GuardSpec,
        description="Guard rails in PostgreSQL for agent roles (`writeguard guard-sql`): TRUNCATE, DROP/ALTER and "
        "UPDATE/DELETE above a row limit are refused. Absent: the defaults.",
    )

    @field_validator("agent_id", "run_id")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None:
            FieldPath.parse(v)
        return v

    @field_validator("name")
    @classmethod
    def _schema_table(cls, v: str) -> str:
        if v.count(".") != 1 or not all(v.split(".")):
            raise ValueError("table name must be '<schema>.<table>'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TableSpec:
        names = [detector_name(d) for d in self.detectors]
        names += [detector_name(w) for d in self.detectors if (w := d.table_wide()) is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be unique per table, got {names}")
        if len({f.name for f in self.features}) != len(self.features):
            raise ValueError("feature names must be unique per table")
        for d in self.detectors:
            if (problem := d.conflict(self)) is not None:
                raise ValueError(problem)
        return self

    def log_features(self) -> frozenset[str]:
        """Features that models compare as sign(x)*log1p(|x|)."""
        return frozenset(f.name for f in self.features if f.transform == "log")
