"""rhythm: an agent's writes in a short and a long window against its own rate at this hour, scaled by how busy its
table is; the table's shared traffic counts in the engine (linking, eviction, table checkpoints)."""

from __future__ import annotations

import math
import pickle
import random
import re

import pytest
from pydantic import ValidationError

from detectors.engine import Change, Engine, KafkaCoords
from detectors.models import (
    Rhythm,
    TableTraffic,
    Write,
    negative_binomial_quantile,
    negative_binomial_tail,
)
from detectors.spec import Learning, RhythmSpec, TableSpec

DAY, HOUR = 86_400.0, 3_600.0


def day_curve(t: float) -> float:
    """x0.3 at 02:00 UTC, x1.7 at 14:00, as the scenario fleet's."""
    return 1.0 + 0.7 * math.cos(2 * math.pi * ((t / HOUR) % 24 - 14) / 24)


def fleet(rates: list[float], days: float, rng: random.Random, factor: object = None) -> list[tuple[float, int]]:
    """(t, agent index) of Poisson writes, agent i at rates[i] writes per 10 minutes times the day curve (and
    ``factor(t, i)`` if given), in 1-minute slices, sorted by time."""
    out: list[tuple[float, int]] = []
    for minute in range(int(days * 1440)):
        t0 = minute * 60.0
        for i, r in enumerate(rates):
            lam = r / 10 * day_curve(t0 + 30) * (factor(t0, i) if callable(factor) else 1.0)
            # Poisson count in the minute (Knuth: small rates), uniform times within it
            k, p, limit = 0, 1.0, math.exp(-lam)
            while True:
                p *= rng.random()
                if p <= limit:
                    break
                k += 1
            out.extend((t0 + rng.uniform(0, 60), i) for _ in range(k))
    out.sort()
    return out


def replay(writes: list[tuple[float, int]], dets: list[Rhythm]) -> list[list[float]]:
    """Score then learn each write with its agent's detector; the scores per agent."""
    scores: list[list[float]] = [[] for _ in dets]
    for t, i in writes:
        w = Write(t=t)
        scores[i].append(dets[i].score_one(w))
        dets[i].learn_one(w)
    return scores


def test_negative_binomial_tail_is_the_sum_of_its_terms() -> None:
    for k, mean, shape in ((1, 0.2, 2.0), (7, 1.0, 3.3), (40, 10.0, 4.0), (3, 5.0, 1e6)):
        q = mean / (mean + shape)

        def pmf(j: int, q: float = q, shape: float = shape) -> float:
            return math.exp(
                math.lgamma(j + shape)
                - math.lgamma(shape)
                - math.lgamma(j + 1)
                + shape * math.log1p(-q)
                + j * math.log(q)
            )

        below = sum(pmf(j) for j in range(k))
        assert negative_binomial_tail(k, mean, shape) == pytest.approx(1 - below, rel=1e-6, abs=1e-12)
    assert negative_binomial_tail(0, 3.0, 2.0) == 1.0
    assert negative_binomial_tail(2, 0.0, 2.0) == 0.0
    # the quantile is where the cumulative chance first reaches the level
    assert negative_binomial_tail(negative_binomial_quantile(0.999, 10.0, 4.0) + 1, 10.0, 4.0) < 1e-3


def test_a_low_rate_agents_ten_minute_x20_burst_alerts_within_the_burst() -> None:
    rng = random.Random(1)
    table = TableTraffic(bucket=300.0)
    rates = [1.0] + [3.0] * 9  # agent 0 writes about once in 10 minutes, its table ten times more
    dets = [Rhythm(table=table) for _ in rates]
    replay(fleet(rates, 3, rng), dets)
    t0 = 3 * DAY + 8 * HOUR + 130.0  # where the day curve is 1: its usual is one write in 10 minutes
    burst = sorted(t0 + rng.uniform(0, 600) for _ in range(20))
    scores = []
    for t in burst:
        w = Write(t=t)
        scores.append(dets[0].score_one(w))
        dets[0].learn_one(w)
    first = next((i for i, s in enumerate(scores) if s >= 0.5), None)
    assert first is not None and first < 16, scores
    assert max(scores[:4]) < 0.5  # a few writes close together are its ordinary noise
    text = dets[0].explain(Write(t=burst[-1]))[0].text
    assert text is not None and re.fullmatch(
        r"\d+ writes in the last \d+ minutes \(usually 0 to \d at this hour\); a chance of \d\.\de-\d\d", text
    ), text


def test_a_fleet_wide_peak_is_no_agents_burst() -> None:
    rng = random.Random(2)
    rates = [0.5, 1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 3.0]
    spike = (3 * DAY + 10 * HOUR, 3 * DAY + 11 * HOUR)

    def x6(t: float, i: int) -> float:  # a sale: the whole fleet writes six times as much for an hour
        return 6.0 if spike[0] <= t < spike[1] else 1.0

    writes = fleet(rates, 3.5, rng, x6)
    shared = TableTraffic(bucket=300.0)
    with_table = replay(writes, [Rhythm(table=shared) for _ in rates])
    alone = replay(writes, [Rhythm() for _ in rates])  # the same agents, blind to their table
    in_spike = [j for j, (t, _) in enumerate(writes) if spike[0] <= t < spike[1]]
    assert in_spike
    assert max(max(s) for s in with_table) < 0.5
    # without the table's busyness, the x6 hour is a burst of the agents: the table is what excuses it
    assert max(max(s) for s in alone) >= 0.5


def test_a_nightly_job_is_judged_by_its_own_hour() -> None:
    rng = random.Random(3)
    table = TableTraffic(bucket=300.0)
    rates = [2.0] * 6
    writes = fleet(rates, 4, rng)
    # agent 0 also runs a job of 60 writes within 10 minutes every night at about 02:00
    for night in range(4):
        t0 = night * DAY + 2 * HOUR + rng.uniform(-300, 300)
        writes.extend((t0 + rng.uniform(0, 600), 0) for _ in range(60))
    writes.sort()
    dets = [Rhythm(table=table) for _ in rates]
    scores = replay(writes, dets)
    times = [t for t, i in writes if i == 0]
    judged = [s for s, t in zip(scores[0], times, strict=True) if t >= DAY + 12 * HOUR]
    assert judged and max(judged) < 0.5  # nights 2 to 4: its habit at that hour
    # the same job at 14:00 is not its habit
    t0 = 4 * DAY + 14 * HOUR
    out = []
    for t in sorted(t0 + rng.uniform(0, 600) for _ in range(60)):
        w = Write(t=t)
        out.append(dets[0].score_one(w))
        dets[0].learn_one(w)
    assert max(out) >= 0.5


def test_a_benign_doubling_for_an_hour_and_the_warm_up_stay_quiet() -> None:
    rng = random.Random(4)
    rates = [6.0, 2.0, 2.0, 2.0]
    hour = (2 * DAY + 15 * HOUR, 2 * DAY + 16 * HOUR)

    def x2(t: float, i: int) -> float:
        return 2.0 if i == 0 and hour[0] <= t < hour[1] else 1.0

    writes = fleet(rates, 3, rng, x2)
    table = TableTraffic(bucket=300.0)
    scores = replay(writes, [Rhythm(table=table) for _ in rates])
    assert max(scores[0]) < 0.5
    # before its warm-up (a day of its history) nothing is judged, however many writes
    d = Rhythm(table=TableTraffic(bucket=300.0))
    for i in range(200):
        assert d.score_one(Write(t=100.0 + i)) == 0.0
        d.learn_one(Write(t=100.0 + i))
    assert d.score_one(Write(t=400.0)) == 0.0 and d.explain(Write(t=400.0)) == []


def test_table_traffic_counts_every_agent_and_forgets_past_a_day() -> None:
    tt = TableTraffic(bucket=300.0)
    for i in range(12):
        tt.add(3_600.0 + i * 25.0)
    assert tt.count(3_600.0 // 300 + 0.0, 1) == 12
    assert tt.count((3_600.0 + 299.0) // 300, 1) == 12  # the same bucket
    assert tt.usual(3_600.0) is None  # hour 1 has not been seen whole yet
    tt.add(2 * DAY)  # a day later: the bucket's slot in the ring was reused
    assert tt.count(3_600.0 // 300, 1) == 0
    assert tt.usual(DAY + 3_600.0) == pytest.approx(1.0)  # 12 writes in hour 1's first of 12 buckets, then zeros
    tt.add(10.0)  # a write older than the last day is dropped, not counted in a reused slot
    assert tt.count(2 * DAY // 300, 1) == 1


def rhythm_engine() -> Engine:
    spec = TableSpec(
        name="public.t", topic="p.public.t", detectors=(RhythmSpec(),), learning=Learning(writes=0, seconds=0)
    )
    return Engine([spec])


def change(i: int, agent: str, t: float) -> Change:
    return Change("public.t", "c", agent, None, {}, int(t * 1e6), KafkaCoords("t", 0, i))


def test_the_engine_shares_one_table_traffic_and_relinks_it_after_eviction() -> None:
    spec = TableSpec(name="public.t", topic="p.public.t", detectors=(RhythmSpec(),), learning=Learning(writes=0))
    eng = Engine([spec], max_states=1)
    for i in range(40):
        eng.process(change(i, f"a{i % 2}", 100.0 + i))
    plan = eng.tables["public.t"].plans[0]
    assert plan.traffic is not None and plan.traffic.n == 40  # both agents' writes, one of them evicted each time
    st = eng.states[("public.t", "a1")]
    assert st.dets[0].table is plan.traffic  # type: ignore[attr-defined]
    blob = eng.store["public.t\x1fa0"]
    assert pickle.loads(blob).dets[0].table is None  # the table's counts are not in every agent's checkpoint
    # a table checkpoint carries them to a colder engine
    other = Engine([spec])
    assert other.restore_table("public.t", eng.table_checkpoint("public.t"))
    restored = other.tables["public.t"].plans[0].traffic
    assert restored is not None and restored.n == 40 and restored is not plan.traffic
    other.process(change(99, "a0", 200.0))
    assert other.states[("public.t", "a0")].dets[0].table is restored  # type: ignore[attr-defined]
    # a table without rhythm writes its table checkpoint as before (what an older worker reads)
    plain = Engine([TableSpec(name="public.t", topic="p.public.t", learning=Learning(writes=0))])
    assert len(pickle.loads(plain.table_checkpoint("public.t"))) == 3


def test_the_engine_alerts_a_burst_once_in_words() -> None:
    eng = rhythm_engine()
    rng = random.Random(5)
    writes = fleet([1.0, 3.0, 3.0, 3.0], 2, rng)
    for j, (t, i) in enumerate(writes):
        assert not eng.process(change(j, f"a{i}", t))
    t0 = 2 * DAY + 12 * HOUR
    findings = []
    for k in range(25):
        findings += eng.process(change(10_000 + k, "a0", t0 + k * 20.0))
    assert [(f.kind, f.severity, f.quarantine) for f in findings] == [("rhythm", "warning", False)]
    text = findings[0].contributions[0].text
    assert text is not None and "writes in the last" in text and "usually 0 to" in text


def test_spec_checks_its_windows() -> None:
    assert RhythmSpec(windows_seconds=(3600, 600)).build(TableSpec(name="a.b", topic="t"), None).spans == (2, 12)  # type: ignore[arg-type, attr-defined]
    with pytest.raises(ValidationError):
        RhythmSpec(windows_seconds=(60, 86_400))
    with pytest.raises(ValidationError):
        RhythmSpec(windows_seconds=())
    with pytest.raises(ValidationError):
        RhythmSpec(windows_seconds=(0, 600))
