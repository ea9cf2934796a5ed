"""Agent id -> PostgreSQL role, without a database: hostile ids never produce a role outside the pattern.

Also the Revocation record (it travels through the control topic) and the checks release() makes before it
touches the database.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from pydantic import ValidationError

from connectors.pg_enforce import (
    EnforcementError,
    PostgresEnforcer,
    Revocation,
    RoleMapping,
    parse_table,
)

DEFAULT_PATTERN = RoleMapping().pattern

HOSTILE_IDS = [
    'a"; DROP TABLE x; --',
    "a'; DROP TABLE x; --",
    "x; DROP ROLE postgres",
    "semi;colon",
    "agént-①",
    "refund\x00_02",
    "a" * 10_240,
    "",
    " ",
    "refund 02",
    "REFUND_02",
    "Refund_02",
    "refund_02\n",
    "refund_02\r\nDROP",
    "{agent_id}",
    "{0.__class__}",
    "%(role)s",
    "\ud800",  # a lone surrogate: not encodable as UTF-8
    "\uff41\uff47\uff45\uff4e\uff54",  # fullwidth "agent"
    "refund_02\u200b",  # zero-width space
    "../../etc/passwd",
    "$1",
    "\\",
    "é" * 40,  # 80 bytes although 40 characters
]


def assert_safe(mapping: RoleMapping, agent_id: str) -> None:
    """Either a role that fits the pattern and PostgreSQL's 63 bytes, or EnforcementError; nothing else."""
    try:
        role = mapping.role_for(agent_id)
    except EnforcementError:
        return
    assert re.fullmatch(mapping.pattern, role), (agent_id, role)
    assert len(role.encode()) <= 63, (agent_id, role)
    assert "\x00" not in role


def test_map_wins_over_template() -> None:
    m = RoleMapping(map={"refund-bot": "agent_refund_bot"}, template="agent_{agent_id}")
    assert m.role_for("refund-bot") == "agent_refund_bot"
    assert m.role_for("refund_02") == "agent_refund_02"


def test_map_only_refuses_unknown_agents() -> None:
    m = RoleMapping(map={"refund-bot": "agent_refund_bot"})
    with pytest.raises(EnforcementError, match="no role for agent"):
        m.role_for("refund_02")


def test_no_map_no_template() -> None:
    with pytest.raises(EnforcementError, match="no role for agent"):
        RoleMapping().role_for("refund_02")


def test_template_replaces_every_placeholder_and_nothing_else() -> None:
    m = RoleMapping(template="agent_{agent_id}")
    assert m.role_for("refund_02") == "agent_refund_02"
    # The agent id is inserted as text: braces in it are not a format spec and are not substituted again.
    with pytest.raises(EnforcementError):
        m.role_for("{agent_id}")
    with pytest.raises(EnforcementError):
        m.role_for("{0.__class__}")


def test_nothing_is_lowercased_silently() -> None:
    m = RoleMapping(template="agent_{agent_id}")
    with pytest.raises(EnforcementError, match="does not match pattern"):
        m.role_for("Refund_02")
    assert RoleMapping(template="agent_{agent_id}", pattern=r"[A-Za-z_0-9]+").role_for("Refund_02") == (
        "agent_Refund_02"
    )


def test_template_must_contain_placeholder() -> None:
    with pytest.raises(ValidationError, match="agent_id"):
        RoleMapping(template="agent_refund")


def test_pattern_must_compile() -> None:
    with pytest.raises(ValidationError, match="regular expression"):
        RoleMapping(template="agent_{agent_id}", pattern="([a-z")


def test_config_is_strict_and_frozen() -> None:
    with pytest.raises(ValidationError):
        RoleMapping.model_validate({"template": "agent_{agent_id}", "tempalte": "x"})
    m = RoleMapping(template="agent_{agent_id}")
    with pytest.raises(ValidationError):
        m.template = "x_{agent_id}"  # type: ignore[misc]


def test_explicit_map_is_checked_when_the_config_loads() -> None:
    with pytest.raises(ValidationError, match="does not match pattern"):
        RoleMapping(map={"bot": "Agent-Bot"})
    with pytest.raises(ValidationError, match="bytes"):
        RoleMapping(map={"bot": "a" * 64}, pattern=".*")
    RoleMapping(map={"bot": "a" * 63}, pattern=".*")


def test_pattern_is_a_fullmatch() -> None:
    # Without anchors a search would accept "agent_x; DROP": fullmatch does not.
    m = RoleMapping(template="agent_{agent_id}", pattern="[a-z_]+")
    with pytest.raises(EnforcementError):
        m.role_for("x; DROP")
    with pytest.raises(EnforcementError):
        m.role_for("x\n")


@pytest.mark.parametrize("agent_id", HOSTILE_IDS, ids=lambda s: repr(s)[:30])
def test_hostile_ids_through_the_template(agent_id: str) -> None:
    assert_safe(RoleMapping(template="agent_{agent_id}"), agent_id)
    assert_safe(RoleMapping(template="{agent_id}"), agent_id)


@pytest.mark.parametrize("agent_id", HOSTILE_IDS, ids=lambda s: repr(s)[:30])
def test_hostile_ids_that_are_explicitly_mapped(agent_id: str) -> None:
    # The id is only a dictionary key; the role is the configured one.
    m = RoleMapping(map={agent_id: "agent_special"})
    if agent_id:
        assert m.role_for(agent_id) == "agent_special"
    else:
        with pytest.raises(EnforcementError):
            m.role_for(agent_id)


@pytest.mark.parametrize("agent_id", HOSTILE_IDS, ids=lambda s: repr(s)[:30])
def test_hostile_ids_under_a_permissive_pattern(agent_id: str) -> None:
    # Even when the pattern allows anything, NUL bytes, non-UTF-8 text and names over 63 bytes are refused.
    m = RoleMapping(template="agent_{agent_id}", pattern=r"(?s).*")
    try:
        role = m.role_for(agent_id)
    except EnforcementError:
        return
    assert "\x00" not in role
    assert len(role.encode()) <= 63


def test_the_specific_hostile_ids() -> None:
    m = RoleMapping(template="agent_{agent_id}")
    for agent_id in ['a"; DROP TABLE x; --', "semi;colon", "agént-①", "a\x00b", "a" * 10_240, ""]:
        with pytest.raises(EnforcementError):
            m.role_for(agent_id)


def test_ten_kilobytes_never_truncate_to_another_role() -> None:
    m = RoleMapping(template="agent_{agent_id}", pattern=".*")
    with pytest.raises(EnforcementError, match="63"):
        m.role_for("x" * 10_240)
    # 64 bytes: PostgreSQL would silently cut it to the 63-byte name of a different role.
    with pytest.raises(EnforcementError, match="63"):
        m.role_for("x" * 58)
    assert m.role_for("x" * 57) == "agent_" + "x" * 57


def test_reserved_role_names_are_refused() -> None:
    # "public" - even quoted - means PUBLIC to PostgreSQL: REVOKE ... FROM "public" would hit every role.
    m = RoleMapping(template="{agent_id}")
    for agent_id in ["public", "none", "pg_write_all_data", "pg_signal_backend"]:
        with pytest.raises(EnforcementError, match="reserved"):
            m.role_for(agent_id)
    with pytest.raises(ValidationError, match="reserved"):
        RoleMapping(map={"bot": "public"})


def test_random_ids_never_escape_the_pattern() -> None:
    rng = random.Random(20240601)
    alphabet = "abcxyz_019;'\"\\ -{}()%$\x00\n\té①Ä\uff21\u200b"
    m = RoleMapping(template="agent_{agent_id}")
    for _ in range(5_000):
        agent_id = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert_safe(m, agent_id)


def test_non_string_agent_id() -> None:
    with pytest.raises(EnforcementError):
        RoleMapping(template="agent_{agent_id}").role_for(None)  # type: ignore[arg-type]


def rev(**kw: object) -> Revocation:
    base: dict[str, object] = {
        "role": "agent_refund_02",
        "mode": "revoke_writes",
        "privileges": (("public", "refunds", "INSERT"), ("public", "orders", "DELETE")),
        "had_login": None,
        "terminated_sessions": 1,
        "inherited": ("PUBLIC",),
        "column_privileges": (("public", "refunds", "status", "UPDATE"),),
        "grant_options": (("public", "refunds", "", "INSERT"),),
    }
    base.update(kw)
    return Revocation(**base)  # type: ignore[arg-type]


def test_revocation_json_round_trip() -> None:
    r = rev()
    wire = json.loads(json.dumps(r.to_dict()))
    assert Revocation.from_dict(wire) == r
    assert Revocation.from_dict(json.loads(json.dumps(rev(mode="nologin", had_login=True).to_dict()))).had_login


def test_revocation_minimal_record() -> None:
    # The fields this module added to the brief's Revocation have defaults.
    r = Revocation.from_dict(
        {"role": "agent_x", "mode": "nologin", "privileges": [], "had_login": True, "terminated_sessions": 2}
    )
    assert r == Revocation("agent_x", "nologin", (), True, 2)


@pytest.mark.parametrize(
    "patch",
    [
        {"mode": "drop_everything"},
        {"role": ""},
        {"role": 7},
        {"privileges": [["public", "refunds"]]},
        {"privileges": [["public", "refunds", 1]]},
        {"privileges": "INSERT"},
        {"had_login": "yes"},
        {"terminated_sessions": -1},
        {"terminated_sessions": True},
        {"column_privileges": [["public", "refunds", "UPDATE"]]},
        {"inherited": "PUBLIC"},
        {"extra": 1},
    ],
)
def test_revocation_from_dict_is_strict(patch: dict[str, object]) -> None:
    data = {**rev().to_dict(), **patch}
    with pytest.raises(EnforcementError):
        Revocation.from_dict(data)


def test_merged_keeps_what_the_first_quarantine_took() -> None:
    first = rev(mode="nologin", had_login=True, privileges=(), column_privileges=(), grant_options=())
    second = rev(mode="nologin", had_login=False, privileges=(), column_privileges=(), grant_options=())
    assert first.merged(second).had_login is True
    a = rev(privileges=(("public", "refunds", "INSERT"),), column_privileges=(), grant_options=())
    b = rev(privileges=(), column_privileges=(), grant_options=())
    assert a.merged(b).privileges == a.privileges
    with pytest.raises(EnforcementError):
        a.merged(rev(role="agent_other"))


def test_parse_table() -> None:
    assert parse_table("public.refunds") == ("public", "refunds")
    assert parse_table('public.weird"; DROP TABLE refunds; --') == ("public", 'weird"; DROP TABLE refunds; --')
    assert parse_table("public.a.b") == ("public", "a.b")
    for bad in ["refunds", ".refunds", "public.", "", "public.re\x00funds"]:
        with pytest.raises(EnforcementError):
            parse_table(bad)


# A DSN nobody listens on: the checks below must fail before any connection is attempted.
NOWHERE = "host=127.0.0.1 port=1 dbname=nowhere connect_timeout=1"


def enforcer() -> PostgresEnforcer:
    return PostgresEnforcer(NOWHERE, RoleMapping(template="agent_{agent_id}"), ["public.refunds", "public.orders"])


def test_enforcer_rejects_bad_tables_and_mode() -> None:
    with pytest.raises(EnforcementError):
        PostgresEnforcer(NOWHERE, RoleMapping(), ["refunds"])
    with pytest.raises(EnforcementError):
        PostgresEnforcer(NOWHERE, RoleMapping(), "public.refunds")
    with pytest.raises(EnforcementError):
        PostgresEnforcer(NOWHERE, RoleMapping(), [])
    with pytest.raises(EnforcementError):
        PostgresEnforcer(NOWHERE, RoleMapping(), ["public.refunds"], "drop")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "forged",
    [
        rev(privileges=(("public", "users", "INSERT"),), column_privileges=(), grant_options=()),
        rev(privileges=(("public", "refunds", "SELECT"),), column_privileges=(), grant_options=()),
        rev(privileges=(("public", "refunds", "ALL; DROP TABLE refunds"),), column_privileges=(), grant_options=()),
        rev(column_privileges=(("public", "refunds", "status", "DELETE"),)),
        rev(column_privileges=(("public", "secrets", "status", "UPDATE"),)),
        rev(grant_options=(("public", "users", "", "INSERT"),)),
        rev(role="postgres; DROP"),
        rev(role="public"),
        rev(role="pg_write_all_data"),
        rev(role="x" * 64),
    ],
)
def test_release_refuses_a_forged_revocation_before_connecting(forged: Revocation) -> None:
    with pytest.raises(EnforcementError) as e:
        enforcer().release(forged)
    assert "connect" not in str(e.value)


def test_quarantine_refuses_a_hostile_id_before_connecting() -> None:
    with pytest.raises(EnforcementError) as e:
        enforcer().quarantine('a"; DROP TABLE x; --')
    assert "connect" not in str(e.value)


def test_unreachable_database_is_an_enforcement_error() -> None:
    with pytest.raises(EnforcementError, match="connect"):
        enforcer().quarantine("refund_02")
