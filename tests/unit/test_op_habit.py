"""OpHabit (kind ``op_habit``): each op judged on its own against the agent's habit of it."""

from __future__ import annotations

import random

import pytest
from scipy.stats import betabinom

from detectors.engine import Change, Engine
from detectors.models import OpHabit, beta_binomial_tail
from detectors.spec import OpHabitSpec, TableSpec
from detectors.write import Write

HOUR = 3600.0


def feed(h: OpHabit, ops: list[str], start: float, step: float) -> list[float]:
    """Score then learn each op in turn, ``step`` seconds apart, as the engine does; the scores."""
    scores = []
    for i, op in enumerate(ops):
        w = Write(op=op, t=start + i * step)  # type: ignore[arg-type]
        scores.append(h.score_one(w))
        h.learn_one(w)
    return scores


def soft_deleter(n: int = 2000, step: float = 60.0, seed: int = 1) -> OpHabit:
    """An agent that inserts and soft-deletes (updates), one write a minute, and never hard-deletes."""
    rng = random.Random(seed)
    h = OpHabit(window=HOUR, warmup=100)
    feed(h, ["u" if rng.random() < 0.3 else "c" for _ in range(n)], 0.0, step)
    return h


@pytest.mark.parametrize(("k", "n", "a", "b"), [(3, 40, 0.5, 2000.5), (12, 60, 2.5, 80.0), (1, 1, 1.0, 3.0)])
def test_beta_binomial_tail_matches_scipy(k: int, n: int, a: float, b: float) -> None:
    assert beta_binomial_tail(k, n, a, b) == pytest.approx(float(betabinom.sf(k - 1, n, a, b)), rel=1e-6)


def test_never_used_op_stands_out_within_a_few_writes() -> None:
    h = soft_deleter()
    t = 2000 * 60.0
    rng = random.Random(2)
    # The agent goes on as before, one write a minute, and hard-deletes one row in every ten writes.
    ops = ["d" if i % 10 == 9 else ("u" if rng.random() < 0.3 else "c") for i in range(60)]
    scores = feed(h, ops, t, 60.0)
    deletes = [s for s, op in zip(scores, ops, strict=True) if op == "d"]
    assert max(deletes[:4]) >= 0.5, deletes  # an alert by the fourth hard delete
    assert deletes[0] == 0.0 and deletes[1] == 0.0, deletes  # one or two deletes are not a habit change
    assert max(s for s, op in zip(scores, ops, strict=True) if op != "d") == 0.0


def test_usual_share_does_not_stand_out() -> None:
    # 30% updates is this agent's habit: an hour at 30% (or somewhat more) is not judged at all.
    h = soft_deleter()
    rng = random.Random(3)
    ops = ["u" if rng.random() < 0.4 else "c" for _ in range(120)]
    assert max(feed(h, ops, 2000 * 60.0, 30.0)) == 0.0


def test_rare_but_habitual_op_at_its_rate_does_not_stand_out() -> None:
    # An agent that hard-deletes 1% of the time (below max_share, so judged): over ten days of it, no hour alerts.
    rng = random.Random(4)
    h = OpHabit(window=HOUR, warmup=100)
    ops = ["d" if rng.random() < 0.01 else ("u" if rng.random() < 0.25 else "c") for _ in range(14_400)]
    scores = feed(h, ops, 0.0, 60.0)
    assert sum(1 for op in ops if op == "d") > 100  # the habit is there ...
    assert max(scores) < 0.5  # ... and never surprising at its own rate


def test_warm_up_respected() -> None:
    # 99 writes have left the window: not yet judged, however many deletes follow.
    h = OpHabit(window=HOUR, warmup=100)
    feed(h, ["c"] * 99, 0.0, 60.0)
    burst = feed(h, ["d"] * 10, 99 * 60.0 + 2 * HOUR, 1.0)
    assert burst == [0.0] * 10
    # With the 100th old write (the burst has not left the window yet), the same burst stands out.
    h = OpHabit(window=HOUR, warmup=100)
    feed(h, ["c"] * 100, 0.0, 60.0)
    assert max(feed(h, ["d"] * 10, 100 * 60.0 + 2 * HOUR, 1.0)) >= 0.5


def test_min_count_max_share_and_ops() -> None:
    h = OpHabit(window=HOUR, warmup=10, min_count=3)
    feed(h, ["c"] * 1000, 0.0, 60.0)
    t = 1000 * 60.0 + 2 * HOUR
    assert feed(h, ["d", "d"], t, 1.0) == [0.0, 0.0]  # below min_count, however unlikely
    assert feed(h, ["d"], t + 2, 1.0)[0] >= 0.5  # the third
    # An op above max_share of the habit is not judged, however many in the window: its share is op_mix's.
    common = OpHabit(window=HOUR, warmup=10, max_share=0.02)
    feed(common, ["d" if i % 20 == 0 else "c" for i in range(400)], 0.0, 60.0)  # 5% deletes
    assert max(feed(common, ["d"] * 30, 400 * 60.0, 1.0)) == 0.0
    # Inserts are judged only when asked for.
    upd = ["u"] * 400
    assert max(feed(OpHabit(warmup=10), [*upd, *["c"] * 10], 0.0, 60.0)) == 0.0
    assert max(feed(OpHabit(warmup=10, ops=("c", "u", "d", "t")), [*upd, *["c"] * 10], 0.0, 60.0)) >= 0.5


def test_score_one_does_not_learn() -> None:
    h = soft_deleter(n=300)
    w = Write(op="d", t=300 * 60.0)
    first = [h.score_one(w) for _ in range(5)]
    assert first == [first[0]] * 5
    assert h.n == 300


def test_explanation_text_pinned() -> None:
    h = OpHabit(window=HOUR, warmup=100)
    feed(h, ["u" if i % 1000 < 2 else "c" for i in range(2000)], 0.0, 30.0)  # 4 updates in 2,000 writes
    t = 2000 * 30.0 + 2 * HOUR
    feed(h, ["c"] * 37 + ["d", "d"], t, 60.0)
    (c,) = h.explain(Write(op="d", t=t + 39 * 60.0))
    assert c.text == (
        "3 hard deletes among this agent's 40 writes in the last hour; its usual share of deletes is 0% "
        "(none in 2,000 writes); at that share, 3 or more in 40 writes has a chance of 2.2e-06"
    )
    assert (c.feature, c.value, c.expected_low, c.expected_high) == ("d_per_3600s", 3.0, 0.0, 1.0)
    (c,) = h.explain(Write(op="u", t=t + 39 * 60.0))
    assert c.text is not None and "its usual share of updates is 0.2% (4 in 2,000 writes)" in c.text


def test_spec_builds_and_engine_alerts_a_hard_deleting_agent() -> None:
    table = TableSpec(
        name="public.orders",
        topic="shop.public.orders",
        detectors=(OpHabitSpec(learning={"writes": 0, "seconds": 0}),),
    )
    eng = Engine([table])
    rng = random.Random(5)
    t0 = 1_700_000_000.0
    findings = []
    ops = ["u" if rng.random() < 0.3 else "c" for _ in range(600)] + ["c", "c", "d"] * 6
    for i, op in enumerate(ops):
        ch = Change(
            table="public.orders",
            agent_id="agent-1",
            run_id=None,
            op=op,
            commit_ts_us=int((t0 + i * 60.0) * 1e6),
            coords=("shop.public.orders", 0, i),
            x={},
        )
        findings += eng.process(ch)
    assert [f.detector for f in findings] == ["op_habit"]
    assert findings[0].severity == "critical"
    assert "hard deletes" in (findings[0].contributions[0].text or "")
