"""The store of evicted models, as the worker opens it, and the engine over every dbm module this Python has."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path
from typing import Any

import pytest

import stream.modelstore
from detectors.engine import Change, Engine, KafkaCoords
from stream.config import EXAMPLE_CONFIG, load_config, make_engine
from stream.modelstore import ModelStore


def _events(n_agents: int, rounds: int) -> list[Change]:
    out = []
    t = 1_700_000_000_000_000
    for r in range(rounds):
        for a in range(n_agents):
            t += 1_000_000
            out.append(
                Change(
                    "public.refunds",
                    "c",
                    f"agent-{a}",
                    None,
                    {"amount": 30.0 + (r * 7 + a) % 11},
                    t,
                    KafkaCoords("t", 0, len(out)),
                )
            )
    return out


def _run(engine: Engine, events: list[Change]) -> list[tuple[str, float]]:
    scores: list[tuple[str, float]] = []
    for ch in events:
        engine.process(ch, scores)
    return scores


def test_doctest() -> None:
    assert doctest.testmod(stream.modelstore).failed == 0


def test_store_is_a_mapping_emptied_on_open(tmp_path: Path) -> None:
    path = tmp_path / "agent-models.sqlite"
    s = ModelStore(path)
    s["a"] = b"\x00\x01" * 5000
    s["b"] = b""
    s["a"] = b"new"
    assert (s.get("a"), s.get("b"), s.get("c"), len(s), sorted(s)) == (b"new", b"", None, 2, ["a", "b"])
    del s["a"]
    with pytest.raises(KeyError):
        del s["a"]
    with pytest.raises(KeyError):
        s["a"]
    s.close()
    again = ModelStore(path)  # as dbm.open(..., "n"): a new worker does not see the last one's evictions
    assert len(again) == 0
    again.close()


def _stores(tmp_path: Path) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [("ModelStore", ModelStore(tmp_path / "m.sqlite"))]
    for name in ("dbm.gnu", "dbm.ndbm", "dbm.dumb"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        out.append((name, mod.open(str(tmp_path / name), "n")))
    return out


def test_engine_evicts_and_restores_through_every_store(tmp_path: Path) -> None:
    """Eviction must not change a single score, whichever store holds the evicted agents."""
    cfg = load_config(EXAMPLE_CONFIG)
    events = _events(n_agents=30, rounds=12)
    reference = _run(
        make_engine(cfg.model_copy(update={"worker": cfg.worker.model_copy(update={"max_agents": None})})), events
    )
    for name, store in _stores(tmp_path):
        bounded = cfg.model_copy(update={"worker": cfg.worker.model_copy(update={"max_agents": 5})})
        engine = make_engine(bounded, store)
        assert _run(engine, events) == reference, name
        assert engine.evicted > 0 and engine.restored > 0, name
        assert len(engine.states) == 5, name
        # Every agent is either in memory or in the store, never both: a restore takes it out of the store.
        assert len(store) == 30 - 5, name
        store.close()
