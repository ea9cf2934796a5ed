"""`writeguard connector-config`: the Debezium connector JSON rendered from our config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stream.config import EXAMPLE_CONFIG, ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = EXAMPLE_CONFIG


def config(**debezium: object) -> dict[str, object]:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["debezium"] = {
        "topic.prefix": "shop",
        "database": {
            "hostname": "db.internal",
            "port": 5433,
            "user": "cdc",
            "password": "${env:PG_PW}",
            "dbname": "shop",
        },
        **debezium,
    }
    return data


def test_renders_the_debezium_postgres_connector_for_the_configured_tables() -> None:
    body = parse_config(config()).connector_config()
    c = body["config"]
    assert body["name"] == "writeguard-postgres"
    assert c["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert c["plugin.name"] == "pgoutput" and c["topic.prefix"] == "shop"
    assert c["table.include.list"].split(",") == ["public.refunds", "public.orders"]
    assert c["slot.name"] == "writeguard" and c["publication.name"] == "writeguard"
    assert c["publication.autocreate.mode"] == "filtered" and c["snapshot.mode"] == "no_data"
    assert c["value.converter"] == "org.apache.kafka.connect.json.JsonConverter"
    assert c["value.converter.schemas.enable"] == "false"
    assert c["decimal.handling.mode"] == "double"
    assert c["database.hostname"] == "db.internal" and c["database.port"] == "5433"
    # Kafka Connect's own config providers pass through untouched, so the secret never lands in the JSON.
    assert c["database.password"] == "${env:PG_PW}"
    assert "message.key.columns" not in c


def test_key_by_agent_keys_every_table_by_its_agent_column() -> None:
    c = parse_config(config(key_by_agent=True)).connector_config()["config"]
    assert c["message.key.columns"] == "public.refunds:agent_id;public.orders:agent_id"


def test_key_by_agent_needs_a_plain_column() -> None:
    data = config(key_by_agent=True)
    data["tables"][0]["agent_id"] = "after.meta.agent"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"tables\.0\.agent_id"):
        parse_config(data).connector_config()


def test_topics_must_be_what_debezium_writes() -> None:
    data = config(**{"topic.prefix": "other"})
    with pytest.raises(ConfigError, match=r"Debezium writes public\.refunds to 'other\.public\.refunds'"):
        parse_config(data)


def test_the_command_prints_json_and_refuses_a_config_without_debezium(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config()))
    out = subprocess.run(
        [sys.executable, "-m", "stream.cli", "connector-config", "-c", str(good)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["config"]["topic.prefix"] == "shop"
    bad = subprocess.run(
        [sys.executable, "-m", "stream.cli", "connector-config", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert bad.returncode == 2 and "debezium" in bad.stderr
