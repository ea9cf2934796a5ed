"""``writeguard scope`` and ``writeguard undo ...``: the blast radius of a selection of writes and its undo.

The planner is pure (:mod:`undo`); this module reads the inputs (a config, change events, a plan file), calls it,
and prints or writes the results. Each subcommand registers itself in :func:`add_undo_commands`.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from stream.config import Config, load_config

if TYPE_CHECKING:
    from undo.events import RowEvent
    from undo.models import Scope, Selection


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([smhdw]))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def _when(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (without a zone, UTC), or a duration before now: ``90s``, ``30m``, ``1h``, ``7d``, ``1h30m``.

    >>> at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    >>> _when("1h30m", at).isoformat(), _when("2026-03-01T10:00:00").isoformat()
    ('2026-03-01T10:30:00+00:00', '2026-03-01T10:00:00+00:00')
    """
    if _DURATION.fullmatch(text):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time or a duration: {text!r} (e.g. 2026-03-01T12:00:00Z, or 90s, 30m, 1h, 7d ago)"
        ) from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class NoSelection(ValueError):
    """scope or undo without any selection: it would take every writer's writes."""


def _selection(args: argparse.Namespace) -> Selection:
    from connectors.messages import Alert
    from detectors.features import typed_identity
    from undo.models import Selection

    # The id as the worker names it: an over-long one in its digest form (detectors.features.identity).
    agents = [typed_identity(a) for a in args.agent or ()]
    since, until, alert_id = args.since, args.until, None
    if args.alert:
        alert = Alert.model_validate_json(Path(args.alert).read_bytes())
        if alert.agent_id not in agents:
            agents.append(alert.agent_id)
        # From the incident's first anomalous write: what the agent wrote before it looked normal then.
        first = min((t.commit_ts for t in alert.triggering_events), default=alert.commit_ts)
        since = since or first
        alert_id = alert.alert_id
    if not (agents or args.run or since or until):
        raise NoSelection("select writes with --agent, --run, --since/--until or --alert (none given)")
    if since is not None and until is not None and since >= until:
        raise NoSelection(f"--since {since.isoformat()} is not before --until {until.isoformat()}: nothing selected")
    return Selection(agents=tuple(agents), runs=tuple(args.run or ()), since=since, until=until, alert_id=alert_id)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _windowed(
    events: Iterable[RowEvent], tap: Callable[[RowEvent], None] | None, start_us: int | None, read: list[int]
) -> Iterator[RowEvent]:
    """Every event to ``tap``, those from ``start_us`` on to the scope; ``read[0]`` counts the events."""
    start = -(2**63) if start_us is None else start_us
    n = 0
    try:
        for ev in events:
            n += 1
            if tap is not None:
                tap(ev)
            if ev.commit_ts_us >= start:
                yield ev
    finally:
        read[0] = n


def _scan(
    events: Iterable[RowEvent],
    tap: Callable[[RowEvent], None] | None,
    start_us: int | None,
    selection: Selection,
    cfg: Config,
) -> tuple[Scope, int]:
    """build_scope over the events read, and how many were read.

    The cyclic garbage collector is paused meanwhile: a scan allocates millions of containers (decoded JSON, which
    has no cycles), and the collector would otherwise walk the ones waiting in the merge's buffers again and again
    (a third of the time of a Kafka scan). Garbage with cycles, if any, is collected when it resumes.
    """
    from undo.scope import build_scope

    read = [0]
    enabled = gc.isenabled()
    gc.disable()
    try:
        scope = build_scope(_windowed(events, tap, start_us, read), selection, cfg.tables)
    finally:
        if enabled:
            gc.enable()
    return scope, read[0]


def _scope(args: argparse.Namespace, tap: Callable[[RowEvent], None] | None = None) -> tuple[Config, Scope]:
    """The scope of the selection in ``args``, from ``--events FILE`` or else from the config's Kafka topics.

    One pass, streaming: memory holds the selected rows, not the events read. ``tap``, if given, is called with
    every row change read, selected or not, in commit order, before the scope sees it (from the file's first line;
    from Kafka, from shortly before ``--since``): the review page's charts are drawn from it.
    """
    from connectors.undo_source import ReadStats, UndoReader, iter_events_file
    from undo.scope import us_of

    cfg = load_config(args.config).with_bootstrap(getattr(args, "bootstrap_servers", None))
    selection = _selection(args)
    msgs = cfg.worker.agent_messages
    reader = UndoReader(
        cfg.tables,
        message_prefix=None if msgs is None else msgs.prefix,
        database_identity=msgs is not None and msgs.identity == "database",
        message_keys=cfg.debezium is None or not cfg.debezium.key_by_agent,
        hold_s=5.0 if msgs is None else msgs.hold_s,
        undo_keys=cfg.control.keys() if cfg.control is not None else (),
    )
    start_us = None if selection.since is None else us_of(selection.since)
    if args.events:
        stats = ReadStats()
        # Without a tap, the lines before the window are skipped after reading their commit time alone.
        events = iter_events_file(args.events, reader, stats, start_us=start_us if tap is None else None, progress=_say)
        scope, n = _scan(events, tap, start_us, selection, cfg)
        rate = stats.lines / stats.seconds if stats.seconds > 0 else 0.0
        head = f"scope: {stats.lines:,} lines, {n:,} row changes"
        if stats.before_window:
            head += f" ({stats.before_window:,} lines before --since skipped)"
        _say(f"{head}, {stats.seconds:.2f} s ({rate:,.0f} events/s)" + _skipped(reader.skipped))
        if stats.undecodable:
            bad = ", ".join(f"{k}={v}" for k, v in sorted(stats.undecodable.items()))
            _say(f"scope: warning: undecodable lines, ignored: {bad}")
    else:
        from connectors.undo_kafka import KafkaStats, iter_events_kafka
        from stream.config import client_settings

        topics = [t.topic for t in cfg.tables] + ([] if msgs is None else [msgs.topic])
        kstats = KafkaStats()
        events = iter_events_kafka(client_settings(cfg), topics, reader, kstats, start_us=start_us, progress=_say)
        scope, n = _scan(events, tap, start_us, selection, cfg)
        rate = kstats.records / kstats.seconds if kstats.seconds > 0 else 0.0
        share = kstats.records / kstats.in_topics if kstats.in_topics else 0.0
        frm = "the beginning" if selection.since is None else selection.since.isoformat()
        _say(
            f"scope: {kstats.records:,} records read of {kstats.in_topics:,} in {len(kstats.partitions)} partitions "
            f"of {len(topics) - len(kstats.missing_topics)} topics ({share:.1%}), from {frm} to the end; "
            f"{n:,} row changes, {kstats.seconds:.2f} s ({rate:,.0f} events/s)" + _skipped(reader.skipped)
        )
        if kstats.missing_topics:
            _say(f"scope: note: no such topic (yet): {', '.join(kstats.missing_topics)}")
        if kstats.undecodable:
            bad = ", ".join(f"{k}={v}" for k, v in sorted(kstats.undecodable.items()))
            _say(f"scope: warning: undecodable records, ignored: {bad}")
    if reader.skipped.get("truncate"):
        _say("scope: warning: TRUNCATEs cannot be undone from change events (they carry no rows)")
    if reader.out_of_order:
        _say(
            f"scope: warning: {reader.out_of_order:,} row changes came after a later commit (first at "
            f"{reader.first_out_of_order}): the input is not in commit order, and the scope takes writes in the "
            "order read; sort the file by commit time"
        )
    return cfg, scope


def _skipped(counts: Counter[str]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"; skipped {text}" if text else ""


def _undo_input_error(e: Exception) -> int:
    print(f"writeguard: {e}", file=sys.stderr)
    return 2


def cmd_scope(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from connectors.undo_source import MissingKey
    from undo.scope import summary_lines

    try:
        _, scope = _scope(args)
    except (MissingKey, NoSelection, ValidationError, OSError) as e:
        return _undo_input_error(e)
    if args.json:
        print(scope.model_dump_json(indent=2))
    else:
        print("\n".join(summary_lines(scope)))
    return 0


def cmd_undo_plan(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from connectors.messages import Alert
    from connectors.undo_source import MissingKey
    from undo.plan import PlanRefused, plan_undo
    from undo.review import render_review
    from undo.series import SeriesCollector, alert_marks

    try:
        charts = None
        if args.html:  # the review page's charts see every event the scope reads, through _scope's tap
            marks = alert_marks(Alert.model_validate_json(Path(args.alert).read_bytes())) if args.alert else []
            charts = SeriesCollector(_selection(args), load_config(args.config).tables, marks)
        cfg, scope = _scope(args, tap=None if charts is None else charts.add)
    except (MissingKey, NoSelection, ValidationError, OSError) as e:
        return _undo_input_error(e)
    try:
        plan = plan_undo(scope, cfg.tables, all_or_nothing=args.all_or_nothing)
    except PlanRefused as e:
        print(f"writeguard: {e}:", file=sys.stderr)
        for table, key, c in e.conflicts:
            print(f"  {table} {json.dumps(key)}: {c.reason}: {c.detail}", file=sys.stderr)
        return 1
    Path(args.output).write_text(plan.model_dump_json(indent=2) + "\n")
    conflicts = sum(1 for s in plan.steps if s.conflict is not None)
    print(f"plan {plan.plan_id}: {len(plan.steps)} steps, {conflicts} conflicts, written to {args.output}")
    if charts is not None:
        page = render_review(scope, plan, charts.series(), alert_marks=charts.marks)
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"review page written to {args.html}")
    return 0


def cmd_undo_show(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from connectors.undo_sql import step_text
    from undo.models import Plan
    from undo.plan import PlanRejected, verify_plan_id

    try:
        plan = Plan.model_validate_json(Path(args.plan).read_bytes())
    except (ValidationError, OSError) as e:
        return _undo_input_error(e)
    try:
        verify_plan_id(plan)
    except PlanRejected as e:
        print(f"writeguard: {args.plan}: {e}", file=sys.stderr)
        return 1
    decisions = Counter(s.decision for s in plan.steps)
    print(f"plan {plan.plan_id} (made {plan.created_at.isoformat()})")
    tally = ", ".join(f"{n} {d}" for d, n in sorted(decisions.items())) or "no steps"
    print(f"  {tally}; {plan.unchanged_rows} rows unchanged")
    for t in plan.tables:
        counts = ", ".join(f"{n} {a}" for a, n in sorted(t.steps.items()))
        net = "".join(f", {f} {v:+,.2f}" for f, v in t.undo_net.items())
        print(f"{t.table}: {counts}; {t.conflicts} conflicts{net}")
    for st in plan.steps:
        head = f"-- step {st.n} [{st.decision}] {st.action} {st.table} {json.dumps(st.key)}"
        if st.conflict is not None:
            who = f" by {st.conflict.writer}" if st.conflict.writer else ""
            head += f" -- conflict {st.conflict.reason}{who}: {st.conflict.detail}"
        print(head)
        if st.values is None:
            print("-- no SQL: the values to write back are unknown")
        else:
            print(step_text(st) + ";")
    return 0


if TYPE_CHECKING:  # undo apply and undo status
    from undo.models import Plan


def _undo_config(args: argparse.Namespace) -> Config:
    return load_config(args.config).with_bootstrap(getattr(args, "bootstrap_servers", None))


def _verified_plan(path: str, command: str) -> Plan | int:
    """The plan in ``path``, or the exit status: 2 unreadable, 1 changed since it was made (with the reason)."""
    from pydantic import ValidationError

    from undo.models import Plan
    from undo.plan import PlanRejected, verify_plan_id

    try:
        plan = Plan.model_validate_json(Path(path).read_bytes())
    except (ValidationError, OSError) as e:
        return _undo_input_error(e)
    try:
        verify_plan_id(plan)
    except PlanRejected as e:
        print(f"writeguard {command}: refused {path}: {e}", file=sys.stderr)
        return 1
    return plan


def _undo_dsn(args: argparse.Namespace, cfg: Config, command: str) -> str | None:
    dsn = args.dsn or (cfg.undo.dsn.get_secret_value() if cfg.undo.dsn is not None else None)
    if not dsn:
        print(f"writeguard {command}: no database: give --dsn or set undo.dsn in the config", file=sys.stderr)
    return dsn


def cmd_undo_apply(args: argparse.Namespace) -> int:
    import getpass
    import socket
    import time

    import psycopg

    from connectors.corrections import CorrectionPublisher, CorrectionsError
    from connectors.pg_enforce import connect_error_text
    from connectors.undo_apply import ApplyRefused, BatchDone, StepFailed, apply_plan, server_message
    from stream.config import client_settings

    plan = _verified_plan(args.plan, "undo apply")
    if isinstance(plan, int):
        return plan
    cfg = _undo_config(args)
    dsn = _undo_dsn(args, cfg, "undo apply")
    if dsn is None:
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        print("writeguard undo apply: --batch-size must be at least 1", file=sys.stderr)
        return 2
    by = args.by or f"{getpass.getuser()}@{socket.gethostname()}"
    keys = cfg.control.keys() if cfg.control is not None else ()
    if not keys:
        _say(
            "undo apply: warning: no control.signing_key: the undo's messages are unsigned, a worker cannot trust them"
        )
    msgs = cfg.worker.agent_messages
    corr = cfg.undo.corrections
    publisher = None
    if corr is not None and not args.dry_run:
        publisher = CorrectionPublisher(client_settings(cfg), corr.topic, partitions=cfg.topics.partitions)
    last = [0.0]

    def progress(b: BatchDone) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or b.steps_done == b.steps_total:
            last[0] = now
            rate = b.steps_done / b.seconds if b.seconds > 0 else 0.0
            share = b.steps_done / b.steps_total if b.steps_total else 1.0
            _say(
                f"undo apply: {b.steps_done:,}/{b.steps_total:,} steps ({share:.0%}), batch {b.batch}, "
                f"{rate:,.0f} rows/s"
            )

    verb = "dry run" if args.dry_run else "apply"
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=30)
    except psycopg.Error as e:
        print(f"writeguard undo apply: cannot connect: {connect_error_text(e, dsn)}", file=sys.stderr)
        return 1
    with conn:
        try:
            report = apply_plan(
                conn,
                plan,
                applied_by=by,
                dry_run=args.dry_run,
                batch_size=args.batch_size or cfg.undo.batch_size,
                ledger=cfg.undo.ledger,
                signing_keys=keys,
                message_prefix="writeguard" if msgs is None else msgs.prefix,
                corrections=publisher,
                lock_timeout_s=cfg.undo.lock_timeout_s,
                on_batch=progress,
            )
        except ApplyRefused as e:
            print(f"writeguard undo apply: {e}", file=sys.stderr)
            return 1
        except StepFailed as e:
            then = "" if args.dry_run else "; the batches before it are committed: fix the cause and run it again"
            print(f"writeguard undo {verb}: the database refused {e}{then}", file=sys.stderr)
            return 1
        except CorrectionsError as e:
            print(
                f"writeguard undo apply: the batch is applied and in the ledger, but {e}: run the same command "
                "again to publish the unconfirmed corrections",
                file=sys.stderr,
            )
            return 1
        except psycopg.Error as e:
            print(f"writeguard undo {verb}: {server_message(e)}", file=sys.stderr)
            return 1
    if args.report:
        Path(args.report).write_text(report.model_dump_json(indent=2) + "\n")
    rate = len(plan.steps) / report.seconds if report.seconds > 0 else 0.0
    head = "dry run, rolled back: nothing changed" if args.dry_run else f"applied by {by}"
    print(
        f"plan {plan.plan_id}: {head}; {len(plan.steps):,} steps in {report.batches} batches, "
        f"{report.seconds:.2f} s ({rate:,.0f} rows/s)"
    )
    print("  " + (", ".join(f"{n:,} {o}" for o, n in sorted(report.outcomes.items())) or "no steps"))
    for table, counts in report.tables.items():
        print(f"{table}: " + ", ".join(f"{n:,} {o}" for o, n in sorted(counts.items())))
    shown = [s for s in report.steps if s.outcome in ("precondition_failed", "key_taken", "conflict")]
    for s in shown[:20]:
        print(f"  step {s.n} {s.outcome}: {s.action} {s.table} {json.dumps(s.key)}: {s.detail}")
    if len(shown) > 20:
        print(f"  ... and {len(shown) - 20} more (--report FILE lists every step)")
    if publisher is not None:
        print(f"{report.corrections_published:,} corrections published on {publisher.topic}")
    if report.rolled_back:
        print("writeguard undo apply: all-or-nothing plan: a step could not be applied, nothing was committed")
        return 1
    return 0


def cmd_undo_status(args: argparse.Namespace) -> int:
    import psycopg

    from connectors.corrections import committed_offsets
    from connectors.pg_enforce import connect_error_text
    from connectors.undo_apply import STATES, plan_status, server_message
    from stream.config import client_settings

    plan = _verified_plan(args.plan, "undo status")
    if isinstance(plan, int):
        return plan
    cfg = _undo_config(args)
    dsn = _undo_dsn(args, cfg, "undo status")
    if dsn is None:
        return 2
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
            status = plan_status(conn, plan, cfg.undo.ledger)
    except psycopg.OperationalError as e:
        print(f"writeguard undo status: cannot connect: {connect_error_text(e, dsn)}", file=sys.stderr)
        return 1
    except psycopg.Error as e:
        print(f"writeguard undo status: {server_message(e)}", file=sys.stderr)
        return 1
    print(f"plan {plan.plan_id}: {status.steps:,} steps")
    print("  " + ", ".join(f"{status.states.get(s, 0):,} {s.replace('_', ' ')}" for s in STATES))
    complete = status.all_run
    if not status.all_run:
        print(f"not complete: {status.states.get('not_yet_run', 0):,} steps not yet run (writeguard undo apply)")
    corr = cfg.undo.corrections
    if corr is not None:
        if status.unpublished:
            complete = False
            print(
                f"not complete: {status.unpublished:,} applied steps' corrections not confirmed by Kafka (run "
                "writeguard undo apply again to publish them)"
            )
        topics = sorted({t for t, _ in status.last_offsets})
        for topic in topics or [corr.topic]:
            last = {p: o for (t, p), o in status.last_offsets.items() if t == topic}
            got = committed_offsets(client_settings(cfg), topic, corr.downstream_groups, sorted(last))
            for group in corr.downstream_groups:
                behind = [(p, got[group].get(p, -1), o) for p, o in sorted(last.items()) if got[group].get(p, -1) <= o]
                if behind:
                    complete = False
                    where = ", ".join(
                        f"partition {p} at {'no committed offset' if c < 0 else f'offset {c}'} (last correction {o})"
                        for p, c, o in behind
                    )
                    print(f"downstream {group}: not yet past the plan's corrections on {topic}: {where}")
                else:
                    print(f"downstream {group}: has read every correction of the plan on {topic}")
    print("complete" if complete else "not complete")
    return 0 if complete else 1


def add_undo_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[..., None],
) -> None:
    """Register ``scope`` and ``undo`` on the top-level subcommands."""

    def with_selection(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--events",
            metavar="FILE.jsonl",
            help="read change events from this file instead of Kafka: in commit order, one Debezium message value "
            'per line (as replay reads), or {"key": <message key>, "value": <message value>} lines; without keys, '
            "tables[].key_columns name the columns that identify a row. Without --events: the config's CDC topics "
            "(tables[].topic) and worker.agent_messages.topic, from --since (offsets_for_times) to their end",
        )
        with_config(sp)
        sp.add_argument("--agent", action="append", metavar="ID", help="select this agent's writes (repeatable)")
        sp.add_argument("--run", action="append", metavar="ID", help="select this run's writes (repeatable)")
        sp.add_argument(
            "--since",
            type=_when,
            metavar="TIME",
            help="commit time from: ISO 8601 (default UTC), or a duration before now (90s, 30m, 1h, 7d)",
        )
        sp.add_argument(
            "--until",
            type=_when,
            metavar="TIME",
            help="commit time before (as --since); later writes to the selected rows are still read: conflicts",
        )
        sp.add_argument(
            "--alert",
            metavar="ALERT.json",
            help="an alert (as published): its agent, from its first triggering event's commit time",
        )

    sc = sub.add_parser(
        "scope",
        help="the blast radius: every row the selected writes touched, and who wrote those rows afterwards",
        description="Select writes by agent, run, time range or alert; list per table and op the counts, the net "
        "change of each numeric feature in the column's units, the runs, the time range, and the conflicts "
        "(rows written afterwards by someone outside the selection, before images that cannot be restored from).",
    )
    with_selection(sc)
    sc.add_argument("--json", action="store_true", help="print the scope as JSON (schemas/undo-scope.schema.json)")
    sc.set_defaults(func=cmd_scope)

    u = sub.add_parser("undo", help="plan (and show) the compensation of what an agent wrote")
    usub = u.add_subparsers(dest="undo_command", required=True, metavar="ACTION")
    up = usub.add_parser(
        "plan",
        help="write the compensation plan of a selection of writes",
        description="Compute, in reverse commit order, one step per row: delete what the selection created (or "
        "soft-delete it), update back exactly the columns it changed, re-insert what it deleted; each with its "
        "precondition. Conflicting rows are listed, not compensated; a reviewer may set a step's decision to "
        "'skip', or to 'force' on a conflict. The plan id is the hash of its content.",
    )
    with_selection(up)
    up.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="where to write the plan")
    up.add_argument("--all-or-nothing", action="store_true", help="refuse (exit 1) if any row is a conflict")
    up.add_argument("--html", metavar="REVIEW.html", help="also write the review page (one self-contained HTML file)")
    up.set_defaults(func=cmd_undo_plan)
    us = usub.add_parser(
        "show",
        help="print a plan's counts, business totals and the exact SQL of each step",
        description="Check that the plan's id matches its content (exit 1 if not), then print it. Values are shown "
        "as SQL literals for reading; applying binds them as parameters.",
    )
    us.add_argument("plan", metavar="PLAN.json")
    us.set_defaults(func=cmd_undo_show)
    ua = usub.add_parser(
        "apply",
        help="apply a plan to the database (or --dry-run it), in batches, idempotently",
        description="Refuse a plan whose id does not match its content (exit 1), then apply its steps in batches of "
        "--batch-size, each one transaction: lock the plan (advisory lock) and the batch's rows (SELECT ... FOR "
        "UPDATE), skip the steps the ledger (undo.ledger, created if missing) has as applied, check each step's "
        "precondition, apply the steps whose decision is apply or force, record every outcome in the ledger, and "
        "emit a signed logical decoding message naming the agent writeguard-undo. Re-running continues where a "
        "run stopped, also after a crash; a step that was not applied is checked again. After each batch the "
        "corrections of its applied steps are published (undo.corrections). Progress on stderr; a summary, and "
        "each step not applied with the reason, on stdout. Exit 0 when the run ended, 1 when it was refused, "
        "rolled back, or the database refused a batch (the message names the step).",
    )
    ua.add_argument("plan", metavar="PLAN.json")
    with_config(ua)
    ua.add_argument("--dsn", help="libpq connection string of the watched tables' database (overrides undo.dsn)")
    ua.add_argument(
        "--dry-run",
        action="store_true",
        help="run every batch and roll it back: report what would change; nothing changes, not even the ledger",
    )
    ua.add_argument("--batch-size", type=int, metavar="N", help="steps per transaction (default: undo.batch_size)")
    ua.add_argument("--by", metavar="WHO", help="who applies it, for the ledger (default: user@host)")
    ua.add_argument("--report", metavar="FILE.json", help="also write every step's outcome as JSON")
    ua.set_defaults(func=cmd_undo_apply)
    ust = usub.add_parser(
        "status",
        help="how far a plan's undo is: steps per outcome, and whether downstream consumers read its corrections",
        description="From the ledger: the plan's steps applied, precondition failed, key taken, skipped, conflict "
        "and not yet run; then, for every consumer group in undo.corrections.downstream_groups, whether its "
        "committed offset on each partition of the corrections topic is past the plan's last correction there. "
        "Exit 0 when the fix is complete (every step run, every correction confirmed and read by every downstream "
        "group), 1 when not.",
    )
    ust.add_argument("plan", metavar="PLAN.json")
    with_config(ust)
    ust.add_argument("--dsn", help="libpq connection string of the database (overrides undo.dsn)")
    ust.set_defaults(func=cmd_undo_status)
