"""Tests for detectors.engine.Engine: warm-up, population model, debounce, incidents, quarantine, ids."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from detectors.engine import ALERT_NAMESPACE, Change, Engine, FileCoords, Finding, KafkaCoords, alert_id
from detectors.spec import Debounce, FeatureSpec, Learning, OpBurstSpec, RateSpec, TableSpec, ZScoreSpec

T = "public.refunds"
TOPIC = "shop.public.refunds"
BASE_US = 1_700_000_000_000_000
WILD = 1000.0  # 20x the normal amounts below


def normal(i: int) -> float:
    return (40.0, 45.0, 50.0, 55.0, 60.0)[i * 3 % 5]


def table(*detectors, **kw) -> TableSpec:
    # These tests are about scoring, debounce and quarantine: no learning period (tests/unit/test_learning.py).
    kw.setdefault("learning", NO_LEARNING)
    return TableSpec(name=T, topic=TOPIC, features=(FeatureSpec(name="amount", column="amount", transform="log"),),
                     detectors=detectors, **kw)


def zscore(**kw) -> ZScoreSpec:
    kw.setdefault("threshold", 0.6)
    kw.setdefault("warmup", 30)
    # The population judges from its 30th write (its own warm-up in agents and writes: test_learning.py).
    kw.setdefault("population_agents", 1)
    kw.setdefault("population_writes", 1)
    return ZScoreSpec(**kw)


NO_LEARNING = Learning(writes=0, seconds=0)
ALERT_ONLY = {"info": ("alert",), "warning": ("alert",), "critical": ("alert",)}


class Feed:
    """Sends changes to an engine, one per second of commit time by default, and keeps every finding."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seq = 0
        self.t_us = BASE_US
        self.findings: list[Finding] = []
        self.coords: list[KafkaCoords] = []

    def send(self, agent: str, amount: float | None, *, op: str = "c", snapshot: bool = False,
             dt_us: int = 1_000_000, scores: list[tuple[str, float]] | None = None) -> list[Finding]:
        self.seq += 1
        self.t_us += dt_us
        coords = KafkaCoords(TOPIC, 0, self.seq)
        self.coords.append(coords)
        x = {} if amount is None else {"amount": amount}
        out = self.engine.process(Change(T, op, agent, "run-1", x, self.t_us, coords, snapshot), scores)
        self.findings += out
        return out

    def warm(self, agent: str, n: int = 40, **kw) -> None:
        for i in range(n):
            assert self.send(agent, normal(i), **kw) == []


def own_model(engine: Engine, agent: str, i: int = 0):
    return engine.states[(T, agent)].dets[i]


# --- warm-up and population ---------------------------------------------------------------------


def test_no_own_model_alert_during_warmup():
    feed = Feed(Engine([table(zscore(warmup=30, population=False))]))
    feed.warm("a", 10)
    scores: list[tuple[str, float]] = []
    for _ in range(20):  # events 11..30: wild, but the model has not seen 30 events yet
        assert feed.send("a", WILD, scores=scores) == []
    assert scores == []  # not even scored
    assert own_model(feed.engine, "a").n == 30  # warm-up events are learned


def test_own_model_scores_from_the_event_after_warmup():
    feed = Feed(Engine([table(zscore(warmup=30, population=False))]))
    scores: list[tuple[str, float]] = []
    for i in range(30):
        feed.send("a", normal(i), scores=scores)
    assert scores == []
    feed.send("a", normal(30), scores=scores)
    assert [name for name, _ in scores] == ["zscore"]
    assert scores[0][1] < 0.3
    assert feed.send("a", WILD) == []  # first anomaly: debounce k=2
    [f] = feed.send("a", WILD)
    assert (f.detector, f.kind, f.scope, f.agent_events) == ("zscore", "zscore", "agent", 33)
    assert f.score >= 0.6 and f.threshold == 0.6


def test_population_model_catches_a_new_agent_at_20x():
    feed = Feed(Engine([table(zscore(warmup=30))]))
    for agent in ("a1", "a2", "a3", "a4", "a5"):
        feed.warm(agent, 40)
    assert feed.send("newbie", WILD) == []  # k=2
    [f] = feed.send("newbie", WILD)
    assert (f.detector, f.kind, f.scope) == ("zscore.population", "zscore", "population")
    assert f.agent_id == "newbie" and f.agent_events == 2
    assert f.quarantine is True and "newbie" in feed.engine.quarantined
    top = f.contributions[0]
    assert top.feature == "amount" and top.value == WILD
    assert top.expected_low < 50.0 < top.expected_high < WILD
    assert [t.coords for t in f.triggers] == feed.coords[-2:]
    # The newbie's own model is still cold: it never learned the anomalous writes.
    assert own_model(feed.engine, "newbie").n == 0


def test_population_disabled_or_cold_does_not_judge_new_agents():
    feed = Feed(Engine([table(zscore(warmup=30, population=False))]))
    for agent in ("a1", "a2", "a3"):
        feed.warm(agent, 40)
    for _ in range(5):
        assert feed.send("newbie", WILD) == []

    # Enabled but the table has seen fewer than `warmup` events: nothing to compare with yet.
    feed = Feed(Engine([table(zscore(warmup=30))]))
    feed.warm("a1", 10)
    scores: list[tuple[str, float]] = []
    for _ in range(5):
        assert feed.send("newbie", WILD, scores=scores) == []
    assert scores == []


# --- debounce and incidents ---------------------------------------------------------------------


def test_single_outlier_does_not_alert_with_k2():
    feed = Feed(Engine([table(zscore(debounce=Debounce(k=2, n=4)))]))
    feed.warm("a", 40)
    scores: list[tuple[str, float]] = []
    assert feed.send("a", WILD, scores=scores) == []
    assert scores[-1][1] >= 0.6  # it was anomalous ...
    for i in range(10):
        assert feed.send("a", normal(i)) == []  # ... but alone
    assert feed.engine.quarantined == {}


@pytest.mark.parametrize(("gap", "alerts"), [(0, True), (1, True), (2, True), (3, False), (5, False)])
def test_debounce_k_of_n_window(gap, alerts):
    feed = Feed(Engine([table(zscore(debounce=Debounce(k=2, n=4)))]))
    feed.warm("a", 40)
    feed.send("a", WILD)
    for i in range(gap):
        feed.send("a", normal(i))
    out = feed.send("a", WILD)
    assert len(out) == (1 if alerts else 0)
    assert len(feed.findings) == len(out)


def test_debounce_k1_alerts_on_the_first_anomaly():
    feed = Feed(Engine([table(zscore(debounce=Debounce(k=1, n=1)))]))
    feed.warm("a", 40)
    [f] = feed.send("a", WILD)
    assert [t.coords for t in f.triggers] == [feed.coords[-1]]


def test_burst_of_30_anomalies_is_one_incident():
    feed = Feed(Engine([table(zscore())]))
    feed.warm("a", 40)
    for _ in range(30):
        feed.send("a", WILD)
    assert len(feed.findings) == 1
    f = feed.findings[0]
    assert f.agent_events == 42
    assert [t.coords for t in f.triggers] == feed.coords[40:42]
    # Quarantined: the incident stays open even through normal writes, so the next burst is the same incident.
    feed.warm("a", 10)
    for _ in range(30):
        feed.send("a", WILD)
    assert len(feed.findings) == 1


def test_incident_closes_after_n_normal_events_without_quarantine():
    feed = Feed(Engine([table(zscore(severity="warning"))]))
    feed.warm("a", 40)
    for _ in range(30):
        feed.send("a", WILD)
    assert len(feed.findings) == 1
    assert feed.findings[0].actions == ("alert",) and feed.findings[0].quarantine is False
    assert feed.engine.quarantined == {}
    for i in range(4):  # debounce n=4 normal writes close the incident
        feed.send("a", normal(i))
    feed.send("a", WILD)
    [second] = feed.send("a", WILD)
    assert second.alert_id != feed.findings[0].alert_id
    assert [t.coords for t in second.triggers] == feed.coords[-2:]


def test_incidents_are_per_agent_and_per_detector():
    feed = Feed(Engine([table(zscore(severity="warning"),
                              RateSpec(max_events=10, window_seconds=5, severity="warning"))]))
    feed.warm("a", 40)
    feed.warm("b", 40)
    for _ in range(5):
        feed.send("a", WILD)
        feed.send("b", WILD)
    for _ in range(20):  # 20 writes from "a" within 0.2 s: over 10 in the last 5 s
        feed.send("a", normal(0), dt_us=10_000)
    got = sorted((f.agent_id, f.detector) for f in feed.findings)
    assert got == [("a", "rate"), ("a", "zscore"), ("b", "zscore")]


# --- quarantine ---------------------------------------------------------------------------------


def test_quarantine_happens_once():
    feed = Feed(Engine([table(zscore(), RateSpec(max_events=50))]))
    feed.warm("a", 40)
    feed.send("a", WILD)
    [first] = feed.send("a", WILD)
    assert first.detector == "zscore" and first.quarantine is True
    assert first.actions == ("alert", "quarantine")
    q = feed.engine.quarantined["a"]
    assert (q.alert_id, q.reason, q.since_us) == (first.alert_id, "zscore on public.refunds", first.commit_ts_us)

    for _ in range(20):  # now trip the rate ceiling (42 writes in the last minute already)
        feed.send("a", normal(0), dt_us=10_000)
    later = [f for f in feed.findings if f is not first]
    assert [f.detector for f in later] == ["rate"]
    assert later[0].quarantine is False
    assert later[0].actions == ("alert", "quarantine")  # the action is configured; it just is not repeated
    assert feed.engine.quarantined["a"] is q and q.alert_id == first.alert_id
    assert sum(f.quarantine for f in feed.findings) == 1


def test_quarantined_agent_events_are_counted():
    feed = Feed(Engine([table(zscore())]))
    feed.warm("a", 40)
    feed.warm("b", 40)
    feed.send("a", WILD)
    feed.send("a", WILD)
    q = feed.engine.quarantined["a"]
    assert (q.events_after, q.anomalous_after) == (0, 0)  # the quarantining event is not "after"
    n_before = own_model(feed.engine, "a").n
    for i in range(8):
        feed.send("a", WILD if i % 2 else normal(i))  # 4 anomalous, 4 normal
    feed.warm("b", 5)  # other agents do not count
    assert (q.events_after, q.anomalous_after) == (8, 4)
    assert own_model(feed.engine, "a").n == n_before  # nothing is learned from a quarantined agent


def test_apply_control_quarantined_from_another_worker():
    feed = Feed(Engine([table(zscore())]))
    feed.warm("a", 40)
    feed.engine.apply_control("a", "quarantined", "alert-from-elsewhere", "zscore on public.refunds", 123)
    feed.engine.apply_control("a", "quarantined", "second-record", "ignored", 456)
    q = feed.engine.quarantined["a"]
    assert (q.alert_id, q.since_us) == ("alert-from-elsewhere", 123)
    feed.send("a", WILD)
    [f] = feed.send("a", WILD)
    assert f.quarantine is False  # already quarantined
    assert feed.engine.quarantined["a"].alert_id == "alert-from-elsewhere"
    assert q.events_after == 2


def test_apply_control_release():
    feed = Feed(Engine([table(zscore())]))
    feed.warm("a", 40)
    feed.send("a", WILD)
    feed.send("a", WILD)
    assert "a" in feed.engine.quarantined
    q = feed.engine.quarantined["a"]
    n_quarantined = own_model(feed.engine, "a").n

    feed.engine.apply_control("a", "released", None, "false positive", BASE_US)
    assert "a" not in feed.engine.quarantined
    feed.engine.apply_control("a", "released", None, "twice is harmless", BASE_US)
    feed.warm("a", 6)
    assert q.events_after == 0  # the old record no longer counts
    assert own_model(feed.engine, "a").n == n_quarantined + 6  # learning resumed

    feed.send("a", WILD)
    [again] = feed.send("a", WILD)
    assert again.quarantine is True
    assert feed.engine.quarantined["a"].alert_id == again.alert_id


# --- ids, learning, snapshots -------------------------------------------------------------------


def scenario(engine: Engine) -> Feed:
    feed = Feed(engine)
    for agent in ("a1", "a2", "a3"):
        feed.warm(agent, 40)
    feed.send("newbie", WILD)
    feed.send("newbie", WILD)
    feed.send("a1", WILD)
    feed.send("a1", WILD)
    for _ in range(60):
        feed.send("a2", normal(1), dt_us=1000)
    feed.send("a3", None, op="t")
    return feed


def specs() -> list[TableSpec]:
    return [table(zscore(), RateSpec(max_events=10, window_seconds=5), OpBurstSpec(max_events=5))]


def test_alert_ids_are_deterministic():
    one, two = scenario(Engine(specs())), scenario(Engine(specs()))
    ids = [f.alert_id for f in one.findings]
    assert [(f.agent_id, f.detector) for f in one.findings] == [
        ("newbie", "zscore.population"), ("a1", "zscore"), ("a2", "rate"), ("a3", "op_burst"),
    ]
    assert ids == [f.alert_id for f in two.findings]
    assert len(set(ids)) == len(ids)
    for f in one.findings:
        assert f.alert_id == alert_id(T, f.agent_id, f.detector, f.triggers[-1].coords)


def test_alert_ids_hash_the_coordinates_as_text_so_they_stay_the_same_across_versions():
    def expected(coords_text: str) -> str:
        return str(uuid.uuid5(ALERT_NAMESPACE, f"{T}\x1fa1\x1fzscore\x1f{coords_text}"))

    assert alert_id(T, "a1", "zscore", KafkaCoords(TOPIC, 3, 42)) == expected(f"{TOPIC}/3/42")
    assert alert_id(T, "a1", "zscore", FileCoords("/data/events.jsonl", 7)) == expected("/data/events.jsonl:7")


def test_a_change_crosses_the_changes_topic_with_its_typed_fields():
    ch = Change(T, "d", "a1", None, {"amount": 1.5}, BASE_US, KafkaCoords(TOPIC, 1, 9), False, {"reason": "late"},
                "k-1", "tx-7")
    back = msgspec.json.decode(msgspec.json.encode(ch), type=Change)
    assert back == ch and isinstance(back.coords, KafkaCoords)
    with pytest.raises(msgspec.ValidationError):  # an op code Debezium does not have
        msgspec.json.decode(msgspec.json.encode(ch).replace(b'"d"', b'"x"', 1), type=Change)


def test_anomalous_events_are_not_learned():
    eng = Engine([table(zscore(severity="warning"))])  # alert only: nothing is quarantined
    feed = Feed(eng)
    for agent in ("a", "b"):
        feed.warm(agent, 40)
    pop_n = eng.tables[T].plans[0].population_n[0]
    for _ in range(30):
        feed.send("a", WILD)
    assert len(feed.findings) == 1 and eng.quarantined == {}
    assert own_model(eng, "a").n == 40
    assert eng.tables[T].plans[0].population_n[0] == pop_n
    scores: list[tuple[str, float]] = []
    for i in range(5):
        feed.send("a", normal(i), scores=scores)
    assert max(s for _, s in scores) < 0.3
    assert own_model(eng, "a").n == 45


def test_snapshot_reads_learn_but_never_alert():
    feed = Feed(Engine([table(zscore(), RateSpec(max_events=10), OpBurstSpec(max_events=1, ops=("d", "r")))]))
    scores: list[tuple[str, float]] = []
    for i in range(40):
        feed.send("a", normal(i), op="r", snapshot=True, dt_us=0)
    for _ in range(10):
        feed.send("a", WILD, op="r", snapshot=True, dt_us=0, scores=scores)
    assert feed.findings == []
    assert feed.engine.quarantined == {}
    zscores = [s for name, s in scores if name == "zscore"]
    assert len(zscores) == 10 and zscores[0] >= 0.6  # scored as anomalous, yet no alert
    assert own_model(feed.engine, "a").n == 50


def test_snapshot_reads_warm_the_agent_model():
    feed = Feed(Engine([table(zscore())]))
    for i in range(40):
        feed.send("a", normal(i), op="r", snapshot=True)
    feed.send("a", WILD)
    [f] = feed.send("a", WILD)
    assert f.scope == "agent"


def test_rate_guard_covers_an_agent_from_its_first_write():
    feed = Feed(Engine([table(zscore(), RateSpec(max_events=5, window_seconds=60))]))
    for _ in range(5):
        assert feed.send("fresh", normal(0)) == []
    [f] = feed.send("fresh", normal(0))
    assert (f.detector, f.kind, f.scope, f.threshold, f.agent_events) == ("rate", "rate", "agent", 1.0, 6)
    assert (f.contributions[0].value, f.contributions[0].expected_high) == (6.0, 5.0)


def test_truncate_without_features_fires_op_burst_only():
    feed = Feed(Engine([table(zscore(), OpBurstSpec(max_events=100))]))
    feed.warm("a", 40)
    scores: list[tuple[str, float]] = []
    [f] = feed.send("a", None, op="t", scores=scores)
    assert scores == [("op_burst", 1.0)]  # the value model has nothing to score
    assert (f.detector, f.quarantine) == ("op_burst", True)


# --- regressions: each of these was a bug found in review -----------------------------------------


def test_one_event_tripping_two_detectors_quarantines_once():
    feed = Feed(Engine([table(zscore(warmup=5, population=False, debounce=Debounce(k=1, n=4)),
                              RateSpec(max_events=10))]))
    for i in range(10):
        feed.send("a", normal(i))
    out = feed.send("a", WILD)  # 11th write in a minute and 20x the amount
    assert sorted(f.detector for f in out) == ["rate", "zscore"]
    assert [f.quarantine for f in out] == [True, False]
    assert feed.engine.quarantined["a"].alert_id == out[0].alert_id


def test_snapshot_reads_do_not_count_as_writes_for_the_rate_ceiling():
    feed = Feed(Engine([table(zscore(), RateSpec(max_events=10))]))
    for i in range(50):
        feed.send("a", normal(i), op="r", snapshot=True, dt_us=1000)
    assert feed.send("a", normal(0)) == []  # the agent's first real write in this minute


def test_alert_triggers_are_from_the_current_incident_only():
    feed = Feed(Engine([table(zscore())]))
    feed.warm("a", 40)
    feed.send("a", WILD)  # a lone outlier: no alert
    feed.warm("a", 100)
    feed.send("a", WILD)
    [f] = feed.send("a", WILD)
    assert [t.coords for t in f.triggers] == feed.coords[-2:]


def test_released_agent_that_keeps_misbehaving_is_alerted_again():
    feed = Feed(Engine([table(zscore())]))
    feed.warm("a", 40)
    for _ in range(10):
        feed.send("a", WILD)
    feed.engine.apply_control("a", "released", None, "looked fine", BASE_US)
    for _ in range(10):
        feed.send("a", WILD)
    assert len(feed.findings) == 2
    assert feed.findings[1].quarantine is True
