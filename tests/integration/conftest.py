"""Fixtures on the real parts: a Kafka broker from Maven Central jars and real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from detectors.engine import Change
from stream.config import Config, load_config
from stream.ingest import decode_changes
from testbed.broker import LocalKafka
from testbed.fleet import ORDERS, REFUNDS, Record
from testbed.process import ROOT, WorkerProcess, spawn_worker
from testbed.stack import example_config


@contextmanager
def local_kafka() -> Iterator[LocalKafka]:
    """A local KRaft broker for the block, stopped after it."""
    broker = LocalKafka(progress=lambda m: print(m, file=sys.stderr))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    with local_kafka() as broker:
        yield broker


def poll_worker(what: str, probe: Callable[[], tuple[bool, Any]], w: Worker, timeout: float = 120.0) -> Any:
    """Call ``probe`` until it says done and return what it saw; fail after ``timeout`` s with what it last saw, or
    at once if the worker died."""
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        assert w.proc.poll() is None, f"worker died waiting for {what}:\n{w.process.log_tail()}"
        try:
            done, seen = probe()
        except OSError as e:  # the metrics endpoint between two requests of a busy worker: ask again
            done, seen = False, repr(e)
        if done:
            return seen
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; last seen: {seen!r}\n{w.process.log_tail()}")


def changes_on_topic(bootstrap: str, topic: str) -> list[Change]:
    """Every change on the changes topic, in topic order (each record is a batch of them)."""
    return [ch for _, v, _, _ in read_topic(bootstrap, topic) if v for ch in decode_changes(v)]


@dataclass
class Worker:
    """A real worker process plus the config it runs with, its topics unique to one test module."""

    process: WorkerProcess
    config: Config
    config_path: Path
    bootstrap: str
    prefix: str

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    def metrics(self) -> dict[str, float]:
        return self.process.metrics()

    def total(self, name: str) -> float:
        return self.process.total(name)

    def wait_for(self, name: str, at_least: float, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        got = 0.0
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker died:\n{self.process.log_tail()}"
            try:
                got = self.total(name)
            except OSError:
                got = 0.0
            if got >= at_least:
                return got
            time.sleep(0.25)
        raise AssertionError(f"{name} reached {got}, not {at_least}, in {timeout} s; log:\n{self.process.log_tail()}")

    def topic(self, table: str) -> str:
        return f"{self.prefix}.{table}"


def process_group_exists(pgid: int) -> bool:
    """Whether any process of the group is alive: a stopped JVM must leave none behind."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release(config_path: Path, agent: str, reason: str) -> subprocess.CompletedProcess[str]:
    """``writeguard release`` as an operator runs it, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", "release", agent, "--reason", reason, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def make_config(tmp: Path, bootstrap: str, prefix: str, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The example config with topics and group unique to one test module, so modules cannot interfere."""
    data = example_config(bootstrap, prefix)
    if edit is not None:
        edit(data)
    path = tmp / "writeguard.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_worker(
    kafka: LocalKafka, tmp: Path, prefix: str | None = None, edit: Callable[[dict[str, Any]], None] | None = None
) -> Worker:
    prefix = prefix or f"t{uuid.uuid4().hex[:8]}"
    cfg_path = make_config(tmp, kafka.bootstrap_servers, prefix, edit)
    cfg = load_config(cfg_path)
    kafka.create_topics({cfg.tables[0].topic: 3, cfg.tables[1].topic: 3})
    process = spawn_worker(cfg_path, tmp, loglevel="info")
    return Worker(process, cfg, cfg_path, kafka.bootstrap_servers, prefix)


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(kafka, tmp_path_factory.mktemp("worker"))
    try:
        yield w
    finally:
        w.process.stop()
        assert w.proc.returncode is not None


def read_topic(
    bootstrap: str, topic: str, *, expect: int | None = None, timeout: float = 30.0
) -> list[tuple[bytes | None, bytes | None, int, int]]:
    """All records of a topic from the beginning: (key, value, partition, offset)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p) for p in md.partitions]
        ends = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
        total = sum(ends.values())
        if expect is not None:
            deadline = time.monotonic() + timeout
            while total < expect and time.monotonic() < deadline:
                time.sleep(0.3)
                ends = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
                total = sum(ends.values())
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        out: list[tuple[bytes | None, bytes | None, int, int]] = []
        deadline = time.monotonic() + timeout
        while len(out) < total and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if not m.error():
                    out.append((m.key(), m.value(), m.partition(), m.offset()))
        return out
    finally:
        c.close()


Out = tuple[str, int | None, bytes | None, bytes | None]  # topic, partition (None: by key), key, value


def produce(
    bootstrap: str, records: Iterable[Record | Out], settings: dict[str, Any] | None = None
) -> list[tuple[int, int]]:
    """Produce in order and wait for every delivery; returns (partition, offset) of each record.

    ``records`` are fleet records or raw (topic, partition, key, value) tuples; ``settings`` add client
    settings (SASL, ...).
    """
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True, **(settings or {})})
    recs = [(r.topic, None, r.key, r.value) if isinstance(r, Record) else r for r in records]
    where: list[tuple[int, int]] = [(-1, -1)] * len(recs)
    errors: list[str] = []

    def done(i: int) -> Callable[[Any, Any], None]:
        def cb(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                where[i] = (msg.partition(), msg.offset())

        return cb

    for i, (topic, partition, key, value) in enumerate(recs):
        extra = {} if partition is None else {"partition": partition}
        p.produce(topic, key=key, value=value, on_delivery=done(i), **extra)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(30) == 0 and not errors, errors
    return where


def until(what: str, probe: Callable[[], Any], worker: Worker, timeout: float = 120.0) -> Any:
    """Poll ``probe`` until it returns something truthy; on timeout fail with its last value and the log."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        assert worker.proc.poll() is None, f"worker died while waiting for {what}:\n{worker.process.log_tail()}"
        last = probe()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what}: not seen in {timeout:.0f} s; last seen: {last!r}\n{worker.process.log_tail()}")


__all__ = ["ORDERS", "REFUNDS", "Out", "Worker", "produce", "read_topic", "start_worker", "until"]
