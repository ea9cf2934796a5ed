"""``writeguard``: the command line. Each subcommand's ``--help`` says what it does and what it needs."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from stream.config import EXAMPLE_CONFIG, Config, ConfigError, client_settings, config_json_schema, load_config
from stream.guard_cli import add_guard_commands
from stream.restore_cli import add_restore_commands
from stream.undo_cli import add_undo_commands


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    return cfg.with_bootstrap(getattr(args, "bootstrap_servers", None))


def cmd_worker(args: argparse.Namespace) -> int:
    from stream.app import run_worker

    run_worker(_config(args), loglevel=args.loglevel, datadir=args.datadir, metrics_port=args.metrics_port)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from stream.replay import print_summary, replay

    cfg = _config(args)
    alerts = open(args.alerts, "wb") if args.alerts else sys.stdout.buffer
    scores = open(args.scores, "wb") if args.scores else None
    try:
        stats = replay(
            args.events,
            cfg,
            alerts_out=alerts,
            scores_out=scores,
            progress=lambda m: print(m, file=sys.stderr, flush=True),
        )
    finally:
        if args.alerts:
            alerts.close()
        if scores is not None:
            scores.close()
    print_summary(stats)
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from stream.app import ensure_topics
    from stream.learn import learn, parse_since

    cfg = _config(args)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        print(f"writeguard learn: --since: {e}", file=sys.stderr)
        return 2
    ensure_topics(cfg)  # the models topic, compacted and partitioned like the changes topic
    try:
        learn(cfg, events=args.events, since_s=since, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except OSError as e:
        print(f"writeguard learn: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from confluent_kafka import Producer

    from connectors.messages import (
        CONTROL_SIGNATURE_HEADER,
        ControlRecord,
        ControlRejected,
        EnforcementResult,
        sign_control,
    )
    from detectors.features import typed_identity
    from stream.enforce import NotRestorable, read_control_state, revocation_to_restore, undo_enforcement

    args.agent = typed_identity(args.agent)  # the worker's name for it: an over-long id in its digest form
    cfg = _config(args)
    by = args.by or f"{getpass.getuser()}@{socket.gethostname()}"

    def rejected(partition: int, offset: int, e: ControlRejected) -> None:
        print(f"writeguard release: ignored the control record at {partition}:{offset}: {e}", file=sys.stderr)

    # Only records that pass verification count: a forged `quarantined` record cannot name what to grant back.
    last = read_control_state(cfg, on_reject=rejected).get(args.agent)
    quarantined = last is not None and last.state == "quarantined"
    if not quarantined:
        print(f"writeguard release: {args.agent!r} has no quarantine in force: nothing to restore", file=sys.stderr)
    undone: list[EnforcementResult] = []
    try:
        rev = revocation_to_restore(cfg, args.agent, last)
    except NotRestorable as e:
        print(f"writeguard release: not restoring anything: {e}", file=sys.stderr)
        undone.append(EnforcementResult(action="postgres", ok=False, detail=f"restore refused: {e}"[:2000]))
        rev = None
    if rev is not None and (result := undo_enforcement(cfg, rev)) is not None:
        if result.ok:
            print(f"restored {result.detail}")
        else:
            print(f"writeguard release: could not restore role {rev.role}: {result.detail}", file=sys.stderr)
        undone.append(result)
    rec = ControlRecord(
        agent_id=args.agent,
        state="released",
        # The quarantine it lifts: a late `quarantined` record of that alert must not put it back, and the
        # workers apply a release only to the quarantine it names.
        alert_id=last.alert_id if last is not None and quarantined else None,
        reason=args.reason,
        by=by,
        enforcement=undone,
        false_positive=args.false_positive,
    )
    key, value = args.agent.encode(), rec.to_bytes()
    headers: dict[str, str | bytes | None] | None = None
    if cfg.control is not None:
        headers = {CONTROL_SIGNATURE_HEADER: sign_control(cfg.control.keys()[0], key, value)}
    # murmur2 is Java's and Faust's partitioner: the record lands where the worker's own records for this agent do.
    producer = Producer({**client_settings(cfg), "partitioner": "murmur2_random", "acks": "all"})
    errors: list[str] = []
    producer.produce(
        cfg.topics.control,
        key=key,
        value=value,
        headers=headers,
        on_delivery=lambda err, msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(30) or errors:
        print(
            f"writeguard release: could not write to {cfg.topics.control}: {errors or 'timed out'}",
            file=sys.stderr,
        )
        return 1
    print(f"released {args.agent!r} on {cfg.topics.control} (by {by}): {args.reason}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "schema":
        print(json.dumps(config_json_schema(), indent=2))
        return 0
    cfg = load_config(args.file)
    print(f"{args.file}: ok ({len(cfg.tables)} tables: {', '.join(t.name for t in cfg.tables)})")
    return 0


def all_schemas() -> dict[str, dict[str, object]]:
    from connectors.corrections import Correction
    from connectors.messages import PUBLISHED
    from connectors.pg_guard import GuardRefusal
    from undo.models import ApplyReport
    from undo.restore import RestoreReport

    out: dict[str, dict[str, object]] = {"config": config_json_schema()}
    for name, model in PUBLISHED.items():
        out[name] = model.model_json_schema()
    # The undo's correction records (topic undo.corrections.topic) and `undo apply --report` files.
    out["undo-correction"] = Correction.model_json_schema()
    out["undo-apply-report"] = ApplyReport.model_json_schema()
    out["restore-report"] = RestoreReport.model_json_schema()  # `writeguard restore --report` files
    # The logical decoding message of a refusal by `writeguard guard-sql`'s triggers (prefix writeguard.refused).
    out["guard-refusal"] = GuardRefusal.model_json_schema()
    return out


def cmd_schemas(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    stale = []
    for name, schema in all_schemas().items():
        path = folder / f"{name}.schema.json"
        text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run `writeguard schemas --write`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def cmd_connector_config(args: argparse.Namespace) -> int:
    print(json.dumps(load_config(args.config).connector_config(), indent=2))
    return 0


def cmd_identity_sql(args: argparse.Namespace) -> int:
    from connectors.pg_identity import IdentitySqlError, render_identity_sql, script

    cfg = load_config(args.config)
    msgs = cfg.worker.agent_messages
    if msgs is None:
        raise ConfigError(f"{args.config}: worker.agent_messages (topic, prefix) is needed: the triggers emit there")
    if msgs.identity != "database":
        # Not an error: rendering first and switching the worker over once the SQL is in is the safe order.
        print(
            "-- note: worker.agent_messages.identity is not 'database': the worker still believes the writers",
            file=sys.stderr,
        )
    pg = cfg.enforcement.postgres
    try:
        statements = render_identity_sql(
            cfg.tables, pg.roles if pg else None, msgs.prefix, schema=args.schema, owner=args.owner
        )
    except IdentitySqlError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    if not args.apply:
        print(script(statements), end="")
        return 0
    if not args.dsn:
        print("writeguard identity-sql: --apply needs --dsn (a superuser: it revokes on pg_catalog)", file=sys.stderr)
        return 2
    import psycopg

    try:
        with psycopg.connect(args.dsn) as conn, conn.transaction():
            for st in statements:
                conn.execute(st)
    except psycopg.Error as e:
        # The server's message only: the DSN (and its password) stays out of it.
        print(
            f"writeguard identity-sql: not applied (nothing changed): {e.diag.message_primary or type(e).__name__}",
            file=sys.stderr,
        )
        return 1
    print(f"applied: {len(cfg.tables)} tables stamped, pg_logical_emit_message revoked from PUBLIC")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="writeguard",
        description="Watch the Debezium change events of tables that AI agents write to; alert on and "
        "quarantine an agent whose writes look wrong.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser, kafka: bool = True) -> None:
        sp.add_argument(
            "--config", "-c", required=True, metavar="FILE", help=f"YAML config (example: {EXAMPLE_CONFIG})"
        )
        if kafka:
            sp.add_argument(
                "--bootstrap-servers",
                metavar="HOST:PORT[,...]",
                help="Kafka bootstrap.servers; overrides kafka.bootstrap.servers in the config",
            )

    w = sub.add_parser(
        "worker",
        help="run a detection worker (Faust) until SIGTERM",
        description="Consume the CDC topics in the config, score every change per agent, "
        "publish alerts and control records, and serve Prometheus metrics.",
    )
    with_config(w)
    w.add_argument("--metrics-port", type=int, help="override worker.metrics.port (0 = any free port)")
    w.add_argument("--datadir", help="Faust data folder (default: ./<group.id>-data)")
    w.add_argument("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])
    w.set_defaults(func=cmd_worker)

    r = sub.add_parser(
        "replay",
        help="run detection over a file of Debezium message values, without Kafka",
        description="Backtest: read EVENTS (one Debezium message value per line, JSON, in "
        "commit order), run the worker's detectors, write alerts as JSON lines.",
    )
    r.add_argument("events", metavar="EVENTS.jsonl")
    with_config(r, kafka=False)
    r.add_argument("--alerts", metavar="OUT", help="alerts as JSON lines (default: standard output)")
    r.add_argument(
        "--scores",
        metavar="OUT",
        help="one JSON line per scored event and detector: line, table, agent_id, op, detector, score",
    )
    r.set_defaults(func=cmd_replay)

    lrn = sub.add_parser(
        "learn",
        help="learn the agents' models from history (no alerts) and write them to the models topic",
        description="Warm start: run the worker's detectors learn-only over past changes, from a JSONL file of "
        "Debezium message values or from the CDC topics by time, and write every (table, agent) model set to "
        "topics.models, where workers restore them. Run it before the first workers start.",
    )
    src = lrn.add_mutually_exclusive_group(required=True)
    src.add_argument("--events", metavar="FILE.jsonl", help="one Debezium message value per line, in commit order")
    src.add_argument("--since", metavar="AGE", help="read the CDC topics from this long ago to now: 7d, 12h, 30m")
    with_config(lrn)
    lrn.set_defaults(func=cmd_learn)

    rel = sub.add_parser("release", help="release a quarantined agent (writes to the control topic)")
    rel.add_argument("agent", metavar="AGENT_ID")
    rel.add_argument("--reason", required=True, help="why it is safe to let the agent write again")
    rel.add_argument("--by", help="who releases it (default: user@host)")
    rel.add_argument(
        "--false-positive",
        action="store_true",
        help="the alert was wrong: the agent's models learn the writes that triggered it as normal",
    )
    with_config(rel)
    rel.set_defaults(func=cmd_release)

    c = sub.add_parser("config", help="print the config JSON Schema, or check a config file")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    csub.add_parser("schema", help="print the config's JSON Schema")
    chk = csub.add_parser("check", help="validate a config file; exit 2 with the bad keys' paths")
    chk.add_argument("file", metavar="FILE")
    c.set_defaults(func=cmd_config)

    s = sub.add_parser("schemas", help="write (or --check) the JSON Schemas of the config and every message")
    s.add_argument("--dir", default="schemas", help="folder (default: schemas)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the files (the default)")
    mode.add_argument("--check", action="store_true", help="exit 1 if a file differs from the models")
    s.set_defaults(func=cmd_schemas)

    cc = sub.add_parser(
        "connector-config",
        help="print the Debezium PostgreSQL connector JSON for the config's tables (PUT it to Kafka Connect)",
        description="Render {name, config} for Kafka Connect's REST API from the 'debezium:' section: topic prefix, "
        "table include list, slot and publication, snapshot mode, JSON converters, and message.key.columns "
        "when debezium.key_by_agent is set. Example: writeguard connector-config -c C | jq .config | "
        "curl -X PUT -H 'Content-Type: application/json' --data @- http://connect:8083/connectors/NAME/config",
    )
    with_config(cc, kafka=False)
    cc.set_defaults(func=cmd_connector_config)
    ids = sub.add_parser(
        "identity-sql",
        help="print (or --apply) the SQL that makes PostgreSQL stamp the agent identity of every write",
        description="Render the functions and triggers that make the database name the acting role's agent on every "
        "write (INSERT, UPDATE, DELETE, TRUNCATE), through the same roles mapping as enforcement, and revoke "
        "pg_logical_emit_message from PUBLIC and the agents. Then set worker.agent_messages.identity: database.",
    )
    with_config(ids, kafka=False)
    ids.add_argument("--apply", action="store_true", help="run it in one transaction instead of printing it")
    ids.add_argument("--dsn", help="libpq connection string of a superuser (with --apply)")
    ids.add_argument("--schema", default="writeguard", help="schema of the functions (default: writeguard)")
    ids.add_argument(
        "--owner", default="writeguard_identity", help="NOLOGIN role that owns them (default: writeguard_identity)"
    )
    ids.set_defaults(func=cmd_identity_sql)

    add_undo_commands(sub, with_config)
    add_guard_commands(sub, with_config)
    add_restore_commands(sub, with_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"writeguard: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
