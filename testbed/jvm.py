"""What the testbed's JVM services (:mod:`testbed.broker`, :mod:`testbed.connect`) share.

Each service's classpath is one pom in ``testbed/maven/<name>/`` (:class:`MavenProject`), resolved once from
Maven Central with ``mvn`` into a per-user cache (:func:`resolve_maven_lib`), so that tests and demos run a
genuine Kafka or Kafka Connect without Docker or a hand-installed tarball. :class:`JvmService` is the
lifecycle both services have: one JVM in its own process group on a loopback port, in a workdir of the
caller's or a temp one, started again on a fresh port when another process took the one it picked, and
stopped at interpreter exit if its owner did not.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Protocol, Self

from testbed.process import Progress, emit, stop_process

__all__ = [
    "JvmError",
    "JvmService",
    "MavenProject",
    "cache_dir",
    "raise_as",
    "require_java",
    "resolve_maven_lib",
    "tail",
]

MAVEN_DIR = Path(__file__).resolve().parent / "maven"
_MARKER = ".complete"
_MIN_JAVA = 17
_LOG_TAIL_LINES = 40
# Maven on a cold ~/.m2 downloads ~60 MB; generous, but bounded so a dead proxy
# surfaces as an error instead of a hung test session.
_MVN_TIMEOUT_S = 900.0


class JvmError(RuntimeError):
    """Java or Maven is missing, or Maven could not resolve a classpath.

    The message is meant to be shown to a human as-is: it names the missing tool and how to install it,
    or includes the tail of Maven's output. Each service raises its own subclass (see :func:`raise_as`).
    """


@contextlib.contextmanager
def raise_as(error: type[JvmError]) -> Iterator[None]:
    """Re-raise a :class:`JvmError` of the shared helpers as the service's own ``error``, same message."""
    try:
        yield
    except JvmError as exc:
        if isinstance(exc, error):
            raise
        raise error(str(exc)) from exc


def cache_dir() -> Path:
    """Where resolved jars live, so they are downloaded once per machine, not per run.

    ``$WRITEGUARD_CACHE`` wins so CI can point it at a cached volume.
    """
    env = os.environ.get("WRITEGUARD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "writeguard"


@dataclass(frozen=True)
class MavenProject:
    """``testbed/maven/<name>/``: a pom listing one service's runtime classpath, and its log4j2 config."""

    name: str

    @property
    def pom(self) -> Path:
        return MAVEN_DIR / self.name / "pom.xml"

    @property
    def log4j2(self) -> Path:
        return MAVEN_DIR / self.name / "log4j2.xml"

    def dependency_version(self, artifact_id: str) -> str | None:
        """The version the pom declares for one direct dependency, or None."""
        ns = {"m": "http://maven.apache.org/POM/4.0.0"}
        root = ET.parse(self.pom).getroot()  # noqa: S314 -- our own pom, not untrusted input
        for dep in root.iterfind("m:dependencies/m:dependency", ns):
            if dep.findtext("m:artifactId", namespaces=ns) == artifact_id:
                version = dep.findtext("m:version", namespaces=ns)
                if version:
                    return version.strip()
        return None


def _java_executable() -> str | None:
    """Prefer $JAVA_HOME so the JVM runs on the same JDK that mvn uses."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("java")


@functools.cache
def require_java() -> str:
    """The java executable; fails early with an install hint, since Kafka 4.x refuses to run below Java 17."""
    hint = "Java 17+ is required: apt-get install openjdk-17-jre-headless"
    java = _java_executable()
    if java is None:
        raise JvmError(hint)
    try:
        out = subprocess.run(
            [java, "-version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JvmError(f"{hint} (running '{java} -version' failed: {exc})") from exc
    text = out.stderr + out.stdout
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match is None:
        raise JvmError(f"{hint} (could not parse '{java} -version': {text.strip()!r})")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_392" style
        major = int(match.group(2))
    if major < _MIN_JAVA:
        raise JvmError(f"{hint} (found Java {major} at {java})")
    return java


def _require_mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise JvmError("Maven is required: apt-get install maven")
    return mvn


def _pom_digest(pom: Path) -> str:
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


def tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``, for error messages."""
    return "\n".join(text.strip().splitlines()[-lines:])


def resolve_maven_lib(
    project: MavenProject,
    home: Path,
    required: Sequence[str],
    *,
    what: str,
    progress: Progress | None = None,
) -> Path:
    """Resolve ``project``'s runtime dependencies into ``home/lib`` once and return that directory.

    Maven runs only on first use (or after the pom changed): later calls just
    check the marker file ``home/.complete`` (pom digest + jar list), so starting
    a JVM costs no network round-trip.  ``required`` names jars whose absence
    means the resolution failed; ``what`` ("Apache Kafka 4.3.1") is for messages.
    A ``<home>.lock`` file serialises concurrent resolutions across processes.
    Raises :class:`JvmError` (Maven missing, failed, or timed out).
    """
    pom = project.pom
    lib = home / "lib"
    marker = home / _MARKER
    digest = _pom_digest(pom)
    if _lib_is_complete(lib, marker, digest, required):
        return lib
    mvn = _require_mvn()
    with _file_lock(home.parent / f"{home.name}.lock"):
        if _lib_is_complete(lib, marker, digest, required):  # another process won the race
            return lib
        emit(progress, f"resolving {what} jars from Maven Central (first run only)…")
        started = time.monotonic()
        marker.unlink(missing_ok=True)
        shutil.rmtree(lib, ignore_errors=True)
        home.mkdir(parents=True, exist_ok=True)
        # Run against a copy so Maven never writes next to the checkout's pom, and so the
        # cache records exactly what it resolved.
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
            raise JvmError(
                f"Maven did not finish resolving {what} within {_MVN_TIMEOUT_S:.0f}s (is Maven Central reachable?)"
            ) from exc
        jars = sorted(p.name for p in lib.glob("*.jar")) if lib.is_dir() else []
        missing = [jar for jar in required if jar not in jars]
        if proc.returncode != 0 or missing:
            output = tail(proc.stdout + "\n" + proc.stderr)
            raise JvmError(
                f"Maven failed to resolve {what} jars (exit {proc.returncode}"
                f"{', missing ' + ', '.join(missing) if missing else ''}) "
                f"with: {' '.join(cmd)}\n{output}"
            )
        marker.write_text("\n".join([digest, *jars]) + "\n", encoding="utf-8")
        emit(
            progress,
            f"resolved {len(jars)} jars into {lib} in {time.monotonic() - started:.1f}s",
        )
    return lib


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


class _Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


# JVMs (brokers, Connect workers) this process started and has not stopped yet; stopped
# at interpreter exit so an aborted test run does not leave 512 MB JVMs behind.
_RUNNING: set[_Stoppable] = set()
_RUNNING_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _RUNNING_LOCK:
        owners = list(_RUNNING)
    for owner in owners:
        with contextlib.suppress(Exception):
            owner.stop(timeout=10.0)


@functools.cache
def _register_exit_hook() -> None:
    # Registered on the first launch, not at import: importing the testbed (doctests, the layout test)
    # must leave the interpreter as it was.
    atexit.register(_stop_all_at_exit)


def _track_for_exit(owner: _Stoppable) -> None:
    """Have ``owner.stop(timeout=10.0)`` called at interpreter exit unless untracked first."""
    _register_exit_hook()
    with _RUNNING_LOCK:
        _RUNNING.add(owner)


def _untrack_for_exit(owner: _Stoppable) -> None:
    with _RUNNING_LOCK:
        _RUNNING.discard(owner)


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


class JvmService:
    """The lifecycle :class:`testbed.broker.LocalKafka` and :class:`testbed.connect.LocalConnect` share.

    One JVM in its own process group, logging to ``_LOG_NAME`` in a workdir that
    is either the caller's or a temp dir we own and remove on stop, on the
    loopback port ``_port``.  Subclasses write their own properties file, launch
    their own main class (:meth:`_launch`), check readiness (:meth:`_wait_ready`)
    in their own start(); they extend stop() for any further state.
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

    def log_tail(self) -> str:
        """The last lines of the JVM's log, as a paragraph to append to an error message ("" if none)."""
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            return f"\n({path} is empty)"
        # Name the file, not the path: a temp workdir is gone by the time this is read.
        return f"\n--- last lines of {self._LOG_NAME} ---\n{tail(text)}"

    # -- lifecycle -----------------------------------------------------------

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the JVM (SIGTERM, then SIGKILL of its group) and clean up; safe to call any number of times."""
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

    # -- for subclasses --------------------------------------------------------

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

    def _kill_process(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            stop_process(proc, timeout)
        finally:
            self._proc = None
