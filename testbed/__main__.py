"""``python -m testbed``: the demos and a local Kafka broker. Each subcommand's ``--help`` says what it needs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    if args.postgres:
        from testbed.demo_postgres import run_postgres_demo

        return run_postgres_demo(warmup_s=args.warmup, n_agents=args.agents)
    from testbed.demo import run_demo

    return run_demo(bootstrap_servers=args.bootstrap_servers, warmup_s=args.warmup, agents=args.agents)


def cmd_broker(args: argparse.Namespace) -> int:
    from testbed.broker import run_broker

    return run_broker(args.workdir, heap=args.heap, timeout=args.timeout)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m testbed",
        description="Try writeguard on this machine: a demo with a simulated fleet of agents, or a local Kafka.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="local Kafka + worker + a simulated agent fleet with one rogue agent",
        description="Starts a local Kafka broker (Maven Central jars; needs Java 17 and Maven) "
        "unless --bootstrap-servers is given, a writeguard worker, and a fleet of agents; one "
        "agent goes rogue and is alerted on and quarantined. Ends by itself.",
    )
    d.add_argument("--bootstrap-servers", metavar="HOST:PORT", help="use this Kafka instead of a local one")
    d.add_argument(
        "--postgres",
        action="store_true",
        help="the real path: agents write to a local PostgreSQL as their own roles, Debezium on Kafka Connect "
        "streams their commits, and the rogue agent's role loses its write privileges",
    )
    d.add_argument("--agents", type=int, default=12, help="simulated agents (default 12)")
    d.add_argument("--warmup", type=float, default=20.0, help="seconds of normal traffic before the rogue (20)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser(
        "broker",
        help="start a local single-node Kafka (KRaft) and wait; Ctrl-C stops it",
        description="Start a real single-node Apache Kafka broker (KRaft) on 127.0.0.1, print "
        "'bootstrap.servers=HOST:PORT' and run until Ctrl-C or SIGTERM. Kafka jars are resolved from Maven "
        f"Central on first use (cached in $WRITEGUARD_CACHE, default {Path('~/.cache/writeguard')}); needs "
        "Java 17+ and Maven.",
    )
    b.add_argument(
        "--workdir",
        type=Path,
        help="folder for server.properties, broker.log and data/ (data/ is wiped on start; default: a "
        "temporary folder, removed on exit)",
    )
    b.add_argument("--heap", default="512m", help="JVM max heap (default: %(default)s)")
    b.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the broker to be ready (default: %(default)s)"
    )
    b.set_defaults(func=cmd_broker)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
