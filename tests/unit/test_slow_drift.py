"""A slow cusum (issue 14, point 4): slow drift reported as info, and the options that make it quiet on normal data."""

from __future__ import annotations

import math
import random

import pytest

from detectors.models import Cusum
from detectors.spec import CusumSpec, FeatureSpec, TableSpec
from detectors.write import Write


def slow(**kw: object) -> Cusum:
    return Cusum("amount", k=0.25, h=25.0, warmup=100, log=True, **kw)  # type: ignore[arg-type]


def feed(c: Cusum, values: list[float], op: str = "c") -> list[float]:
    out = []
    for v in values:
        w = Write({"amount": v}, op)
        out.append(c.score_one(w))
        c.learn_one(w)
    return out


def lognormal(rng: random.Random, n: int, median: float = 40.0, sigma: float = 0.35) -> list[float]:
    return [median * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def test_a_slow_cusum_stays_quiet_on_a_long_normal_stream() -> None:
    rng = random.Random(11)
    for _ in range(5):
        assert max(feed(slow(), lognormal(rng, 5_000))) < 1.0


def test_a_slow_cusum_sums_a_drift_of_two_percent_an_hour_that_no_write_shows() -> None:
    rng = random.Random(5)
    c = slow()
    feed(c, lognormal(rng, 400))
    # 15 writes an hour for 24 hours, each hour 2% above the last: x1.6 at the end, 1.4 of the agent's sigmas.
    drift = [40.0 * 1.02 ** (i / 15) * math.exp(rng.gauss(0.0, 0.35)) for i in range(360)]
    scores = feed(c, drift)
    first = scores.index(1.0)
    assert 100 < first < 300  # after hours, not at once: between about 7 and 20 hours
    # The critical cusum of the scenario config (k 1, h 10) sees nothing in the first 12 hours.
    fast = Cusum("amount", k=1.0, h=10.0, warmup=30, log=True)
    feed(fast, lognormal(random.Random(5), 400))
    assert max(feed(fast, drift[:180])) < 1.0


def test_ops_leave_out_the_updates_that_re_report_older_rows() -> None:
    rng = random.Random(2)
    c = slow(ops=["c"])
    feed(c, lognormal(rng, 300))
    n = c.n
    assert feed(c, [4_000.0] * 50, op="u") == [0.0] * 50  # an update's value: neither scored nor learned
    assert c.n == n
    assert max(feed(c, [4_000.0] * 5, op="c")) == 1.0


def test_a_frozen_reference_stops_learning_after_its_writes() -> None:
    rng = random.Random(4)
    frozen, learning = slow(reference=150), slow()
    values = lognormal(rng, 600)
    feed(frozen, values[:150])
    feed(learning, values[:150])
    at_150 = frozen.levels()["amount"]
    assert learning.levels()["amount"] == pytest.approx(at_150)  # the same until then
    feed(frozen, values[150:])
    feed(learning, values[150:])
    assert frozen.levels()["amount"] == at_150 and learning.levels()["amount"] != pytest.approx(at_150, rel=1e-4)


def test_the_spec_builds_it_from_the_yaml_fields() -> None:
    spec = CusumSpec.model_validate(
        {
            "kind": "cusum",
            "name": "slow_cusum",
            "feature": "amount",
            "k": 0.25,
            "h": 25,
            "ops": ["c"],
            "reference_writes": 200,
            "severity": "info",
        }
    )
    table = TableSpec(
        name="public.refunds", topic="t", features=(FeatureSpec(name="amount", column="amount"),), detectors=(spec,)
    )
    det = spec.build(table, None)  # type: ignore[arg-type]
    assert isinstance(det, Cusum) and det.ops == frozenset({"c"}) and det.reference == 200 and det.k == 0.25
