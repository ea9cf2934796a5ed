"""One alert summary per detector kind, pinned: the words and units a person reads, no number without meaning."""

from __future__ import annotations

import random

from detectors.models import (
    CategoricalNovelty,
    Cusum,
    DuplicateKey,
    LevelDrift,
    OpBurstCeiling,
    OpMix,
    RateCeiling,
    Rhythm,
    TableTraffic,
    TableValues,
    Volume,
    ZScore,
)
from detectors.write import Write
from stream.pipeline import summarize


def test_rate_and_op_burst_say_how_many_writes_of_what_in_how_long() -> None:
    r = RateCeiling(max_events=5, window=60.0)
    for i in range(5):
        r.learn_one(Write(op="c", t=float(i)))
    assert summarize(r.explain(Write(op="c", t=6.0))[0]) == "6 writes in 60 s (ceiling 5)"
    b = OpBurstCeiling(max_events=3, ops=("d", "t"))
    for i in range(3):
        b.learn_one(Write(op="d", t=float(i)))
    assert summarize(b.explain(Write(op="d", t=4.0))[0]) == "4 deletes and truncates in 60 s (ceiling 3)"


def test_novelty_says_whose_value_is_new() -> None:
    table = TableValues()
    n = CategoricalNovelty(["status"], warmup=3, known=table)
    for v in ["paid", "shipped", "paid"]:
        n.learn_one(Write(categories={"status": v}))
    assert summarize(n.explain(Write(categories={"status": "closed"}))[0]) == (
        "status='closed': a value no agent of the table ever wrote"
    )
    other = CategoricalNovelty(["status"], warmup=0, known=table, table_scope=False)
    other.learn_one(Write(categories={"status": "paid"}))
    assert summarize(other.explain(Write(categories={"status": "shipped"}))[0]) == (
        "status='shipped': a value this agent never wrote (it wrote 1 other)"
    )


def test_duplicate_says_how_long_after_the_first_use() -> None:
    d = DuplicateKey(horizon=3600.0)
    d.learn_one(Write(t=100.0, idempotency_key="k1"))
    assert summarize(d.explain(Write(t=142.0, idempotency_key="k1"))[0]) == (
        "idempotency key applied again 42 s after its first use (horizon 3,600 s)"
    )


def test_op_mix_gives_shares_in_percent_and_a_mass_change_first() -> None:
    m = OpMix(window=60.0, warmup=5, min_events=10, max_rows_per_tx=50)
    for minute in range(20):
        for i in range(10):
            m.learn_one(Write(op="u" if i == 0 else "c", t=minute * 60.0 + i))
    for i in range(10):
        m.learn_one(Write(op="d", t=21 * 60.0 + i))
    assert summarize(m.explain(Write(op="d", t=21 * 60.0 + 11))[0]) == (
        "deletes and updates: 100% of this window's 11 writes (usually 0% to 37%)"
    )
    for _ in range(50):
        m.learn_one(Write(op="d", t=22 * 60.0, tx_id="tx-9"))
    assert summarize(m.explain(Write(op="d", t=22 * 60.0, tx_id="tx-9"))[0]) == (
        "51 rows (deletes and updates) in one transaction (limit 50)"
    )


def test_volume_gives_the_usual_ceiling_in_writes() -> None:
    v = Volume(window=60.0, warmup=10)
    for minute in range(30):
        for i in range(5):
            v.learn_one(Write(t=minute * 60.0 + i))
    for i in range(80):
        v.learn_one(Write(t=31 * 60.0 + i * 0.5))
    assert summarize(v.explain(Write(t=31 * 60.0 + 41))[0]) == "81 writes in 60 s (usually up to 11)"


def test_rhythm_gives_the_count_its_usual_range_at_this_hour_and_how_busy_the_table_is() -> None:
    table = TableTraffic(bucket=300.0)
    quiet, fleet = Rhythm(table=table), Rhythm(table=table)
    for i in range(2 * 288):  # two days: the quiet agent writes once in 10 minutes, the fleet 10 times in 5
        t = i * 300.0
        if i % 2 == 0:
            quiet.learn_one(Write(t=t + 7.0))
        for j in range(10):
            fleet.learn_one(Write(t=t + 30.0 * j))
    t = 2 * 86_400.0 + 9 * 3_600 + 60
    for i in range(12):
        quiet.learn_one(Write(t=t + 20.0 * i))
    w = Write(t=t + 240.0)
    assert summarize(quiet.explain(w)[0]) == (
        "13 writes in the last 5 minutes (usually 0 to 4 at this hour); a chance of 4.5e-10"
    )
    for i in range(60):  # the rest of the table three times as busy
        fleet.learn_one(Write(t=t + 4.0 * i))
    assert summarize(quiet.explain(w)[0]) == (
        "13 writes in the last 5 minutes (usually 0 to 9 at this hour with the table 3.4x as busy as usual); "
        "a chance of 5.8e-05"
    )


def test_value_models_give_the_value_and_its_usual_range_in_the_columns_units() -> None:
    z = ZScore(log_features={"amount"})
    for i in range(50):
        z.learn_one(Write({"amount": 20.0 + i % 5}))
    assert summarize(z.explain(Write({"amount": 450.0}))[0]) == "amount = 450.00 (expected 17.81 to 27.02, z=+44.8)"
    c = Cusum("amount")
    rng = random.Random(1)
    for _ in range(300):
        c.learn_one(Write({"amount": rng.gauss(100.0, 10.0)}))
    for _ in range(6):
        c.learn_one(Write({"amount": 130.0}))
    assert summarize(c.explain(Write({"amount": 130.0}))[0]) == (
        "amount = 130, one of a run of writes off its usual 71.49 to 131.20 "
        "(sustained shift: summed excess 13.2 std, alerts at 10)"
    )


def test_drift_says_from_which_level_to_which() -> None:
    d = LevelDrift("amount", warmup=50)
    w = Write({"amount": 0.0})
    for i in range(2000):
        w = Write({"amount": 10.0 + (i % 5) if i < 1000 else 30.0 + (i % 5)})
        d.learn_one(w)
        if d.score_one(w) == 1.0:
            break
    assert summarize(d.explain(w)[0]) == "amount: its level moved from about 12.45 to 27.03 (ADWIN)"
