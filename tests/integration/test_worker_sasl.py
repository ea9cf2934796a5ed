"""The worker on a Kafka listener that requires SASL/PLAIN: ``kafka.client`` reaches every client it runs.

One broker for the module, with a SASL_PLAINTEXT listener that knows one user. The worker is given only that
listener's address, so its Faust consumer and producer, its admin client and its control-topic follower can
work only if the credentials of the config reach each of them. The test's own clients use the broker's
PLAINTEXT listener. A wrong password is the control experiment: the same worker then consumes nothing.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from stream.config import load_config
from stream.ingest import ingest_group
from testbed.broker import LocalKafka
from testbed.fleet import REFUNDS, Fleet
from testbed.process import spawn_worker
from tests.integration.conftest import Worker, make_config, produce, read_topic, release, start_worker, until

pytestmark = pytest.mark.integration

USER = "writeguard"
PASSWORD = "wg-sasl-secret"
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def sasl_kafka() -> Iterator[LocalKafka]:
    broker = LocalKafka(
        sasl_users={USER: PASSWORD, "someone-else": "other-secret"}, progress=lambda m: print(m, file=sys.stderr)
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def sasl_client(kafka: LocalKafka, password_var: str) -> Callable[[dict[str, Any]], None]:
    """Point the worker at the SASL listener only; the password comes from the environment, as in production."""

    def edit(data: dict[str, Any]) -> None:
        data["kafka"]["bootstrap.servers"] = kafka.sasl_bootstrap_servers
        data["kafka"]["client"] = {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": USER,
            "sasl.password": "${" + password_var + "}",
        }

    return edit






def records_of(worker: Worker, topic: str, agent_id: str) -> list[dict[str, Any]]:
    rows = sorted(read_topic(worker.bootstrap, topic), key=lambda r: (r[2], r[3]))
    return [v for v in (json.loads(value) for _, value, _, _ in rows if value) if v["agent_id"] == agent_id]


def test_worker_consumes_and_alerts_over_the_sasl_listener(
    sasl_kafka: LocalKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WG_TEST_KAFKA_PASSWORD", PASSWORD)
    worker = start_worker(sasl_kafka, tmp_path, edit=sasl_client(sasl_kafka, "WG_TEST_KAFKA_PASSWORD"))
    try:
        # The worker knows only the SASL listener; the test reads and writes through the PLAINTEXT one.
        assert worker.config.kafka.bootstrap_servers == sasl_kafka.sasl_bootstrap_servers != worker.bootstrap
        assert worker.config.kafka.client["sasl.password"] == PASSWORD

        fleet = Fleet(n_agents=6, seed=17, prefix=worker.prefix)
        produce(worker.bootstrap, list(fleet.stream(600, time.time_ns() // 1000 - 120_000_000)))
        worker.wait_for("writeguard_events_total", 600, timeout=TIMEOUT)

        rogue = next(a for a in fleet.agents if a.table == REFUNDS)
        rogue.rogue = "inflate"
        now = time.time_ns() // 1000
        produce(worker.bootstrap, [fleet.write(rogue, now - (20 - i) * 10_000) for i in range(20)])
        alerts = until(
            "the rogue's alert", lambda: records_of(worker, worker.config.topics.alerts, rogue.agent_id), worker
        )
        assert alerts[0]["quarantined"] is True and alerts[0]["table"] == REFUNDS
        others = [
            json.loads(v)["agent_id"]
            for _, v, _, _ in read_topic(worker.bootstrap, worker.config.topics.alerts)
            if v and json.loads(v)["agent_id"] != rogue.agent_id
        ]
        assert others == []
        control = until(
            "the quarantined record", lambda: records_of(worker, worker.config.topics.control, rogue.agent_id), worker
        )
        assert control[0]["state"] == "quarantined" and control[0]["alert_id"] == alerts[0]["alert_id"]
        # The worker's control-topic follower reads over SASL too: it sees its own quarantine...
        until("the quarantine followed", lambda: worker.total("writeguard_quarantined_agents") == 1, worker)

        # ... and a release written by `writeguard release` over the SASL listener.
        out = release(worker.config_path, rogue.agent_id, "sasl test over")
        assert out.returncode == 0, out.stderr
        until("the release followed", lambda: worker.total("writeguard_quarantined_agents") == 0, worker)
        states = [c["state"] for c in records_of(worker, worker.config.topics.control, rogue.agent_id)]
        assert states == ["quarantined", "released"]
    finally:
        worker.process.stop()


def test_worker_with_a_wrong_password_consumes_nothing_and_says_why(
    sasl_kafka: LocalKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WG_TEST_KAFKA_PASSWORD", "not-" + PASSWORD)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    cfg_path = make_config(
        tmp_path, sasl_kafka.bootstrap_servers, prefix, sasl_client(sasl_kafka, "WG_TEST_KAFKA_PASSWORD")
    )
    cfg = load_config(cfg_path)
    sasl_kafka.create_topics({t.topic: 3 for t in cfg.tables})
    fleet = Fleet(n_agents=4, seed=3, prefix=prefix)
    produce(sasl_kafka.bootstrap_servers, list(fleet.stream(200, time.time_ns() // 1000 - 60_000_000)))

    # The worker cannot authenticate, so it cannot create its topics or join its group: it stops with an error
    # instead of running without consuming (its metrics endpoint never comes up).
    with pytest.raises(RuntimeError, match=r"worker exited with [1-9]"):
        spawn_worker(cfg_path, tmp_path, loglevel="info", timeout=TIMEOUT).stop()
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "SASL authentication error: Authentication failed: Invalid username or password" in log, log[-3000:]

    admin = AdminClient({"bootstrap.servers": sasl_kafka.bootstrap_servers})
    groups = {g.group_id for g in admin.list_consumer_groups(request_timeout=30).result(timeout=60).valid}
    assert cfg.kafka.group_id not in groups and ingest_group(cfg) not in groups, groups  # it consumed nothing
    topics = admin.list_topics(timeout=30).topics
    assert cfg.topics.alerts not in topics and cfg.topics.changes not in topics
    # The same listener accepts the right password: what failed was the password, not the listener.
    good = AdminClient(
        {
            "bootstrap.servers": sasl_kafka.sasl_bootstrap_servers,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": USER,
            "sasl.password": PASSWORD,
        }
    )
    assert cfg.tables[0].topic in good.list_topics(timeout=30).topics
