"""Prometheus metrics of the worker, on their own registry, named after Prometheus conventions.

Label values come from config (table names, detector names) or from small fixed sets (op codes, skip
and dead-letter reasons); agent ids never become labels, so cardinality stays bounded.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from stream.config import Config

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events = Counter(
            "writeguard_events",
            "Change events scored, by table and Debezium op.",
            ["table", "op"],
            registry=r,
        )
        self.skipped = Counter(
            "writeguard_skipped_events",
            "Input records that are not agent changes "
            "(tombstones, heartbeats, transaction markers, unattributed rows).",
            ["reason"],
            registry=r,
        )
        self.alerts = Counter("writeguard_alerts", "Alerts published.", ["table", "detector", "severity"], registry=r)
        self.quarantines = Counter(
            "writeguard_quarantines", "Agents quarantined by this worker.", ["table"], registry=r
        )
        self.quarantined_events = Counter(
            "writeguard_quarantined_agent_events",
            "Events from agents already quarantined (blast radius).",
            ["table"],
            registry=r,
        )
        self.enforcement = Counter(
            "writeguard_enforcement_actions",
            "Enforcement actions (postgres revoke, webhook pause) by outcome.",
            ["action", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "writeguard_dead_letters", "Input records sent to the dead-letter topic.", ["reason"], registry=r
        )
        self.detection_lag = Histogram(
            "writeguard_detection_lag_seconds",
            "Commit of the triggering event to the alert being published.",
            ["table"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.processing_lag = Histogram(
            "writeguard_processing_lag_seconds",
            "Commit of a change to its scoring (sampled: 1 event in 16).",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "writeguard_consumer_lag_messages",
            "Records behind the end of each assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.suppressed = Gauge(
            "writeguard_suppressed_findings",
            "Anomalies not alerted on because a suppression window covered them (since start).",
            registry=r,
        )
        self.evicted_models = Gauge(
            "writeguard_evicted_models",
            "Agent model sets checkpointed out of memory (worker.max_agents), since start.",
            registry=r,
        )
        self.active_models = Gauge(
            "writeguard_active_models", "Per-agent model sets held in memory.", ["table"], registry=r
        )
        self.control_rejected = Counter(
            "writeguard_control_records_rejected",
            "Control records not applied: unsigned, badly signed, malformed, under another agent's key, "
            "or a release of another quarantine than the one in force.",
            ["reason"],
            registry=r,
        )
        self.learning_models = Gauge(
            "writeguard_learning_models",
            "Model sets still in their learning period (their findings only warn): each agent's on a table "
            "and the table's population models.",
            ["table"],
            registry=r,
        )
        self.quarantined_agents = Gauge("writeguard_quarantined_agents", "Agents currently quarantined.", registry=r)
        self.rebalances = Counter(
            "writeguard_rebalances",
            "Partition assignments this worker received, by consumer group (the first one included): the "
            "worker's group.id (Faust, the changes topic) and <group.id>.ingest (the CDC topics).",
            ["group"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "writeguard_assigned_partitions",
            "Partitions assigned to this worker, by consumer group.",
            ["group"],
            registry=r,
        )
        self.checkpoints = Counter(
            "writeguard_checkpoints",
            "(table, agent) model sets written to topics.models (worker.checkpoint_interval_s, revokes, stop).",
            registry=r,
        )
        self.checkpoint_seconds = Counter(
            "writeguard_checkpoint_seconds",
            "Time spent serialising and queueing checkpoints, the share of the worker they cost.",
            registry=r,
        )
        self.checkpoint_backlog = Gauge(
            "writeguard_checkpoint_backlog",
            "Model sets changed since their last checkpoint and left for the next interval (the budget ran out).",
            registry=r,
        )
        self.restored_models = Counter(
            "writeguard_restored_models",
            "Model sets restored from topics.models when this worker was assigned their changes partition.",
            registry=r,
        )
        self.restore_seconds = Histogram(
            "writeguard_restore_duration_seconds",
            "Reading an assignment's partitions of topics.models, from assignment to their events being scored.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.gc_pause = Histogram(
            "writeguard_gc_pause_seconds",
            "Python's cyclic garbage collector: how long each collection stopped the worker, by generation. "
            "A collection of the oldest generation walks every model set in memory.",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self._events: dict[tuple[str, str], Counter] = {}

    def watch_gc(self) -> Callable[[str, dict[str, Any]], None]:
        """Time the garbage collector's pauses into ``writeguard_gc_pause_seconds`` (the worker calls this once);
        returns the callback put in ``gc.callbacks``."""
        hists = [self.gc_pause.labels(str(g)) for g in range(3)]
        started = 0.0

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            nonlocal started
            if phase == "start":
                started = time.perf_counter()
            else:
                hists[info["generation"]].observe(time.perf_counter() - started)

        gc.callbacks.append(on_gc)
        return on_gc

    def event(self, table: str, op: str) -> None:
        c = self._events.get((table, op))
        if c is None:
            c = self._events[(table, op)] = self.events.labels(table, op)
        c.inc()

    def serve(self, host: str, port: int) -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    def prime(self, cfg: Config) -> None:
        """Create every label set the config can produce, at 0.

        A labelled series appears at its first increment, already at 1, and ``increase()`` or ``rate()`` cannot
        see that increment: the first alert or dead letter of a kind would read as 0 on a dashboard. Known at
        start: the tables and their detectors, the ops, the fixed reasons, the configured enforcement actions.
        """
        from connectors.debezium import Reason
        from detectors.spec import detector_name
        from stream import pipeline

        for t in cfg.tables:
            for op in ("c", "u", "d", "r", "t"):
                self.events.labels(t.name, op)
            for d in t.detectors:
                for severity in ("info", "warning", "critical"):
                    self.alerts.labels(t.name, detector_name(d), severity)
            self.quarantines.labels(t.name)
            self.quarantined_events.labels(t.name)
            self.detection_lag.labels(t.name)
        for reason in (*get_args(Reason), "internal_error", "invalid_change"):
            self.dead_letters.labels(reason)
        for name in dir(pipeline):
            if name.startswith("SKIP_"):
                self.skipped.labels(getattr(pipeline, name))
        actions = {a for t in cfg.tables for acts in t.actions.values() for a in acts if a in ("postgres", "webhook")}
        for action in sorted(actions):
            for outcome in ("ok", "failed"):
                self.enforcement.labels(action, outcome)
