"""``writeguard scope`` and ``writeguard undo ...``: the blast radius of a selection of writes and its undo.

The planner is pure (:mod:`undo`); this module reads the inputs (a config, change events, a plan file), calls it,
and prints or writes the results. Each subcommand registers itself in :func:`add_undo_commands`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from stream.config import Config, load_config

if TYPE_CHECKING:
    from undo.models import Scope, Selection


def _when(text: str) -> datetime:
    """An ISO 8601 time; without a zone, UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-03-01T12:00:00Z)") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class NoSelection(ValueError):
    """scope or undo without any selection: it would take every writer's writes."""


def _selection(args: argparse.Namespace) -> Selection:
    from connectors.messages import Alert
    from undo.models import Selection

    agents = list(args.agent or ())
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
    return Selection(agents=tuple(agents), runs=tuple(args.run or ()), since=since, until=until, alert_id=alert_id)


def _scope(args: argparse.Namespace) -> tuple[Config, Scope]:
    from connectors.undo_source import UndoReader, read_events_file
    from undo.scope import build_scope

    cfg = load_config(args.config)
    selection = _selection(args)
    msgs = cfg.worker.agent_messages
    reader = UndoReader(
        cfg.tables,
        message_prefix=None if msgs is None else msgs.prefix,
        database_identity=msgs is not None and msgs.identity == "database",
        message_keys=cfg.debezium is None or not cfg.debezium.key_by_agent,
    )
    events, stats = read_events_file(args.events, reader, progress=lambda m: print(m, file=sys.stderr, flush=True))
    rate = stats.lines / stats.seconds if stats.seconds > 0 else 0.0
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(reader.skipped.items()))
    print(
        f"scope: {stats.lines:,} lines, {len(events):,} row changes, {stats.seconds:.2f} s ({rate:,.0f} events/s)"
        + (f"; skipped {skipped}" if skipped else ""),
        file=sys.stderr,
    )
    if reader.skipped.get("truncate"):
        print("scope: warning: TRUNCATEs cannot be undone from change events (they carry no rows)", file=sys.stderr)
    if stats.undecodable:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(stats.undecodable.items()))
        print(f"scope: warning: undecodable lines, ignored: {bad}", file=sys.stderr)
    return cfg, build_scope(events, selection, cfg.tables)


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

    from connectors.undo_source import MissingKey
    from undo.plan import PlanRefused, plan_undo

    try:
        cfg, scope = _scope(args)
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


def add_undo_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[..., None],
) -> None:
    """Register ``scope`` and ``undo`` on the top-level subcommands."""

    def with_selection(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--events",
            required=True,
            metavar="FILE.jsonl",
            help="change events in commit order: one Debezium message value per line (as replay reads), or "
            '{"key": <message key>, "value": <message value>} lines; without keys, tables[].key_columns name the '
            "columns that identify a row",
        )
        with_config(sp, kafka=False)
        sp.add_argument("--agent", action="append", metavar="ID", help="select this agent's writes (repeatable)")
        sp.add_argument("--run", action="append", metavar="ID", help="select this run's writes (repeatable)")
        sp.add_argument("--since", type=_when, metavar="TIME", help="commit time from (ISO 8601, default UTC)")
        sp.add_argument("--until", type=_when, metavar="TIME", help="commit time before (ISO 8601)")
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
    up.set_defaults(func=cmd_undo_plan)
    us = usub.add_parser(
        "show",
        help="print a plan's counts, business totals and the exact SQL of each step",
        description="Check that the plan's id matches its content (exit 1 if not), then print it. Values are shown "
        "as SQL literals for reading; applying binds them as parameters.",
    )
    us.add_argument("plan", metavar="PLAN.json")
    us.set_defaults(func=cmd_undo_show)
