"""Fixtures on the real parts: a Kafka broker from Maven Central jars and real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from connectors.broker import LocalKafka
from stream.config import Config, load_config
from stream.demo import free_port, stop_process
from stream.fleet import ORDERS, REFUNDS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "stream" / "examples" / "writeguard.yaml"


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    broker = LocalKafka(progress=lambda m: print(m, file=sys.stderr))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    config: Config
    config_path: Path
    metrics_port: int
    log: Path
    bootstrap: str
    prefix: str

    def metrics(self) -> dict[str, float]:
        """Every sample as 'name{k="v",...}' -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def total(self, name: str) -> float:
        m = self.metrics()
        return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))

    def wait_for(self, name: str, at_least: float, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        got = 0.0
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker died:\n{self.log.read_text()[-3000:]}"
            try:
                got = self.total(name)
            except OSError:
                got = 0.0
            if got >= at_least:
                return got
            time.sleep(0.25)
        raise AssertionError(
            f"{name} reached {got}, not {at_least}, in {timeout} s; log:\n{self.log.read_text()[-3000:]}"
        )

    def topic(self, table: str) -> str:
        return f"{self.prefix}.{table}"


def make_config(tmp: Path, bootstrap: str, prefix: str) -> Path:
    """The example config with topics and group unique to one test module, so modules cannot interfere."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["kafka"]["bootstrap.servers"] = bootstrap
    data["kafka"]["group.id"] = f"wg-{prefix}"
    data["topics"] = {
        "alerts": f"{prefix}.alerts",
        "control": f"{prefix}.control",
        "dead_letter": f"{prefix}.dlq",
        "changes": f"{prefix}.changes",
        "partitions": 3,
    }
    for t in data["tables"]:
        t["topic"] = f"{prefix}.{t['name']}"
    path = tmp / "writeguard.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_worker(kafka: LocalKafka, tmp: Path, prefix: str | None = None) -> Worker:
    prefix = prefix or f"t{uuid.uuid4().hex[:8]}"
    cfg_path = make_config(tmp, kafka.bootstrap_servers, prefix)
    cfg = load_config(cfg_path)
    kafka.create_topics({cfg.tables[0].topic: 3, cfg.tables[1].topic: 3})
    port = free_port()
    log = tmp / "worker.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream.cli",
            "worker",
            "--config",
            str(cfg_path),
            "--metrics-port",
            str(port),
            "--datadir",
            str(tmp / "faust"),
            "--loglevel",
            "info",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=tmp,
        env=env,
    )
    w = Worker(proc, cfg, cfg_path, port, log, kafka.bootstrap_servers, prefix)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"worker exited early:\n{log.read_text()[-3000:]}"
        try:
            w.metrics()
            break
        except OSError:
            assert time.monotonic() < deadline, "worker metrics endpoint never answered"
            time.sleep(0.2)
    return w


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(kafka, tmp_path_factory.mktemp("worker"))
    try:
        yield w
    finally:
        stop_process(w.proc)
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


__all__ = ["ORDERS", "REFUNDS", "Worker", "read_topic", "start_worker"]
