"""Tests for detectors.models: ZScore, RiverModel, WindowCounter, RateCeiling, OpBurstCeiling."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from detectors.models import (
    OpBurstCeiling,
    RateCeiling,
    RiverModel,
    WindowCounter,
    ZScore,
    signed_expm1,
    signed_log1p,
    t_over_z,
)
from detectors.spec import ZScoreSpec
from detectors.write import Write

DEFAULT_THRESHOLD = ZScoreSpec().threshold  # 0.7


def lognormal(n: int, mean: float = 50.0, sigma: float = 0.25, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [mean * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def trained_zscore(values: list[float], log: bool = True, **kw) -> ZScore:
    m = ZScore(log_features={"amount"} if log else (), **kw)
    for v in values:
        m.learn_one(Write({"amount": v}))
    return m


# --- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [-12345.5, -1.0, 0.0, 0.25, 1.0, 999.0, 1e12])
def test_signed_log1p_round_trips_through_signed_expm1(v):
    assert signed_expm1(signed_log1p(v)) == pytest.approx(v, rel=1e-12, abs=1e-12)


def test_signed_log1p_keeps_the_sign():
    assert signed_log1p(9.0) == pytest.approx(math.log(10.0))
    assert signed_log1p(-9.0) == pytest.approx(-math.log(10.0))


# --- ZScore -------------------------------------------------------------------------------------


def test_zscore_in_distribution_values_score_near_zero():
    m = trained_zscore(lognormal(400, seed=1))
    assert m.n == 400
    assert m.score_one(Write({"amount": 50.0})) < 0.05
    held_out = [m.score_one(Write({"amount": v})) for v in lognormal(200, seed=2)]
    assert statistics.median(held_out) < 0.2
    assert max(held_out) < 0.5  # 0.5 is half_z = 4 standard deviations


def test_zscore_flags_a_20x_value_with_log_transform():
    m = trained_zscore(lognormal(400, seed=1))
    assert m.score_one(Write({"amount": 20 * 50.0})) > DEFAULT_THRESHOLD
    # On the log scale a 20x drop is as strange as a 20x rise ...
    assert m.score_one(Write({"amount": 50.0 / 20})) > DEFAULT_THRESHOLD


def test_zscore_without_log_transform_misses_a_20x_drop():
    # ... which is what the log transform is for: on the raw scale 2.5 is only ~4 std below a mean of 50.
    m = trained_zscore(lognormal(400, seed=1), log=False)
    assert m.score_one(Write({"amount": 50.0 / 20})) < 0.6  # below even the example config's threshold


def test_zscore_score_is_z_over_z_plus_half_z():
    m = ZScore(half_z=4.0)
    m.learn_one(Write({"x": 0.0}))
    m.learn_one(Write({"x": 2.0}))  # mean 1, sample variance 2
    # The predictive std of a new value: the sample's, widened for n = 2 (Student-t with 1 df, and 1 + 1/n).
    std = math.sqrt(2.0) * t_over_z(1) * math.sqrt(1.5)
    assert m.score_one(Write({"x": 1.0 + 4.0 * std})) == pytest.approx(0.5)
    assert m.score_one(Write({"x": 1.0 - 12.0 * std})) == pytest.approx(12.0 / 16.0)


def test_zscore_needs_two_observations_before_scoring():
    m = ZScore()
    assert m.score_one(Write({"x": 1e9})) == 0.0
    m.learn_one(Write({"x": 1.0}))
    assert m.score_one(Write({"x": 1e9})) == 0.0
    assert m.explain(Write({"x": 1e9})) == []
    m.learn_one(Write({"x": 1.0}))
    assert m.score_one(Write({"x": 1e9})) > 0.99


def test_zscore_constant_feature_uses_min_std_not_inf_or_nan():
    m = ZScore(min_std=0.05)
    for _ in range(100):
        m.learn_one(Write({"items": 3.0}))
    same, near, far = (m.score_one(Write({"items": v})) for v in (3.0, 3.1, 4.0))
    assert same == 0.0
    assert near == pytest.approx(2.0 / (2.0 + 4.0))  # |z| = 0.1 / 0.05
    assert far == pytest.approx(20.0 / (20.0 + 4.0))
    [c] = m.explain(Write({"items": 4.0}))
    assert c.z == pytest.approx(20.0)
    assert (c.expected_low, c.expected_high) == (pytest.approx(2.85), pytest.approx(3.15))
    assert all(math.isfinite(v) for v in (same, near, far, c.expected_low, c.expected_high))


def test_zscore_constant_log_feature_is_finite():
    m = ZScore(log_features={"amount"})
    for _ in range(50):
        m.learn_one(Write({"amount": 0.0}))
    s = m.score_one(Write({"amount": 1e6}))
    assert math.isfinite(s) and 0.98 < s < 1.0  # |z| = log1p(1e6) / 0.05 = 276
    [c] = m.explain(Write({"amount": 1e6}))
    assert math.isfinite(c.z)
    assert c.expected_low == pytest.approx(signed_expm1(-0.15))
    assert c.expected_high == pytest.approx(signed_expm1(0.15))


def test_zscore_only_scores_its_features():
    m = ZScore(features={"amount"})
    for v in lognormal(100):
        m.learn_one(Write({"amount": v, "other": 1.0}))
    assert m.score_one(Write({"amount": 50.0, "other": 1e9})) < 0.1
    assert [c.feature for c in m.explain(Write({"amount": 50.0, "other": 1e9}))] == ["amount"]


def test_zscore_explain_orders_by_abs_z_with_range_in_original_units():
    amounts = lognormal(300, seed=4)
    items = [float(1 + i % 5) for i in range(300)]  # 1..5, not log-transformed
    m = ZScore(log_features={"amount"})
    for a, i in zip(amounts, items, strict=True):
        m.learn_one(Write({"amount": a, "items": i}))

    logs = [math.log1p(a) for a in amounts]
    mu, sd = statistics.fmean(logs), statistics.stdev(logs) * t_over_z(299) * math.sqrt(1 + 1 / 300)
    imu, isd = statistics.fmean(items), statistics.stdev(items) * t_over_z(299) * math.sqrt(1 + 1 / 300)

    amount_big = m.explain(Write({"items": 4.0, "amount": 1000.0}))
    assert [c.feature for c in amount_big] == ["amount", "items"]
    top = amount_big[0]
    assert top.value == 1000.0  # original units, not log1p(1000)
    assert top.z == pytest.approx((math.log1p(1000.0) - mu) / sd, rel=1e-6)
    assert top.expected_low == pytest.approx(math.expm1(mu - 3 * sd), rel=1e-6)
    assert top.expected_high == pytest.approx(math.expm1(mu + 3 * sd), rel=1e-6)
    assert top.expected_low < 50.0 < top.expected_high < 1000.0
    second = amount_big[1]
    assert second.expected_low == pytest.approx(imu - 3 * isd, rel=1e-6)
    assert second.expected_high == pytest.approx(imu + 3 * isd, rel=1e-6)

    # Ordering is by |z|: a very small amount (negative z) still comes before mildly high items ...
    small = m.explain(Write({"items": 5.0, "amount": 0.5}))
    assert [c.feature for c in small] == ["amount", "items"]
    assert small[0].z < 0
    # ... and items come first once they are the stranger feature.
    items_big = m.explain(Write({"items": 500.0, "amount": 55.0}))
    assert [c.feature for c in items_big] == ["items", "amount"]
    assert abs(items_big[0].z) > abs(items_big[1].z)


# --- RiverModel ---------------------------------------------------------------------------------


def test_river_half_space_trees_scores_in_unit_interval():
    rng = random.Random(2)
    m = RiverModel("anomaly.HalfSpaceTrees", {"n_trees": 5, "height": 6, "window_size": 50, "seed": 1})
    for i in range(120):
        m.learn_one(Write({"amount": 50 * math.exp(rng.gauss(0, 0.2)), "items": 1.0 + i % 3}))
    assert m.n == 120
    normal = [
        m.score_one(Write({"amount": 50 * math.exp(rng.gauss(0, 0.2)), "items": 1.0 + i % 3})) for i in range(30)
    ]
    outliers = [m.score_one(Write({"amount": v, "items": 2.0})) for v in (5000.0, 0.5, -100.0)]
    assert all(0.0 <= s <= 1.0 for s in normal + outliers)
    assert min(outliers) > statistics.fmean(normal)


def test_river_unknown_model_name_raises_value_error():
    with pytest.raises(ValueError, match="NoSuchModel"):
        RiverModel("anomaly.NoSuchModel")


def test_river_model_selects_features_and_explains_without_ranges():
    m = RiverModel("anomaly.HalfSpaceTrees", {"n_trees": 2, "height": 3, "window_size": 10, "seed": 1},
                   scaler="none", features=["amount"])
    m.learn_one(Write({"amount": 0.5, "ignored": 7.0}))
    [c] = m.explain(Write({"amount": 0.25, "ignored": 7.0}))
    assert (c.feature, c.value, c.expected_low, c.expected_high, c.z) == ("amount", 0.25, None, None, None)


# --- WindowCounter ------------------------------------------------------------------------------


def test_window_counter_counts_expire_after_the_window():
    w = WindowCounter(60.0)  # 8 slots of 7.5 s
    for t in range(10):
        w.add(float(t))
    assert w.count(10.0) == 10
    assert w.count(59.0) == 10
    assert w.count(60.0) == 2  # the slot [0, 7.5) held t = 0..7
    assert w.count(67.5) == 0
    assert w.count(10_000.0) == 0
    w.add(10_000.0)
    assert w.count(10_000.0) == 1


def test_window_counter_partial_expiry_and_weights():
    w = WindowCounter(60.0)
    w.add(0.0)
    w.add(30.0, weight=5)
    assert w.count(30.0) == 6
    assert w.count(65.0) == 5
    assert w.count(95.0) == 0


def test_window_counter_late_events_count():
    w = WindowCounter(60.0)
    w.add(100.0)
    w.add(95.0)  # late but inside the window: its own slot
    assert w.count(100.0) == 2
    w.add(10.0)  # older than the window: still counted (in the oldest slot) rather than lost
    assert w.count(100.0) == 3
    # The oldest slot is the first to go; 95 and 100 stay until their own slots expire.
    assert w.count(105.0) == 2
    assert w.count(149.9) == 2
    assert w.count(150.0) == 1  # slot [90, 97.5) is 8 slots old
    assert w.count(157.5) == 0


# --- RateCeiling / OpBurstCeiling ---------------------------------------------------------------


def run(guard, events):
    out = []
    for op, t in events:
        w = Write(op=op, t=t)
        out.append(guard.score_one(w))
        guard.learn_one(w)
    return out


def test_rate_ceiling_fires_exactly_above_max_events():
    g = RateCeiling(max_events=5, window=60.0)
    assert run(g, [("c", 1.0)] * 7) == [0.0] * 5 + [1.0, 1.0]
    assert g.n == 7
    [c] = g.explain(Write(op="c", t=1.0))
    assert (c.feature, c.value, c.expected_low, c.expected_high) == ("events_per_60s", 8.0, 0.0, 5.0)


def test_rate_ceiling_counts_every_op_and_resets_after_the_window():
    g = RateCeiling(max_events=3, window=60.0)
    assert run(g, [("c", 0.0), ("u", 1.0), ("d", 2.0), ("r", 3.0)]) == [0.0, 0.0, 0.0, 1.0]
    assert g.score_one(Write(op="c", t=70.0)) == 0.0


def test_op_burst_fires_on_the_delete_after_max_events():
    g = OpBurstCeiling(max_events=3, window=60.0, ops=("d", "t"))
    assert run(g, [("d", 0.0)] * 4) == [0.0, 0.0, 0.0, 1.0]
    [c] = g.explain(Write(op="d", t=0.0))
    assert (c.feature, c.value, c.expected_high) == ("d/t_per_60s", 5.0, 3.0)


def test_op_burst_ignores_non_destructive_ops():
    g = OpBurstCeiling(max_events=3, window=60.0)
    scores = run(g, [(op, float(i) / 10) for i, op in enumerate(["c", "u", "r"] * 40)])
    assert scores == [0.0] * 120
    # Those 120 writes did not fill the counter: three deletes still pass, the fourth fires.
    assert run(g, [("d", 13.0)] * 4) == [0.0, 0.0, 0.0, 1.0]
    assert g.n == 124


def test_op_burst_truncate_fires_alone():
    g = OpBurstCeiling(max_events=1000, window=60.0)
    assert g.score_one(Write(op="t", t=0.0)) == 1.0
    assert g.score_one(Write(op="d", t=0.0)) == 0.0


def test_op_burst_truncate_ignored_when_not_in_ops():
    g = OpBurstCeiling(max_events=1, window=60.0, ops=("d",))
    assert run(g, [("t", 0.0), ("t", 1.0), ("d", 2.0), ("d", 3.0)]) == [0.0, 0.0, 0.0, 1.0]
