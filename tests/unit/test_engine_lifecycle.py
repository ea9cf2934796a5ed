"""Suppression windows, false-positive marks, and bounded memory with checkpointed eviction."""

from __future__ import annotations

import random
import tracemalloc
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from detectors.engine import Change, Engine
from detectors.spec import FeatureSpec, Suppression, TableSpec, ZScoreSpec
from stream.config import load_config, make_engine
from stream.fleet import Fleet
from stream.pipeline import Router

SPEC = TableSpec(
    name="public.refunds",
    topic="shop.public.refunds",
    features=(FeatureSpec(name="amount", column="amount", transform="log"),),
    detectors=(ZScoreSpec(warmup=20),),
)
T0 = 1_800_000_000  # seconds


def change(i: int, amount: float, agent: str = "a1") -> Change:
    return Change("public.refunds", "c", agent, None, {"amount": amount}, (T0 + i) * 1_000_000, f"t/0/{i}")


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
    assert inside == [[]] * 5 and engine.suppressed == 1
    assert "a1" not in engine.quarantined
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


def test_eviction_checkpoints_agents_and_restores_them_unchanged() -> None:
    bounded = Engine([SPEC], max_states=10)
    unbounded = Engine([SPEC])
    rng = random.Random(2)
    events = [change(i, 30.0 * rng.lognormvariate(0, 0.2), f"a{rng.randrange(50)}") for i in range(5000)]
    events += [change(6000 + i, 5000.0, "a7") for i in range(3)]
    got_b = [(f.agent_id, f.alert_id) for e in events for f in bounded.process(e)]
    got_u = [(f.agent_id, f.alert_id) for e in events for f in unbounded.process(e)]
    assert got_b == got_u and got_b  # same decisions as if everything stayed in memory
    assert len(bounded.states) == 10 and bounded.evicted > 0 and bounded.restored > 0
    assert len(bounded.store) == 40


def test_default_detectors_stay_far_below_64_kb_per_agent_and_table() -> None:
    cfg = load_config("stream/examples/writeguard.yaml")
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
    per_agent = grown / len(engine.states)
    print(f"bytes per (table, agent) with the example config: {per_agent:,.0f}")
    assert per_agent < 64 * 1024
