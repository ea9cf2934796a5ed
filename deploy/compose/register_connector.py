"""One-shot of the docker compose stack: register the Debezium connector that ``writeguard connector-config`` renders.

Runs in the writeguard image (``python /opt/writeguard/register_connector.py``), after PostgreSQL and Kafka Connect
report healthy:

1. creates the config's CDC topics (one per table, ``--partitions``) if missing, so that the worker, which starts
   next, subscribes to topics that exist even before the first change has been captured;
2. renders the connector with ``writeguard connector-config -c CONFIG``;
3. waits until Kafka Connect's REST API answers, then ``PUT /connectors/NAME/config`` (create or update: running the
   stack again is safe), retrying while Connect is still joining its group (409) or unreachable;
4. waits until the connector and its task are RUNNING; exits non-zero with Connect's trace if one FAILED.

Only the standard library speaks HTTP here (the image has no curl). Exit status 0 lets the worker start
(``depends_on: condition: service_completed_successfully``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

DEFAULT_CONFIG = "/etc/writeguard/writeguard.yaml"
DEFAULT_CONNECT_URL = "http://connect:8083"


class RegistrationError(RuntimeError):
    """Kafka Connect refused the connector, or it did not reach RUNNING in time."""


def say(msg: str) -> None:
    print(f"register-connector: {msg}", flush=True)


def render(config_path: str, writeguard: Sequence[str] = ("writeguard",)) -> dict[str, Any]:
    """``{"name": ..., "config": {...}}`` exactly as ``writeguard connector-config -c CONFIG`` prints it."""
    out = subprocess.run(
        [*writeguard, "connector-config", "-c", config_path], check=True, capture_output=True, text=True
    ).stdout
    body = json.loads(out)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("config"), dict):
        raise RegistrationError(f"unexpected output of writeguard connector-config: {out[:500]}")
    return body


def request(method: str, url: str, body: Mapping[str, Any] | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """(status, parsed JSON or text); HTTP errors are returned as their status, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(  # noqa: S310 - the URL is the stack's own Kafka Connect, http:// by config
        url, data=data, method=method, headers={"Content-Type": "application/json", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - see above
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def _message(payload: Any) -> str:
    if isinstance(payload, dict) and "message" in payload:
        return str(payload["message"])
    return str(payload)[:2000]


def wait_for_connect(url: str, deadline: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Until ``GET /connectors`` answers 200: the worker has started and joined its group."""
    last = "no answer yet"
    while True:
        try:
            status, payload = request("GET", f"{url}/connectors")
            if status == 200:
                return
            last = f"HTTP {status}: {_message(payload)}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise RegistrationError(f"Kafka Connect at {url} not ready: {last}")
        sleep(2.0)


def validation_errors(url: str, name: str, config: Mapping[str, str]) -> list[str]:
    """``key: error`` lines from Connect's validate endpoint (a rejected PUT may only say 500)."""
    plugin = urllib.parse.quote(str(config.get("connector.class", "")), safe="")
    try:
        status, payload = request("PUT", f"{url}/connector-plugins/{plugin}/config/validate", {**config, "name": name})
    except (urllib.error.URLError, OSError):
        return []
    if status != 200 or not isinstance(payload, dict):
        return []
    errors: list[str] = []
    for item in payload.get("configs") or []:
        value = item.get("value") or {}
        errors.extend(f"{value.get('name')}: {e}" for e in value.get("errors") or [])
    return errors


def put_connector(
    url: str, name: str, config: Mapping[str, str], deadline: float, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Create or update the connector; retry while Connect rebalances (409) or is briefly unreachable."""
    path = f"{url}/connectors/{urllib.parse.quote(name, safe='')}/config"
    body = {str(k): str(v) for k, v in config.items()}
    while True:
        try:
            status, payload = request("PUT", path, body, timeout=60.0)
        except (urllib.error.URLError, OSError) as e:
            status, payload = 0, str(e)
        if status in (200, 201):
            say(f"connector {name} {'created' if status == 201 else 'updated'}")
            return
        if status in (400, 500):
            errors = validation_errors(url, name, body)
            if errors or status == 400:
                raise RegistrationError(
                    f"Kafka Connect rejected connector {name}: {_message(payload)}"
                    + ("".join(f"\n  {e}" for e in errors))
                )
        if time.monotonic() > deadline:
            raise RegistrationError(f"could not register connector {name}: HTTP {status}: {_message(payload)}")
        say(f"PUT {name}: HTTP {status} ({_message(payload)[:200]}); retrying")
        sleep(2.0)


def wait_running(url: str, name: str, deadline: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Until the connector and every task are RUNNING; a FAILED one ends the wait with its trace."""
    path = f"{url}/connectors/{urllib.parse.quote(name, safe='')}/status"
    last: Any = None
    while True:
        try:
            status, last = request("GET", path)
        except (urllib.error.URLError, OSError) as e:
            status, last = 0, str(e)
        if status == 200 and isinstance(last, dict):
            parts = [("connector", last.get("connector") or {})] + [
                (f"task {t.get('id')}", t) for t in last.get("tasks") or []
            ]
            for what, part in parts:
                if part.get("state") == "FAILED":
                    raise RegistrationError(f"connector {name}: {what} FAILED:\n{part.get('trace') or '(no trace)'}")
            if len(parts) > 1 and all(p.get("state") == "RUNNING" for _, p in parts):
                say(f"connector {name} and its {len(parts) - 1} task(s) RUNNING")
                return
        if time.monotonic() > deadline:
            raise RegistrationError(f"connector {name} not RUNNING in time; last status: {last}")
        sleep(1.0)


def create_cdc_topics(config_path: str, partitions: int, timeout: float = 30.0) -> list[str]:
    """Create each table's CDC topic if missing (replication factor 1: the stack has one broker)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from stream.config import client_settings, load_config

    cfg = load_config(config_path)
    admin = AdminClient(client_settings(cfg))
    existing = admin.list_topics(timeout=timeout).topics
    todo = [NewTopic(t.topic, partitions, 1) for t in cfg.tables if t.topic not in existing]
    created: list[str] = []
    for topic, fut in admin.create_topics(todo, request_timeout=timeout).items() if todo else []:
        try:
            fut.result()
            created.append(topic)
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise RegistrationError(f"cannot create topic {topic}: {e}") from None
    return created


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--config", "-c", default=os.environ.get("WRITEGUARD_CONFIG", DEFAULT_CONFIG))
    p.add_argument("--connect-url", default=os.environ.get("CONNECT_URL", DEFAULT_CONNECT_URL))
    p.add_argument("--partitions", type=int, default=3, help="partitions of the CDC topics created (3)")
    p.add_argument("--no-create-topics", action="store_true", help="leave topic creation to Debezium / the broker")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds for the whole registration (180)")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    url = args.connect_url.rstrip("/")
    try:
        if not args.no_create_topics:
            created = create_cdc_topics(args.config, args.partitions)
            say(f"CDC topics created: {', '.join(created)}" if created else "CDC topics already exist")
        body = render(args.config)
        wait_for_connect(url, deadline)
        put_connector(url, body["name"], body["config"], deadline)
        wait_running(url, body["name"], deadline)
    except subprocess.CalledProcessError as e:
        print(f"register-connector: writeguard connector-config failed:\n{e.stderr}", file=sys.stderr)
        return 1
    except RegistrationError as e:
        print(f"register-connector: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
