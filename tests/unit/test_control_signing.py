"""Signed control records: what the worker, `writeguard release` and orchestrators accept, and what release restores.

The same checks run on the real broker and PostgreSQL in tests/integration/test_control_auth.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from connectors.messages import (
    CONTROL_SIGNATURE_HEADER,
    ControlRecord,
    ControlRejected,
    EnforcementResult,
    sign_control,
    verify_control,
)
from connectors.pg_enforce import Revocation
from stream.config import ConfigError, parse_config
from stream.enforce import NotRestorable, revocation_to_restore

KEY = b"unit-test-control-key-0123456789abcdef"
OTHER = b"another-control-key-0123456789abcdefgh"


def signed(rec: ControlRecord, secret: bytes = KEY, key: bytes | None = None) -> tuple[bytes, bytes, list[Any]]:
    k = rec.agent_id.encode() if key is None else key
    value = rec.to_bytes()
    return k, value, [(CONTROL_SIGNATURE_HEADER, sign_control(secret, k, value))]


def released(agent: str = "a1", alert_id: str | None = "alert-1") -> ControlRecord:
    return ControlRecord(agent_id=agent, state="released", reason="ok", alert_id=alert_id, by="ops@host")


def reject_reason(secrets: list[bytes], key: bytes | None, value: bytes | None, headers: Any) -> str:
    with pytest.raises(ControlRejected) as e:
        verify_control(secrets, key, value, headers)
    return e.value.reason


def test_a_signed_record_verifies_to_the_same_record() -> None:
    rec = released()
    assert verify_control([KEY], *signed(rec)) == rec


def test_a_record_signed_with_a_previous_key_verifies_during_a_rotation() -> None:
    rec = released()
    assert verify_control([KEY, OTHER], *signed(rec, OTHER)) == rec


def test_a_tampered_body_is_refused() -> None:
    key, value, headers = signed(released())
    tampered = value.replace(b'"reason":"ok"', b'"reason":"OK"')
    assert tampered != value
    assert reject_reason([KEY], key, tampered, headers) == "bad_signature"


def test_a_record_signed_with_another_key_is_refused() -> None:
    assert reject_reason([KEY], *signed(released(), OTHER)) == "bad_signature"


@pytest.mark.parametrize(
    "headers",
    [None, [], [("other-header", b"v1=00")], {}],
    ids=["no headers", "empty list", "another header", "empty mapping"],
)
def test_a_record_without_a_signature_is_refused(headers: Any) -> None:
    rec = released()
    assert reject_reason([KEY], rec.agent_id.encode(), rec.to_bytes(), headers) == "unsigned"


def test_two_signature_headers_are_refused_even_if_one_is_right() -> None:
    key, value, headers = signed(released())
    both = [*headers, (CONTROL_SIGNATURE_HEADER, b"v1=" + b"0" * 64)]
    assert reject_reason([KEY], key, value, both) == "unsigned"
    assert reject_reason([KEY], key, value, list(reversed(both))) == "unsigned"


@pytest.mark.parametrize("sig", [b"", b"v1=", b"v1=zz", b"\xff\xfe", "v1=not-hex", b"sha256=" + b"0" * 64])
def test_a_malformed_signature_is_refused_without_raising_anything_else(sig: Any) -> None:
    rec = released()
    headers = [(CONTROL_SIGNATURE_HEADER, sig)]
    assert reject_reason([KEY], rec.agent_id.encode(), rec.to_bytes(), headers) == "bad_signature"


def test_a_signed_record_replayed_under_another_agents_key_is_refused() -> None:
    """Compaction is by key: a_1's signed release under a_2's key would replace a_2's quarantine."""
    _, value, headers = signed(released("a_1"))
    assert reject_reason([KEY], b"a_2", value, headers) == "bad_signature"


def test_a_record_whose_agent_is_not_its_key_is_refused_even_when_signed() -> None:
    # Only a holder of the key can make this one; it is refused all the same.
    assert reject_reason([KEY], *signed(released("a_1"), key=b"a_2")) == "key_mismatch"


def test_a_signed_value_that_is_no_control_record_is_refused() -> None:
    value = b'{"agent_id": "a1", "state": "paused"}'
    headers = [(CONTROL_SIGNATURE_HEADER, sign_control(KEY, b"a1", value))]
    assert reject_reason([KEY], b"a1", value, headers) == "invalid_record"
    assert reject_reason([KEY], b"a1", None, headers) == "invalid_record"


def test_a_release_names_the_quarantine_it_lifts() -> None:
    """An old signed release replayed later lifts nothing: the follower and release skip it as stale."""
    assert not released(alert_id="alert-1").stale_for("alert-1")
    assert released(alert_id="alert-1").stale_for("alert-2")
    assert released(alert_id=None).stale_for("alert-2")
    assert not released(alert_id="alert-1").stale_for(None)  # nothing in force: a no-op either way
    quarantined = ControlRecord(agent_id="a1", state="quarantined", reason="r", alert_id="alert-1", by="w")
    assert not quarantined.stale_for("alert-2")


# -- config ------------------------------------------------------------------------------------------------------

TABLE = {
    "name": "public.refunds",
    "topic": "shop.public.refunds",
    "features": [{"name": "amount", "column": "amount"}],
}
PG = {"postgres": {"dsn": "host=127.0.0.1 port=1", "roles": {"template": "agent_{agent_id}"}}}


def config(actions: list[str], control: dict[str, Any] | None = None, **extra: Any) -> Any:
    data: dict[str, Any] = {"enforcement": PG, "tables": [{**TABLE, "actions": {"critical": actions}}], **extra}
    if control is not None:
        data["control"] = control
    return parse_config(data)


@pytest.mark.parametrize("action", ["postgres", "webhook"])
def test_enforcement_without_a_signing_key_is_refused_with_the_key_path(action: str) -> None:
    extra = {"enforcement": {**PG, "webhook": {"url": "https://o.example/pause", "secret": "s" * 32}}}
    with pytest.raises(ConfigError) as e:
        config(["alert", "quarantine", action], **extra)
    assert "control.signing_key: required because tables.0.actions uses" in str(e.value)
    assert f"'{action}'" in str(e.value)


def test_without_enforcement_the_key_is_optional() -> None:
    assert config(["alert", "quarantine"]).control is None


def test_a_short_signing_key_is_refused_with_its_path() -> None:
    with pytest.raises(ConfigError) as e:
        config(["alert", "quarantine", "postgres"], {"signing_key": "short"})
    assert "control.signing_key" in str(e.value)


def test_the_signing_key_signs_and_previous_keys_only_verify() -> None:
    cfg = config(["alert", "postgres"], {"signing_key": KEY.decode(), "previous_keys": [OTHER.decode()]})
    assert cfg.control.keys() == (KEY, OTHER)
    assert KEY.decode() not in repr(cfg)  # a SecretStr: never in logs


# -- what release may restore --------------------------------------------------------------------------------------


def quarantine_record(agent: str, role: str, state: str = "quarantined") -> ControlRecord:
    rev = Revocation(
        role=role,
        mode="revoke_writes",
        privileges=(("public", "refunds", "INSERT"), ("public", "refunds", "TRUNCATE")),
        had_login=True,
        terminated_sessions=0,
        grant_options=(("public", "refunds", "", "INSERT"),),
    )
    return ControlRecord(
        agent_id=agent,
        state=state,
        reason="r",
        alert_id="alert-1",
        by="writeguard-worker",
        enforcement=[EnforcementResult(action="postgres", ok=True, revocation=rev.to_dict())],
    )


def enforcing_config() -> Any:
    return config(["alert", "postgres"], {"signing_key": KEY.decode()})


def test_release_restores_the_revocation_of_the_agents_own_role() -> None:
    rev = revocation_to_restore(enforcing_config(), "bot", quarantine_record("bot", "agent_bot"))
    assert rev is not None and rev.role == "agent_bot"


def test_release_refuses_a_revocation_that_names_another_role() -> None:
    """A record naming a group role would hand it LOGIN, INSERT WITH GRANT OPTION and TRUNCATE."""
    with pytest.raises(NotRestorable, match=r"names role 'agent_admins'.*maps to role 'agent_bot'"):
        revocation_to_restore(enforcing_config(), "bot", quarantine_record("bot", "agent_admins"))


def test_release_refuses_another_agents_record() -> None:
    with pytest.raises(NotRestorable, match="agent 'other'"):
        revocation_to_restore(enforcing_config(), "bot", quarantine_record("other", "agent_bot"))


def test_release_restores_nothing_unless_the_latest_record_is_a_quarantine() -> None:
    cfg = enforcing_config()
    assert revocation_to_restore(cfg, "bot", None) is None
    assert revocation_to_restore(cfg, "bot", quarantine_record("bot", "agent_bot", state="released")) is None


def test_release_refuses_a_malformed_revocation_instead_of_crashing() -> None:
    rec = quarantine_record("bot", "agent_bot")
    assert rec.enforcement[0].revocation is not None
    rec.enforcement[0].revocation["mode"] = "grant_everything"
    with pytest.raises(NotRestorable, match="malformed"):
        revocation_to_restore(enforcing_config(), "bot", rec)
