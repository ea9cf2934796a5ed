"""A throwaway PostgreSQL cluster from Debian's ``postgresql`` package, for tests, the demo and benchmarks.

``initdb`` and ``postgres`` refuse to run as root, so as root they run as the ``postgres`` OS user. The
cluster listens on 127.0.0.1 only, on a free port, with ``wal_level=logical`` for Debezium.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from testbed.process import Progress, free_port, stop_process

INSTALL_HINT = "PostgreSQL server binaries are required: apt-get install postgresql"


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, started or reached; the message says what to do."""


def find_pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with initdb and postgres, or $PG_BIN."""
    env = os.environ.get("PG_BIN")
    candidates = [Path(env)] if env else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        majors = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True)
        candidates += [p / "bin" for p in majors]
    for c in candidates:
        if (c / "initdb").is_file() and (c / "postgres").is_file():
            return c
    raise PostgresError(INSTALL_HINT)


class LocalPostgres:
    """A single PostgreSQL server in ``workdir`` (a temporary folder by default), superuser ``postgres``.

    Authentication is ``trust`` on 127.0.0.1: the cluster is throwaway and reachable only from this machine,
    and roles still matter (privileges, NOLOGIN), which is what writeguard's enforcement changes.
    """

    def __init__(self, workdir: Path | None = None, *, progress: Progress | None = None) -> None:
        self._own_dir = workdir is None
        self._workdir = Path(tempfile.mkdtemp(prefix="writeguard-pg-")) if workdir is None else Path(workdir)
        self._progress = progress
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.host = "127.0.0.1"

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self._workdir / "postgres.log"

    @property
    def pid(self) -> int | None:
        """PID of the postmaster while it runs, which is also its process-group id."""
        return None if self._proc is None else self._proc.pid

    def _as_postgres(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        if shutil.which("runuser") is None:
            raise PostgresError("running as root needs runuser (util-linux) to start PostgreSQL as 'postgres'")
        return ["runuser", "-u", "postgres", "--"]

    def start(self, timeout: float = 60.0) -> LocalPostgres:
        bin_dir = find_pg_bin()
        data = self._workdir / "data"
        if data.exists():
            shutil.rmtree(data)
        self._workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self._workdir, "postgres", "postgres")
        say = self._progress or (lambda m: None)
        say(f"initdb ({bin_dir.parent.name}) in {data}")
        init = subprocess.run(
            [
                *self._as_postgres(),
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            raise PostgresError(f"initdb failed: {init.stderr.strip()[-2000:]}")
        self.port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self._workdir),
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            "fsync": "off",  # throwaway data: durability is not what the tests measure
            "synchronous_commit": "on",  # off would add the WAL writer's ~200 ms to commit -> Debezium latency
            "log_min_messages": "warning",
        }
        args = [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [*self._as_postgres(), str(bin_dir / "postgres"), "-D", str(data), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise PostgresError(f"postgres exited with {self._proc.returncode}:\n{self._log_tail()}")
            if self._ready(bin_dir):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresError(f"postgres not ready in {timeout:.0f} s:\n{self._log_tail()}")
            time.sleep(0.1)
        say(f"PostgreSQL ready on {self.host}:{self.port}")
        return self

    def _ready(self, bin_dir: Path) -> bool:
        r = subprocess.run(
            [str(bin_dir / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", "postgres", "-q"],
            check=False,
        )
        return r.returncode == 0

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def dsn(self, user: str = "postgres", dbname: str = "postgres") -> str:
        from psycopg.conninfo import make_conninfo

        # make_conninfo quotes every value, so a hostile role name cannot add connection options.
        return make_conninfo(host=self.host, port=self.port, user=user, dbname=dbname)

    def connect(self, user: str = "postgres", dbname: str = "postgres", **kwargs: Any) -> Any:
        import psycopg

        return psycopg.connect(self.dsn(user, dbname), **kwargs)

    def create_database(self, name: str) -> None:
        from psycopg import sql

        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout, sig=signal.SIGINT)  # SIGINT: "fast" shutdown, roll back and exit
        if self._own_dir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start() if self._proc is None else self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
