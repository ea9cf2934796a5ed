"""Durable model state: the (table, agent) model sets checkpointed to a compacted topic, restored by partition.

Why our own checkpoints rather than Faust tables with their changelog: Faust's table recovery is where its known
problems are (recovery that stalls or restarts in a loop on rebalances, standby and changelog offsets that
disagree, a whole-table recovery before any stream resumes), and a table value is re-serialised and sent on every
change, where a model set changes on every event. The engine already serialises a model set without what it
shares with its table (``detectors.engine._detached`` and pickle, for its store of evicted agents), so a checkpoint
is that blob, written every ``worker.checkpoint_interval_s`` for the agents that changed since the last one.

Layout of ``topics.models`` (compacted, ``topics.partitions`` partitions):

- key: ``table + "\\0" + agent id`` (UTF-8), so the latest checkpoint of each model set survives compaction;
  and ``table`` alone for the table's shared models (its population models and categorical values), which each
  worker writes to the partitions it owns and a worker that starts cold takes from the partitions it restores;
- partition: the partition of the changes topic that carries the agent's events (the hop keys it by agent id with
  Kafka's default murmur2 partitioner), so a worker assigned changes partition p restores exactly its agents by
  reading models partition p;
- value: a format byte (1), a learning byte (the model set is still in its learning period), then the blob;
- header ``writeguard-signature``: with ``control.signing_key``, ``v1=`` and an HMAC-SHA256 of key and value
  (under a label of its own, so a control record's signature is no checkpoint's). A worker unpickles only
  checkpoints signed with one of its keys; without a key (allowed only when nothing enforces) it trusts the topic.

>>> model_key("public.refunds", "a1")
b'public.refunds\\x00a1'
>>> parse_key(model_key("public.refunds", "a1"))
('public.refunds', 'a1')
>>> decode_value(encode_value(b"blob", learning=True))
(b'blob', True)
>>> partition_for("refund-agent-01", 6) == partition_for("refund-agent-01", 6) < 6
True
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka.partitioner import murmur2
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from connectors.messages import CONTROL_SIGNATURE_HEADER, Headers, HeaderValue
from detectors.engine import Engine
from stream.config import Config, client_settings
from stream.logs import kafka_logging, printable
from stream.metrics import Metrics

log = logging.getLogger("writeguard.checkpoints")

SEP: Final = "\0"
FORMAT: Final = 1
_LABEL: Final = b"writeguard-models-v1\n"
_PARTITION_EOF: Final = getattr(KafkaError, "_PARTITION_EOF")  # noqa: B009 - librdkafka's underscored name
Key = tuple[str, str]
Item = tuple[Key, bytes, bool]  # (table, agent), blob, learning: what Engine.preload takes


class CheckpointRejected(ValueError):
    """A record of the models topic that is not applied: malformed, unsigned or badly signed."""


def model_key(table: str, agent_id: str) -> bytes:
    return f"{table}{SEP}{agent_id}".encode()


def table_key(table: str) -> bytes:
    return table.encode()


def parse_key(key: bytes | None) -> Key:
    if key is None:
        raise CheckpointRejected("no key")
    table, sep, agent = key.decode("utf-8", "replace").partition(SEP)
    if not sep or not table:
        raise CheckpointRejected(f"key {printable(repr(key[:80]))} is not table\\0agent")
    return table, agent


def partition_for(agent_id: str, partitions: int) -> int:
    """The changes topic's partition of an agent: Kafka's (Java's, aiokafka's) default partitioner on its key."""
    return int((murmur2(agent_id.encode()) & 0x7FFFFFFF) % partitions)


def encode_value(blob: bytes, learning: bool) -> bytes:
    return bytes((FORMAT, 1 if learning else 0)) + blob


def decode_value(value: bytes | None) -> tuple[bytes, bool]:
    if value is None or len(value) < 3 or value[0] != FORMAT or value[1] > 1:
        raise CheckpointRejected("not a checkpoint of format 1")
    return value[2:], value[1] == 1


def sign(secret: bytes, key: bytes, value: bytes) -> bytes:
    msg = _LABEL + b"%d\n" % len(key) + key + value
    # hmac.digest: OpenSSL's one-shot HMAC, a fifth of hmac.new's cost (a restore checks 100,000 of them).
    return b"v1=" + hmac.digest(secret, msg, "sha256").hex().encode()


def verify(secrets: Sequence[bytes], key: bytes, value: bytes, headers: Headers) -> None:
    """Raise :class:`CheckpointRejected` unless one of ``secrets`` signed this key and value."""
    pairs: Iterable[tuple[str, HeaderValue]] = headers.items() if isinstance(headers, Mapping) else headers or ()
    found = [v for k, v in pairs if isinstance(k, str) and k.lower() == CONTROL_SIGNATURE_HEADER]
    if len(found) != 1 or found[0] is None:
        raise CheckpointRejected("unsigned")
    sig = found[0].encode() if isinstance(found[0], str) else found[0]
    if not any(hmac.compare_digest(sign(s, key, value), sig) for s in secrets):
        raise CheckpointRejected("bad signature")


def producer_settings(cfg: Config) -> dict[str, Any]:
    return {
        **kafka_logging(client_settings(cfg)),
        "acks": "all",
        "linger.ms": 20,
        "compression.type": "lz4",  # pickled model sets are mostly float arrays and names: they compress
        "queue.buffering.max.messages": 1_000_000,
    }


class CheckpointWriter:
    """Produces checkpoints to ``topics.models``, each to the partition it is given, signed when a key is set."""

    def __init__(self, cfg: Config, producer: Producer | None = None) -> None:
        self.topic = cfg.topics.models
        self.secret = cfg.control.keys()[0] if cfg.control is not None else None
        self.producer = producer or Producer(producer_settings(cfg))
        self.errors: list[str] = []
        self.written = 0
        self.bytes = 0

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None and len(self.errors) < 100:
            self.errors.append(str(err))

    def write(self, key: Key | str, blob: bytes, learning: bool, partition: int) -> None:
        """One model set's checkpoint (key: table and agent), or a table's shared models (key: the table)."""
        k = table_key(key) if isinstance(key, str) else model_key(*key)
        v = encode_value(blob, learning)
        headers: list[tuple[str, str | bytes | None]] | None = None
        if self.secret is not None:
            headers = [(CONTROL_SIGNATURE_HEADER, sign(self.secret, k, v))]
        while True:
            try:
                self.producer.produce(
                    self.topic, key=k, value=v, partition=partition, headers=headers, on_delivery=self._delivered
                )
                break
            except BufferError:  # the local queue is full: let it drain, then retry
                self.producer.poll(0.1)
            except KafkaException as e:  # e.g. a models topic with fewer partitions: reported, never a crash
                if len(self.errors) < 100:
                    self.errors.append(str(e))
                return
        self.written += 1
        self.bytes += len(v)

    def poll(self) -> None:
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every checkpoint to be acknowledged; the number still queued (0 when all are in)."""
        return int(self.producer.flush(timeout))


@dataclass
class Restored:
    """What a restore read: the model sets by partition, and what it skipped."""

    items: dict[int, list[Item]] = field(default_factory=dict)
    tables: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)  # table checkpoints by partition
    records: int = 0
    rejected: int = 0
    bytes: int = 0
    seconds: float = 0.0


def read_partitions(
    cfg: Config, partitions: Iterable[int], *, timeout_s: float = 60.0, tables: Iterable[str] | None = None
) -> Restored:
    """Read these partitions of ``topics.models`` from the start to their end as of now (blocking: run it in a
    thread). The latest record of a key wins, a tombstone deletes it; a record that is malformed, of an unknown
    table, or (with ``control.signing_key``) not signed by one of its keys is skipped and counted."""
    started = time.perf_counter()
    out = Restored()
    parts = sorted(set(partitions))
    if not parts:
        return out
    secrets = cfg.control.keys() if cfg.control is not None else None
    known = set(tables) if tables is not None else {t.name for t in cfg.tables}
    consumer = Consumer(
        {
            **kafka_logging(client_settings(cfg)),
            "group.id": f"writeguard-restore-{uuid.uuid4().hex[:12]}",  # required by librdkafka; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        }
    )
    latest: dict[int, dict[Key, tuple[bytes, bool]]] = {p: {} for p in parts}
    shared: dict[int, dict[str, bytes]] = {p: {} for p in parts}
    try:
        ends: dict[int, int] = {}
        for p in parts:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(cfg.topics.models, p), timeout=timeout_s)
            if hi > lo:
                ends[p] = hi
        todo = set(ends)
        if todo:
            consumer.assign([TopicPartition(cfg.topics.models, p, OFFSET_BEGINNING) for p in sorted(todo)])
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cfg.topics.models}: partitions {sorted(todo)} not read to their end")
            for msg in consumer.consume(num_messages=5000, timeout=0.5):
                err = msg.error()
                part = msg.partition()
                if part is None:
                    continue
                if err is not None:
                    if err.code() == _PARTITION_EOF:
                        todo.discard(part)
                        continue
                    raise KafkaException(err)
                if part not in latest:
                    continue
                out.records += 1
                value = msg.value()
                try:
                    raw = msg.key()
                    if raw is not None and SEP.encode() not in raw:  # a table's shared models
                        table = raw.decode("utf-8", "replace")
                        if value is not None and table in known:
                            if secrets is not None:
                                verify(secrets, raw, value, msg.headers())
                            shared[part][table] = decode_value(value)[0]
                        continue
                    key = parse_key(raw)
                    if value is None:
                        latest[part].pop(key, None)
                    else:
                        out.bytes += len(value)
                        if key[0] not in known:
                            raise CheckpointRejected(f"table {printable(key[0])!r} is not in the config")
                        if secrets is not None:
                            verify(secrets, msg.key() or b"", value, msg.headers())
                        latest[part][key] = decode_value(value)
                except CheckpointRejected as e:
                    out.rejected += 1
                    if out.rejected <= 5:
                        log.warning("%s: skipped the record at %s/%s: %s", cfg.topics.models, part, msg.offset(), e)
                offset = msg.offset()
                if offset is None or offset + 1 >= ends.get(part, 0):
                    todo.discard(part)
    finally:
        consumer.close()
    for p, got in latest.items():
        out.items[p] = [(k, blob, learning) for k, (blob, learning) in got.items()]
        out.tables[p] = list(shared[p].items())
    out.seconds = time.perf_counter() - started
    return out


class Checkpointer:
    """The worker's side: which changes partitions it owns and has restored, and the incremental checkpoints.

    The detect agent calls :meth:`seen` with each event's agent and changes partition, and awaits :meth:`wait`
    for a partition that is not :meth:`ready`: a partition's events are scored only once its agents' checkpoints
    are in the engine's store. :meth:`assigned` is Faust's ``on_partitions_assigned``; :meth:`flush` runs every
    ``worker.checkpoint_interval_s``, when partitions are revoked, and when the worker stops.
    """

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        *,
        writer: CheckpointWriter | None = None,
        read: Callable[[Iterable[int]], Restored] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.engine = engine
        self.partitions = cfg.topics.partitions
        self.writer = writer or CheckpointWriter(cfg)
        self._read = read or (lambda parts: read_partitions(cfg, parts))
        self.part: dict[str, int] = {}  # agent id -> the changes partition its events came from
        self.owned: set[int] = set()  # assigned changes partitions (restored or being restored)
        self._ready: dict[int, asyncio.Event] = {}
        self.restores: list[tuple[list[int], Restored]] = []  # what each restore read, for logs and tests
        self._table_versions: dict[str, int] = {}
        self.backlog = 0  # model sets changed but not yet checkpointed after the last flush

    def seen(self, agent_id: str, partition: int) -> None:
        if self.part.get(agent_id) != partition:
            self.part[agent_id] = partition

    def ready(self, partition: int) -> bool:
        ev = self._ready.get(partition)
        return ev is not None and ev.is_set()

    async def wait(self, partition: int) -> None:
        await self._ready.setdefault(partition, asyncio.Event()).wait()

    def partition_of(self, agent_id: str) -> int:
        p = self.part.get(agent_id)
        return p if p is not None else partition_for(agent_id, self.partitions)

    def flush(self, budget_s: float | None = None, *, tables: bool = True) -> int:
        """Write the checkpoints of the model sets that changed since they were last written, oldest change first,
        for at most ``budget_s`` of serialising (None: all of them), then (with ``tables``) those of the
        tables' shared models that changed; how many model sets were written.

        A model set costs tens of µs to pickle: with as many active agents as events per interval, checkpointing
        them all would double the worker's time per event. The budget caps that share; the model sets left over
        are written first at the next flush (and all of them when partitions are revoked or the worker stops).
        """
        n = 0
        started = time.perf_counter()
        deadline = None if budget_s is None else started + budget_s
        while True:
            keys = self.engine.take_dirty(None if deadline is None else 256)
            if not keys:
                break
            for key in keys:
                got = self.engine.checkpoint(key)
                if got is not None:
                    self.writer.write(key, got[0], got[1], self.partition_of(key[1]))
                    n += 1
            self.writer.poll()  # delivery callbacks, and room in the local queue
            if deadline is not None and time.perf_counter() >= deadline:
                break
        if tables:
            self.flush_tables()
        self.writer.poll()
        self.backlog = len(self.engine.dirty or ())
        if self.metrics is not None:
            self.metrics.checkpoints.inc(n)
            self.metrics.checkpoint_seconds.inc(time.perf_counter() - started)
            self.metrics.checkpoint_backlog.set(self.backlog)
        if self.writer.errors:
            log.error("checkpoints not written to %s: %s", self.cfg.topics.models, printable(self.writer.errors[-1]))
            self.writer.errors.clear()
        return n

    def flush_tables(self) -> None:
        """Write the checkpoints of the tables' shared models (population, table-wide state) that changed."""
        for name in self.engine.tables:
            version = self.engine.table_version(name)
            if self.owned and self._table_versions.get(name) != version:
                self._table_versions[name] = version
                blob = self.engine.table_checkpoint(name)
                for p in self.owned:
                    self.writer.write(name, blob, False, p)

    def assigned(self, partitions: set[int]) -> asyncio.Task[None] | None:
        """The changes partitions assigned now: forget the agents of those lost, restore those gained (a task)."""
        lost = self.owned - partitions
        if lost:
            gone = [a for a, p in self.part.items() if p in lost]
            self.engine.forget(gone)
            for a in gone:
                del self.part[a]
            for p in lost:
                self._ready.pop(p, None)
        self.owned -= lost
        gained = sorted(partitions - self.owned)
        if not gained:
            return None
        self.owned |= set(gained)
        for p in gained:
            ev = self._ready.setdefault(p, asyncio.Event())
            ev.clear()
        return asyncio.ensure_future(self._restore(gained))

    async def _restore(self, parts: list[int]) -> None:
        loop = asyncio.get_running_loop()
        delay = 1.0
        while True:
            try:
                got = await loop.run_in_executor(None, self._read, parts)
                break
            except Exception as e:  # the broker is away: these partitions wait (unscored) until it is back
                log.error("cannot restore %s partitions %s, retrying: %s", self.cfg.topics.models, parts, printable(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                parts = [p for p in parts if p in self.owned]
                if not parts:
                    return
        n = 0
        for p in parts:
            if p in self.owned:  # not revoked again while it was read
                for table, blob in got.tables.get(p, ()):
                    self.engine.restore_table(table, blob)  # only while this engine's is colder
                n += self.engine.preload(got.items.get(p, ()))
                ev = self._ready.setdefault(p, asyncio.Event())
                ev.set()
        self.restores.append((parts, got))
        if self.metrics is not None:
            self.metrics.restored_models.inc(n)
            self.metrics.restore_seconds.observe(got.seconds)
        log.info(
            "restored %d model sets of %s partitions %s in %.2f s (%d records, %d skipped)",
            n, self.cfg.topics.models, parts, got.seconds, got.records, got.rejected,
        )  # fmt: skip
