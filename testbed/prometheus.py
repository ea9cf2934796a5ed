"""A throwaway Prometheus server from Debian's ``prometheus`` package, for tests: it scrapes the given targets and
evaluates the given rule files, on 127.0.0.1 only, on a free port, with its data in a temporary folder.

Local tooling, as the rest of testbed/: the product never imports it. The server runs without
``--web.enable-lifecycle`` and ``--web.enable-admin-api``, as the compose stack's does; :meth:`LocalPrometheus.api`
reads its HTTP API (``/api/v1/...``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from testbed.process import Progress, emit, free_port, stop_process

INSTALL_HINT = "run `bash scripts/system-deps` as root (it installs Debian's prometheus package: prometheus, promtool)"


class PrometheusError(RuntimeError):
    """Prometheus could not be found, started or queried; the message says what happened."""


def find_binary(name: str = "prometheus") -> str:
    """The path of ``prometheus`` or ``promtool``, or an error naming the command that installs it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if path is None:
        raise PrometheusError(f"{name} not found: {INSTALL_HINT}")
    return path


def duration(seconds: float) -> str:
    """A Prometheus duration for a number of seconds.

    >>> duration(1), duration(0.5), duration(90)
    ('1s', '500ms', '90s')
    """
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, not {seconds}")
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def server_config(
    targets: Sequence[str], rule_files: Sequence[Path], *, job: str = "writeguard", interval_s: float = 1.0
) -> dict[str, Any]:
    """prometheus.yml: one job scraping ``targets``, rules evaluated as often as targets are scraped.

    >>> cfg = server_config(["127.0.0.1:9464"], [Path("/rules.yml")])
    >>> cfg["scrape_configs"][0]["job_name"], cfg["scrape_configs"][0]["static_configs"], cfg["rule_files"]
    ('writeguard', [{'targets': ['127.0.0.1:9464']}], ['/rules.yml'])
    >>> cfg["global"]["scrape_interval"], cfg["global"]["evaluation_interval"]
    ('1s', '1s')
    """
    every = duration(interval_s)
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }


@dataclass(frozen=True)
class Series:
    """One series of a query's answer: its labels (without ``__name__``) and its (unix time, value) points."""

    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...]

    @property
    def last(self) -> float:
        return self.points[-1][1]

    @property
    def finite(self) -> list[float]:
        """The values that are numbers (histogram_quantile over empty buckets gives NaN)."""
        return [v for _, v in self.points if math.isfinite(v)]

    def key(self, *names: str) -> tuple[str, ...]:
        return tuple(self.labels.get(n, "") for n in names)


def parse_result(data: Mapping[str, Any]) -> list[Series]:
    """The ``data`` of a query answer (vector, matrix or scalar) as series; values as floats, NaN included.

    >>> parse_result({"resultType": "vector", "result": [{"metric": {"table": "t"}, "value": [10, "NaN"]}]})
    [Series(labels={'table': 't'}, points=((10.0, nan),))]
    >>> parse_result({"resultType": "scalar", "result": [10, "2"]})[0].last
    2.0
    """
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return [Series({}, ((float(result[0]), float(result[1])),))]
    out = []
    for item in result:
        labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
        raw = [item["value"]] if kind == "vector" else item["values"]
        out.append(Series(labels, tuple((float(t), float(v)) for t, v in raw)))
    return out


class LocalPrometheus:
    """A Prometheus server scraping ``targets`` as job ``job`` every ``interval_s`` and evaluating ``rule_files``."""

    def __init__(
        self,
        targets: Sequence[str],
        rule_files: Sequence[Path],
        *,
        job: str = "writeguard",
        interval_s: float = 1.0,
        workdir: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="writeguard-prom-")) if workdir is None else Path(workdir)
        self.config = server_config(targets, [Path(p).resolve() for p in rule_files], job=job, interval_s=interval_s)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._progress = progress

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 60.0, attempts: int = 3) -> LocalPrometheus:
        binary = find_binary("prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for attempt in range(attempts):
            # free_port() is a guess that another process may take first: then Prometheus exits and we try another.
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=self.workdir,
                )
            if self._wait_ready(timeout):
                emit(self._progress, f"Prometheus ready at {self.url}")
                return self
            if attempt == attempts - 1 or "address already in use" not in self.log_tail():
                break
        self.stop()
        raise PrometheusError(f"Prometheus did not become ready in {timeout:.0f} s:\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def api(self, path: str, **params: str | float | Sequence[str]) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; an error answer raises with Prometheus' message."""
        query = urllib.parse.urlencode(
            [(k, v) for k, vs in params.items() for v in (vs if isinstance(vs, list | tuple) else [vs])]
        )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}", timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 / 422: a bad query, with its reason in the body
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        """An instant query (``/api/v1/query``), now or at unix time ``at``."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        return parse_result(self.api("query", **params))

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        """A range query (``/api/v1/query_range``), as Grafana runs a time-series panel's target."""
        return parse_result(self.api("query_range", query=expr, start=start, end=end, step=step))

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` lists."""
        return list(self.api(f"label/{label}/values", **{"match[]": [match]}))

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, with its health, last error and state."""
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        """The pending and firing alerts."""
        return list(self.api("alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start() if self._proc is None else self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
