"""The worker calls the orchestrator's pause webhook when it quarantines an agent: real worker, real HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from connectors.webhook import verify_headers
from testbed.broker import LocalKafka
from testbed.fleet import REFUNDS, Fleet
from tests.integration.conftest import Worker, read_topic, start_worker

pytestmark = pytest.mark.integration
SECRET = "s3cret-for-the-test"


class Receiver(BaseHTTPRequestHandler):
    got: list[tuple[dict[str, str], bytes]] = []
    fail_first = 1  # the first delivery gets a 503: the worker must retry

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status = 503 if Receiver.fail_first > 0 else 200
        Receiver.fail_first -= 1
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/agents/pause"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, receiver: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    def edit(data: dict[str, Any]) -> None:
        data["enforcement"] = {"webhook": {"url": receiver, "secret": SECRET, "retries": 3, "backoff_s": 0.1}}
        for t in data["tables"]:
            t["actions"] = {"info": ["alert"], "warning": ["alert"], "critical": ["alert", "webhook"]}

    w = start_worker(kafka, Path(tmp_path_factory.mktemp("webhook")), edit=edit)
    try:
        yield w
    finally:
        w.process.stop()


def test_a_quarantine_calls_the_signed_pause_webhook_and_records_it(worker: Worker) -> None:
    fleet = Fleet(n_agents=6, seed=9, prefix=worker.prefix)
    start = time.time_ns() // 1000 - 120_000_000
    records = list(fleet.stream(600, start))
    p = Producer({"bootstrap.servers": worker.bootstrap})
    # The fleet's history is scored before the rogue writes, as it would be live: a backlog read all at once
    # comes partition by partition, and an agent's writes are spread over the partitions by primary key.
    for r in records:
        p.produce(r.topic, key=r.key, value=r.value)
    assert p.flush(30) == 0
    worker.wait_for("writeguard_events_total", len(records), timeout=60)
    rogue = next(a for a in fleet.agents if a.table == REFUNDS)
    rogue.rogue = "inflate"
    records += [fleet.write(rogue, time.time_ns() // 1000 - (20 - i) * 10_000) for i in range(20)]
    for r in records[-20:]:
        p.produce(r.topic, key=r.key, value=r.value)
    assert p.flush(30) == 0

    deadline = time.monotonic() + 60
    while sum(1 for h, _ in Receiver.got if h.get("x-writeguard-signature")) < 2:
        assert time.monotonic() < deadline, (
            f"webhook not delivered: {Receiver.got}; the worker scored {worker.total('writeguard_events_total'):g} "
            f"events of {len(records)}, {worker.total('writeguard_alerts_total'):g} alerts\n{worker.process.log_tail()}"
        )
        time.sleep(0.2)
    headers, body = Receiver.got[-1]
    assert verify_headers(SECRET.encode(), headers, body)
    assert not verify_headers(b"wrong", headers, body)
    assert not verify_headers(SECRET.encode(), {**headers, "idempotency-key": "another-alert:webhook"}, body)
    payload = json.loads(body)
    assert payload["agent_id"] == rogue.agent_id and payload["event"] == "writeguard.quarantine"
    assert headers["idempotency-key"] == f"{payload['alert_id']}:webhook"
    assert Receiver.got[0][1] == body  # the retry after the 503 carries the same delivery

    deadline = time.monotonic() + 30
    while True:
        control = [json.loads(v) for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.control)]
        done = [r for r in control if r["agent_id"] == rogue.agent_id and r["enforcement"]]
        if done:
            break
        assert time.monotonic() < deadline, control
        time.sleep(0.5)
    result = done[-1]["enforcement"][0]
    assert result["action"] == "webhook" and result["ok"] and "HTTP 200 after 2 attempt" in result["detail"]
    assert worker.metrics()['writeguard_enforcement_actions_total{action="webhook",outcome="ok"}'] == 1
