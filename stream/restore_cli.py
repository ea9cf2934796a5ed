"""``writeguard restore``: rebuild a watched table's rows at a point in time from its CDC topic, into a table.

Reads the table's change events (its topic by offsets, or ``--events FILE``), folds them with
:func:`undo.restore.rows_at` up to the cut (``--at``, ``--alert``'s first anomalous write, or just before the
first truncate), refuses (exit 2) when the topic no longer holds the table's whole history, then writes the rows
with :func:`connectors.restore_pg.write_rows`. Progress on stderr, the summary on stdout, ``--report`` as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from stream.config import load_config
from stream.undo_cli import _when

if TYPE_CHECKING:
    from connectors.restore_pg import ReadStats, Written
    from stream.config import Config
    from undo.restore import Change, Fold, Row

EXIT_HISTORY = 2  # the topic no longer holds the table's whole history (or the input is unusable)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _us(t: datetime) -> int:
    """Microseconds since the epoch of an aware time.

    >>> _us(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC))
    1000000
    """
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // _US


_US = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)


def _iso(us: int | None) -> str:
    return "-" if us is None else datetime.fromtimestamp(us / 1e6, UTC).isoformat()


def _alert_cut(value: str, cfg_client: Mapping[str, object] | None, alerts_topic: str) -> tuple[int, str, str]:
    """(cut µs: just before the alert's first anomalous write, its table, its id) from a file or an alert id."""
    from connectors.messages import Alert

    path = Path(value)
    if path.exists():
        alert = Alert.model_validate_json(path.read_bytes())
    else:
        from connectors.restore_pg import find_alert

        if cfg_client is None:
            raise ValueError(f"--alert {value}: no such file")
        raw = find_alert(cfg_client, alerts_topic, value)
        if raw is None:
            raise ValueError(f"--alert {value}: no such file, and no alert with that id on {alerts_topic}")
        alert = Alert.model_validate_json(raw)
    first = min((t.commit_ts for t in alert.triggering_events), default=alert.commit_ts)
    return _us(first) - 1, alert.table, alert.alert_id


def cmd_restore(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from connectors.restore_pg import (
        ChangeReader,
        ReadStats,
        RestoreInputError,
        iter_changes_file,
        iter_changes_kafka,
        topic_compacted,
    )
    from connectors.undo_kafka import KafkaScanError
    from stream.config import client_settings
    from undo.restore import RESTORABLE_SETTINGS, history_problem, rows_at, unrestorable

    cfg = load_config(args.config).with_bootstrap(getattr(args, "bootstrap_servers", None))
    if args.batch_size < 1:
        _say("writeguard restore: --batch-size must be at least 1")
        return 2
    at_us: int | None = None
    cut = "before_truncate"
    table = args.table
    warnings: list[str] = []
    client = client_settings(cfg)
    try:
        if args.at is not None:
            at_us, cut = _us(args.at), "at"
        elif args.alert:
            at_us, alert_table, alert_id = _alert_cut(args.alert, client, cfg.topics.alerts)
            cut = "at"
            table = table or alert_table
            _say(f"restore: alert {alert_id}: restoring {alert_table} as of just before {_iso(at_us + 1)}")
    except (ValueError, ValidationError, OSError) as e:
        _say(f"writeguard restore: {e}")
        return 2
    if not table:
        _say("writeguard restore: name the table with --table schema.table (or give --alert)")
        return 2
    spec = next((t for t in cfg.tables if t.name == table), None)
    if spec is None:
        names = ", ".join(t.name for t in cfg.tables)
        _say(f"writeguard restore: {table} is not a watched table of {args.config} (tables: {names})")
        return 2
    into = args.into or f"{table}_restored"
    reader = ChangeReader(
        table, key_columns=spec.key_columns, message_keys=cfg.debezium is None or not cfg.debezium.key_by_agent
    )
    stats = ReadStats()
    changes: Generator[Change, None, None]
    if args.events:
        changes = iter_changes_file(args.events, reader, stats, progress=_say)
    else:
        changes = iter_changes_kafka(client, spec.topic, reader, stats, progress=_say)
    enabled = gc.isenabled()
    gc.disable()  # millions of decoded dicts without cycles: the collector would walk them again and again
    try:
        fold = rows_at(changes, at_us, before_truncate=cut == "before_truncate")
    except (RestoreInputError, KafkaScanError, OSError) as e:
        _say(f"writeguard restore: {e}")
        return 2
    finally:
        changes.close()  # the Kafka consumer closes here when the fold stopped early
        if enabled:
            gc.enable()
    state = fold.state
    if stats.missing:
        _say(f"writeguard restore: no topic {spec.topic}: nothing to restore from ({RESTORABLE_SETTINGS})")
        return EXIT_HISTORY
    if fold.stopped_at is None and cut == "before_truncate":
        cut = "end"
    _say(
        f"restore: {stats.records:,} records read from {stats.source}, {state.events:,} changes of {table} folded in "
        f"{stats.seconds:.2f} s; {len(state.rows):,} rows at the cut ({cut}"
        + (f", stopped at {fold.stopped_at.position}" if fold.stopped_at is not None else "")
        + ")"
    )
    compacted = None if args.events else topic_compacted(client, spec.topic)
    problem = history_problem(stats.starts, state, compacted=bool(compacted))
    if problem is not None:
        if not args.allow_incomplete_history:
            _say(
                f"writeguard restore: {spec.topic if not args.events else args.events} no longer holds the whole "
                f"history of {table}: {problem}. Nothing was written. To {RESTORABLE_SETTINGS}. To restore what is "
                "left anyway (rows written before the gap are missing or stale), add --allow-incomplete-history."
            )
            return EXIT_HISTORY
        warnings.append(f"incomplete history, restored anyway: {problem}")
    if state.first is not None and state.first.op != "r" and problem is None:
        warnings.append(
            "the history does not start with a snapshot (snapshot.mode=no_data?): rows that existed before the "
            "connector started are not in it, unless the table was empty then"
        )
    if compacted:
        warnings.append(
            "the topic is compacted: only each row's latest image is kept, so a cut before the latest writes "
            "may give rows newer than the cut"
        )
    folded_truncates = len(state.truncates)
    if folded_truncates:
        warnings.append(
            f"{folded_truncates} truncate(s) before the cut emptied the table (the first at {state.truncates[0][1]})"
        )
    if state.counts.get("out_of_order"):
        warnings.append(f"{state.counts['out_of_order']:,} changes came after a later commit: not in commit order")
    for w in warnings:
        _say(f"restore: warning: {w}")
    stop = fold.stopped_at
    if stop is not None and stop.op == "t":
        _say(f"restore: stopped just before the truncate at {stop.position} ({_iso(stop.commit_ts_us)})")
    rows = list(state.rows.values())
    key = list(spec.key_columns or (rows[0].key if rows else ()))
    if not rows:
        _say(f"restore: {table} had no rows at the cut: nothing to write")
    written = _write(args, cfg, table, into, list(state.columns), key, rows)
    if isinstance(written, int):
        return written
    gaps = unrestorable(state, written.columns or None)
    for c, n in written.unconvertible.items():
        gaps.setdefault(c, {})["unconvertible"] = n
    for c in written.not_in_target:
        gaps.setdefault(c, {})["not_in_target"] = len(rows)
    changed = written.inserted + written.updated
    verb = "would restore" if args.dry_run else "restored"
    print(
        f"{verb} {len(rows):,} rows of {table} into {into}"
        + (" (created)" if written.created else "")
        + f": {written.inserted:,} inserted, {written.updated:,} updated, {written.equal:,} already equal; "
        f"{changed:,} rows changed" + (" (dry run: rolled back)" if args.dry_run else "")
    )
    print(f"  cut: {cut}, last change applied at {_iso(state.last_ts_us)}; types from {written.types_from}")
    if written.extra:
        print(f"  {written.extra:,} rows in {into} are not in the restored state: left as they are")
    for c, reasons in gaps.items():
        print(f"  column {c} not restored for " + ", ".join(f"{n:,} rows ({r})" for r, n in reasons.items()))
    if args.report:
        Path(args.report).write_text(_report(args, table, into, stats, fold, cut, written, gaps, warnings) + "\n")
    return 0


def _write(
    args: argparse.Namespace,
    cfg: Config,
    table: str,
    into: str,
    columns: list[str],
    key: list[str],
    rows: Sequence[Row],
) -> Written | int:
    import psycopg

    from connectors.pg_enforce import connect_error_text
    from connectors.restore_pg import WriteRefused, Written, write_rows
    from connectors.undo_apply import ApplyRefused, server_message

    if not rows:
        return Written()
    dsn = args.dsn or (cfg.undo.dsn.get_secret_value() if cfg.undo.dsn is not None else None)
    if not dsn:
        _say("writeguard restore: no database: give --dsn or set undo.dsn in the config")
        return 2
    last = [0.0]
    started = time.perf_counter()

    def progress(done: int, total: int, w: Written) -> None:
        now = time.perf_counter()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            rate = done / (now - started) if now > started else 0.0
            _say(f"restore: {done:,}/{total:,} rows written ({done / total:.0%}), {rate:,.0f} rows/s; "
                 f"{w.inserted:,} inserted, {w.updated:,} updated, {w.equal:,} equal")  # fmt: skip

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
            return write_rows(conn, table, into, columns, key, rows, batch_size=args.batch_size,
                              dry_run=args.dry_run, on_batch=progress)  # fmt: skip
    except (WriteRefused, ApplyRefused) as e:
        _say(f"writeguard restore: {e}")
        return 1
    except psycopg.OperationalError as e:
        _say(f"writeguard restore: cannot connect: {connect_error_text(e, dsn)}")
        return 1
    except psycopg.Error as e:
        _say(f"writeguard restore: the database refused a batch (the batches before it are committed; running "
             f"again continues idempotently): {server_message(e)}")  # fmt: skip
        return 1


def _report(
    args: argparse.Namespace,
    table: str,
    into: str,
    stats: ReadStats,
    fold: Fold,
    cut: str,
    written: Written,
    gaps: dict[str, dict[str, int]],
    warnings: list[str],
) -> str:
    from undo.restore import RestoreReport

    state = fold.state
    report = RestoreReport(
        table=table,
        into=into,
        source=stats.source,
        at=None if state.last_ts_us is None else datetime.fromtimestamp(state.last_ts_us / 1e6, UTC),
        cut=cut,
        stopped_at=None if fold.stopped_at is None else fold.stopped_at.position,
        events=state.events,
        ops=dict(sorted(state.counts.items())),
        rows=len(state.rows),
        rows_inserted=written.inserted,
        rows_updated=written.updated,
        rows_equal=written.equal,
        rows_changed=written.inserted + written.updated,
        extra_rows=written.extra,
        created=written.created,
        columns=written.columns,
        types_from=written.types_from,
        unrestorable=gaps,
        truncates_seen=len(state.truncates),
        warnings=warnings,
        dry_run=args.dry_run,
        batches=written.batches,
        seconds_read=round(stats.seconds, 3),
        seconds_write=round(written.seconds, 3),
    )
    return json.dumps(report.model_dump(mode="json"), indent=2)


def add_restore_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[..., None],
) -> None:
    """Register ``restore`` on the top-level subcommands."""
    r = sub.add_parser(
        "restore",
        help="rebuild a watched table's rows at a point in time (before a DROP/TRUNCATE) from its CDC topic",
        description="Fold the table's change events (Debezium's snapshot, then every insert, update, delete and "
        "truncate, in commit order) up to the cut, and write the rows into a new table (created with the last "
        "known column set; types from pg_catalog of the original table if it still exists, else inferred from the "
        "values) or into the original once it exists again, in batches, idempotently: a second run changes "
        "nothing. Exit 2 when the topic no longer holds the table's whole history (retention deleted its start).",
    )
    with_config(r)
    r.add_argument("--table", metavar="SCHEMA.TABLE", help="the watched table to rebuild (default: --alert's table)")
    r.add_argument(
        "--into", metavar="SCHEMA.TABLE", help="where to write the rows (default: <table>_restored); may be the table"
    )
    cut = r.add_mutually_exclusive_group()
    cut.add_argument(
        "--at",
        type=_when,
        metavar="TIME",
        help="the rows as of this commit time, included: ISO 8601 (default UTC) or a duration before now (30m, 1h). "
        "Default: just before the table's first truncate, or the latest state when there is none (a DROP TABLE "
        "leaves no event)",
    )
    cut.add_argument(
        "--alert",
        metavar="ALERT.json|ID",
        help="the rows as of just before the alert's first anomalous write: an alert file, or its id (looked up "
        "on topics.alerts)",
    )
    r.add_argument(
        "--events",
        metavar="FILE.jsonl",
        help="read the change events from this file instead of Kafka (the format `undo --events` takes)",
    )
    r.add_argument("--dsn", help="libpq connection string of the database (overrides undo.dsn)")
    r.add_argument("--batch-size", type=int, default=1000, metavar="N", help="rows per transaction (default 1000)")
    r.add_argument("--dry-run", action="store_true", help="write in one transaction and roll it back: counts only")
    r.add_argument("--report", metavar="FILE.json", help="also write the report (schemas/restore-report.schema.json)")
    r.add_argument(
        "--allow-incomplete-history",
        action="store_true",
        help="restore what the topic still holds even when its start is gone (rows older than the gap are missing)",
    )
    r.set_defaults(func=cmd_restore)
