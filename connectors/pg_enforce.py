"""Quarantine an agent in PostgreSQL itself: its role loses its writes on the watched tables, or its LOGIN.

The control topic tells cooperating agents to stop; this module makes the database refuse an agent that
does not cooperate. A quarantine returns a :class:`Revocation` that says exactly what was taken away. It is
recorded on the control topic, and :meth:`PostgresEnforcer.release` later gives back that and nothing more.

Agent ids come from watched rows, so they are untrusted text. They reach SQL only as bind parameters or as
identifiers quoted by psycopg (``sql.Identifier``). Privilege keywords come from a fixed allow-list. The
resolved role name must also match a configured pattern and fit PostgreSQL's 63-byte limit on names. A longer
name would be silently truncated by the server, and the truncated name could belong to another role.

What a revocation does *not* take away, and why it is reported rather than hidden:

* Privileges the role gets through membership in another role, or that PUBLIC has. Revoking those would
  affect every other member. After the REVOKE, quarantine() checks ``has_table_privilege`` (and
  ``has_any_column_privilege``) against the catalog. It lists in :attr:`Revocation.inherited` every role
  (or ``PUBLIC``) through which a write on a watched table is still possible.
* Grants made by a grantor other than the table's owner. A superuser's REVOKE acts as the owner, so such
  grants survive. They show up in ``inherited`` as the role itself.
* Ownership. The owner of a table can grant itself its privileges back, so an owning role (or one of its
  owner's members) is listed in ``inherited`` too.
* Writes that do not need a privilege on the watched table: auto-updatable views, rules and SECURITY
  DEFINER functions owned by other roles, and partitions of a watched partitioned table (each partition has
  its own ACL). List those relations in ``tables`` too, or use ``nologin``.
* ``nologin`` stops new logins. The role's sessions are ended on purpose, but another login role that is a
  member of the agent's role can still ``SET ROLE`` to it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger("writeguard.pg_enforce")

Mode = Literal["revoke_writes", "nologin"]
MODES: tuple[Mode, ...] = ("revoke_writes", "nologin")
# The privileges a quarantine takes away. TRUNCATE is a write that leaves no row events behind.
WRITE_PRIVILEGES: tuple[str, ...] = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
# The only privileges PostgreSQL grants per column that write (SELECT and REFERENCES do not).
COLUMN_WRITE_PRIVILEGES: tuple[str, ...] = ("INSERT", "UPDATE")
# Keywords reach SQL only through this map: a privilege string from a control record is never spliced in.
_PRIV_SQL: dict[str, sql.SQL] = {p: sql.SQL(p) for p in WRITE_PRIVILEGES}
NAMEDATALEN_MAX = 63  # bytes; PostgreSQL truncates longer identifiers instead of refusing them
# PostgreSQL reads a role spelled "public" (even when quoted) as PUBLIC. It rejects "none". The pg_* names
# are the system's predefined roles.
_RESERVED_ROLES = frozenset({"public", "none"})
_ADVISORY_CLASS = 0x77677264  # "wgrd": namespaces writeguard's advisory locks (key 2 is the role's hash)


class EnforcementError(RuntimeError):
    """A quarantine or release could not be done as asked. The message says why.

    A failed quarantine changes nothing: its statements run in one transaction.
    """


class RoleMapping(BaseModel):
    """How an agent id becomes the PostgreSQL role it logs in as. This is the ``roles:`` config section.

    ``map`` is checked first, then ``template``. Nothing is lower-cased or cleaned up silently. If the result
    does not fullmatch ``pattern``, or is longer than 63 bytes, :class:`EnforcementError` is raised. Keep a
    prefix in the template (``agent_{agent_id}``). A bare ``{agent_id}`` would let a written row name any
    role, and only the refusal of superusers and of the enforcer's own role would stop it.
    """

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
    def _has_placeholder(cls, v: str | None) -> str | None:
        # Without the placeholder, every agent would be the same role: a typo, not a policy.
        if v is not None and "{agent_id}" not in v:
            raise ValueError("template must contain {agent_id}")
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
        from the control topic.
        """
        if not isinstance(role, str) or not role:
            raise EnforcementError("empty role name")
        if "\x00" in role:
            raise EnforcementError("role name contains a NUL byte")
        try:
            size = len(role.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise EnforcementError("role name is not valid UTF-8 text") from e
        if size > NAMEDATALEN_MAX:
            raise EnforcementError(
                f"role name is {size} bytes; PostgreSQL would truncate it to {NAMEDATALEN_MAX} (another role)"
            )
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


Privilege = tuple[str, str, str]  # schema, table, privilege
ColumnPrivilege = tuple[str, str, str, str]  # schema, table, column, privilege


@dataclass(frozen=True)
class Revocation:
    """What one quarantine took away from one role. release() gives back exactly this.

    It is JSON-serialisable (:meth:`to_dict` / :meth:`from_dict`) because it goes on the control topic and is
    read back by ``writeguard release``, possibly by another process, much later.

    ``privileges`` lists table-level grants that were made *directly* to the role (by the table owner) and
    are now revoked. ``column_privileges`` is the same for per-column INSERT/UPDATE grants. A table-level
    REVOKE wipes those as well, and they would let the role write otherwise. ``grant_options`` is the subset
    (column ``""`` for table level) that was held WITH GRANT OPTION, so that release restores the option too.
    ``inherited`` lists the roles, or ``PUBLIC``, through which the role can *still* write on a watched table.
    If it is not empty, the quarantine did not stop every write. See the module docstring.

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "mode": self.mode,
            "privileges": [list(p) for p in self.privileges],
            "had_login": self.had_login,
            "terminated_sessions": self.terminated_sessions,
            "inherited": list(self.inherited),
            "column_privileges": [list(p) for p in self.column_privileges],
            "grant_options": [list(p) for p in self.grant_options],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Revocation:
        """Parse a recorded revocation strictly. It decides what is GRANTed, so nothing malformed passes."""
        if not isinstance(data, Mapping):
            raise EnforcementError("revocation must be a JSON object")
        known = {
            "role",
            "mode",
            "privileges",
            "had_login",
            "terminated_sessions",
            "inherited",
            "column_privileges",
            "grant_options",
        }
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
        inherited = data.get("inherited", [])
        if not isinstance(inherited, list) or not all(isinstance(s, str) for s in inherited):
            raise EnforcementError("revocation.inherited must be a list of strings")
        return cls(
            role=role,
            mode=cast(Mode, mode),
            privileges=cast(tuple[Privilege, ...], _string_tuples(data.get("privileges", []), 3, "privileges")),
            had_login=had_login,
            terminated_sessions=terminated,
            inherited=tuple(inherited),
            column_privileges=cast(
                tuple[ColumnPrivilege, ...], _string_tuples(data.get("column_privileges", []), 4, "column_privileges")
            ),
            grant_options=cast(
                tuple[ColumnPrivilege, ...], _string_tuples(data.get("grant_options", []), 4, "grant_options")
            ),
        )

    def merged(self, later: Revocation) -> Revocation:
        """This revocation together with a later one of the same role: what releasing both must give back."""
        if later.role != self.role:
            raise EnforcementError(f"cannot merge revocations of {self.role!r} and {later.role!r}")
        # LOGIN is given back only if the role had it before the *first* quarantine took it away.
        return Revocation(
            role=self.role,
            mode=self.mode,
            privileges=_union(self.privileges, later.privileges),
            had_login=self.had_login if self.had_login is not None else later.had_login,
            terminated_sessions=self.terminated_sessions + later.terminated_sessions,
            inherited=later.inherited,
            column_privileges=_union(self.column_privileges, later.column_privileges),
            grant_options=_union(self.grant_options, later.grant_options),
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


# The watched relations that exist. Names arrive as two text[] bind parameters and are compared as text,
# never parsed as SQL: "public.weird\"; DROP ..." is just a table name that does not exist, or a weird one that does.
_WATCHED_CTE = sql.SQL("""
WITH t AS (
    SELECT c.oid, n.nspname::text AS nsp, c.relname::text AS rel, c.relowner,
           coalesce(c.relacl, acldefault('r', c.relowner)) AS acl
    FROM unnest(%(nsp)s::text[], %(rel)s::text[]) AS w(nsp, rel)
    JOIN pg_namespace n ON n.nspname = w.nsp
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
    WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm')
)
""")

# Direct grants read from the raw ACLs with aclexplode(). information_schema.role_table_grants is not used:
# it shows only grants where grantor or grantee is a role the *current* user is enabled for, so what a
# non-superuser enforcer sees would depend on its own memberships. It also gives no grantor oid to compare
# with the owner and says nothing about column grants (column_privileges is a separate view with the same
# filter). relacl is NULL until the first GRANT; acldefault() then stands for the owner's implicit rights.
_DIRECT_SQL = _WATCHED_CTE + sql.SQL(
    """
SELECT t.nsp, t.rel, '' AS col, a.privilege_type, a.is_grantable
FROM t CROSS JOIN LATERAL aclexplode(t.acl) AS a
WHERE a.grantee = %(role_oid)s::oid AND a.grantor = t.relowner AND a.privilege_type = ANY(%(privs)s)
UNION ALL
SELECT t.nsp, t.rel, att.attname::text, a.privilege_type, a.is_grantable
FROM t
JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped AND att.attacl IS NOT NULL
CROSS JOIN LATERAL aclexplode(att.attacl) AS a
WHERE a.grantee = %(role_oid)s::oid AND a.grantor = t.relowner AND a.privilege_type = ANY(%(colprivs)s)
ORDER BY 1, 2, 3, 4
"""
)

# After the REVOKE: which (table, privilege) the role can still use, as PostgreSQL itself decides it.
_STILL_SQL = _WATCHED_CTE + sql.SQL(
    """
SELECT t.nsp, t.rel, p.priv
FROM t CROSS JOIN unnest(%(privs)s::text[]) AS p(priv)
WHERE has_table_privilege(%(role_oid)s::oid, t.oid, p.priv)
   OR (p.priv = ANY(%(colprivs)s) AND has_any_column_privilege(%(role_oid)s::oid, t.oid, p.priv))
ORDER BY 1, 2, 3
"""
)

# Where remaining writes come from. Membership is checked with MEMBER, not USAGE: a NOINHERIT member can
# still SET ROLE and write.
_SOURCES_SQL = _WATCHED_CTE + sql.SQL(
    """
SELECT DISTINCT src FROM (
    SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END AS src
    FROM t CROSS JOIN LATERAL aclexplode(t.acl) AS a
    WHERE a.privilege_type = ANY(%(privs)s)
      AND (a.grantee = 0 OR pg_has_role(%(role_oid)s::oid, a.grantee, 'MEMBER'))
    UNION ALL
    SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END
    FROM t
    JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped
                         AND att.attacl IS NOT NULL
    CROSS JOIN LATERAL aclexplode(att.attacl) AS a
    WHERE a.privilege_type = ANY(%(colprivs)s)
      AND (a.grantee = 0 OR pg_has_role(%(role_oid)s::oid, a.grantee, 'MEMBER'))
    UNION ALL
    SELECT pg_get_userbyid(t.relowner)::text FROM t WHERE pg_has_role(%(role_oid)s::oid, t.relowner, 'MEMBER')
    UNION ALL
    SELECT 'pg_write_all_data'
    WHERE EXISTS (SELECT FROM t) AND pg_has_role(%(role_oid)s::oid, 'pg_write_all_data', 'MEMBER')
) AS s
ORDER BY 1
"""
)

# nologin mode: login roles that can still act as the agent's role with SET ROLE. Superusers can do that to
# any role and are left out.
_SET_ROLE_SQL = """
SELECT r.rolname::text FROM pg_roles AS r
WHERE r.rolcanlogin AND NOT r.rolsuper AND r.oid <> %(role_oid)s::oid
  AND pg_has_role(r.oid, %(role_oid)s::oid, 'MEMBER')
ORDER BY 1
"""

_TERMINATE_SQL = """
SELECT pid, pg_terminate_backend(pid, %(wait_ms)s)
FROM pg_stat_activity
WHERE usename = %(role)s AND pid <> pg_backend_pid()
"""


class PostgresEnforcer:
    """Quarantines agents by changing their roles in one PostgreSQL database.

    ``dsn`` must log in as a superuser, or as a role that owns the watched tables, has CREATEROLE (for
    ``nologin``) and is a member of ``pg_signal_backend`` (to end sessions). It is connected lazily and
    reconnected after an error, so a database restart does not disable enforcement for good. Calls are
    meant to come from one thread; the worker runs them in a single-thread executor.

    ``terminate_sessions`` ends the role's open sessions after the change has committed. A REVOKE stops the
    *next* statement of an open transaction, but the rows that transaction wrote before still COMMIT
    unless its session is ended (which rolls them back). In ``nologin`` mode, open sessions are not affected
    by NOLOGIN at all.
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
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(f"{s}.{t}" for s, t in self._tables)

    # -- connection -------------------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.close()
        try:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,  # transactions are explicit: conn.transaction()
                connect_timeout=max(2, math.ceil(self._connect_timeout)),
                application_name="writeguard-enforcer",
            )
            # A REVOKE waits for locks like any statement; never let a stuck lock stall the worker for good.
            conn.execute("SELECT set_config('statement_timeout', %s, false)", [str(self._statement_timeout_ms)])
        except psycopg.Error as e:
            raise EnforcementError(f"cannot connect to PostgreSQL for enforcement: {e}") from e
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:  # pragma: no cover - closing a dead connection
                log.debug("closing the enforcement connection failed", exc_info=True)

    def __enter__(self) -> PostgresEnforcer:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- quarantine -------------------------------------------------------------------------------------------

    def _params(self, role_oid: int) -> dict[str, Any]:
        return {
            "nsp": [s for s, _ in self._tables],
            "rel": [t for _, t in self._tables],
            "role_oid": role_oid,
            "privs": list(WRITE_PRIVILEGES),
            "colprivs": list(COLUMN_WRITE_PRIVILEGES),
        }

    def _lookup_role(self, conn: psycopg.Connection[Any], role: str) -> tuple[int, bool]:
        """Return (oid, rolcanlogin) of a role that may be quarantined, locked against concurrent enforcement."""
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [_ADVISORY_CLASS, role])
        row = conn.execute(
            "SELECT oid::bigint, rolcanlogin, rolsuper, rolname = current_user OR rolname = session_user "
            "FROM pg_roles WHERE rolname = %s",
            [role],
        ).fetchone()
        if row is None:
            raise EnforcementError(f"role {role!r} does not exist")
        oid, can_login, is_super, is_self = row
        if is_super:
            # Privileges do not bind a superuser, and a hostile agent id must not lock out an administrator.
            raise EnforcementError(f"role {role!r} is a superuser: writeguard does not quarantine superusers")
        if is_self:
            raise EnforcementError(f"role {role!r} is the enforcer's own role")
        return int(oid), bool(can_login)

    def quarantine(self, agent_id: str) -> Revocation:
        """Take the agent's role's writes (or its LOGIN) away, end its sessions, and return what was taken.

        Everything is one transaction, serialised per role by an advisory lock. Sessions are ended only after
        the commit, so a session cannot reconnect in between and find its rights still there. An already
        quarantined role loses nothing more; the result then has empty ``privileges`` (and
        ``had_login=False`` in nologin mode).
        """
        role = self._roles.role_for(agent_id)
        conn = self._connection()
        direct: list[tuple[Any, ...]] = []
        had_login: bool | None = None
        try:
            with conn.transaction():
                oid, can_login = self._lookup_role(conn, role)
                params = self._params(oid)
                found = self._existing_tables(conn, params)
                if self._mode == "revoke_writes":
                    direct = conn.execute(_DIRECT_SQL, params).fetchall()
                    self._revoke(conn, role, direct)
                    inherited = self._inherited(conn, role, params)
                else:
                    had_login = can_login
                    if can_login:
                        conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
                    inherited = tuple(str(r[0]) for r in conn.execute(_SET_ROLE_SQL, params).fetchall())
        except psycopg.errors.DependentObjectsStillExist as e:  # 2BP01 "dependent privileges exist"
            raise EnforcementError(
                f"role {role!r} has granted its write privileges on to other roles (WITH GRANT OPTION); "
                f"nothing was revoked. Revoke those grants, or use mode 'nologin'. ({e})"
            ) from e
        except psycopg.Error as e:
            raise EnforcementError(f"quarantine of role {role!r} failed, nothing changed: {e}") from e
        if len(found) < len(self._tables):
            log.warning("role %s: watched tables not found, skipped: %s", role, sorted(set(self.tables) - found))
        terminated = self._terminate_sessions(conn, role) if self._terminate else 0
        if inherited:
            log.warning("role %s can still write on watched tables through %s", role, ", ".join(inherited))
        return Revocation(
            role=role,
            mode=self._mode,
            privileges=tuple((s, t, p) for s, t, c, p, _ in direct if not c),
            had_login=had_login,
            terminated_sessions=terminated,
            inherited=inherited,
            column_privileges=tuple((s, t, c, p) for s, t, c, p, _ in direct if c),
            grant_options=tuple((s, t, c, p) for s, t, c, p, g in direct if g),
        )

    def _existing_tables(self, conn: psycopg.Connection[Any], params: dict[str, Any]) -> set[str]:
        rows = conn.execute(_WATCHED_CTE + sql.SQL("SELECT nsp, rel FROM t"), params).fetchall()
        return {f"{s}.{t}" for s, t in rows}

    def _revoke(self, conn: psycopg.Connection[Any], role: str, direct: list[tuple[Any, ...]]) -> None:
        who = sql.Identifier(role)
        for schema, table, column, priv, _ in direct:
            target = sql.Identifier(schema, table)
            if column:
                stmt = sql.SQL("REVOKE {} ({}) ON TABLE {} FROM {}").format(
                    _PRIV_SQL[priv], sql.Identifier(column), target, who
                )
            else:
                stmt = sql.SQL("REVOKE {} ON TABLE {} FROM {}").format(_PRIV_SQL[priv], target, who)
            conn.execute(stmt)

    def _inherited(self, conn: psycopg.Connection[Any], role: str, params: dict[str, Any]) -> tuple[str, ...]:
        still = conn.execute(_STILL_SQL, params).fetchall()
        sources = [str(r[0]) for r in conn.execute(_SOURCES_SQL, params).fetchall()]
        if still and not sources:
            sources = [role]  # writable for a reason the catalog query does not know: report it anyway
        return tuple(sources)

    def _terminate_sessions(self, conn: psycopg.Connection[Any], role: str) -> int:
        """End the role's backends, waiting up to terminate_wait for each to exit. Returns how many ended.

        The change has committed by now. An error here must not lose the Revocation that release needs, so
        it is logged rather than raised.
        """
        try:
            rows = conn.execute(_TERMINATE_SQL, {"role": role, "wait_ms": self._terminate_wait_ms}).fetchall()
        except psycopg.Error:
            log.exception("role %s: could not end its sessions", role)
            return 0
        ended = sum(1 for _, ok in rows if ok)
        if ended < len(rows):
            log.warning("role %s: %d of %d sessions did not end in time", role, len(rows) - ended, len(rows))
        return ended

    # -- release ----------------------------------------------------------------------------------------------

    def _check_release(self, rev: Revocation) -> None:
        """Refuse a revocation this enforcer would not have produced.

        A record on the control topic must not be able to grant anything beyond the write privileges on the
        watched tables to a role name the mapping allows.
        """
        self._roles.check_role(rev.role)
        if rev.mode not in MODES:
            raise EnforcementError(f"unknown revocation mode {rev.mode!r}")
        watched = set(self._tables)
        for schema, table, priv in rev.privileges:
            if (schema, table) not in watched:
                raise EnforcementError(f"revocation names {schema}.{table}, which is not a watched table")
            if priv not in WRITE_PRIVILEGES:
                raise EnforcementError(f"revocation names privilege {priv!r}, not one of {WRITE_PRIVILEGES}")
        for schema, table, column, priv in (*rev.column_privileges, *rev.grant_options):
            if (schema, table) not in watched:
                raise EnforcementError(f"revocation names {schema}.{table}, which is not a watched table")
            allowed = COLUMN_WRITE_PRIVILEGES if column else WRITE_PRIVILEGES
            if priv not in allowed or "\x00" in column:
                raise EnforcementError(f"revocation names privilege {priv!r} on column {column!r}")

    def release(self, rev: Revocation) -> None:
        """Give back exactly what ``rev`` took: its grants (with their grant options) and LOGIN if it had it.

        GRANT and ALTER ROLE LOGIN are idempotent, so releasing twice is harmless. Grants on a watched table
        that no longer exists are skipped with a warning.
        """
        self._check_release(rev)
        options = set(rev.grant_options)
        who = sql.Identifier(rev.role)
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [_ADVISORY_CLASS, rev.role])
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [rev.role]).fetchone() is None:
                    raise EnforcementError(f"role {rev.role!r} does not exist")
                found = self._existing_tables(conn, self._params(0))
                for schema, table, priv in rev.privileges:
                    if f"{schema}.{table}" not in found:
                        log.warning("release of %s: %s.%s no longer exists", rev.role, schema, table)
                        continue
                    stmt = sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                        _PRIV_SQL[priv], sql.Identifier(schema, table), who
                    )
                    if (schema, table, "", priv) in options:
                        stmt = sql.SQL("{} WITH GRANT OPTION").format(stmt)
                    conn.execute(stmt)
                for schema, table, column, priv in rev.column_privileges:
                    if f"{schema}.{table}" not in found:
                        log.warning("release of %s: %s.%s no longer exists", rev.role, schema, table)
                        continue
                    stmt = sql.SQL("GRANT {} ({}) ON TABLE {} TO {}").format(
                        _PRIV_SQL[priv], sql.Identifier(column), sql.Identifier(schema, table), who
                    )
                    if (schema, table, column, priv) in options:
                        stmt = sql.SQL("{} WITH GRANT OPTION").format(stmt)
                    conn.execute(stmt)
                if rev.had_login:
                    conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(who))
        except psycopg.Error as e:
            raise EnforcementError(f"release of role {rev.role!r} failed, nothing changed: {e}") from e
