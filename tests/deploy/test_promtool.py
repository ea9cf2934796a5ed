"""The alert rules under Prometheus' own tool: ``promtool check rules`` and the unit tests of each rule.

deploy/prometheus/tests/*.test.yml feed synthetic series to deploy/prometheus/writeguard-rules.yml and say which
alerts must be pending, firing or silent when (``promtool test rules``). Debian's ``prometheus`` package brings
promtool (``bash scripts/system-deps``); without it these tests fail, saying so: they never skip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.prometheus import PrometheusError, find_binary
from tests.deploy.conftest import COMPOSE, ROOT, RULES, Rendered

RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.test.yml"))
COMPOSE_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    try:
        binary = find_binary("promtool")
    except PrometheusError as e:
        pytest.fail(str(e), pytrace=False)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def alert_names(groups: list[dict[str, Any]]) -> list[str]:
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def rule_groups() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert isinstance(groups, list)
    return groups


def test_the_rules_file_passes_promtool_check() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_names(rule_groups()))} rules found" in out.stdout, out.stdout


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
def test_rule_unit_tests_pass(test_file: Path) -> None:
    # The test file names its rule file relative to itself: run from its folder, as a user would.
    out = promtool("test", "rules", test_file.name, cwd=test_file.parent)
    assert out.returncode == 0, f"promtool test rules {test_file.relative_to(ROOT)}:\n{out.stdout}{out.stderr}"
    assert "SUCCESS" in out.stdout, out.stdout


def test_the_unit_tests_run_the_rules_file() -> None:
    assert RULE_TESTS, "no deploy/prometheus/tests/*.test.yml"
    for test_file in RULE_TESTS:
        doc = yaml.safe_load(test_file.read_text())
        assert [(test_file.parent / f).resolve() for f in doc["rule_files"]] == [RULES.resolve()], test_file


def test_every_alert_rule_is_expected_to_fire_and_to_stay_silent_in_a_unit_test() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for test_file in RULE_TESTS:
        for case in yaml.safe_load(test_file.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = set(alert_names(rule_groups()))
    assert names - fires == set(), f"alerts no unit test expects to fire: {sorted(names - fires)}"
    assert names - silent == set(), f"alerts no unit test expects to stay silent: {sorted(names - silent)}"
    assert (fires | silent) - names == set(), f"unit tests of alerts the rules file lacks: {(fires | silent) - names}"


def test_the_unit_tests_fail_when_a_rule_is_wrong(tmp_path: Path) -> None:
    """A threshold raised past what the series reach must fail the unit tests, naming the rule."""
    rule = "sum by (topic) (writeguard_consumer_lag_messages) > 10000"
    assert RULES.read_text().count(rule) == 1
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(RULES.read_text().replace(rule, rule + "0"))
    (tmp_path / "tests").mkdir()
    for test_file in RULE_TESTS:
        text = test_file.read_text().replace(f"../{RULES.name}", f"../rules/{RULES.name}")
        (tmp_path / "tests" / test_file.name).write_text(text)
    out = promtool("test", "rules", *(p.name for p in RULE_TESTS), cwd=tmp_path / "tests")
    assert out.returncode != 0, out.stdout
    assert "WriteguardConsumerLagHigh" in out.stdout + out.stderr, out.stdout + out.stderr


# -- one source: the compose Prometheus and the chart's PrometheusRule run the file tested above -----------------------


def test_the_compose_prometheus_loads_the_tested_rules_file() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    prom = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    # "./source:/target:ro" -> /target: source
    volumes = [v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"]]
    by_target = {target: (ROOT / source).resolve() for source, target in volumes}
    assert prom["rule_files"], COMPOSE_PROMETHEUS
    for rule_file in prom["rule_files"]:
        assert by_target.get(rule_file) == RULES.resolve(), f"{rule_file} is mounted from {by_target.get(rule_file)}"
    assert by_target.get("/etc/prometheus/prometheus.yml") == COMPOSE_PROMETHEUS.resolve()


def test_the_compose_prometheus_config_passes_promtool_check(tmp_path: Path) -> None:
    """promtool reads the config as the container does: with the rules file where compose mounts it."""
    prom = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    prom["rule_files"] = [str(RULES) for _ in prom["rule_files"]]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prom))
    out = promtool("check", "config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_chart_rules_are_the_tested_file(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """The PrometheusRule renders the tested file's groups (one file: the chart's copy is a symlink to it)."""
    chart_copy = ROOT / "helm" / "writeguard" / "rules" / RULES.name
    assert chart_copy.is_symlink() and chart_copy.resolve() == RULES.resolve(), chart_copy
    for name in ("default", "sasl-tls"):
        docs = rendered[name].kind("PrometheusRule")
        if not docs:
            continue
        assert docs[0]["spec"]["groups"] == rule_groups(), name
    groups = rendered["sasl-tls"].one("PrometheusRule")["spec"]["groups"]
    # What the chart ships passes promtool as well.
    (tmp_path / "chart-rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    out = promtool("check", "rules", str(tmp_path / "chart-rules.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_chart_dashboard_is_the_tested_file() -> None:
    chart_copy = ROOT / "helm" / "writeguard" / "dashboards" / "writeguard.json"
    assert chart_copy.is_symlink() and chart_copy.resolve() == (ROOT / "deploy" / "grafana" / "writeguard.json")
