"""A real single-node Apache Kafka broker for tests, the demo and benchmarks.

Why this exists: writeguard's integration tests and benchmarks should talk to a
genuine Kafka (same protocol, same transactional and group semantics as
production) without requiring Docker or a hand-installed Kafka tarball.  The
broker classpath is resolved once from Maven Central with ``mvn`` (using the
pom shipped next to this module) into a per-user cache, and each
:class:`LocalKafka` runs one KRaft node (combined broker + controller) on
loopback ports in a throw-away directory.

Usage::

    with LocalKafka() as kafka:
        kafka.create_topics({"events": 3})
        producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})

or from a shell: ``python -m connectors.broker`` (prints ``bootstrap.servers=…``
and runs until Ctrl-C).

The Maven resolution (:func:`_resolve_maven_lib`), the JVM process handling
(:func:`_spawn_jvm`, :func:`_stop_process_group`), the stop-at-exit registry
(:func:`_track_for_exit`) and the JVM service lifecycle (:class:`_JvmService`)
are also used by :mod:`connectors.connect`.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import ClassVar, Protocol, Self

__all__ = [
    "BrokerError",
    "LocalKafka",
    "cache_dir",
    "kafka_version",
    "main",
    "resolve_kafka_jars",
]

_MAVEN_DIR = Path(__file__).resolve().parent / "maven" / "kafka"
_POM = _MAVEN_DIR / "pom.xml"
_LOG4J2 = _MAVEN_DIR / "log4j2.xml"
_MARKER = ".complete"
_MIN_JAVA = 17
_LOG_TAIL_LINES = 40
# Maven on a cold ~/.m2 downloads ~60 MB; generous, but bounded so a dead proxy
# surfaces as an error instead of a hung test session.
_MVN_TIMEOUT_S = 900.0

Progress = Callable[[str], None]


class BrokerError(RuntimeError):
    """The local broker could not be provisioned, started or used.

    The message is meant to be shown to a human as-is: it names the missing
    tool and how to install it, or includes the tail of ``broker.log``.
    """


def cache_dir() -> Path:
    """Where resolved jars live, so they are downloaded once per machine, not per run.

    ``$WRITEGUARD_CACHE`` wins so CI can point it at a cached volume.
    """
    env = os.environ.get("WRITEGUARD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "writeguard"


def _pom_dependency_version(pom: Path, artifact_id: str) -> str | None:
    """The version a pom declares for one direct dependency, or None."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(pom).getroot()  # noqa: S314 -- our own packaged pom, not untrusted input
    for dep in root.iterfind("m:dependencies/m:dependency", ns):
        if dep.findtext("m:artifactId", namespaces=ns) == artifact_id:
            version = dep.findtext("m:version", namespaces=ns)
            if version:
                return version.strip()
    return None


@functools.cache
def kafka_version() -> str:
    """Read the Kafka version from the pom so the pom stays the single source of truth."""
    version = _pom_dependency_version(_POM, "kafka_2.13")
    if version is None:
        raise BrokerError(f"{_POM} does not declare org.apache.kafka:kafka_2.13 with a version")
    return version


def _emit(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _java_executable() -> str | None:
    """Prefer $JAVA_HOME so the broker runs on the same JDK that mvn uses."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("java")


@functools.cache
def _require_java() -> str:
    """Fail early with an install hint: Kafka 4.x brokers refuse to run below Java 17."""
    hint = "Java 17+ is required: apt-get install openjdk-17-jre-headless"
    java = _java_executable()
    if java is None:
        raise BrokerError(hint)
    try:
        out = subprocess.run(
            [java, "-version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"{hint} (running '{java} -version' failed: {exc})") from exc
    text = out.stderr + out.stdout
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match is None:
        raise BrokerError(f"{hint} (could not parse '{java} -version': {text.strip()!r})")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_392" style
        major = int(match.group(2))
    if major < _MIN_JAVA:
        raise BrokerError(f"{hint} (found Java {major} at {java})")
    return java


def _require_mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven is required: apt-get install maven")
    return mvn


def _pom_digest(pom: Path = _POM) -> str:
    """Key the cache on pom content too, so bumping log4j etc. re-resolves."""
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def _lib_is_complete(lib: Path, marker: Path, digest: str, required: Sequence[str]) -> bool:
    if not marker.is_file():
        return False
    try:
        recorded = marker.read_text(encoding="utf-8").split()
    except OSError:
        return False
    if not recorded or recorded[0] != digest:
        return False
    # Someone may have pruned jars by hand; a partial classpath fails in odd ways.
    jars = recorded[1:]
    return all(jar in jars for jar in required) and all((lib / jar).is_file() for jar in jars)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise resolution across processes (e.g. pytest-xdist workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _resolve_maven_lib(
    pom: Path,
    home: Path,
    required: Sequence[str],
    *,
    what: str,
    progress: Progress | None = None,
) -> Path:
    """Resolve ``pom``'s runtime dependencies into ``home/lib`` once and return that directory.

    Maven runs only on first use (or after the pom changed): later calls just
    check the marker file ``home/.complete`` (pom digest + jar list), so starting
    a JVM costs no network round-trip.  ``required`` names jars whose absence
    means the resolution failed; ``what`` ("Apache Kafka 4.3.1") is for messages.
    A ``<home>.lock`` file serialises concurrent resolutions across processes.
    Raises :class:`BrokerError` (Maven missing, failed, or timed out).
    """
    lib = home / "lib"
    marker = home / _MARKER
    digest = _pom_digest(pom)
    if _lib_is_complete(lib, marker, digest, required):
        return lib
    mvn = _require_mvn()
    with _file_lock(home.parent / f"{home.name}.lock"):
        if _lib_is_complete(lib, marker, digest, required):  # another process won the race
            return lib
        _emit(progress, f"resolving {what} jars from Maven Central (first run only)…")
        started = time.monotonic()
        marker.unlink(missing_ok=True)
        shutil.rmtree(lib, ignore_errors=True)
        home.mkdir(parents=True, exist_ok=True)
        # Run against a copy so Maven never writes next to an installed (maybe
        # read-only) package, and so the cache records exactly what it resolved.
        pom_copy = home / "pom.xml"
        shutil.copyfile(pom, pom_copy)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom_copy),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={lib}",
        ]
        try:
            proc = subprocess.run(
                cmd,
                cwd=home,
                capture_output=True,
                text=True,
                timeout=_MVN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(
                f"Maven did not finish resolving {what} within {_MVN_TIMEOUT_S:.0f}s (is Maven Central reachable?)"
            ) from exc
        jars = sorted(p.name for p in lib.glob("*.jar")) if lib.is_dir() else []
        missing = [jar for jar in required if jar not in jars]
        if proc.returncode != 0 or missing:
            output = _tail(proc.stdout + "\n" + proc.stderr)
            raise BrokerError(
                f"Maven failed to resolve {what} jars (exit {proc.returncode}"
                f"{', missing ' + ', '.join(missing) if missing else ''}) "
                f"with: {' '.join(cmd)}\n{output}"
            )
        marker.write_text("\n".join([digest, *jars]) + "\n", encoding="utf-8")
        _emit(
            progress,
            f"resolved {len(jars)} jars into {lib} in {time.monotonic() - started:.1f}s",
        )
    return lib


def resolve_kafka_jars(*, progress: Progress | None = None) -> Path:
    """Return a directory holding the complete Kafka broker classpath.

    Runs Maven only on first use (or after the pom changed); later calls just
    check the marker file, so starting a broker costs no network round-trip.
    """
    _require_java()
    version = kafka_version()
    return _resolve_maven_lib(
        _POM,
        cache_dir() / f"kafka-{version}",
        [f"kafka_2.13-{version}.jar"],
        what=f"Apache Kafka {version}",
        progress=progress,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _heap_bytes(size: str) -> int | None:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", size.strip())
    if match is None:
        return None
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * scale


def _initial_heap(max_heap: str) -> str:
    """256m up front avoids early GC churn, but -Xms above -Xmx makes the JVM refuse to start."""
    limit = _heap_bytes(max_heap)
    if limit is not None and limit < 256 << 20:
        return max_heap
    return "256m"


def _cluster_id() -> str:
    """KRaft wants a 22-char base64url UUID, exactly what `kafka-storage random-uuid` prints."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")


class _Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


# JVMs (brokers, Connect workers) this process started and has not stopped yet; stopped
# at interpreter exit so an aborted test run does not leave 512 MB JVMs behind.
_RUNNING: set[_Stoppable] = set()
_RUNNING_LOCK = threading.Lock()


def _track_for_exit(owner: _Stoppable) -> None:
    """Have ``owner.stop(timeout=10.0)`` called at interpreter exit unless untracked first."""
    with _RUNNING_LOCK:
        _RUNNING.add(owner)


def _untrack_for_exit(owner: _Stoppable) -> None:
    with _RUNNING_LOCK:
        _RUNNING.discard(owner)


def _stop_all_at_exit() -> None:
    with _RUNNING_LOCK:
        owners = list(_RUNNING)
    for owner in owners:
        with contextlib.suppress(Exception):
            owner.stop(timeout=10.0)


atexit.register(_stop_all_at_exit)


def _spawn_jvm(cmd: Sequence[str], *, cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (a java command line) in its own process group, stdout+stderr to ``log_path``.

    Its own session so that stop can take down everything it spawned with one
    killpg, and so that a Ctrl-C aimed at the test runner does not kill the JVM
    before the caller's cleanup gets to shut it down cleanly.  The log is
    truncated: fresh per launch.
    """
    with log_path.open("wb") as log:
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the group ``proc`` leads (see :func:`_spawn_jvm`), SIGKILL it if not gone within ``timeout``."""
    pgid = proc.pid  # start_new_session=True: the JVM leads its own group
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10.0)


class _JvmService:
    """The lifecycle :class:`LocalKafka` and :class:`connectors.connect.LocalConnect` share.

    One JVM in its own process group (see :func:`_spawn_jvm`), logging to
    ``_LOG_NAME`` in a workdir that is either the caller's or a temp dir we own
    and remove on stop, on the loopback port ``_port``.  Subclasses write their
    own properties file, launch their own main class and check readiness in
    their own start(); they extend stop() for any further state.
    """

    _LOG_NAME: ClassVar[str]  # e.g. "broker.log": the JVM's stdout+stderr, in the workdir
    _WORKDIR_PREFIX: ClassVar[str]  # prefix of the temp workdir made when none is given

    def __init__(
        self,
        workdir: Path | None,
        *,
        heap: str,
        progress: Progress | None,
    ) -> None:
        self._requested_workdir = Path(workdir) if workdir is not None else None
        self._heap = heap
        self._progress = progress
        self._workdir: Path | None = None
        self._owns_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._lock = threading.RLock()

    # -- introspection -------------------------------------------------------

    @property
    def workdir(self) -> Path | None:
        """Directory with the properties file, the log and the service's state (None until started).

        LocalKafka: server.properties, broker.log and data/; LocalConnect:
        worker.properties, connect.log and offsets.dat.
        """
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        """The JVM's stdout/stderr (broker.log, connect.log), for debugging failed tests."""
        return None if self._workdir is None else self._workdir / self._LOG_NAME

    @property
    def pid(self) -> int | None:
        """PID of the JVM, which is also its process-group id."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """True while the JVM we started is alive (it may die on its own, e.g. disk full)."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the JVM (see :func:`_stop_process_group`) and clean up; safe to call any number of times."""
        with self._lock:
            self._kill_process(timeout=timeout)
            _untrack_for_exit(self)
            if self._owns_workdir and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
                self._owns_workdir = False
            self._port = None

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> Self:
        """Start the JVM and return once it is ready to use; each subclass has its own."""
        raise NotImplementedError

    # -- internals -----------------------------------------------------------

    def _prepare_workdir(self) -> None:
        """Use the requested workdir (created if missing) or make a temp one that stop() removes."""
        if self._requested_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=self._WORKDIR_PREFIX))
            self._owns_workdir = True
        else:
            self._workdir = self._requested_workdir.resolve()
            self._workdir.mkdir(parents=True, exist_ok=True)
            self._owns_workdir = False

    def _launch_jvm(self, java: str, lib: Path, log4j2: Path, *main: str) -> None:
        """Start ``java … -cp lib/* <main…>`` in the workdir and have it stopped at exit."""
        assert self._workdir is not None
        cmd = [
            java,
            f"-Xms{_initial_heap(self._heap)}",
            f"-Xmx{self._heap}",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j2}",
            "-cp",
            f"{lib}/*",
            *main,
        ]
        self._proc = _spawn_jvm(cmd, cwd=self._workdir, log_path=self._workdir / self._LOG_NAME)
        _track_for_exit(self)

    def _launch_until_bound(
        self,
        java: str,
        lib: Path,
        deadline: float,
        configure: Callable[[], None],
        error: type[Exception],
    ) -> None:
        """Pick ports (``configure``), launch, wait until ready; on failure ``stop()`` and re-raise.

        Ports are picked by binding to :0 and releasing, so another process can grab one in between:
        that (rare) race is retried instead of failing.
        """
        try:
            for attempt in range(3):
                configure()
                self._launch(java, lib)
                try:
                    self._wait_ready(deadline)
                except error:
                    if attempt < 2 and self._bind_failed():
                        self._kill_process(timeout=5.0)
                        continue
                    raise
                return
        except BaseException:
            self.stop()
            raise

    def _launch(self, java: str, lib: Path) -> None:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _bind_failed(self) -> bool:
        path = self.log_path
        if path is None or not path.is_file():
            return False
        return "Address already in use" in path.read_text(encoding="utf-8", errors="replace")

    def _log_tail(self) -> str:
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            return f"\n({path} is empty)"
        # Name the file, not the path: a temp workdir is gone by the time this is read.
        return f"\n--- last lines of {self._LOG_NAME} ---\n{_tail(text)}"

    def _kill_process(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            _stop_process_group(proc, timeout)
        finally:
            self._proc = None


class LocalKafka(_JvmService):
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
            java = _require_java()
            lib = resolve_kafka_jars(progress=self._progress)
            self._prepare_workdir()

            def configure() -> None:
                self._port, self._controller_port = self._pick_ports()
                if self._sasl_users is not None:
                    self._sasl_port = _free_port()
                    while self._sasl_port in (self._port, self._controller_port):
                        self._sasl_port = _free_port()
                self._write_server_properties()
                self._format_storage(java, lib, deadline)

            self._launch_until_bound(java, lib, deadline, configure, BrokerError)
            _emit(
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
        port = _free_port()
        cport = _free_port()
        while cport == port:
            cport = _free_port()
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
            f"-Dlog4j2.configurationFile={_LOG4J2}",
            "-cp",
            f"{lib}/*",
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            _cluster_id(),
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
                f"{_tail(proc.stdout + chr(10) + proc.stderr)}"
            )

    def _launch(self, java: str, lib: Path) -> None:
        # broker.log is fresh per launch, like data/
        self._launch_jvm(java, lib, _LOG4J2, "kafka.Kafka", "server.properties")

    def _wait_ready(self, deadline: float) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        assert self._proc is not None and self._port is not None
        admin: AdminClient | None = None
        last_error = "port never opened"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(f"Kafka broker exited with code {code} during startup{self._log_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"Kafka broker not ready after timeout ({last_error}){self._log_tail()}")
            if not _port_answers(self._port):
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


def main(argv: list[str] | None = None) -> int:
    """Run a broker for manual testing and the demo until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m connectors.broker",
        description=(
            "Start a real single-node Apache Kafka broker (KRaft) on 127.0.0.1, "
            "print 'bootstrap.servers=HOST:PORT' and run until Ctrl-C or SIGTERM. "
            "Kafka jars are resolved from Maven Central on first use "
            f"(cached in $WRITEGUARD_CACHE, default {Path('~/.cache/writeguard')}); "
            "needs Java 17+ and Maven."
        ),
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="directory for server.properties, broker.log and data/ "
        "(data/ is wiped on start; default: a temp dir removed on exit)",
    )
    parser.add_argument("--heap", default="512m", help="JVM max heap (default: %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the broker to become ready (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
        # SIGTERM's default would end Python without running finally/atexit and
        # orphan the JVM (it is in its own session); treat it like Ctrl-C.
        raise KeyboardInterrupt

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    kafka = LocalKafka(args.workdir, heap=args.heap, progress=progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        kafka.start(timeout=args.timeout)
        print(f"bootstrap.servers={kafka.bootstrap_servers}", flush=True)
        progress(f"broker log: {kafka.log_path}; press Ctrl-C to stop")
        while kafka.running:
            time.sleep(0.5)
        print(f"error: Kafka broker exited unexpectedly{kafka._log_tail()}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
