"""docker-compose.yml and what it mounts, checked without a Docker engine.

The file is validated against the Compose specification's JSON Schema (check-jsonschema's vendored copy,
``--builtin-schema vendor.compose-spec``); the rest are the stack's own invariants: pinned images, start order,
mounted files that exist, a writeguard config that loads, and the one-shot that registers the connector, run
against a fake Kafka Connect on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType
from typing import Any

import pytest
import yaml

from stream.config import load_config
from testbed.stack import SHOP_DDL
from tests.deploy.conftest import COMPOSE, COMPOSE_CONFIG, ROOT, env_refs

CONTAINER_CONFIG = "/etc/writeguard/writeguard.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_matches_the_compose_spec() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 and "No module named check_jsonschema" in proc.stderr:
        pytest.skip("check-jsonschema is in the dev extra: pip install -e '.[dev]'")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok -- validation done" in proc.stdout


def test_the_full_stack_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "kafka",
        "postgres",
        "connect",
        "register-connector",
        "writeguard",
        "prometheus",
        "grafana",
    }


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {image} has no tag"
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?(\.Final)?", tag), f"{name}: {image} is not pinned to an exact version"
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:16.")
    assert services["connect"]["image"].startswith("quay.io/debezium/connect:")


def test_kafka_and_debezium_match_the_versions_the_tests_run() -> None:
    """The compose images run the Kafka and Debezium versions that testbed/maven pins for the native tests."""
    compose_text = COMPOSE.read_text()
    kafka_pom = (ROOT / "testbed" / "maven" / "kafka" / "pom.xml").read_text()
    connect_pom = (ROOT / "testbed" / "maven" / "connect" / "pom.xml").read_text()
    kafka = re.search(r"<artifactId>kafka_2\.13</artifactId>\s*<version>([^<]+)</version>", kafka_pom)
    debezium = re.search(
        r"<artifactId>debezium-connector-postgres</artifactId>\s*<version>([^<]+)</version>", connect_pom
    )
    assert kafka and debezium
    assert f"apache/kafka:{kafka.group(1)}" in compose_text
    assert f"quay.io/debezium/connect:{debezium.group(1)}" in compose_text


def test_services_start_in_order(compose: dict[str, Any]) -> None:
    s = compose["services"]

    def deps(name: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in s[name].get("depends_on", {}).items()}

    assert deps("connect") == {"kafka": "service_healthy", "postgres": "service_healthy"}
    assert deps("register-connector") == {"connect": "service_healthy"}
    assert deps("writeguard") == {"kafka": "service_healthy", "register-connector": "service_completed_successfully"}
    assert deps("grafana") == {"prometheus": "service_healthy"}
    # Every service waited on as healthy has a health check of its own.
    for name in s:
        for dep, cond in deps(name).items():
            if cond == "service_healthy":
                assert "test" in s[dep].get("healthcheck", {}), (
                    f"{name} waits for {dep} to be healthy, which has no check"
                )
    assert s["register-connector"]["restart"] == "no"
    assert s["postgres"]["command"][:3] == ["postgres", "-c", "wal_level=logical"]


def test_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_writeguard_services_run_the_compose_config(compose: dict[str, Any], dummy_env: Any) -> None:
    s = compose["services"]
    for name in ("writeguard", "register-connector"):
        svc = s[name]
        assert f"./deploy/compose/writeguard.yaml:{CONTAINER_CONFIG}:ro" in svc["volumes"]
        args = svc["command"]
        assert args[args.index("--config") + 1] == CONTAINER_CONFIG
        assert svc["image"] == s["writeguard"]["image"]
        # Every ${VAR} of the config is in the container's environment.
        refs = env_refs(yaml.safe_load(COMPOSE_CONFIG.read_text()))
        assert refs <= set(svc.get("environment", {})), f"{name} lacks {refs - set(svc.get('environment', {}))}"
    assert s["writeguard"]["command"][0] == "worker"
    refs = env_refs(yaml.safe_load(COMPOSE_CONFIG.read_text()))
    dummy_env(refs)
    cfg = load_config(COMPOSE_CONFIG)
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.debezium is not None and cfg.debezium.database.hostname == "postgres"
    assert cfg.enforcement.postgres is not None and "host=postgres" in cfg.enforcement.postgres.dsn.get_secret_value()
    # The ports compose publishes and Prometheus scrapes are the config's.
    port = cfg.worker.metrics.port
    assert f"127.0.0.1:{port}:{port}" in s["writeguard"]["ports"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in prom["scrape_configs"]
        if job["job_name"] == "writeguard"
        for t in job["static_configs"][0]["targets"]
    ]
    assert targets == [f"writeguard:{port}"]
    rule_files = prom["rule_files"]
    mounted = [v.split(":")[1] for v in s["prometheus"]["volumes"]]
    assert all(f in mounted for f in rule_files)
    # Debezium connects to the compose postgres with the password postgres was initialised with.
    pg_env = s["postgres"]["environment"]
    assert pg_env["POSTGRES_DB"] == cfg.debezium.database.dbname
    assert pg_env["POSTGRES_PASSWORD"] == s["writeguard"]["environment"]["PG_ADMIN_PASSWORD"]


def test_kafka_advertises_the_listener_the_config_uses(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert compose["services"]["connect"]["environment"]["BOOTSTRAP_SERVERS"] == "kafka:9092"


# -- exposure: what the stack publishes on the host, and with which credentials ---------------------------------------


@dataclass(frozen=True)
class Published:
    """One ``ports`` entry: the host address it binds (None: every interface), the host and the container port."""

    host_ip: str | None
    published: str | None
    target: str


def parse_port(entry: Any) -> Published:
    """A ``ports`` entry in the short ("[IP:][HOST:]CONTAINER[/PROTO]", or a bare number) or the long syntax."""
    if isinstance(entry, dict):
        published = entry.get("published")
        return Published(entry.get("host_ip"), None if published is None else str(published), str(entry["target"]))
    if isinstance(entry, int):
        return Published(None, None, str(entry))  # a container port on a random host port, every interface
    assert isinstance(entry, str), f"unexpected ports entry {entry!r}"
    spec = entry.split("/", 1)[0]
    host_ip: str | None = None
    if spec.startswith("["):  # [::1]:8080:80
        host_ip, _, spec = spec[1:].partition("]:")
    parts = spec.split(":")
    if host_ip is None and len(parts) > 3:  # an unbracketed IPv6 address: ::1:8080:80
        host_ip, parts = ":".join(parts[:-2]), parts[-2:]
    elif host_ip is None and len(parts) == 3:
        host_ip, parts = parts[0], parts[1:]
    if len(parts) == 1:
        return Published(host_ip, None, parts[0])
    return Published(host_ip, parts[0], parts[1])


def exposed_beyond_loopback(compose: dict[str, Any]) -> list[str]:
    """Every way a service reaches the host's other interfaces: a port not bound to 127.0.0.1, or host networking."""
    found = []
    for name, svc in compose["services"].items():
        if svc.get("network_mode") == "host":
            found.append(f"{name}: network_mode host")
        for entry in svc.get("ports", []):
            if parse_port(entry).host_ip != "127.0.0.1":
                found.append(f"{name}: {entry!r}")
    return found


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("9092", Published(None, None, "9092")),
        (9092, Published(None, None, "9092")),
        ("29092:9092", Published(None, "29092", "9092")),
        ("0.0.0.0:9092:9092", Published("0.0.0.0", "9092", "9092")),
        ("127.0.0.1:9092:9092/tcp", Published("127.0.0.1", "9092", "9092")),
        ("127.0.0.1::9092", Published("127.0.0.1", "", "9092")),
        ("127.0.0.1:9000-9010:9000-9010", Published("127.0.0.1", "9000-9010", "9000-9010")),
        ("[::1]:8080:80", Published("::1", "8080", "80")),
        ("::1:8080:80", Published("::1", "8080", "80")),
        ({"target": 80, "published": 8080}, Published(None, "8080", "80")),
        (
            {"target": 80, "published": "8080", "host_ip": "127.0.0.1", "protocol": "tcp"},
            Published("127.0.0.1", "8080", "80"),
        ),
    ],
)
def test_parse_port_reads_short_and_long_syntax(entry: Any, expected: Published) -> None:
    assert parse_port(entry) == expected


def test_the_loopback_check_flags_every_wider_binding() -> None:
    """The check below is not a no-op: each of these would publish on every interface (or a public one)."""
    wide = ["9092", 9092, "9092:9092", "0.0.0.0:9092:9092", "[::]:9092:9092", {"target": 9092, "published": 9092}]
    wide += [{"target": 9092, "host_ip": "0.0.0.0"}, "192.168.1.10:9092:9092", "localhost:9092:9092"]
    for entry in wide:
        assert exposed_beyond_loopback({"services": {"s": {"ports": [entry]}}}) == [f"s: {entry!r}"], entry
    assert exposed_beyond_loopback({"services": {"s": {"network_mode": "host"}}}) == ["s: network_mode host"]
    ok = {"services": {"s": {"ports": ["127.0.0.1:9092:9092", {"target": 1, "published": 1, "host_ip": "127.0.0.1"}]}}}
    assert exposed_beyond_loopback(ok) == []


def test_every_published_port_is_bound_to_loopback(compose: dict[str, Any]) -> None:
    assert exposed_beyond_loopback(compose) == []
    # ... and these are the ports the README's table lists, each on the same port number as in the container.
    published = {name: [parse_port(e) for e in svc.get("ports", [])] for name, svc in compose["services"].items()}
    assert {name: [(p.published, p.target) for p in ports] for name, ports in published.items() if ports} == {
        "kafka": [("29092", "29092")],
        "postgres": [("5432", "5432")],
        "connect": [("8083", "8083")],
        "writeguard": [("9464", "9464")],
        "prometheus": [("9090", "9090")],
        "grafana": [("3000", "3000")],
    }
    # Kafka hands host clients the address its host listener is published on.
    listeners = compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "HOST://127.0.0.1:29092" in listeners


def _args(svc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("entrypoint", "command"):
        value = svc.get(key) or []
        out += value.split() if isinstance(value, str) else [str(v) for v in value]
    return out


def test_prometheus_runs_without_its_lifecycle_or_admin_api(compose: dict[str, Any]) -> None:
    prometheus = _args(compose["services"]["prometheus"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus  # the flags are where this looks
    for name, svc in compose["services"].items():
        for flag in ("--web.enable-lifecycle", "--web.enable-admin-api"):
            assert not [a for a in _args(svc) if a.split("=", 1)[0] == flag], f"{name} runs with {flag}"


REQUIRED_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}")


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_no_password_has_a_default(compose: dict[str, Any]) -> None:
    """Every password compose passes is a required variable (``${VAR:?message}``: unset or empty refuses to start),
    never a literal or a ``${VAR:-default}`` that every copy of this file would share."""
    passwords = {
        (name, key): value
        for name, svc in compose["services"].items()
        for key, value in _environment(svc).items()
        if "PASSWORD" in key.upper() or "SECRET" in key.upper()
    }
    assert set(passwords) == {
        ("postgres", "POSTGRES_PASSWORD"),
        ("register-connector", "PG_ADMIN_PASSWORD"),
        ("writeguard", "PG_ADMIN_PASSWORD"),
        ("grafana", "GF_SECURITY_ADMIN_PASSWORD"),
    }
    for (name, key), value in passwords.items():
        assert REQUIRED_VAR.fullmatch(value), f"{name}: {key}={value!r} is not a required ${{VAR:?...}}"
    # The superuser password PostgreSQL is initialised with is the one the worker and Debezium log in with.
    superuser = REQUIRED_VAR.fullmatch(passwords[("postgres", "POSTGRES_PASSWORD")])
    assert superuser is not None and superuser.group(1) == "PG_ADMIN_PASSWORD"
    # The pattern refuses the forms that would fall back to a shared value.
    for weak in (
        "writeguard-local",
        "${PG_ADMIN_PASSWORD:-writeguard-local}",
        "${PG_ADMIN_PASSWORD-x}",
        "${PG_ADMIN_PASSWORD}",
    ):
        assert not REQUIRED_VAR.fullmatch(weak), weak
    # No other literal password anywhere in the file (e.g. in a command or a healthcheck).
    assert "writeguard-local" not in COMPOSE.read_text()


def _normalise_sql(text: str) -> list[str]:
    text = re.sub(r"--[^\n]*", "", text)
    return [" ".join(stmt.split()) for stmt in text.split(";") if stmt.strip()]


def test_init_sql_creates_the_shop_tables_of_the_stack(dummy_env: Any) -> None:
    statements = _normalise_sql((ROOT / "deploy" / "compose" / "init.sql").read_text())
    shop = _normalise_sql(SHOP_DDL)
    assert statements[: len(shop)] == shop
    # The compose agents' roles fit the config's role pattern.
    roles = re.findall(r"CREATE ROLE (\w+)", " ".join(statements))
    dummy_env(env_refs(yaml.safe_load(COMPOSE_CONFIG.read_text())))
    cfg = load_config(COMPOSE_CONFIG)
    assert cfg.enforcement.postgres is not None
    pattern = re.compile(cfg.enforcement.postgres.roles.pattern)
    assert roles and all(pattern.fullmatch(r) for r in roles)


# -- the one-shot that registers the connector ----------------------------------------------------------------------


def _load_register() -> ModuleType:
    path = ROOT / "deploy" / "compose" / "register_connector.py"
    spec = importlib.util.spec_from_file_location("register_connector", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeConnect:
    """A scripted Kafka Connect REST API: GET /connectors, PUT .../config, GET .../status."""

    def __init__(self, connectors: list[int], put: list[tuple[int, Any]], status: list[dict[str, Any]]) -> None:
        self.connectors, self.put, self.status = connectors, put, status
        self.requests: list[tuple[str, str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, None))
                if self.path == "/connectors":
                    code = fake.connectors.pop(0) if len(fake.connectors) > 1 else fake.connectors[0]
                    self._reply(code, [] if code == 200 else {"message": "starting"})
                elif self.path.endswith("/status"):
                    self._reply(200, fake.status.pop(0) if len(fake.status) > 1 else fake.status[0])
                else:
                    self._reply(404, {"message": "no"})

            def do_PUT(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("PUT", self.path, body))
                if "/config/validate" in self.path:
                    self._reply(200, {"configs": [{"value": {"name": "database.hostname", "errors": ["unreachable"]}}]})
                    return
                code, reply = fake.put.pop(0) if len(fake.put) > 1 else fake.put[0]
                self._reply(code, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeConnect:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


RUNNING = {"connector": {"state": "RUNNING"}, "tasks": [{"id": 0, "state": "RUNNING"}]}


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("PG_ADMIN_PASSWORD", "dummy-pg")
    monkeypatch.setenv("WRITEGUARD_CONTROL_KEY", "dummy-control-key-of-32-characters-or-more")
    yield _load_register()


def test_register_renders_waits_puts_and_waits_for_running(register: ModuleType) -> None:
    body = register.render(str(COMPOSE_CONFIG), (sys.executable, "-m", "stream.cli"))
    assert body == json.loads(json.dumps(load_config(COMPOSE_CONFIG).connector_config()))
    starting = {"connector": {"state": "UNASSIGNED"}, "tasks": []}
    with FakeConnect(
        connectors=[503, 503, 200], put=[(409, {"message": "rebalance"}), (201, {})], status=[starting, RUNNING]
    ) as fake:
        register.wait_for_connect(fake.url, deadline=float("inf"), sleep=lambda _s: None)
        register.put_connector(fake.url, body["name"], body["config"], deadline=float("inf"), sleep=lambda _s: None)
        register.wait_running(fake.url, body["name"], deadline=float("inf"), sleep=lambda _s: None)
    puts = [r for r in fake.requests if r[0] == "PUT"]
    assert [p[1] for p in puts] == ["/connectors/writeguard-postgres/config"] * 2
    assert puts[-1][2] == body["config"]
    assert puts[-1][2]["database.hostname"] == "postgres" and puts[-1][2]["database.password"] == "dummy-pg"
    assert [r[1] for r in fake.requests if r[0] == "GET"].count("/connectors") == 3


def test_register_main_exits_1_with_connects_errors(register: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    register.render = lambda path: {"name": "wg", "config": {"connector.class": "x.Y"}}
    with FakeConnect(
        connectors=[200], put=[(400, {"message": "Connector configuration is invalid"})], status=[RUNNING]
    ) as fake:
        code = register.main(["--no-create-topics", "--connect-url", fake.url, "--timeout", "5"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Connector configuration is invalid" in err and "database.hostname: unreachable" in err


def test_register_reports_a_failed_task(register: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    register.render = lambda path: {"name": "wg", "config": {"connector.class": "x.Y"}}
    failed = {
        "connector": {"state": "RUNNING"},
        "tasks": [{"id": 0, "state": "FAILED", "trace": "PSQLException: boom"}],
    }
    with FakeConnect(connectors=[200], put=[(200, {})], status=[failed]) as fake:
        code = register.main(["--no-create-topics", "--connect-url", fake.url, "--timeout", "5"])
    assert code == 1
    assert "task 0 FAILED" in capsys.readouterr().err


def test_register_main_succeeds(register: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    register.render = lambda path: {"name": "wg", "config": {"connector.class": "x.Y"}}
    with FakeConnect(connectors=[200], put=[(201, {})], status=[RUNNING]) as fake:
        assert register.main(["--no-create-topics", "--connect-url", fake.url + "/", "--timeout", "5"]) == 0
    assert "RUNNING" in capsys.readouterr().out
