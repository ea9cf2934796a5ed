"""The table-wide novelty set stays bounded and keeps learning after junk values have filled it.

Before issue 17 the set stopped taking values at ``16 * max_values``: after 4,096 junk values (default
``max_values=256``), a value that every agent later wrote scored 1.0, as never seen, for every agent, forever.
"""

from __future__ import annotations

import random

from detectors.models import CategoricalNovelty, TableValues
from detectors.write import Write

COL = "reason"
CAP = 16 * 256  # the table-wide bound with the default max_values


def write(v: str) -> Write:
    return Write(categories={COL: v})


def agents(known: TableValues, n: int, *, agent_scope: bool = False, warmup: int = 30) -> list[CategoricalNovelty]:
    return [CategoricalNovelty([COL], warmup=warmup, known=known, agent_scope=agent_scope) for _ in range(n)]


def flood(rogue: CategoricalNovelty, known: TableValues, n: int, start: int = 0, repeat: int = 1) -> None:
    for i in range(start, start + n):
        for _ in range(repeat):
            rogue.learn_one(write(f"junk-{i}"))
            assert len(known.values[COL]) <= CAP


def test_a_value_that_becomes_common_after_a_flood_is_learned() -> None:
    known = TableValues()
    rogue, *fleet = agents(known, 6)
    for a in fleet:  # the table is warm: values it knows score 0
        for r in ["late", "damaged"] * 20:
            a.learn_one(write(r))
    flood(rogue, known, 5_000)
    assert len(known.values[COL]) <= CAP
    assert rogue.score_one(write("junk-4999")) == 0.0  # the table still learns: the latest junk is known
    scored_new = 0
    for _ in range(20):
        for a in fleet:
            scored_new += a.score_one(write("goodwill")) == 1.0
            a.learn_one(write("goodwill"))
    assert scored_new == 1  # only the very first write of it, by anyone, was new to the table
    assert all(a.score_one(write("goodwill")) == 0.0 for a in fleet)
    # The values the fleet wrote before the flood outlived it: junk written once went first.
    assert all(a.score_one(write(r)) == 0.0 for a in fleet for r in ("late", "damaged"))


def test_learning_goes_on_while_the_flood_goes_on() -> None:
    """Junk keeps coming, 20 values per legitimate write; the legitimate value stops scoring as new for good."""
    known = TableValues()
    rogue, *fleet = agents(known, 5)
    for a in fleet:
        for _ in range(30):
            a.learn_one(write("late"))
    flood(rogue, known, CAP + 100)
    rng = random.Random(17)
    scores: list[float] = []
    junk = CAP + 100
    for _ in range(2_000):
        a = rng.choice(fleet)
        scores.append(a.score_one(write("goodwill")))
        a.learn_one(write("goodwill"))
        flood(rogue, known, 20, start=junk)
        junk += 20
    assert junk - (CAP + 100) == 40_000 and len(known.values[COL]) <= CAP
    assert sum(scores) == 1.0 and scores[0] == 1.0, [i for i, s in enumerate(scores) if s]
    assert a.score_one(write("late")) == 0.0


def test_junk_repeated_does_not_keep_out_a_value_written_more_often() -> None:
    """Each junk value written 3 times ranks below a value several agents keep writing."""
    known = TableValues()
    rogue, *fleet = agents(known, 4)
    for a in fleet:
        for _ in range(30):
            a.learn_one(write("late"))
    flood(rogue, known, CAP, repeat=3)
    scores = []
    junk = CAP
    for i in range(400):
        a = fleet[i % len(fleet)]
        scores.append(a.score_one(write("goodwill")))
        a.learn_one(write("goodwill"))
        flood(rogue, known, 10, start=junk, repeat=3)
        junk += 10
    assert sum(scores) == 1.0 and scores[0] == 1.0, [i for i, s in enumerate(scores) if s]


def test_with_agent_scope_each_agent_finds_it_new_once_and_the_table_learns_it() -> None:
    known = TableValues()
    rogue, *fleet = agents(known, 5, agent_scope=True, warmup=5)
    for a in fleet:
        for _ in range(5):
            a.learn_one(write("late"))
    flood(rogue, known, 5_000)
    new_per_agent = dict.fromkeys(range(len(fleet)), 0)
    for _ in range(10):
        for i, a in enumerate(fleet):
            new_per_agent[i] += a.score_one(write("goodwill")) == 1.0
            a.learn_one(write("goodwill"))
    # New to each agent once (its own history, after its warm-up): never again, for any of them.
    assert new_per_agent == dict.fromkeys(range(len(fleet)), 1)
    newcomer = CategoricalNovelty([COL], warmup=5, known=known)
    assert newcomer.score_one(write("goodwill")) == 0.0  # not warmed up: only table-new values count


def test_the_table_set_never_grows_past_its_bound_and_forgets_one_off_values() -> None:
    known = TableValues()
    rogue = CategoricalNovelty([COL], warmup=1, known=known, max_values=8)  # 128 table-wide
    sizes = []
    for i in range(10_000):
        rogue.learn_one(write(f"junk-{i}"))
        sizes.append(len(known.values[COL]))
    assert max(sizes) == 128 and min(sizes[128:]) >= 96  # full, then a quarter freed at a time
    assert "junk-0" not in known.values[COL] and "junk-9999" in known.values[COL]


def test_a_value_common_long_ago_ages_out_behind_one_common_now() -> None:
    """Counts are halved as the table goes on, so an old favourite does not hold its place for ever."""
    known = TableValues()
    for _ in range(1_000):
        known.n += 1
        known.learn(COL, "old-favourite", cap=8)
    for i in range(2_000):
        known.n += 1
        known.learn(COL, f"now-{i % 12}", cap=8)  # 12 values in rotation, each written ~170 times
        assert len(known.values[COL]) <= 8
    assert "old-favourite" not in known.values[COL]
