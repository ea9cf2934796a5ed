"""detectors.pickling: River's running statistics pickled field by field, and restored the same."""

from __future__ import annotations

import copyreg
import pickle

from river import stats

from detectors import pickling


def test_the_reducers_know_every_field_river_sets() -> None:
    # A River upgrade that adds a field would have it dropped from every checkpoint: fail here instead.
    assert tuple(vars(stats.Mean())) == pickling.MEAN_FIELDS
    assert tuple(vars(stats.Var())) == pickling.VAR_FIELDS


def test_the_reducers_are_installed_by_the_engine() -> None:
    import detectors.engine  # noqa: F401 -- registers them

    assert copyreg.dispatch_table[stats.Var] is pickling.reduce_var
    assert copyreg.dispatch_table[stats.Mean] is pickling.reduce_mean


def test_a_var_restored_goes_on_exactly_as_the_original() -> None:
    pickling.register()
    a, b = stats.Var(ddof=0), None
    for x in (3.0, 1.5, 9.25, -2.0):
        a.update(x)
    b = pickle.loads(pickle.dumps(a, protocol=5))
    assert type(b) is stats.Var and type(b.mean) is stats.Mean
    for x in (4.0, 100.0):
        a.update(x)
        b.update(x)
    assert (b.get(), b.mean.get(), b.mean.n, b.ddof) == (a.get(), a.mean.get(), a.mean.n, a.ddof)


def test_a_checkpoint_pickled_by_rivers_own_path_still_loads() -> None:
    v = stats.Var()
    v.update(2.0)
    v.update(5.0)
    saved = copyreg.dispatch_table.pop(stats.Var), copyreg.dispatch_table.pop(stats.Mean)
    try:
        old = pickle.dumps(v, protocol=5)  # what workers before detectors.pickling wrote
    finally:
        copyreg.dispatch_table[stats.Var], copyreg.dispatch_table[stats.Mean] = saved
    assert pickle.loads(old).get() == v.get()
