"""Tests for detectors.features: field paths, feature extraction and untrusted values."""

from __future__ import annotations

import hashlib
import math

import pytest

from detectors.features import Extractor, as_number, identity, lookup
from detectors.spec import FeatureSpec, TableSpec


def spec(agent_id: str = "row.agent_id", run_id: str | None = "row.run_id", features=()) -> TableSpec:
    return TableSpec(name="public.orders", topic="shop.public.orders", agent_id=agent_id, run_id=run_id,
                     features=features)


FEATURES = (
    FeatureSpec(name="total", column="total", transform="log"),
    FeatureSpec(name="items", column="items"),
    FeatureSpec(name="risk", column="meta.scores.risk"),
    FeatureSpec(name="total_change", column="total", delta=True, ops=("u",)),
)

BEFORE = {"agent_id": "old-agent", "run_id": "run-old", "total": 100.0, "items": 2, "meta": {"scores": {"risk": 0.25}}}
AFTER = {"agent_id": "new-agent", "run_id": "run-new", "total": 130.5, "items": 3, "meta": {"scores": {"risk": 0.5}}}


# --- provenance paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "before", "after", "expected"),
    [
        ("c", None, AFTER, ("new-agent", "run-new")),
        ("r", None, AFTER, ("new-agent", "run-new")),
        ("u", BEFORE, AFTER, ("new-agent", "run-new")),
        ("d", BEFORE, None, ("old-agent", "run-old")),
        ("t", None, None, (None, None)),
    ],
)
def test_row_path_reads_after_except_for_deletes(op, before, after, expected):
    assert Extractor(spec()).agent(op, before, after) == expected


def test_after_and_before_paths_read_that_image_whatever_the_op():
    ex = Extractor(spec(agent_id="after.agent_id", run_id="before.run_id"))
    assert ex.agent("u", BEFORE, AFTER) == ("new-agent", "run-old")
    assert ex.agent("d", BEFORE, None) == (None, "run-old")  # a delete has no after image
    assert ex.agent("c", None, AFTER) == ("new-agent", None)


def test_nested_agent_path():
    ex = Extractor(spec(agent_id="row.meta.agent.id", run_id=None))
    assert ex.agent("c", None, {"meta": {"agent": {"id": "deep-1"}}}) == ("deep-1", None)
    assert ex.agent("c", None, {"meta": {"agent": "not-an-object"}}) == (None, None)
    assert ex.agent("c", None, {"meta": None}) == (None, None)
    assert ex.agent("c", None, {}) == (None, None)


def test_lookup_stops_at_non_mappings():
    assert lookup({"a": {"b": [1, 2]}}, ("a", "b")) == [1, 2]
    assert lookup({"a": {"b": [1, 2]}}, ("a", "b", "0")) is None
    assert lookup(None, ("a",)) is None
    assert lookup({"a": 1}, ()) == {"a": 1}


# --- features -----------------------------------------------------------------------------------


def test_features_of_a_create_have_no_delta():
    # transform "log" is applied by the model, not here: extracted values stay in column units.
    assert Extractor(spec(features=FEATURES)).features("c", None, AFTER) == {"total": 130.5, "items": 3.0, "risk": 0.5}


def test_features_of_an_update_include_the_delta():
    got = Extractor(spec(features=FEATURES)).features("u", BEFORE, AFTER)
    assert got == {"total": 130.5, "items": 3.0, "risk": 0.5, "total_change": pytest.approx(30.5)}


def test_features_of_a_delete_read_before():
    assert Extractor(spec(features=FEATURES)).features("d", BEFORE, None) == {"total": 100.0, "items": 2.0,
                                                                              "risk": 0.25}


def test_delta_needs_both_images_even_when_ops_allow_it():
    ex = Extractor(spec(features=(FeatureSpec(name="change", column="total", delta=True),)))  # all ops
    assert ex.features("u", BEFORE, AFTER) == {"change": pytest.approx(30.5)}
    assert ex.features("u", None, AFTER) == {}  # before is null without REPLICA IDENTITY FULL
    assert ex.features("c", None, AFTER) == {}
    assert ex.features("d", BEFORE, None) == {}


def test_feature_ops_filter():
    ex = Extractor(spec(features=(FeatureSpec(name="total", column="total", ops=("c",)),)))
    assert ex.features("c", None, AFTER) == {"total": 130.5}
    assert ex.features("u", BEFORE, AFTER) == {}
    assert ex.features("d", BEFORE, None) == {}


def test_truncate_has_no_features():
    assert Extractor(spec(features=FEATURES)).features("t", None, None) == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("12.50", 12.5), ("-3", -3.0), ("1e3", 1000.0), (7, 7.0), (0, 0.0), (-2.5, -2.5)],
)
def test_numeric_values_and_strings_are_accepted(value, expected):
    ex = Extractor(spec(features=(FeatureSpec(name="total", column="total"),)))
    got = ex.features("c", None, {"total": value})
    assert got == {"total": expected}
    assert type(got["total"]) is float


@pytest.mark.parametrize(
    "value",
    ["NaN", "nan", "Infinity", "-inf", "1e400", math.nan, math.inf, -math.inf, "abc", "", "12,50", None,
     [1.0], {"v": 1.0}, b"12"],
)
def test_non_finite_and_non_numeric_values_are_skipped(value):
    ex = Extractor(spec(features=(FeatureSpec(name="total", column="total"), FeatureSpec(name="items",
                                                                                          column="items"))))
    assert ex.features("c", None, {"total": value, "items": 4}) == {"items": 4.0}
    assert as_number(value) is None


def test_missing_columns_are_skipped():
    assert Extractor(spec(features=FEATURES)).features("c", None, {"agent_id": "x"}) == {}


def test_huge_json_integer_is_skipped():
    assert as_number(10**400) is None


# --- hostile agent ids --------------------------------------------------------------------------


def test_huge_agent_id_is_bounded_and_keeps_its_digest():
    ex = Extractor(spec())
    huge = "A" * 5_000 + "B" * 5_240  # 10 KB
    agent, run = ex.agent("c", None, {"agent_id": huge, "run_id": "r" * 1000})
    assert agent == "A" * 200 + "~sha256:" + hashlib.sha256(huge.encode()).hexdigest()
    assert run == "r" * 200 + "~sha256:" + hashlib.sha256(b"r" * 1000).hexdigest()


@pytest.mark.parametrize("value", [{"id": "a1"}, ["a1"], [], {}, None, ""])
def test_structured_or_empty_agent_ids_are_rejected(value):
    assert Extractor(spec()).agent("c", None, {"agent_id": value, "run_id": value}) == (None, None)


@pytest.mark.parametrize("value", ["エージェント-🤖", "agent\u00e9-\u4ee3\u7406", "a b\tc"])
def test_unicode_agent_ids_are_kept(value):
    assert Extractor(spec()).agent("c", None, {"agent_id": value}) == (value, None)


def test_scalar_agent_ids_become_text():
    assert identity(42) == "42"
    assert identity(4.5) == "4.5"
    assert identity("x" * 300, limit=10) == "~sha256:" + hashlib.sha256(b"x" * 300).hexdigest()


# --- relative change (how many times an update multiplied a column) ---------------------------------

RATIO = spec(features=(FeatureSpec(name="total_ratio", column="total", relative=True, ops=("u",)),))


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (5_000.0, 50_000.0, math.log(10)),  # x10 is about log(10), whatever the size
        (50.0, 500.0, math.log1p(500) - math.log1p(50)),
        (0.0, 9.0, math.log1p(9)),  # from zero: defined
        (-4.0, 4.0, 2 * math.log1p(4)),  # across signs: defined
    ],
)
def test_relative_change_is_a_log_ratio_defined_at_zero_and_across_signs(
    before: float, after: float, expected: float
) -> None:
    got = Extractor(RATIO).features("u", {"total": before}, {"total": after})["total_ratio"]
    assert got == pytest.approx(expected, rel=0.01)


def test_relative_change_skips_unchanged_columns_and_other_ops() -> None:
    ex = Extractor(RATIO)
    assert ex.features("u", {"total": 7.0}, {"total": 7.0}) == {}
    assert ex.features("c", None, {"total": 7.0}) == {}


@pytest.mark.parametrize("extra", [{"delta": True}, {"divide_by": "items"}, {"transform": "log"}])
def test_relative_takes_no_other_transformation(extra: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="relative"):
        FeatureSpec(name="r", column="total", relative=True, **extra)


def test_a_tenfold_update_stands_out_where_the_raw_delta_does_not() -> None:
    """An agent that updates rows of every size: a x10 raise of a small row is an ordinary delta, not a ratio."""
    from detectors.models import ZScore
    from detectors.write import Write

    both = spec(features=(
        FeatureSpec(name="total_change", column="total", delta=True, ops=("u",)),
        FeatureSpec(name="total_ratio", column="total", relative=True, ops=("u",)),
    ))
    ex = Extractor(both)
    delta, ratio = ZScore(features=["total_change"]), ZScore(features=["total_ratio"])
    for i in range(200):
        size = 10.0 ** (1 + i % 4)  # rows of 10 to 10,000
        x = ex.features("u", {"total": size}, {"total": size * 0.9})  # a 10% discount
        delta.learn_one(Write(x)), ratio.learn_one(Write(x))
    raised = Write(ex.features("u", {"total": 20.0}, {"total": 200.0}))  # a small row, x10
    assert delta.score_one(raised) < 0.5 < 0.6 < ratio.score_one(raised)
