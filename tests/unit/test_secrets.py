"""Secrets in the config stay out of repr, str, logs and JSON, and still reach the clients that need them.

Every secret the config can hold is set to a distinct value; each test then looks for every one of them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

import psycopg
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import AuthProtocol, SASLMechanism

from connectors.debezium_connector import DebeziumDatabase
from connectors.pg_enforce import EnforcementError, PostgresEnforcer, RoleMapping, connect_error_text
from connectors.webhook import verify_headers
from detectors.masking import MASK, ClientProperties, HttpHeaders
from stream.app import _credentials
from stream.config import Config, client_settings, parse_config
from stream.enforce import postgres_enforcer
from testbed.stack import example_config
from tests.unit.test_webhook import deliver_once

SECRETS = {
    "dsn": "pg-dsn-pw-7f3a",
    "sasl": "sasl-pw-91bc",
    "key": "ssl-key-pw-44de",
    "oauth": "oauth-client-secret-0a1b",
    "jaas": "jaas-pw-5c5c",
    "debezium": "debezium-pw-e2e2",
    "debezium_extra": "debezium-ssl-pw-3131",
    "webhook": "webhook-hmac-secret-8888",
    "bearer": "bearer-token-6d6d",
    "api_key": "api-key-2b2b",
    "control": "control-signing-key-0123456789abcdef",
}


def config_data(**secrets: str) -> dict[str, Any]:
    s = {**SECRETS, **secrets}
    data = example_config("127.0.0.1:9", "secrets")
    data["kafka"]["client"] = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "writeguard",
        "sasl.password": s["sasl"],
        "ssl.key.password": s["key"],
        "sasl.oauthbearer.client.secret": s["oauth"],
        "sasl.jaas.config": f'org.apache.kafka.common.security.plain.PlainLoginModule password="{s["jaas"]}";',
    }
    data["debezium"] = {
        "topic.prefix": "secrets",
        "database": {"hostname": "db", "user": "cdc", "password": s["debezium"], "dbname": "shop"},
        "extra": {"database.sslpassword": s["debezium_extra"], "heartbeat.interval.ms": "1000"},
    }
    data["enforcement"] = {
        "postgres": {
            "dsn": f"host=127.0.0.1 port=9 dbname=shop user=enforcer password={s['dsn']}",
            "roles": {"template": "agent_{agent_id}"},
        },
        "webhook": {
            "url": "https://orchestrator.example/pause",
            "secret": s["webhook"],
            "headers": {"Authorization": f"Bearer {s['bearer']}", "X-Api-Key": s["api_key"], "X-Team": "shop"},
        },
    }
    data["control"] = {"signing_key": s["control"]}
    return data


def config() -> Config:
    return parse_config(config_data())


def leaked(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


def test_the_config_sets_every_secret() -> None:
    """The other tests are only as good as this: each secret is in the config, where the clients read it."""
    cfg = config()
    pg, wh = cfg.enforcement.postgres, cfg.enforcement.webhook
    assert pg is not None and wh is not None and cfg.debezium is not None and cfg.control is not None
    seen = " ".join(
        [
            pg.dsn.get_secret_value(),
            *map(str, client_settings(cfg).values()),
            cfg.debezium.database.password.get_secret_value(),
            *cfg.debezium.extra.values(),
            wh.secret.get_secret_value(),
            *wh.headers.values(),
            cfg.control.signing_key.get_secret_value(),
        ]
    )
    assert leaked(seen) == list(SECRETS)


def test_repr_str_and_json_of_the_config_hold_no_secret() -> None:
    cfg = config()
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), cfg.model_dump_json(by_alias=True)):
        assert leaked(text) == [], text
        assert MASK in text
    # Each section on its own too: that is what a log line or an error message would print.
    assert cfg.enforcement.postgres is not None and cfg.debezium is not None
    for part in (cfg.kafka, cfg.kafka.client, cfg.enforcement, cfg.debezium, cfg.debezium.database, cfg.control):
        assert leaked(repr(part)) == [] and leaked(str(part)) == [] and leaked(f"{part}") == [], part
    # What is not secret is still shown, so the repr stays useful.
    assert "'sasl.username': 'writeguard'" in repr(cfg.kafka.client) and "'X-Team': 'shop'" in repr(cfg)


def test_logging_the_config_holds_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config()
    with caplog.at_level(logging.INFO, logger="writeguard.test"):
        logging.getLogger("writeguard.test").info("config %s / %r / client %s", cfg, cfg, cfg.kafka.client)
    assert caplog.text.count(MASK) >= 3 and leaked(caplog.text) == []


def test_secret_looking_keys_are_masked_by_name() -> None:
    props = ClientProperties(
        {
            "ssl.keystore.password": "a",
            "ssl.key.pem": "b",
            "sasl.oauthbearer.config": "c",
            "sasl.oauthbearer.assertion.private.key.passphrase": "d",
            "ssl.ca.location": "/ca.pem",
            "sasl.username": "wg",
        }
    )
    assert props.masked() == {
        **dict.fromkeys(list(props)[:4], MASK),
        "ssl.ca.location": "/ca.pem",
        "sasl.username": "wg",
    }
    headers = HttpHeaders({"authorization": "x", "Proxy-Authorization": "y", "Cookie": "z", "X-Request-Source": "wg"})
    assert headers.masked() == {
        "authorization": MASK,
        "Proxy-Authorization": MASK,
        "Cookie": MASK,
        "X-Request-Source": "wg",
    }


def test_kafka_client_secrets_reach_confluent_kafka_and_faust_unmasked() -> None:
    cfg = config()
    settings = client_settings(cfg)
    assert settings["sasl.password"] == SECRETS["sasl"] and settings["ssl.key.password"] == SECRETS["key"]
    assert settings["sasl.oauthbearer.client.secret"] == SECRETS["oauth"]
    assert type(settings) is dict  # a plain dict of real values, as confluent-kafka takes it

    creds = _credentials(cfg.kafka.client)
    assert (creds.username, creds.password) == ("writeguard", SECRETS["sasl"])
    assert creds.mechanism is SASLMechanism.PLAIN and creds.protocol is AuthProtocol.SASL_PLAINTEXT
    assert credentials_to_aiokafka_auth(creds)["sasl_plain_password"] == SECRETS["sasl"]
    assert SECRETS["sasl"] not in repr(creds)


def test_the_debezium_password_is_rendered_as_it_is() -> None:
    body = config().connector_config()["config"]
    assert body["database.password"] == SECRETS["debezium"]
    assert body["database.sslpassword"] == SECRETS["debezium_extra"]
    # A Connect config-provider reference passes through untouched: Connect resolves it on its own host.
    ref = "${file:/etc/kafka/secrets.properties:pg.password}"
    body = parse_config(config_data(debezium=ref)).connector_config()["config"]
    assert body["database.password"] == ref
    db = DebeziumDatabase(hostname="db", user="cdc", password=ref, dbname="shop")
    assert ref not in repr(db) and db.password.get_secret_value() == ref


def test_the_enforcement_dsn_reaches_psycopg() -> None:
    enforcer = postgres_enforcer(config())
    assert isinstance(enforcer, PostgresEnforcer)
    with pytest.raises(EnforcementError) as e:  # port 9 refuses: what matters is the DSN psycopg was given
        enforcer.quarantine("bot")
    # The connection failed on the address from the DSN, so the DSN reached libpq; its password did not reach
    # the error.
    assert "127.0.0.1" in str(e.value) and "port 9" in str(e.value), e.value
    assert leaked(str(e.value)) == []


def test_the_webhook_secret_and_bearer_reach_the_request() -> None:
    """The fake receiver sees the real Authorization header, and the HMAC verifies with the real secret."""
    wh = config().enforcement.webhook
    assert wh is not None
    results, headers, body = deliver_once(wh, "a1:webhook", {"agent_id": "bot"})
    assert [r.delivered for r in results] == [True]
    assert headers["Authorization"] == f"Bearer {SECRETS['bearer']}" and headers["X-Api-Key"] == SECRETS["api_key"]
    secret = SECRETS["webhook"].encode()
    assert verify_headers(secret, headers, body)
    expected = hmac.new(secret, f"{headers['X-Writeguard-Timestamp']}.a1:webhook.".encode() + body, hashlib.sha256)
    assert headers["X-Writeguard-Signature"] == "sha256=" + expected.hexdigest()
    assert not verify_headers(MASK.encode(), headers, body)  # signed with the value, not with its mask


@pytest.mark.parametrize(
    ("dsn", "libpq_echoes_it"),
    [
        ("host=127.0.0.1 password=hunter2 sekrit", True),  # libpq: missing "=" after "sekrit"
        ("postgresql://enforcer:hunter2%zzsekrit@127.0.0.1/shop", True),  # libpq: invalid percent-encoded token
        ("postgresql://enforcer:hunter2 sekrit@[127.0.0.1/shop", True),  # libpq: unexpected spaces found in "..."
        ("host=127.0.0.1 password='hunter2 sekrit", False),  # unterminated quoted string
        ("host=127.0.0.1 password=hunter2sekrit bogus=1", False),  # invalid connection option
    ],
)
def test_a_malformed_dsn_gives_an_enforcement_error_without_the_password(dsn: str, libpq_echoes_it: bool) -> None:
    with pytest.raises(psycopg.Error) as raw:
        psycopg.connect(dsn, connect_timeout=2)
    # Where libpq itself quotes the password, the scrubbing is what keeps it out.
    assert ("sekrit" in str(raw.value)) is libpq_echoes_it, raw.value
    with PostgresEnforcer(dsn, RoleMapping(template="agent_{agent_id}"), ["public.refunds"]) as enforcer:
        with pytest.raises(EnforcementError) as e:
            enforcer.quarantine("bot")
    text = str(e.value)
    assert "cannot connect to PostgreSQL for enforcement" in text and e.value.retryable
    assert "hunter2" not in text and "sekrit" not in text, text
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no traceback that quotes libpq's text


def test_a_parsable_dsn_keeps_libpq_s_reason_but_not_the_password() -> None:
    dsn = "host=127.0.0.1 port=9 password=p%40ss@word"

    class Echo(psycopg.OperationalError):
        pass

    # A message that quotes the password, raw and percent-encoded, as a server or libpq might.
    text = connect_error_text(Echo("refused for p%40ss@word (p%2540ss%40word)"), dsn)
    assert text == f"refused for {MASK} ({MASK})", text
