"""What the benchmarks share: progress lines, percentiles, the worker's Prometheus figures, the work folder.

The benchmarks run as scripts (``python benchmarks/bench_pipeline.py``) from a checkout; each puts the
checkout first on ``sys.path`` and then imports this module as ``benchmarks.common``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_LE = re.compile(r'le="([^"]+)"')


class Log:
    """Progress on stderr, each line stamped with the seconds since the benchmark started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


log = Log()


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty.

    >>> percentile([4.0, 1.0, 3.0, 2.0], 0.5), percentile([1.0, 2.0], 0.99), percentile([], 0.5)
    (2.5, 1.99, nan)
    """
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts (upper bound -> count).

    >>> histogram_quantile({0.1: 50.0, 0.2: 100.0, math.inf: 100.0}, 0.25)
    0.05
    """
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return float("nan")
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in sorted(buckets):
        count = buckets[b]
        if count >= rank:
            if b == math.inf:
                return prev_bound  # beyond the last finite bucket: report its bound, as Prometheus does
            if count == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = b, count
    return prev_bound


def metric_total(metrics: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets, in :meth:`testbed.process.WorkerProcess.metrics`' form."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def hist_buckets(metrics: dict[str, float], name: str) -> dict[float, float]:
    """Cumulative buckets of a histogram, summed over its other labels, from WorkerProcess.metrics()."""
    out: dict[float, float] = {}
    for key, v in metrics.items():
        if key.startswith(f"{name}_bucket{{"):
            m = _LE.search(key)
            if m:
                le = float(m.group(1))
                out[le] = out.get(le, 0.0) + v
    return out


def iso_us(text: str) -> int:
    """An ISO-8601 timestamp (as pydantic writes it, 'Z' or offset) -> microseconds since the epoch, exactly.

    >>> iso_us("1970-01-01T00:00:01.000002Z")
    1000002
    """
    return (datetime.fromisoformat(text) - _EPOCH) // _US


def machine_lines(load0: tuple[float, float, float], wall0: float) -> list[str]:
    """The table's closing lines: how busy the machine was, and how long the benchmark took."""
    load1 = os.getloadavg()
    return [
        f"  load average at start {load0[0]:.2f}, at end {load1[0]:.2f} "
        "(other processes on this machine compete for the same cores)",
        f"  total wall time {time.monotonic() - wall0:.0f} s",
    ]


def remove_work_folder(workdir: Path, *, keep: bool) -> None:
    """Remove the benchmark's temporary folder, unless ``--keep`` asked to look at its logs and configs."""
    if keep:
        log(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
