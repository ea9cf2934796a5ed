"""Guard rails in PostgreSQL itself (``writeguard guard-sql``): refuse an agent's destructive statements before
they commit, and let a human approve a large one (``writeguard approve``).

Who is an agent: the session's *login* role (``session_user``) mapped through the same ``roles:`` mapping as
enforcement and ``writeguard identity-sql`` (``<schema>.agent_of``). ``SET ROLE`` and SECURITY DEFINER functions
do not change it, so an agent cannot step out of the rails, and a human who ``SET ROLE``\\s to an agent's role is
still a human. A role that is no agent's is never affected.

What is refused, for an agent's session, on every watched table (``tables[].guard``, defaults on):

* ``TRUNCATE``: a ``BEFORE TRUNCATE ... FOR EACH STATEMENT`` trigger (it also fires for a ``TRUNCATE ... CASCADE``
  reaching the table).
* ``DROP TABLE`` (and ``DROP SCHEMA ... CASCADE``, ``DROP OWNED``): a ``sql_drop`` event trigger. Why not
  ``ddl_command_start``: there the object is not resolved yet, only the command tag and ``current_query()`` are
  known, and parsing the query text misses ``search_path`` resolution, quoting, multi-statement strings and
  cascades. ``sql_drop`` fires after the objects are gone from the catalog but inside the transaction, with
  ``pg_event_trigger_dropped_objects()`` naming each by oid: raising there rolls the drop back. Dropping one of
  the guard's own triggers is refused the same way.
* ``ALTER TABLE`` (rename, columns, ``DISABLE TRIGGER``, RLS, ...) and ``CREATE/ALTER TRIGGER``, ``RULE`` and
  ``POLICY`` on the table: a ``ddl_command_end`` event trigger over ``pg_event_trigger_ddl_commands()``, the
  commands' objects resolved to their table's oid (so a renamed table is still the watched one).
* An ``UPDATE`` or ``DELETE`` touching more rows in one statement than the table's limit: statement-level
  ``AFTER`` triggers with a transition table (``REFERENCING OLD TABLE``) count the rows, unless the transaction
  carries an approval (``SET LOCAL writeguard.approval = '<token>'``) for that table, operation and at least that
  many rows, not expired, not used by another transaction. The limit is per statement: many small statements
  pass here and are the worker's detectors' business.

An approval token is ``wg1.<payload>.<signature>``: the payload is the base64url (unpadded) JSON of
:class:`Approval` (table, op, max_rows, exp in Unix seconds, a nonce, who issued it), the signature the hex
HMAC-SHA256 of ``wg1.<payload>`` under ``guard.approval_key``. :func:`issue_approval` and
:func:`approval_problem` are the Python side; ``<schema>.approval_problem`` is the database side, checked
against each other by the tests. The key lives in ``<schema>.approval_key``, readable only by the guard's own
NOLOGIN role, which owns the SECURITY DEFINER functions (fixed ``search_path``) that read it; the HMAC is built
from PostgreSQL's own ``sha256()`` (no extension needed, nothing resolved through a search path). A nonce is
recorded in ``<schema>.approval_used`` with the transaction that used it: a token approves one transaction
(any of its statements), and a rolled-back attempt leaves it usable.

Every refusal raises SQLSTATE ``WG001`` (:data:`REFUSED_SQLSTATE`) with a message saying what was refused and
how a human can approve (or that only a human can run it), logs a line to the server log (``RAISE LOG``) and
emits a *non-transactional* logical decoding message ``pg_logical_emit_message(false, 'writeguard.refused',
<GuardRefusal JSON>)``: it is written to the WAL at once, so it reaches Debezium's ``<topic.prefix>.message``
topic although the refused transaction rolls back.

Applying needs a superuser (event triggers, a grant on ``pg_catalog.pg_logical_emit_message``, triggers on
tables the DBA owns). Names from the config are composed with ``psycopg.sql``; the key is never printed: the
rendered script reads it from a psql variable (``psql -v wg_approval_key=...``), ``--apply`` binds it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from psycopg import sql
from pydantic import Field, ValidationError

from connectors.pg_enforce import RoleMapping

# Shared with identity-sql on purpose: one definition of "this login role is that agent's".
from connectors.pg_identity import EMIT_OVERLOADS, PLAIN_NAME, agent_of_role_sql
from detectors.spec import GuardSpec, TableSpec
from detectors.strict import Strict

DEFAULT_SCHEMA = "writeguard_guard"
DEFAULT_OWNER = "writeguard_guard"
APPROVAL_SETTING = "writeguard.approval"
REFUSED_PREFIX = "writeguard.refused"
REFUSED_SQLSTATE = "WG001"
TOKEN_VERSION = "wg1"  # noqa: S105 - the token format's version tag, not a secret
KEY_VARIABLE = "wg_approval_key"  # the psql variable the printed script reads the key from
TRUNCATE_TRIGGER = "zz_writeguard_guard_truncate"
DELETE_TRIGGER = "zz_writeguard_guard_delete"
UPDATE_TRIGGER = "zz_writeguard_guard_update"
GUARD_TRIGGERS = (TRUNCATE_TRIGGER, DELETE_TRIGGER, UPDATE_TRIGGER)
DROP_EVENT_TRIGGER = "writeguard_guard_sql_drop"
DDL_EVENT_TRIGGER = "writeguard_guard_ddl_end"
Op = Literal["delete", "update"]
OPS: tuple[Op, ...] = ("delete", "update")
_TOKEN = re.compile(r"^wg1\.([A-Za-z0-9_-]+)\.([0-9a-f]{64})$")


class GuardSqlError(ValueError):
    """The config cannot be rendered into guard rails; the message names the key."""


class ApprovalError(ValueError):
    """An approval cannot be issued as asked (a bad table, op, row count or expiry)."""


class Approval(Strict):
    """What an approval token allows: one transaction's UPDATE or DELETE statements on one table, each touching
    at most ``max_rows`` rows, until ``exp``."""

    v: Literal[1] = 1
    table: str = Field(description="'<schema>.<table>' as in the config.")
    op: Op
    max_rows: int = Field(ge=1, description="The most rows one approved statement may touch.")
    exp: int = Field(description="Expiry, Unix seconds (UTC).")
    nonce: str = Field(pattern=r"^[0-9a-f]{16,64}$", description="Makes the token single-transaction.")
    by: str | None = Field(None, description="Who approved it (user@host), for the audit trail.")


class GuardRefusal(Strict):
    """The content of a ``pg_logical_emit_message(false, 'writeguard.refused', ...)``: one refused statement.

    Every text field comes from the refused session (table and role names, its query): untrusted.
    """

    v: Literal[1] = 1
    kind: Literal["truncate", "drop", "ddl", "rows"] = Field(
        description="truncate, drop (the table or a guard trigger), ddl (ALTER and the like), rows (above the limit)."
    )
    command: str = Field(description="TRUNCATE, DELETE, UPDATE, or the DDL command tag (DROP TABLE, ALTER TABLE...).")
    table: str = Field(description="'<schema>.<table>' of the watched table.")
    role: str = Field(description="The session's login role (session_user).")
    agent_id: str | None = Field(description="That role's agent, through the roles mapping.")
    rows: int | None = Field(None, description="kind rows: rows the statement touched.")
    limit: int | None = Field(None, description="kind rows: the table's limit for the operation.")
    approval: str | None = Field(None, description="kind rows: why the transaction's approval did not count.")
    query: str | None = Field(None, description="current_query(), at most 1000 characters.")
    txid: str | None = Field(None, description="The refused transaction's id, when it had one.")
    at: datetime


def parse_refusal(content: bytes | str) -> GuardRefusal:
    """A refusal message's content (Debezium's ``message.content``, base64-decoded) as a model.

    >>> r = parse_refusal('{"v": 1, "kind": "truncate", "command": "TRUNCATE", "table": "public.refunds", '
    ...                   '"role": "agent_x", "agent_id": "x", "at": "2026-03-01T12:00:00+00:00"}')
    >>> r.kind, r.agent_id
    ('truncate', 'x')
    """
    return GuardRefusal.model_validate_json(content)


# --- approval tokens ---------------------------------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signature(key: bytes, signed: str) -> str:
    return hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()


def issue_approval(
    key: bytes,
    table: str,
    op: Op,
    max_rows: int,
    expires: datetime,
    *,
    by: str | None = None,
    nonce: str | None = None,
) -> str:
    """A signed token approving ``op`` statements of up to ``max_rows`` rows on ``table`` until ``expires``.

    >>> from datetime import datetime, UTC
    >>> t = issue_approval(b"k" * 32, "public.refunds", "delete", 500, datetime(2030, 1, 1, tzinfo=UTC), nonce="0" * 16)
    >>> t.startswith("wg1.") and len(t.split(".")) == 3
    True
    >>> approval_problem(b"k" * 32, t, "public.refunds", "delete", 500, datetime(2029, 1, 1, tzinfo=UTC)) is None
    True
    """
    if op not in OPS:
        raise ApprovalError(f"--op {op!r}: one of {', '.join(OPS)}")
    if expires.tzinfo is None:
        raise ApprovalError("the expiry needs a time zone")
    try:
        payload = Approval(
            table=table,
            op=op,
            max_rows=max_rows,
            exp=int(expires.timestamp()),
            nonce=nonce or secrets.token_hex(16),
            by=by,
        )
    except ValidationError as e:
        raise ApprovalError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    # sort_keys: the same approval always gives the same bytes (the database verifies the text, not a re-encoding).
    body = _b64url(json.dumps(payload.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":")).encode())
    signed = f"{TOKEN_VERSION}.{body}"
    return f"{signed}.{_signature(key, signed)}"


def read_approval(token: str) -> Approval:
    """The payload of a token, *unverified* (to show what it allows); raises ApprovalError if malformed."""
    m = _TOKEN.fullmatch(token.strip())
    if m is None:
        raise ApprovalError("not a writeguard approval token (wg1.<payload>.<signature>)")
    try:
        raw = base64.urlsafe_b64decode(m.group(1) + "=" * (-len(m.group(1)) % 4))
        return Approval.model_validate_json(raw)
    except (ValueError, ValidationError):
        raise ApprovalError("the token's payload is not an approval") from None


def approval_problem(
    key: bytes, token: str | None, table: str, op: str, rows: int, now: datetime | None = None
) -> str | None:
    """Why ``token`` does not approve a statement (``None``: it does), in the database function's words.

    The reasons are those ``<schema>.approval_problem`` returns: missing, malformed, bad signature, expired,
    wrong table, wrong operation, too many rows (single use is the database's: it needs the transaction).

    >>> from datetime import datetime, UTC
    >>> t = issue_approval(b"k" * 32, "public.refunds", "delete", 10, datetime(2030, 1, 1, tzinfo=UTC))
    >>> [approval_problem(b"k" * 32, t, "public.refunds", "delete", 11, datetime(2029, 1, 1, tzinfo=UTC)),
    ...  approval_problem(b"x" * 32, t, "public.refunds", "delete", 1, datetime(2029, 1, 1, tzinfo=UTC)),
    ...  approval_problem(b"k" * 32, t, "public.refunds", "delete", 1, datetime(2031, 1, 1, tzinfo=UTC))]
    ['too many rows', 'bad signature', 'expired']
    """
    if not token:
        return "missing"
    m = _TOKEN.fullmatch(token.strip())
    if m is None:
        return "malformed"
    if not hmac.compare_digest(_signature(key, f"{TOKEN_VERSION}.{m.group(1)}"), m.group(2)):
        return "bad signature"
    try:
        a = read_approval(token)
    except ApprovalError:
        return "malformed"
    if a.exp <= (now or datetime.now(UTC)).timestamp():
        return "expired"
    if a.table != table:
        return "wrong table"
    if a.op != op:
        return "wrong operation"
    if rows > a.max_rows:
        return "too many rows"
    return None


# --- rendering ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuardedTable:
    schema: str
    table: str
    guard: GuardSpec

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


def guarded_tables(tables: Sequence[TableSpec]) -> list[GuardedTable]:
    """Every watched table with its guard settings (``tables[].guard``; the defaults when absent)."""
    out = []
    for t in tables:
        schema, _, table = t.name.partition(".")
        out.append(GuardedTable(schema, table, t.guard))
    return out


@dataclass(frozen=True, slots=True)
class GuardSql:
    """The statements to run in one transaction, then the key's: it binds the key (``%(approval_key)s``)."""

    statements: list[sql.Composed]
    install_key: sql.Composed


def _refuse_body(s: sql.Identifier) -> sql.Composed:
    # Builds the message, logs it three ways, raises. Table and role names arrive as arguments: the body holds
    # no value from the config. A failed emit (wal_level below logical) must not turn a refusal into a pass.
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {s}.refuse(kind text, command text, tbl text, nrows bigint, lim bigint, "
        "problem text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $wg$\n"
        "DECLARE\n"
        "  who text := session_user::text;\n"
        "  agent text := {s}.agent_of(session_user::text);\n"
        "  op text := lower(command);\n"
        "  body jsonb;\n"
        "  msg text;\n"
        "  hint text;\n"
        "  -- The table as one shell word of the approve command: quoted only when it has to be.\n"
        "  shell_tbl text := CASE WHEN tbl ~ '^[A-Za-z0-9_.]+$' THEN tbl "
        "ELSE '''' || replace(tbl, '''', '''\"''\"''') || '''' END;\n"
        "BEGIN\n"
        "  body := jsonb_strip_nulls(jsonb_build_object('v', 1, 'kind', kind, 'command', command, 'table', tbl, "
        "'role', who, 'agent_id', agent, 'rows', nrows, 'limit', lim, 'approval', problem, "
        "'query', left(current_query(), 1000), 'txid', pg_current_xact_id_if_assigned()::text, "
        "'at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')));\n"
        "  BEGIN\n"
        "    PERFORM pg_logical_emit_message(false, {prefix}, body::text);\n"
        "  EXCEPTION WHEN OTHERS THEN\n"
        "    RAISE WARNING 'writeguard: could not emit the refusal message: %', SQLERRM;\n"
        "  END;\n"
        "  RAISE LOG 'writeguard refused: %', body::text;\n"
        "  IF kind = 'rows' THEN\n"
        "    msg := format('writeguard refused %s on %s by agent role %s: %s rows in one statement, above the limit "
        "of %s for agent roles (approval: %s). Nothing was changed. A human can approve it: writeguard approve "
        "-c CONFIG --table %s --op %s --max-rows %s --ttl 15m, then run the statement in a transaction after "
        "SET LOCAL {setting} = ''<token>'';', command, tbl, quote_ident(who), nrows, lim, problem, shell_tbl, "
        "op, nrows);\n"
        "    hint := format('BEGIN; SET LOCAL {setting} = ''<token>''; <the %s statement>; COMMIT;', command);\n"
        "  ELSE\n"
        "    msg := format('writeguard refused %s on %s by agent role %s: agent roles may not %s a watched table. "
        "Nothing was changed. No approval allows it: a human must run it with their own role.', command, tbl, "
        "quote_ident(who), CASE kind WHEN 'truncate' THEN 'truncate' WHEN 'drop' THEN 'drop (or drop the guard "
        "triggers of)' ELSE 'alter' END);\n"
        "    hint := 'Ask a human (a DBA) to run it; the attempt is logged.';\n"
        "  END IF;\n"
        "  RAISE EXCEPTION USING ERRCODE = {code}, MESSAGE = msg, HINT = hint, "
        "DETAIL = format('role %s, agent %s; logged as %s', who, coalesce(agent, '?'), {prefix});\n"
        "END\n"
        "$wg$"
    ).format(
        s=s,
        prefix=sql.Literal(REFUSED_PREFIX),
        setting=sql.SQL(APPROVAL_SETTING),
        code=sql.Literal(REFUSED_SQLSTATE),
    )


def _hmac_body(s: sql.Identifier) -> sql.Composed:
    # RFC 2104 over PostgreSQL's sha256(): pgcrypto's hmac() would have to be found through a search path
    # the SECURITY DEFINER functions pin to pg_catalog, in whatever schema it was installed.
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {s}.hmac_sha256(k bytea, m bytea) RETURNS bytea LANGUAGE plpgsql IMMUTABLE "
        "STRICT SET search_path = pg_catalog, pg_temp AS $wg$\n"
        "DECLARE\n"
        "  kp bytea;\n"
        "  ipad bytea;\n"
        "  opad bytea;\n"
        "BEGIN\n"
        "  kp := CASE WHEN length(k) > 64 THEN sha256(k) ELSE k END;\n"
        "  kp := kp || decode(repeat('00', 64 - length(kp)), 'hex');\n"
        "  ipad := kp;\n"
        "  opad := kp;\n"
        "  FOR i IN 0..63 LOOP\n"
        "    ipad := set_byte(ipad, i, get_byte(kp, i) # 54);\n"
        "    opad := set_byte(opad, i, get_byte(kp, i) # 92);\n"
        "  END LOOP;\n"
        "  RETURN sha256(opad || sha256(ipad || m));\n"
        "END\n"
        "$wg$"
    ).format(s=s)


def _approval_body(s: sql.Identifier) -> sql.Composed:
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {s}.approval_problem(tbl text, op text, nrows bigint) RETURNS text "
        "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $wg$\n"
        "DECLARE\n"
        "  token text := btrim(coalesce(current_setting({setting}, true), ''));\n"
        "  parts text[];\n"
        "  k bytea;\n"
        "  a jsonb;\n"
        "  b64 text;\n"
        "  used xid8;\n"
        "BEGIN\n"
        "  IF token = '' THEN RETURN 'missing'; END IF;\n"
        "  parts := regexp_match(token, '^wg1\\.([A-Za-z0-9_-]+)\\.([0-9a-f]{{64}})$');\n"
        "  IF parts IS NULL THEN RETURN 'malformed'; END IF;\n"
        "  SELECT key INTO k FROM {s}.approval_key WHERE id = 1;\n"
        "  IF k IS NULL THEN RETURN 'no approval key installed'; END IF;\n"
        "  IF {s}.hmac_sha256(k, convert_to('wg1.' || parts[1], 'UTF8')) <> decode(parts[2], 'hex') THEN\n"
        "    RETURN 'bad signature';\n"
        "  END IF;\n"
        "  BEGIN\n"
        "    b64 := translate(parts[1], '-_', '+/');\n"
        "    a := convert_from(decode(rpad(b64, ((length(b64) + 3) / 4) * 4, '='), 'base64'), 'UTF8')::jsonb;\n"
        "    IF (a ->> 'v') IS DISTINCT FROM '1' OR (a ->> 'nonce') IS NULL THEN RETURN 'malformed'; END IF;\n"
        "    IF (a ->> 'exp')::numeric <= extract(epoch FROM clock_timestamp()) THEN RETURN 'expired'; END IF;\n"
        "    IF (a ->> 'table') IS DISTINCT FROM tbl THEN RETURN 'wrong table'; END IF;\n"
        "    IF (a ->> 'op') IS DISTINCT FROM op THEN RETURN 'wrong operation'; END IF;\n"
        "    IF nrows > (a ->> 'max_rows')::bigint THEN RETURN 'too many rows'; END IF;\n"
        "  EXCEPTION WHEN data_exception THEN\n"
        "    RETURN 'malformed';\n"
        "  END;\n"
        "  -- One transaction per token: a concurrent second use waits on the key, then sees the first's xid.\n"
        "  INSERT INTO {s}.approval_used (nonce, xid, exp, approved_by) VALUES (a ->> 'nonce', pg_current_xact_id(), "
        "to_timestamp((a ->> 'exp')::numeric), a ->> 'by') ON CONFLICT (nonce) DO NOTHING;\n"
        "  SELECT u.xid INTO used FROM {s}.approval_used u WHERE u.nonce = a ->> 'nonce';\n"
        "  IF used IS DISTINCT FROM pg_current_xact_id() THEN RETURN 'already used by another transaction'; END IF;\n"
        "  RAISE LOG 'writeguard approved: % of % rows on % by role % (approved by %, nonce %)', "
        "upper(op), nrows, tbl, session_user, coalesce(a ->> 'by', '?'), a ->> 'nonce';\n"
        "  RETURN NULL;\n"
        "END\n"
        "$wg$"
    ).format(s=s, setting=sql.Literal(APPROVAL_SETTING))


def _table_trigger_bodies(s: sql.Identifier) -> list[sql.Composed]:
    return [
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {s}.refuse_truncate() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path = pg_catalog, pg_temp AS $wg$\n"
            "BEGIN\n"
            "  IF {s}.agent_of(session_user::text) IS NOT NULL THEN\n"
            "    PERFORM {s}.refuse('truncate', 'TRUNCATE', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, "
            "NULL, NULL, NULL);\n"
            "  END IF;\n"
            "  RETURN NULL;\n"
            "END\n"
            "$wg$"
        ).format(s=s),
        # TG_ARGV[0] is the table's limit for the trigger's operation; old_rows the statement's transition table.
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {s}.limit_rows() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path = pg_catalog, pg_temp AS $wg$\n"
            "DECLARE\n"
            "  lim bigint := TG_ARGV[0]::bigint;\n"
            "  n bigint;\n"
            "  tbl text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;\n"
            "  problem text;\n"
            "BEGIN\n"
            "  IF {s}.agent_of(session_user::text) IS NULL THEN RETURN NULL; END IF;\n"
            "  SELECT count(*) INTO n FROM old_rows;\n"
            "  IF n <= lim THEN RETURN NULL; END IF;\n"
            "  problem := {s}.approval_problem(tbl, lower(TG_OP), n);\n"
            "  IF problem IS NOT NULL THEN\n"
            "    PERFORM {s}.refuse('rows', TG_OP, tbl, n, lim, problem);\n"
            "  END IF;\n"
            "  RETURN NULL;\n"
            "END\n"
            "$wg$"
        ).format(s=s),
    ]


def _event_trigger_bodies(s: sql.Identifier) -> list[sql.Composed]:
    return [
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {s}.refuse_drop() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path = pg_catalog, pg_temp AS $wg$\n"
            "DECLARE\n"
            "  obj record;\n"
            "  hit text;\n"
            "BEGIN\n"
            "  IF {s}.agent_of(session_user::text) IS NULL THEN RETURN; END IF;\n"
            "  FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP\n"
            "    hit := NULL;\n"
            "    IF obj.classid = 'pg_class'::regclass THEN\n"
            "      SELECT w.name INTO hit FROM {s}.watched w WHERE w.rel = obj.objid AND w.refuse_ddl;\n"
            "    ELSIF obj.object_type = 'trigger' AND obj.address_names[3] = ANY ({triggers}::text[]) THEN\n"
            "      SELECT w.name INTO hit FROM {s}.watched w WHERE w.rel = to_regclass(quote_ident("
            "obj.address_names[1]) || '.' || quote_ident(obj.address_names[2]));\n"
            "    END IF;\n"
            "    IF hit IS NOT NULL THEN\n"
            "      PERFORM {s}.refuse('drop', tg_tag, hit, NULL, NULL, NULL);\n"
            "    END IF;\n"
            "  END LOOP;\n"
            "END\n"
            "$wg$"
        ).format(s=s, triggers=sql.Literal(list(GUARD_TRIGGERS))),
        # Each command's object resolved to its table: the table itself, or the table a trigger, rule or policy is on.
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {s}.refuse_ddl() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path = pg_catalog, pg_temp AS $wg$\n"
            "DECLARE\n"
            "  cmd record;\n"
            "  target_rel oid;\n"
            "  hit text;\n"
            "BEGIN\n"
            "  IF {s}.agent_of(session_user::text) IS NULL THEN RETURN; END IF;\n"
            "  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP\n"
            "    target_rel := CASE cmd.classid\n"
            "      WHEN 'pg_class'::regclass THEN cmd.objid\n"
            "      WHEN 'pg_trigger'::regclass THEN (SELECT t.tgrelid FROM pg_trigger t WHERE t.oid = cmd.objid)\n"
            "      WHEN 'pg_rewrite'::regclass THEN (SELECT r.ev_class FROM pg_rewrite r WHERE r.oid = cmd.objid)\n"
            "      WHEN 'pg_policy'::regclass THEN (SELECT p.polrelid FROM pg_policy p WHERE p.oid = cmd.objid)\n"
            "    END;\n"
            "    SELECT w.name INTO hit FROM {s}.watched w WHERE w.rel = target_rel AND w.refuse_ddl;\n"
            "    IF hit IS NOT NULL THEN\n"
            "      PERFORM {s}.refuse('ddl', cmd.command_tag, hit, NULL, NULL, NULL);\n"
            "    END IF;\n"
            "  END LOOP;\n"
            "END\n"
            "$wg$"
        ).format(s=s),
    ]


def render_guard_sql(
    tables: Sequence[TableSpec],
    roles: RoleMapping | None,
    *,
    schema: str = DEFAULT_SCHEMA,
    owner: str = DEFAULT_OWNER,
) -> GuardSql:
    """The guard rails, to run in one transaction as a superuser. Pure: no connection, no key needed.

    >>> from detectors.spec import TableSpec
    >>> g = render_guard_sql([TableSpec(name="public.refunds", topic="t")], RoleMapping(template="agent_{agent_id}"))
    >>> text = guard_script(g)
    >>> 'BEFORE TRUNCATE ON "public"."refunds"' in text and "ON sql_drop" in text
    True
    """
    for what, name in (("schema", schema), ("owner", owner)):
        if not PLAIN_NAME.fullmatch(name):
            raise GuardSqlError(f"--{what} {name!r}: use a plain lower-case name ([a-z_][a-z0-9_]*)")
    if roles is None or (not roles.map and roles.template is None):
        raise GuardSqlError(
            "enforcement.postgres.roles: the guard rails refuse agent roles, and no role is mapped to an agent "
            "(roles.map or roles.template is needed)"
        )
    try:
        agent_of = agent_of_role_sql(roles)
    except ValueError as e:
        raise GuardSqlError(str(e)) from None
    s, o = sql.Identifier(schema), sql.Identifier(owner)
    out: list[sql.Composed] = [
        sql.SQL(
            "DO $wg$ BEGIN IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {}) THEN "
            "CREATE ROLE {} NOLOGIN; END IF; END $wg$"
        ).format(sql.Literal(owner), o),
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(s, o),
        sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(s, o),
        sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(s),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.approval_key (id int PRIMARY KEY CHECK (id = 1), key bytea NOT NULL)"
        ).format(s),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.approval_used (nonce text PRIMARY KEY, xid xid8 NOT NULL, "
            "exp timestamptz NOT NULL, approved_by text, used_at timestamptz NOT NULL DEFAULT now())"
        ).format(s),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.watched (rel oid PRIMARY KEY, name text NOT NULL, refuse_ddl bool NOT NULL)"
        ).format(s),
    ]
    for t in ("approval_key", "approval_used", "watched"):
        out.append(sql.SQL("ALTER TABLE {}.{} OWNER TO {}").format(s, sql.Identifier(t), o))
        out.append(sql.SQL("REVOKE ALL ON TABLE {}.{} FROM PUBLIC").format(s, sql.Identifier(t)))
    out.append(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}.agent_of(r text) RETURNS text LANGUAGE sql IMMUTABLE "
            "SET search_path = pg_catalog, pg_temp BEGIN ATOMIC {}; END"
        ).format(s, agent_of)
    )
    out += [_hmac_body(s), _approval_body(s), _refuse_body(s), *_table_trigger_bodies(s), *_event_trigger_bodies(s)]
    for signature in (
        "agent_of(text)",
        "hmac_sha256(bytea, bytea)",
        "approval_problem(text, text, bigint)",
        "refuse(text, text, text, bigint, bigint, text)",
        "refuse_truncate()",
        "limit_rows()",
        "refuse_drop()",
        "refuse_ddl()",
    ):
        out.append(sql.SQL("ALTER FUNCTION {}.{} OWNER TO {}").format(s, sql.SQL(signature), o))
        out.append(sql.SQL("REVOKE ALL ON FUNCTION {}.{} FROM PUBLIC").format(s, sql.SQL(signature)))
    # identity-sql may have revoked the emit from PUBLIC: the guard's owner emits the refusals.
    for args in EMIT_OVERLOADS:
        out.append(
            sql.SQL("GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message({}) TO {}").format(sql.SQL(args), o)
        )
    guarded = guarded_tables(tables)
    out.append(sql.SQL("DELETE FROM {}.watched").format(s))
    for g in guarded:
        target = sql.Identifier(g.schema, g.table)
        out.append(
            sql.SQL(
                "INSERT INTO {}.watched (rel, name, refuse_ddl) SELECT c.oid, {}, {} FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {}"
            ).format(
                s,
                sql.Literal(g.name),
                sql.Literal(g.guard.refuse_ddl),
                sql.Literal(g.schema),
                sql.Literal(g.table),
            )
        )
        # Re-rendering after the config changed removes what it no longer asks for.
        if g.guard.refuse_truncate:
            out.append(
                sql.SQL(
                    "CREATE OR REPLACE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION "
                    "{}.refuse_truncate()"
                ).format(sql.Identifier(TRUNCATE_TRIGGER), target, s)
            )
        else:
            out.append(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRUNCATE_TRIGGER), target))
        for op, name in zip(OPS, (DELETE_TRIGGER, UPDATE_TRIGGER), strict=True):
            limit = g.guard.limit(op)
            # A trigger with a transition table serves one event only: one trigger per operation.
            out.append(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), target))
            if limit is not None:
                out.append(
                    sql.SQL(
                        "CREATE TRIGGER {} AFTER {} ON {} REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
                        "EXECUTE FUNCTION {}.limit_rows({})"
                    ).format(sql.Identifier(name), sql.SQL(op.upper()), target, s, sql.Literal(str(limit)))
                )
    for name, event, fn in (
        (DROP_EVENT_TRIGGER, "sql_drop", "refuse_drop"),
        (DDL_EVENT_TRIGGER, "ddl_command_end", "refuse_ddl"),
    ):
        out.append(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
        out.append(
            sql.SQL("CREATE EVENT TRIGGER {} ON {} EXECUTE FUNCTION {}.{}()").format(
                sql.Identifier(name), sql.SQL(event), s, sql.Identifier(fn)
            )
        )
    install_key = sql.SQL(
        "INSERT INTO {}.approval_key (id, key) VALUES (1, convert_to({}, 'UTF8')) "
        "ON CONFLICT (id) DO UPDATE SET key = EXCLUDED.key"
    ).format(s, sql.Placeholder("approval_key"))
    return GuardSql(out, install_key)


def guard_script(g: GuardSql) -> str:
    """The guard rails as one psql script, in a transaction; the key comes from the psql variable, never printed.

    >>> g = render_guard_sql([], RoleMapping(template="agent_{agent_id}"))
    >>> ":'wg_approval_key'" in guard_script(g)
    True
    """
    body = ";\n".join(st.as_string(None) for st in g.statements)
    key = g.install_key.as_string(None).replace("%(approval_key)s", f":'{KEY_VARIABLE}'")
    return (
        "-- writeguard guard-sql: review, then run as a superuser, the key from the environment (never in a file):\n"
        f'--   psql -v ON_ERROR_STOP=1 -v {KEY_VARIABLE}="$WRITEGUARD_APPROVAL_KEY" -d DB -f guard.sql\n'
        f"BEGIN;\n{body};\n{key};\nCOMMIT;\n"
    )


def apply_guard_sql(conn: Any, g: GuardSql, key: str) -> None:
    """Run the guard rails and install ``key`` through ``conn`` (a psycopg connection), in one transaction."""
    with conn.transaction():
        for st in g.statements:
            conn.execute(st)
        conn.execute(g.install_key, {"approval_key": key})
