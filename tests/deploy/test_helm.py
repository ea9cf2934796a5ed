"""The Helm chart: lint, render with the default and the SASL/TLS values, validate every manifest offline.

Kubernetes kinds are validated with kubernetes-validate (the API's own OpenAPI schemas, ``--strict``) for
Kubernetes 1.33. kubernetes-validate has no schemas for CRDs: the ServiceMonitor and PrometheusRule are validated
against tests/deploy/schemas/*.json instead, hand-written subsets of the Prometheus Operator's
monitoring.coreos.com/v1 CRDs that cover every field the chart renders and refuse any other.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from stream.config import parse_config
from tests.deploy.conftest import (
    CHART,
    CI_VALUES,
    DASHBOARD,
    K8S_VERSION,
    RELEASE,
    ROOT,
    RULES,
    VALUE_SETS,
    Rendered,
    env_refs,
    render,
    run_helm,
    template_args,
)

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): Path(__file__).parent / "schemas" / "servicemonitor.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): Path(__file__).parent / "schemas" / "prometheusrule.schema.json",
}


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_helm_lint_strict(helm: str, values: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    for v in VALUE_SETS[values]:
        args += ["-f", str(v)]
    out = run_helm(helm, *args).stdout
    assert "0 chart(s) failed" in out


def test_chart_versions_follow_pyproject() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]


def test_default_install_renders_the_worker_only(rendered: dict[str, Rendered]) -> None:
    kinds = sorted(d["kind"] for d in rendered["default"].docs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    kinds = sorted(d["kind"] for d in rendered["sasl-tls"].docs)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_every_manifest_is_valid_kubernetes_1_33_strict(rendered: dict[str, Rendered], values: str) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the dev extra: pip install -e '.[dev]'"
    )
    crds = 0
    for doc in rendered[values].docs:
        schema_path = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema_path is not None:
            jsonschema.validate(doc, json.loads(schema_path.read_text()))
            crds += 1
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            raise AssertionError(f"{values}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {e.path}") from e
    assert crds == (2 if values == "sasl-tls" else 0)


def test_kubernetes_validate_refuses_what_it_should() -> None:
    """The validator is not a no-op: strict mode rejects an unknown field, and a wrong type fails either way."""
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the dev extra: pip install -e '.[dev]'"
    )
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 9464}], "selector": {"a": "b"}},
    }
    kv.validate(svc, K8S_VERSION, strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({**svc, "spec": {**svc["spec"], "portz": []}}, K8S_VERSION, strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({**svc, "spec": {"ports": [{"port": "metrics"}]}}, K8S_VERSION, strict=True)


def test_crd_schemas_refuse_unknown_fields(rendered: dict[str, Rendered]) -> None:
    for (_, kind), path in CRD_SCHEMAS.items():
        doc = json.loads(json.dumps(rendered["sasl-tls"].one(kind)))
        doc["spec"]["unknownField"] = 1
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, json.loads(path.read_text()))


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_the_rendered_config_is_a_valid_writeguard_config(
    rendered: dict[str, Rendered], values: str, dummy_env: Any
) -> None:
    r = rendered[values]
    data = r.config()
    refs = env_refs(data)
    # Each ${VAR} must reach the pod: the worker refuses to start on an unset one.
    env = {e["name"] for e in r.worker().get("env", [])}
    assert refs <= env, f"{values}: config names {sorted(refs - env)} but the Deployment does not set them"
    dummy_env(refs)
    cfg = parse_config(data, f"{values} ConfigMap")
    assert cfg.tables
    # The Service, probes and container port follow the config's metrics port.
    port = cfg.worker.metrics.port
    assert r.one("Service")["spec"]["ports"] == [
        {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert r.worker()["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]


def test_sasl_tls_values_wire_secrets_and_files(rendered: dict[str, Rendered]) -> None:
    r = rendered["sasl-tls"]
    worker = r.worker()
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in worker["env"]}
    assert refs["KAFKA_SASL_USERNAME"] == {"name": "writeguard-kafka-user", "key": "username"}
    assert refs["KAFKA_SASL_PASSWORD"] == {"name": "writeguard-kafka-user", "key": "password"}
    assert refs["PG_ADMIN_PASSWORD"] == {"name": "writeguard-shop-db", "key": "password"}
    assert refs["WRITEGUARD_WEBHOOK_SECRET"] == {"name": "writeguard-webhook", "key": "hmac-key"}
    assert refs["WRITEGUARD_CONTROL_KEY"] == {"name": "writeguard-control", "key": "signing-key"}
    assert refs["ORCHESTRATOR_TOKEN"] == {"name": "orchestrator-token", "key": "token"}
    # No secret value is ever in the ConfigMap, only the variable names.
    text = r.one("ConfigMap", RELEASE)["data"]["writeguard.yaml"]
    assert "${KAFKA_SASL_PASSWORD}" in text and "${WRITEGUARD_WEBHOOK_SECRET}" in text
    # Every file the config points at under /etc/writeguard/tls is in the mounted TLS Secret's folder.
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/writeguard/tls", "readOnly": True}
    volumes = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "writeguard-tls"
    client = r.config()["kafka"]["client"]
    for key in ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location"):
        assert client[key].startswith("/etc/writeguard/tls/")
    assert "sslrootcert=/etc/writeguard/tls/ca.crt" in r.config()["enforcement"]["postgres"]["dsn"]


def test_a_config_naming_an_unset_variable_is_refused(helm: str) -> None:
    proc = run_helm(
        helm, *template_args([], "--set", "config.kafka.client.sasl\\.password=${KAFKA_SASL_PASSWORD}"), check=False
    )
    assert proc.returncode != 0
    assert "config names ${KAFKA_SASL_PASSWORD}" in proc.stderr
    # ... and accepted once the Secret is named.
    run_helm(
        helm,
        *template_args(
            [],
            "--set",
            "config.kafka.client.sasl\\.password=${KAFKA_SASL_PASSWORD}",
            "--set",
            "secrets.kafkaSasl.existingSecret=kafka-user",
        ),
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("replicaCount=-1", "/replicaCount"),
        ("logLevel=verbose", "/logLevel"),
        ("secrets.webhook.secretEnv=not-an-env-name", "/secrets/webhook/secretEnv"),
        ("servicemonitor.enabled=true", "additional properties 'servicemonitor' not allowed"),
        ("config.tables=null", "tables"),
        ("networkPolicy.enabled=yes", "/networkPolicy/enabled"),
        ("networkPolicy.egress.postgres.ports={70000}", "/networkPolicy/egress/postgres/ports/0"),
        ("networkPolicy.egress.kafka.ports={0}", "/networkPolicy/egress/kafka/ports/0"),
        ("networkPolicy.egress.dns.ports=53", "/networkPolicy/egress/dns/ports"),
        ("networkPolicy.ingress.from[0].podSelektor.a=b", "additional properties 'podSelektor' not allowed"),
        ("networkPolicy.egres.kafka.ports={9092}", "additional properties 'egres' not allowed"),
    ],
)
def test_values_schema_refuses_bad_values(helm: str, setting: str, message: str) -> None:
    proc = run_helm(helm, *template_args([], "--set", setting), check=False)
    assert proc.returncode != 0, f"--set {setting} was accepted"
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("key", ["postgres", "dns"])
def test_values_schema_refuses_no_port_where_none_can_be_derived(helm: str, key: str) -> None:
    """PostgreSQL's and DNS's ports are not derived from the config: an empty list would cut the worker off."""
    setting = f"networkPolicy.egress.{key}.ports=[]"
    proc = run_helm(helm, *template_args([], "--set-json", setting), check=False)
    assert proc.returncode != 0, f"--set-json {setting} was accepted"
    assert f"/networkPolicy/egress/{key}/ports" in proc.stderr, proc.stderr
    # Kafka's and the webhook's may be empty: then they come from bootstrap.servers and the webhook URL.
    for derived in ("kafka", "webhook"):
        run_helm(helm, *template_args([], "--set-json", f"networkPolicy.egress.{derived}.ports=[]"))


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_worker_pod_is_locked_down_and_stateless(rendered: dict[str, Rendered], values: str) -> None:
    r = rendered[values]
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    worker = r.worker()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    sc = worker["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # Writable paths are emptyDirs only: /tmp and the Faust data folder the worker is pointed at.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "emptyDir" in volumes[mounts["/var/lib/writeguard"]]
    assert not [v for v in volumes.values() if "persistentVolumeClaim" in v]
    args = worker["args"]
    assert args[:3] == ["worker", "--config", "/etc/writeguard/writeguard.yaml"]
    assert args[args.index("--datadir") + 1].startswith("/var/lib/writeguard/")
    assert mounts["/etc/writeguard/writeguard.yaml"] == "config"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert worker["resources"]["requests"] and worker["resources"]["limits"]
    # The config is read once at start: a change must roll the pods.
    assert "checksum/config" in r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert (
        r.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
        == r.one("Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_prometheus_rule_is_the_compose_rules_file(rendered: dict[str, Rendered]) -> None:
    """One set of alert rules: the chart's copy equals deploy/prometheus's, and renders to the same groups."""
    assert (CHART / "rules" / "writeguard-rules.yml").read_text() == RULES.read_text()
    rule = rendered["sasl-tls"].one("PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_prometheus_rule_selects_the_release_job(helm: str) -> None:
    r = render(helm, [], "other-release", "--set", "prometheusRule.enabled=true", "--set", "fullnameOverride=wg-prod")
    exprs = [rule["expr"] for g in r.one("PrometheusRule")["spec"]["groups"] for rule in g["rules"]]
    assert 'up{job="wg-prod"} == 0' in exprs
    assert r.one("Service")["metadata"]["name"] == "wg-prod"  # the ServiceMonitor's job label


def test_dashboard_configmap_carries_the_dashboard(rendered: dict[str, Rendered]) -> None:
    assert (CHART / "dashboards" / "writeguard.json").read_text() == DASHBOARD.read_text()
    cm = rendered["sasl-tls"].one("ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["writeguard.json"]) == json.loads(DASHBOARD.read_text())


def test_service_monitor_scrapes_the_metrics_port(rendered: dict[str, Rendered]) -> None:
    r = rendered["sasl-tls"]
    sm = r.one("ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= r.one("Service")["metadata"]["labels"].items()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_ci_values_file_is_used(helm: str, rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """The CI values file is what the lint and render tests above run with, and its settings reach the manifests."""
    # Every values file under ci/ is one of the value sets the lint and render tests are parametrized over.
    ci_files = sorted((CHART / "ci").glob("*-values.yaml"))
    assert ci_files == [CI_VALUES], ci_files
    assert [name for name, files in VALUE_SETS.items() if CI_VALUES in files] == ["sasl-tls"]

    ci = yaml.safe_load(CI_VALUES.read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    image = f"{ci['image']['repository']}:{ci['image']['tag']}"
    group_id = ci["config"]["kafka"]["group.id"]
    # Values only the CI file sets: none of them is the chart's default.
    assert ci["replicaCount"] != defaults["replicaCount"]
    assert ci["image"]["repository"] != defaults["image"]["repository"]
    assert group_id != defaults["config"]["kafka"]["group.id"]
    assert ci["topologySpreadConstraints"] and not defaults.get("topologySpreadConstraints")

    for name, expect_ci in (("sasl-tls", True), ("default", False)):
        r = rendered[name]
        deployment = r.one("Deployment")
        pod = deployment["spec"]["template"]["spec"]
        got = (
            deployment["spec"]["replicas"],
            r.worker()["image"],
            r.config()["kafka"]["group.id"],
            pod.get("topologySpreadConstraints"),
        )
        ci_values = (ci["replicaCount"], image, group_id, ci["topologySpreadConstraints"])
        if expect_ci:
            assert got == ci_values, f"{name}: the CI values did not reach the manifests"
        else:
            assert all(g != c for g, c in zip(got, ci_values, strict=True)), f"{name}: {got}"

    # The lint reads the values file it is given: the same file with one bad value fails it.
    broken = tmp_path / CI_VALUES.name
    broken.write_text(CI_VALUES.read_text().replace(f"replicaCount: {ci['replicaCount']}\n", "replicaCount: -1\n"))
    assert broken.read_text() != CI_VALUES.read_text()
    proc = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(broken), check=False)
    assert proc.returncode != 0 and "replicaCount" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


# -- NetworkPolicy -----------------------------------------------------------------------------------------------------


def render_values(helm: str, tmp_path: Path, name: str, values: dict[str, Any]) -> Rendered:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return render(helm, [path], name)


def policy_ports(rule: dict[str, Any]) -> list[tuple[int, str]]:
    return [(p["port"], p["protocol"]) for p in rule["ports"]]


def validate_strict(doc: dict[str, Any]) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the dev extra: pip install -e '.[dev]'"
    )
    kv.validate(doc, K8S_VERSION, strict=True)


def test_network_policy_is_off_by_default(rendered: dict[str, Rendered]) -> None:
    assert yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["enabled"] is False
    assert rendered["default"].kind("NetworkPolicy") == []
    # The same chart renders one when asked (so the absence above is the default's doing).
    assert len(rendered["sasl-tls"].kind("NetworkPolicy")) == 1


PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
KAFKA_PEER = {"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.9.0/24"]}}
DB_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}}}
ORCHESTRATOR_PEER = {"podSelector": {"matchLabels": {"app": "orchestrator"}}}
OTLP_RULE = {"to": [{"ipBlock": {"cidr": "10.30.0.5/32"}}], "ports": [{"port": 4317, "protocol": "TCP"}]}


def network_values(**config: Any) -> dict[str, Any]:
    """Values with the NetworkPolicy on; ``config`` is merged into config (Helm merges maps)."""
    return {
        "config": {
            "kafka": {"bootstrap.servers": "b1.kafka:9093, b2.kafka:9094,b3.kafka"},
            "worker": {"metrics": {"port": 9500}},
            **config,
        },
        "networkPolicy": {
            "enabled": True,
            "ingress": {"from": [PROMETHEUS]},
            "egress": {
                "kafka": {"to": [KAFKA_PEER]},
                "postgres": {"to": [DB_PEER], "ports": [6432]},
                "webhook": {"to": [ORCHESTRATOR_PEER]},
                "extra": [OTLP_RULE],
            },
        },
    }


ENFORCEMENT = {
    "postgres": {"dsn": "host=db.internal port=6432 dbname=shop user=wg", "roles": {"template": "agent_{agent_id}"}},
    "webhook": {"url": "https://orchestrator.internal:8443/agents/pause", "secret": "${WRITEGUARD_WEBHOOK_SECRET}"},
}


def test_network_policy_allows_only_the_metrics_port_in_and_the_configured_destinations_out(
    helm: str, tmp_path: Path
) -> None:
    values = network_values(enforcement=ENFORCEMENT)
    values["secrets"] = {"webhook": {"existingSecret": "wg-webhook"}}
    r = render_values(helm, tmp_path, "netpol", values)
    policy = r.one("NetworkPolicy")
    validate_strict(policy)
    spec = policy["spec"]
    assert spec["podSelector"] == r.one("Deployment")["spec"]["selector"]
    assert (
        spec["podSelector"]["matchLabels"].items()
        <= r.one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    # In: one rule, the metrics port the worker listens on (config.worker.metrics.port), from Prometheus only.
    assert spec["ingress"] == [{"ports": [{"port": 9500, "protocol": "TCP"}], "from": [PROMETHEUS]}]
    assert r.worker()["ports"] == [{"name": "metrics", "containerPort": 9500, "protocol": "TCP"}]
    # Out: Kafka on the ports of bootstrap.servers (9092 for the host without one), PostgreSQL on the configured
    # port, the webhook on its URL's port, DNS over UDP and TCP, then the extra rule; nothing else.
    kafka, postgres, webhook, dns, extra = spec["egress"]
    assert (policy_ports(kafka), kafka["to"]) == ([(9093, "TCP"), (9094, "TCP"), (9092, "TCP")], [KAFKA_PEER])
    assert (policy_ports(postgres), postgres["to"]) == ([(6432, "TCP")], [DB_PEER])
    assert (policy_ports(webhook), webhook["to"]) == ([(8443, "TCP")], [ORCHESTRATOR_PEER])
    assert policy_ports(dns) == [(53, "UDP"), (53, "TCP")]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert extra == OTLP_RULE


def test_network_policy_opens_only_what_the_config_uses(helm: str, tmp_path: Path) -> None:
    # No enforcement configured: no rule for PostgreSQL or the webhook.
    r = render_values(helm, tmp_path, "no-enforcement", network_values())
    egress = r.one("NetworkPolicy")["spec"]["egress"]
    assert [policy_ports(rule) for rule in egress] == [
        [(9093, "TCP"), (9094, "TCP"), (9092, "TCP")],
        [(53, "UDP"), (53, "TCP")],
        policy_ports(OTLP_RULE),
    ]
    # The webhook's port follows its URL's scheme when the URL names none; explicit ports win over derived ones.
    for url, expected in (("https://orch.internal/pause", 443), ("http://orch.internal/pause", 80)):
        values = network_values(enforcement={"webhook": {"url": url, "secret": "s"}})
        policy = render_values(helm, tmp_path, "webhook", values).one("NetworkPolicy")
        validate_strict(policy)
        assert policy_ports(policy["spec"]["egress"][1]) == [(expected, "TCP")], url
    values = network_values(enforcement={"webhook": {"url": "https://orch.internal/pause", "secret": "s"}})
    values["networkPolicy"]["egress"]["kafka"]["ports"] = [9096]
    values["networkPolicy"]["egress"]["webhook"]["ports"] = [8080, 8443]
    values["networkPolicy"]["egress"]["dns"] = {"enabled": False}
    values["networkPolicy"]["egress"]["extra"] = []
    values["networkPolicy"]["ingress"]["from"] = []
    policy = render_values(helm, tmp_path, "explicit", values).one("NetworkPolicy")
    validate_strict(policy)
    spec = policy["spec"]
    assert spec["ingress"] == [{"ports": [{"port": 9500, "protocol": "TCP"}]}]  # any source, still only that port
    assert [policy_ports(rule) for rule in spec["egress"]] == [[(9096, "TCP")], [(8080, "TCP"), (8443, "TCP")]]


def test_network_policy_refuses_a_webhook_url_whose_port_it_cannot_tell(helm: str, tmp_path: Path) -> None:
    values = network_values(enforcement={"webhook": {"url": "${WEBHOOK_URL}", "secret": "s"}})
    values["extraEnv"] = [{"name": "WEBHOOK_URL", "value": "https://orch.internal/pause"}]
    path = tmp_path / "unknown-port.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = run_helm(helm, *template_args([path]), check=False)
    assert proc.returncode != 0
    assert "set networkPolicy.egress.webhook.ports" in proc.stderr, proc.stderr
    values["networkPolicy"]["egress"]["webhook"]["ports"] = [443]
    path.write_text(yaml.safe_dump(values))
    policy = render(helm, [path], "unknown-port").one("NetworkPolicy")
    assert policy_ports(policy["spec"]["egress"][1]) == [(443, "TCP")]
