"""Failover time: from the end of one of two workers to the first event the other scores from its partitions.

Usage: ``python benchmarks/bench_failover.py [--runs 3] [--term-runs 1] [--session-timeout-s S] [--bootstrap H:P]``.
Without ``--bootstrap`` it starts a throwaway broker (:class:`testbed.broker.LocalKafka`).

Each run has its own topics and consumer group (the example config, 3 partitions per topic). The survivor starts
first, then the victim; once the group is stable with both, normal traffic goes to every partition until the group
has committed all of it. Then the victim is killed (SIGKILL, or SIGTERM for a clean shutdown) and, every 20 ms, an
event is produced to one of the CDC partitions the victim owned, so that only a survivor that took them over can
score it. Reported per run: when the group coordinator dropped the victim, and when the survivor's
``writeguard_events_total`` first rose, both from the signal. Progress on stderr, figures on stdout; no
assertions: the figures belong to the machine they ran on (target: at most 10 s after SIGKILL).

The helpers (:class:`Group`, :func:`start_pair`, :func:`changes_partition`) are also the harness of
``tests/integration/test_worker_failover.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka.partitioner import murmur2
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from benchmarks.common import log
from stream.config import Config, load_config
from stream.ingest import ingest_group
from testbed.broker import LocalKafka
from testbed.fleet import Fleet, Record
from testbed.process import WorkerProcess, spawn_worker, stop_process
from testbed.stack import example_config

TP = tuple[str, int]


def changes_partition(agent_id: str, partitions: int) -> int:
    """The partition of the changes topic that the worker's producer (aiokafka's default partitioner) picks.

    >>> changes_partition("refund-agent-00", 3) in range(3)
    True
    """
    return int((murmur2(agent_id.encode()) & 0x7FFFFFFF) % partitions)


@dataclass
class Group:
    """The worker's consumer group, seen by the broker: its members, their partitions, its committed offsets."""

    bootstrap: str
    group_id: str

    def __post_init__(self) -> None:
        self._client: AdminClient | None = None

    @property
    def _admin(self) -> AdminClient:
        if self._client is None:
            self._client = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._client

    def close(self) -> None:
        """Let go of the admin client while the broker is up: one still referenced when the process exits (by a
        failed test's traceback) is destroyed after the broker stopped, and librdkafka's destroy then hangs."""
        self._client = None

    def describe(self) -> tuple[str, dict[str, frozenset[TP]]]:
        """The group's state (``STABLE``, ``PREPARING_REBALANCE``, ...) and each member's assigned partitions."""
        got = self._admin.describe_consumer_groups([self.group_id], request_timeout=10)[self.group_id].result(10)
        members = {
            m.member_id: frozenset((tp.topic, tp.partition) for tp in (m.assignment.topic_partitions or []))
            for m in got.members
        }
        return got.state.name, members

    def wait_stable(self, n: int, alive: Callable[[], None], timeout: float = 120.0) -> dict[str, frozenset[TP]]:
        """Poll until the group is stable with ``n`` members that each hold partitions; ``alive`` raises if a
        worker died. Fails with what was last seen."""
        deadline = time.monotonic() + timeout
        seen: Any = None
        while time.monotonic() < deadline:
            alive()
            try:
                state, members = self.describe()
            except Exception as e:  # a group not known yet: keep polling, report it on timeout
                seen = repr(e)
            else:
                seen = (state, members)
                if state == "STABLE" and len(members) == n and all(members.values()):
                    return members
            time.sleep(0.2)
        raise AssertionError(f"group {self.group_id}: not stable with {n} members in {timeout} s; last seen {seen}")

    def committed(self, tps: Iterable[TP]) -> dict[TP, int]:
        req = ConsumerGroupTopicPartitions(self.group_id, [TopicPartition(t, p) for t, p in tps])
        got = self._admin.list_consumer_group_offsets([req], request_timeout=10)[self.group_id].result(10)
        return {(tp.topic, tp.partition): tp.offset for tp in got.topic_partitions}

    def wait_committed(self, ends: dict[TP, int], alive: Callable[[], None], timeout: float = 120.0) -> None:
        """Poll until the group has committed every partition up to ``ends`` (so a takeover replays nothing)."""
        deadline = time.monotonic() + timeout
        seen: dict[TP, int] = {}
        while time.monotonic() < deadline:
            alive()
            seen = self.committed(ends)
            behind = {tp: (seen.get(tp), end) for tp, end in ends.items() if end > 0 and seen.get(tp, -1) < end}
            if not behind:
                return
            time.sleep(0.2)
        behind = {tp: (seen.get(tp), end) for tp, end in ends.items() if end > 0 and seen.get(tp, -1) < end}
        raise AssertionError(f"group {self.group_id}: not committed in {timeout} s: (committed, end) {behind}")

    def end_offsets(self, topics: Iterable[str]) -> dict[TP, int]:
        from confluent_kafka import Consumer

        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"ends-{uuid.uuid4()}"})
        try:
            out: dict[TP, int] = {}
            for topic in topics:
                for p in c.list_topics(topic, timeout=10).topics[topic].partitions:
                    out[(topic, p)] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            return out
        finally:
            c.close()


def alive(**workers: WorkerProcess) -> Callable[[], None]:
    """A check that raises, with the worker's log, when one of ``workers`` (name=process) has died."""

    def check() -> None:
        for name, w in workers.items():
            if w.proc.poll() is not None:
                raise AssertionError(f"the {name} worker died:\n{w.log_tail()}")

    return check


@dataclass
class Pair:
    """Two workers: the survivor joined first, the victim second; which partitions each holds.

    A worker is a member of two groups: ``ingest`` reads the CDC topics (confluent-kafka, stream.ingest) and
    ``group`` (Faust) the changes topic; the partitions of a worker are its partitions in both.
    """

    config: Config
    config_path: Path
    prefix: str
    group: Group
    ingest: Group
    survivor: WorkerProcess
    victim: WorkerProcess
    survivor_tps: frozenset[TP]
    victim_tps: frozenset[TP]

    def alive(self) -> None:
        alive(survivor=self.survivor, victim=self.victim)()

    def survivor_alive(self) -> None:
        alive(survivor=self.survivor)()

    @property
    def cdc_topics(self) -> list[str]:
        return [t.topic for t in self.config.tables]

    def victim_cdc(self) -> list[TP]:
        """The CDC partitions the victim reads: an event there is scored by nobody else until a takeover."""
        return sorted(tp for tp in self.victim_tps if tp[0] in self.cdc_topics)


def write_config(workdir: Path, bootstrap: str, prefix: str, edit: Callable[[dict[str, Any]], None] | None) -> Path:
    import yaml

    data = example_config(bootstrap, prefix)
    if edit is not None:
        edit(data)
    path = workdir / "writeguard.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextmanager
def start_pair(
    kafka: LocalKafka | str,
    workdir: Path,
    *,
    edit: Callable[[dict[str, Any]], None] | None = None,
    loglevel: str = "info",
    message_partitions: int | None = None,
) -> Iterator[Pair]:
    """Start the survivor, wait until it alone holds every partition, then the victim, and wait for both.

    ``message_partitions``: create Debezium's messages topic (worker.agent_messages.topic) with that many
    partitions first, so that the ingest group assigns it from the start.

    The victim is the member that was not there before: Kafka keeps a member's id across rebalances.
    Both workers are stopped on exit (the victim, if still alive, with SIGTERM).
    """
    bootstrap = kafka if isinstance(kafka, str) else kafka.bootstrap_servers
    prefix = f"f{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_config(workdir, bootstrap, prefix, edit)
    cfg = load_config(path)
    topics = {t.topic: 3 for t in cfg.tables}
    msgs = cfg.worker.agent_messages
    if message_partitions is not None and msgs is not None:
        topics[msgs.topic] = message_partitions
    create_topics(bootstrap, topics)
    groups = Group(bootstrap, cfg.kafka.group_id), Group(bootstrap, ingest_group(cfg))
    procs: list[WorkerProcess] = []
    try:
        for name in ("survivor", "victim"):
            (workdir / name).mkdir(exist_ok=True)
            procs.append(spawn_worker(path, workdir / name, loglevel=loglevel))
            if name == "survivor":
                firsts = [g.wait_stable(1, alive(survivor=procs[0])) for g in groups]
        survivor, victim = procs
        survivor_tps: set[TP] = set()
        victim_tps: set[TP] = set()
        for g, first in zip(groups, firsts, strict=True):
            both = g.wait_stable(2, alive(survivor=survivor, victim=victim))
            new = set(both) - set(first)
            if len(new) != 1 or len(set(first) & set(both)) != 1:
                raise AssertionError(
                    f"{g.group_id}: cannot tell the victim: members before {sorted(first)}, after {sorted(both)}"
                )
            victim_id = new.pop()
            survivor_tps |= next(tps for m, tps in both.items() if m != victim_id)
            victim_tps |= both[victim_id]
        yield Pair(cfg, path, prefix, *groups, survivor, victim, frozenset(survivor_tps), frozenset(victim_tps))
    finally:
        for w in reversed(procs):
            stop_process(w.proc)
        for g in groups:
            g.close()


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create the CDC topics (Debezium would), each with its number of partitions; existing ones are kept."""
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for topic, fut in admin.create_topics([NewTopic(t, n, 1) for t, n in topics.items()]).items():
        err = fut.exception(30)
        if err is not None and "TOPIC_ALREADY_EXISTS" not in str(err):
            raise RuntimeError(f"cannot create {topic}: {err}")
    deadline = time.monotonic() + 30
    while set(topics) - set(admin.list_topics(timeout=10).topics):
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {sorted(topics)} not in the metadata after 30 s")
        time.sleep(0.1)


def settle(pair: Pair, records: list[Record]) -> None:
    """Produce normal traffic and wait until it is scored and committed on every partition of the group."""
    produce_all(pair.group.bootstrap, [(r.topic, None, r.key, r.value) for r in records])
    pair.ingest.wait_committed(pair.ingest.end_offsets(pair.cdc_topics), pair.alive)
    # Ingest forwards to the changes topic while it goes: done once its end no longer moves and is committed.
    ends: dict[TP, int] = {}
    while (now := pair.group.end_offsets([pair.config.topics.changes])) != ends:
        ends = now
        pair.group.wait_committed(ends, pair.alive)


def produce_all(bootstrap: str, records: list[tuple[str, int | None, bytes, bytes]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    errors: list[str] = []

    def done(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for topic, partition, key, value in records:
        # -1: librdkafka's "unassigned": its partitioner picks one by key
        p.produce(topic, key=key, value=value, partition=-1 if partition is None else partition, on_delivery=done)
        p.poll(0)
    if p.flush(30) != 0 or errors:
        raise RuntimeError(f"produce failed: {errors[:3]}")


def events_total(w: WorkerProcess) -> float:
    try:
        return w.total("writeguard_events_total")
    except OSError:
        return float("nan")


@dataclass
class Takeover:
    dropped_s: float  # the coordinator no longer lists the victim
    first_scored_s: float  # the survivor's event counter rose


def measure(pair: Pair, fleet: Fleet, sig: int, timeout: float = 180.0) -> Takeover:
    """End the victim with ``sig``, trickle events onto its CDC partitions, time the takeover."""
    targets = pair.victim_cdc()
    if not targets:
        raise AssertionError(f"the victim holds no CDC partition: {sorted(pair.victim_tps)}")
    writers = {t.topic: [a for a in fleet.agents if a.table == t.name] for t in pair.config.tables}
    base = events_total(pair.survivor)
    stop = threading.Event()
    producer = Producer({"bootstrap.servers": pair.group.bootstrap, "linger.ms": 0})

    def trickle() -> None:
        i = 0
        while not stop.is_set():
            topic, part = targets[i % len(targets)]
            agents = writers[topic]
            rec = fleet.write(agents[(i // len(targets)) % len(agents)], time.time_ns() // 1000)
            producer.produce(topic, key=rec.key, value=rec.value, partition=part)
            producer.poll(0)
            i += 1
            stop.wait(0.02)
        producer.flush(10)

    os.killpg(pair.victim.proc.pid, sig)
    t0 = time.monotonic()
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    dropped = first = None
    try:
        while (dropped is None or first is None) and time.monotonic() - t0 < timeout:
            pair.survivor_alive()
            if first is None and events_total(pair.survivor) > base:
                first = time.monotonic() - t0
            if dropped is None:
                if all(len(g.describe()[1]) == 1 for g in (pair.group, pair.ingest)):
                    dropped = time.monotonic() - t0
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(15)
        pair.victim.proc.wait(30)
    if dropped is None or first is None:
        raise AssertionError(f"no takeover in {timeout} s (dropped {dropped}, first scored {first})")
    return Takeover(dropped, first)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="SIGKILL runs (default 3)")
    ap.add_argument("--term-runs", type=int, default=1, help="SIGTERM (clean shutdown) runs (default 1)")
    ap.add_argument("--session-timeout-s", type=float, help="worker.session_timeout_s (default: the config's)")
    ap.add_argument("--bootstrap", help="use this broker instead of starting one")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp") / f"wg-bench-failover-{os.getpid()}")
    args = ap.parse_args()

    def edit(data: dict[str, Any]) -> None:
        if args.session_timeout_s is not None:
            data["worker"]["session_timeout_s"] = args.session_timeout_s
            data["worker"]["heartbeat_interval_s"] = min(3.0, args.session_timeout_s / 4)

    kafka: LocalKafka | None = None
    if args.bootstrap is None:
        kafka = LocalKafka(progress=log)
        kafka.start()
    results: list[tuple[str, Takeover]] = []
    try:
        plan = [("SIGKILL", signal.SIGKILL)] * args.runs + [("SIGTERM", signal.SIGTERM)] * args.term_runs
        for i, (name, sig) in enumerate(plan):
            with start_pair(kafka or args.bootstrap, args.workdir / f"run{i}", edit=edit, loglevel="warning") as pair:
                fleet = Fleet(n_agents=12, seed=11 + i, prefix=pair.prefix)
                settle(pair, list(fleet.stream(600, time.time_ns() // 1000 - 120_000_000)))
                log(f"run {i + 1}/{len(plan)}: victim holds {pair.victim_cdc()}; {name}")
                t = measure(pair, fleet, sig)
                log(
                    f"run {i + 1}: {name}: dropped from the group after {t.dropped_s:.2f} s, first event scored "
                    f"by the survivor after {t.first_scored_s:.2f} s"
                )
                results.append((name, t))
    finally:
        if kafka is not None:
            kafka.stop()
    cfg_session = args.session_timeout_s if args.session_timeout_s is not None else 6.0
    print(f"failover (2 workers, 3 partitions per topic, session timeout {cfg_session:g} s)")
    for name in ("SIGKILL", "SIGTERM"):
        runs = [t for n, t in results if n == name]
        if not runs:
            continue
        firsts = [t.first_scored_s for t in runs]
        drops = [t.dropped_s for t in runs]
        print(
            f"  {name}: first event scored by the survivor {statistics.median(firsts):.2f} s median, "
            f"{max(firsts):.2f} s max over {len(runs)} run(s); victim dropped from the group "
            f"{statistics.median(drops):.2f} s median"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
