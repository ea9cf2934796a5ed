"""Without Java 17 or Maven, the local broker refuses with a message that says what to install."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

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
