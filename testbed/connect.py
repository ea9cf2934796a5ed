"""A real Kafka Connect worker with the real Debezium PostgreSQL connector, for tests, the demo and benchmarks.

Why this exists: writeguard consumes Debezium change events, and the only way to be sure it reads
them right (ops, row images, ``m`` and ``t`` events, transaction ids, latency) is to produce them with
the genuine connector.  Like :mod:`testbed.broker`, the classpath (Connect runtime, JsonConverter,
Debezium PostgreSQL connector, log4j2) is resolved once from Maven Central with ``mvn`` from
``testbed/maven/connect/pom.xml`` into the per-user cache (:mod:`testbed.jvm`), and each
:class:`LocalConnect` runs one standalone worker (``ConnectStandalone``) in a throw-away directory.
The connector jars sit on the worker's classpath and are found with ``plugin.discovery=service_load``:
no ``plugin.path``, no plugin zip. Connectors are created over the REST API, never from files.

Usage::

    with LocalKafka() as kafka, LocalConnect(kafka.bootstrap_servers) as connect:
        connect.put_connector(
            "writeguard",
            debezium_postgres_config(
                hostname="127.0.0.1", port=5432, user="postgres", password="", dbname="app",
                topic_prefix="app", tables=["public.refunds"], key_columns={"public.refunds": "agent_id"},
            ),
        )
        # change events now arrive on "app.public.refunds", logical decoding messages on "app.message"

(:func:`connectors.debezium_connector.debezium_postgres_config` renders the connector as writeguard's
``connector-config`` command does.)
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from connectors.debezium_connector import JSON_CONVERTER, POSTGRES_CONNECTOR_CLASS
from testbed.jvm import JvmError, JvmService, MavenProject, cache_dir, raise_as, require_java, resolve_maven_lib
from testbed.process import Progress, emit, free_port, port_answers

__all__ = [
    "ConnectError",
    "LocalConnect",
    "connect_version",
    "debezium_version",
    "resolve_connect_jars",
]

_MAVEN = MavenProject("connect")
_POLL_S = 0.1
# One REST call never needs long on loopback; PUT .../config validates the connector config,
# which for Debezium includes connecting to the database, hence not 5 s.
_REST_TIMEOUT_S = 30.0


class ConnectError(JvmError):
    """The local Connect worker could not be provisioned or started, or a connector failed.

    The message is meant to be shown to a human as-is: it names the missing tool and how to
    install it, includes the tail of ``connect.log``, or the connector's stack trace.
    """


def _pom_version(artifact_id: str) -> str:
    version = _MAVEN.dependency_version(artifact_id)
    if version is None:
        raise ConnectError(f"{_MAVEN.pom} does not declare {artifact_id} with a version")
    return version


@functools.cache
def connect_version() -> str:
    """The Kafka Connect version, read from the pom (the single source of truth)."""
    return _pom_version("connect-runtime")


@functools.cache
def debezium_version() -> str:
    """The Debezium PostgreSQL connector version, read from the pom."""
    return _pom_version("debezium-connector-postgres")


def resolve_connect_jars(*, progress: Progress | None = None) -> Path:
    """Return a directory holding the complete Connect worker + Debezium PostgreSQL classpath.

    Maven runs only on first use (or after the pom changed); later calls just check the marker
    file in ``cache_dir()/connect-<version>``, so starting a worker costs no network round-trip.
    """
    with raise_as(ConnectError):
        require_java()
        version = connect_version()
        dbz = debezium_version()
        return resolve_maven_lib(
            _MAVEN,
            cache_dir() / f"connect-{version}",
            [
                f"connect-runtime-{version}.jar",
                f"connect-json-{version}.jar",
                f"debezium-connector-postgres-{dbz}.jar",
            ],
            what=f"Kafka Connect {version} + Debezium PostgreSQL {dbz}",
            progress=progress,
        )


# Talk to the worker directly, whatever http_proxy/https_proxy the environment sets.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _RestError(ConnectError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class LocalConnect(JvmService):
    """One standalone Kafka Connect worker on 127.0.0.1, owned by this Python process.

    The JVM runs in its own process group (see :class:`testbed.jvm.JvmService`) and is stopped
    at interpreter exit if the caller did not.  Each start is fresh: the source-offsets file in
    the workdir is removed, and standalone mode keeps connector configs in memory only, so
    connectors are (re)created with :meth:`put_connector` after every start.
    """

    _LOG_NAME = "connect.log"
    _WORKDIR_PREFIX = "writeguard-connect-"

    def __init__(
        self,
        bootstrap_servers: str,
        workdir: Path | None = None,
        *,
        heap: str = "512m",
        progress: Progress | None = None,
    ) -> None:
        super().__init__(workdir, heap=heap, progress=progress)
        self._bootstrap_servers = bootstrap_servers

    # -- introspection -------------------------------------------------------

    @property
    def rest_url(self) -> str:
        """``http://127.0.0.1:<port>``; raises before start() so a typo can't silently hit another worker."""
        if self._port is None or self._proc is None:
            raise ConnectError("LocalConnect is not started; call start() first")
        return f"http://127.0.0.1:{self._port}"

    @property
    def bootstrap_servers(self) -> str:
        return self._bootstrap_servers

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 120.0) -> LocalConnect:
        """Start the worker and return once its REST API answers and lists the Debezium connector."""
        with self._lock:
            if self._proc is not None:
                raise ConnectError(f"LocalConnect already started at {self.rest_url}")
            deadline = time.monotonic() + timeout
            with raise_as(ConnectError):
                java = require_java()
            lib = resolve_connect_jars(progress=self._progress)
            self._prepare_workdir()

            def configure() -> None:
                self._port = free_port()
                self._write_worker_properties()

            self._launch_until_bound(java, lib, deadline, configure, ConnectError)
            emit(
                self._progress,
                f"Kafka Connect {connect_version()} (Debezium {debezium_version()}) ready at "
                f"{self.rest_url} (workdir {self._workdir})",
            )
            return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker and clean up; safe to call any number of times.

        SIGTERM first, so the worker stops its tasks and commits their source offsets (Debezium
        then confirms the LSN to PostgreSQL and closes its replication connection); SIGKILL the
        whole group only if that takes longer than ``timeout``.
        """
        super().stop(timeout)

    def __repr__(self) -> str:
        where = f"http://127.0.0.1:{self._port}" if self._port is not None else "not started"
        return f"LocalConnect({where}, workdir={self._workdir})"

    # -- connectors ----------------------------------------------------------

    def put_connector(self, name: str, config: Mapping[str, str], *, timeout: float = 90.0) -> None:
        """Create or reconfigure connector ``name``, then wait until it and all its tasks are RUNNING.

        Raises :class:`ConnectError` with Connect's message if the config is rejected (Connect
        validates it first; Debezium's validation connects to the database), with the stack trace
        if the connector or a task reaches FAILED, or with the last status on timeout.

        RUNNING means the task's start() returned: for Debezium PostgreSQL the replication slot
        and publication exist by then, but the replication stream is opened just after, on the
        connector's own thread (``pg_replication_slots.active`` turns true then).
        """
        deadline = time.monotonic() + timeout
        body = {str(k): str(v) for k, v in config.items()}
        try:
            self._request("PUT", f"/connectors/{self._quote(name)}/config", body, timeout=max(timeout, 1.0))
        except _RestError as exc:
            # An invalid config should be a 400 listing the errors, but with Debezium 3.6.1 on
            # Connect 4.3.1 it is a 500 (a NullPointerException in AbstractHerder.maybeAddConfigErrors:
            # Debezium defines internal.legacy.snapshot.max.threads but returns no value for it).
            # The validate endpoint does not trip over that, so ask it what is wrong.
            errors = self._validation_errors(name, body) if exc.status in (400, 500) else []
            if not errors:
                raise
            raise ConnectError(
                f"connector {name!r} config rejected:\n  " + "\n  ".join(errors) + f"\n(Connect said {exc})"
            ) from None
        last: dict[str, Any] | None = None
        while True:
            try:
                last = self.status(name)
            except _RestError as exc:
                if exc.status != 404:  # not registered yet is fine, anything else is not
                    raise
            if last is not None:
                failure = self._failure(last)
                if failure is not None:
                    raise ConnectError(f"connector {name!r} failed:\n{failure}{self.log_tail()}")
                connector = last.get("connector") or {}
                tasks = last.get("tasks") or []
                if (
                    connector.get("state") == "RUNNING"
                    and tasks
                    and all(task.get("state") == "RUNNING" for task in tasks)
                ):
                    return
            if time.monotonic() >= deadline:
                raise ConnectError(
                    f"connector {name!r} not RUNNING after {timeout:.0f}s; last status: {json.dumps(last)}"
                    f"{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def status(self, name: str) -> dict[str, Any]:
        """``GET /connectors/{name}/status``: connector and task states, with a ``trace`` when FAILED."""
        result = self._request("GET", f"/connectors/{self._quote(name)}/status")
        if not isinstance(result, dict):
            raise ConnectError(f"unexpected status response for {name!r}: {result!r}")
        return result

    def delete_connector(self, name: str) -> None:
        """Stop and remove connector ``name``; a connector that does not exist is not an error.

        Debezium keeps its replication slot and publication in PostgreSQL (the slot retains WAL
        until dropped): drop them with ``pg_drop_replication_slot`` if the connector is gone for good.
        """
        try:
            self._request("DELETE", f"/connectors/{self._quote(name)}")
        except _RestError as exc:
            if exc.status != 404:
                raise

    # -- internals -----------------------------------------------------------

    @staticmethod
    def _quote(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def _validation_errors(self, name: str, config: Mapping[str, str]) -> list[str]:
        """``key: error`` for every error ``PUT /connector-plugins/{class}/config/validate`` reports."""
        plugin = config.get("connector.class")
        if not plugin:
            return []
        try:
            result = self._request(
                "PUT", f"/connector-plugins/{self._quote(plugin)}/config/validate", {**config, "name": name}
            )
        except ConnectError:
            return []
        errors: list[str] = []
        for item in (result or {}).get("configs") or []:
            value = item.get("value") or {}
            errors.extend(f"{value.get('name')}: {error}" for error in value.get("errors") or [])
        return errors

    @staticmethod
    def _failure(status: Mapping[str, Any]) -> str | None:
        connector = status.get("connector") or {}
        if connector.get("state") == "FAILED":
            return f"connector: {connector.get('trace') or '(no trace)'}"
        for task in status.get("tasks") or []:
            if task.get("state") == "FAILED":
                return f"task {task.get('id')}: {task.get('trace') or '(no trace)'}"
        return None

    def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float = _REST_TIMEOUT_S,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(  # noqa: S310 -- always http://127.0.0.1:<our port>
            self.rest_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", errors="replace")
            with contextlib.suppress(ValueError):
                parsed = json.loads(text)
                if isinstance(parsed, dict) and "message" in parsed:
                    text = str(parsed["message"])
            raise _RestError(exc.code, f"{method} {path}: {text}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectError(f"{method} {self.rest_url}{path} failed: {exc}{self.log_tail()}") from exc
        return json.loads(raw) if raw.strip() else None

    def _prepare_workdir(self) -> None:
        super()._prepare_workdir()
        assert self._workdir is not None
        # Each start is fresh, like LocalKafka's: offsets from an earlier run would point
        # Debezium at an LSN of another slot (or another PostgreSQL).
        (self._workdir / "offsets.dat").unlink(missing_ok=True)

    def _write_worker_properties(self) -> None:
        assert self._workdir is not None
        props = {
            "bootstrap.servers": self._bootstrap_servers,
            "listeners": f"http://127.0.0.1:{self._port}",
            "offset.storage.file.filename": str(self._workdir / "offsets.dat"),
            # How often source offsets are committed; for Debezium PostgreSQL that is also when
            # it confirms the LSN to the server (so the slot releases WAL) and it bounds what a
            # restart re-delivers.  Not on the latency path of events.
            "offset.flush.interval.ms": "1000",
            "key.converter": JSON_CONVERTER,
            "key.converter.schemas.enable": "false",
            "value.converter": JSON_CONVERTER,
            "value.converter.schemas.enable": "false",
            # Connector jars are on the classpath; find them through their ServiceLoader
            # manifests instead of scanning every class of a plugin.path.
            "plugin.discovery": "service_load",
        }
        text = "".join(f"{key}={value}\n" for key, value in props.items())
        (self._workdir / "worker.properties").write_text(text, encoding="utf-8")

    def _launch(self, java: str, lib: Path) -> None:
        main = "org.apache.kafka.connect.cli.ConnectStandalone"
        self._launch_jvm(java, lib, _MAVEN.log4j2, main, "worker.properties")

    def _wait_ready(self, deadline: float) -> None:
        """Ready = the REST API answers ``GET /`` and ``GET /connector-plugins`` lists Debezium.

        The REST server binds before the herder has started (and the worker first has to reach
        Kafka for the cluster id), so an open port alone is not enough.
        """
        assert self._proc is not None and self._port is not None
        last_error = "REST port never opened"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ConnectError(f"Kafka Connect exited with code {code} during startup{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise ConnectError(
                    f"Kafka Connect not ready after timeout ({last_error}; is Kafka reachable at "
                    f"{self._bootstrap_servers}?){self.log_tail()}"
                )
            if not port_answers(self._port):
                time.sleep(_POLL_S)
                continue
            try:
                self._request("GET", "/", timeout=5.0)
                plugins = self._request("GET", "/connector-plugins", timeout=5.0)
            except ConnectError as exc:
                last_error = str(exc).split("\n", 1)[0]
                time.sleep(_POLL_S)
                continue
            classes = [p.get("class") for p in plugins or [] if isinstance(p, dict)]
            if POSTGRES_CONNECTOR_CLASS in classes:
                return
            raise ConnectError(
                f"Kafka Connect is up but does not list {POSTGRES_CONNECTOR_CLASS} "
                f"(found {classes}); is the Debezium jar in {resolve_connect_jars()}?{self.log_tail()}"
            )
