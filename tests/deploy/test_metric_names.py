"""Every metric the dashboard and the alert rules query is one the worker really exports, with those labels.

The exported names come from a real ``stream.metrics.Metrics``: each metric is exercised once (dummy label values)
and ``generate_latest`` is parsed, so counters appear as ``*_total``, histograms as ``*_bucket``/``*_count``/
``*_sum``, gauges as themselves. A query of ``writeguard_alerts`` (no ``_total``) or of a histogram's bare name
matches no sample and fails here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from stream.metrics import Metrics
from tests.deploy.conftest import DASHBOARD, ROOT, RULES, ExportedMetrics, Rendered

METRIC = re.compile(r"\bwriteguard_[a-z_]+")
# Labels every scraped series has, or that PromQL makes (le of a histogram's buckets).
TARGET_LABELS = {"job", "instance", "le"}
README = ROOT / "README.md"
# | `writeguard_x_total` | table, op | meaning |   or   | `writeguard_y_seconds` (histogram) | | meaning |
README_ROW = re.compile(r"\|\s*`(writeguard_[a-z_]+)`(\s*\(histogram\))?\s*\|([^|]*)\|[^|]*\|")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every panel target and query variable."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", "")))
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            out.append((f"variable {var['name']}", query["query"], ""))
    return out


def rule_queries(groups: list[dict[str, Any]], source: str) -> list[tuple[str, str, str]]:
    return [(f"{source} {r.get('alert') or r.get('record')}", str(r["expr"]), "") for g in groups for r in g["rules"]]


def all_queries(rendered: dict[str, Rendered] | None = None) -> list[tuple[str, str, str]]:
    queries = dashboard_queries() + rule_queries(yaml.safe_load(RULES.read_text())["groups"], "compose rule")
    if rendered is not None:
        rule = rendered["sasl-tls"].one("PrometheusRule")
        queries += rule_queries(rule["spec"]["groups"], "PrometheusRule")
    return queries


@dataclass(frozen=True)
class ReadmeMetric:
    name: str  # as queried: counters with _total, histograms by their base name
    histogram: bool
    labels: frozenset[str]


def readme_metrics() -> list[ReadmeMetric]:
    """Every row of the README's metrics table ("### Metrics ..." up to the next heading)."""
    text = README.read_text()
    start = text.index("\n### Metrics")
    end = text.find("\n#", start + 1)
    section = text[start : end if end != -1 else len(text)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    out = []
    for line in rows:
        match = README_ROW.fullmatch(line.strip())
        assert match, f"README metrics table: cannot read row {line!r}"
        name, histogram, labels = match.groups()
        out.append(ReadmeMetric(name, bool(histogram), frozenset(x.strip() for x in labels.split(",") if x.strip())))
    return out


def registry_families() -> dict[str, str]:
    """name as queried -> type, for every metric family a real Metrics() registers (what /metrics serves)."""
    out = {}
    for family in Metrics().registry.collect():
        out[family.name + ("_total" if family.type == "counter" else "")] = family.type
    return out


def test_the_readme_metrics_table_is_read_whole() -> None:
    listed = readme_metrics()
    names = [m.name for m in listed]
    assert len(names) >= 12 and len(names) == len(set(names)), names
    assert all(METRIC.fullmatch(n) for n in names)


def test_the_worker_exports_what_the_readme_lists(exported_metrics: ExportedMetrics) -> None:
    families = registry_families()
    problems = []
    for metric in readme_metrics():
        if metric.name not in families:
            problems.append(f"{metric.name}: listed in the README, not registered by the worker")
            continue
        kind = "histogram" if metric.histogram else "counter" if metric.name.endswith("_total") else "gauge"
        if families[metric.name] != kind:
            problems.append(f"{metric.name}: the README says {kind}, the worker has a {families[metric.name]}")
            continue
        samples = [f"{metric.name}_{x}" for x in ("bucket", "count", "sum")] if metric.histogram else [metric.name]
        for sample in samples:
            if sample not in exported_metrics.samples:
                problems.append(f"{sample}: not in the worker's exposition")
            elif exported_metrics.samples[sample] - {"le"} != metric.labels:
                problems.append(
                    f"{sample}: the README gives labels {sorted(metric.labels)}, "
                    f"the series carry {sorted(exported_metrics.samples[sample] - {'le'})}"
                )
    assert problems == []
    names = set(exported_metrics.samples)
    assert "writeguard_alerts" not in names  # a counter is queried as *_total
    assert "writeguard_detection_lag_seconds" not in names  # a histogram only as _bucket/_count/_sum


def test_every_metric_the_worker_exports_is_in_the_readme() -> None:
    documented = {m.name for m in readme_metrics()}
    undocumented = sorted(set(registry_families()) - documented)
    assert not undocumented, f"exported by the worker but not in the README's metrics table: {undocumented}"


def _check(queries: list[tuple[str, str, str]], exported: ExportedMetrics) -> list[str]:
    problems = []
    for where, expr, legend in queries:
        used = set(METRIC.findall(expr))
        if not used and not re.match(r"up\{", expr):  # `up` is Prometheus' own, per scrape target
            problems.append(f"{where}: queries no writeguard metric: {expr}")
            continue
        unknown = sorted(used - set(exported.samples))
        if unknown:
            problems.append(f"{where}: {unknown} not exported by the worker (exported: {sorted(exported.samples)})")
            continue
        labels = set().union(*(exported.samples[m] for m in used)) | TARGET_LABELS
        # Label matchers right after a metric name: writeguard_x{outcome="failed"}
        for metric, matchers in re.findall(r"(writeguard_[a-z_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                if label not in exported.samples[metric] | TARGET_LABELS:
                    problems.append(f"{where}: {metric} has no label {label!r}")
        # Aggregation labels and legend placeholders.
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if label not in labels:
                    problems.append(f"{where}: groups by {label!r}, which none of {sorted(used)} has")
        for label in re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend):
            if label not in labels:
                problems.append(f"{where}: legend uses {label!r}, which none of {sorted(used)} has")
    return problems


def test_dashboard_and_compose_rules_query_real_metrics(exported_metrics: ExportedMetrics) -> None:
    queries = all_queries()
    assert len(queries) > 20
    assert _check(queries, exported_metrics) == []


def test_prometheus_rule_queries_real_metrics(rendered: dict[str, Rendered], exported_metrics: ExportedMetrics) -> None:
    queries = all_queries(rendered)
    assert _check(queries, exported_metrics) == []


def test_the_check_catches_wrong_names_and_labels(exported_metrics: ExportedMetrics) -> None:
    bad = [
        ("a", "sum(rate(writeguard_alerts[5m]))", ""),
        ("b", "histogram_quantile(0.9, rate(writeguard_detection_lag_seconds[5m]))", ""),
        ("c", "sum by (agent_id) (rate(writeguard_events_total[5m]))", ""),
        ("d", 'sum(writeguard_enforcement_actions_total{result="failed"})', ""),
        ("e", "sum by (table) (rate(writeguard_events_total[5m]))", "{{tabel}}"),
    ]
    problems = _check(bad, exported_metrics)
    assert [p.split(":")[0] for p in problems] == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(
    "required",
    [
        "events per table",
        "alerts by detector",
        "detection lag",
        "quarantined",
        "dead letters",
        "consumer lag",
        "enforcement",
    ],
)
def test_dashboard_covers(required: str) -> None:
    titles = [p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert any(required in t for t in titles), f"no panel about {required}: {titles}"


def test_detection_lag_panel_uses_histogram_quantile_over_buckets() -> None:
    exprs = [e for where, e, _ in dashboard_queries() if "writeguard_detection_lag_seconds" in e]
    assert exprs
    assert all(e.startswith("histogram_quantile(") and "writeguard_detection_lag_seconds_bucket" in e for e in exprs)


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] == "writeguard"
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job"}
    for panel in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"]
            # Every query is scoped to the dashboard's job selection.
            for metric_use in re.findall(r"writeguard_[a-z_]+(\{[^}]*\})?", t["expr"]):
                assert 'job=~"$job"' in metric_use, f"{panel['title']}: {t['expr']}"
