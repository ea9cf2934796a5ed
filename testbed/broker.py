"""A real single-node Apache Kafka broker for tests, the demo and benchmarks.

Why this exists: writeguard's integration tests and benchmarks should talk to a
genuine Kafka (same protocol, same transactional and group semantics as
production) without requiring Docker or a hand-installed Kafka tarball.  The
broker classpath is resolved once from Maven Central with ``mvn`` (from
``testbed/maven/kafka/pom.xml``) into a per-user cache, and each
:class:`LocalKafka` runs one KRaft node (combined broker + controller) on
loopback ports in a throw-away directory.

Usage::

    with LocalKafka() as kafka:
        kafka.create_topics({"events": 3})
        producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})

or from a shell: ``python -m testbed broker`` (prints ``bootstrap.servers=…``
and runs until Ctrl-C).
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from testbed.jvm import JvmError, JvmService, MavenProject, cache_dir, raise_as, require_java, resolve_maven_lib, tail
from testbed.process import Progress, emit, free_port, interrupt_on_sigterm, port_answers

__all__ = [
    "BrokerError",
    "LocalKafka",
    "kafka_version",
    "resolve_kafka_jars",
    "run_broker",
]

_MAVEN = MavenProject("kafka")


class BrokerError(JvmError):
    """The local broker could not be provisioned, started or used.

    The message is meant to be shown to a human as-is: it names the missing
    tool and how to install it, or includes the tail of ``broker.log``.
    """


@functools.cache
def kafka_version() -> str:
    """Read the Kafka version from the pom so the pom stays the single source of truth."""
    version = _MAVEN.dependency_version("kafka_2.13")
    if version is None:
        raise BrokerError(f"{_MAVEN.pom} does not declare org.apache.kafka:kafka_2.13 with a version")
    return version


def resolve_kafka_jars(*, progress: Progress | None = None) -> Path:
    """Return a directory holding the complete Kafka broker classpath.

    Runs Maven only on first use (or after the pom changed); later calls just
    check the marker file, so starting a broker costs no network round-trip.
    """
    with raise_as(BrokerError):
        require_java()
        version = kafka_version()
        return resolve_maven_lib(
            _MAVEN,
            cache_dir() / f"kafka-{version}",
            [f"kafka_2.13-{version}.jar"],
            what=f"Apache Kafka {version}",
            progress=progress,
        )


def _cluster_id() -> str:
    """KRaft wants a 22-char base64url UUID, exactly what `kafka-storage random-uuid` prints."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")


class LocalKafka(JvmService):
    """One KRaft node (broker + controller) on 127.0.0.1, owned by this Python process.

    The JVM runs in its own process group so stop() can reliably take down
    everything it spawned, and so a Ctrl-C aimed at the test runner does not
    kill the broker before the test's own cleanup gets to shut it down cleanly.
    """

    _LOG_NAME = "broker.log"
    _WORKDIR_PREFIX = "writeguard-kafka-"

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        heap: str = "512m",
        progress: Progress | None = None,
        sasl_users: Mapping[str, str] | None = None,
    ) -> None:
        """``sasl_users`` (user -> password) adds a SASL_PLAINTEXT listener with the PLAIN mechanism.

        That listener accepts exactly those users (see :attr:`sasl_bootstrap_servers`). The PLAINTEXT
        listener of :attr:`bootstrap_servers` stays as it is, for admin and test clients, and carries the
        broker's own (inter-broker) traffic; the controller listener stays PLAINTEXT too.
        """
        super().__init__(workdir, heap=heap, progress=progress)
        self._controller_port: int | None = None
        self._sasl_users = _check_sasl_users(sasl_users) if sasl_users is not None else None
        self._sasl_port: int | None = None

    # -- introspection -------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:<port>``; raises before start() so a typo can't silently hit another broker."""
        if self._port is None or self._proc is None:
            raise BrokerError("LocalKafka is not started; call start() first")
        return f"127.0.0.1:{self._port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        """``127.0.0.1:<port>`` of the SASL_PLAINTEXT (PLAIN) listener; only with ``sasl_users``."""
        if self._sasl_users is None:
            raise BrokerError("LocalKafka has no SASL listener; pass sasl_users={user: password}")
        if self._sasl_port is None or self._proc is None:
            raise BrokerError("LocalKafka is not started; call start() first")
        return f"127.0.0.1:{self._sasl_port}"

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> LocalKafka:
        """Start the broker and return only once clients can use it.

        "Port open" is not enough: the listener binds before the node has
        caught up with the metadata log and unfenced itself, so readiness is
        a successful metadata request that lists this broker.
        """
        with self._lock:
            if self._proc is not None:
                raise BrokerError(f"LocalKafka already started at {self.bootstrap_servers}")
            deadline = time.monotonic() + timeout
            with raise_as(BrokerError):
                java = require_java()
            lib = resolve_kafka_jars(progress=self._progress)
            self._prepare_workdir()

            def configure() -> None:
                self._port, self._controller_port = self._pick_ports()
                if self._sasl_users is not None:
                    self._sasl_port = free_port()
                    while self._sasl_port in (self._port, self._controller_port):
                        self._sasl_port = free_port()
                self._write_server_properties()
                self._format_storage(java, lib, deadline)

            self._launch_until_bound(java, lib, deadline, configure, BrokerError)
            emit(
                self._progress,
                f"Kafka {kafka_version()} ready at {self.bootstrap_servers} (workdir {self._workdir})",
            )
            return self

    def stop(self, timeout: float = 20.0) -> None:
        """Shut the broker down and clean up; safe to call any number of times.

        SIGTERM first so Kafka closes its logs cleanly (fast restart, no
        recovery noise); SIGKILL the whole group only if that hangs.
        """
        with self._lock:
            super().stop(timeout)
            self._controller_port = None
            self._sasl_port = None

    def pause(self, timeout: float = 20.0) -> None:
        """Stop the broker (SIGTERM) but keep its ports, data and cluster id: :meth:`resume` brings it back as it
        was, so clients that knew it reconnect to the same address (an outage, not a new cluster)."""
        with self._lock:
            if self._proc is None:
                raise BrokerError("LocalKafka is not running")
            self._kill_process(timeout=timeout)

    def resume(self, timeout: float = 60.0) -> None:
        """Start the broker :meth:`pause` stopped, on the same ports and log dir; returns once it serves again."""
        with self._lock:
            if self._proc is not None:
                raise BrokerError("LocalKafka is running")
            if self._port is None or self._workdir is None:
                raise BrokerError("LocalKafka was never started")
            deadline = time.monotonic() + timeout
            with raise_as(BrokerError):
                java = require_java()
            self._launch(java, resolve_kafka_jars(progress=self._progress))
            self._wait_ready(deadline)

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self._port}" if self._port is not None else "not started"
        return f"LocalKafka({where}, workdir={self._workdir})"

    # -- topics --------------------------------------------------------------

    def create_topics(
        self,
        topics: Mapping[str, int],
        *,
        config: Mapping[str, Mapping[str, str]] | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Create topics (name -> partitions, replication 1) and wait until usable.

        Existing topics are accepted as-is so fixtures can be re-run.  Waiting
        for partition leaders avoids the first produce in a test racing topic
        creation and failing with UNKNOWN_TOPIC_OR_PART.
        """
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import (  # type: ignore[attr-defined]  # NewTopic: re-export not declared
            AdminClient,
            NewTopic,
        )

        if not topics:
            return
        config = config or {}
        unknown = set(config) - set(topics)
        if unknown:
            raise ValueError(f"config given for topics not being created: {sorted(unknown)}")
        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        new = [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=1,
                config=dict(config.get(name, {})),
            )
            for name, partitions in topics.items()
        ]
        futures = admin.create_topics(new, request_timeout=timeout)
        for name, future in futures.items():
            # exception() rather than result(): a raised-and-caught error would tie this
            # frame (and the AdminClient) into a future->exception->traceback->frame
            # cycle, keeping the client alive after stop() and spamming "Connection
            # refused" on stderr until the garbage collector happens to run.
            try:
                failure = future.exception(timeout=max(deadline - time.monotonic(), 0.1))
            except Exception as exc:  # concurrent.futures.TimeoutError
                raise BrokerError(f"creating topic {name!r} timed out after {timeout}s") from exc
            if failure is None:
                continue
            err = failure.args[0] if isinstance(failure, KafkaException) and failure.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise BrokerError(f"creating topic {name!r} failed: {failure}") from failure

        pending = set(topics)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"topics not visible in metadata after {timeout}s: {sorted(pending)}")
            try:
                metadata = admin.list_topics(timeout=min(remaining, 5.0))
            except KafkaException:
                time.sleep(0.1)
                continue
            for name in list(pending):
                meta = metadata.topics.get(name)
                if (
                    meta is not None
                    and meta.error is None
                    and meta.partitions
                    and all(p.leader >= 0 for p in meta.partitions.values())
                ):
                    pending.discard(name)
            if not pending:
                return
            time.sleep(0.05)

    # -- internals -----------------------------------------------------------

    def _prepare_workdir(self) -> None:
        super()._prepare_workdir()
        assert self._workdir is not None
        # Each start is a fresh single-node cluster (new cluster id); a log dir
        # formatted for a previous id would make the format step refuse.
        shutil.rmtree(self._workdir / "data", ignore_errors=True)

    @staticmethod
    def _pick_ports() -> tuple[int, int]:
        port = free_port()
        cport = free_port()
        while cport == port:
            cport = free_port()
        return port, cport

    def _write_server_properties(self) -> None:
        assert self._workdir is not None
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self._controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self._port},CONTROLLER://127.0.0.1:{self._controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self._port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self._workdir / "data"),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            # Small segments keep the temp dir small in long benchmarks.
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        if self._sasl_users is not None:
            props.update(self._sasl_properties())
        text = "".join(f"{key}={value}\n" for key, value in props.items())
        (self._workdir / "server.properties").write_text(text, encoding="utf-8")

    def _sasl_properties(self) -> dict[str, str]:
        """A SASL_PLAINTEXT listener named SASL_PLAINTEXT, PLAIN only, whose JAAS config lists the users."""
        assert self._sasl_users is not None and self._sasl_port is not None
        users = " ".join(f'user_{name}="{password}"' for name, password in self._sasl_users.items())
        where = f"127.0.0.1:{self._sasl_port}"
        return {
            "listeners": f"PLAINTEXT://127.0.0.1:{self._port},SASL_PLAINTEXT://{where},"
            f"CONTROLLER://127.0.0.1:{self._controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self._port},SASL_PLAINTEXT://{where}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            ),
        }

    def _format_storage(self, java: str, lib: Path, deadline: float) -> None:
        assert self._workdir is not None
        shutil.rmtree(self._workdir / "data", ignore_errors=True)
        cmd = [
            java,
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={_MAVEN.log4j2}",
            "-cp",
            f"{lib}/*",
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            # One token: an id that starts with '-' (1 in 64 of them) would be read as an option otherwise.
            f"--cluster-id={_cluster_id()}",
            "-c",
            "server.properties",
        ]
        try:
            proc = subprocess.run(
                cmd,
                cwd=self._workdir,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=max(deadline - time.monotonic(), 1.0),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError("formatting the KRaft log dir timed out") from exc
        if proc.returncode != 0:
            raise BrokerError(
                f"formatting the KRaft log dir failed (exit {proc.returncode}):\n"
                f"{tail(proc.stdout + chr(10) + proc.stderr)}"
            )

    def _launch(self, java: str, lib: Path) -> None:
        # broker.log is fresh per launch, like data/
        self._launch_jvm(java, lib, _MAVEN.log4j2, "kafka.Kafka", "server.properties")

    def _wait_ready(self, deadline: float) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        assert self._proc is not None and self._port is not None
        admin: AdminClient | None = None
        last_error = "port never opened"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(f"Kafka broker exited with code {code} during startup{self.log_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"Kafka broker not ready after timeout ({last_error}){self.log_tail()}")
            if not port_answers(self._port):
                time.sleep(0.05)
                continue
            if admin is None:
                # Created only once the port answers: before that librdkafka would
                # spam "Connection refused" to stderr on every reconnect attempt.
                admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{self._port}"})
            try:
                metadata = admin.list_topics(timeout=max(min(remaining, 2.0), 0.1))
            except KafkaException as exc:
                last_error = f"metadata request failed: {exc}"
                time.sleep(0.1)
                continue
            if metadata.brokers:
                return
            last_error = "metadata lists no brokers yet"
            time.sleep(0.1)


_SASL_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _check_sasl_users(users: Mapping[str, str]) -> dict[str, str]:
    """The users as the JAAS config will hold them; refuse what its quoting could not carry unchanged."""
    if not users:
        raise ValueError("sasl_users needs at least one user")
    out: dict[str, str] = {}
    for name, password in users.items():
        if not _SASL_NAME.fullmatch(name):
            raise ValueError(f"SASL user name {name!r} must match {_SASL_NAME.pattern}")
        # server.properties is read as ISO-8859-1 and the JAAS value is a quoted string: printable ASCII only.
        if not password or not (password.isascii() and password.isprintable()) or any(c in password for c in '"\\;'):
            raise ValueError(f"SASL password of {name!r} must be printable ASCII, without quotes, \\ or ;")
        out[name] = password
    return out


def run_broker(workdir: Path | None = None, *, heap: str = "512m", timeout: float = 120.0) -> int:
    """Run a broker for manual testing until Ctrl-C or SIGTERM; prints ``bootstrap.servers=HOST:PORT``."""

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    kafka = LocalKafka(workdir, heap=heap, progress=progress)
    previous = interrupt_on_sigterm()
    try:
        kafka.start(timeout=timeout)
        print(f"bootstrap.servers={kafka.bootstrap_servers}", flush=True)
        progress(f"broker log: {kafka.log_path}; press Ctrl-C to stop")
        while kafka.running:
            time.sleep(0.5)
        print(f"error: Kafka broker exited unexpectedly{kafka.log_tail()}", file=sys.stderr)
        return 1
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress("stopping Kafka…")
        return 0
    finally:
        # A second Ctrl-C must not abort the clean shutdown half-way; stop()
        # escalates to SIGKILL on its own if the broker hangs.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            kafka.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
