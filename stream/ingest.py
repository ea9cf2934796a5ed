"""Bulk ingest: the CDC topics read in batches with confluent-kafka, routed, and forwarded to the changes topic.

Faust's per-record machinery (an event, its ack, offset tracking, one awaited send per record) costs far more
than decoding and scoring a change: the worker used to spend most of its time there. Here librdkafka fetches
and splits the record batches in C, :class:`~stream.pipeline.Router` decodes each value once, and each batch
leaves as one record per destination partition of the agent-keyed changes topic (a JSON array of
:class:`~detectors.engine.Change`), so the ``detect`` Faust agent pays its per-record cost once per batch.

Delivery is at least once: the offsets of a batch are committed only after the broker acknowledged every
record that came from it (changes and dead letters), and never past a row still held for its transaction's
agent message. A worker killed between produce and commit re-sends the batch; alert ids are deterministic
(they derive from the CDC coordinates), so a repeat gives the same alert ids.

The consumer group is the worker's ``kafka.group_id`` with ``.ingest`` appended: Faust's group (the changes
topic) uses its own assignor protocol, which a librdkafka member could not join.

With ``worker.agent_messages``, every worker also reads all of the messages topic outside the group
(:class:`stream.join.MessageJoiner`), so that a row held for its transaction's message is joined whichever member
read that message.

Everything here runs on one thread (:attr:`BulkIngest.executor`): the router's state is never shared.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connectors.messages import DeadLetter
from detectors.engine import Change, KafkaCoords
from stream.checkpoints import partition_for
from stream.config import Config, client_settings
from stream.join import MessageJoiner
from stream.logs import kafka_logging, printable
from stream.metrics import Metrics
from stream.pipeline import SKIP_PENDING, Intake, Router

log = logging.getLogger("writeguard.ingest")

BATCH = 5_000  # records per consume(): a batch's bookkeeping is paid once
WAIT_S = 0.01  # consume() returns after this even with fewer records: the latency light load pays
MAX_PER_RECORD = 2_000  # changes per record on the changes topic, ~300 kB: under Kafka's 1 MB default
LAG_EVERY_S = 5.0
_encode = msgspec.json.Encoder().encode
_commit_ts = attrgetter("commit_ts_us")
_decode_change = msgspec.json.Decoder(Change).decode
_decode_changes = msgspec.json.Decoder(list[Change]).decode


def decode_changes(value: bytes) -> list[Change]:
    """A record of the changes topic: a batch (a JSON array of changes), or one change as earlier versions wrote.

    >>> ch = Change("public.refunds", "c", "refund-agent-01", None, {"amount": 12.5}, 1, KafkaCoords("t", 0, 7))
    >>> [c.agent_id for c in decode_changes(_encode([ch, ch]))], decode_changes(_encode(ch))[0].coords.offset
    (['refund-agent-01', 'refund-agent-01'], 7)
    """
    try:
        return _decode_changes(value)
    except msgspec.ValidationError:
        return [_decode_change(value)]


class IngestError(RuntimeError):
    """A batch could not be forwarded: nothing of it was committed, so a restarted worker reads it again."""


def ingest_group(cfg: Config) -> str:
    """The consumer group of the CDC topics.

    >>> from stream.config import load_config, EXAMPLE_CONFIG
    >>> ingest_group(load_config(EXAMPLE_CONFIG)).endswith(".ingest")
    True
    """
    return f"{cfg.kafka.group_id}.ingest"


def dead_letter(reason: str, detail: str, msg: Message) -> bytes:
    """The dead-letter record of a CDC record writeguard could not use: its coordinates, reason and bytes."""
    _, ts = msg.timestamp()
    coords = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
    return DeadLetter.of(reason, detail, coords, ts if ts >= 0 else None, msg.key(), msg.value()).to_bytes()


class BulkIngest:
    """CDC topics -> :class:`Router` -> the changes topic, one :meth:`step` (one batch) at a time.

    ``step`` blocks (in librdkafka, without the GIL, while it waits): call it on :attr:`executor`.
    """

    def __init__(
        self,
        cfg: Config,
        router: Router,
        metrics: Metrics,
        inputs: list[str],
        *,
        message_topic: str | None = None,
        batch: int = BATCH,
        wait_s: float = WAIT_S,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self._current: Message | None = None  # the record being fed: a dead letter carries its coordinates and bytes
        self.intake = Intake(router, self._add, self._skipped, self._dead_current)
        self.inputs = inputs
        self.message_topic = message_topic
        # Every message, whichever member the group gives its partition: the join of rows read here needs them.
        self.joiner = MessageJoiner(cfg, router, message_topic) if message_topic is not None else None
        self.batch = batch
        self.wait_s = wait_s
        self.changes_topic = cfg.topics.changes
        self.dead_letter_topic = cfg.topics.dead_letter
        self.partitions = cfg.topics.partitions
        settings = kafka_logging(client_settings(cfg))
        w = cfg.worker
        self.group = ingest_group(cfg)
        self.consumer = Consumer(
            {
                **settings,
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": int(w.session_timeout_s * 1000),
                "heartbeat.interval.ms": int(w.heartbeat_interval_s * 1000),
                "fetch.wait.max.ms": w.fetch_max_wait_ms,
                "fetch.min.bytes": w.fetch_min_bytes,
                # A CDC topic Debezium creates after the worker started is found within 10 s, not 5 minutes.
                "topic.metadata.refresh.interval.ms": 10_000,
            }
        )
        # Not idempotent: a retried batch may land twice, which at-least-once allows, and an idempotent producer
        # waits for the transaction coordinator, which a fresh cluster may still be loading.
        self.producer = Producer({**settings, "linger.ms": 2})
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeguard-ingest")
        self._next: dict[tuple[str, int], int] = {}  # the offset to commit per CDC partition, once delivered
        # Partitions whose commit stopped short at a held row: committed further once it is released.
        self._short: dict[tuple[str, int], int] = {}
        self._out: dict[int, list[Change]] = {}
        self._failed: list[str] = []
        self._partition_of: dict[str, int] = {}
        self._lag_at = 0.0
        self._started = False
        self._stopping = False
        self.closed = False
        self.forwarded = 0  # changes acknowledged by the broker, since start

    # -- the batch ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        md = self.producer.list_topics(self.changes_topic, timeout=30)
        n = len(md.topics[self.changes_topic].partitions)
        if n and n != self.partitions:
            # The checkpoints of topics.models are placed by topics.partitions: both must agree with the topic.
            log.error(
                "%s has %d partitions, topics.partitions says %d: using %d",
                self.changes_topic,
                n,
                self.partitions,
                n,
            )
            self.partitions = n
        self.consumer.subscribe(self.inputs, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._started = True
        log.info("ingest: group %s reads %s", printable(self.group), printable(", ".join(self.inputs)))

    def run(self) -> None:
        """Batch after batch until :meth:`stop`: on :attr:`executor`, once.

        One call for the life of the worker rather than one per batch: a batch handed over by the event loop
        waits for the loop, which may be scoring a large batch of its own, and the CDC backlog grows meanwhile.
        """
        while not self._stopping and not self.closed:
            self.step()

    def stop(self) -> None:
        """Let :meth:`run` return after the batch it is in (any thread)."""
        self._stopping = True

    def step(self) -> int:
        """Consume one batch, route it, forward it, and commit it; returns the changes forwarded."""
        if self.closed:
            return 0
        if not self._started:
            self.start()
        msgs = self.consumer.consume(self.batch, self.wait_s)
        j = self.joiner
        if j is not None:
            j.poll()  # messages first (read by other members too): an undo's signature, the agents of these rows
        if msgs:
            self._route(msgs)
        now_us: int | None = time.time_ns() // 1000
        if j is not None:
            j.poll()  # and what the rows just held need (it moves back for old ones)
            if not j.caught_up:
                now_us = None  # a held row's message may be just behind: none expires until it is read
        self.intake.release(now_us)  # held rows are scored as unattributed, not dropped
        n = self._forward()
        if time.monotonic() >= self._lag_at:
            self._lag_at = time.monotonic() + LAG_EVERY_S
            self._consumer_lag()
        return n

    def _route(self, msgs: list[Message]) -> None:
        if self.message_topic is not None:
            # A fetch interleaves the topics: a transaction's message (an agent's name, an undo's signature) is
            # routed before the batch's rows, which it may concern. The sort is stable: each topic keeps its order.
            mt = self.message_topic
            msgs.sort(key=lambda m: m.topic() != mt)
        feed = self.intake.feed
        nxt = self._next
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:  # noqa: SLF001 -- librdkafka's own name
                    if err.fatal():
                        raise KafkaException(err)
                    log.warning("consume: %s", err)
                continue
            topic, part, off = m.topic(), m.partition(), m.offset()
            assert topic is not None and part is not None and off is not None  # a record, not an error
            nxt[(topic, part)] = off + 1
            self._current = m
            feed(topic, m.value(), KafkaCoords(topic, part, off))
        self._current = None

    def _add(self, ch: Change) -> None:
        p = self._partition_of.get(ch.agent_id)
        if p is None:
            if len(self._partition_of) >= 200_000:
                self._partition_of.clear()
            # The partition Kafka's default partitioner gives the agent's key: where its checkpoints live too.
            p = self._partition_of[ch.agent_id] = partition_for(ch.agent_id, self.partitions)
        out = self._out.get(p)
        if out is None:
            self._out[p] = [ch]
        else:
            out.append(ch)

    def _skipped(self, reason: str) -> None:
        self.metrics.skipped.labels(reason).inc()
        if reason == SKIP_PENDING and self.joiner is not None and self._current is not None:
            self.joiner.held(self._current.timestamp()[1])

    def _dead_current(self, reason: str, detail: str) -> None:
        assert self._current is not None  # called by the intake while a record is fed
        self._dead(reason, detail, self._current)

    def _dead(self, reason: str, detail: str, m: Message) -> None:
        self.metrics.dead_letters.labels(reason).inc()
        self.producer.produce(
            self.dead_letter_topic, key=m.key(), value=dead_letter(reason, detail, m), on_delivery=self._delivered
        )

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failed.append(f"{msg.topic()}: {err}")

    def _forward(self) -> int:
        n = 0
        for p, chs in self._out.items():
            # librdkafka hands over a batch partition by partition, and Debezium spreads an agent's writes over
            # the partitions by primary key: in commit order again, so that a model never learns an agent's
            # later writes before its earlier ones (a rogue's first writes would widen its own range).
            chs.sort(key=_commit_ts)
            for i in range(0, len(chs), MAX_PER_RECORD):
                part = chs[i : i + MAX_PER_RECORD]
                self._produce(p, _encode(part))
                n += len(part)
        self._out.clear()
        if not self._next and not n:
            return 0
        left = self.producer.flush(60.0)
        if left or self._failed:
            failed, self._failed = self._failed, []
            raise IngestError(f"{left} records not acknowledged; {'; '.join(failed[:3])}: offsets not committed")
        self.forwarded += n
        self._commit()
        return n

    def _produce(self, partition: int, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.changes_topic, value=value, partition=partition, on_delivery=self._delivered)
                return
            except BufferError:  # the local queue is full: let librdkafka send some first
                self.producer.poll(0.1)

    def _commit(self) -> None:
        if not self._next and not self._short:
            return
        # A row held for its transaction's agent message is not forwarded yet: its offset stays uncommitted.
        held: dict[tuple[str, int], int] = {}
        for rows in self.router.pending.values():
            for _, _, coords in rows:
                if isinstance(coords, KafkaCoords):
                    tp = (coords.topic, coords.partition)
                    held[tp] = min(held.get(tp, coords.offset), coords.offset)
        short = self._short
        short.update(self._next)
        self._next.clear()
        offsets = [TopicPartition(t, p, min(o, held.get((t, p), o))) for (t, p), o in short.items()]
        for done in offsets:
            if short[(done.topic, done.partition)] == done.offset:
                del short[(done.topic, done.partition)]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as e:  # e.g. during a rebalance: the next batch's commit covers these offsets
            log.warning("commit: %s", printable(e))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels(self.group).inc()
        self.metrics.assigned_partitions.labels(self.group).set(len(partitions))
        log.info("ingest: assigned %s", printable(", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions)))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called inside consume(), after the previous batch was committed: nothing of these is outstanding but
        # rows held for their message, which were not committed: the partitions' next owner reads them again.
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)
            self._short.pop((tp.topic, tp.partition), None)
        self.router.forget({(tp.topic, tp.partition) for tp in partitions})

    def _consumer_lag(self) -> None:
        try:
            assigned = self.consumer.assignment()
            positions = self.consumer.position(assigned) if assigned else []
        except KafkaException:
            return
        for tp in positions:
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and high >= 0:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(high - tp.offset, 0))

    def close(self) -> None:
        """Leave the group, so that its partitions move at once.

        Every batch was committed at the end of its step; rows still held for their transaction's agent message
        were not, and the partitions' next owner reads them again.
        """
        if not self.closed:
            self.closed = True
            self.consumer.close()
            if self.joiner is not None:
                self.joiner.close()
