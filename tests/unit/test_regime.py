"""Regime changes (issue 14, point 5): a lasting shift that nobody quarantined becomes the agent's new normal."""

from __future__ import annotations

import pickle
import random

import pytest
from pydantic import ValidationError

from detectors.engine import Change, Engine, Finding, KafkaCoords
from detectors.spec import CusumSpec, FeatureSpec, Learning, TableSpec, ZScoreSpec
from stream.pipeline import build_alert

TABLE = "public.refunds"
OFF = Learning(writes=0, seconds=0)


def spec(*detectors: ZScoreSpec | CusumSpec, learning: Learning = OFF) -> TableSpec:
    return TableSpec(
        name=TABLE,
        topic="shop.public.refunds",
        features=(FeatureSpec(name="amount", column="amount", transform="log"),),
        detectors=detectors,
        learning=learning,
    )


class Feed:
    """One agent's writes, one a minute, with lognormal amounts around a level that the test moves."""

    def __init__(self, engine: Engine, agent: str = "a1", seed: int = 3) -> None:
        self.engine, self.agent = engine, agent
        self.rng = random.Random(seed)
        self.i = 0
        self.findings: list[Finding] = []

    def write(self, amount: float) -> list[Finding]:
        self.i += 1
        ch = Change(TABLE, "c", self.agent, None, {"amount": amount}, self.i * 60_000_000, KafkaCoords("t", 0, self.i))
        out = self.engine.process(ch)
        self.findings += out
        return out

    def normal(self, n: int, level: float) -> list[Finding]:
        out: list[Finding] = []
        for _ in range(n):
            out += self.write(level * self.rng.lognormvariate(0.0, 0.3))
        return out


def warning_zscore(regime: int | None = 20) -> ZScoreSpec:
    return ZScoreSpec(warmup=20, threshold=0.6, severity="warning", population=False, regime_writes=regime)


def test_a_lasting_warning_shift_is_said_once_and_rebaselined_then_the_agent_is_judged_again() -> None:
    feed = Feed(Engine([spec(warning_zscore(regime=20))]))
    assert feed.normal(300, 40.0) == []
    shift = feed.normal(20, 800.0)  # x20: every write is far outside the learned range (debounce: opens on the 2nd)
    assert [f.detector for f in shift] == ["zscore"]
    assert shift[0].severity == "warning" and not shift[0].quarantine
    # The incident has been open for 20 writes: one info alert, and the model re-baselines on those writes.
    (regime,) = feed.normal(1, 800.0)
    assert (regime.detector, regime.kind, regime.severity, regime.actions) == (
        "zscore.regime",
        "zscore",
        "info",
        ("alert",),
    )
    assert not regime.quarantine and feed.engine.quarantined == {}
    top = regime.contributions[0]
    assert top.feature == "amount level"
    assert top.expected_low is not None and 30.0 < top.expected_low < 55.0  # before: the old level, in money
    assert 600.0 < top.value < 1100.0  # after: the new one
    assert top.text is not None and "from about" in top.text and "20 writes" in top.text
    assert len(regime.triggers) == 21  # the writes it re-baselined on, the incident's first among them
    # The new level is the agent's normal now: nothing more to say about it ...
    assert feed.normal(200, 800.0) == []
    # ... and it is judged against it: a gross write of this agent is caught again.
    again = feed.write(800.0 * 30) + feed.write(800.0 * 30)
    assert [f.detector for f in again] == ["zscore"]


def test_without_regime_changes_the_incident_stays_open_and_a_later_rogue_goes_unsaid() -> None:
    """What the policy fixes: the same stream with regime_writes null."""
    feed = Feed(Engine([spec(warning_zscore(regime=None))]))
    feed.normal(300, 40.0)
    assert [f.detector for f in feed.normal(220, 800.0)] == ["zscore"]
    assert feed.write(800.0 * 30) + feed.write(800.0 * 30) == []  # the open incident swallows it


def test_a_quarantined_agent_is_not_rebaselined() -> None:
    critical = ZScoreSpec(warmup=20, threshold=0.6, severity="critical", population=False, regime_writes=20)
    feed = Feed(Engine([spec(critical)]))
    feed.normal(300, 40.0)
    out = feed.normal(200, 800.0)
    assert [(f.detector, f.quarantine) for f in out] == [("zscore", True)]


def test_an_incident_that_closes_in_between_starts_its_count_again() -> None:
    feed = Feed(Engine([spec(warning_zscore(regime=20))]))
    feed.normal(300, 40.0)
    for _ in range(6):  # 15-write episodes, each closed by 8 normal writes: never 20 in a row
        feed.normal(15, 800.0)
        feed.normal(8, 40.0)
    detectors = [f.detector for f in feed.findings]
    assert detectors == ["zscore"] * 6
    assert [f.detector for f in feed.normal(20, 800.0)] == ["zscore"]  # the 7th episode lasts
    assert [f.detector for f in feed.normal(1, 800.0)] == ["zscore.regime"]


def test_an_incident_opened_while_learning_is_no_regime_it_is_alerted_in_full_when_the_period_ends() -> None:
    """A learning finding only warns, and the incident it opens is alerted in full once the period ends: a rogue
    of a deployment's first day must not become the agent's normal by going on for regime_writes writes."""
    critical = ZScoreSpec(warmup=20, threshold=0.6, severity="critical", population=False, regime_writes=20)
    feed = Feed(Engine([spec(critical, learning=Learning(writes=100, seconds=3_600))]))
    feed.normal(40, 40.0)
    feed.normal(200, 800.0)  # from write 41 on; the period ends at write 100
    assert [(f.detector, f.learning, f.severity, f.quarantine) for f in feed.findings] == [
        ("zscore", True, "warning", False),
        ("zscore", False, "critical", True),
    ]


def test_cusum_rebaselines_on_a_regime_change_and_catches_the_next_shift() -> None:
    cusum = CusumSpec(feature="amount", severity="warning", regime_writes=30)
    feed = Feed(Engine([spec(cusum)]))
    feed.normal(300, 40.0)
    first = feed.normal(60, 80.0)  # +2.3 std of log amounts, lasting
    assert [f.detector for f in first] == ["cusum", "cusum.regime"]
    regime = first[1]
    assert regime.contributions[0].expected_low is not None and regime.contributions[0].expected_low < 50.0
    assert feed.normal(200, 80.0) == []
    assert [f.detector for f in feed.normal(30, 160.0)] == ["cusum"]  # judged against its new level


def test_regime_writes_defaults_to_50_and_may_be_turned_off() -> None:
    assert ZScoreSpec().regime_writes == 50 and CusumSpec(feature="amount").regime_writes == 50
    assert ZScoreSpec.model_validate({"regime_writes": None}).regime_writes is None
    with pytest.raises(ValidationError):
        ZScoreSpec(regime_writes=0)


def test_a_model_set_checkpointed_before_regime_changes_restores() -> None:
    engine = Engine([spec(warning_zscore(regime=20))])
    feed = Feed(engine)
    feed.normal(300, 40.0)
    feed.normal(5, 800.0)
    st = engine.states[(TABLE, "a1")]
    del st.held  # as unpickled from a checkpoint written before the slot existed
    engine.states[(TABLE, "a1")] = pickle.loads(pickle.dumps(st))
    # It cannot know since when the incident is open: it counts from the first write after the restore.
    assert feed.normal(19, 800.0) == []
    assert [f.detector for f in feed.normal(1, 800.0)] == ["zscore.regime"]
    assert [f.detector for f in feed.findings] == ["zscore", "zscore.regime"]


def test_the_regime_alert_reads_in_the_column_units() -> None:
    feed = Feed(Engine([spec(warning_zscore(regime=20))]))
    feed.normal(300, 40.0)
    feed.normal(21, 800.0)
    regime = feed.findings[-1]
    alert = build_alert(regime, regime.commit_ts_us)
    assert alert.severity == "info" and not alert.quarantined and alert.undo_command is None
    assert alert.summary.startswith("public.refunds: agent a1: amount: the agent's level moved from about ")
    assert "and stayed there for 20 writes with no quarantine: a new regime" in alert.summary
