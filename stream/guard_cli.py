"""``writeguard guard-sql`` (render or ``--apply`` the PostgreSQL guard rails) and ``writeguard approve`` (sign a
human's approval of one large UPDATE or DELETE). The SQL and the token format are in :mod:`connectors.pg_guard`."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from connectors.pg_guard import (
    APPROVAL_SETTING,
    DEFAULT_OWNER,
    DEFAULT_SCHEMA,
    OPS,
    ApprovalError,
    GuardSqlError,
    apply_guard_sql,
    guard_script,
    issue_approval,
    render_guard_sql,
)
from stream.config import ConfigError, load_config
from stream.learn import parse_since


def cmd_guard_sql(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    pg = cfg.enforcement.postgres
    try:
        g = render_guard_sql(cfg.tables, pg.roles if pg else None, schema=args.schema, owner=args.owner)
    except GuardSqlError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    if not args.apply:
        print(guard_script(g), end="")
        return 0
    if not args.dsn:
        print("writeguard guard-sql: --apply needs --dsn (a superuser: it creates event triggers)", file=sys.stderr)
        return 2
    if cfg.guard is None:
        raise ConfigError(f"{args.config}: guard.approval_key is needed to --apply (it is installed in the database)")
    import psycopg

    try:
        with psycopg.connect(args.dsn) as conn:
            apply_guard_sql(conn, g, cfg.guard.approval_key.get_secret_value())
    except psycopg.Error as e:
        # The server's message only: the DSN (and its password) stays out of it.
        print(
            f"writeguard guard-sql: not applied (nothing changed): {e.diag.message_primary or type(e).__name__}",
            file=sys.stderr,
        )
        return 1
    limited = sum(1 for t in cfg.tables if t.guard.limit("delete") is not None or t.guard.limit("update") is not None)
    print(
        f"applied: {len(cfg.tables)} tables guarded ({sum(t.guard.refuse_truncate for t in cfg.tables)} refuse "
        f"TRUNCATE, {sum(t.guard.refuse_ddl for t in cfg.tables)} refuse DROP/ALTER, {limited} with row limits), "
        f"approval key installed in {args.schema}.approval_key"
    )
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if cfg.guard is None:
        raise ConfigError(f"{args.config}: guard.approval_key is needed to sign an approval")
    table = next((t for t in cfg.tables if t.name == args.table), None)
    if table is None:
        names = ", ".join(t.name for t in cfg.tables)
        raise ConfigError(f"--table {args.table!r}: not a table of the config ({names})")
    try:
        ttl = parse_since(args.ttl)
    except ValueError as e:
        print(f"writeguard approve: --ttl: {e}", file=sys.stderr)
        return 2
    if ttl > cfg.guard.max_ttl_s:
        print(f"writeguard approve: --ttl {args.ttl}: above guard.max_ttl_s ({cfg.guard.max_ttl_s:g})", file=sys.stderr)
        return 2
    limit = table.guard.limit(args.op)
    if limit is None:
        print(f"note: {args.table} has no {args.op} limit: statements pass without an approval", file=sys.stderr)
    expires = datetime.now(UTC) + timedelta(seconds=ttl)
    by = args.by or f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        token = issue_approval(
            cfg.guard.approval_key.get_secret_value().encode(), args.table, args.op, args.max_rows, expires, by=by
        )
    except ApprovalError as e:
        print(f"writeguard approve: {e}", file=sys.stderr)
        return 2
    if args.token_only:
        print(token)
        return 0
    print(
        f"-- approves one transaction's {args.op.upper()} statements on {args.table} of up to {args.max_rows} rows "
        f"each, until {expires.isoformat(timespec='seconds')} (by {by})\n"
        f"SET LOCAL {APPROVAL_SETTING} = '{token}';"
    )
    return 0


def add_guard_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[..., None],
) -> None:
    """Register ``guard-sql`` and ``approve`` on the top-level subcommands."""
    g = sub.add_parser(
        "guard-sql",
        help="print (or --apply) the PostgreSQL guard rails that refuse agent roles' TRUNCATE, DROP, ALTER and "
        "mass UPDATE/DELETE",
        description="Render, from tables[].guard and the enforcement roles mapping, the triggers and event triggers "
        "that refuse an agent role's TRUNCATE, DROP/ALTER of a watched table, and UPDATE/DELETE statements above "
        "the table's row limit unless approved (writeguard approve). Printed for review; the approval key is read "
        "from a psql variable. --apply runs it in one transaction and installs guard.approval_key.",
    )
    with_config(g, kafka=False)
    g.add_argument("--apply", action="store_true", help="run it in one transaction instead of printing it")
    g.add_argument("--dsn", help="libpq connection string of a superuser (with --apply)")
    g.add_argument("--schema", default=DEFAULT_SCHEMA, help=f"schema of the functions (default: {DEFAULT_SCHEMA})")
    g.add_argument("--owner", default=DEFAULT_OWNER, help=f"NOLOGIN role that owns them (default: {DEFAULT_OWNER})")
    g.set_defaults(func=cmd_guard_sql)

    a = sub.add_parser(
        "approve",
        help="sign a human's approval of one transaction's large UPDATE or DELETE on a guarded table",
        description="Print the SET LOCAL line that lets one transaction's UPDATE or DELETE statements on TABLE touch "
        "up to --max-rows rows each, until --ttl from now, past the guard rails' row limit. The token is an "
        "HMAC under guard.approval_key, verified inside PostgreSQL; it approves a single transaction.",
    )
    with_config(a, kafka=False)
    a.add_argument("--table", required=True, metavar="SCHEMA.TABLE", help="a table of the config")
    a.add_argument("--op", required=True, choices=OPS)
    a.add_argument("--max-rows", required=True, type=int, metavar="N", help="the most rows one statement may touch")
    a.add_argument("--ttl", default="15m", help="how long the approval is valid: 90s, 15m, 1h (default: 15m)")
    a.add_argument("--by", help="who approves (default: user@host)")
    a.add_argument("--token-only", action="store_true", help="print the token alone")
    a.set_defaults(func=cmd_approve)
