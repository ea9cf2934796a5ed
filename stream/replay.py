"""``writeguard replay``: the worker's detection code over a file of Debezium message values, no Kafka.

Users backtest thresholds on history with it: the alerts it writes are the ones the worker would have
published for the same events in the same order. Alert ids derive from the event's coordinates, which here
are the file and line (:class:`~detectors.engine.FileCoords`, ``path:line``) rather than the Kafka topic,
partition and offset, so they differ from the worker's.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import msgspec

from detectors.engine import Change, Engine, FileCoords
from stream.config import Config, make_engine
from stream.pipeline import SKIP_PENDING, Intake, build_alert, router_for

_enc = msgspec.json.Encoder()
READ_BUFFER = 1 << 20  # bytes read at a time from an events file


class _Score(msgspec.Struct):
    line: int
    table: str
    agent_id: str
    op: str
    detector: str
    score: float


@dataclass
class ReplayStats:
    lines: int = 0
    changes: int = 0
    alerts: int = 0
    quarantined: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    dead_letter_lines: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time over the same span: what the events cost on one core

    @property
    def events_per_second(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else 0.0

    @property
    def events_per_cpu_second(self) -> float:
        return self.lines / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


def replay(
    path: str | Path,
    cfg: Config,
    *,
    alerts_out: IO[bytes] | None = None,
    scores_out: IO[bytes] | None = None,
    progress: Callable[[str], None] | None = None,
    engine: Engine | None = None,
) -> ReplayStats:
    engine = engine or make_engine(cfg)
    router = router_for(cfg)
    stats = ReplayStats()
    scores: list[tuple[str, float]] | None = [] if scores_out is not None else None
    name = str(path)

    lineno = 0
    last_ts = [0]

    def change(ch: Change) -> None:
        last_ts[0] = ch.commit_ts_us
        stats.changes += 1
        findings = engine.process(ch, scores)
        if scores is not None and scores_out is not None:
            assert isinstance(ch.coords, FileCoords)  # replay reads files only
            line = ch.coords.line
            for det, s in scores:
                scores_out.write(_enc.encode(_Score(line, ch.table, ch.agent_id, ch.op, det, s)) + b"\n")
            scores.clear()
        for f in findings:
            stats.alerts += 1
            if f.quarantine:
                stats.quarantined.append(f.agent_id)
            if alerts_out is not None:
                alerts_out.write(build_alert(f, time.time_ns() // 1000).to_bytes() + b"\n")

    def skipped(reason: str) -> None:
        stats.skipped[reason] += 1

    def dead(reason: str, detail: str) -> None:
        stats.dead_letters[reason] += 1
        lines = stats.dead_letter_lines.setdefault(reason, [])
        if len(lines) < 5:
            lines.append(lineno)

    intake = Intake(router, change, skipped, dead)

    started = last = time.perf_counter()
    cpu_started = time.process_time()
    # A large buffer: with the default 8 KiB, reading the lines costs a system call every dozen events.
    with open(path, "rb", buffering=READ_BUFFER) as fh:
        for lineno, raw in enumerate(fh, 1):
            stats.lines = lineno
            value = raw.strip()
            if not value:
                continue
            changed = intake.feed(None, None if value == b"null" else value, FileCoords(name, lineno))
            # Commit time is replay's clock: rows whose message never came are released as unattributed.
            intake.release(last_ts[0] if changed else None)
            if progress is not None and lineno & 0xFFF == 0:
                now = time.perf_counter()
                if now - last >= 2.0:
                    last = now
                    progress(
                        f"replay: {lineno:,} lines, {stats.alerts} alerts, {lineno / (now - started):,.0f} events/s"
                    )
    intake.release(2**62)
    stats.skipped.pop(SKIP_PENDING, None)  # every held row ended up scored or unattributed
    stats.skipped = +stats.skipped
    stats.seconds = time.perf_counter() - started
    stats.cpu_seconds = time.process_time() - cpu_started
    return stats


def print_summary(stats: ReplayStats, out: IO[str] = sys.stderr) -> None:
    print(
        f"replay: {stats.lines:,} lines, {stats.changes:,} changes scored, {stats.alerts} alerts, "
        f"{len(stats.quarantined)} agents quarantined, {stats.seconds:.2f} s "
        f"({stats.events_per_second:,.0f} events/s)",
        file=out,
    )
    if stats.skipped:
        print("  skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())), file=out)
    if stats.dead_letters:
        print(
            "  undecodable (would go to the dead-letter topic): "
            + ", ".join(
                f"{k}={v} (lines {', '.join(map(str, stats.dead_letter_lines.get(k, [])))}{', ...' if v > 5 else ''})"
                for k, v in sorted(stats.dead_letters.items())
            ),
            file=out,
        )
