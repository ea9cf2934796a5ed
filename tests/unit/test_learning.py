"""Issue 13, a calm start: the learning period, sound estimates from few writes, the population's warm-up."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from detectors.engine import Change, Engine, Finding, KafkaCoords
from detectors.models import ZScore
from detectors.spec import FeatureSpec, Learning, OpBurstSpec, OpMixSpec, RateSpec, TableSpec, ZScoreSpec
from detectors.write import Write
from stream.config import ConfigError, parse_config
from stream.metrics import Metrics
from stream.pipeline import build_alert

T = "public.refunds"
TOPIC = "shop.public.refunds"
BASE_US = 1_800_000_000_000_000
HOUR_US = 3_600_000_000
WILD = 1000.0  # 20x the normal amounts below
ROOT = Path(__file__).resolve().parents[2]


def normal(i: int) -> float:
    return (40.0, 45.0, 50.0, 55.0, 60.0)[i * 3 % 5]


def table(*detectors, **kw) -> TableSpec:
    return TableSpec(
        name=T,
        topic=TOPIC,
        features=(FeatureSpec(name="amount", column="amount", transform="log"),),
        detectors=detectors,
        **kw,
    )


def zscore(**kw) -> ZScoreSpec:
    kw.setdefault("threshold", 0.6)
    kw.setdefault("warmup", 30)
    kw.setdefault("population", False)
    return ZScoreSpec(**kw)


class Feed:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seq = 0
        self.t_us = BASE_US

    def send(self, agent: str, amount: float | None, *, op: str = "c", dt_us: int = 1_000_000,
             tx: str | None = None) -> list[Finding]:
        self.seq += 1
        self.t_us += dt_us
        x = {} if amount is None else {"amount": amount}
        ch = Change(T, op, agent, "run-1", x, self.t_us, KafkaCoords(TOPIC, 0, self.seq), tx_id=tx)
        return self.engine.process(ch)

    def warm(self, agent: str, n: int, dt_us: int = 1_000_000) -> None:
        for i in range(n):
            assert self.send(agent, normal(i), dt_us=dt_us) == []

    def wild(self, agent: str, n: int = 2) -> list[Finding]:
        out: list[Finding] = []
        for _ in range(n):
            out += self.send(agent, WILD)
        return out


# --- the learning period ------------------------------------------------------------------------


def test_the_default_learning_period_covers_a_daily_cycle():
    spec = TableSpec(name=T, topic=TOPIC)
    assert (spec.learning.writes, spec.learning.seconds) == (200, 86_400.0)


def test_a_model_set_learns_until_its_writes_have_passed_though_its_time_has():
    feed = Feed(Engine([table(zscore(), learning=Learning(writes=100, seconds=3600))]))
    feed.warm("a", 40, dt_us=HOUR_US)  # 40 hours: the time has passed, 40 < 100 writes have not
    assert feed.engine.learning_models()[T] == 1
    [f] = feed.wild("a")
    assert (f.learning, f.severity, f.quarantine) == (True, "warning", False)


def test_a_model_set_learns_until_its_time_has_passed_though_its_writes_have():
    feed = Feed(Engine([table(zscore(), learning=Learning(writes=30, seconds=3600))]))
    feed.warm("a", 60)  # 60 writes, one a second: a minute of a required hour
    assert feed.engine.learning_models()[T] == 1
    [f] = feed.wild("a")
    assert (f.learning, f.severity, f.quarantine) == (True, "warning", False)


def test_a_model_set_leaves_learning_when_both_have_passed():
    feed = Feed(Engine([table(zscore(), learning=Learning(writes=30, seconds=3600))]))
    feed.warm("a", 40, dt_us=HOUR_US // 30)  # 40 writes over 80 minutes
    assert feed.engine.learning_models()[T] == 0
    [f] = feed.wild("a")
    assert (f.learning, f.severity, f.quarantine) == (False, "critical", True)
    assert "a" in feed.engine.quarantined


def test_a_learning_finding_warns_alerts_only_and_says_so():
    feed = Feed(Engine([table(zscore())]))  # the default period: 200 writes and 24 h
    feed.warm("a", 40)
    [f] = feed.wild("a")
    assert (f.learning, f.severity, f.actions, f.quarantine) == (True, "warning", ("alert",), False)
    assert feed.engine.quarantined == {}
    alert = build_alert(f, f.commit_ts_us + 1000)
    assert alert.learning is True and alert.severity == "warning" and not alert.quarantined
    assert "(learning)" in alert.summary and alert.actions == ["alert"]


def test_a_warning_that_quarantines_by_config_still_does_not_while_learning():
    actions = {"info": ("alert",), "warning": ("alert", "quarantine"), "critical": ("alert", "quarantine")}
    feed = Feed(Engine([table(zscore(), actions=actions)]))
    feed.warm("a", 40)
    [f] = feed.wild("a")
    assert (f.learning, f.actions, f.quarantine) == (True, ("alert",), False)


def test_an_incident_opened_while_learning_is_alerted_in_full_when_learning_ends():
    feed = Feed(Engine([table(zscore(), learning=Learning(writes=43, seconds=0))]))
    feed.warm("a", 40)
    [f] = feed.wild("a")  # writes 41, 42: learning
    assert f.learning
    [g] = feed.wild("a", 1)  # write 43: the same incident goes on, and the model set has its 43 writes
    assert (g.learning, g.severity, g.quarantine) == (False, "critical", True)


def test_a_detectors_own_learning_overrides_its_tables():
    feed = Feed(Engine([table(zscore(learning=Learning(writes=0, seconds=0)))]))
    feed.warm("a", 40)
    [f] = feed.wild("a")
    assert (f.learning, f.severity, f.quarantine) == (False, "critical", True)


# --- deterministic guards never learn -----------------------------------------------------------


def test_a_truncate_fires_at_full_severity_on_the_agents_first_write():
    feed = Feed(Engine([table(zscore(), OpBurstSpec(ops=("d", "t"), max_events=5))]))
    [f] = feed.send("a", None, op="t")
    assert (f.detector, f.learning, f.severity, f.quarantine) == ("op_burst", False, "critical", True)


def test_a_rate_ceiling_fires_at_full_severity_from_the_first_writes():
    feed = Feed(Engine([table(zscore(), RateSpec(max_events=3, window_seconds=60))]))
    got = [f for i in range(4) for f in feed.send("a", normal(i))]
    assert [(f.detector, f.learning, f.severity, f.quarantine) for f in got] == [("rate", False, "critical", True)]


def test_a_mass_change_in_one_transaction_is_a_guard_while_the_share_still_learns():
    feed = Feed(Engine([table(zscore(), OpMixSpec(max_rows_per_tx=10))]))
    got = [f for _ in range(12) for f in feed.send("a", 50.0, op="d", tx="tx-1")]
    assert [(f.detector, f.score, f.learning, f.quarantine) for f in got] == [("op_mix", 1.0, False, True)]


# --- sound estimates from few writes ------------------------------------------------------------


def heavy(rng: random.Random, scale: float = 0.3) -> float:
    """A Student-t draw with 3 degrees of freedom: heavy tails, as refund amounts have on the log scale."""
    z = rng.gauss(0, 1)
    chi2 = sum(rng.gauss(0, 1) ** 2 for _ in range(3))
    return scale * z / math.sqrt(chi2 / 3)


def test_a_range_from_30_writes_borrows_the_fleets_spread_and_does_not_flag_an_ordinary_31st():
    rng = random.Random(13)
    population = ZScore(log_features={"amount"})
    for _ in range(40):  # the fleet: each agent's log amounts around its own level, heavy-tailed
        agent = ZScore(log_features={"amount"}, min_count=30, prior_writes=30)
        agent.prior = population
        level = rng.uniform(3.0, 5.0)
        for _ in range(50):
            w = Write({"amount": math.expm1(level + heavy(rng))})
            agent.learn_one(w)
            population.learn_one(w)
    # A new agent's first 30 writes happen to fall in the quiet middle of that distribution ...
    first = [math.expm1(4.0 + heavy(rng, scale=0.05)) for _ in range(30)]
    ordinary = math.expm1(4.0 + 1.2)  # ... and its 31st is well inside what the fleet's agents do every day
    shrunk = ZScore(log_features={"amount"}, min_count=30, prior_writes=30)
    shrunk.prior = population
    plain = ZScore(log_features={"amount"}, min_count=30)  # stats.Var alone, as before issue 13
    for v in first:
        shrunk.learn_one(Write({"amount": v}))
        plain.learn_one(Write({"amount": v}))
    threshold = 0.6  # the example config's and the scenario suite's
    assert plain.score_one(Write({"amount": ordinary})) >= threshold  # the narrow range flags it
    assert shrunk.score_one(Write({"amount": ordinary})) < 0.5
    assert shrunk.score_one(Write({"amount": 20 * math.expm1(4.0)})) >= threshold  # a 20x rogue still stands out


def test_the_prior_fades_as_the_agent_writes():
    population = ZScore()
    fleet = ZScore(prior_writes=30)
    fleet.prior = population
    for i in range(2000):
        fleet.learn_one(Write({"x": float(i % 2) * 10}))  # deviations of about 5 pooled into the prior
    own = ZScore(prior_writes=30)
    own.prior = population
    for i in range(3000):
        own.learn_one(Write({"x": 100.0 + i % 2}))  # sd 0.5
    z = own.explain(Write({"x": 106.0}))[0].z
    assert z is not None and z > 8  # about 11/1.2: 3000 writes of its own outweigh n0 = 30


def test_the_student_t_range_is_wider_for_fewer_writes():
    def width(n: int) -> float:
        m = ZScore()
        for i in range(n):
            m.learn_one(Write({"x": float(i % 2)}))
        c = m.explain(Write({"x": 0.5}))[0]
        assert c.expected_high is not None and c.expected_low is not None
        return (c.expected_high - c.expected_low) / math.sqrt(0.25 * n / (n - 1))

    assert width(10) > width(30) > width(3000) > 6.0


# --- the population model's own warm-up ---------------------------------------------------------


def population_engine(**kw) -> Feed:
    kw.setdefault("population_agents", 5)
    kw.setdefault("population_writes", 150)
    z = zscore(population=True, population_threshold=0.5, **kw)
    return Feed(Engine([table(z, learning=Learning(writes=0, seconds=0))]))


def test_the_population_does_not_judge_before_it_has_seen_enough_agents():
    feed = population_engine(population_agents=6)
    for agent in ("a1", "a2", "a3", "a4"):
        feed.warm(agent, 50)  # 200 writes, but from 4 agents of the 6 it needs
    # Not judged, so learned: a population still in its warm-up cannot tell (newbie is its 5th agent).
    assert feed.wild("newbie", 2) == []
    feed.warm("a5", 50)
    [f] = feed.wild("newbie2")
    assert (f.scope, f.severity, f.quarantine, f.learning) == ("population", "critical", True, False)


def test_the_population_does_not_judge_before_it_has_seen_enough_writes():
    feed = population_engine(population_writes=300)
    for agent in ("a1", "a2", "a3", "a4", "a5", "a6"):
        feed.warm(agent, 40)  # 240 of the 300 writes it needs
    assert feed.wild("newbie", 2) == []  # not judged (and learned: 242 writes)
    feed.warm("a7", 60)
    assert [f.scope for f in feed.wild("newbie2")] == ["population"]


def test_a_population_in_its_learning_period_only_warns():
    z = zscore(population=True, population_threshold=0.5, population_agents=5, population_writes=150)
    feed = Feed(Engine([table(z, learning=Learning(writes=0, seconds=86_400))]))
    for agent in ("a1", "a2", "a3", "a4", "a5"):
        feed.warm(agent, 40)  # warm in agents and writes, but a few minutes old
    assert feed.engine.learning_models()[T] >= 1
    [f] = feed.wild("newbie")
    assert (f.scope, f.learning, f.severity, f.quarantine) == ("population", True, "warning", False)


def test_the_population_learns_from_normal_writes_only():
    feed = population_engine()
    for agent in ("a1", "a2", "a3", "a4", "a5"):
        feed.warm(agent, 40)
    plan = feed.engine.tables[T].plans[0]
    n = plan.population_n[0]
    feed.wild("newbie", 4)
    assert plan.population_n[0] == n


# --- config, metric, README ---------------------------------------------------------------------


def test_a_bad_learning_period_is_refused_with_its_key_path():
    data = {"tables": [{"name": T, "topic": TOPIC, "learning": {"writes": -1, "seconds": 0}}]}
    with pytest.raises(ConfigError, match=r"tables\.0\.learning\.writes"):
        parse_config(data, "x.yaml")


def test_the_learning_gauge_counts_model_sets_and_populations_still_learning():
    z = zscore(population=True, population_agents=2, population_writes=10)
    feed = Feed(Engine([table(z, learning=Learning(writes=30, seconds=0))]))
    feed.warm("a1", 20)
    feed.warm("a2", 40)
    # a1 (20 of 30 writes) and the population (warm after 60 writes, past 30): 1 + 0; a2 has its 40 writes.
    assert feed.engine.learning_models() == {T: 1}
    metrics = Metrics(CollectorRegistry())
    for table_name, n in feed.engine.learning_models().items():
        metrics.learning_models.labels(table_name).set(n)
    assert metrics.registry.get_sample_value("writeguard_learning_models", {"table": T}) == 1.0


def test_readme_metrics_table_and_the_metrics_agree_both_ways():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n#", 1)[0]
    documented = set(re.findall(r"^\| `(writeguard_[a-z_]+)`", section, flags=re.M))
    exported = set()
    for metric in Metrics(CollectorRegistry()).registry.collect():
        kind = metric.type
        exported.add(f"{metric.name}_total" if kind == "counter" else metric.name)
    assert documented == exported
