"""Scope's input from Kafka: the watched CDC topics (and the agent-messages topic) over a time window, merged.

A plain confluent-kafka ``Consumer`` that joins no group and commits nothing: it assigns every partition of the
topics, starting where ``offsets_for_times`` says the window starts (so a recent window never reads the whole
topic) and ending at each partition's high watermark taken at the start. The end is not ``--until``: later
writes to the selected rows, up to now, are the conflicts.

Each partition is in commit order; :func:`merged` interleaves them into one commit order by (commit time, LSN)
with a k-way merge that holds a bounded buffer per partition (a partition far ahead is paused), so memory does not
grow with the window. Records are decoded once (:func:`connectors.debezium.decode`), and each becomes a
:class:`~undo.events.RowEvent` through :class:`~connectors.undo_source.UndoReader`, at position
``topic/partition/offset``.
"""

from __future__ import annotations

import heapq
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from connectors.debezium import ChangeEvent, Decoded, EnvelopeError, decode
from connectors.undo_source import UndoReader
from undo.events import RowEvent

# Record timestamps are when Debezium (Connect) produced the record, a little after the commit; a clock behind the
# database's would put a record of the window before it. Reading from this much earlier covers that.
START_SLACK_US: Final = 60_000_000
# Decoded records buffered per partition before it is paused. librdkafka fetches the partitions unevenly, so a
# partition gets ahead of the merge's frontier (the commit time of the partition furthest behind) and its records
# wait in its buffer; pausing it (which drops its prefetched records, fetched again on resume) bounds that.
_PAUSE_AT: Final = 2_000
_RESUME_AT: Final = 1_000  # resumed before it runs dry, so that its next records are fetched meanwhile
_BATCH: Final = 500
# librdkafka's code for "reached the end of the partition" (enable.partition.eof); its name is underscored.
_PARTITION_EOF: Final = getattr(KafkaError, "_PARTITION_EOF")  # noqa: B009
_AUTO_OFFSET_RESET: Final = getattr(KafkaError, "_AUTO_OFFSET_RESET")  # noqa: B009


class KafkaScanError(OSError):
    """The topics could not be read (broker unreachable, a partition stalled); the message says where."""


@dataclass
class PartitionRead:
    """One partition's part of the scan: offsets ``[start, end)``, of ``[low, high)`` in the partition."""

    topic: str
    partition: int
    start: int
    end: int
    low: int
    high: int
    read: int = 0  # records consumed (the records in [start, end) minus compaction gaps and transaction markers)
    next: int = 0  # the next offset to read

    @property
    def position(self) -> str:
        return f"{self.topic}/{self.partition}/{self.next}"


@dataclass
class KafkaStats:
    partitions: list[PartitionRead] = field(default_factory=list)
    seconds: float = 0.0
    undecodable: Counter[str] = field(default_factory=Counter)
    missing_topics: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        """Records read."""
        return sum(p.read for p in self.partitions)

    @property
    def window(self) -> int:
        """Offsets to read: from the window's start to the high watermarks taken at the start."""
        return sum(p.end - p.start for p in self.partitions)

    @property
    def in_topics(self) -> int:
        """Offsets the topics held when the scan started (low to high watermark)."""
        return sum(p.high - p.low for p in self.partitions)


def consumer_settings(client: Mapping[str, Any]) -> dict[str, Any]:
    """A consumer that never joins its group or commits: ``assign`` only, positions in memory."""
    return {
        **client,
        "group.id": f"writeguard-scope-{uuid.uuid4().hex[:12]}",  # required by librdkafka; never joined
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,  # the end of a partition whose last offsets are transaction markers
        # Records deleted (retention) between planning and reading: an error, never a silent gap in the history.
        "auto.offset.reset": "error",
        "fetch.wait.max.ms": 50,
        "max.partition.fetch.bytes": 262_144,  # small chunks per partition: the merge's buffers stay small
        "queued.max.messages.kbytes": 8_192,  # librdkafka's prefetch, bounded (default 64 MB)
        # Its wait before fetching again once that prefetch is full (default 1 s): a scan would idle most of it.
        "fetch.queue.backoff.ms": 5,
    }


def plan_reads(consumer: Consumer, topics: Sequence[str], start_us: int | None, timeout: float) -> KafkaStats:
    """Every partition of ``topics`` with the offsets to read: from ``start_us`` (all of it when None) to now."""
    stats = KafkaStats()
    try:
        md = consumer.list_topics(timeout=timeout)
    except KafkaException as e:
        raise KafkaScanError(f"cannot list the topics: {e.args[0]}") from None
    parts: list[TopicPartition] = []
    for topic in topics:
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            stats.missing_topics.append(topic)  # Debezium creates a table's topic at its first change
            continue
        parts.extend(TopicPartition(topic, p) for p in sorted(meta.partitions))
    if not parts:
        return stats
    try:
        marks = [consumer.get_watermark_offsets(tp, timeout=timeout, cached=False) for tp in parts]
        if start_us is None:
            starts = [lo for lo, _ in marks]
        else:
            at_ms = max(0, (start_us - START_SLACK_US) // 1000)
            found = consumer.offsets_for_times([TopicPartition(tp.topic, tp.partition, at_ms) for tp in parts],
                                               timeout=timeout)  # fmt: skip
            # -1: no record at or after the time: nothing of the window in that partition.
            starts = [hi if f.offset < 0 else max(f.offset, lo) for f, (lo, hi) in zip(found, marks, strict=True)]
    except KafkaException as e:
        raise KafkaScanError(f"cannot read the topics' offsets: {e.args[0]}") from None
    for tp, (lo, hi), start in zip(parts, marks, starts, strict=True):
        stats.partitions.append(PartitionRead(tp.topic, tp.partition, start, hi, lo, hi, next=start))
    return stats


Item = tuple[int, int, int, ChangeEvent, "bytes | None", str]
_T = TypeVar("_T")


class PartitionMerge(Generic[_T]):
    """Per-partition buffers filled from one consumer; each partition's stream refills them when it runs dry.

    Every record is decoded once; ``item(event, message, index, position)`` turns it into what the partition's
    buffer holds (None: skip it). A partition whose buffer holds :data:`_PAUSE_AT` items is paused until the
    merge has taken it below :data:`_RESUME_AT`, so memory stays bounded however far ahead it is fetched.
    """

    def __init__(
        self,
        consumer: Consumer,
        reads: list[PartitionRead],
        undecodable: Counter[str],
        stall_s: float,
        item: Callable[[Decoded, Message, int, str], _T | None],
    ) -> None:
        self.consumer = consumer
        self.undecodable = undecodable
        self.item = item
        self.stall_s = stall_s
        self.reads = reads
        self.index = {(p.topic, p.partition): i for i, p in enumerate(self.reads)}
        self.bufs: list[deque[_T]] = [deque() for _ in self.reads]
        self.done = [False] * len(self.reads)
        self.paused = [False] * len(self.reads)
        self.last_data = time.monotonic()

    def stream(self, i: int) -> Iterator[_T]:
        buf = self.bufs[i]
        pop = buf.popleft
        while True:
            while buf:
                yield pop()
            if self.done[i]:
                return
            if self.paused[i]:
                self._resume(i)
            self.pump()

    def _tp(self, i: int) -> list[TopicPartition]:
        p = self.reads[i]
        return [TopicPartition(p.topic, p.partition)]

    def _pause(self, i: int) -> None:
        self.consumer.pause(self._tp(i))
        self.paused[i] = True

    def _resume(self, i: int) -> None:
        self.consumer.resume(self._tp(i))
        self.paused[i] = False

    def _finish(self, i: int) -> None:
        if not self.done[i]:
            self.done[i] = True
            self._pause(i)  # fetch nothing more of it: later records are past the read's end

    def pump(self) -> None:
        """Consume one batch into the buffers; fail if no partition has moved for ``stall_s``."""
        try:
            # consume() waits until it has the whole batch or the timeout passes: take what is there, else wait
            # for one record only.
            msgs = self.consumer.consume(_BATCH, timeout=0) or self.consumer.consume(1, timeout=0.5)
        except KafkaException as e:
            raise KafkaScanError(f"reading the topics failed: {e.args[0]}") from None
        now = time.monotonic()
        if msgs:
            self.last_data = now
        elif now - self.last_data > self.stall_s:
            left = ", ".join(p.position for p, d in zip(self.reads, self.done, strict=True) if not d)
            raise KafkaScanError(f"no records for {self.stall_s:.0f} s before the read's end, at {left}")
        index, reads, bufs, done = self.index, self.reads, self.bufs, self.done
        for k, paused in enumerate(self.paused):
            if paused and not done[k] and len(bufs[k]) < _RESUME_AT:
                self._resume(k)
        item = self.item
        undecodable = self.undecodable
        for m in msgs:
            err = m.error()
            topic, part = m.topic(), m.partition()
            i = index.get((topic, part))  # type: ignore[arg-type]  # a record always has both
            if err is not None:
                if err.code() == _PARTITION_EOF:
                    if i is not None:
                        self._finish(i)
                    continue
                if err.code() == _AUTO_OFFSET_RESET:
                    raise KafkaScanError(
                        f"{topic}/{part}: records were deleted while they were read (retention?), at "
                        f"{reads[i].position if i is not None else '?'}: {err.str()}"
                    )
                if err.fatal() or not err.retriable():
                    raise KafkaScanError(f"reading {topic}/{part} failed: {err.str()}")
                continue
            if i is None or done[i]:
                continue
            off: int = m.offset()  # type: ignore[assignment]  # a record's offset is never None
            p = reads[i]
            if off >= p.end:
                self._finish(i)
                continue
            p.read += 1
            p.next = off + 1
            try:
                ev = decode(m.value())
            except EnvelopeError as e:
                undecodable[e.reason] += 1
            else:
                got = item(ev, m, i, f"{topic}/{part}/{off}")
                if got is not None:
                    bufs[i].append(got)
            if off + 1 >= p.end:
                self._finish(i)
            elif len(bufs[i]) >= _PAUSE_AT and not self.paused[i]:
                self._pause(i)


def row_events(skipped: Counter[str]) -> Callable[[Decoded, Message, int, str], Item | None]:
    """The merge item of a scope: a row change with its key and position; other records counted in ``skipped``."""

    def item(ev: Decoded, m: Message, i: int, position: str) -> Item | None:
        if type(ev) is ChangeEvent:
            return (ev.commit_ts_us, ev.lsn or 0, i, ev, m.key(), position)
        skipped[type(ev).__name__.lower()] += 1
        return None

    return item


def offsets_read(reads: Sequence[PartitionRead]) -> str:
    """Per topic: offsets read of the offsets to read, over its partitions.

    >>> offsets_read([PartitionRead("t", 0, 10, 20, 0, 20, next=15), PartitionRead("t", 1, 0, 5, 0, 5, next=5)])
    't 10/15'
    """
    by_topic: dict[str, list[int]] = {}
    for p in reads:
        t = by_topic.setdefault(p.topic, [0, 0])
        t[0] += p.next - p.start
        t[1] += p.end - p.start
    return ", ".join(f"{topic} {done:,}/{total:,}" for topic, (done, total) in by_topic.items())


def merged(merge: PartitionMerge[Item]) -> Iterator[Item]:
    """All partitions' decoded records in commit order: (commit time, LSN), ties in partition order."""
    return heapq.merge(*(merge.stream(i) for i in range(len(merge.reads))))


def iter_events_kafka(
    client: Mapping[str, Any],
    topics: Sequence[str],
    reader: UndoReader,
    stats: KafkaStats,
    *,
    start_us: int | None = None,
    progress: Callable[[str], None] | None = None,
    every_s: float = 2.0,
    timeout_s: float = 30.0,
) -> Iterator[RowEvent]:
    """Every row change of ``topics`` from ``start_us`` (less :data:`START_SLACK_US`) to now, attributed, in
    commit order, as it is read. ``client`` are the confluent-kafka settings (bootstrap.servers, security)."""
    started = time.perf_counter()
    consumer = Consumer(consumer_settings(client))
    try:
        found = plan_reads(consumer, topics, start_us, timeout_s)
        stats.partitions, stats.missing_topics = found.partitions, found.missing_topics
        reads = [p for p in stats.partitions if p.start < p.end]
        merge = PartitionMerge(consumer, reads, stats.undecodable, timeout_s, row_events(reader.skipped))
        if merge.reads:
            consumer.assign([TopicPartition(p.topic, p.partition, p.start) for p in merge.reads])
        window = max(stats.window, 1)
        feed = reader.feed_decoded
        last = started
        n = 0
        for _, _, _, ev, key, position in merged(merge):
            feed(ev, key, position)
            if reader.ready:
                yield from reader.take()
            n += 1
            if progress is not None and n & 0xFFF == 0 and (now := time.perf_counter()) - last >= every_s:
                last = now
                read = stats.records
                rate = read / (now - started)
                progress(f"scope: {read:,} records read ({read / window:.0%} of the window), {rate:,.0f} events/s; "
                         f"offsets read: {offsets_read(merge.reads)}")  # fmt: skip
        yield from reader.finish()
    finally:
        stats.seconds = time.perf_counter() - started
        consumer.close()
