"""The SQL that makes PostgreSQL itself name the agent of every write (``writeguard identity-sql``).

Without it, attribution reads what the writer put in the row, or a logical decoding message that any role may
emit: a rogue agent can name another agent, or none. With it:

* ``<schema>.agent_of(role)`` maps a login role to its agent id through the same ``roles:`` mapping as
  enforcement (``map`` inverted, then the ``template`` with its fixed prefix and suffix stripped); NULL when the
  role is no agent's.
* ``<schema>.emit_identity(table, claimed)`` (SECURITY DEFINER, owned by writeguard's own NOLOGIN role, fixed
  ``search_path``) emits ``pg_logical_emit_message(true, '<prefix>', {"agent_id", "role", "run_id", "table",
  "claimed"})`` with the identity of ``session_user``: the login role, which neither ``SET ROLE`` nor a
  SECURITY DEFINER function changes, and which the writer cannot choose after it has logged in.
* A BEFORE row trigger on every watched table overwrites the agent column with that identity on INSERT and
  UPDATE; when the writer had put another id there, it first emits a message with that ``claimed`` id so that
  the worker can flag the impersonation. An AFTER statement trigger (INSERT, UPDATE, DELETE, TRUNCATE) emits the
  transaction's identity message, so deletes and truncates are attributed too.
* ``EXECUTE`` on both overloads of ``pg_logical_emit_message`` is revoked from PUBLIC and from the agents' roles:
  only the definer's role may emit, so a message under the prefix comes from the triggers.

Applying it needs a superuser (the revoke is on a pg_catalog function; the triggers need the tables' owner).
Everything from the config (role names, agent ids, tables, columns, the prefix) is composed with
``psycopg.sql`` (identifiers quoted, values as literals); only the fixed names below appear in function bodies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from connectors.pg_enforce import RoleMapping, template_prefix
from detectors.spec import FieldPath, TableSpec

# The two overloads PostgreSQL 15 has; both must be closed, or the other one still lets an agent emit.
EMIT_OVERLOADS = ("boolean, text, text", "boolean, text, bytea")
DEFAULT_SCHEMA = "writeguard"
DEFAULT_OWNER = "writeguard_identity"
# The session setting a writer may use to label its run: a label, not an identity, so the writer may choose it.
RUN_ID_SETTING = "writeguard.run_id"
# BEFORE row triggers fire in name order: ours is named to fire last, so no other trigger rewrites the column after it.
ROW_TRIGGER = "zz_writeguard_identity_row"
STATEMENT_TRIGGER = "zz_writeguard_identity_statement"
# Schema and owner go into function bodies (dollar-quoted): a plain lower-case name cannot end the quote.
PLAIN_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class IdentitySqlError(ValueError):
    """The config cannot be rendered into identity SQL; the message names the key."""


@dataclass(frozen=True, slots=True)
class StampedTable:
    schema: str
    table: str
    column: str


def stamped_tables(tables: Sequence[TableSpec]) -> list[StampedTable]:
    """Each watched table with the column that holds its agent id; a nested or before-image path is refused."""
    out = []
    for i, t in enumerate(tables):
        path = FieldPath.parse(t.agent_id)
        if path.image == "before" or len(path.keys) != 1:
            raise IdentitySqlError(
                f"tables.{i}.agent_id: {t.agent_id!r}: the database can stamp a top-level column of the row "
                "('row.<column>' or 'after.<column>'), not a before image or a key inside a JSON column"
            )
        schema, _, table = t.name.partition(".")
        out.append(StampedTable(schema, table, path.keys[0]))
    return out


def agent_of_role_sql(roles: RoleMapping | None) -> sql.Composable:
    """``CASE`` over the role ``r``: the inverted map, then the template; NULL otherwise."""
    whens: list[sql.Composable] = []
    by_role: dict[str, str] = {}
    if roles is not None:
        for agent, role in roles.map.items():
            if role in by_role:
                raise IdentitySqlError(
                    f"enforcement.postgres.roles.map: agents {by_role[role]!r} and {agent!r} share role {role!r}: "
                    "the database could not tell them apart"
                )
            by_role[role] = agent
            whens.append(sql.SQL("WHEN r = {} THEN {}").format(sql.Literal(role), sql.Literal(agent)))
        if roles.template is not None:
            prefix = template_prefix(roles.template)
            suffix = roles.template[len(prefix) + len("{agent_id}") :]
            if "{agent_id}" in suffix:
                raise IdentitySqlError(
                    "enforcement.postgres.roles.template: {agent_id} appears twice, so a role name cannot be "
                    "mapped back to one agent id"
                )
            # A map key keeps its mapped role: the template's role for that id is not the agent's.
            middle = sql.SQL("substr(r, {}, length(r) - {})").format(
                sql.Literal(len(prefix) + 1), sql.Literal(len(prefix) + len(suffix))
            )
            cond: sql.Composable = sql.SQL("starts_with(r, {p}) AND right(r, {n}) = {s} AND length(r) > {m}").format(
                p=sql.Literal(prefix),
                n=sql.Literal(len(suffix)),
                s=sql.Literal(suffix),
                m=sql.Literal(len(prefix) + len(suffix)),
            )
            if suffix == "":
                cond = sql.SQL("starts_with(r, {p}) AND length(r) > {m}").format(
                    p=sql.Literal(prefix), m=sql.Literal(len(prefix))
                )
            if roles.map:
                cond = sql.SQL("{} AND NOT ({} = ANY ({}::text[]))").format(cond, middle, sql.Literal(list(roles.map)))
            whens.append(sql.SQL("WHEN {} THEN {}").format(cond, middle))
    if not whens:
        return sql.SQL("SELECT NULL::text")
    return sql.SQL("SELECT CASE {} ELSE NULL END").format(sql.SQL(" ").join(whens))


def render_identity_sql(
    tables: Sequence[TableSpec],
    roles: RoleMapping | None,
    prefix: str,
    *,
    schema: str = DEFAULT_SCHEMA,
    owner: str = DEFAULT_OWNER,
) -> list[sql.Composed]:
    """The statements, in order, to run in one transaction as a superuser. Pure: no connection needed.

    >>> from detectors.spec import TableSpec
    >>> stmts = render_identity_sql([TableSpec(name="public.refunds", topic="t")], None, "writeguard")
    >>> text = "\\n".join(s.as_string(None) for s in stmts)
    >>> "SECURITY DEFINER" in text and 'ON "public"."refunds"' in text
    True
    """
    for what, name in (("schema", schema), ("owner", owner)):
        if not PLAIN_NAME.fullmatch(name):
            raise IdentitySqlError(f"--{what} {name!r}: use a plain lower-case name ([a-z_][a-z0-9_]*)")
    if not prefix or "\x00" in prefix:
        raise IdentitySqlError("worker.agent_messages.prefix: a non-empty prefix without NUL is needed")
    stamped = stamped_tables(tables)
    s, o = sql.Identifier(schema), sql.Identifier(owner)
    agents = sorted(set(roles.map.values())) if roles is not None else []
    out: list[sql.Composed] = [
        # The definer's role: NOLOGIN, so nobody can be it; it owns the functions and alone may emit.
        sql.SQL(
            "DO $wg$ BEGIN IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {}) THEN "
            "CREATE ROLE {} NOLOGIN; END IF; END $wg$"
        ).format(sql.Literal(owner), o),
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(s, o),
        sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(s, o),
        sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(s),
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}.agent_of(r text) RETURNS text LANGUAGE sql IMMUTABLE "
            "SET search_path = pg_catalog, pg_temp BEGIN ATOMIC {}; END"
        ).format(s, agent_of_role_sql(roles)),
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {s}.emit_identity(tbl text, claimed text) RETURNS void LANGUAGE sql "
            "SECURITY DEFINER SET search_path = pg_catalog, pg_temp BEGIN ATOMIC "
            "SELECT pg_catalog.pg_logical_emit_message(true, {prefix}, pg_catalog.jsonb_strip_nulls("
            "pg_catalog.jsonb_build_object('agent_id', {s}.agent_of(session_user::text), 'role', session_user::text, "
            "'run_id', nullif(pg_catalog.current_setting({run}, true), ''), 'table', tbl, 'claimed', claimed))::text); "
            "END"
        ).format(s=s, prefix=sql.Literal(prefix), run=sql.Literal(RUN_ID_SETTING)),
        # No value from the config goes into this body: the agent column arrives as the trigger's argument.
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {s}.stamp_identity() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path = pg_catalog, pg_temp AS $wg$\n"
            "DECLARE\n"
            "  tbl text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;\n"
            "  agent text := {s}.agent_of(session_user::text);\n"
            "  claimed text;\n"
            "BEGIN\n"
            "  IF TG_LEVEL = 'STATEMENT' THEN\n"
            "    PERFORM {s}.emit_identity(tbl, NULL);\n"
            "    RETURN NULL;\n"
            "  END IF;\n"
            "  IF TG_OP = 'DELETE' THEN\n"
            "    RETURN OLD;\n"
            "  END IF;\n"
            "  claimed := to_jsonb(NEW) ->> TG_ARGV[0];\n"
            "  -- An update that leaves the column alone claims nothing: the old value names the last writer.\n"
            "  IF TG_OP = 'UPDATE' AND claimed IS NOT DISTINCT FROM (to_jsonb(OLD) ->> TG_ARGV[0]) THEN\n"
            "    claimed := NULL;\n"
            "  END IF;\n"
            "  IF claimed IS NOT NULL AND claimed IS DISTINCT FROM agent THEN\n"
            "    PERFORM {s}.emit_identity(tbl, claimed);\n"
            "  END IF;\n"
            "  NEW := jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[0], agent));\n"
            "  RETURN NEW;\n"
            "END\n"
            "$wg$"
        ).format(s=s),
    ]
    for signature in ("agent_of(text)", "emit_identity(text, text)", "stamp_identity()"):
        out.append(sql.SQL("ALTER FUNCTION {}.{} OWNER TO {}").format(s, sql.SQL(signature), o))
    out.append(sql.SQL("REVOKE ALL ON FUNCTION {}.emit_identity(text, text) FROM PUBLIC").format(s))
    for args in EMIT_OVERLOADS:
        fn = sql.SQL("pg_catalog.pg_logical_emit_message({})").format(sql.SQL(args))
        out.append(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(fn))
        if agents:
            out.append(
                sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}").format(
                    fn, sql.SQL(", ").join(sql.Identifier(a) for a in agents)
                )
            )
        out.append(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(fn, o))
    for t in stamped:
        target = sql.Identifier(t.schema, t.table)
        out.append(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION "
                "{}.stamp_identity({})"
            ).format(sql.Identifier(ROW_TRIGGER), target, s, sql.Literal(t.column))
        )
        out.append(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} "
                "FOR EACH STATEMENT EXECUTE FUNCTION {}.stamp_identity({})"
            ).format(sql.Identifier(STATEMENT_TRIGGER), target, s, sql.Literal(t.column))
        )
    return out


def script(statements: Sequence[sql.Composed]) -> str:
    """The statements as one psql script, in a transaction: all of it is installed, or none."""
    body = ";\n".join(st.as_string(None) for st in statements)
    return f"BEGIN;\n{body};\nCOMMIT;\n"
