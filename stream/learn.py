"""``writeguard learn``: fill the models topic from history, learn-only, so that workers start warm.

The worker's router and engine run over past change events, from a JSONL file of Debezium message values (as
``writeguard replay`` reads) or from the CDC topics by time (``--since 7d``: each partition from the offset of that
time, by ``offsets_for_times``, to its end as of the start), with :meth:`~detectors.engine.Engine.learn`: every
change is scored and learned as the worker would, but no alert is raised, no agent quarantined and no incident
left open. Then every (table, agent) model set is written to ``topics.models`` in the partition that the changes
topic's partitioner gives the agent (:func:`stream.checkpoints.partition_for`), which is where the worker that
is assigned the agent's changes partition restores it from.

The order is: ``writeguard learn``, then start the workers. A model set keeps its history (writes seen, first
write's time), so one learned over more than its table's learning period starts past it: no learning alerts.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from connectors.debezium import EnvelopeError
from connectors.undo_kafka import consumer_settings, plan_reads
from detectors.engine import Change, Engine, FileCoords, KafkaCoords
from stream.checkpoints import CheckpointWriter, partition_for
from stream.config import Config, client_settings
from stream.logs import kafka_logging
from stream.pipeline import Router, router_for
from stream.replay import READ_BUFFER

_PARTITION_EOF = getattr(KafkaError, "_PARTITION_EOF")  # noqa: B009 - librdkafka's underscored name


@dataclass
class LearnStats:
    events: int = 0  # records read (lines of the file, records of the topics)
    changes: int = 0  # changes learned
    findings: int = 0  # findings the worker would have raised, dropped (learn-only)
    skipped: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    model_sets: int = 0  # checkpoints written
    learning: int = 0  # of them, model sets still in their learning period
    bytes: int = 0
    seconds: float = 0.0  # reading and learning
    write_seconds: float = 0.0  # writing the checkpoints, until the broker acknowledged them all

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def parse_since(text: str) -> float:
    """Seconds in ``7d``, ``12h``, ``30m``, ``90s`` (or a plain number of seconds).

    >>> parse_since("7d"), parse_since("12h"), parse_since("90")
    (604800.0, 43200.0, 90.0)
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    mult = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if mult is not None else t)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 7d, 12h, 30m)") from None
    if value <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return value * (mult or 1)


def _routed(router: Router, topic: str | None, value: bytes | None, coords: KafkaCoords | FileCoords,
            stats: LearnStats) -> Iterator[Change]:  # fmt: skip
    try:
        out = router.route(topic, value, coords)
    except EnvelopeError as e:
        stats.dead_letters[e.reason] += 1
        return
    if isinstance(out, str):
        stats.skipped[out] += 1
    else:
        yield out
        if router.pending:  # commit time is the clock: rows whose message never came are unattributed
            router.expire(out.commit_ts_us)
    if router.ready:
        ready, router.ready = router.ready, []
        yield from ready


def changes_from_file(path: str | Path, router: Router, stats: LearnStats) -> Iterator[Change]:
    name = str(path)
    # A large buffer: with the default 8 KiB, reading the lines costs a system call every dozen events.
    with open(path, "rb", buffering=READ_BUFFER) as fh:
        for lineno, raw in enumerate(fh, 1):
            stats.events = lineno
            value = raw.strip()
            if value:
                yield from _routed(router, None, None if value == b"null" else value, FileCoords(name, lineno), stats)


def changes_from_kafka(
    cfg: Config, router: Router, stats: LearnStats, since_s: float | None, timeout_s: float = 30.0
) -> Iterator[Change]:
    """The CDC topics' records from ``since_s`` ago (all of them when None) to their ends as of now, in the order
    one consumer fetches them (per partition in order, the partitions interleaved, as a worker sees them)."""
    msgs = cfg.worker.agent_messages
    topics = [t.topic for t in cfg.tables] + ([msgs.topic] if msgs else [])
    settings = consumer_settings(kafka_logging(client_settings(cfg)))
    settings["max.partition.fetch.bytes"] = 4 * 1024 * 1024  # one pass in order: no merge buffers to bound
    consumer = Consumer(settings)
    try:
        start_us = None if since_s is None else time.time_ns() // 1000 - int(since_s * 1e6)
        plan = plan_reads(consumer, topics, start_us, timeout_s)
        ends = {(p.topic, p.partition): p.end for p in plan.partitions if p.end > p.start}
        if not ends:
            return
        consumer.assign([TopicPartition(p.topic, p.partition, p.start) for p in plan.partitions if p.end > p.start])
        while ends:
            for msg in consumer.consume(num_messages=1000, timeout=1.0):
                topic, part, offset = msg.topic(), msg.partition(), msg.offset()
                if topic is None or part is None or offset is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == _PARTITION_EOF:
                        ends.pop((topic, part), None)
                        continue
                    raise KafkaException(err)
                end = ends.get((topic, part))
                if end is None or offset >= end:
                    continue
                stats.events += 1
                yield from _routed(router, topic, msg.value(), KafkaCoords(topic, part, offset), stats)
                if offset + 1 >= end:
                    ends.pop((topic, part), None)
    finally:
        consumer.close()


def changes_partitions(cfg: Config, timeout_s: float = 30.0) -> int:
    """The changes topic's partition count (the topic's own, if it exists), which the agents' partitions follow."""
    consumer = Consumer({**kafka_logging(client_settings(cfg)), "group.id": "writeguard-learn-metadata"})
    try:
        md = consumer.list_topics(cfg.topics.changes, timeout=timeout_s).topics.get(cfg.topics.changes)
        if md is not None and md.error is None and md.partitions:
            return len(md.partitions)
        return cfg.topics.partitions
    finally:
        consumer.close()


def learn(
    cfg: Config,
    *,
    events: str | Path | None = None,
    since_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    writer: CheckpointWriter | None = None,
    partitions: int | None = None,
    every_s: float = 2.0,
) -> LearnStats:
    """Learn from ``events`` (a JSONL file) or from the CDC topics since ``since_s`` ago, then write every model
    set's checkpoint to ``topics.models``. Raises OSError if the broker did not acknowledge them all."""
    stats = LearnStats()
    router = router_for(cfg)
    # No memory bound: learn runs once, and each model set is written at the end.
    engine = Engine(list(cfg.tables), suppressions=cfg.suppressions, track_dirty=True)
    source = changes_from_file(events, router, stats) if events is not None else None
    if source is None:
        source = changes_from_kafka(cfg, router, stats, since_s)
    started = last = time.perf_counter()
    n = 0
    for ch in source:
        stats.findings += engine.learn(ch)
        n += 1
        if progress is not None and n & 0xFFF == 0 and (now := time.perf_counter()) - last >= every_s:
            last = now
            progress(f"learn: {stats.events:,} events, {stats.events / (now - started):,.0f} events/s")
    router.expire(2**62)
    for ch in router.ready:
        stats.findings += engine.learn(ch)
        n += 1
    router.ready = []
    stats.changes = n
    stats.seconds = time.perf_counter() - started
    written = time.perf_counter()
    writer = writer or CheckpointWriter(cfg)
    nparts = partitions or changes_partitions(cfg)
    for key in engine.take_dirty():
        got = engine.checkpoint(key)
        if got is None:
            continue
        writer.write(key, got[0], got[1], partition_for(key[1], nparts))
        stats.model_sets += 1
        stats.learning += got[1]
        if stats.model_sets & 1023 == 0:
            writer.poll()
    for name in engine.tables:  # the population models, for the partitions of every agent
        blob = engine.table_checkpoint(name)
        for p in range(nparts):
            writer.write(name, blob, False, p)
    left = writer.flush(120.0)
    stats.bytes = writer.bytes
    stats.write_seconds = time.perf_counter() - written
    if left or writer.errors:
        raise OSError(f"{cfg.topics.models}: {left} checkpoints not acknowledged; {writer.errors[:3]}")
    if progress is not None:
        progress(
            f"learn: {stats.events:,} events, {stats.changes:,} changes learned in {stats.seconds:.2f} s "
            f"({stats.events_per_second:,.0f} events/s); {stats.model_sets:,} model sets "
            f"({stats.learning:,} still learning, {stats.bytes / 1e6:.1f} MB) written to {cfg.topics.models} "
            f"in {stats.write_seconds:.2f} s; {stats.findings} findings not alerted (learn-only)"
        )
    return stats
