"""Tests for stream.config: the example file, refusals with key paths, ${ENV} interpolation, the CLI check."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from detectors.spec import OpBurstSpec, RateSpec, RhythmSpec, ZScoreSpec
from stream import cli
from stream.config import EXAMPLE_CONFIG, ConfigError, client_settings, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = EXAMPLE_CONFIG


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def write(tmp_path: Path, data: Any, name: str = "writeguard.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


# --- the example --------------------------------------------------------------------------------


def test_example_config_loads():
    cfg = load_config(EXAMPLE)
    assert [t.name for t in cfg.tables] == ["public.refunds", "public.orders"]
    assert list(cfg.table_by_topic()) == ["shop.public.refunds", "shop.public.orders"]
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092" and cfg.kafka.group_id == "writeguard"
    assert cfg.topics.alerts == "writeguard.alerts" and cfg.topics.partitions == 6
    assert cfg.worker.metrics.port == 9464

    refunds, orders = cfg.tables
    z, rate, burst, rhythm = refunds.detectors
    assert isinstance(rhythm, RhythmSpec) and rhythm.windows_seconds == (600.0, 3600.0)
    assert isinstance(z, ZScoreSpec) and (z.threshold, z.warmup, z.debounce.k, z.debounce.n) == (0.6, 30, 2, 4)
    assert isinstance(rate, RateSpec) and (rate.max_events, rate.window_seconds) == (1200, 60.0)
    assert isinstance(burst, OpBurstSpec) and burst.ops == ("d", "t") and burst.max_events == 20
    assert refunds.actions["critical"] == ("alert", "quarantine")
    assert [(f.name, f.transform) for f in refunds.features] == [("amount", "log")]
    assert orders.agent_id == "row.agent_id" and orders.run_id == "row.run_id"  # defaults
    delta = orders.features[2]
    assert (delta.name, delta.delta, delta.ops) == ("total_change", True, ("u",))


def test_bootstrap_override_and_client_settings():
    cfg = load_config(EXAMPLE).with_bootstrap("kafka-1:9093,kafka-2:9093")
    assert client_settings(cfg) == {"bootstrap.servers": "kafka-1:9093,kafka-2:9093"}
    assert load_config(EXAMPLE).with_bootstrap(None).kafka.bootstrap_servers == "127.0.0.1:9092"


# --- refusals -----------------------------------------------------------------------------------


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value

    return mutate


def _pop(*path: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        del cur[path[-1]]

    return mutate


def _dup_table(d: dict[str, Any]) -> None:
    d["tables"][1]["name"] = "public.refunds"


BAD = {
    "max_events_zero": (_set("tables", 0, "detectors", 1, "max_events", value=0),
                        ["tables.0.detectors.1.max_events", "greater than or equal to 1"]),
    "max_events_missing": (_pop("tables", 0, "detectors", 2, "max_events"),
                           ["tables.0.detectors.2.max_events", "Field required"]),
    "kafka_sasl": (_set("kafka", "sasl", value={"username": "u"}), ["kafka.sasl", "Extra inputs"]),
    "detector_key_typo": (_set("tables", 1, "detectors", 0, "treshold", value=0.5),
                          ["tables.1.detectors.0.treshold", "Extra inputs"]),
    "unknown_kind": (_set("tables", 0, "detectors", 0, "kind", value="isolation_forest"),
                     ["tables.0.detectors.0:", "isolation_forest", "zscore"]),
    "threshold_high": (_set("tables", 0, "detectors", 0, "threshold", value=1.5),
                       ["tables.0.detectors.0.threshold", "less than 1"]),
    "threshold_zero": (_set("tables", 1, "detectors", 0, "threshold", value=0),
                       ["tables.1.detectors.0.threshold", "greater than 0"]),
    "unknown_feature": (_set("tables", 1, "detectors", 0, "features", value=["total", "bogus"]),
                        ["tables.1:", "unknown features ['bogus']"]),
    "duplicate_tables": (_dup_table, ["table names must be unique", "public.refunds"]),
    "bad_agent_path": (_set("tables", 0, "agent_id", value="new.agent_id"),
                       ["tables.0.agent_id", "new.agent_id"]),
    "bad_run_path": (_set("tables", 1, "run_id", value="after"), ["tables.1.run_id", "'after'"]),
    "bad_table_name": (_set("tables", 0, "name", value="refunds"), ["tables.0.name", "<schema>.<table>"]),
    "debounce_k_gt_n": (_set("tables", 0, "detectors", 0, "debounce", value={"k": 5, "n": 4}),
                        ["tables.0.detectors.0.debounce", "k must be <= debounce.n"]),
    "bad_action": (_set("tables", 0, "actions", "critical", value=["alert", "page"]),
                   ["tables.0.actions.critical.1"]),
    "bad_op": (_set("tables", 0, "detectors", 2, "ops", value=["d", "x"]), ["tables.0.detectors.2.ops.1"]),
    "port_range": (_set("worker", "metrics", "port", value=70000), ["worker.metrics.port"]),
    "no_tables": (_set("tables", value=[]), ["at least one table"]),
    "river_model_module": (_set("tables", 0, "detectors", 0, value={"kind": "river", "model": "sklearn.Forest"}),
                           ["tables.0.detectors.0.model", "anomaly.<ClassName>"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_refused_with_key_path(tmp_path, case):
    mutate, fragments = BAD[case]
    data = example()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in msg


def test_detector_error_path_has_no_pydantic_tag():
    data = example()
    data["tables"][0]["detectors"][1]["max_events"] = -1
    with pytest.raises(ConfigError) as err:
        parse_config(data, "x.yaml")
    # pydantic's location is tables.0.detectors.1.rate.max_events; the YAML has no "rate" key.
    assert "tables.0.detectors.1.max_events:" in str(err.value)
    assert ".rate." not in str(err.value)


def test_every_bad_key_is_reported():
    data = example()
    data["kafka"]["sasl"] = {}
    data["tables"][0]["detectors"][0]["threshold"] = 2
    data["tables"][1]["detectors"][1]["max_events"] = 0
    with pytest.raises(ConfigError) as err:
        parse_config(data, "x.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == "x.yaml: invalid config"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "kafka.sasl", "tables.0.detectors.0.threshold", "tables.1.detectors.1.max_events",
    ]


def test_yaml_syntax_error(tmp_path):
    path = write(tmp_path, "tables: [\n  {name: public.x\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_non_mapping_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="must be a mapping") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_river_model_class_is_refused():
    data = example()
    data["tables"][0]["detectors"][0] = {"kind": "river", "model": "anomaly.NoSuchModel"}
    with pytest.raises(ConfigError, match="NoSuchModel"):
        parse_config(data, "x.yaml")


# --- ${ENV} -------------------------------------------------------------------------------------


def test_env_interpolation(monkeypatch, tmp_path):
    monkeypatch.setenv("WG_TEST_PASSWORD", "s3cr$t{}")
    monkeypatch.setenv("WG_TEST_HOST", "kafka.internal")
    monkeypatch.setenv("WG_TEST_PORT", "9999")
    data = example()
    data["kafka"]["bootstrap.servers"] = "${WG_TEST_HOST}:9093,${WG_TEST_HOST}:9094"
    data["kafka"]["client"] = {"security.protocol": "SASL_SSL", "sasl.password": "${WG_TEST_PASSWORD}"}
    data["worker"]["metrics"]["port"] = "${WG_TEST_PORT}"
    cfg = load_config(write(tmp_path, data))
    assert cfg.kafka.bootstrap_servers == "kafka.internal:9093,kafka.internal:9094"
    assert cfg.kafka.client["sasl.password"] == "s3cr$t{}"  # the value itself is not expanded again
    assert cfg.worker.metrics.port == 9999
    assert client_settings(cfg)["sasl.password"] == "s3cr$t{}"


def test_missing_env_var_is_reported_with_its_key_path(monkeypatch, tmp_path):
    monkeypatch.delenv("WG_TEST_UNSET_A", raising=False)
    monkeypatch.delenv("WG_TEST_UNSET_B", raising=False)
    data = example()
    data["kafka"]["client"] = {"sasl.password": "${WG_TEST_UNSET_A}"}
    data["tables"][1]["topic"] = "${WG_TEST_UNSET_B}.public.orders"
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    assert "kafka.client.sasl.password: environment variable WG_TEST_UNSET_A is not set" in msg
    assert "tables.1.topic: environment variable WG_TEST_UNSET_B is not set" in msg


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_config_check_bad_file_exits_2_with_key_path(tmp_path):
    data = example()
    data["tables"][0]["detectors"][1]["max_events"] = 0
    path = write(tmp_path, data)
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "config", "check", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "tables.0.detectors.1.max_events" in proc.stderr
    assert str(path) in proc.stderr
    assert proc.stdout == ""


def test_cli_config_check_good_file(capsys):
    assert cli.main(["config", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "ok (2 tables: public.refunds, public.orders)" in out


def test_cli_config_check_missing_file(tmp_path, capsys):
    assert cli.main(["config", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
