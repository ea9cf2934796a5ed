"""Without Java 17 or Maven, the local broker refuses with a message that says what to install."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.broker import BrokerError, resolve_kafka_jars
from testbed.jvm import require_java


@pytest.fixture(autouse=True)
def _fresh_java_check() -> Iterator[None]:
    require_java.cache_clear()  # the check is cached per process; these tests change PATH
    yield
    require_java.cache_clear()


def test_without_java_it_says_to_install_java(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError, match="Java 17"):
        resolve_kafka_jars()


def test_without_maven_it_says_to_install_maven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    java = shutil.which("java")
    if java is None:
        pytest.skip("needs java on PATH to get past the Java check")
    (tmp_path / "java").symlink_to(os.path.realpath(java))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("WRITEGUARD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BrokerError, match="apt-get install maven"):
        resolve_kafka_jars()


def test_the_storage_format_command_takes_any_cluster_id_as_one_token(monkeypatch: Any, tmp_path: Any) -> None:
    """A base64url id may start with '-': given as a separate argument, kafka-storage reads it as an option."""
    import subprocess

    from testbed import broker

    seen: list[list[str]] = []

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(broker, "_cluster_id", lambda: "-abcdefghijklmnopqrstu")
    monkeypatch.setattr(broker.subprocess, "run", run)
    kafka = broker.LocalKafka(tmp_path)
    kafka._workdir = tmp_path
    kafka._format_storage("java", tmp_path, deadline=1e12)
    assert "--cluster-id=-abcdefghijklmnopqrstu" in seen[0]
