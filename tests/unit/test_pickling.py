"""detectors.pickling: River's running statistics pickled field by field, and restored the same."""

from __future__ import annotations

import copyreg
import pickle

from river import stats

from detectors import pickling


def test_the_reducer_knows_every_field_river_sets() -> None:
    # A River upgrade that adds a field would have it dropped from every checkpoint: fail here instead.
    for cls, fields in pickling.FIELDS.items():
        assert tuple(vars(cls())) == fields, cls


def test_the_reducer_is_installed_by_the_engine() -> None:
    import detectors.engine  # noqa: F401 -- registers it

    assert all(copyreg.dispatch_table[cls] is pickling.reduce for cls in (stats.Var, stats.Mean))


def test_a_var_restored_goes_on_exactly_as_the_original() -> None:
    pickling.register()
    a = stats.Var(ddof=0)
    for x in (3.0, 1.5, 9.25, -2.0):
        a.update(x)
    blob = pickle.dumps(a, protocol=5)
    assert b"detectors.pickling" in blob  # written by the reducer, not by River's own path
    b = pickle.loads(blob)
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
