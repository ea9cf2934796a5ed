"""The Faust app: CDC topics -> (re-key by agent id) -> per-agent detection -> alerts and control records.

Two stages make the pipeline. ``ingest`` (a task, :class:`stream.ingest.BulkIngest` on a thread of its own)
reads the Debezium topics in bulk with confluent-kafka, decodes each record once, sends the malformed ones to
the dead-letter topic, and forwards compact :class:`Change` batches, one record per destination partition and
batch, to the internal ``changes`` topic partitioned by agent id; it commits the CDC offsets once the broker
has them. Debezium keys by primary key, so without this hop one agent's writes would be spread over every
worker. ``detect`` (a Faust agent) consumes ``changes``: all of an agent's events reach the same worker and
the same models, and Faust's per-record cost is paid once per batch. With ``worker.repartition: false`` a
Faust agent (``ingest_direct``) reads the CDC topics and scores them in place. The control topic is followed
by every worker in full, so quarantine state survives restarts and rebalances without co-partitioning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import uuid
from typing import Any, cast

import faust
import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from connectors.messages import (
    CONTROL_SIGNATURE_HEADER,
    ControlRecord,
    ControlRejected,
    DeadLetter,
    Headers,
    sign_control,
    verify_control,
)
from detectors.engine import Change, Engine, Finding, KafkaCoords
from stream.checkpoints import Checkpointer
from stream.config import Config, client_settings, make_engine
from stream.enforce import Enforcer
from stream.ingest import BulkIngest, decode_changes
from stream.join import MessageJoiner
from stream.logs import install as install_log_filters
from stream.logs import kafka_logging, printable
from stream.metrics import Metrics
from stream.modelstore import ModelStore
from stream.pipeline import SKIP_PENDING, Intake, build_alert, router_for

log = logging.getLogger("writeguard.worker")
BATCH = 500
BATCH_WITHIN_S = 0.005
CHECKPOINT_SHARE = 0.05  # of each checkpoint interval, at most, spent serialising model sets
CHECKPOINT_SLICE_S = 0.01  # serialising at a time before the event loop runs the agents again


def ensure_topics(cfg: Config, timeout: float = 30.0) -> None:
    """Create writeguard's own topics; the control topic is compacted so the latest state per agent wins."""
    # librdkafka's own stderr logging here: with a Python logger its lines are only delivered when the client
    # is polled, which list_topics does not do, so a start that fails (wrong password) would not say why.
    admin = AdminClient(client_settings(cfg))
    t = cfg.topics
    wanted = [
        NewTopic(t.alerts, t.partitions, 1),
        NewTopic(t.dead_letter, t.partitions, 1),
        NewTopic(t.changes, t.partitions, 1),
        NewTopic(t.control, t.partitions, 1, config={"cleanup.policy": "compact"}),
        # Partitioned like the changes topic: models partition p holds the agents of changes partition p.
        NewTopic(t.models, t.partitions, 1, config={"cleanup.policy": "compact"}),
    ]
    existing = admin.list_topics(timeout=timeout).topics
    todo = [n for n in wanted if n.topic not in existing]
    if not todo:
        return
    for topic, fut in admin.create_topics(todo, request_timeout=timeout).items():
        try:
            fut.result()
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise RuntimeError(f"cannot create topic {topic}: {e}") from None


def _credentials(client: dict[str, str]) -> Any:
    proto = client.get("security.protocol", "PLAINTEXT").upper()
    if proto == "PLAINTEXT":
        return None
    ctx = ssl.create_default_context(cafile=client.get("ssl.ca.location"))
    if client.get("ssl.certificate.location"):
        ctx.load_cert_chain(
            client["ssl.certificate.location"], client.get("ssl.key.location"), client.get("ssl.key.password")
        )
    if proto == "SSL":
        return faust.SSLCredentials(ctx)
    return faust.SASLCredentials(
        username=client.get("sasl.username"),
        password=client.get("sasl.password"),
        # librdkafka spells it sasl.mechanisms too; both must reach Faust, or it falls back to PLAIN.
        mechanism=client.get("sasl.mechanism") or client.get("sasl.mechanisms") or "PLAIN",
        ssl_context=ctx if proto == "SASL_SSL" else None,
    )


class ControlFollower:
    """Reads the whole compacted control topic, then keeps up with it, without a consumer group."""

    def __init__(self, cfg: Config, engine: Engine, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        # With a signing key, only records signed with it (or a previous key) are applied; without one, every
        # well-formed record is (the config allows that only when no table enforces in PostgreSQL or by webhook).
        self.keys = cfg.control.keys() if cfg.control is not None else None
        if self.keys is None:
            log.warning("control topic %s: no control.signing_key, records are not authenticated", cfg.topics.control)
        self._consumer = Consumer(
            {
                **kafka_logging(client_settings(cfg)),
                "group.id": f"writeguard-control-{uuid.uuid4()}",  # never committed: every worker reads it all
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        md = self._consumer.list_topics(cfg.topics.control, timeout=30)
        parts = md.topics[cfg.topics.control].partitions
        self._consumer.assign([TopicPartition(cfg.topics.control, p, OFFSET_BEGINNING) for p in parts])

    def poll(self, max_records: int = 500) -> int:
        n = 0
        for msg in self._consumer.consume(num_messages=max_records, timeout=0):
            value = msg.value()
            if msg.error() or value is None:
                continue
            try:
                rec = self.check(msg.key(), value, msg.headers())
            except ControlRejected as e:
                at = (msg.partition(), msg.offset())
                log.warning("ignoring control record at partition %s offset %s: %s", *at, printable(e))
                if self.metrics is not None:
                    self.metrics.control_rejected.labels(e.reason).inc()
                continue
            self.engine.apply_control(
                rec.agent_id, rec.state, rec.alert_id, rec.reason, int(rec.at.timestamp() * 1e6), rec.false_positive
            )
            n += 1
        if self.metrics is not None:
            self.metrics.quarantined_agents.set(len(self.engine.quarantined))
        return n

    def check(self, key: bytes | None, value: bytes, headers: Headers) -> ControlRecord:
        """The record to apply, or ControlRejected: unsigned, badly signed, malformed, or a stale release."""
        if self.keys is None:
            try:
                rec = ControlRecord.model_validate_json(value)
            except ValueError as e:
                raise ControlRejected("invalid_record", str(e).splitlines()[0]) from None
        else:
            rec = verify_control(self.keys, key, value, headers)
        q = self.engine.quarantined.get(rec.agent_id)
        if rec.stale_for(q.alert_id if q is not None else None):
            raise ControlRejected("stale_release", f"releases alert {rec.alert_id}, not the quarantine in force")
        return rec

    def close(self) -> None:
        self._consumer.close()


def set_fetch_max_wait(ms: int) -> None:
    """Make Faust's aiokafka consumer wait at most ``ms`` for data in a fetch.

    Faust hard-codes ``fetch_max_wait_ms=1500`` and offers no setting. A fetch that covers both the CDC
    partitions and the internal ``changes`` topic then sits up to 1.5 s on partitions without data, and
    detection lag becomes seconds instead of tens of milliseconds (measured: p50 3.3 s against 25 ms).
    """
    from faust.transport.drivers import aiokafka as driver

    thread: Any = driver.AIOKafkaConsumerThread
    # Faust has no public hook for this: patching its private consumer factory is the only way in.
    original = getattr(thread, "_writeguard_create", None) or thread._create_worker_consumer  # noqa: SLF001

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms  # noqa: SLF001 -- read by AIOKafkaConsumer.start() when it builds its Fetcher
        return consumer

    thread._writeguard_create = original  # noqa: SLF001
    thread._create_worker_consumer = create  # noqa: SLF001


class WriteguardApp:
    """writeguard's Faust app, its topics and its agents, as a class so that they read at a glance.

    ============================  =====================================================================
    ``ingest`` (task)             CDC topics (+ agent messages) -> ``changes``, in bulk (hop on, default)
    ``detect`` (agent)            ``changes`` -> engine -> ``alerts``, ``control``, enforcement
    ``ingest_direct`` (agent)     CDC topics -> engine, record by record (``worker.repartition: false``)
    ``expire_held`` (timer)       rows held for an agent message past the hold, scored (hop off)
    ``follow_control`` (task)     the whole compacted ``control`` topic, followed by every worker
    ``gauges`` (timer)            model, learning, quarantine and consumer-lag gauges
    ============================  =====================================================================

    Malformed records go to ``dead_letters`` with their reason. Model sets are checkpointed to ``topics.models``
    and restored before their partition is scored (:func:`_checkpointer`).
    """

    def __init__(self, cfg: Config, engine: Engine, metrics: Metrics, *, datadir: str | None = None) -> None:
        self.cfg, self.engine, self.metrics = cfg, engine, metrics
        set_fetch_max_wait(cfg.worker.fetch_max_wait_ms)
        servers = ";".join(f"kafka://{s.strip()}" for s in cfg.kafka.bootstrap_servers.split(","))
        self.app = app = faust.App(
            cfg.kafka.group_id,
            broker=servers,
            broker_credentials=_credentials(cfg.kafka.client),
            value_serializer="raw",
            key_serializer="raw",
            web_enabled=False,
            broker_commit_interval=cfg.worker.commit_interval_s,
            # A dead worker's partitions move after the session timeout; a stopped one's at once (aiokafka's
            # consumer sends LeaveGroup when Faust stops it on SIGTERM or SIGINT).
            broker_session_timeout=cfg.worker.session_timeout_s,
            broker_heartbeat_interval=cfg.worker.heartbeat_interval_s,
            broker_rebalance_timeout=cfg.worker.rebalance_timeout_s,
            topic_partitions=cfg.topics.partitions,
            consumer_auto_offset_reset="earliest",
            consumer_metadata_max_age_ms=10_000,
            stream_wait_empty=False,
            producer_linger_ms=1,
            datadir=datadir or f"{cfg.kafka.group_id}-data",
        )
        msgs = cfg.worker.agent_messages
        self.inputs = [t.topic for t in cfg.tables] + ([msgs.topic] if msgs else [])
        self.message_topic = msgs.topic if msgs else None

        # Topics
        self.changes = app.topic(
            cfg.topics.changes, key_serializer="raw", value_serializer="raw", partitions=cfg.topics.partitions
        )
        self.alerts = app.topic(cfg.topics.alerts, key_serializer="raw", value_serializer="raw")
        self.control = app.topic(cfg.topics.control, key_serializer="raw", value_serializer="raw")
        self.dead_letters = app.topic(cfg.topics.dead_letter, key_serializer="raw", value_serializer="raw")

        self.router = router_for(cfg)
        self.ckpt = _checkpointer(app, cfg, engine, metrics)
        self.signing_key = cfg.control.keys()[0] if cfg.control is not None else None
        enforcing = any(a in ("postgres", "webhook") for t in cfg.tables for acts in t.actions.values() for a in acts)
        self.enforcer = Enforcer(cfg, self.send_control, metrics, self._current) if enforcing else None
        self._sample = 0
        # Without the hop: the shared intake (stream.pipeline) collects, the Faust agent sends and scores.
        self._routed: list[Change] = []
        self._dead: list[tuple[str, str]] = []
        self._feeding_ts_ms = 0  # the Kafka timestamp of the record being fed
        # Every message, whichever member reads its partition in the group: the join of rows read here needs them.
        self.joiner = (
            MessageJoiner(cfg, self.router, self.message_topic)
            if self.message_topic and not cfg.worker.repartition
            else None
        )
        self.intake = Intake(self.router, self._routed.append, self._skipped, lambda *d: self._dead.append(d))

        # Agents, tasks and timers
        if cfg.worker.repartition:
            self.bulk = BulkIngest(cfg, self.router, metrics, self.inputs, message_topic=self.message_topic)
            app.task(self.ingest)
            app.agent(self.changes, name="detect")(self.detect)
            app.on_before_shutdown.connect(cast(Any, self._close_ingest))
        else:
            self.cdc = app.topic(*self.inputs, key_serializer="raw", value_serializer="raw")
            app.agent(self.cdc, name="ingest_direct")(self.ingest_direct)
            app.timer(0.5)(self.expire_held)
            if self.joiner is not None:
                app.on_before_shutdown.connect(cast(Any, self._close_joiner))
        app.task(self.follow_control)
        app.timer(5.0)(self.gauges)
        app.on_partitions_assigned.connect(cast(Any, self._count_assignment))

    async def ingest(self) -> None:
        """The CDC topics, in bulk on the ingest thread, to the changes topic (stream.ingest)."""
        loop = asyncio.get_running_loop()
        bulk = self.bulk
        try:
            await loop.run_in_executor(bulk.executor, bulk.run)
        except Exception as e:  # a batch the broker would not take: stop rather than skip it
            log.exception("ingest stopped")
            await self.app.crash(e)
        finally:
            bulk.stop()  # cancelled at shutdown: the thread would run on, and the interpreter's exit wait for it

    async def detect(self, stream: Any) -> None:  # a faust.Stream: StreamT does not declare take_events
        """Batches of changes, keyed by agent: every write of an agent reaches this worker's models."""
        ckpt = self.ckpt
        async for events in stream.take_events(BATCH, within=BATCH_WITHIN_S):
            for event in events:
                part = event.message.partition
                if ckpt is not None and not ckpt.ready(part):
                    # Its agents' checkpoints first: a model set scored cold would learn a rogue's writes.
                    await ckpt.wait(part)
                    if part not in ckpt.owned:
                        continue  # revoked meanwhile: its new owner reads it from the committed offset
                try:
                    batch = decode_changes(event.value)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    # Only another producer on our internal topic can write this: keep it, do not stop.
                    dead = _dead_letter("invalid_change", str(e)[:2000], event.message, event.key, event.value)
                    self.metrics.dead_letters.labels("invalid_change").inc()
                    await self.dead_letters.send(key=event.key, value=dead)
                    continue
                for ch in batch:
                    if ckpt is not None:
                        ckpt.seen(ch.agent_id, part)
                    findings = self.score(ch)
                    if findings:
                        await self.publish(findings)
                # Up to 2,000 changes a record: let the loop send the alerts published so far before the next.
                await asyncio.sleep(0)

    async def ingest_direct(self, stream: Any) -> None:
        """Without the hop, the CDC records scored where they are read.

        Batches: Faust's per-event async machinery costs far more than decoding and scoring an event; a batch
        waits at most BATCH_WITHIN_S for more records, so light load pays at most that in latency.
        """
        message_topic = self.message_topic
        async for events in stream.take_events(BATCH, within=BATCH_WITHIN_S):
            if message_topic is not None:
                # A transaction's message (an agent's name, an undo's signature) is routed before the
                # batch's rows, which it may concern. Each topic keeps its own order.
                events = sorted(events, key=lambda e: e.message.topic != message_topic)
                if self.joiner is not None:
                    self.joiner.poll()  # messages read by other members too, before the rows that need them
            for event in events:
                msg = event.message
                ts = msg.timestamp  # Faust gives seconds
                self._feeding_ts_ms = int(ts * 1000) if isinstance(ts, float) else -1
                self.intake.feed(msg.topic, event.value, KafkaCoords(msg.topic, msg.partition, msg.offset))
                await self._drain(msg, event)
            if self.joiner is not None:
                await self._join_messages()

    async def expire_held(self) -> None:
        """Rows held past the hold for their transaction's agent message: scored as unattributed, not dropped."""
        if self.joiner is not None:
            await self._join_messages()
            return
        self.intake.release(time.time_ns() // 1000)
        await self._drain()

    async def follow_control(self) -> None:
        if self.enforcer is not None:
            await self.enforcer.start()
        f = ControlFollower(self.cfg, self.engine, self.metrics)
        while True:
            if f.poll() == 0:
                await asyncio.sleep(0.2)

    async def gauges(self) -> None:
        engine, metrics = self.engine, self.metrics
        for table, n in engine.models_by_table().items():
            metrics.active_models.labels(table).set(n)
        for table, n in engine.learning_models().items():
            metrics.learning_models.labels(table).set(n)
        metrics.quarantined_agents.set(len(engine.quarantined))
        metrics.suppressed.set(engine.suppressed)
        metrics.evicted_models.set(engine.evicted)
        mon = self.app.monitor
        if mon is not None and mon.tp_end_offsets:
            for tp, end in list(mon.tp_end_offsets.items()):
                read = mon.tp_read_offsets.get(tp)
                if read is not None:
                    metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(end - read - 1, 0))

    def score(self, ch: Change) -> list[Finding]:
        metrics = self.metrics
        metrics.event(ch.table, ch.op)
        if ch.agent_id in self.engine.quarantined:
            metrics.quarantined_events.labels(ch.table).inc()
        self._sample += 1
        if self._sample & 15 == 0:
            metrics.processing_lag.observe(max(time.time() - ch.commit_ts_us / 1e6, 0.0))
        return self.engine.process(ch)

    async def publish(self, findings: list[Finding]) -> None:
        metrics = self.metrics
        now_us = time.time_ns() // 1000
        for f in findings:
            alert = build_alert(f, now_us)
            await self.alerts.send(key=f.agent_id.encode(), value=alert.to_bytes())
            metrics.alerts.labels(f.table, f.detector, f.severity).inc()
            metrics.detection_lag.labels(f.table).observe(alert.lag_ms / 1000.0)
            log.warning("ALERT %s", printable(alert.summary))  # the summary quotes the agent id: data
            if f.quarantine:
                await self.send_control(ControlRecord.quarantine(alert))
                metrics.quarantines.labels(f.table).inc()
                metrics.quarantined_agents.set(len(self.engine.quarantined))
                if self.enforcer is not None:
                    self.enforcer.enforce(alert)

    async def send_control(self, rec: ControlRecord) -> None:
        key, value = rec.agent_id.encode(), rec.to_bytes()
        sig = self.signing_key
        headers = [(CONTROL_SIGNATURE_HEADER, sign_control(sig, key, value))] if sig else None
        await self.control.send(key=key, value=value, headers=headers)

    def _skipped(self, reason: str) -> None:
        self.metrics.skipped.labels(reason).inc()
        if reason == SKIP_PENDING and self.joiner is not None:
            self.joiner.held(self._feeding_ts_ms)

    async def _join_messages(self) -> None:
        """The joiner's messages, then the rows they released; held rows expire only once it has read them all."""
        joiner = self.joiner
        assert joiner is not None
        joiner.poll()
        self.intake.release(time.time_ns() // 1000 if joiner.caught_up else None)
        await self._drain()

    def _current(self, agent_id: str, alert_id: str) -> bool:
        q = self.engine.quarantined.get(agent_id)
        return q is not None and q.alert_id == alert_id

    async def _drain(self, msg: Any = None, event: Any = None) -> None:
        for reason, detail in self._dead:
            self.metrics.dead_letters.labels(reason).inc()
            await self.dead_letters.send(key=event.key, value=_dead_letter(reason, detail, msg, event.key, event.value))
        self._dead.clear()
        todo = self._routed[:]
        self._routed.clear()
        for ch in todo:
            findings = self.score(ch)
            if findings:
                await self.publish(findings)

    # mode's stubs do not accept an async receiver with these keywords, though its Signal.send awaits one.
    async def _close_ingest(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        self.bulk.stop()  # run() returns after its batch; close() runs after it on the same thread
        await asyncio.get_running_loop().run_in_executor(self.bulk.executor, self.bulk.close)

    async def _close_joiner(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        if self.joiner is not None:
            self.joiner.close()

    async def _count_assignment(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        group = self.cfg.kafka.group_id
        self.metrics.rebalances.labels(group).inc()
        self.metrics.assigned_partitions.labels(group).set(len(args[0]))


def build_app(cfg: Config, engine: Engine, metrics: Metrics, *, datadir: str | None = None) -> faust.App:
    """The Faust app of a config (:class:`WriteguardApp`)."""
    return WriteguardApp(cfg, engine, metrics, datadir=datadir).app


def _checkpointer(app: faust.App, cfg: Config, engine: Engine, metrics: Metrics) -> Checkpointer | None:
    """Checkpoints to ``topics.models`` and restores before scoring (stream.checkpoints), hooked into Faust's
    rebalance signals; None when ``worker.checkpoint_interval_s`` is null or there is no changes hop."""
    interval = cfg.worker.checkpoint_interval_s
    if interval is None:
        return None
    if not cfg.worker.repartition:
        log.warning("worker.repartition is off: model sets are not checkpointed (they follow changes partitions)")
        return None
    if engine.dirty is None:
        engine.dirty = {}
    ckpt = Checkpointer(cfg, engine, metrics=metrics)
    changes = cfg.topics.changes

    async def flush_all() -> None:
        n = ckpt.flush()
        left = await asyncio.get_running_loop().run_in_executor(None, ckpt.writer.flush, 30.0)
        if left:
            log.error("%d checkpoints not acknowledged by %s", left, cfg.topics.models)
        log.info("checkpointed %d model sets", n)

    # Faust sends these from its rebalance: revoked first (our last checkpoints go out before the partitions'
    # new owner reads them), then assigned. The restore itself is a task: the detect agent waits for it.
    async def on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await flush_all()

    async def on_assigned(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        ckpt.assigned({tp.partition for tp in args[0] if tp.topic == changes})

    async def on_shutdown(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await flush_all()

    # mode's stubs do not accept an async receiver with these keywords, though its Signal.send awaits one.
    app.on_partitions_revoked.connect(cast(Any, on_revoked))
    app.on_partitions_assigned.connect(cast(Any, on_assigned))
    app.on_before_shutdown.connect(cast(Any, on_shutdown))

    @app.timer(interval)
    async def checkpoint() -> None:
        # At most CHECKPOINT_SHARE of the worker's time goes to pickling: the rest wait for the next round. In
        # slices, so that detection is held up for one slice at a time, not for the whole budget (alert lag).
        left = interval * CHECKPOINT_SHARE
        while left > 0:
            started = time.perf_counter()
            if ckpt.flush(budget_s=min(CHECKPOINT_SLICE_S, left), tables=False) == 0:
                break
            left -= time.perf_counter() - started
            await asyncio.sleep(0)
        ckpt.flush_tables()  # once per interval
        ckpt.writer.poll()

    return ckpt


def _dead_letter(reason: str, detail: str, msg: Any, key: bytes | None, value: bytes | None) -> bytes:
    """The dead letter of a record Faust delivered (its message: topic, partition, offset, timestamp in s)."""
    ts = msg.timestamp
    ts_ms = int(ts * 1000) if isinstance(ts, float) else ts
    return DeadLetter.of(reason, detail, (msg.topic, msg.partition, msg.offset), ts_ms, key, value).to_bytes()


def run_worker(
    cfg: Config, *, loglevel: str = "warning", datadir: str | None = None, metrics_port: int | None = None
) -> None:
    """Create topics, serve metrics, and run the Faust worker until SIGTERM/SIGINT."""
    ensure_topics(cfg)
    datadir = datadir or f"{cfg.kafka.group_id}-data"
    os.makedirs(datadir, exist_ok=True)
    # Agents evicted from memory are checkpointed here and restored on their next write.
    store = ModelStore(os.path.join(datadir, "agent-models.sqlite"))
    engine = make_engine(cfg, store)
    metrics = Metrics()
    metrics.prime(cfg)
    metrics.watch_gc()
    port = metrics.serve(cfg.worker.metrics.host, cfg.worker.metrics.port if metrics_port is None else metrics_port)
    print(f"writeguard worker: metrics on http://{cfg.worker.metrics.host}:{port}/metrics", flush=True)
    app = build_app(cfg, engine, metrics, datadir=datadir)
    worker = _Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


class _Worker(faust.Worker):
    """Faust's worker, whose log handlers escape data and rate-limit the Kafka clients' repeated errors."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        install_log_filters(logger)  # mode has just replaced the root handlers: the filters go on the new ones
