"""Child processes on this machine: free loopback ports, process groups, and a ``writeguard worker`` child.

Every local service of the testbed (Kafka, Kafka Connect, PostgreSQL, the worker) runs in a process group of
its own, so that one signal stops all it spawned, and picks its ports with :func:`free_port`. The worker
launcher is what the demo, the integration tests and the benchmarks run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
Progress = Callable[[str], None]  # takes one human-readable line: "Kafka ready at ..."
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def emit(progress: Progress | None, message: str) -> None:
    """``progress(message)``, when there is someone to tell."""
    if progress is not None:
        progress(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago.

    Another process may take it before the caller binds it: services that fail to bind retry with another.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0, *, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the process group ``proc`` leads, then SIGKILL the group if it has not gone in ``timeout`` s.

    ``proc`` must have been started with ``start_new_session=True``: its pid is then its group id.
    """
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def interrupt_on_sigterm() -> SignalHandler:
    """Have SIGTERM raise KeyboardInterrupt, as Ctrl-C does; returns the handler it replaces.

    SIGTERM's default ends Python without running ``finally:`` blocks or atexit, and would orphan every
    service started in a session of its own.
    """

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, _interrupt)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as 'name{k="v",...}' -> value (labels sorted by name)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def total(self, name: str) -> float:
        """Sum of a metric over all its label sets."""
        return sum(v for k, v in self.metrics().items() if k == name or k.startswith(name + "{"))

    def stop(self) -> None:
        stop_process(self.proc)


def spawn_worker(
    config: Path,
    workdir: Path,
    *,
    bootstrap: str | None = None,
    loglevel: str = "warning",
    timeout: float = 60.0,
) -> WorkerProcess:
    """Start a worker in its own process group and wait until its metrics endpoint answers."""
    port = free_port()
    log = workdir / "worker.log"
    cmd = [
        sys.executable,
        "-m",
        "stream.cli",
        "worker",
        "--config",
        str(config),
        "--metrics-port",
        str(port),
        "--datadir",
        str(workdir / "faust"),
        "--loglevel",
        loglevel,
    ]
    if bootstrap:
        cmd += ["--bootstrap-servers", bootstrap]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir, env=env)
    w = WorkerProcess(proc, port, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{w.log_tail()}")
        try:
            w.metrics()
            return w
        except OSError:
            if time.monotonic() > deadline:
                w.stop()
                raise RuntimeError(f"worker metrics endpoint never answered:\n{w.log_tail()}") from None
            time.sleep(0.2)
