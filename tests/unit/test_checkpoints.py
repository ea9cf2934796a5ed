"""Checkpoints of model sets, without a broker: dirty tracking, keys and partitions, signing, the worker's
restore gate, and learn-only runs (the broker's side is tests/integration/test_worker_checkpoints.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from detectors.engine import Change, Engine, KafkaCoords
from stream.checkpoints import (
    Checkpointer,
    CheckpointRejected,
    Restored,
    decode_value,
    encode_value,
    model_key,
    parse_key,
    partition_for,
    sign,
    verify,
)
from stream.config import EXAMPLE_CONFIG, Config, load_config
from stream.learn import learn
from testbed.fleet import Fleet

T = "public.refunds"
S = 1_000_000
START_US = 1_700_000_000_000_000


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(EXAMPLE_CONFIG)


def change(agent: str, i: int, amount: float, t0: int = START_US) -> Change:
    return Change(T, "c", agent, None, {"amount": amount}, t0 + i * S, KafkaCoords("t", 0, i))


def normal(agent: str, n: int, t0: int = START_US, step_s: int = 1) -> list[Change]:
    return [
        Change(T, "c", agent, None, {"amount": 30.0 + i % 9}, t0 + i * step_s * S, KafkaCoords("t", 0, i))
        for i in range(n)
    ]


# Dirty tracking


def test_dirty_keys_are_the_model_sets_changed_since_the_last_take(cfg: Config) -> None:
    eng = Engine(list(cfg.tables), track_dirty=True)
    for ch in normal("a1", 3) + normal("a2", 2):
        eng.process(ch)
    assert eng.take_dirty() == [(T, "a1"), (T, "a2")]
    assert eng.take_dirty() == []
    eng.process(change("a2", 10, 31.0))
    assert eng.take_dirty() == [(T, "a2")]


def test_a_release_marks_the_agents_model_sets_dirty(cfg: Config) -> None:
    eng = Engine(list(cfg.tables), track_dirty=True)
    for ch in normal("a1", 3):
        eng.process(ch)
    eng.take_dirty()
    eng.apply_control("a1", "released", None, "ok", START_US)
    assert eng.take_dirty() == [(T, "a1")]


def test_without_tracking_nothing_is_recorded(cfg: Config) -> None:
    eng = Engine(list(cfg.tables))
    eng.process(change("a1", 0, 30.0))
    assert eng.dirty is None and eng.take_dirty() == []


# Checkpoint and preload


def scores(eng: Engine, events: Iterable[Change]) -> list[list[tuple[str, float]]]:
    out = []
    for ch in events:
        s: list[tuple[str, float]] = []
        eng.process(ch, s)
        out.append(s)
    return out


def test_a_preloaded_checkpoint_scores_and_alerts_as_if_the_engine_had_never_stopped(cfg: Config) -> None:
    history, later = normal("a1", 300, step_s=600), normal("a1", 50, START_US + 200_000 * S)  # past learning
    rogue = [change("a1", 500 + i, 900.0, START_US + 200_000 * S) for i in range(3)]
    whole = Engine(list(cfg.tables))
    scores(whole, history)
    first = Engine(list(cfg.tables), track_dirty=True)
    scores(first, history)
    blobs: list[tuple[tuple[str, str], bytes, bool]] = []
    for k in first.take_dirty():
        got = first.checkpoint(k)
        assert got is not None
        blobs.append((k, got[0], got[1]))
    shared = first.table_checkpoint(T)
    # The live state is intact after a checkpoint: it goes on scoring like the uninterrupted engine.
    assert scores(first, later[:5]) == scores(whole, later[:5])
    second = Engine(list(cfg.tables))
    assert second.restore_table(T, shared) and second.preload(blobs) == 1
    again = Engine(list(cfg.tables))
    scores(again, history)
    assert scores(second, later) == scores(again, later)
    assert second.restored == 1
    # The rogue's writes: the same decision by the agent's own (restored, warm) model.
    decided = [[(f.detector, f.scope, f.quarantine) for ch in rogue for f in e.process(ch)] for e in (second, again)]
    assert decided[0] == decided[1] and ("zscore", "agent", True) in decided[0]


def test_a_table_checkpoint_warms_only_a_colder_engine_without_model_sets_in_memory(cfg: Config) -> None:
    warm = Engine(list(cfg.tables))
    # The example's population judges once 20 agents and 200 writes are in, and learns for a day too.
    scores(warm, [ch for i in range(25) for ch in normal(f"a{i}", 210, step_s=600)])
    shared = warm.table_checkpoint(T)
    assert warm.learning_models()[T] == 0  # agents and population past their learning period
    cold = Engine(list(cfg.tables))
    assert cold.learning_models()[T] >= 1  # a cold population learns for a day
    assert cold.restore_table(T, shared) and cold.learning_models()[T] == 0
    assert not cold.restore_table(T, shared)  # not colder any more
    busy = Engine(list(cfg.tables))
    busy.process(change("b1", 0, 30.0))
    assert not busy.restore_table(T, shared)  # its model sets link to the population it has


def test_a_restored_model_set_keeps_its_learning_period(cfg: Config) -> None:
    # The example's tables learn for 200 writes and a day: 100 writes over 100 s leave it learning.
    young = Engine(list(cfg.tables), track_dirty=True)
    scores(young, normal("a1", 100))
    (key,) = young.take_dirty()
    blob, learning = young.checkpoint(key) or (b"", False)
    assert learning is True
    fresh = Engine(list(cfg.tables))
    fresh.preload([(key, blob, learning)])
    assert fresh.learning_models()[T] >= 1  # counted while only in the store
    # 300 writes over two days: past it.
    old = Engine(list(cfg.tables), track_dirty=True)
    scores(old, normal("a1", 300, step_s=600))
    (key,) = old.take_dirty()
    got = old.checkpoint(key)
    assert got is not None and got[1] is False


def test_preload_does_not_replace_a_model_set_in_memory(cfg: Config) -> None:
    eng = Engine(list(cfg.tables), track_dirty=True)
    scores(eng, normal("a1", 5))
    other = Engine(list(cfg.tables), track_dirty=True)
    scores(other, normal("a1", 50))
    (key,) = other.take_dirty()
    blob, learning = other.checkpoint(key) or (b"", False)
    assert eng.preload([(key, blob, learning)]) == 0
    assert eng.states[key].n == 5


def test_forget_drops_memory_store_and_dirty_entries(cfg: Config) -> None:
    store: dict[str, bytes] = {}
    eng = Engine(list(cfg.tables), track_dirty=True, max_states=1, store=store)
    scores(eng, normal("a1", 3) + normal("a2", 3))  # a1 evicted to the store
    assert len(store) == 1 and (T, "a2") in eng.states
    assert eng.checkpoint((T, "a1")) is not None  # an evicted model set is checkpointed from the store
    assert eng.forget(["a1", "a2"]) == 2
    assert store == {} and not eng.states and eng.take_dirty() == []
    assert eng.checkpoint((T, "a1")) is None


# Keys, partitions, values, signatures


def test_partition_for_is_kafkas_default_partitioner_on_the_agent_id() -> None:
    part = DefaultPartitioner()
    for i in range(500):
        agent = f"agent-{i}-{'x' * (i % 7)}é"
        assert partition_for(agent, 6) == part(agent.encode(), list(range(6)), list(range(6)))


def test_keys_hold_table_and_agent_even_with_odd_ids() -> None:
    for agent in ("a1", "", "with\0nul", "<unattributed>", "x" * 300):
        assert parse_key(model_key(T, agent)) == (T, agent)
    with pytest.raises(CheckpointRejected):
        parse_key(b"no-separator")
    with pytest.raises(CheckpointRejected):
        parse_key(None)


def test_values_carry_format_and_learning() -> None:
    assert decode_value(encode_value(b"xyz", False)) == (b"xyz", False)
    for bad in (None, b"", b"\x02\x00abc", b"\x01\x07abc"):
        with pytest.raises(CheckpointRejected):
            decode_value(bad)


def test_signatures_bind_key_value_and_secret() -> None:
    k, v = model_key(T, "a1"), encode_value(b"state", False)
    hdr = [("writeguard-signature", sign(b"s" * 32, k, v))]
    verify([b"old" * 11, b"s" * 32], k, v, hdr)
    for key, value, headers in (
        (k, v, None),
        (k, v + b"!", hdr),
        (model_key(T, "a2"), v, hdr),
        (k, v, [("writeguard-signature", sign(b"t" * 32, k, v))]),
        (k, v, hdr + hdr),
    ):
        with pytest.raises(CheckpointRejected):
            verify([b"s" * 32], key, value, headers)


# The worker's checkpointer


class FakeWriter:
    def __init__(self) -> None:
        self.records: list[tuple[tuple[str, str], bytes, bool, int]] = []
        self.tables: list[tuple[str, bytes, int]] = []
        self.errors: list[str] = []
        self.bytes = 0

    def write(self, key: tuple[str, str] | str, blob: bytes, learning: bool, partition: int) -> None:
        if isinstance(key, str):
            self.tables.append((key, blob, partition))
        else:
            self.records.append((key, blob, learning, partition))
        self.bytes += len(blob)

    def poll(self) -> None:
        return None

    def flush(self, timeout: float = 30.0) -> int:
        return 0


def test_flush_writes_each_changed_model_set_to_its_agents_partition(cfg: Config) -> None:
    eng = Engine(list(cfg.tables), track_dirty=True)
    writer = FakeWriter()
    ck = Checkpointer(cfg, eng, writer=writer, read=lambda parts: Restored())  # type: ignore[arg-type]
    for ch in normal("a1", 3) + normal("a2", 3):
        eng.process(ch)
    ck.seen("a1", 4)  # where its events came from wins over the partitioner
    assert ck.flush() == 2
    assert [(r[0], r[3]) for r in writer.records] == [((T, "a1"), 4), ((T, "a2"), partition_for("a2", 6))]
    assert ck.flush() == 0  # nothing changed since


def test_a_flush_with_a_budget_leaves_the_rest_for_the_next_oldest_first(cfg: Config) -> None:
    eng = Engine(list(cfg.tables), track_dirty=True)
    writer = FakeWriter()
    ck = Checkpointer(cfg, eng, writer=writer, read=lambda parts: Restored())  # type: ignore[arg-type]
    for i in range(600):
        eng.process(change(f"a{i}", i, 30.0))
    assert ck.flush(budget_s=0.0) == 256 and ck.backlog == 344  # one batch, whatever the budget
    eng.process(change("a0", 700, 30.0))  # changed again: it goes after the ones still waiting
    assert ck.flush() == 345 and ck.backlog == 0
    order = [r[0][1] for r in writer.records]
    assert order[:256] == [f"a{i}" for i in range(256)] and order[256] == "a256" and order[-1] == "a0"


def test_a_partition_is_scored_only_after_its_restore_and_lost_ones_are_forgotten(cfg: Config) -> None:
    src = Engine(list(cfg.tables), track_dirty=True)
    scores(src, normal("a1", 40))
    (key,) = src.take_dirty()
    blob, learning = src.checkpoint(key) or (b"", False)
    reads: list[list[int]] = []

    def read(parts: Iterable[int]) -> Restored:
        parts = list(parts)
        reads.append(parts)
        return Restored(items={2: [(key, blob, learning)]} if 2 in parts else {})

    async def scenario() -> list[Any]:
        eng = Engine(list(cfg.tables), track_dirty=True)
        ck = Checkpointer(cfg, eng, writer=FakeWriter(), read=read)  # type: ignore[arg-type]
        seen: list[Any] = []

        async def detect() -> None:  # what the worker's detect agent does for an event of partition 2
            if not ck.ready(2):
                await ck.wait(2)
            seen.append(("scored", eng.restored, (T, "a1") in eng.states or eng.store.get(f"{T}\x1fa1") is not None))

        task = asyncio.ensure_future(detect())
        await asyncio.sleep(0.01)
        seen.append(("waiting", task.done()))
        restore = ck.assigned({1, 2})
        assert restore is not None
        await restore
        await task
        seen.append(("ready", ck.ready(1), ck.ready(2), reads))
        ck.seen("a1", 2)
        eng.process(change("a1", 41, 33.0))
        ck.assigned({1})  # partition 2 moved to another worker
        seen.append(("lost", ck.ready(2), (T, "a1") in eng.states, "a1" in ck.part))
        return seen

    got = asyncio.run(scenario())
    assert got[0] == ("waiting", False)
    assert got[1] == ("scored", 0, True)  # the checkpoint was in the store before the event was scored
    assert got[2] == ("ready", True, True, [[1, 2]])
    assert got[3] == ("lost", False, False, False)


# Learn-only


def test_learn_raises_nothing_and_keeps_learning_after_a_rogue_burst(cfg: Config) -> None:
    eng = Engine(list(cfg.tables), track_dirty=True)
    dropped = sum(eng.learn(ch) for ch in normal("a1", 300, step_s=600))
    burst = [change("a1", 400 + i, 5000.0, START_US + 300 * 600 * S) for i in range(10)]
    dropped += sum(eng.learn(ch) for ch in burst)
    assert dropped > 0 and eng.quarantined == {}
    st = eng.states[(T, "a1")]
    assert st.open == 0 and st.lopen == 0
    n = st.dets[0].n
    eng.learn(change("a1", 500, 31.0, START_US + 400 * 600 * S))
    assert st.dets[0].n == n + 1  # a normal write after the burst is learned: no quarantine stops it


def test_learn_from_a_file_writes_every_model_set_to_its_partition(cfg: Config, tmp_path: Path) -> None:
    fleet = Fleet(n_agents=6, seed=3)
    # Days of commit time, each agent writing every few minutes: past the example's learning period.
    lines = [r.value for r in fleet.stream(3000, START_US, speedup=0.0005)]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    writer = FakeWriter()
    stats = learn(cfg, events=events, writer=writer, partitions=6)  # type: ignore[arg-type]
    assert stats.events == 3000 and stats.changes == 3000
    keys = {r[0] for r in writer.records}
    assert keys == {(a.table, a.agent_id) for a in fleet.agents}
    assert all(r[3] == partition_for(r[0][1], 6) for r in writer.records)
    assert stats.model_sets == 6 and stats.learning == 0 and not any(r[2] for r in writer.records)
    # A worker's engine that preloads them judges the agents warm: nothing left learning.
    eng = Engine(list(cfg.tables))
    eng.preload([(k, b, lrn) for k, b, lrn, _ in writer.records])
    assert sum(len(t.stored_learning) + t.learning for t in eng.tables.values()) == 0
    # Each table's shared models go to every partition: the workers that start from them start warm too.
    assert sorted((t, p) for t, _, p in writer.tables) == sorted((t.name, p) for t in cfg.tables for p in range(6))
    # (Six agents never make the example's population judge, which waits for 20: its learning count stays.)
    assert all(eng.restore_table(t, blob) for t, blob, p in writer.tables if p == 0)
    assert all(eng.table_version(t) > 0 for t in eng.tables)
    for a in fleet.agents:  # restored on their next write: still warm, not learning
        eng.process(Change(a.table, "c", a.agent_id, None, {}, START_US + 10**12, KafkaCoords("t", 0, 1)))
    assert eng.restored == 6 and sum(t.learning for t in eng.tables.values()) == 0
