"""The Dockerfile and .dockerignore, read as text (no Docker engine here: the image is not built in these tests)."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

from stream.config import MetricsSettings
from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_multi_stage_on_slim_python_3_11() -> None:
    args = dict(a.split("=", 1) for i, a in instructions() if i == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", args["PYTHON_IMAGE"])
    build, final = stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")


def test_final_stage_has_no_build_tools_and_runs_as_a_numeric_non_root_user() -> None:
    _, final = stages()
    text = " ".join(a for _, a in final)
    assert "apt-get install" not in text and "build-essential" not in text and "pip install" not in text
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final
    users = [a for i, a in final if i == "USER"]
    assert users == ["10001:10001"]  # numeric, so runAsNonRoot can check it; the chart's runAsUser
    assert ("WORKDIR", "/var/lib/writeguard") in final


def test_entrypoint_cmd_port_and_healthcheck() -> None:
    _, final = stages()
    d = dict(final)
    assert json.loads(d["ENTRYPOINT"]) == ["writeguard"]
    assert json.loads(d["CMD"]) == ["worker", "--config", "/etc/writeguard/writeguard.yaml"]
    port = MetricsSettings().port
    assert d["EXPOSE"] == str(port) == "9464"
    health = d["HEALTHCHECK"]
    cmd = json.loads(health[health.index("CMD") + 3 :].strip())
    assert cmd[:2] == ["python", "-c"] and "urllib.request" in cmd[2] and f":{port}/metrics" in cmd[2]
    assert "curl" not in health


def test_build_context_has_what_the_dockerfile_copies() -> None:
    """.dockerignore allows only what COPY needs; the packages are those pyproject.toml builds."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule[1:] if negate else rule
            pattern = pattern.rstrip("/")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or pattern == "**":
                keep = negate
        return keep

    build, _ = stages()
    sources = [a.split()[0] for i, a in build if i == "COPY" and not a.startswith("--from")]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(s for s in sources if s not in ("pyproject.toml", "README.md")) == sorted(packages)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert included(source), f".dockerignore leaves {source} out of the build context"
    for kept_out in (".venv", ".git", "tests", ".tools", "benchmarks", "testbed"):
        assert not included(kept_out), f"{kept_out} would be sent to the builder"
