"""Shared pieces of the deployment checks: paths, helm, rendered charts, and the worker's real metric names.

Everything here runs offline. helm comes from ``scripts/deploy-tools`` (``.tools/bin/helm``) or the PATH; without it
the chart tests skip, saying how to install it (``make test`` and ``make deploy-check`` install it first).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase

from stream.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "writeguard"
CI_VALUES = CHART / "ci" / "sasl-tls-values.yaml"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "writeguard.yaml"
RULES = ROOT / "deploy" / "prometheus" / "writeguard-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "writeguard.json"
# The Kubernetes version the rendered manifests are validated against (kubernetes-validate -k).
K8S_VERSION = "1.33.0"
RELEASE = "writeguard"  # with this release name the chart's resources are named "writeguard" (the compose job)
VALUE_SETS = {"default": [], "sasl-tls": [CI_VALUES]}


def helm_binary() -> str | None:
    local = ROOT / ".tools" / "bin" / "helm"
    if local.is_file():
        return str(local)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    path = helm_binary()
    if path is None:
        pytest.skip(
            "helm not found: run `bash scripts/deploy-tools` (builds it into .tools/bin; `make deploy-check` does)"
        )
    return path


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def template_args(values: list[Path], *extra: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", "agents", "--kube-version", K8S_VERSION]
    for v in values:
        args += ["-f", str(v)]
    return [*args, *extra]


@dataclass
class Rendered:
    """The manifests of one ``helm template``, by kind."""

    name: str
    docs: list[dict[str, Any]]

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    def config(self) -> dict[str, Any]:
        """The writeguard config the ConfigMap carries (what the worker reads)."""
        data = yaml.safe_load(self.one("ConfigMap", RELEASE)["data"]["writeguard.yaml"])
        assert isinstance(data, dict)
        return data

    def worker(self) -> dict[str, Any]:
        containers = self.one("Deployment")["spec"]["template"]["spec"]["containers"]
        assert [c["name"] for c in containers] == ["worker"]
        return containers[0]  # type: ignore[no-any-return]


def render(helm: str, values: list[Path], name: str, *extra: str) -> Rendered:
    out = run_helm(helm, *template_args(values, *extra)).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    return Rendered(name, docs)


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, Rendered]:
    return {name: render(helm, values, name) for name, values in VALUE_SETS.items()}


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def env_refs(value: Any) -> set[str]:
    """Every ${VAR} that writeguard's config loader would fill from the environment."""
    if isinstance(value, str):
        return set(ENV_REF.findall(value))
    if isinstance(value, dict):
        return set().union(*(env_refs(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(env_refs(v) for v in value)) if value else set()
    return set()


@pytest.fixture
def dummy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Sets a dummy value for each named variable, as the pod's Secrets would."""

    def setenv(names: set[str]) -> None:
        for n in names:
            # Long enough for the keys that have a minimum length (control.signing_key: 32 characters).
            monkeypatch.setenv(n, f"dummy-{n.lower()}-0123456789abcdef0123456789")

    yield setenv


@dataclass
class ExportedMetrics:
    """What the worker's /metrics serves: sample names (with _total, _bucket, ...) and each one's label names."""

    families: dict[str, str] = field(default_factory=dict)  # family name -> type
    samples: dict[str, set[str]] = field(default_factory=dict)  # sample name -> label names


@pytest.fixture(scope="session")
def exported_metrics() -> ExportedMetrics:
    """Exercise every metric of a real ``stream.metrics.Metrics`` once, then parse its exposition text."""
    m = Metrics()
    for metric in vars(m).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labelnames = metric._labelnames
        child = metric.labels(*(f"dummy_{n}" for n in labelnames)) if labelnames else metric
        for method in ("inc", "set", "observe"):
            if hasattr(child, method):
                getattr(child, method)(1.0)
                break
    out = ExportedMetrics()
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ")
    for line in generate_latest(m.registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, typ = line.split(" ", 3)
            out.families[fam] = typ
            continue
        if not line or line.startswith("#"):
            continue
        match = sample.match(line)
        assert match, line
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', match.group(2) or ""))
        out.samples.setdefault(match.group(1), set()).update(labels)
    return out
