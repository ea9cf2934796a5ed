"""The image holds the product and nothing else: no testbed, tests or benchmarks in the build context or a layer.

The build context is computed as Docker computes it: every file under the repository, less what .dockerignore
excludes, with its rules read as Docker reads them (the last matching rule wins, ``!`` re-includes, ``**``
spans folders, and a rule that matches a folder matches everything in it).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from functools import cache

from tests.deploy.conftest import ROOT
from tests.deploy.test_dockerfile import stages
from tests.import_graph import PRODUCT, import_graph

LOCAL_ONLY = ("testbed", "tests", "benchmarks")


def _regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker's pattern matcher compiles it (moby/patternmatcher)."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*" and pattern[i + 1 : i + 2] == "*":
            i += 2
            if pattern[i : i + 1] == "/":
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(f"^{out}$")


@cache
def rules() -> tuple[tuple[bool, str, re.Pattern[str]], ...]:
    """(re-include?, cleaned pattern, regex) for each rule of .dockerignore, in order."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        out.append((negate, pattern, _regex(pattern)))
    return tuple(out)


def excluded(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, with /) out of the build context."""
    parents = path.split("/")[:-1]
    matched = False
    for negate, _, regex in rules():
        hit = bool(regex.match(path)) or any(regex.match("/".join(parents[: i + 1])) for i in range(len(parents)))
        if hit:
            matched = not negate
    return matched


def _may_hold_included(folder: str) -> bool:
    """Whether a re-include rule could match something below an excluded ``folder`` (else Docker skips it)."""
    for negate, pattern, _ in rules():
        if negate:
            literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
            if literal.startswith(folder + "/") or (folder + "/").startswith(literal):
                return True
    return False


def build_context() -> Iterator[str]:
    """Every file Docker would send to the builder from this checkout, as a relative path."""
    for top, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(top, ROOT)
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not excluded(rel + d) or _may_hold_included(rel + d)]
        for name in files:
            if not excluded(rel + name):
                yield rel + name


def test_the_rules_are_read_as_docker_reads_them() -> None:
    assert excluded("tests/unit/test_layout.py") and excluded(".venv/bin/python") and excluded("Makefile")
    assert not excluded("stream/cli.py") and not excluded("stream/examples/writeguard.yaml")
    assert excluded("stream/__pycache__/cli.cpython-311.pyc") and excluded("connectors/x.pyc")
    assert not excluded("pyproject.toml") and not excluded("README.md")
    assert excluded("testbed/maven/kafka/pom.xml") and excluded("benchmarks/common.py")


def test_the_build_context_holds_the_product_and_nothing_local() -> None:
    context = set(build_context())
    assert context, "empty build context"
    local = sorted(p for p in context if p.split("/")[0] in LOCAL_ONLY)
    assert local == [], local
    tops = {p.split("/")[0] for p in context}
    assert tops == {"pyproject.toml", "README.md", *PRODUCT}, tops
    # What the worker needs at run time is there: the code and the example config it ships.
    assert {"stream/cli.py", "stream/examples/writeguard.yaml", "detectors/engine.py"} <= context


def test_every_copy_source_is_a_product_path() -> None:
    build, final = stages()
    sources = [a.split()[0] for i, a in build + final if i == "COPY" and not a.startswith("--from")]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(packages) == sorted(PRODUCT)
    assert sources and all(s in ("pyproject.toml", "README.md", *PRODUCT) for s in sources), sources
    assert not any(s.split("/")[0] in LOCAL_ONLY for s in sources)


def test_the_product_packages_import_nothing_local() -> None:
    graph = import_graph(PRODUCT)
    local = sorted((m, t) for m, targets in graph.items() for t in targets if t.split(".")[0] in LOCAL_ONLY)
    assert local == [], local
