"""Suppression windows, false-positive marks, bounded memory with checkpointed eviction; the README's zscore default."""

from __future__ import annotations

import random
import re
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from detectors.engine import Change, Engine, Finding, KafkaCoords
from detectors.spec import FeatureSpec, Learning, Suppression, TableSpec, ZScoreSpec
from stream.config import EXAMPLE_CONFIG, load_config, make_engine
from stream.pipeline import Router
from testbed.fleet import Fleet

SPEC = TableSpec(
    name="public.refunds",
    topic="shop.public.refunds",
    features=(FeatureSpec(name="amount", column="amount", transform="log"),),
    detectors=(ZScoreSpec(warmup=20),),
    learning=Learning(writes=0, seconds=0),  # these tests are about the lifecycle, not the learning period
)
T0 = 1_800_000_000  # seconds
ROOT = Path(__file__).resolve().parents[2]


def change(i: int, amount: float, agent: str = "a1") -> Change:
    return Change("public.refunds", "c", agent, None, {"amount": amount}, (T0 + i) * 1_000_000, KafkaCoords("t", 0, i))


def warm(engine: Engine, agent: str = "a1", n: int = 40) -> None:
    rng = random.Random(agent)
    for i in range(n):
        assert engine.process(change(i, 30.0 * rng.lognormvariate(0, 0.2), agent)) == []


def test_a_suppression_window_counts_anomalies_but_does_not_alert() -> None:
    window = Suppression.model_validate(
        {
            "from": datetime.fromtimestamp(T0 + 100, UTC),
            "to": datetime.fromtimestamp(T0 + 200, UTC),
            "reason": "planned refund migration",
            "agents": ["a1"],
        }
    )
    engine = Engine([SPEC], suppressions=[window])
    warm(engine)
    inside = [engine.process(change(150 + i, 3000.0)) for i in range(5)]
    # Debounce k=2: the 2nd to 5th anomalous writes would each have alerted; each is a suppressed finding.
    assert inside == [[]] * 5 and engine.suppressed == 4
    assert "a1" not in engine.quarantined
    # The same anomaly going on after the window is alerted on at once: the window kept the incident closed.
    after = engine.process(change(201, 3000.0))
    assert [(f.agent_id, f.detector) for f in after] == [("a1", "zscore")] and engine.suppressed == 4
    warm(engine, "a2")
    other = [f for i in range(3) for f in engine.process(change(160 + i, 3000.0, "a2"))]
    assert [f.agent_id for f in other] == ["a2"]  # the window names a1 only


def test_suppression_windows_are_checked() -> None:
    with pytest.raises(ValidationError, match="after"):
        Suppression.model_validate({"from": "2026-11-28T10:00:00Z", "to": "2026-11-28T09:00:00Z", "reason": "x"})
    with pytest.raises(ValidationError, match="time zone"):
        Suppression.model_validate({"from": "2026-11-28T10:00:00", "to": "2026-11-28T11:00:00", "reason": "x"})


def test_a_false_positive_mark_releases_the_agent_and_teaches_its_model() -> None:
    engine = Engine([SPEC])
    warm(engine)
    found = [f for i in range(3) for f in engine.process(change(100 + i, 400.0))]
    assert found and "a1" in engine.quarantined
    engine.apply_control("a1", "released", found[0].alert_id, "bulk refunds are legit", 0, false_positive=True)
    assert "a1" not in engine.quarantined
    score_after: list[tuple[str, float]] = []
    engine.process(change(200, 400.0), score_after)
    plain = Engine([SPEC])
    warm(plain)
    score_plain: list[tuple[str, float]] = []
    plain.process(change(200, 400.0), score_plain)
    assert score_after[0][1] < score_plain[0][1]  # the marked writes were learned as normal


def run(engine: Engine, events: list[Change]) -> tuple[list[Finding], list[list[tuple[str, float]]], list[bool]]:
    """Every finding, every event's (detector, score) list, and for each event whether its agent was restored."""
    findings: list[Finding] = []
    scores: list[list[tuple[str, float]]] = []
    restored: list[bool] = []
    for e in events:
        before = engine.restored
        got: list[tuple[str, float]] = []
        findings += engine.process(e, got)
        scores.append(got)
        restored.append(engine.restored > before)
    return findings, scores, restored


def test_eviction_checkpoints_agents_and_restores_them_unchanged() -> None:
    store: dict[str, bytes] = {}
    bounded = Engine([SPEC], max_states=10, store=store)
    unbounded = Engine([SPEC])
    rng = random.Random(2)
    events = [change(i, 30.0 * rng.lognormvariate(0, 0.2), f"a{rng.randrange(50)}") for i in range(5000)]
    events += [change(6000 + i, 5000.0, "a7") for i in range(3)]
    # A last write from every agent: each of the 40 checkpointed ones is restored once more and scored.
    events += [change(7000 + j, 31.0, f"a{j}") for j in range(50)]
    found_b, scores_b, restored_b = run(bounded, events)
    found_u, scores_u, _ = run(unbounded, events)

    assert bounded.evicted > 0 and bounded.restored > 0
    assert sum(restored_b) == bounded.restored
    assert len(bounded.states) == 10 and len(store) == 40 and bounded.store is store
    # Same scores, event by event and detector by detector, as if every agent had stayed in memory.
    for i, e in enumerate(events):
        assert scores_b[i] == scores_u[i], f"event {i} ({e.agent_id}, restored={restored_b[i]})"
    # Many of those comparisons are of agents restored past their warm-up (20 writes), scored at once.
    seen: dict[str, int] = {}
    warm_restores = 0
    for i, e in enumerate(events):
        if restored_b[i] and seen.get(e.agent_id, 0) >= 20:
            assert [name for name, _ in scores_b[i]] == ["zscore"], (i, scores_b[i])
            warm_restores += 1
        seen[e.agent_id] = seen.get(e.agent_id, 0) + 1
    assert warm_restores >= 1000, warm_restores
    # The same alerts, in full (ids, scores, contributions, triggers, ...), and at least a7's.
    assert found_b == found_u
    assert "a7" in {f.agent_id for f in found_b}


# Measured with this config: 3.9-4.0 KB per (table, agent) at 200 agents, 1.3 KB of it rhythm's (the README says
# about 4 KB).
KB = 1024
PER_AGENT_LOW, PER_AGENT_HIGH = 2 * KB, 6 * KB


def test_default_detectors_take_about_2_kb_per_agent_and_table() -> None:
    cfg = load_config(EXAMPLE_CONFIG)
    fleet = Fleet(n_agents=200, seed=3)
    router = Router(cfg.tables)
    changes = [router.route(r.topic, r.value, "c") for r in fleet.stream(20_000, T0 * 1_000_000)]
    engine = make_engine(cfg)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for ch in changes:
        assert not isinstance(ch, str)
        engine.process(ch)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(engine.states) >= 150, len(engine.states)  # most of the 200 agents have a model set
    per_agent = grown / len(engine.states)
    print(f"bytes per (table, agent) with the example config: {per_agent:,.0f}")
    assert PER_AGENT_LOW <= per_agent <= PER_AGENT_HIGH, (
        f"{per_agent:,.0f} bytes per (table, agent); the README says about 4 KB: update it if this moved"
    )


# The zscore sentence of the README's Detection section, with the numbers it gives.
README_THRESHOLD = re.compile(
    r"The default threshold is (\d\.\d+), that is \|z\| >= (\d+(?:\.\d+)?); the example\s+config "
    r"\(`([^`]+)`[^)]*\) sets (\d\.\d+), that is \|z\| >= (\d+(?:\.\d+)?)"
)


def test_readme_states_the_zscore_default_threshold_of_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    match = README_THRESHOLD.search(readme)
    assert match, "README: the zscore default threshold sentence is gone or reworded; keep it parseable here"
    default, default_z, example_path, example, example_z = match.groups()
    spec = ZScoreSpec()
    assert float(default) == spec.threshold
    # score = z / (z + half_z), so the threshold t means |z| >= half_z * t / (1 - t).
    assert float(default_z) == round(spec.half_z * spec.threshold / (1 - spec.threshold), 1)
    assert float(example_z) == round(spec.half_z * float(example) / (1 - float(example)), 1)
    # What the README says the example config sets is what every zscore detector there sets.
    cfg = load_config(ROOT / example_path)
    thresholds = {d.threshold for t in cfg.tables for d in t.detectors if isinstance(d, ZScoreSpec)}
    assert thresholds == {float(example)}


def test_a_late_quarantined_record_of_a_released_alert_does_not_quarantine_again() -> None:
    """An enforcement outcome published after `writeguard release` repeats the released alert's id."""
    eng = Engine([])
    eng.apply_control("a1", "quarantined", "alert-1", "zscore on public.refunds", 1)
    eng.apply_control("a1", "released", "alert-1", "false alarm", 2)
    eng.apply_control("a1", "quarantined", "alert-1", "zscore on public.refunds", 3)
    assert "a1" not in eng.quarantined
    # A release record without the alert id (older `writeguard release`) lifts the quarantine it finds.
    eng.apply_control("a1", "quarantined", "alert-2", "zscore on public.refunds", 4)
    eng.apply_control("a1", "released", None, "ok", 5)
    eng.apply_control("a1", "quarantined", "alert-2", "late", 6)
    assert "a1" not in eng.quarantined
    # A new incident has a new alert id and quarantines again.
    eng.apply_control("a1", "quarantined", "alert-3", "zscore on public.refunds", 7)
    assert eng.quarantined["a1"].alert_id == "alert-3"


def test_the_quarantining_event_scored_again_after_a_restart_repeats_its_alert_without_a_second_quarantine() -> None:
    from stream.pipeline import build_alert

    spec = TableSpec(
        name="public.refunds",
        topic="shop.public.refunds",
        features=(FeatureSpec(name="amount", column="amount", transform="log"),),
        detectors=(ZScoreSpec(warmup=20),),
        learning=Learning(writes=0, seconds=0),
    )

    def change(i: int, amount: float) -> Change:
        return Change("public.refunds", "c", "a1", None, {"amount": amount}, i, KafkaCoords("t", 0, i))

    def run(eng: Engine, quarantined_by: str | None = None) -> list[Finding]:
        for i in range(40):
            eng.process(change(i, 30.0 + i % 9))
        if quarantined_by is not None:  # restored with the model set: the control topic's latest record
            eng.apply_control("a1", "quarantined", quarantined_by, "zscore on public.refunds", 42)
        return [f for i, amount in ((41, 900.0), (42, 990.0)) for f in eng.process(change(i, amount))]

    [first] = run(Engine([spec]))
    assert first.quarantine and not first.requarantine
    # The restarted worker: the quarantine is back from the control topic, the same events are scored again.
    [repeat] = run(Engine([spec]), first.alert_id)
    assert (repeat.alert_id, repeat.quarantine, repeat.requarantine) == (first.alert_id, False, True)
    a, b = build_alert(first, 100), build_alert(repeat, 100)
    assert (b.alert_id, b.quarantined, b.summary) == (a.alert_id, True, a.summary)
    # Another alert of an agent quarantined by an earlier one is not a repeat: it says it did not quarantine.
    [later] = run(Engine([spec]), "an-earlier-alert")
    assert not later.quarantine and not later.requarantine and not build_alert(later, 100).quarantined
