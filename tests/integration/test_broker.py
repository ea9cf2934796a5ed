"""End-to-end check that LocalKafka gives us a usable real broker and cleans up after itself.

Everything else in the integration suite builds on LocalKafka, so this test
pins the contract: topics can be created, a message round-trips through
confluent-kafka, and stop() leaves no JVM and no temp directory behind.
"""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from testbed.broker import BrokerError, LocalKafka
from tests.integration.conftest import process_group_exists

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _needs_java_and_maven() -> None:
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"LocalKafka needs {', '.join(missing)} on PATH")


def test_produce_consume_and_clean_stop() -> None:
    topic = f"wg-broker-test-{uuid.uuid4().hex[:8]}"
    payload = b'{"hello": "kafka"}'
    kafka = LocalKafka()
    with pytest.raises(BrokerError):
        _ = kafka.bootstrap_servers  # not started yet: must not silently point anywhere

    started = time.monotonic()
    kafka.start(timeout=120.0)
    try:
        print(f"broker ready in {time.monotonic() - started:.1f}s at {kafka.bootstrap_servers}")
        pid = kafka.pid
        workdir = kafka.workdir
        assert pid is not None and workdir is not None
        assert process_group_exists(pid)
        assert kafka.bootstrap_servers.startswith("127.0.0.1:")

        kafka.create_topics({topic: 2}, config={topic: {"retention.ms": "3600000"}})
        kafka.create_topics({topic: 2})  # already exists: accepted

        producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "enable.idempotence": True})
        delivered: list[object] = []
        producer.produce(topic, key=b"k1", value=payload, on_delivery=lambda err, msg: delivered.append(err or msg))
        assert producer.flush(30.0) == 0
        assert len(delivered) == 1 and not isinstance(delivered[0], Exception)
        del producer  # release its connection now, not with noisy reconnects after stop()

        consumer = Consumer(
            {
                "bootstrap.servers": kafka.bootstrap_servers,
                "group.id": f"wg-test-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.subscribe([topic])
            deadline = time.monotonic() + 30.0
            received = None
            while received is None and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                assert msg.error() is None, msg.error()
                received = msg
            assert received is not None, "no message consumed within 30s"
            assert received.topic() == topic
            assert received.key() == b"k1"
            assert received.value() == payload
        finally:
            consumer.close()
    finally:
        stop_started = time.monotonic()
        kafka.stop()
        print(f"broker stopped in {time.monotonic() - stop_started:.1f}s")

    assert not kafka.running
    assert not process_group_exists(pid), f"java process group {pid} still alive after stop()"
    assert not workdir.exists(), "temp workdir not removed"
    kafka.stop()  # idempotent
