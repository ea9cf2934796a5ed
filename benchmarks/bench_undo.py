"""How fast ``writeguard scope`` reads the CDC history, from Kafka and from a file, and what it holds in memory.

Usage: ``python3 benchmarks/bench_undo.py [--events N] [--bootstrap-servers HOST:PORT]`` (``--help`` for all
options). Without ``--bootstrap-servers`` a throw-away single-node Kafka is started from the Maven Central jars
(:class:`testbed.broker.LocalKafka`; needs Java 17 and Maven).

What it does:

1. N Debezium-shaped change events (default 1,000,000; payload-only JSON of ~0.6 KB, as
   :mod:`testbed.fleet` writes them) from many agents over two tables, spread over a day of commit time; some
   of one refunds agent's rows are updated later by a human (no agent): conflicts. They are produced to the two
   CDC topics (3 partitions each, record timestamps = commit times) and written to a JSONL file of
   ``{"key", "value"}`` lines, as a Kafka dump keeps them.
2. ``writeguard scope --agent A --since <1 h before A's last write>`` as its own process, from Kafka and from
   the file: records read and the share of the topics that is, events/s of the scan, the process's wall time
   and peak RSS (the RSS of a scope over a one-line file, the interpreter and its libraries, is shown apart).
3. The same agent's whole history (no ``--since``): every record read, for the events/s of a long scan.

Progress goes to stderr, the table of figures to stdout. Figures only, no assertions: they belong to the machine
(and the neighbours) they ran on. With the defaults it takes a minute or two on 2 cores (--events N for less).
"""

from __future__ import annotations

import argparse
import heapq
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml
from confluent_kafka import Producer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from benchmarks.bench_pipeline import create_topics  # noqa: E402
from benchmarks.common import log, machine_lines, remove_work_folder  # noqa: E402
from testbed.fleet import REFUNDS, Fleet, Record, debezium_value, topic_of  # noqa: E402
from testbed.process import interrupt_on_sigterm  # noqa: E402
from testbed.stack import example_config  # noqa: E402

if TYPE_CHECKING:
    from testbed.broker import LocalKafka

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000


@dataclass
class Written:
    events: int
    bytes: int
    first_us: int
    last_us: int
    agent: str
    human: int  # human updates of the agent's rows
    agent_last_us: int = 0  # the agent's last write


def history(n: int, agents: int, seed: int, prefix: str, agent_index: int) -> tuple[Iterator[Record], Fleet]:
    """``n`` fleet writes over a day, and, for one in ten of one refunds agent's rows, a human's update 1 to 120
    minutes later, in commit order."""
    fleet = Fleet(n_agents=agents, seed=seed, prefix=prefix)
    # A day ending a few hours ago: the broker refuses record timestamps more than an hour ahead of its clock
    # (log.message.timestamp.after.max.ms), and its retention (7 days) would delete an older day meanwhile.
    start_us = time.time_ns() // 1000 - DAY_US - 4 * HOUR_US
    speedup = n / (DAY_US / 1e6) / sum(a.rate_per_s for a in fleet.agents)
    target = fleet.agents[agent_index]

    def merged() -> Iterator[Record]:
        pending: list[tuple[int, int, Record]] = []
        seq = 0
        for rec in fleet.stream(n, start_us, speedup=speedup):
            while pending and pending[0][0] <= rec.commit_ts_us:
                yield heapq.heappop(pending)[2]
            yield rec
            if rec.agent_id == target.agent_id and rec.op == "c" and fleet.rng.random() < 0.1:
                after = orjson.loads(rec.value)["after"]
                later = rec.commit_ts_us + fleet.rng.randint(60, 7_200) * 1_000_000
                human = {**after, "reason": "other", "agent_id": None, "run_id": None, "agent_version": None}
                seq += 1
                value = debezium_value(REFUNDS, "u", after, human, later, prefix=prefix, tx_id=90_000_000 + seq)
                heapq.heappush(pending, (later, seq, Record(rec.topic, rec.key, value, "", later, False, "u")))
        while pending:
            yield heapq.heappop(pending)[2]

    return merged(), fleet


def produce_and_write(bootstrap: str, records: Iterator[Record], path: Path, agent: str) -> Written:
    """Every record to its topic (timestamp = commit time) and to the file; returns what was written."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 500_000,
            "acks": "all",
            "compression.type": "lz4",
        }
    )
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    w = Written(0, 0, 0, 0, agent, 0)
    with path.open("wb") as fh:
        for rec in records:
            line = b'{"key":' + rec.key + b',"value":' + rec.value + b"}\n"
            fh.write(line)
            w.bytes += len(rec.value)
            w.human += rec.agent_id == ""
            if rec.agent_id == agent:
                w.agent_last_us = rec.commit_ts_us
            w.first_us = w.first_us or rec.commit_ts_us
            w.last_us = rec.commit_ts_us
            while True:
                try:
                    producer.produce(
                        rec.topic,
                        key=rec.key,
                        value=rec.value,
                        timestamp=rec.commit_ts_us // 1000,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            w.events += 1
            if w.events & 1023 == 0:
                producer.poll(0)
                if w.events % 200_000 == 0:
                    log(f"  {w.events:,} events produced and written")
    left = producer.flush(120)
    if left or errors:
        raise RuntimeError(f"producing failed: {left} undelivered, errors {errors[:3]}")
    return w


@dataclass
class Run:
    label: str
    records: int  # read from Kafka, or lines read from the file
    decoded: int  # row changes that reached the scope
    scan_s: float
    rate: float
    wall_s: float
    cpu_s: float
    rss_kib: int
    share: str
    summary: str


_KAFKA = re.compile(
    r"scope: ([\d,]+) records read of ([\d,]+) in .*\(([\d.]+%)\).*; ([\d,]+) row changes, "
    r"([\d.]+) s \(([\d,]+) events/s\)"
)
_FILE = re.compile(
    r"scope: ([\d,]+) lines, ([\d,]+) row changes(?: \(([\d,]+) lines before --since skipped\))?, "
    r"([\d.]+) s \(([\d,]+) events/s\)"
)
_SELECTED = re.compile(r"^[\d,]+ of [\d,]+ events selected, .*$", re.M)


def _int(text: str | None) -> int:
    return int((text or "0").replace(",", ""))


def run_scope(label: str, argv: list[str], workdir: Path) -> Run:
    """One ``writeguard scope`` process: its own figures from stderr, wall time, CPU time and peak RSS."""
    err_path = workdir / f"scope-{uuid.uuid4().hex[:6]}.err"
    started = time.perf_counter()
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "scope", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=err
        )
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    text = err_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"scope {label} exited with {proc.returncode}:\n{text[-2000:]}\n{out[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    sel = _SELECTED.search(out)
    summary = sel.group(0) if sel else out.strip().splitlines()[-1]
    if (m := _KAFKA.search(text)) is not None:
        run = Run(
            label,
            _int(m.group(1)),
            _int(m.group(4)),
            float(m.group(5)),
            _int(m.group(6)),
            wall,
            cpu,
            usage.ru_maxrss,
            f"{m.group(3)} of the topics' {m.group(2)} records",
            summary,
        )
    elif (m := _FILE.search(text)) is not None:
        lines, skipped = _int(m.group(1)), _int(m.group(3))
        share = f"{(lines - skipped) / max(lines, 1):.1%} of the lines decoded ({skipped:,} skipped by commit time)"
        run = Run(
            label,
            lines,
            _int(m.group(2)),
            float(m.group(4)),
            _int(m.group(5)),
            wall,
            cpu,
            usage.ru_maxrss,
            share,
            summary,
        )
    else:
        raise RuntimeError(f"scope {label}: no summary line in its stderr:\n{text[-2000:]}")
    log(
        f"{label}: {run.records:,} read, {run.rate:,.0f} events/s, wall {wall:.1f} s, "
        f"RSS {run.rss_kib / 1024:.0f} MiB; {summary}"
    )
    return run


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark `writeguard scope` over a day of CDC history on a real Kafka and as a JSONL file: "
        "one agent's last hour (events read, events/s, share of the topics read, wall time, peak RSS) and its "
        "whole history. Progress on stderr, the figures on stdout."
    )
    p.add_argument("--events", type=int, default=1_000_000, help="change events over the day (1,000,000)")
    p.add_argument("--agents", type=int, default=200, help="simulated agents (200)")
    p.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        help="use this Kafka instead of starting a local one (topics get unique names)",
    )
    p.add_argument(
        "--whole",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also scope the agent's whole history, every record read (default: yes)",
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--keep", action="store_true", help="keep the work folder (config, events file, stderr)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    interrupt_on_sigterm()
    wall0 = time.monotonic()
    load0 = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="writeguard-bench-undo-"))
    broker: LocalKafka | None = None
    prefix = f"bu{uuid.uuid4().hex[:8]}"
    try:
        if args.bootstrap_servers:
            bootstrap, where = args.bootstrap_servers, f"Kafka at {args.bootstrap_servers}"
        else:
            from testbed.broker import LocalKafka, kafka_version

            log("starting a local Kafka broker ...")
            broker = LocalKafka(workdir / "kafka", progress=log).start()
            bootstrap, where = broker.bootstrap_servers, f"Kafka {kafka_version()} local"
        cfg = example_config(bootstrap, prefix)
        cfg_path = workdir / "writeguard.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        topics = [t["topic"] for t in cfg["tables"]]
        create_topics(bootstrap, dict.fromkeys(topics, 3))
        records, fleet = history(args.events, args.agents, args.seed, prefix, agent_index=2)
        agent = fleet.agents[2].agent_id
        assert topic_of(REFUNDS, prefix) in topics
        events_file = workdir / "events.jsonl"
        log(f"generating, producing and writing {args.events:,} events of {args.agents} agents over a day ...")
        t = time.perf_counter()
        w = produce_and_write(bootstrap, records, events_file, agent)
        log(
            f"{w.events:,} events ({w.bytes / w.events:,.0f} bytes each, {w.human} human updates) in "
            f"{time.perf_counter() - t:.0f} s"
        )
        since = iso(w.agent_last_us - HOUR_US)
        one = workdir / "one.jsonl"
        with events_file.open("rb") as fh:
            one.write_bytes(fh.readline())
        base = ["-c", str(cfg_path), "--agent", agent]
        runs = [run_scope("baseline: scope of a one-line file", [*base, "--events", str(one)], workdir)]
        runs.append(run_scope("Kafka, last hour", [*base, "--since", since], workdir))
        runs.append(run_scope("file, last hour", [*base, "--since", since, "--events", str(events_file)], workdir))
        if args.whole:
            runs.append(run_scope("Kafka, whole day", base, workdir))
            runs.append(run_scope("file, whole day", [*base, "--events", str(events_file)], workdir))

        print(
            f"writeguard scope benchmark ({w.events:,} events over {(w.last_us - w.first_us) / HOUR_US:.1f} h of "
            f"commit time, {args.agents} agents, 2 tables x 3 partitions, {w.bytes / w.events:,.0f} bytes/event, "
            f"{where}, {os.cpu_count()} cores)"
        )
        print(
            f"selection: --agent {agent} --since {since} (its last hour; the read goes on to the end), "
            f"{w.human} human updates of its rows"
        )
        base_rss = runs[0].rss_kib
        for r in runs[1:]:
            print(
                f"  {r.label:<17}: {r.records:>9,} read, {r.decoded:>9,} row changes decoded, "
                f"{r.rate:>8,.0f} events/s (scan {r.scan_s:.2f} s), wall {r.wall_s:5.1f} s "
                f"(CPU {r.cpu_s:.1f} s), peak RSS {r.rss_kib / 1024:,.0f} MiB "
                f"(+{(r.rss_kib - base_rss) / 1024:,.0f} over the baseline)"
            )
            print(f"  {'':<17}  {r.share}; {r.summary}")
        print(
            f"  baseline RSS (interpreter and libraries, a one-line file): {base_rss / 1024:,.0f} MiB, "
            f"wall {runs[0].wall_s:.1f} s"
        )
        for line in machine_lines(load0, wall0):
            print(line)
        return 0
    finally:
        if broker is not None:
            broker.stop()
        remove_work_folder(workdir, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
