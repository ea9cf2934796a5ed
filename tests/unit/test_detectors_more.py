"""Categorical novelty, duplicate idempotency keys, level drift and rules: alone, and wired through the engine."""

from __future__ import annotations

import json
import math
import random

import pytest
from pydantic import ValidationError

from detectors.engine import Engine, KafkaCoords
from detectors.models import CategoricalNovelty, DuplicateKey, LevelDrift, Rule, TableValues
from detectors.spec import TableSpec
from detectors.write import Write
from stream.pipeline import Router


def test_novelty_counts_table_new_values_at_once_and_agent_new_values_after_warmup() -> None:
    known = TableValues()
    veteran = CategoricalNovelty(["reason"], warmup=5, known=known)
    for r in ["late", "damaged"] * 5:
        veteran.learn_one(Write(categories={"reason": r}))
    newcomer = CategoricalNovelty(["reason"], warmup=5, known=known)
    # the newcomer has not warmed up: values the table knows are fine, a value nobody used is not
    assert newcomer.score_one(Write(categories={"reason": "damaged"})) == 0.0
    assert newcomer.score_one(Write(categories={"reason": "goodwill"})) == 1.0
    veteran_other = CategoricalNovelty(["reason"], warmup=5, known=known, table_scope=False)
    for _ in range(5):
        veteran_other.learn_one(Write(categories={"reason": "late"}))
    # new to this agent after its warm-up
    assert veteran_other.score_one(Write(categories={"reason": "damaged"})) == 1.0
    assert veteran.score_one(Write(categories=None)) == 0.0
    assert veteran.score_one(Write(categories={"other": "x"})) == 0.0
    assert "reason='goodwill'" in veteran.explain(Write(categories={"reason": "goodwill"}))[0].feature


def test_novelty_memory_is_bounded() -> None:
    n = CategoricalNovelty(["k"], warmup=1, max_values=10)
    for i in range(1000):
        n.learn_one(Write(categories={"k": f"v{i}"}))
    assert len(n._seen["k"]) == 10


def test_duplicate_keys_within_the_horizon_only_for_the_configured_ops() -> None:
    d = DuplicateKey(horizon=60.0, max_keys=3, ops=("c",))
    d.learn_one(Write(op="c", t=0.0, idempotency_key="a"))
    assert d.score_one(Write(op="c", t=10.0, idempotency_key="a")) == 1.0
    assert d.score_one(Write(op="u", t=10.0, idempotency_key="a")) == 0.0  # an update may carry the key
    assert d.score_one(Write(op="c", t=61.0, idempotency_key="a")) == 0.0
    for k in "bcde":
        d.learn_one(Write(op="c", t=1.0, idempotency_key=k))
    # the oldest was forgotten
    assert len(d._keys) == 3 and d.score_one(Write(op="c", t=2.0, idempotency_key="a")) == 0.0


def test_level_drift_does_not_fire_on_a_stable_heavy_tailed_stream() -> None:
    rng = random.Random(4)
    d = LevelDrift("amount", warmup=100)
    fired = 0
    for _ in range(20_000):
        v = 40.0 * rng.lognormvariate(0.0, 0.35)
        fired += d.score_one(Write({"amount": v})) > 0
        d.learn_one(Write({"amount": v}))
    assert fired <= 2


def test_rules_compare_features_and_categories_and_count_over_a_window() -> None:
    r = Rule([("reason", "in", ("goodwill", "other")), ("amount", ">=", 100.0)], ops=("c", "u"), count=1)
    assert r.score_one(Write({"amount": 150.0}, op="c", t=0.0, categories={"reason": "goodwill"})) == 1.0
    assert r.score_one(Write({"amount": 150.0}, op="d", t=0.0, categories={"reason": "goodwill"})) == 0.0
    assert r.score_one(Write({"amount": 50.0}, op="c", t=0.0, categories={"reason": "goodwill"})) == 0.0
    assert r.score_one(Write({"amount": 150.0}, op="c", t=0.0, categories={"reason": "late"})) == 0.0
    typed = Rule([("reason", ">", 3.0)])
    # text against a number: no match, no crash
    assert typed.score_one(Write(op="c", t=0.0, categories={"reason": "text"})) == 0.0


SPEC = {
    "name": "public.refunds",
    "topic": "shop.public.refunds",
    "features": [{"name": "amount", "column": "amount", "transform": "log"}],
    "categories": ["reason"],
    "idempotency_key": "idempotency_key",
    "detectors": [
        {"kind": "novelty", "columns": ["reason"], "warmup": 10},
        {"kind": "duplicate", "horizon_seconds": 600, "severity": "critical"},
        {
            "kind": "rule",
            "name": "huge",
            "when": [{"field": "amount", "op": ">", "value": 10000}],
            "severity": "critical",
        },
        {"kind": "drift", "feature": "amount", "warmup": 50},
    ],
}


def event(i: int, agent: str, reason: str, key: str, amount: float = 40.0) -> bytes:
    after = {"id": i, "amount": amount, "reason": reason, "agent_id": agent, "idempotency_key": key}
    return json.dumps(
        {
            "op": "c",
            "after": after,
            "source": {"ts_ms": 1_700_000_000_000 + i * 1000, "schema": "public", "table": "refunds"},
        }
    ).encode()


def test_the_engine_runs_them_from_debezium_events() -> None:
    spec = TableSpec.model_validate(SPEC)
    router, engine = Router([spec]), Engine([spec])
    found = []
    for i in range(40):
        ch = router.route(
            "shop.public.refunds", event(i, "a1", ["late", "damaged"][i % 2], f"k{i}"), KafkaCoords("t", 0, i)
        )
        assert not isinstance(ch, str) and ch.categories == {"reason": ["late", "damaged"][i % 2]}
        assert ch.idempotency_key == f"k{i}" and ch.tx_id is None
        found += engine.process(ch)
    assert found == []
    ch = router.route("shop.public.refunds", event(40, "a1", "goodwill", "k40"), KafkaCoords("t", 0, 40))
    assert not isinstance(ch, str)
    assert [f.detector for f in engine.process(ch)] == ["novelty"]
    dup = []
    for i in range(41, 44):  # a retry loop: the same effect applied again and again
        ch = router.route("shop.public.refunds", event(i, "a1", "late", "k39"), KafkaCoords("t", 0, i))
        assert not isinstance(ch, str)
        dup += engine.process(ch)
    assert [(f.detector, f.quarantine) for f in dup] == [("duplicate", True)]
    assert len(dup[0].triggers) == 2
    ch = router.route("shop.public.refunds", event(50, "a2", "late", "k50", amount=50_000.0), KafkaCoords("t", 0, 50))
    assert not isinstance(ch, str)
    assert "huge" in [f.detector for f in engine.process(ch)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"detectors": [{"kind": "novelty", "columns": ["nope"]}]}, "not in the table's categories"),
        ({"idempotency_key": None}, "needs the table's idempotency_key"),
        ({"detectors": [{"kind": "drift", "feature": "nope"}]}, "unknown feature"),
        ({"detectors": [{"kind": "rule", "when": [{"field": "nope", "op": ">", "value": 1}]}]}, "neither features"),
        ({"detectors": [{"kind": "rule", "when": [{"field": "amount", "op": "~=", "value": 1}]}]}, "op"),
    ],
)
def test_bad_detector_settings_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TableSpec.model_validate({**SPEC, **change})


def test_volume_learns_the_agents_own_baseline_and_its_ceiling_is_hard() -> None:
    from detectors.models import Volume

    v = Volume(window=60.0, warmup=10, max_events=200)
    for minute in range(60):
        for i in range(3 + minute % 3):  # 3-5 writes a minute
            v.learn_one(Write(op="c", t=minute * 60.0 + i))
    assert v.score_one(Write(op="c", t=60 * 60.0)) < 0.3
    for i in range(12):  # 12 in a minute: a lot for this agent, not for another
        v.learn_one(Write(op="c", t=61 * 60.0 + i))
    assert v.score_one(Write(op="c", t=61 * 60.0 + 13)) < 0.6
    for i in range(60):
        v.learn_one(Write(op="c", t=62 * 60.0 + i * 0.5))
    assert v.score_one(Write(op="c", t=62 * 60.0 + 31)) > 0.7
    ceiling = Volume(window=60.0, warmup=1000, max_events=5)
    for i in range(5):
        ceiling.learn_one(Write(op="c", t=float(i)))
    assert ceiling.score_one(Write(op="c", t=6.0)) == 1.0  # hard ceiling holds during warm-up too


def test_op_mix_flags_a_mass_update_in_one_transaction_through_the_router() -> None:
    spec = TableSpec.model_validate(
        {
            "name": "public.orders",
            "topic": "shop.public.orders",
            "features": [{"name": "total", "column": "total"}],
            "detectors": [{"kind": "op_mix", "max_rows_per_tx": 20}],
        }
    )
    router, engine = Router([spec]), Engine([spec])

    def update(i: int, tx: int) -> bytes:
        row = {"id": i, "total": 10.0, "agent_id": "bulk"}
        return json.dumps(
            {
                "op": "u",
                "before": row,
                "after": row,
                "source": {"ts_ms": 1_700_000_000_000 + i, "schema": "public", "table": "orders", "txId": tx},
            }
        ).encode()

    found = []
    for i in range(15):  # 15 single-row transactions: fine
        ch = router.route("shop.public.orders", update(i, 100 + i), KafkaCoords("t", 0, i))
        assert not isinstance(ch, str) and ch.tx_id == str(100 + i)
        assert ch.categories is None and ch.idempotency_key is None
        found += engine.process(ch)
    assert found == []
    for i in range(30):  # one transaction updating 30 rows
        ch = router.route("shop.public.orders", update(100 + i, 999), KafkaCoords("t", 0, 100 + i))
        assert not isinstance(ch, str)
        found += engine.process(ch)
    assert [f.detector for f in found] == ["op_mix"]
    assert found[0].contributions[0].feature == "rows_changed_in_transaction"  # what fired, first


# --- cusum: a sustained shift -----------------------------------------------------------------------


def _cusum_run(values: list[float], c: object) -> list[float]:
    from detectors.models import Cusum

    assert isinstance(c, Cusum)
    out = []
    for v in values:
        w = Write({"amount": v})
        out.append(c.score_one(w))
        c.learn_one(w)
    return out


def test_cusum_catches_a_sustained_x20_that_no_single_write_shows_for_a_wide_agent() -> None:
    import random

    from detectors.models import Cusum, ZScore

    rng = random.Random(3)
    normal = [math.exp(rng.gauss(math.log(50), 1.0)) for _ in range(400)]  # a wide agent: sigma 1 in log space
    shifted = [math.exp(rng.gauss(math.log(50 * 20), 1.0)) for _ in range(53)]  # x20 = +3 sigma in log space
    z, c = ZScore(log_features={"amount"}), Cusum("amount", log=True)
    for v in normal:
        w = Write({"amount": v})
        z.learn_one(w)
    assert max(_cusum_run(normal, c)[30:]) < 1.0
    zscores = [z.score_one(Write({"amount": v})) for v in shifted]
    assert sum(s >= 0.6 for s in zscores) < 3  # the zscore at its example threshold (6 std) barely sees it
    scores = _cusum_run(shifted, c)
    assert 1.0 in scores[:10], scores[:10]


def test_cusum_stays_quiet_on_a_long_normal_stream_and_rebases_after_a_lasting_shift() -> None:
    import random

    from detectors.models import Cusum

    rng = random.Random(11)
    c = Cusum("amount", rebase=50)
    quiet = _cusum_run([rng.gauss(100.0, 10.0) for _ in range(20_000)], c)
    assert max(quiet) < 1.0
    lasting = _cusum_run([rng.gauss(150.0, 10.0) for _ in range(300)], c)
    first = lasting.index(1.0)
    assert first < 10
    # After `rebase` writes past h the new level is the agent's normal: the alarm ends and stays off.
    assert max(lasting[first + 60 :]) < 1.0, lasting[first + 60 :]


def test_cusum_is_a_detector_kind_of_the_config() -> None:
    spec = TableSpec.model_validate(
        {**SPEC, "detectors": [{"kind": "cusum", "feature": "amount"}]}
    )
    assert spec.detectors[0].kind == "cusum"
    with pytest.raises(ValidationError, match="unknown feature"):
        TableSpec.model_validate({**SPEC, "detectors": [{"kind": "cusum", "feature": "nope"}]})


# --- periodic jobs: a nightly batch judged by its own previous runs ---------------------------------


def _nights_then_a_day_burst(
    m: object, kind: str, days: int = 8, batch_from: int = 3
) -> tuple[dict[int, float], float]:
    """An agent that creates 20 rows an hour and, from day ``batch_from`` on, updates 200 rows between 02:00 and
    02:20 every night; then, at 14:00 of day ``days``, 40 writes in ten minutes (updates for op_mix, creates for
    volume). Returns each night's score (at the batch's 100th update) and the daytime burst's last score."""
    from detectors.models import OpMix, Volume

    assert isinstance(m, OpMix | Volume)
    nights: dict[int, float] = {}
    for day in range(days):
        base = day * 86_400.0
        for hour in range(24):
            if hour == 2 and day >= batch_from:
                for i in range(200):
                    w = Write(op="u", t=base + 2 * 3600 + i * 6.0)
                    if i == 100:
                        nights[day] = m.score_one(w)
                    m.learn_one(w)
            for i in range(20):
                m.learn_one(Write(op="c", t=base + hour * 3600 + 1_800 + i * 60.0))
    burst = 0.0
    for i in range(40):
        w = Write(op="u" if kind == "op_mix" else "c", t=days * 86_400.0 + 14 * 3600 + i * 15.0)
        burst = m.score_one(w)
        m.learn_one(w)
    return nights, burst


@pytest.mark.parametrize("kind", ["op_mix", "volume"])
def test_a_nightly_batch_is_judged_by_its_previous_runs(kind: str) -> None:
    from detectors.models import OpMix, Volume

    def make(daily: bool) -> OpMix | Volume:
        if kind == "op_mix":
            return OpMix(window=3600.0, warmup=24, min_events=10, daily=daily)
        return Volume(window=3600.0, warmup=24, daily=daily)

    nights, burst = _nights_then_a_day_burst(make(True), kind)
    flat_nights, flat_burst = _nights_then_a_day_burst(make(False), kind)
    # The job's first night stands out either way (in a deployment the learning period covers it).
    assert nights[3] > 0.7 and flat_nights[3] > 0.7
    # From the second night on it is compared with its own runs.
    assert all(nights[d] < 0.4 for d in range(4, 8)), nights
    # Without the hour-of-day profile the job looks half-anomalous every night.
    assert all(flat_nights[d] > nights[d] + 0.1 for d in range(4, 8)), (flat_nights, nights)
    # A daytime burst is still judged against the agent's whole day, nights included: no better, no worse.
    assert burst == pytest.approx(flat_burst, abs=0.05), (burst, flat_burst)
