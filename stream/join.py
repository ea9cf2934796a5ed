"""The join of transaction messages to their rows when several workers share the CDC topics.

``pg_logical_emit_message(true, '<prefix>', '{"agent_id": ...}')`` reaches Kafka on Debezium's messages topic
(keyed by prefix, so usually all on one partition), its transaction's rows on the tables' topics, keyed by primary
key. The ingest group splits these partitions over its members, so a row and its transaction's message are often
read by different workers. A hop keyed by ``source.txId`` would bring them together, at the price of a second
topic, a second group and a second commit for every row without an agent column (with ``identity: database``,
every row). Messages are few (one per transaction at most), so instead every worker reads *every* message:
:class:`MessageJoiner` is a consumer outside any group, manually assigned all partitions of the messages topic,
that only feeds the router's join (:meth:`stream.pipeline.Router.join`). The group's reader of a messages
partition (one member) still does everything with its messages: the join too (twice is harmless), and what
must happen once: dead letters, refusal and mismatch alerts.

Where it starts: the messages that a held row may need have Kafka timestamps from about the row's own minus the
hold on. It starts at its start time minus the hold (by ``offsets_for_times``) and moves back whenever a row
older than that is held (a restart that reads uncommitted rows, a partition taken over with a backlog). Messages
read twice are harmless: the join only notes a transaction's agent. While it has not read up to the end of every
partition, rows are not released as unattributed (their message may be just behind), for at most ``STALL_S``.
"""

from __future__ import annotations

import logging
import time
import uuid

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from detectors.engine import KafkaCoords
from stream.config import Config, client_settings
from stream.logs import kafka_logging, printable
from stream.pipeline import Router

log = logging.getLogger("writeguard.join")

BATCH = 1_000
# Short waits on the broker: on the direct path (worker.repartition: false) these run on Faust's event loop.
METADATA_TIMEOUT_S = 1.0
POSITION_TIMEOUT_S = 2.0
REFRESH_S = 10.0  # how often a messages topic that Debezium creates later (or more partitions) is looked for
STALL_S = 30.0  # behind for longer (a broker that will not serve it): held rows expire as without a joiner


def start_offsets(found: list[TopicPartition]) -> list[TopicPartition]:
    """offsets_for_times' answer as positions: a partition without a record at or after the time starts at its end.

    >>> [tp.offset for tp in start_offsets([TopicPartition("m", 0, 7), TopicPartition("m", 1, -1)])] == [7, OFFSET_END]
    True
    """
    return [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END) for tp in found]


def _now_us() -> int:
    return time.time_ns() // 1000


class MessageJoiner:
    """Every partition of the messages topic, outside any consumer group, into :meth:`Router.join`.

    Not thread-safe: call it from the thread that feeds the router.
    """

    def __init__(self, cfg: Config, router: Router, topic: str) -> None:
        self.router = router
        # A row waits hold_s from when it was read: a backlog is old by commit time, its messages are not farther.
        router.arrival_clock = _now_us
        self.topic = topic
        self.hold_ms = int(router.hold_s * 1000)
        self.consumer = Consumer(
            {
                **kafka_logging(client_settings(cfg)),
                "group.id": f"writeguard-join-{uuid.uuid4()}",  # never joined nor committed: assign() only
                "enable.auto.commit": False,
                "enable.partition.eof": True,  # how it knows it has read every message there is
                "fetch.wait.max.ms": cfg.worker.fetch_max_wait_ms,
            }
        )
        self.floor_ms = time.time_ns() // 1_000_000 - self.hold_ms  # messages from here on are (being) read
        self.partitions: list[int] = []
        self._behind: set[int] = set()
        self._behind_since: float | None = None
        self._stalled = False
        self._refresh_at = 0.0
        self._oldest_held_ms: int | None = None
        self.joined = 0  # messages read, since start
        self.rewinds = 0

    @property
    def caught_up(self) -> bool:
        """Whether every message in the topic was read (or it has been behind for longer than ``STALL_S``)."""
        if not self._behind:
            self._behind_since = None
            self._stalled = False
            return True
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
        if now - self._behind_since < STALL_S:
            return False
        if not self._stalled:
            self._stalled = True
            log.warning("join: %s not read to its end for %.0f s: held rows expire anyway", self.topic, STALL_S)
        return True

    def held(self, row_ts_ms: int) -> None:
        """A row of Kafka timestamp ``row_ts_ms`` waits for its message: the next :meth:`poll` covers it."""
        if row_ts_ms >= 0 and (self._oldest_held_ms is None or row_ts_ms < self._oldest_held_ms):
            self._oldest_held_ms = row_ts_ms

    def cover(self, row_ts_ms: int) -> None:
        """Make sure the messages a row of Kafka timestamp ``row_ts_ms`` may need are read (rewinds if not)."""
        want = row_ts_ms - self.hold_ms
        if want >= self.floor_ms:
            return
        self.floor_ms = want
        if self.partitions:
            self.rewinds += 1
            self._assign(self.partitions)

    def poll(self) -> int:
        """Join what the consumer has fetched, without waiting; returns the messages read."""
        if self._oldest_held_ms is not None:
            self.cover(self._oldest_held_ms)
            self._oldest_held_ms = None
        self._refresh()
        if not self.partitions:
            return 0
        n = 0
        join = self.router.join
        while True:
            msgs = self.consumer.consume(BATCH, 0)
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 -- librdkafka's own name
                        self._behind.discard(m.partition() or 0)
                    elif err.fatal():
                        raise KafkaException(err)
                    continue
                part, off = m.partition() or 0, m.offset() or 0
                self._behind.add(part)  # until its EOF says there is no more
                join(m.value(), KafkaCoords(self.topic, part, off))
                n += 1
            if len(msgs) < BATCH:
                break
        self.joined += n
        return n

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._refresh_at:
            return
        self._refresh_at = now + REFRESH_S
        try:
            md = self.consumer.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
        except KafkaException as e:
            log.debug("join: metadata of %s: %s", self.topic, printable(e))
            return
        t = md.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            return  # not created yet: Debezium creates it with its first message
        parts = sorted(t.partitions)
        if parts != self.partitions:
            self._assign(parts)
            log.info("join: reads %s, partitions %s, from %d ms", printable(self.topic), parts, self.floor_ms)

    def _assign(self, parts: list[int]) -> None:
        try:
            found = self.consumer.offsets_for_times(
                [TopicPartition(self.topic, p, self.floor_ms) for p in parts], timeout=POSITION_TIMEOUT_S
            )
        except KafkaException as e:  # the broker is away: try again at the next refresh
            log.warning("join: cannot position %s: %s", printable(self.topic), printable(e))
            self._refresh_at = time.monotonic() + 1.0
            self.partitions = []
            self._behind = set(parts)
            return
        self.consumer.assign(start_offsets(found))
        self.partitions = parts
        self._behind = set(parts)

    def close(self) -> None:
        self.consumer.close()
