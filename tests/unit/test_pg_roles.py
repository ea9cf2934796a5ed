"""Agent id -> PostgreSQL role, without a database: hostile ids never produce a role outside the pattern.

Also the Revocation record (it travels through the control topic) and the checks release() makes before it
touches the database.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Iterator
from types import SimpleNamespace

import psycopg
import pytest
from psycopg import sql
from pydantic import ValidationError

from connectors.pg_enforce import (
    EnforcementError,
    PostgresEnforcer,
    Revocation,
    RoleMapping,
    parse_table,
)
from stream.config import ConfigError, parse_config

DEFAULT_PATTERN = RoleMapping().pattern

# Why each hostile id is refused, as the EnforcementError says it (a regular expression for pytest.raises).
NO_PATTERN_MATCH = "does not match pattern"
EMPTY = "empty agent id"
NUL = "NUL byte"
NOT_UTF8 = "not valid UTF-8"
TOO_LONG = r"bytes; PostgreSQL would truncate it to 63"

# Hostile ids and why the default pattern ([a-z_][a-z0-9_]{0,62}) refuses each, whatever the template adds.
HOSTILE_IDS: dict[str, str] = {
    'a"; DROP TABLE x; --': NO_PATTERN_MATCH,
    "a'; DROP TABLE x; --": NO_PATTERN_MATCH,
    "x; DROP ROLE postgres": NO_PATTERN_MATCH,
    "semi;colon": NO_PATTERN_MATCH,
    "agént-①": NO_PATTERN_MATCH,
    "refund\x00_02": NUL,
    "a" * 10_240: TOO_LONG,
    "": EMPTY,
    " ": NO_PATTERN_MATCH,
    "refund 02": NO_PATTERN_MATCH,
    "REFUND_02": NO_PATTERN_MATCH,
    "Refund_02": NO_PATTERN_MATCH,
    "refund_02\n": NO_PATTERN_MATCH,
    "refund_02\r\nDROP": NO_PATTERN_MATCH,
    "{agent_id}": NO_PATTERN_MATCH,
    "{0.__class__}": NO_PATTERN_MATCH,
    "%(role)s": NO_PATTERN_MATCH,
    "\ud800": NOT_UTF8,  # a lone surrogate: not encodable as UTF-8
    "\uff41\uff47\uff45\uff4e\uff54": NO_PATTERN_MATCH,  # fullwidth "agent"
    "refund_02\u200b": NO_PATTERN_MATCH,  # zero-width space
    "../../etc/passwd": NO_PATTERN_MATCH,
    "$1": NO_PATTERN_MATCH,
    "\\": NO_PATTERN_MATCH,
    "é" * 40: TOO_LONG,  # 80 bytes although 40 characters
}

# Under a pattern that allows anything, only what no pattern can allow is refused: an empty id, NUL bytes,
# text that is not UTF-8, and names over 63 bytes. Every other hostile id becomes exactly "agent_" + the id.
ALWAYS_REFUSED = {agent_id: why for agent_id, why in HOSTILE_IDS.items() if why != NO_PATTERN_MATCH}
PERMITTED_BY_ANY_PATTERN = [agent_id for agent_id, why in HOSTILE_IDS.items() if why == NO_PATTERN_MATCH]
PERMISSIVE = r"(?s).*"

# Ids the default pattern accepts, and the exact role each becomes, per template.
ACCEPTED = [
    ("agent_{agent_id}", "refund_02", "agent_refund_02"),
    ("agent_{agent_id}", "_", "agent__"),
    ("agent_{agent_id}", "0", "agent_0"),
    ("agent_{agent_id}", "x" * 57, "agent_" + "x" * 57),  # exactly 63 bytes
    ("agent_{agent_id}", "a_b_c_1_2_3", "agent_a_b_c_1_2_3"),
    ("wg_{agent_id}", "refund_02", "wg_refund_02"),
    ("wg_{agent_id}", "_x", "wg__x"),
    ("x_{agent_id}", "x" * 61, "x_" + "x" * 61),
    ("agent_{agent_id}_bot", "refund", "agent_refund_bot"),
    ("agent_{agent_id}_{agent_id}", "ab", "agent_ab_ab"),
]


def _ids(value: object) -> str:
    return repr(value)[:30]


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
    assert RoleMapping(template="agent_{agent_id}_as_{agent_id}").role_for("x") == "agent_x_as_x"
    # The agent id is inserted as text: braces in it are not a format spec and are not substituted again.
    with pytest.raises(EnforcementError, match=NO_PATTERN_MATCH):
        m.role_for("{agent_id}")
    with pytest.raises(EnforcementError, match=NO_PATTERN_MATCH):
        m.role_for("{0.__class__}")
    # Where a pattern lets braces through, the result shows the id was inserted verbatim, once.
    anything = RoleMapping(template="agent_{agent_id}", pattern=PERMISSIVE)
    assert anything.role_for("{agent_id}") == "agent_{agent_id}"
    assert anything.role_for("{0.__class__}") == "agent_{0.__class__}"
    assert anything.role_for("%(role)s") == "agent_%(role)s"


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


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{agent_id}", "fixed prefix before"),  # the id `app_owner` would be the owner's role
        ("{agent_id}_bot", "fixed prefix before"),
        ("a{agent_id}", "end in a separator"),  # "a" + "pp_owner" = "app_owner"
        ("agent{agent_id}", "end in a separator"),
        ("pg_{agent_id}", "reserved"),
        ("PG_{agent_id}", "reserved"),
    ],
)
def test_a_template_without_a_fixed_prefix_is_a_config_error(template: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        RoleMapping(template=template)


def test_the_template_error_names_its_key_path() -> None:
    data = {
        "enforcement": {"postgres": {"dsn": "host=127.0.0.1 port=1", "roles": {"template": "{agent_id}"}}},
        "tables": [
            {
                "name": "public.refunds",
                "topic": "shop.public.refunds",
                "features": [{"name": "amount", "column": "amount"}],
            }
        ],
    }
    with pytest.raises(ConfigError, match=r"enforcement\.postgres\.roles\.template: .*fixed prefix before"):
        parse_config(data)
    data["enforcement"]["postgres"]["roles"] = {"template": "agent_{agent_id}"}  # type: ignore[index]
    assert parse_config(data).enforcement.postgres.roles.role_for("x") == "agent_x"  # type: ignore[union-attr]


def test_explicit_map_roles_need_no_prefix() -> None:
    m = RoleMapping(map={"refund-bot": "refund_bot", "ops": "ops_jane"}, template="agent_{agent_id}")
    assert m.role_for("refund-bot") == "refund_bot" and m.role_for("ops") == "ops_jane"


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
    assert m.role_for("x") == "agent_x"
    with pytest.raises(EnforcementError, match=NO_PATTERN_MATCH):
        m.role_for("x; DROP")
    with pytest.raises(EnforcementError, match=NO_PATTERN_MATCH):
        m.role_for("x\n")


@pytest.mark.parametrize(("template", "agent_id", "role"), ACCEPTED, ids=_ids)
def test_plain_ids_resolve_to_exactly_their_role(template: str, agent_id: str, role: str) -> None:
    m = RoleMapping(template=template)
    assert m.role_for(agent_id) == role
    assert re.fullmatch(DEFAULT_PATTERN, role) and len(role.encode()) <= 63


@pytest.mark.parametrize("template", ["agent_{agent_id}", "wg_{agent_id}_x"])
@pytest.mark.parametrize(("agent_id", "why"), HOSTILE_IDS.items(), ids=_ids)
def test_hostile_ids_through_the_template_are_refused(template: str, agent_id: str, why: str) -> None:
    with pytest.raises(EnforcementError, match=why) as refused:
        RoleMapping(template=template).role_for(agent_id)
    # The refusal names the agent (cut to a readable length), so the operator sees which row caused it.
    if agent_id:
        assert repr(agent_id[:200]) in str(refused.value)


@pytest.mark.parametrize("agent_id", list(HOSTILE_IDS), ids=_ids)
def test_hostile_ids_that_are_explicitly_mapped(agent_id: str) -> None:
    # The id is only a dictionary key; the role is the configured one.
    m = RoleMapping(map={agent_id: "agent_special"})
    if agent_id:
        assert m.role_for(agent_id) == "agent_special"
    else:
        with pytest.raises(EnforcementError, match=EMPTY):
            m.role_for(agent_id)


@pytest.mark.parametrize("agent_id", PERMITTED_BY_ANY_PATTERN, ids=_ids)
def test_hostile_ids_under_a_permissive_pattern_become_exactly_prefix_plus_id(agent_id: str) -> None:
    # The pattern is the operator's choice; when it allows anything, the id is taken verbatim: no cleanup.
    role = RoleMapping(template="agent_{agent_id}", pattern=PERMISSIVE).role_for(agent_id)
    assert role == "agent_" + agent_id
    assert "\x00" not in role and len(role.encode()) <= 63


@pytest.mark.parametrize(("agent_id", "why"), ALWAYS_REFUSED.items(), ids=_ids)
def test_what_no_pattern_can_allow_is_refused(agent_id: str, why: str) -> None:
    # Even when the pattern allows anything, NUL bytes, non-UTF-8 text and names over 63 bytes are refused.
    mappings = [
        RoleMapping(template="agent_{agent_id}", pattern=PERMISSIVE),
        RoleMapping(map={"x": "agent_x"}, template="x_{agent_id}", pattern=PERMISSIVE),
    ]
    for m in mappings:
        with pytest.raises(EnforcementError, match=why):
            m.role_for(agent_id)


def test_the_specific_hostile_ids() -> None:
    m = RoleMapping(template="agent_{agent_id}")
    for agent_id, why in [
        ('a"; DROP TABLE x; --', NO_PATTERN_MATCH),
        ("semi;colon", NO_PATTERN_MATCH),
        ("agént-①", NO_PATTERN_MATCH),
        ("a\x00b", NUL),
        ("a" * 10_240, TOO_LONG),
        ("", EMPTY),
    ]:
        with pytest.raises(EnforcementError, match=why):
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
    m = RoleMapping(template="agent_{agent_id}")
    for role in ["public", "none", "pg_write_all_data", "pg_signal_backend"]:
        with pytest.raises(EnforcementError, match="reserved"):
            m.check_role(role)
        with pytest.raises(ValidationError, match="reserved"):
            RoleMapping(map={"bot": role})


def test_random_ids_never_escape_the_pattern() -> None:
    """Accepted exactly when "agent_" + id fits [a-z0-9_] and 63 bytes (an oracle independent of the code)."""
    rng = random.Random(20240601)
    allowed = set("abcxyz_019")
    alphabet = "abcxyz_019;'\"\\ -{}()%$\x00\n\té①Ä\uff21\u200b"
    m = RoleMapping(template="agent_{agent_id}")
    accepted = refused = 0
    for _ in range(5_000):
        # Mostly short ids, so that both outcomes are common.
        agent_id = "".join(rng.choice(alphabet) for _ in range(rng.choice([rng.randint(0, 4), rng.randint(0, 80)])))
        should_accept = 0 < len(agent_id) <= 57 and set(agent_id) <= allowed
        if should_accept:
            role = m.role_for(agent_id)
            # The id cannot escape the prefix: the role is the prefix, then [a-z0-9_] only.
            assert role == "agent_" + agent_id and re.fullmatch(r"agent_[a-z0-9_]+", role), role
            accepted += 1
        else:
            with pytest.raises(EnforcementError):
                m.role_for(agent_id)
            refused += 1
    assert accepted >= 200 and refused >= 2_000, (accepted, refused)  # 256 and 4,744 with this seed


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
        "grant_options": (("public", "refunds", "", "INSERT"), ("public", "refunds_id_seq", "", "UPDATE")),
        "partitions": (("public", "refunds_p0", "public", "refunds"),),
        "sequences": (("public", "refunds_id_seq", "public", "refunds"),),
        "sequence_privileges": (("public", "refunds_id_seq", "UPDATE"),),
        "default_privileges": (("app_owner", "", "tables", "INSERT"), ("app_owner", "public", "sequences", "UPDATE")),
        "default_grant_options": (("app_owner", "", "tables", "INSERT"),),
        "memberships": (("refund_writers", "admin", "postgres"),),
        "cascaded": (("public", "refunds", "", "INSERT", "PUBLIC", "agent_refund_02"),),
        "still_writable": ("INSERT on public.orders",),
    }
    base.update(kw)
    return Revocation(**base)  # type: ignore[arg-type]


def test_revocation_json_round_trip() -> None:
    r = rev()
    wire = json.loads(json.dumps(r.to_dict()))
    assert Revocation.from_dict(wire) == r
    # Every field travels: none is left at its default by the round trip.
    assert all(getattr(Revocation.from_dict(wire), f) for f in r.to_dict() if f not in ("had_login",))
    assert Revocation.from_dict(json.loads(json.dumps(rev(mode="nologin", had_login=True).to_dict()))).had_login


def test_revocation_minimal_record() -> None:
    # The fields this module added to the brief's Revocation have defaults.
    r = Revocation.from_dict(
        {"role": "agent_x", "mode": "nologin", "privileges": [], "had_login": True, "terminated_sessions": 2}
    )
    assert r == Revocation("agent_x", "nologin", (), True, 2)


def test_a_record_written_before_the_new_fields_still_parses() -> None:
    old = {
        "role": "agent_x",
        "mode": "revoke_writes",
        "privileges": [["public", "refunds", "INSERT"]],
        "had_login": None,
        "terminated_sessions": 1,
        "inherited": [],
        "column_privileges": [["public", "refunds", "status", "UPDATE"]],
        "grant_options": [],
    }
    r = Revocation.from_dict(old)
    assert r.privileges == (("public", "refunds", "INSERT"),)
    assert r.column_privileges == (("public", "refunds", "status", "UPDATE"),)
    assert (r.partitions, r.sequences, r.default_privileges, r.memberships, r.cascaded, r.still_writable) == ((),) * 6
    assert r.enforced


def test_enforced_and_describe() -> None:
    done = rev(inherited=(), still_writable=())
    assert done.enforced
    assert "not enforced" not in done.describe()
    # 2 table-level + 1 column + 1 sequence privilege.
    assert done.describe() == (
        "role agent_refund_02: revoke_writes, 4 privileges revoked, 2 default privileges, memberships in "
        "refund_writers; 1 grants it had passed on removed (CASCADE)"
    )
    for partial in (rev(inherited=()), rev(still_writable=()), rev()):
        assert not partial.enforced
        assert "not enforced: still writable through" in partial.describe(), partial.describe()
    assert rev().describe().endswith("still writable through INSERT on public.orders, via PUBLIC")


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
        {"partitions": [["public", "refunds_p0", "public"]]},
        {"sequences": "public.refunds_id_seq"},
        {"sequence_privileges": [["public", "refunds_id_seq", None]]},
        {"default_privileges": [["app_owner", "", "tables"]]},
        {"default_grant_options": [["app_owner", "", "tables", 1]]},
        {"memberships": [["refund_writers", True, "postgres"]]},
        {"cascaded": [["public", "refunds", "", "INSERT", "PUBLIC"]]},
        {"still_writable": "INSERT on public.orders"},
        {"still_writable": [1]},
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
    # Everything release gives back is kept from the first; what is still open is the later one's.
    c = rev().merged(
        rev(
            **{
                f: ()
                for f in (
                    "privileges",
                    "partitions",
                    "sequences",
                    "sequence_privileges",
                    "default_privileges",
                    "memberships",
                    "still_writable",
                    "inherited",
                )
            }
        )
    )
    full = rev()
    assert (c.partitions, c.sequences, c.sequence_privileges, c.default_privileges, c.memberships) == (
        full.partitions,
        full.sequences,
        full.sequence_privileges,
        full.default_privileges,
        full.memberships,
    )
    assert c.still_writable == () and c.inherited == () and c.enforced


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
        # A "partition" or "sequence" must belong to a watched table, and a privilege to a listed one.
        rev(partitions=(("public", "users", "public", "users"),)),
        rev(privileges=(("public", "users", "INSERT"),), partitions=(), column_privileges=(), grant_options=()),
        rev(sequences=(("public", "users_id_seq", "public", "users"),)),
        rev(sequence_privileges=(("public", "users_id_seq", "UPDATE"),)),
        rev(sequence_privileges=(("public", "refunds_id_seq", "USAGE"),)),
        rev(grant_options=(("public", "users_id_seq", "", "UPDATE"),)),
        rev(grant_options=(("public", "refunds_id_seq", "", "DELETE"),)),
        # Default privileges: only the write privileges of tables and sequences.
        rev(default_privileges=(("app_owner", "", "functions", "EXECUTE"),)),
        rev(default_privileges=(("app_owner", "", "tables", "SELECT"),)),
        rev(default_privileges=(("app_owner", "", "sequences", "INSERT"),)),
        rev(default_privileges=(("app\x00owner", "", "tables", "INSERT"),)),
        rev(default_grant_options=(("app_owner", "", "tables", "REFERENCES"),)),
        # Memberships: no predefined role but pg_write_all_data, no PUBLIC, no odd option.
        rev(memberships=(("pg_execute_server_program", "", "postgres"),)),
        rev(memberships=(("pg_read_server_files", "admin", ""),)),
        rev(memberships=(("public", "", ""),)),
        rev(memberships=(("refund_writers", "superuser", ""),)),
        rev(memberships=(("x" * 64, "", ""),)),
    ],
    ids=_ids,
)
def test_release_refuses_a_forged_revocation_before_connecting(forged: Revocation) -> None:
    with pytest.raises(EnforcementError) as e:
        enforcer().release(forged)
    assert "connect" not in str(e.value)


def test_quarantine_refuses_a_hostile_id_before_connecting() -> None:
    with pytest.raises(EnforcementError) as e:
        enforcer().quarantine('a"; DROP TABLE x; --')
    assert "connect" not in str(e.value)


class _Rows:
    def __init__(self, rows: list[tuple[object, ...]]) -> None:
        self._rows = rows

    def fetchone(self) -> tuple[object, ...] | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple[object, ...]]:
        return self._rows


# The fake database's answers, by the name each of the enforcer's statements carries in its leading comment.
# A database where the role exists, may log in and refuses nothing; it holds INSERT on public.refunds,
# UPDATE on its status column and on its identity sequence, and a default privilege of the tables' owner.
ANSWERS: dict[str, list[tuple[object, ...]]] = {
    "role": [(16384, True, False, False, [])],
    "covered": [
        ("rel", 1, "public", "refunds", "r", "app_owner", "public", "refunds", True),
        ("seq", 2, "public", "refunds_id_seq", "S", "app_owner", "public", "refunds", False),
    ],
    "direct": [
        ("rel", "public", "refunds", "", "INSERT", False),
        ("rel", "public", "refunds", "status", "UPDATE", False),
        ("seq", "public", "refunds_id_seq", "", "UPDATE", False),
    ],
    "defaults": [("app_owner", "", "r", "INSERT", False)],
    "columns": [("public", "refunds", "status", False)],
    "set role": [("x",)],
}


class RecordingConnection:
    """Stands in for psycopg.Connection: keeps each statement as the server would get it, with its parameters.

    Statements are answered from ANSWERS by name (nothing else: no owned tables, memberships, ACL items, open
    writes, sessions). The verification's write attempts are refused as PostgreSQL would refuse them.
    """

    closed = False
    broken = False
    info = SimpleNamespace(backend_pid=4242)

    def __init__(self) -> None:
        self.statements: list[tuple[str, object]] = []

    @contextlib.contextmanager
    def transaction(self, force_rollback: bool = False) -> Iterator[None]:
        with contextlib.suppress(psycopg.Rollback):
            yield

    def close(self) -> None:
        pass

    def execute(self, query: str | sql.Composable, params: object = None) -> _Rows:
        text = query if isinstance(query, str) else query.as_string(None)
        self.statements.append((text, params))
        if text.startswith(("INSERT", "UPDATE", "DELETE")):
            raise psycopg.errors.InsufficientPrivilege("permission denied")
        name = re.match(r"-- writeguard: ([a-z ]+)\n", text)
        return _Rows(ANSWERS.get(name.group(1), []) if name else [])


def quoted(name: str) -> str:
    """An SQL identifier as PostgreSQL reads it: in double quotes, with each double quote doubled."""
    return '"' + name.replace('"', '""') + '"'


DDL = ("REVOKE", "GRANT", "ALTER")


@pytest.mark.parametrize(
    "agent_id",
    ['a"; DROP TABLE x; --', "a'; DROP TABLE x; --", "%(role)s", "{agent_id}", "$1", "\\", "refund_02\r\nDROP"],
    ids=_ids,
)
def test_an_accepted_hostile_id_reaches_sql_only_quoted_or_bound(agent_id: str) -> None:
    """Under a pattern that lets anything through, the role still never becomes SQL text of its own."""
    role = "agent_" + agent_id
    conn = RecordingConnection()
    e = PostgresEnforcer(NOWHERE, RoleMapping(template="agent_{agent_id}", pattern=PERMISSIVE), ["public.refunds"])
    e._conn = conn  # type: ignore[assignment]
    rev = e.quarantine(agent_id)
    assert rev.role == role
    assert rev.privileges == (("public", "refunds", "INSERT"),)
    assert rev.column_privileges == (("public", "refunds", "status", "UPDATE"),)
    assert rev.sequence_privileges == (("public", "refunds_id_seq", "UPDATE"),)
    assert rev.sequences == (("public", "refunds_id_seq", "public", "refunds"),)
    assert rev.default_privileges == (("app_owner", "", "tables", "INSERT"),)
    assert rev.enforced, rev  # every write attempt of the verification was refused

    who = quoted(role)
    assert [text for text, _ in conn.statements if text.startswith(DDL)] == [
        f'REVOKE INSERT ON TABLE "public"."refunds" FROM {who} CASCADE',
        f'REVOKE UPDATE ("status") ON TABLE "public"."refunds" FROM {who} CASCADE',
        f'REVOKE UPDATE ON SEQUENCE "public"."refunds_id_seq" FROM {who} CASCADE',
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "app_owner" REVOKE INSERT ON TABLES FROM {who}',
    ]
    # The verification tried each write as the role, which it became through a bound parameter.
    assert [text for text, _ in conn.statements if text.startswith(("INSERT", "UPDATE", "DELETE"))] == [
        'INSERT INTO "public"."refunds" SELECT WHERE false',
        'DELETE FROM "public"."refunds" WHERE false',
        'UPDATE "public"."refunds" SET "status" = DEFAULT WHERE false',
    ]
    for text, params in conn.statements:
        if text.startswith(DDL):
            assert params is None
            continue
        # Every other statement is fixed text: the role comes as a bind parameter, never inside the text.
        assert role not in text and who not in text, text
    bound = [
        params
        for text, params in conn.statements
        if not text.startswith(DDL) and ("%(role)s" in text or "set_config('role'" in text)
    ]
    assert bound == [{"role": role}, {"role": role, "wait_ms": 5000}, [role]]

    conn.statements.clear()
    e.release(rev)
    assert [text for text, _ in conn.statements if text.startswith(DDL)] == [
        f'GRANT INSERT ON TABLE "public"."refunds" TO {who}',
        f'GRANT UPDATE ("status") ON TABLE "public"."refunds" TO {who}',
        f'GRANT UPDATE ON SEQUENCE "public"."refunds_id_seq" TO {who}',
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "app_owner" GRANT INSERT ON TABLES TO {who}',
    ]
    assert all(role not in text for text, _ in conn.statements if not text.startswith(DDL))


def test_unreachable_database_is_an_enforcement_error() -> None:
    with pytest.raises(EnforcementError, match="connect"):
        enforcer().quarantine("refund_02")
