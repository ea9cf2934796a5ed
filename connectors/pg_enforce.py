"""Quarantine an agent in PostgreSQL itself: its role loses its writes on the watched tables, or its LOGIN.

The control topic tells cooperating agents to stop; this module makes the database refuse an agent that
does not cooperate. A quarantine returns a :class:`Revocation` that says exactly what was taken away. It is
recorded on the control topic, and :meth:`PostgresEnforcer.release` later gives back that and nothing more.

Agent ids come from watched rows, so they are untrusted text. They reach SQL only as bind parameters or as
identifiers quoted by psycopg (``sql.Identifier``). Privilege keywords come from a fixed allow-list. The
resolved role name must also match a configured pattern and fit PostgreSQL's 63-byte limit on names. A longer
name would be silently truncated by the server, and the truncated name could belong to another role.

What ``revoke_writes`` covers, for the watched relations *and* every partition or inheritance child of them
(present ones; future ones through the default privileges):

* the role's direct INSERT, UPDATE, DELETE and TRUNCATE grants, table-level and per column, revoked with
  ``CASCADE``: grants the agent passed on (WITH GRANT OPTION) go too, and are listed in
  :attr:`Revocation.cascaded` for the audit trail. Release does not give those back;
* UPDATE on the sequences the watched tables own (serial and identity columns): ``setval`` is a write;
* ``ALTER DEFAULT PRIVILEGES`` entries of the tables' owners that would grant the role writes on tables (or
  UPDATE on sequences) created later, such as a new partition;
* the role's memberships in roles through which it can write there (``pg_write_all_data`` included).

Roles a quarantine cannot hold are refused before anything changes: superusers, roles with CREATEROLE,
REPLICATION or BYPASSRLS, roles that own a watched relation, and members of any of those (a member can
``SET ROLE`` to them), as well as the enforcer's own role.

After the change has committed, the quarantine checks with the agent's own role that it can no longer write:
in a transaction that is rolled back, ``SET LOCAL ROLE`` and a no-op INSERT, UPDATE (per column) and DELETE
per relation (privileges are checked even when no row matches), plus ``has_table_privilege(.., 'TRUNCATE')``
and ``has_sequence_privilege(.., 'UPDATE')``. Whatever is still open is listed in
:attr:`Revocation.still_writable`, and the roles (or ``PUBLIC``) it comes through in
:attr:`Revocation.inherited`; either makes the quarantine *not enforced*. What stays open is, for example, a
grant to PUBLIC (revoking it would affect every role), or a grant made by another grantor than the owner.

Nothing an agent can do blocks the enforcer for long. No lock is shared with the agent (no advisory lock);
calls are serialised in the process, and concurrent enforcers on one role are retried when PostgreSQL reports
a concurrent update. Every attempt waits at most ``lock_timeout`` for a lock. When a wait times out, the
sessions that blocked it (``pg_blocking_pids``) are looked at: those of the agent's role, or of a role it can
act as, are ended and the attempt is retried; anyone else's are named in the error. All of it is bounded by
``max_wait``; what still could not be done is an :class:`EnforcementError` that says what blocked it.

``nologin`` stops new logins. The role's sessions are ended on purpose, but another login role that is a
member of the agent's role can still ``SET ROLE`` to it: those are listed in ``inherited``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar, cast
from urllib.parse import quote

import psycopg
import psycopg.conninfo
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger("writeguard.pg_enforce")

Mode = Literal["revoke_writes", "nologin"]
MODES: tuple[Mode, ...] = ("revoke_writes", "nologin")
# The privileges a quarantine takes away. TRUNCATE is a write that leaves no row events behind.
WRITE_PRIVILEGES: tuple[str, ...] = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
# The only privileges PostgreSQL grants per column that write (SELECT and REFERENCES do not).
COLUMN_WRITE_PRIVILEGES: tuple[str, ...] = ("INSERT", "UPDATE")
# On a sequence, UPDATE allows setval() (and nextval()); USAGE and SELECT do not set it back.
SEQUENCE_WRITE_PRIVILEGES: tuple[str, ...] = ("UPDATE",)
# Keywords reach SQL only through these maps: a string from a control record is never spliced in.
_PRIV_SQL: dict[str, sql.SQL] = {p: sql.SQL(p) for p in WRITE_PRIVILEGES}
DEFAULT_KINDS: dict[str, tuple[str, ...]] = {"tables": WRITE_PRIVILEGES, "sequences": SEQUENCE_WRITE_PRIVILEGES}
_KIND_SQL: dict[str, sql.SQL] = {"tables": sql.SQL("TABLES"), "sequences": sql.SQL("SEQUENCES")}
_DEFACL_KIND = {"r": "tables", "S": "sequences"}
NAMEDATALEN_MAX = 63  # bytes; PostgreSQL truncates longer identifiers instead of refusing them
# PostgreSQL reads a role spelled "public" (even when quoted) as PUBLIC. It rejects "none". The pg_* names
# are the system's predefined roles.
_RESERVED_ROLES = frozenset({"public", "none"})
# The one predefined role a quarantine takes away (and a release may give back): it writes on every table.
WRITE_ALL_ROLE = "pg_write_all_data"


class EnforcementError(RuntimeError):
    """A quarantine or release could not be done as asked. The message says why.

    A failed quarantine changes nothing: its changes run in one transaction. ``retryable`` says whether
    trying again later may succeed (the database was unreachable or kept the enforcer waiting), as opposed to
    a refusal that will stand (a superuser, an owner, a name outside the pattern).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def template_prefix(template: str) -> str:
    """The fixed text before the first ``{agent_id}`` of a template."""
    return template.split("{agent_id}", 1)[0]


class RoleMapping(BaseModel):
    """How an agent id becomes the PostgreSQL role it logs in as. This is the ``roles:`` config section.

    ``map`` is checked first, then ``template``. Nothing is lower-cased or cleaned up silently. If the result
    does not fullmatch ``pattern``, or is longer than 63 bytes, :class:`EnforcementError` is raised. Keep a
    prefix in the template (``agent_{agent_id}``). A bare ``{agent_id}`` would let a written row name any
    role, and only the refusal of superusers and of the enforcer's own role would stop it.
    """

    # The docstring above is also the config schema's description (schemas/config.schema.json). Since issue 17
    # a template *must* have a fixed prefix that ends in a separator (checked below), roles in ``map`` may be any
    # role, and the enforcer refuses superusers, owners of watched tables, CREATEROLE, REPLICATION, BYPASSRLS
    # and their members in the database.

    model_config = ConfigDict(extra="forbid", frozen=True)

    map: dict[str, str] = Field(default_factory=dict, description="Agent id -> role, explicit.")
    template: str | None = Field(
        None, description="e.g. 'agent_{agent_id}'; {agent_id} is replaced by the agent id as it is."
    )
    pattern: str = Field(
        r"^[a-z_][a-z0-9_]{0,62}$", description="Every resolved role name must fullmatch this regular expression."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"pattern is not a regular expression: {e}") from e
        return v

    @field_validator("template")
    @classmethod
    def _has_placeholder_after_a_prefix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        # Without the placeholder, every agent would be the same role: a typo, not a policy.
        if "{agent_id}" not in v:
            raise ValueError("template must contain {agent_id}")
        prefix = template_prefix(v)
        if not prefix:
            raise ValueError(
                "template must start with a fixed prefix before {agent_id}, e.g. 'agent_{agent_id}': with a bare "
                "'{agent_id}' a written row can name any role (the table owner's, a human's)"
            )
        if prefix[-1].isalnum():
            raise ValueError(
                f"the template's prefix {prefix!r} must end in a separator such as '_' (e.g. 'agent_{{agent_id}}'),"
                " or an agent id could complete it into another role's name"
            )
        if prefix.lower().startswith("pg_") or prefix.lower() in _RESERVED_ROLES:
            raise ValueError(f"the template's prefix {prefix!r} is reserved by PostgreSQL")
        return v

    @model_validator(mode="after")
    def _map_roles_valid(self) -> RoleMapping:
        # A bad explicit mapping is a config error. Report it when the config loads, not during an incident.
        for agent, role in self.map.items():
            try:
                self.check_role(role)
            except EnforcementError as e:
                raise ValueError(f"map[{agent!r}]: {e}") from e
        return self

    def check_role(self, role: str) -> str:
        """Return ``role`` if it is a name a quarantine may act on, otherwise raise EnforcementError.

        The checks do not depend on where the name came from. release() runs them again on names read back
        from the control topic. What the database says about the role (superuser, owner, ...) is checked by
        the enforcer, in the transaction that changes it.
        """
        check_name(role, "role name")
        if re.fullmatch(self.pattern, role) is None:
            raise EnforcementError(f"role name {role!r} does not match pattern {self.pattern!r}")
        if role in _RESERVED_ROLES or role.startswith("pg_"):
            raise EnforcementError(f"role name {role!r} is reserved by PostgreSQL")
        return role

    def role_for(self, agent_id: str) -> str:
        """The role of ``agent_id``: ``map`` first, then ``template``; EnforcementError when neither applies."""
        if not isinstance(agent_id, str) or not agent_id:
            raise EnforcementError("no role for an empty agent id")
        if agent_id in self.map:
            role = self.map[agent_id]
        elif self.template is not None:
            # str.replace, not str.format: the agent id is data, never a format spec ({0.__class__} etc.).
            role = self.template.replace("{agent_id}", agent_id)
        else:
            raise EnforcementError(f"no role for agent {agent_id[:200]!r}: not in roles.map and no roles.template")
        try:
            return self.check_role(role)
        except EnforcementError as e:
            raise EnforcementError(f"agent {agent_id[:200]!r}: {e}") from None


def check_name(name: str, what: str) -> str:
    """A PostgreSQL name as the server keeps it: non-empty text, no NUL, at most 63 bytes of UTF-8."""
    if not isinstance(name, str) or not name:
        raise EnforcementError(f"empty {what}")
    if "\x00" in name:
        raise EnforcementError(f"{what} contains a NUL byte")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise EnforcementError(f"{what} is not valid UTF-8 text") from e
    if size > NAMEDATALEN_MAX:
        raise EnforcementError(
            f"{what} is {size} bytes; PostgreSQL would truncate it to {NAMEDATALEN_MAX} (another role)"
        )
    return name


Privilege = tuple[str, str, str]  # schema, relation, privilege
ColumnPrivilege = tuple[str, str, str, str]  # schema, relation, column ("" = table level), privilege
Relation = tuple[str, str, str, str]  # schema, relation, schema of the watched table, watched table
DefaultPrivilege = tuple[str, str, str, str]  # owner, schema ("" = every schema), "tables"|"sequences", privilege
Membership = tuple[str, str, str]  # role the agent was a member of, "admin" or "", grantor ("" = unknown)
CascadedGrant = tuple[str, str, str, str, str, str]  # schema, relation, column, privilege, grantee, grantor

_FIELDS: dict[str, int] = {  # list fields of a recorded revocation and the width of their entries
    "privileges": 3,
    "column_privileges": 4,
    "grant_options": 4,
    "partitions": 4,
    "sequences": 4,
    "sequence_privileges": 3,
    "default_privileges": 4,
    "default_grant_options": 4,
    "memberships": 3,
    "cascaded": 6,
}


@dataclass(frozen=True)
class Revocation:
    """What one quarantine took away from one role. release() gives back exactly this.

    It is JSON-serialisable (:meth:`to_dict` / :meth:`from_dict`) because it goes on the control topic and is
    read back by ``writeguard release``, possibly by another process, much later.

    ``privileges`` lists table-level grants that were made *directly* to the role (by the relation's owner)
    and are now revoked, on the watched relations and on the ``partitions`` listed (each with the watched
    table it belongs to). ``column_privileges`` is the same for per-column INSERT/UPDATE grants. A table-level
    REVOKE wipes those as well, and they would let the role write otherwise. ``sequence_privileges`` is UPDATE
    taken on the ``sequences`` the watched tables own. ``grant_options`` is the subset (column ``""`` for
    table level, sequences included) that was held WITH GRANT OPTION, so that release restores the option too.
    ``default_privileges`` are ``ALTER DEFAULT PRIVILEGES`` entries taken away (``default_grant_options`` the
    subset held WITH GRANT OPTION), ``memberships`` the roles the agent's role was taken out of.

    ``cascaded`` lists the grants the agent had passed on that the ``REVOKE ... CASCADE`` removed: for the
    audit trail only, release does not give them back. ``still_writable`` lists what the role could still
    write after the quarantine (the check made with its own role), and ``inherited`` the roles, or
    ``PUBLIC``, that this comes through. If either is not empty, the quarantine is not enforced
    (:attr:`enforced`).

    A second quarantine of an already quarantined role takes nothing more, so its Revocation is empty. A
    caller that keeps only the latest record must merge it with the first one (:meth:`merged`), or release
    would give nothing back.
    """

    role: str
    mode: Mode
    privileges: tuple[Privilege, ...]
    had_login: bool | None
    terminated_sessions: int
    inherited: tuple[str, ...] = ()
    column_privileges: tuple[ColumnPrivilege, ...] = ()
    grant_options: tuple[ColumnPrivilege, ...] = ()
    partitions: tuple[Relation, ...] = ()
    sequences: tuple[Relation, ...] = ()
    sequence_privileges: tuple[Privilege, ...] = ()
    default_privileges: tuple[DefaultPrivilege, ...] = ()
    default_grant_options: tuple[DefaultPrivilege, ...] = ()
    memberships: tuple[Membership, ...] = ()
    cascaded: tuple[CascadedGrant, ...] = ()
    still_writable: tuple[str, ...] = ()

    @property
    def enforced(self) -> bool:
        """True when nothing the quarantine looked at is left writable by the role."""
        return not self.inherited and not self.still_writable

    def describe(self) -> str:
        """One line for logs and the control record's ``detail``."""
        taken = len(self.privileges) + len(self.column_privileges) + len(self.sequence_privileges)
        text = f"role {self.role}: {self.mode}, {taken} privileges revoked"
        if self.default_privileges:
            text += f", {len(self.default_privileges)} default privileges"
        if self.memberships:
            text += f", memberships in {', '.join(m[0] for m in self.memberships)}"
        if self.cascaded:
            text += f"; {len(self.cascaded)} grants it had passed on removed (CASCADE)"
        if not self.enforced:
            what = [*self.still_writable, *(f"via {s}" for s in self.inherited)]
            text += f"; not enforced: still writable through {', '.join(what)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.role,
            "mode": self.mode,
            "had_login": self.had_login,
            "terminated_sessions": self.terminated_sessions,
            "inherited": list(self.inherited),
            "still_writable": list(self.still_writable),
        }
        for name in _FIELDS:
            out[name] = [list(p) for p in getattr(self, name)]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Revocation:
        """Parse a recorded revocation strictly. It decides what is GRANTed, so nothing malformed passes.

        Records written before a field existed parse with that field empty.
        """
        if not isinstance(data, Mapping):
            raise EnforcementError("revocation must be a JSON object")
        known = {"role", "mode", "had_login", "terminated_sessions", "inherited", "still_writable", *_FIELDS}
        extra = set(data) - known
        if extra:
            raise EnforcementError(f"revocation has unknown keys {sorted(extra)}")
        role = data.get("role")
        mode = data.get("mode")
        had_login = data.get("had_login")
        terminated = data.get("terminated_sessions", 0)
        if not isinstance(role, str) or not role:
            raise EnforcementError("revocation.role must be a non-empty string")
        if mode not in MODES:
            raise EnforcementError(f"revocation.mode must be one of {MODES}, got {mode!r}")
        if had_login is not None and not isinstance(had_login, bool):
            raise EnforcementError("revocation.had_login must be true, false or null")
        if not isinstance(terminated, int) or isinstance(terminated, bool) or terminated < 0:
            raise EnforcementError("revocation.terminated_sessions must be a non-negative integer")
        texts: dict[str, tuple[str, ...]] = {}
        for name in ("inherited", "still_writable"):
            value = data.get(name, [])
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise EnforcementError(f"revocation.{name} must be a list of strings")
            texts[name] = tuple(value)
        lists = {name: _string_tuples(data.get(name, []), width, name) for name, width in _FIELDS.items()}
        return cls(
            role=role,
            mode=cast(Mode, mode),
            had_login=had_login,
            terminated_sessions=terminated,
            inherited=texts["inherited"],
            still_writable=texts["still_writable"],
            **lists,  # type: ignore[arg-type]
        )

    def merged(self, later: Revocation) -> Revocation:
        """This revocation together with a later one of the same role: what releasing both must give back."""
        if later.role != self.role:
            raise EnforcementError(f"cannot merge revocations of {self.role!r} and {later.role!r}")
        lists = {name: _union(getattr(self, name), getattr(later, name)) for name in _FIELDS}
        # LOGIN is given back only if the role had it before the *first* quarantine took it away.
        return Revocation(
            role=self.role,
            mode=self.mode,
            had_login=self.had_login if self.had_login is not None else later.had_login,
            terminated_sessions=self.terminated_sessions + later.terminated_sessions,
            inherited=later.inherited,
            still_writable=later.still_writable,
            **lists,
        )


T = TypeVar("T")


def _union(a: tuple[T, ...], b: tuple[T, ...]) -> tuple[T, ...]:
    return tuple(dict.fromkeys((*a, *b)))


def _string_tuples(value: Any, width: int, name: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list | tuple):
        raise EnforcementError(f"revocation.{name} must be a list")
    out: list[tuple[str, ...]] = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != width or not all(isinstance(s, str) for s in item):
            raise EnforcementError(f"revocation.{name} entries must be lists of {width} strings, got {item!r}")
        out.append(tuple(item))
    return tuple(out)


def parse_table(name: str) -> tuple[str, str]:
    """Split ``'schema.table'`` at the first dot. The parts are matched exactly (no case folding, no quotes)."""
    schema, dot, table = name.partition(".")
    if not dot or not schema or not table or "\x00" in name:
        raise EnforcementError(f"table must be '<schema>.<table>', got {name!r}")
    return schema, table


def _named(name: str, *parts: str) -> sql.Composed:
    """A statement made of fixed SQL text, with a leading comment that names it."""
    return sql.Composed([sql.SQL("-- writeguard: " + name + "\n"), *(sql.SQL(p) for p in parts)])


# -- SQL --------------------------------------------------------------------------------------------------------
# Every statement starts with a comment that names it (the unit tests' fake database answers by that name).
# Role names are bound parameters everywhere except in GRANT/REVOKE/ALTER statements, where psycopg quotes them.

# The relations a quarantine covers: the watched ones that exist, and every partition or inheritance child of
# them (t, with the watched table each belongs to), and the sequences those own through a serial or identity
# column (s). Names arrive as two text[] bind parameters and are compared as text, never parsed as SQL:
# "public.weird\"; DROP ..." is just a table name that does not exist, or a weird one that does.
_COVERED_CTE = """
WITH RECURSIVE w AS (
    SELECT c.oid
    FROM unnest(%(nsp)s::text[], %(rel)s::text[]) AS w(nsp, rel)
    JOIN pg_namespace n ON n.nspname = w.nsp
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
    WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm')
), tree AS (
    SELECT w.oid, w.oid AS root FROM w
    UNION
    SELECT i.inhrelid, tree.root FROM tree JOIN pg_inherits i ON i.inhparent = tree.oid
), t AS MATERIALIZED (
    SELECT DISTINCT ON (c.oid) c.oid, n.nspname::text AS nsp, c.relname::text AS rel, c.relowner, c.relkind,
           coalesce(c.relacl, acldefault('r', c.relowner)) AS acl,
           rn.nspname::text AS root_nsp, rc.relname::text AS root_rel, c.oid IN (SELECT oid FROM w) AS watched
    FROM tree
    JOIN pg_class c ON c.oid = tree.oid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_class rc ON rc.oid = tree.root
    JOIN pg_namespace rn ON rn.oid = rc.relnamespace
    WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm')
    ORDER BY c.oid, tree.root = c.oid DESC, rn.nspname, rc.relname
), s AS MATERIALIZED (
    SELECT DISTINCT ON (q.oid) q.oid, qn.nspname::text AS nsp, q.relname::text AS rel, q.relowner,
           coalesce(q.relacl, acldefault('s', q.relowner)) AS acl, t.nsp AS of_nsp, t.rel AS of_rel
    FROM t
    JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = t.oid
                    AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
    JOIN pg_class q ON q.oid = d.objid AND q.relkind = 'S'
    JOIN pg_namespace qn ON qn.oid = q.relnamespace
    ORDER BY q.oid, t.watched DESC
)
"""

_COVERED_SQL = _named(
    "covered",
    _COVERED_CTE,
    """
SELECT 'rel', t.oid::bigint, t.nsp, t.rel, t.relkind::text, pg_get_userbyid(t.relowner)::text,
       t.root_nsp, t.root_rel, t.watched
FROM t
UNION ALL
SELECT 'seq', s.oid::bigint, s.nsp, s.rel, 'S', pg_get_userbyid(s.relowner)::text, s.of_nsp, s.of_rel, false
FROM s
ORDER BY 1, 3, 4
""",
)

# The role, and what makes it a role a quarantine cannot hold: its attributes or those of a role it is a
# member of (it can SET ROLE to that one), and whether it can act as the enforcer itself.
_ROLE_SQL = """-- writeguard: role
SELECT r.oid::bigint, r.rolcanlogin, r.rolsuper,
       r.rolname = current_user OR r.rolname = session_user OR pg_has_role(r.oid, current_user, 'MEMBER')
         OR pg_has_role(r.oid, session_user, 'MEMBER'),
       ARRAY(SELECT x.rolname::text || ' (' || concat_ws(', ',
                        CASE WHEN x.rolsuper THEN 'SUPERUSER' END, CASE WHEN x.rolcreaterole THEN 'CREATEROLE' END,
                        CASE WHEN x.rolreplication THEN 'REPLICATION' END,
                        CASE WHEN x.rolbypassrls THEN 'BYPASSRLS' END) || ')'
             FROM pg_roles x
             WHERE (x.rolsuper OR x.rolcreaterole OR x.rolreplication OR x.rolbypassrls)
               AND pg_has_role(r.oid, x.oid, 'MEMBER')
             ORDER BY x.oid <> r.oid, 1)
FROM pg_roles r WHERE r.rolname = %(role)s
"""

# Covered relations the role owns, or whose owner it is a member of: it could grant itself everything back.
_OWNED_SQL = _named(
    "owned",
    _COVERED_CTE,
    """
SELECT t.nsp, t.rel, pg_get_userbyid(t.relowner)::text FROM t
WHERE pg_has_role(%(role_oid)s::oid, t.relowner, 'MEMBER')
ORDER BY 1, 2
""",
)

# Direct grants read from the raw ACLs with aclexplode(). information_schema.role_table_grants is not used:
# it shows only grants where grantor or grantee is a role the *current* user is enabled for, so what a
# non-superuser enforcer sees would depend on its own memberships. It also gives no grantor oid to compare
# with the owner and says nothing about column grants (column_privileges is a separate view with the same
# filter). relacl is NULL until the first GRANT; acldefault() then stands for the owner's implicit rights.
_DIRECT_SQL = _named(
    "direct",
    _COVERED_CTE,
    """
SELECT 'rel' AS kind, t.nsp, t.rel, '' AS col, a.privilege_type, a.is_grantable
FROM t CROSS JOIN LATERAL aclexplode(t.acl) AS a
WHERE a.grantee = %(role_oid)s::oid AND a.grantor = t.relowner AND a.privilege_type = ANY(%(privs)s)
UNION ALL
SELECT 'rel', t.nsp, t.rel, att.attname::text, a.privilege_type, a.is_grantable
FROM t
JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped AND att.attacl IS NOT NULL
CROSS JOIN LATERAL aclexplode(att.attacl) AS a
WHERE a.grantee = %(role_oid)s::oid AND a.grantor = t.relowner AND a.privilege_type = ANY(%(colprivs)s)
UNION ALL
SELECT 'seq', s.nsp, s.rel, '', a.privilege_type, a.is_grantable
FROM s CROSS JOIN LATERAL aclexplode(s.acl) AS a
WHERE a.grantee = %(role_oid)s::oid AND a.grantor = s.relowner AND a.privilege_type = ANY(%(seqprivs)s)
ORDER BY 1, 2, 3, 4, 5
""",
)

# Every ACL item on the covered relations, their columns and sequences, to see what a CASCADE removed.
_ACL_ITEMS_SQL = _named(
    "acl items",
    _COVERED_CTE,
    """
, items AS (
    SELECT t.nsp, t.rel, '' AS col, a.*, t.relowner AS owner FROM t CROSS JOIN LATERAL aclexplode(t.acl) AS a
    UNION ALL
    SELECT t.nsp, t.rel, att.attname::text, a.*, t.relowner
    FROM t
    JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped
                         AND att.attacl IS NOT NULL
    CROSS JOIN LATERAL aclexplode(att.attacl) AS a
    UNION ALL
    SELECT s.nsp, s.rel, '', a.*, s.relowner FROM s CROSS JOIN LATERAL aclexplode(s.acl) AS a
)
SELECT nsp, rel, col, privilege_type,
       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(grantee)::text END,
       pg_get_userbyid(grantor)::text,
       grantee = %(role_oid)s::oid AND grantor = owner
FROM items
""",
)

# ALTER DEFAULT PRIVILEGES entries of the covered relations' owners that grant the role writes on tables (a
# partition created later) or UPDATE on sequences. "" as schema: the owner's entry for every schema.
_DEFAULTS_SQL = _named(
    "defaults",
    _COVERED_CTE,
    """
SELECT pg_get_userbyid(d.defaclrole)::text, coalesce(n.nspname::text, ''), d.defaclobjtype::text,
       a.privilege_type, a.is_grantable
FROM pg_default_acl d
LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
CROSS JOIN LATERAL aclexplode(d.defaclacl) AS a
WHERE a.grantee = %(role_oid)s::oid AND d.defaclrole IN (SELECT relowner FROM t)
  AND ((d.defaclobjtype = 'r' AND a.privilege_type = ANY(%(privs)s))
    OR (d.defaclobjtype = 'S' AND a.privilege_type = ANY(%(seqprivs)s)))
ORDER BY 1, 2, 3, 4
""",
)

# Roles that hold a write on a covered relation (or UPDATE on a covered sequence), as oids; 0 is PUBLIC.
_SOURCE_OIDS = """
, src AS (
    SELECT a.grantee AS oid FROM t CROSS JOIN LATERAL aclexplode(t.acl) AS a WHERE a.privilege_type = ANY(%(privs)s)
    UNION
    SELECT a.grantee
    FROM t
    JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped
                         AND att.attacl IS NOT NULL
    CROSS JOIN LATERAL aclexplode(att.attacl) AS a
    WHERE a.privilege_type = ANY(%(colprivs)s)
    UNION
    SELECT a.grantee FROM s CROSS JOIN LATERAL aclexplode(s.acl) AS a WHERE a.privilege_type = ANY(%(seqprivs)s)
    UNION
    SELECT 'pg_write_all_data'::regrole::oid WHERE EXISTS (SELECT FROM t)
)
"""

# The role's direct memberships in roles through which it can write on a covered relation.
_MEMBERSHIPS_SQL = _named(
    "memberships",
    _COVERED_CTE,
    _SOURCE_OIDS,
    """
SELECT g.rolname::text, m.admin_option, coalesce(pg_get_userbyid(m.grantor)::text, '')
FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
WHERE m.member = %(role_oid)s::oid
  AND EXISTS (SELECT FROM src WHERE src.oid NOT IN (0, %(role_oid)s::oid) AND pg_has_role(g.oid, src.oid, 'MEMBER'))
ORDER BY 1
""",
)

# Where remaining writes come from. Membership is checked with MEMBER, not USAGE: a NOINHERIT member can
# still SET ROLE and write.
_SOURCES_SQL = _named(
    "sources",
    _COVERED_CTE,
    _SOURCE_OIDS,
    """
SELECT DISTINCT CASE WHEN src.oid = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(src.oid)::text END
FROM src WHERE src.oid = 0 OR pg_has_role(%(role_oid)s::oid, src.oid, 'MEMBER')
ORDER BY 1
""",
)

# The checks of the verification that need no SET ROLE: TRUNCATE cannot be tried without doing it, and
# a sequence's UPDATE is what setval() needs. Columns are listed for the per-column UPDATE attempts.
_TRUNCATE_SQL = _named(
    "truncate",
    _COVERED_CTE,
    """
SELECT t.nsp, t.rel FROM t
WHERE t.relkind IN ('r', 'p', 'f') AND has_table_privilege(%(role_oid)s::oid, t.oid, 'TRUNCATE')
ORDER BY 1, 2
""",
)
_SEQUENCE_OPEN_SQL = _named(
    "sequences open",
    _COVERED_CTE,
    """
SELECT s.nsp, s.rel FROM s WHERE has_sequence_privilege(%(role_oid)s::oid, s.oid, 'UPDATE') ORDER BY 1, 2
""",
)
_COLUMNS_SQL = _named(
    "columns",
    _COVERED_CTE,
    """
SELECT t.nsp, t.rel, att.attname::text, has_column_privilege(%(role_oid)s::oid, t.oid, att.attnum, 'UPDATE')
FROM t JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped
WHERE t.relkind IN ('r', 'p', 'f', 'v')
ORDER BY 1, 2, att.attnum
""",
)
_CAN_WRITE_SQL = """-- writeguard: can write
SELECT has_table_privilege(%(role_oid)s::oid, %(rel)s::oid, %(priv)s)
    OR has_any_column_privilege(%(role_oid)s::oid, %(rel)s::oid, %(priv)s)
"""

# nologin mode: login roles that can still act as the agent's role with SET ROLE. Superusers can do that to
# any role and are left out.
_SET_ROLE_SQL = """-- writeguard: set role members
SELECT r.rolname::text FROM pg_roles AS r
WHERE r.rolcanlogin AND NOT r.rolsuper AND r.oid <> %(role_oid)s::oid
  AND pg_has_role(r.oid, %(role_oid)s::oid, 'MEMBER')
ORDER BY 1
"""

_TERMINATE_SQL = """-- writeguard: terminate
SELECT pid, pg_terminate_backend(pid, %(wait_ms)s)
FROM pg_stat_activity
WHERE usename = %(role)s AND pid <> pg_backend_pid()
"""

# release: of the groups a revocation names, whether each is one a quarantine refuses, and whether it gives
# writes on a covered relation.
_WRITE_GROUPS_SQL = _named(
    "write groups",
    _COVERED_CTE,
    _SOURCE_OIDS,
    """
SELECT g.rolname::text, (g.rolsuper OR g.rolcreaterole OR g.rolreplication OR g.rolbypassrls
        OR EXISTS (SELECT FROM pg_roles x WHERE (x.rolsuper OR x.rolcreaterole OR x.rolreplication OR x.rolbypassrls)
                   AND pg_has_role(g.oid, x.oid, 'MEMBER'))
        OR EXISTS (SELECT FROM t WHERE pg_has_role(g.oid, t.relowner, 'MEMBER'))),
       EXISTS (SELECT FROM src WHERE src.oid <> 0 AND pg_has_role(g.oid, src.oid, 'MEMBER'))
FROM pg_roles g WHERE g.rolname = ANY(%(groups)s)
""",
)

# Who blocks a backend right now. Asked from a second connection while an attempt waits.
_BLOCKERS_SQL = """-- writeguard: blockers
SELECT a.pid, coalesce(a.usename::text, ''), coalesce(a.application_name, ''), coalesce(a.state, ''),
       coalesce(extract(epoch FROM now() - a.xact_start)::int, 0)
FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(%(pid)s))
"""

# Of the sessions that blocked the enforcer, end those of the agent's role or of a role it can act as
# (pg_has_role(agent, session role, MEMBER)); never a superuser's, never the enforcer's own.
_END_BLOCKERS_SQL = """-- writeguard: end blockers
SELECT a.pid, pg_terminate_backend(a.pid, %(wait_ms)s)
FROM pg_stat_activity a
WHERE a.pid = ANY(%(pids)s) AND a.pid <> pg_backend_pid() AND a.usesysid IS NOT NULL
  AND NOT EXISTS (SELECT FROM pg_roles s WHERE s.oid = a.usesysid AND s.rolsuper)
  AND pg_has_role((SELECT oid FROM pg_roles WHERE rolname = %(role)s), a.usesysid, 'MEMBER')
"""


@dataclass(frozen=True)
class _Rel:
    oid: int
    kind: str  # pg_class.relkind
    owner: str
    root: tuple[str, str]  # the watched table it is (or belongs to)
    watched: bool


@dataclass(frozen=True)
class _Covered:
    """The covered relations and sequences, as the database has them now."""

    relations: dict[tuple[str, str], _Rel]
    sequences: dict[tuple[str, str], tuple[str, str]]  # (nsp, seq) -> the relation owning it


class _BlockerWatch:
    """While one attempt runs, notes which sessions block the enforcer's backend (``pg_blocking_pids``).

    pg_blocking_pids() answers only while the wait lasts, so it is asked from a second connection in a thread,
    every ``every`` seconds once the attempt has run ``after`` seconds. Quick attempts ask nothing.
    """

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any] | None], pid: int, after: float = 0.2, every: float = 0.1
    ) -> None:
        self._connect = connect
        self._pid = pid
        self._after = after
        self._every = every
        self._stop = threading.Event()
        self._seen: dict[int, tuple[Any, ...]] = {}
        self._thread = threading.Thread(target=self._run, name="writeguard-pg-watch", daemon=True)

    def __enter__(self) -> _BlockerWatch:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def blockers(self) -> list[tuple[Any, ...]]:
        return [self._seen[pid] for pid in sorted(self._seen)]

    def _run(self) -> None:
        if self._stop.wait(self._after):
            return
        conn = self._connect()
        if conn is None:
            return
        while True:
            try:
                for row in conn.execute(_BLOCKERS_SQL, {"pid": self._pid}).fetchall():
                    self._seen[int(row[0])] = tuple(row)
            except psycopg.Error:
                log.debug("could not ask who blocks the enforcer", exc_info=True)
                return
            if self._stop.wait(self._every):
                return


def _describe_blockers(blockers: Sequence[tuple[Any, ...]]) -> str:
    if not blockers:
        return "a session that could not be identified"
    parts = []
    for pid, user, app, state, age in blockers:
        parts.append(f"pid {pid} (role {user!r}, application {app!r}, {state}, transaction open {age} s)")
    return ", ".join(parts)


def _concurrent_update(e: psycopg.Error) -> bool:
    """A conflict with a concurrent transaction that a new attempt resolves (another enforcer, a GRANT)."""
    if isinstance(e, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
        return True
    return isinstance(e, psycopg.errors.InternalError_) and "concurrently" in str(e)


_MASK = "**********"


def connect_error_text(e: psycopg.Error, dsn: str) -> str:
    """psycopg's connection error, without any part of the DSN's password.

    libpq quotes the connection string when it cannot parse it, and the piece it quotes may be the password
    (``password=hunter2 sekrit`` gives 'missing "=" after "sekrit"'). So an unparsable DSN gets a fixed text;
    for a parsable one, the password (also percent-encoded, as a URL holds it) is masked wherever it appears.

    >>> try:
    ...     psycopg.connect("host=db password=hunter2 sekrit")
    ... except psycopg.Error as e:
    ...     print(connect_error_text(e, "host=db password=hunter2 sekrit"))
    the connection string is not valid libpq syntax (details withheld: they may quote the password)
    """
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the connection string is not valid libpq syntax (details withheld: they may quote the password)"
    text = str(e).strip()
    password = params.get("password")
    if isinstance(password, str) and password:
        for form in sorted({password, quote(password, safe=""), quote(password)}, key=len, reverse=True):
            text = text.replace(form, _MASK)
    return text


def _connection_lost(e: psycopg.Error, conn: psycopg.Connection[Any] | None = None) -> bool:
    state = e.sqlstate
    return (
        (conn is not None and (conn.closed or conn.broken))
        or state is None
        or state[:2] == "08"
        or state
        in (
            "57P01",  # admin_shutdown
            "57P02",  # crash_shutdown
            "57P03",  # cannot_connect_now
        )
    )


R = TypeVar("R")


class PostgresEnforcer:
    """Quarantines agents by changing their roles in one PostgreSQL database.

    ``dsn`` must log in as a superuser, or as a role that owns the watched tables, has CREATEROLE (for
    ``nologin``), is a member of ``pg_signal_backend`` (to end sessions) and of the agents' roles (to check
    with ``SET ROLE`` that they can no longer write; without it, the check relies on the catalog's
    ``has_*_privilege``). It is connected lazily and reconnected after an error, so a database restart does
    not disable enforcement for good. Calls are serialised by a lock; the worker runs them in one thread.

    ``terminate_sessions`` ends the role's open sessions after the change has committed. A REVOKE stops the
    *next* statement of an open transaction, but the rows that transaction wrote before still COMMIT
    unless its session is ended (which rolls them back). In ``nologin`` mode, open sessions are not affected
    by NOLOGIN at all. Sessions of the agent that block the enforcer are ended in any case.

    ``lock_timeout`` bounds each wait for a lock, ``max_wait`` all the attempts of one change (and, separately,
    of its verification).
    """

    def __init__(
        self,
        dsn: str,
        roles: RoleMapping,
        tables: Sequence[str],
        mode: Mode = "revoke_writes",
        *,
        terminate_sessions: bool = True,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        terminate_wait: float = 5.0,
        lock_timeout: float = 3.0,
        max_wait: float = 30.0,
    ) -> None:
        if mode not in MODES:
            raise EnforcementError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(tables, str):
            raise EnforcementError("tables must be a sequence of '<schema>.<table>' names, not one string")
        self._dsn = dsn
        self._roles = roles
        self._tables: tuple[tuple[str, str], ...] = tuple(dict.fromkeys(parse_table(t) for t in tables))
        if not self._tables:
            raise EnforcementError("no tables to enforce on")
        self._mode: Mode = mode
        self._terminate = terminate_sessions
        self._connect_timeout = connect_timeout
        self._statement_timeout_ms = max(1, int(statement_timeout * 1000))
        self._terminate_wait_ms = max(0, int(terminate_wait * 1000))
        self._lock_timeout_ms = max(1, int(lock_timeout * 1000))
        self._max_wait = max(0.0, max_wait)
        self._conn: psycopg.Connection[Any] | None = None
        self._watch_conn: psycopg.Connection[Any] | None = None
        self._lock = threading.RLock()

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(f"{s}.{t}" for s, t in self._tables)

    # -- connection -------------------------------------------------------------------------------------------

    def _open(self, application_name: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self._dsn,
            autocommit=True,  # transactions are explicit: conn.transaction()
            connect_timeout=max(2, math.ceil(self._connect_timeout)),
            application_name=application_name,
        )
        # Nothing may stall the worker for good: a stuck statement, or a lock wait (also set per attempt).
        conn.execute("SELECT set_config('statement_timeout', %s, false)", [str(self._statement_timeout_ms)])
        conn.execute("SELECT set_config('lock_timeout', %s, false)", [str(self._lock_timeout_ms)])
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.close()
        try:
            conn = self._open("writeguard-enforcer")
        except psycopg.Error as e:
            # The text goes into the control record and logs; the cause is dropped because its text is libpq's.
            msg = connect_error_text(e, self._dsn)
            raise EnforcementError(f"cannot connect to PostgreSQL for enforcement: {msg}", retryable=True) from None
        self._conn = conn
        return conn

    def _watch_connection(self) -> psycopg.Connection[Any] | None:
        conn = self._watch_conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        try:
            self._watch_conn = self._open("writeguard-enforcer-watch")
        except psycopg.Error as e:
            log.debug("no second connection to watch for blockers: %s", connect_error_text(e, self._dsn))
            self._watch_conn = None
        return self._watch_conn

    def close(self) -> None:
        for name in ("_conn", "_watch_conn"):
            conn = getattr(self, name)
            setattr(self, name, None)
            if conn is not None:
                try:
                    conn.close()
                except psycopg.Error:  # pragma: no cover - closing a dead connection
                    log.debug("closing an enforcement connection failed", exc_info=True)

    def __enter__(self) -> PostgresEnforcer:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- bounded attempts -------------------------------------------------------------------------------------

    def _attempt(self, conn: psycopg.Connection[Any]) -> None:
        """Start an attempt's transaction: its lock waits are bounded."""
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [str(self._lock_timeout_ms)])

    def _retrying(
        self,
        what: str,
        role: str,
        run: Callable[[psycopg.Connection[Any]], R],
        *,
        end_blockers: bool,
        changes: bool = True,
    ) -> tuple[R, int]:
        """Run ``run`` (one transaction) until it succeeds or ``max_wait`` has passed.

        Returns its result and how many of the role's sessions were ended because they blocked it. A lock wait
        that timed out is retried at once (the wait itself spaced the attempts); a concurrent update or a lost
        connection after a backoff. ``changes``: ``run`` changes the database (a failed attempt changed nothing).
        """
        unchanged = ", nothing changed" if changes else ""
        deadline = time.monotonic() + self._max_wait
        backoff = 0.05
        ended = 0
        attempt = 0
        while True:
            attempt += 1
            conn = self._connection()
            pause = 0.0
            watch = _BlockerWatch(self._watch_connection, conn.info.backend_pid)
            try:
                with watch:
                    return run(conn), ended
            except psycopg.errors.LockNotAvailable:
                blockers = watch.blockers  # the watch has stopped: its findings are complete
                stopped = self._end_blockers(conn, role, blockers) if end_blockers else set()
                ended += len(stopped)
                others = [row for row in blockers if int(row[0]) not in stopped]
                if stopped:
                    log.warning(
                        "role %s: ended %d of its sessions that blocked the %s: pids %s",
                        role,
                        len(stopped),
                        what,
                        sorted(stopped),
                    )
                why = f"waited {self._lock_timeout_ms / 1000:g} s for a lock held by {_describe_blockers(others)}"
                if stopped and not others:
                    why = f"its own sessions blocked it (pids {sorted(stopped)}, ended)"
            except psycopg.errors.QueryCanceled as e:
                raise EnforcementError(f"{what} took too long{unchanged}: {e}", retryable=True) from e
            except psycopg.Error as e:
                if _connection_lost(e, conn):
                    self.close()
                    why, pause = f"the connection failed: {e}", backoff
                elif _concurrent_update(e):
                    why, pause = f"a concurrent change: {e}", backoff
                else:
                    raise
            if time.monotonic() + pause >= deadline:
                raise EnforcementError(
                    f"{what} not done after {attempt} attempts in {self._max_wait:g} s{unchanged}: {why}",
                    retryable=True,
                )
            log.info("%s: attempt %d not done (%s); trying again", what, attempt, why)
            time.sleep(pause)
            backoff = min(backoff * 2, 2.0)

    def _end_blockers(self, conn: psycopg.Connection[Any], role: str, blockers: list[tuple[Any, ...]]) -> set[int]:
        if not blockers:
            return set()
        try:
            rows = conn.execute(
                _END_BLOCKERS_SQL,
                {"pids": [int(b[0]) for b in blockers], "role": role, "wait_ms": self._terminate_wait_ms},
            ).fetchall()
        except psycopg.Error:
            log.exception("role %s: could not end the sessions that blocked the enforcer", role)
            return set()
        return {int(pid) for pid, ok in rows if ok}

    # -- quarantine -------------------------------------------------------------------------------------------

    def _params(self, role_oid: int) -> dict[str, Any]:
        return {
            "nsp": [s for s, _ in self._tables],
            "rel": [t for _, t in self._tables],
            "role_oid": role_oid,
            "privs": list(WRITE_PRIVILEGES),
            "colprivs": list(COLUMN_WRITE_PRIVILEGES),
            "seqprivs": list(SEQUENCE_WRITE_PRIVILEGES),
        }

    def _covered(self, conn: psycopg.Connection[Any]) -> _Covered:
        relations: dict[tuple[str, str], _Rel] = {}
        sequences: dict[tuple[str, str], tuple[str, str]] = {}
        for kind, oid, nsp, rel, relkind, owner, of_nsp, of_rel, watched in conn.execute(
            _COVERED_SQL, self._params(0)
        ).fetchall():
            if kind == "rel":
                relations[(nsp, rel)] = _Rel(int(oid), str(relkind), str(owner), (of_nsp, of_rel), bool(watched))
            else:
                sequences[(nsp, rel)] = (of_nsp, of_rel)
        return _Covered(relations, sequences)

    def _lookup_role(self, conn: psycopg.Connection[Any], role: str) -> tuple[int, bool]:
        """(oid, rolcanlogin) of a role that may be quarantined; EnforcementError for one that may not."""
        row = conn.execute(_ROLE_SQL, {"role": role}).fetchone()
        if row is None:
            raise EnforcementError(f"role {role!r} does not exist")
        oid, can_login, is_super, is_self, privileged = row
        if is_super:
            # Privileges do not bind a superuser, and a hostile agent id must not lock out an administrator.
            raise EnforcementError(f"role {role!r} is a superuser: writeguard does not quarantine superusers")
        if is_self:
            raise EnforcementError(f"role {role!r} is the enforcer's own role, or can act as it")
        if privileged:
            raise EnforcementError(
                f"role {role!r} can act as {', '.join(privileged)}: a quarantine cannot hold a role with SUPERUSER, "
                "CREATEROLE, REPLICATION or BYPASSRLS (or a member of one); it is refused"
            )
        owned = conn.execute(_OWNED_SQL, self._params(int(oid))).fetchall()
        if owned:
            what = ", ".join(f"{s}.{t} (owner {o})" for s, t, o in owned[:10])
            raise EnforcementError(
                f"role {role!r} owns, or is a member of the owner of, watched {what}: an owner can grant itself "
                "everything back, and revoking it would stop the application; it is refused"
            )
        return int(oid), bool(can_login)

    def quarantine(self, agent_id: str) -> Revocation:
        """Take the agent's role's writes (or its LOGIN) away, end its sessions, check, return what was taken.

        The change is one transaction, retried as described in the module docstring; sessions are ended only
        after the commit, so a session cannot reconnect in between and find its rights still there. Then the
        role's own attempts show what it can still write (``still_writable``). An already quarantined role loses
        nothing more; the result then has empty ``privileges`` (and ``had_login=False`` in nologin mode).
        """
        role = self._roles.role_for(agent_id)
        with self._lock:
            try:
                (oid, taken), blockers_ended = self._retrying(
                    f"quarantine of role {role!r}", role, lambda conn: self._change(conn, role), end_blockers=True
                )
            except psycopg.Error as e:
                raise EnforcementError(
                    f"quarantine of role {role!r} failed, nothing changed: {e}", retryable=True
                ) from e
            terminated = self._terminate_sessions(role) if self._terminate else 0
            still, inherited, verify_ended = self._verify(role, oid)
        rev = Revocation(
            role=role,
            mode=self._mode,
            privileges=taken.privileges,
            had_login=taken.had_login,
            terminated_sessions=terminated + blockers_ended + verify_ended,
            inherited=inherited,
            column_privileges=taken.column_privileges,
            grant_options=taken.grant_options,
            partitions=taken.partitions,
            sequences=taken.sequences,
            sequence_privileges=taken.sequence_privileges,
            default_privileges=taken.default_privileges,
            default_grant_options=taken.default_grant_options,
            memberships=taken.memberships,
            cascaded=taken.cascaded,
            still_writable=still,
        )
        if not rev.enforced:
            log.warning("%s", rev.describe())
        return rev

    def _change(self, conn: psycopg.Connection[Any], role: str) -> tuple[int, Revocation]:
        """One attempt at the quarantine's change, in one transaction. Returns the role's oid and what it took."""
        with conn.transaction():
            self._attempt(conn)
            oid, can_login = self._lookup_role(conn, role)
            params = self._params(oid)
            covered = self._covered(conn)
            missing = sorted(f"{s}.{t}" for s, t in self._tables if (s, t) not in covered.relations)
            if missing:
                log.warning("role %s: watched tables not found, skipped: %s", role, missing)
            if self._mode == "nologin":
                if can_login:
                    conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
                return oid, Revocation(role, "nologin", (), can_login, 0)
            before = conn.execute(_ACL_ITEMS_SQL, params).fetchall()
            memberships = [
                (str(g), "admin" if admin else "", str(grantor))
                for g, admin, grantor in conn.execute(_MEMBERSHIPS_SQL, params).fetchall()
            ]
            for group, _, _ in memberships:
                conn.execute(sql.SQL("REVOKE {} FROM {} CASCADE").format(sql.Identifier(group), sql.Identifier(role)))
            direct = conn.execute(_DIRECT_SQL, params).fetchall()
            defaults = conn.execute(_DEFAULTS_SQL, params).fetchall()
            self._revoke(conn, role, direct, defaults)
            after = {tuple(r[:6]) for r in conn.execute(_ACL_ITEMS_SQL, params).fetchall()}
        cascaded = tuple(sorted({tuple(r[:6]) for r in before if not r[6]} - after))
        rels = [(s, t, c, p, g) for kind, s, t, c, p, g in direct if kind == "rel"]
        seqs = [(s, t, p, g) for kind, s, t, _, p, g in direct if kind == "seq"]
        used = {(s, t) for s, t, *_ in rels}
        partitions = tuple(
            (s, t, *info.root)
            for (s, t), info in sorted(covered.relations.items())
            if not info.watched and (s, t) in used
        )
        used_seqs = {(s, t) for s, t, _, _ in seqs}
        sequences = tuple((s, q, *covered.sequences[(s, q)]) for s, q in sorted(used_seqs))
        dflt = [(str(o), str(n), _DEFACL_KIND[k], str(p), bool(g)) for o, n, k, p, g in defaults]
        return oid, Revocation(
            role=role,
            mode="revoke_writes",
            privileges=tuple((s, t, p) for s, t, c, p, _ in rels if not c),
            had_login=None,
            terminated_sessions=0,
            column_privileges=tuple((s, t, c, p) for s, t, c, p, _ in rels if c),
            grant_options=(
                *((s, t, c, p) for s, t, c, p, g in rels if g),
                *((s, q, "", p) for s, q, p, g in seqs if g),
            ),
            partitions=partitions,
            sequences=cast(tuple[Relation, ...], sequences),
            sequence_privileges=tuple((s, q, p) for s, q, p, _ in seqs),
            default_privileges=tuple((o, n, k, p) for o, n, k, p, _ in dflt),
            default_grant_options=tuple((o, n, k, p) for o, n, k, p, g in dflt if g),
            memberships=tuple(memberships),
            cascaded=cast(tuple[CascadedGrant, ...], cascaded),
        )

    def _revoke(
        self, conn: psycopg.Connection[Any], role: str, direct: list[tuple[Any, ...]], defaults: list[tuple[Any, ...]]
    ) -> None:
        """REVOKE ... CASCADE each direct grant, then the default privileges. Every name is quoted by psycopg."""
        who = sql.Identifier(role)
        for kind, schema, rel, column, priv, _ in direct:
            target = sql.Identifier(schema, rel)
            if kind == "seq":
                stmt = sql.SQL("REVOKE UPDATE ON SEQUENCE {} FROM {} CASCADE").format(target, who)
            elif column:
                stmt = sql.SQL("REVOKE {} ({}) ON TABLE {} FROM {} CASCADE").format(
                    _PRIV_SQL[priv], sql.Identifier(column), target, who
                )
            else:
                stmt = sql.SQL("REVOKE {} ON TABLE {} FROM {} CASCADE").format(_PRIV_SQL[priv], target, who)
            conn.execute(stmt)
        for owner, schema, objtype, priv, _ in defaults:
            conn.execute(_default_acl("REVOKE", owner, schema, _DEFACL_KIND[objtype], priv, role, False))

    def _verify(self, role: str, oid: int) -> tuple[tuple[str, ...], tuple[str, ...], int]:
        """After the commit: what the role can still write (its own attempts), through which roles, and how many
        of its sessions were ended because they blocked the check.

        It never raises: the change has committed, and the Revocation that release needs must not be lost. A
        verification that cannot be done is reported as not enforced.
        """
        what = f"verification of role {role!r}'s quarantine"
        try:
            (still, inherited), ended = self._retrying(
                what, role, lambda conn: self._verify_once(conn, role, oid), end_blockers=True, changes=False
            )
        except (EnforcementError, psycopg.Error) as e:
            log.error("%s could not be done: %s", what, e)
            return (f"unverified: {e}"[:500],), (), 0
        return still, inherited, ended

    def _verify_once(
        self, conn: psycopg.Connection[Any], role: str, oid: int
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        params = self._params(oid)
        if self._mode == "nologin":
            row = conn.execute(_ROLE_SQL, {"role": role}).fetchone()
            still_login = ("LOGIN",) if row is not None and row[1] else ()
            members = tuple(str(r[0]) for r in conn.execute(_SET_ROLE_SQL, params).fetchall())
            return still_login, members
        open_: list[str] = []
        with conn.transaction(force_rollback=True):
            self._attempt(conn)
            covered = self._covered(conn)
            columns = conn.execute(_COLUMNS_SQL, params).fetchall()
            truncate = conn.execute(_TRUNCATE_SQL, params).fetchall()
            sequences = conn.execute(_SEQUENCE_OPEN_SQL, params).fetchall()
            sources = [str(r[0]) for r in conn.execute(_SOURCES_SQL, params).fetchall()]
            try:
                with conn.transaction():
                    # set_config, not SET ROLE: the role name stays a bound parameter.
                    conn.execute("-- writeguard: set role\nSELECT set_config('role', %s, true)", [role])
                as_role = True
            except psycopg.errors.InsufficientPrivilege:
                log.warning("role %s: the enforcer cannot SET ROLE to it; checking the catalog only", role)
                as_role = False
            for (nsp, rel), info in sorted(covered.relations.items()):
                if info.kind == "m":
                    continue  # a materialized view is not written to
                target = sql.Identifier(nsp, rel)
                name = f"{nsp}.{rel}"
                probes: list[tuple[str, str, sql.Composed, bool | None]] = [
                    ("INSERT", "", sql.SQL("INSERT INTO {} SELECT WHERE false").format(target), None),
                    ("DELETE", "", sql.SQL("DELETE FROM {} WHERE false").format(target), None),
                ]
                probes += [
                    (
                        "UPDATE",
                        col,
                        sql.SQL("UPDATE {} SET {} = DEFAULT WHERE false").format(target, sql.Identifier(col)),
                        bool(can),
                    )
                    for n, r, col, can in columns
                    if (n, r) == (nsp, rel)
                ]
                for priv, col, stmt, catalog in probes:
                    writable = self._probe(conn, stmt) if as_role else None
                    if writable is None:  # could not tell by trying: ask the catalog
                        writable = catalog if catalog is not None else self._can_write(conn, oid, info.oid, priv)
                    if writable:
                        open_.append(f"{priv} ({col}) on {name}" if col else f"{priv} on {name}")
            open_ += [f"TRUNCATE on {n}.{r}" for n, r in truncate]
            open_ += [f"UPDATE on sequence {n}.{r} (setval)" for n, r in sequences]
        if open_ and not sources:
            sources = [role]  # writable for a reason the catalog query does not know: report it anyway
        return tuple(open_), tuple(sources)

    @staticmethod
    def _probe(conn: psycopg.Connection[Any], stmt: sql.Composed) -> bool | None:
        """Try a write that touches no row, in a savepoint: True if it went through, False if refused."""
        try:
            with conn.transaction():
                conn.execute(stmt)
        except psycopg.errors.InsufficientPrivilege:
            return False
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            raise
        except psycopg.Error as e:
            if _connection_lost(e, conn):
                raise
            # Not a privilege answer (a view that cannot be written, a generated column, ...): the catalog decides.
            log.debug("write probe %s: %s", stmt, e)
            return None
        return True

    @staticmethod
    def _can_write(conn: psycopg.Connection[Any], oid: int, rel_oid: int, priv: str) -> bool:
        row = conn.execute(_CAN_WRITE_SQL, {"role_oid": oid, "rel": rel_oid, "priv": priv}).fetchone()
        return bool(row and row[0])

    def _terminate_sessions(self, role: str) -> int:
        """End the role's backends, waiting up to terminate_wait for each to exit. Returns how many ended.

        The change has committed by now. An error here must not lose the Revocation that release needs, so
        it is logged rather than raised.
        """
        try:
            cur = self._connection().execute(_TERMINATE_SQL, {"role": role, "wait_ms": self._terminate_wait_ms})
            rows = cur.fetchall()
        except (psycopg.Error, EnforcementError):
            log.exception("role %s: could not end its sessions", role)
            return 0
        ended = sum(1 for _, ok in rows if ok)
        if ended < len(rows):
            log.warning("role %s: %d of %d sessions did not end in time", role, len(rows) - ended, len(rows))
        return ended

    # -- release ----------------------------------------------------------------------------------------------

    def _check_release(self, rev: Revocation) -> None:
        """Refuse a revocation this enforcer would not have produced, before connecting.

        A record on the control topic must not be able to grant anything beyond the write privileges on the
        watched tables (and the partitions and sequences it names as theirs) to a role name the mapping
        allows. What only the database can tell (that a partition is one, that an owner owns a watched
        table) is checked in release().
        """
        self._roles.check_role(rev.role)
        if rev.mode not in MODES:
            raise EnforcementError(f"unknown revocation mode {rev.mode!r}")
        watched = set(self._tables)
        for schema, rel, of_schema, of_table in (*rev.partitions, *rev.sequences):
            if (of_schema, of_table) not in watched:
                raise EnforcementError(f"revocation names {of_schema}.{of_table}, which is not a watched table")
            check_name(schema, "schema name")
            check_name(rel, "relation name")
        relations = watched | {(s, r) for s, r, _, _ in rev.partitions}
        sequences = {(s, r) for s, r, _, _ in rev.sequences}
        for schema, table, priv in rev.privileges:
            if (schema, table) not in relations:
                raise EnforcementError(f"revocation names {schema}.{table}, which is not a watched table")
            if priv not in WRITE_PRIVILEGES:
                raise EnforcementError(f"revocation names privilege {priv!r}, not one of {WRITE_PRIVILEGES}")
        for schema, seq, priv in rev.sequence_privileges:
            if (schema, seq) not in sequences:
                raise EnforcementError(f"revocation names sequence {schema}.{seq}, not one of a watched table")
            if priv not in SEQUENCE_WRITE_PRIVILEGES:
                raise EnforcementError(f"revocation names sequence privilege {priv!r}")
        for schema, table, column, priv in rev.column_privileges:
            if (schema, table) not in relations:
                raise EnforcementError(f"revocation names {schema}.{table}, which is not a watched table")
            if priv not in COLUMN_WRITE_PRIVILEGES or "\x00" in column:
                raise EnforcementError(f"revocation names privilege {priv!r} on column {column!r}")
        for schema, table, column, priv in rev.grant_options:
            if (schema, table) in sequences and not column and priv in SEQUENCE_WRITE_PRIVILEGES:
                continue
            if (schema, table) not in relations:
                raise EnforcementError(f"revocation names {schema}.{table}, which is not a watched table")
            allowed = COLUMN_WRITE_PRIVILEGES if column else WRITE_PRIVILEGES
            if priv not in allowed or "\x00" in column:
                raise EnforcementError(f"revocation names privilege {priv!r} on column {column!r}")
        for owner, schema, kind, priv in (*rev.default_privileges, *rev.default_grant_options):
            check_name(owner, "owner name")
            if schema:
                check_name(schema, "schema name")
            if priv not in DEFAULT_KINDS.get(kind, ()):
                raise EnforcementError(f"revocation names default privilege {priv!r} on {kind!r}")
        for group, option, grantor in rev.memberships:
            check_name(group, "role name")
            if grantor:
                check_name(grantor, "grantor name")
            if option not in ("", "admin"):
                raise EnforcementError(f"revocation names membership option {option!r}")
            if (group.startswith("pg_") and group != WRITE_ALL_ROLE) or group in _RESERVED_ROLES:
                raise EnforcementError(f"revocation names membership in {group!r}")

    def release(self, rev: Revocation) -> None:
        """Give back exactly what ``rev`` took: its grants (with their grant options), default privileges,
        memberships and LOGIN if it had it; not the onward grants the CASCADE removed.

        GRANT and ALTER ROLE LOGIN are idempotent, so releasing twice is harmless. What no longer applies (a
        watched table, partition or sequence that is gone, an owner that owns no watched table any more, a role
        that no longer gives writes there) is skipped with a warning. A membership that would make the role one
        a quarantine refuses (superuser, CREATEROLE, owner, ...) fails the release, and nothing changes.
        """
        self._check_release(rev)
        with self._lock:
            try:
                self._retrying(
                    f"release of role {rev.role!r}", rev.role, lambda conn: self._grant(conn, rev), end_blockers=False
                )
            except psycopg.Error as e:
                raise EnforcementError(
                    f"release of role {rev.role!r} failed, nothing changed: {e}", retryable=True
                ) from e

    def _grant(self, conn: psycopg.Connection[Any], rev: Revocation) -> None:
        options = set(rev.grant_options)
        default_options = set(rev.default_grant_options)
        who = sql.Identifier(rev.role)
        with conn.transaction():
            self._attempt(conn)
            row = conn.execute(_ROLE_SQL, {"role": rev.role}).fetchone()
            if row is None:
                raise EnforcementError(f"role {rev.role!r} does not exist")
            params = self._params(int(row[0]))
            covered = self._covered(conn)
            parents = {(s, r): (ps, pt) for s, r, ps, pt in rev.partitions}

            def present(schema: str, rel: str) -> bool:
                info = covered.relations.get((schema, rel))
                ok = info is not None and (info.watched or info.root == parents.get((schema, rel)))
                if not ok:
                    log.warning("release of %s: %s.%s no longer exists (or is not covered)", rev.role, schema, rel)
                return ok

            for schema, table, priv in rev.privileges:
                if present(schema, table):
                    grant = sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                        _PRIV_SQL[priv], sql.Identifier(schema, table), who
                    )
                    conn.execute(_with_option(grant, (schema, table, "", priv) in options))
            for schema, table, column, priv in rev.column_privileges:
                if present(schema, table):
                    grant = sql.SQL("GRANT {} ({}) ON TABLE {} TO {}").format(
                        _PRIV_SQL[priv], sql.Identifier(column), sql.Identifier(schema, table), who
                    )
                    conn.execute(_with_option(grant, (schema, table, column, priv) in options))
            owning = {(s, q): (ts, tt) for s, q, ts, tt in rev.sequences}
            for schema, seq, _ in rev.sequence_privileges:
                if covered.sequences.get((schema, seq)) != owning.get((schema, seq)):
                    log.warning("release of %s: sequence %s.%s no longer belongs to it", rev.role, schema, seq)
                    continue
                grant = sql.SQL("GRANT UPDATE ON SEQUENCE {} TO {}").format(sql.Identifier(schema, seq), who)
                conn.execute(_with_option(grant, (schema, seq, "", "UPDATE") in options))
            owners = {info.owner for info in covered.relations.values()}
            for entry in rev.default_privileges:
                owner, schema, kind, priv = entry
                if owner not in owners:
                    log.warning("release of %s: %s owns no watched table now; default skipped", rev.role, owner)
                    continue
                conn.execute(_default_acl("GRANT", owner, schema, kind, priv, rev.role, entry in default_options))
            if rev.memberships:
                self._restore_memberships(conn, rev, params)
            if rev.had_login:
                conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(who))

    def _restore_memberships(self, conn: psycopg.Connection[Any], rev: Revocation, params: dict[str, Any]) -> None:
        """GRANT back the memberships, each only if the group still gives writes here and is not one to refuse."""
        sources = conn.execute(
            _WRITE_GROUPS_SQL,
            {**params, "groups": [g for g, _, _ in rev.memberships]},
        ).fetchall()
        groups = {str(name): (bool(refused), bool(writes)) for name, refused, writes in sources}
        row = conn.execute("SELECT current_setting('is_superuser') = 'on'").fetchone()
        superuser = bool(row and row[0])
        for group, option, grantor in rev.memberships:
            refused, writes = groups.get(group, (False, False))
            if refused:
                raise EnforcementError(
                    f"release of role {rev.role!r}: membership in {group!r} would let it act as a role that a "
                    "quarantine refuses (superuser, CREATEROLE, REPLICATION, BYPASSRLS or an owner)"
                )
            if not writes:
                log.warning("release of %s: %s gives no writes on watched tables now; skipped", rev.role, group)
                continue
            grant = sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(rev.role))
            if option == "admin":
                grant = sql.SQL("{} WITH ADMIN OPTION").format(grant)
            if grantor and superuser and grantor in self._existing_roles(conn, [grantor]):
                grant = sql.SQL("{} GRANTED BY {}").format(grant, sql.Identifier(grantor))
            conn.execute(grant)

    @staticmethod
    def _existing_roles(conn: psycopg.Connection[Any], names: list[str]) -> set[str]:
        rows = conn.execute("SELECT rolname::text FROM pg_roles WHERE rolname = ANY(%s)", [names]).fetchall()
        return {str(r[0]) for r in rows}


def _with_option(grant: sql.Composed, option: bool) -> sql.Composed:
    return sql.SQL("{} WITH GRANT OPTION").format(grant) if option else grant


def _default_acl(
    verb: Literal["GRANT", "REVOKE"], owner: str, schema: str, kind: str, priv: str, role: str, option: bool
) -> sql.Composed:
    """``ALTER DEFAULT PRIVILEGES FOR ROLE owner [IN SCHEMA s] GRANT|REVOKE priv ON TABLES|SEQUENCES ...``."""
    parts: list[sql.Composable] = [sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {}").format(sql.Identifier(owner))]
    if schema:
        parts.append(sql.SQL("IN SCHEMA {}").format(sql.Identifier(schema)))
    privilege = _PRIV_SQL[priv]
    if verb == "GRANT":
        parts.append(sql.SQL("GRANT {} ON {} TO {}").format(privilege, _KIND_SQL[kind], sql.Identifier(role)))
        if option:
            parts.append(sql.SQL("WITH GRANT OPTION"))
    else:
        parts.append(sql.SQL("REVOKE {} ON {} FROM {}").format(privilege, _KIND_SQL[kind], sql.Identifier(role)))
    return sql.SQL(" ").join(parts)
