"""``python -m testbed demo``: a local Kafka, a real worker process, and a fleet of agents, one of which goes rogue.

The fleet writes Debezium-format change events in real time (compressed: each agent writes a few times a
second where a production agent writes tens of thousands of times a day). After the warm-up one refunds
agent starts issuing refunds twenty times too large; the worker alerts, quarantines it on the control
topic, and the simulated agent, which follows that topic like an agent orchestrator would, stops.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from confluent_kafka import Consumer, Producer

from connectors.messages import ControlRejected, verify_control
from stream.config import EXAMPLE_CONFIG, load_config
from testbed.fleet import ORDERS, REFUNDS, TOPIC_PREFIX, Agent, Fleet, topic_of
from testbed.process import WorkerProcess, interrupt_on_sigterm, spawn_worker


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


@dataclass
class DemoResult:
    alerts: list[dict[str, object]] = field(default_factory=list)
    quarantined: dict[str, dict[str, object]] = field(default_factory=dict)
    rogue_writes: int = 0
    rogue_writes_before_alert: int | None = None
    normal_writes: int = 0


def print_alert(clock: Clock, a: dict[str, object]) -> None:
    """An alert as the demos show it: detector, score, the features that stood out, and the lag."""
    clock.say(
        f"ALERT {a['severity']} by {a['detector']} ({a['scope']} model), score {a['score']:.3f} >= {a['threshold']}"
    )
    print(f"          {a['summary']}")
    for e in a["explanation"]:  # type: ignore[attr-defined]
        lo, hi = e.get("expected_low"), e.get("expected_high")
        rng = f"expected {lo:,.2f} to {hi:,.2f}" if lo is not None and hi is not None else ""
        z = f", z={e['z']:+.1f}" if e.get("z") is not None else ""
        print(f"          - {e['feature']}: {e['value']:,.2f} ({rng}{z})")
    trig = a["triggering_events"]
    coords = ", ".join(f"{t['topic']}[{t['partition']}]@{t['offset']}" for t in trig)  # type: ignore[attr-defined]
    print(
        f"          commit -> alert lag: {a['lag_ms']:.0f} ms; {a['anomalous_events']} anomalous writes "
        f"in this incident: {coords}"
    )


def run_demo(
    *,
    bootstrap_servers: str | None = None,
    warmup_s: float = 20.0,
    agents: int = 12,
    rogue_timeout_s: float = 60.0,
    seed: int = 11,
) -> int:
    clock = Clock()
    interrupt_on_sigterm()  # run the finally below: no broker or worker may outlive the demo
    broker = None
    workdir = Path(tempfile.mkdtemp(prefix="writeguard-demo-"))
    worker: WorkerProcess | None = None
    try:
        if bootstrap_servers is None:
            from testbed.broker import LocalKafka

            clock.say("starting a local Apache Kafka broker (KRaft, jars from Maven Central) ...")
            broker = LocalKafka(workdir / "kafka", progress=clock.say).start()
            bootstrap_servers = broker.bootstrap_servers
            clock.say(f"Kafka ready: bootstrap.servers={bootstrap_servers}")
            broker.create_topics({topic_of(REFUNDS): 3, topic_of(ORDERS): 3})
            # The example config, but without its day-long learning period: the demo's fleet writes for a
            # minute, and its rogue must be stopped (the README's "A calm start" says what a deployment does).
            data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
            for t in data["tables"]:
                t["learning"] = {"writes": 0, "seconds": 0}
            config_path, prefix = workdir / "writeguard.yaml", TOPIC_PREFIX
            config_path.write_text(yaml.safe_dump(data))
        else:
            from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

            from testbed.stack import example_config

            # An existing Kafka may hold an earlier run's topics: a quarantine read back from them would end
            # this run before its rogue wrote anything. Each run gets topics and a group of its own.
            prefix = f"demo{os.urandom(3).hex()}"
            config_path = workdir / "writeguard.yaml"
            config_path.write_text(yaml.safe_dump(example_config(bootstrap_servers, prefix)))
            admin = AdminClient({"bootstrap.servers": bootstrap_servers})
            for f in admin.create_topics([NewTopic(topic_of(t, prefix), 3, 1) for t in (REFUNDS, ORDERS)]).values():
                try:
                    f.result()
                except Exception as e:
                    if "TOPIC_ALREADY_EXISTS" not in str(e):
                        raise
        cfg = load_config(config_path).with_bootstrap(bootstrap_servers)
        worker = spawn_worker(config_path, workdir, bootstrap=bootstrap_servers)
        clock.say(
            f"worker running (pid {worker.proc.pid}); Prometheus metrics at "
            f"http://127.0.0.1:{worker.metrics_port}/metrics"
        )
        result = _run_fleet(
            cfg.topics.alerts,
            cfg.topics.control,
            bootstrap_servers,
            clock,
            warmup_s,
            agents,
            rogue_timeout_s,
            seed,
            prefix,
            cfg.control.keys() if cfg.control is not None else None,
        )
        return _summary(clock, result)
    finally:
        if worker is not None:
            clock.say("stopping the worker ...")
            worker.stop()
        if broker is not None:
            clock.say("stopping Kafka ...")
            broker.stop()
        clock.say(f"done; logs kept in {workdir}")


def _run_fleet(
    alerts_topic: str,
    control_topic: str,
    bootstrap: str,
    clock: Clock,
    warmup_s: float,
    n_agents: int,
    rogue_timeout_s: float,
    seed: int,
    prefix: str,
    control_keys: tuple[bytes, ...] | None = None,
) -> DemoResult:
    fleet = Fleet(n_agents=n_agents, seed=seed, prefix=prefix)
    rng = random.Random(seed)
    rogue = next(a for a in fleet.agents if a.table == REFUNDS and a is not fleet.agents[0])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2, "acks": "all"})
    watch = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"writeguard-demo-{os.getpid()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    watch.subscribe([alerts_topic, control_topic])
    res = DemoResult()
    rate = sum(a.rate_per_s for a in fleet.agents)
    clock.say(
        f"fleet: {len(fleet.agents)} agents writing to {REFUNDS} and {ORDERS} (~{rate:.0f} writes/s, "
        "Debezium payload-only JSON); each agent follows the control topic"
    )
    now = time.time()
    queue: list[tuple[float, int]] = [(now + rng.expovariate(a.rate_per_s), i) for i, a in enumerate(fleet.agents)]
    heapq.heapify(queue)
    stopped: set[str] = set()
    rogue_at = time.monotonic() + warmup_s
    went_rogue = False
    end_at: float | None = None
    last_report = time.monotonic()
    rogue_commits: list[int] = []
    while True:
        mono = time.monotonic()
        if not went_rogue and mono >= rogue_at:
            rogue.rogue = "inflate"
            went_rogue = True
            clock.say(f"{rogue.agent_id} goes rogue: its refunds are now ~20x the usual amount")
        if went_rogue and end_at is None and mono >= rogue_at + rogue_timeout_s:
            clock.say(f"no quarantine for {rogue.agent_id} within {rogue_timeout_s:.0f} s")
            end_at = mono
        if end_at is not None and mono >= end_at:
            break
        if mono - last_report >= 5 and not went_rogue:
            last_report = mono
            clock.say(f"fleet: {res.normal_writes:,} writes so far, no alert expected")
        _drain(watch, alerts_topic, res, clock, stopped, rogue, rogue_commits, control_keys)
        if rogue.agent_id in stopped and end_at is None:
            end_at = mono + 3.0
        ts, i = queue[0]
        wait = ts - time.time()
        if wait > 0:
            producer.poll(min(wait, 0.05))
            continue
        heapq.heappop(queue)
        a: Agent = fleet.agents[i]
        heapq.heappush(queue, (ts + rng.expovariate(a.rate_per_s), i))
        if a.agent_id in stopped:
            continue
        rec = fleet.write(a, time.time_ns() // 1000)
        producer.produce(rec.topic, key=rec.key, value=rec.value)
        if rec.rogue:
            res.rogue_writes += 1
            rogue_commits.append(rec.commit_ts_us)
        else:
            res.normal_writes += 1
    producer.flush(10)
    watch.close()
    return res


def _drain(
    watch: Consumer,
    alerts_topic: str,
    res: DemoResult,
    clock: Clock,
    stopped: set[str],
    rogue: Agent,
    rogue_commits: list[int],
    control_keys: tuple[bytes, ...] | None = None,
) -> None:
    for msg in watch.consume(num_messages=100, timeout=0):
        value = msg.value()
        if msg.error() or value is None:
            continue
        if msg.topic() != alerts_topic and control_keys is not None:
            # The agents check a control record as the README's orchestrator does, before they obey it.
            try:
                verify_control(control_keys, msg.key(), value, msg.headers())
            except ControlRejected as e:
                clock.say(f"an agent ignored a control record at {msg.partition()}:{msg.offset()}: {e}")
                continue
        body = json.loads(value)
        if msg.topic() == alerts_topic:
            res.alerts.append(body)
            print_alert(clock, body)
            if body["agent_id"] == rogue.agent_id and res.rogue_writes_before_alert is None:
                alert_commit = _parse_ts_us(str(body["commit_ts"]))
                res.rogue_writes_before_alert = sum(1 for c in rogue_commits if c <= alert_commit)
        elif body.get("state") == "quarantined":
            agent = str(body["agent_id"])
            res.quarantined[agent] = body
            clock.say(f"QUARANTINE {agent}: control record on the control topic (alert {body['alert_id']})")
            stopped.add(agent)
            who = rogue.rogue_written if agent == rogue.agent_id else None
            clock.say(
                f"{agent} read its quarantine and stopped writing"
                + (f" after {who} rogue writes" if who is not None else "")
            )


def _parse_ts_us(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1_000_000)


def _summary(clock: Clock, res: DemoResult) -> int:
    print()
    print("=== summary ===")
    print(f"normal writes: {res.normal_writes:,}; rogue writes: {res.rogue_writes}")
    rogue_alerts = [a for a in res.alerts if a["agent_id"] in res.quarantined]
    false_alarms = [a for a in res.alerts if a["agent_id"] not in res.quarantined]
    if not res.quarantined:
        print("the rogue agent was NOT quarantined")
        return 1
    for agent, rec in res.quarantined.items():
        first = next((a for a in rogue_alerts if a["agent_id"] == agent), None)
        print(f"quarantined: {agent} ({rec['reason']})")
        if first is not None:
            print(f"  commit -> alert lag: {first['lag_ms']:.0f} ms")
    if res.rogue_writes_before_alert is not None:
        print(
            f"rogue writes that landed before the alert: {res.rogue_writes_before_alert}; "
            f"before the agent stopped: {res.rogue_writes}"
        )
    print(f"alerts on other agents (false alarms): {len(false_alarms)}")
    return 0
