"""Labelled scenario benchmark: a synthetic fleet with injected incidents, run through ``writeguard replay``.

Usage::

    python3 benchmarks/scenarios.py generate --out DIR [--seed N] [--events N] [--agents N] [--days D]
    python3 benchmarks/scenarios.py run [--data DIR | --out DIR] [--seed N] ...      # what `make quality` runs

``generate`` writes ``DIR/events.jsonl`` (one Debezium message value per line, payload-only JSON as
:mod:`testbed.fleet` emits it, in commit order), ``DIR/labels.jsonl`` (one line per input line: ``line``,
``scenario`` (a scenario name or ``normal``), ``incident`` (its id or null), ``anomalous``, and the line's
``agent_id``, ``table``, ``op`` and commit time ``ts_us``), ``DIR/incidents.json`` (what was injected
where) and ``DIR/writeguard.yaml`` (the config the run uses; ``benchmarks/scenarios.yaml`` by default).

``run`` generates that (or reads it with ``--data``), then:

1. runs :func:`stream.replay.replay` over the whole file in this process (events/s from it);
2. runs the same detection once more through the command line, ``python -m stream.cli replay SUBSET
   --config C --alerts OUT --scores OUT``, over every event of one scenario's incident agents
   (``--cli-scenario``), and checks its alerts against the in-process ones;
3. feeds a fresh engine the first 100,000 events (``--memory-events``) under ``tracemalloc``: bytes held
   per (table, agent) model set, mostly normal traffic (``--memory-events 0`` takes the whole file, twice
   as long, and also counts the triggers that alerted agents' open incidents keep, up to 64 each);
4. scores the alerts against the labels and prints one row per scenario and an overall row (stdout;
   progress on stderr). No assertions: the figures are the output;
5. with ``--more-seeds 8,9`` (``make quality``), generates, replays and scores those seeds' fleets too, and
   prints the per-scenario table over all the seeds (counts added up, delays pooled) with each seed's
   detections, and issue 14's targets with where a seed misses (incidents missed, gross ones caught after more
   than 5 anomalous writes, false alarms by detector).

The fleet: three tables (``public.refunds`` inserts; ``public.orders`` inserts, status updates,
cancellations; ``public.tickets`` opened, resolved, a few deleted), ``--agents`` agents (40% refunds,
35% orders, 25% tickets) over ``--days`` simulated days, about ``--events`` normal events in all.

- Daily seasonality: each agent writes as a Poisson process whose rate follows a day curve (x0.3 at
  02:00 UTC, x1.7 at 14:00), in 5-minute slices; per-agent volumes are lognormal (sigma 0.8).
- Heavy-tailed amounts: a lognormal per agent (refund amount, an order's unit price times a geometric
  item count, a ticket's goodwill credit); the agents' medians spread by a lognormal (sigma 0.4); per-write
  sigma 0.25-0.45, and 0.8-1.1 for the 10% of "wide" agents.
- Categorical columns: each agent has its own mix of refund reasons (Dirichlet) and ticket categories, a
  home currency (EUR/USD/GBP) it leaves for 3% of its refunds, and unique idempotency keys.

Benign scenarios, labelled ``anomalous: false`` (an alert there is a false alarm):

- ``benign_burst``: an agent doubles its rate for an hour, with normal values (``agents/25`` of them);
- ``new_agent``: an agent appears mid-run with normal values (``agents/20``); its first day is labelled;
- ``traffic_spike``: the whole fleet writes x3 for an hour (day 2, 10:00-11:00 UTC);
- ``nightly_batch``: an orders agent (``agents/40``, at least 2) that besides its daytime writes runs a batch
  every night from the first on, at its own time between 01:00 and 03:00 UTC (+/- 5 minutes): 150-300 updates
  of paid orders to shipped within 20 minutes, its first write of the night a burst of updates.

Incidents, ``--per-kind`` of each (3), each in its own agent, from day 1 on (after every agent's warm-up).
An incident agent writes nothing after its incident (in production the quarantine stops it), except a
``short_burst`` agent, whose alert is a warning:

- ``amount_inflation`` (gross): an established agent's next 30-60 writes are inserts of x20 amounts;
- ``mass_delete`` (gross): 50-200 deletes of the agent's rows within one minute;
- ``retry_duplicates`` (gross): over its next 60-150 refunds, 15-30% of an agent's writes re-insert one
  of its refunds 10-240 s later (same idempotency_key, order, amount; a new id). The duplicates are the
  anomalous events; the originals around them are labelled with the incident but not anomalous;
- ``first_day_rogue`` (gross): a brand-new agent whose first 20-40 writes are x20 what its profile says;
- ``multiplied_update`` (gross): an orders agent updates 10-20 of its orders, multiplying their total by 10
  (an ordinary update ships an order, a fifth of them with a 2-15% discount);
- ``slow_drift`` (subtle): for 24 hours the agent's amounts rise 1-3% per hour (compounded); every insert
  in that day is anomalous (so the delay counts from the drift's first, still tiny, step);
- ``sustained_shift`` (subtle): a "wide" agent (per-write sigma 0.8-1.1) whose next 40-60 writes are x20: about
  +3 of its own standard deviations each, so no single write stands out, but 50 in a row are unmistakable;
- ``delete_habit`` (subtle): an orders or tickets agent that has always cancelled by soft delete (an update
  setting ``deleted_at``, never a delete) begins to hard-delete 2-4 rows an hour, 6-12 in all, among its
  ordinary writes; its hard deletes are the anomalous events;
- ``short_burst`` (subtle): a low-rate agent (the quietest third of its table's) writes x20 its usual for that
  hour (inserts of its ordinary values on top of its own writes) for 10 minutes (day 1 on, 06:00-21:00 UTC, away
  from the fleet's spike); its usual there is 0.7 to 2 writes in 10 minutes (seeds 7, 8, 9), so the burst adds 13
  to 37 inserts, a few a minute: too few for a rate ceiling, and hidden in an hourly baseline that absorbs the
  daily cycle. Every write in the 10 minutes is anomalous; after them the agent goes on as before. Subtle: 5
  writes in a few minutes are within such an agent's ordinary noise (``rhythm`` alerts within the burst, after
  9 to 21 of its writes);
- ``new_category`` (subtle): 10-30 inserts with a value the table never saw (``reason: goodwill`` or
  ``currency: USDT`` on refunds, ``category: vip_override`` on tickets), normal amounts.

A regime change (issue 14, point 5), ``--per-kind`` established agents (one per table in turn, ordinary sigma,
among the busiest third):

- ``benign_shift``: between day 1 and day 1.5 the agent's level steps up by 0.6-0.8 of its own per-write sigma
  (x1.2-x1.4 of its amounts: a price rise) and stays. No single write stands out and no gross detector should
  fire; a slow one should tell (``info``): its first 200 inserts at the new level are labelled anomalous (the
  change to report), every other write of the agent is normal, so a quarantine, or an alert after the change
  was reported and re-baselined, is a false alarm. The run prints which alerts the step got, the regime alerts,
  and the agents quarantined before their rogue spell (target 0);
- ``rogue_after_shift`` (gross): 400 writes into its new level, 20-30 inserts of x20 its new level: the agent
  must still be judged after the shift.

Value incidents (inflation, drift) go to agents with an ordinary sigma: a x20 write is within the normal
spread of a "wide" agent, so it would not be a gross incident there.

Scoring. An alert is a true positive when one of its ``triggering_events`` (``source`` = ``path:line``) is
a line labelled anomalous for the alert's agent, and it belongs to that line's incident; otherwise it is a
false alarm, counted in the scenario of its last triggering line. Per scenario:

- recall: incidents detected (by at least one true-positive alert) / incidents;
- time to detect (of the first detecting alert): the incident's anomalous events up to and including the
  alert's last triggering line, and the commit-time seconds (and hours) from the incident's first anomalous
  event to that line;
- precision: true-positive alerts / alerts in the scenario;
- false alarms per 10,000 normal events: false alarms / (the scenario's events labelled not anomalous /
  10,000). The overall row divides all false alarms by all normal events;
- precision after merging repeats (over seeds): detected incidents / (detected incidents + false alarms), so
  that several alerts on one incident count once.

The default run (300,000 events) takes about a minute on 2 cores; ``make quality`` (three seeds, and the start
mid-stream of each) 5 to 6 minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import heapq
import io
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from benchmarks.common import log  # noqa: E402
from detectors.engine import Engine  # noqa: E402
from stream.config import Config, load_config  # noqa: E402
from stream.replay import replay  # noqa: E402
from testbed.fleet import Envelopes  # noqa: E402

DEFAULT_CONFIG = ROOT / "benchmarks" / "scenarios.yaml"
REFUNDS, ORDERS, TICKETS = "public.refunds", "public.orders", "public.tickets"
TABLES = (REFUNDS, ORDERS, TICKETS)
START_US = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp()) * 1_000_000  # a Monday, 00:00 UTC
DAY_S = 86_400.0
HOUR_S = 3_600.0
SLICE_S = 300.0  # the rate is constant within a slice of commit time
SHORT_BURST_S, SHORT_BURST_X = 600.0, 20.0  # short_burst: 10 minutes at x20 the agent's usual for the hour

GROSS = ("amount_inflation", "mass_delete", "retry_duplicates", "first_day_rogue", "multiplied_update")
SUBTLE = ("slow_drift", "new_category", "sustained_shift", "delete_habit", "short_burst")
INCIDENT_KINDS = GROSS + SUBTLE
BENIGN = ("traffic_spike", "benign_burst", "new_agent", "nightly_batch")
# Regime changes (issue 14, point 5), planned by Generator._plan_shifts: a lasting legitimate step of an agent's
# level, and a rogue spell of the same agent after it (gross: it must still be judged, against its new level).
SHIFT, SHIFT_ROGUE = "benign_shift", "rogue_after_shift"
SHIFTS = (SHIFT, SHIFT_ROGUE)
GROSS_CHECKED = (*GROSS, SHIFT_ROGUE)  # the kinds that must be caught within 5 anomalous writes
NORMAL = "normal"
SCENARIOS = INCIDENT_KINDS + SHIFTS + BENIGN + (NORMAL,)

CURRENCIES = ("EUR", "USD", "GBP")
REASONS = ("damaged", "late", "wrong_item", "not_received", "other")
CATEGORIES = ("billing", "shipping", "product", "account", "other")
# (table, column, a value the table never sees otherwise), in the order new_category incidents use them
NEW_VALUES = ((REFUNDS, "reason", "goodwill"), (TICKETS, "category", "vip_override"), (REFUNDS, "currency", "USDT"))
TABLE_MEDIAN = {REFUNDS: 45.0, ORDERS: 30.0, TICKETS: 12.0}  # refund amount, order unit price, ticket credit
KIND_NAME = {REFUNDS: "refund", ORDERS: "order", TICKETS: "ticket"}


# -- labels ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Label:
    """What one input line is: its scenario (or ``normal``), incident, and whether it is anomalous."""

    line: int
    scenario: str
    incident: str | None
    anomalous: bool
    agent_id: str
    table: str
    op: str
    ts_us: int

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "line": self.line,
                "scenario": self.scenario,
                "incident": self.incident,
                "anomalous": self.anomalous,
                "agent_id": self.agent_id,
                "table": self.table,
                "op": self.op,
                "ts_us": self.ts_us,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Label:
        d = orjson.loads(raw)
        return cls(
            int(d["line"]),
            str(d["scenario"]),
            None if d["incident"] is None else str(d["incident"]),
            bool(d["anomalous"]),
            str(d["agent_id"]),
            str(d["table"]),
            str(d["op"]),
            int(d["ts_us"]),
        )


def read_labels(path: Path) -> list[Label]:
    with path.open("rb") as fh:
        return [Label.from_json(raw) for raw in fh if raw.strip()]


# -- the generator ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    seed: int = 7
    events: int = 300_000  # normal events, approximately
    agents: int = 200  # established agents; new and first-day rogue agents come on top
    days: float = 4.0
    per_kind: int = 3  # incidents of each kind
    new_agents: int | None = None  # default agents // 20
    bursts: int | None = None  # default agents // 25
    spike_factor: float = 3.0
    start_us: int = START_US

    def check(self) -> None:
        if self.days < 3:
            raise ValueError("--days must be at least 3 (a warm-up day, a day of drift, and room after)")
        if self.agents < 12:
            raise ValueError("--agents must be at least 12")
        if self.events < 1000:
            raise ValueError("--events must be at least 1,000")
        if self.per_kind < 0:
            raise ValueError("--per-kind must be >= 0")


def day_factor(t_s: float) -> float:
    """The fleet's daily curve: x0.3 at 02:00 UTC, x1.7 at 14:00, mean 1."""
    h = (t_s / HOUR_S) % 24.0
    return 1.0 + 0.7 * math.cos(2.0 * math.pi * (h - 14.0) / 24.0)


@dataclass(eq=False)
class _Incident:
    id: str
    kind: str
    agent: _Agent
    start_s: float
    end_s: float = math.inf  # the window's end, for time-bounded kinds
    target: int = 0  # anomalous writes to make, for count-bounded kinds
    factor: float = 1.0  # x amount (inflation, rogue); growth per hour (drift)
    dup_q: float = 0.0  # retry_duplicates: chance that a write is retried
    column: str = ""  # new_category
    value: str = ""
    made: int = 0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _Agent:
    agent_id: str
    table: str
    run_id: str
    median: float
    sigma: float
    weight: float
    start_s: float
    end_s: float
    currency: str
    mix: list[float]  # weights over REASONS (refunds) or CATEGORIES (tickets)
    wide: bool
    rate: float = 0.0  # writes per second at day factor 1
    live: list[dict[str, Any]] = field(default_factory=list)  # its rows that may be updated or deleted
    incident: _Incident | None = None
    burst: tuple[float, float, str] | None = None
    new_id: str | None = None
    new_until: float = -1.0
    retired: bool = False
    batch: str | None = None  # nightly_batch: its id
    shift: _Shift | None = None  # benign_shift: its step and the rogue spell after it
    soft_deletes: bool = False  # delete_habit: it cancels by setting deleted_at, it does not delete


@dataclass(eq=False)
class _Shift:
    """benign_shift: from ``start_s`` the agent's level is ``factor`` times what it was, and stays; its first
    ``report`` inserts at the new level are the change to report; after ``rogue_after`` writes at the new level a
    rogue spell (x20 of it) follows."""

    change: _Incident
    rogue: _Incident
    factor: float
    report: int = 200
    rogue_after: int = 400
    writes: int = 0  # at the new level
    inserts: int = 0


_Write = tuple[str, dict[str, Any] | None, dict[str, Any] | None]  # op, before, after


class Generator:
    """The fleet, its benign scenarios and its incidents; :meth:`events` yields ``(value, label)`` in commit order.

    Deterministic for a given :class:`Params` (one seeded ``random.Random`` drives everything).
    """

    def __init__(self, p: Params) -> None:
        p.check()
        self.p = p
        self.rng = random.Random(p.seed)
        self.horizon = p.days * DAY_S
        self.agents: list[_Agent] = []
        self.incidents: list[_Incident] = []
        self._scale = 0.0  # writes per second per unit of an agent's weight
        self._ids = {REFUNDS: 1_000_000, ORDERS: 5_000_000, TICKETS: 8_000_000}
        self._legacy_id = 90_000_000  # rows written before the run, for a mass delete that needs more rows
        self._wal = Envelopes(self.rng, lsn=40_000_000, tx_id=9_000)
        self._heap: list[tuple[float, int, int]] = []  # (t, seq, agent index or -1 for a scripted write)
        self._seq = 0
        self._now_s = 0.0
        self._scripted: dict[int, tuple[str, _Incident, dict[str, Any] | None]] = {}
        spike0 = 2 * DAY_S + 10 * HOUR_S
        self.spike = (spike0, spike0 + HOUR_S)
        rng = self.rng
        for i in range(p.agents):
            self.agents.append(self._new_agent(TABLES[0 if i % 20 < 8 else 1 if i % 20 < 15 else 2], 0.0))
        n_new = p.agents // 20 if p.new_agents is None else p.new_agents
        for k in range(n_new):
            a = self._new_agent(TABLES[k % 3], rng.uniform(0.5 * DAY_S, self.horizon - 0.5 * DAY_S))
            a.new_id, a.new_until = f"new_agent-{k + 1}", a.start_s + DAY_S
            self.agents.append(a)
        active = sum(a.weight * (a.end_s - a.start_s) for a in self.agents)
        self._scale = p.events / active
        for a in self.agents:
            a.rate = a.weight * self._scale
        self._plan_incidents()
        n_bursts = p.agents // 25 if p.bursts is None else p.bursts
        quiet = [a for a in self.agents if a.incident is None and a.start_s == 0.0]
        for k, a in enumerate(rng.sample(quiet, min(n_bursts, len(quiet)))):
            b0 = SLICE_S * int(rng.uniform(0.5 * DAY_S, self.horizon - HOUR_S) // SLICE_S)
            a.burst = (b0, b0 + HOUR_S, f"benign_burst-{k + 1}")
        batchers = [a for a in quiet if a.table == ORDERS and a.burst is None and not a.wide]
        for k, a in enumerate(rng.sample(batchers, min(max(2, p.agents // 40), len(batchers)))):
            a.batch = f"nightly_batch-{k + 1}"
            at = rng.uniform(1.0, 3.0) * HOUR_S
            for night in range(int(self.horizon // DAY_S) + 1):
                t0 = night * DAY_S + at + rng.uniform(-300.0, 300.0)
                n = rng.randint(150, 300)
                for t in sorted(t0 + rng.uniform(0.0, 1200.0) for _ in range(n)):
                    if t < self.horizon:
                        self._push_scripted(t, ("batch", _Incident(a.batch, "nightly_batch", a, t0), None))
        self._plan_shifts()
        self._plan_short_bursts()

    def _plan_short_bursts(self) -> None:
        """short_burst: a low-rate agent (the quietest third of its table's) writes x20 its usual for this hour for
        10 minutes, on day 1 or later between 06:00 and 21:00 UTC, outside the fleet's spike; then it goes on as
        before (the alert is a warning: nothing stops it).

        Planned after every other scenario, and its extra writes (inserts) drawn, from its own random stream, and
        the agent's rows left as they were: every other event of a seed is what it was without it.
        """
        self._rush_rng: random.Random = random.Random(self.p.seed * 7_919 + 14)
        self._rush_id: int = 95_000_000  # its rows' ids, apart from the others'
        rng, h = self._rush_rng, self.horizon
        for n in range(self.p.per_kind):
            table = TABLES[n % 3]
            cands = [
                a for a in self.agents
                if a.table == table and a.start_s == 0.0 and a.incident is None and a.new_id is None
                and a.burst is None and a.batch is None
            ]
            if not cands:
                raise ValueError(f"not enough agents on {table} for the incidents: raise --agents")
            cands.sort(key=lambda a: a.weight)
            a = rng.choice(cands[: max(3, len(cands) // 3)])
            days = max(int((h - HOUR_S) // DAY_S), 2)
            start = 0.0
            for _ in range(100):
                start = rng.randrange(1, days) * DAY_S + rng.uniform(6.0, 21.0) * HOUR_S
                if start + SHORT_BURST_S <= h and not (start < self.spike[1] and start + SHORT_BURST_S > self.spike[0]):
                    break
            inc = _Incident(f"short_burst-{n + 1}", "short_burst", a, start, end_s=start + SHORT_BURST_S,
                            factor=SHORT_BURST_X)
            usual = a.rate * day_factor(start + SHORT_BURST_S / 2) * SHORT_BURST_S
            extra = max(round((SHORT_BURST_X - 1) * usual), 1)  # on top of its own writes in the 10 minutes
            for t in sorted(start + rng.uniform(0.0, SHORT_BURST_S) for _ in range(extra)):
                self._push_scripted(t, ("rush", inc, None))
            inc.params = {"factor": SHORT_BURST_X, "minutes": SHORT_BURST_S / 60, "usual_writes": round(usual, 2),
                          "writes": extra}
            a.incident = inc
            self.incidents.append(inc)

    def _swap_streams(self) -> None:
        """Swap the generator's random stream (and its envelopes') with short_burst's, and back."""
        self.rng, self._rush_rng = self._rush_rng, self.rng
        self._wal.rng = self.rng

    # -- setup --

    def _new_agent(self, table: str, start_s: float) -> _Agent:
        rng = self.rng
        n = len(self.agents)  # ids are numbered in order of creation; they say nothing about the agent
        wide = rng.random() < 0.1
        currency = rng.choices(CURRENCIES, (0.6, 0.25, 0.15))[0]
        mix = [rng.gammavariate(1.0, 1.0) + 0.05 for _ in range(5)]
        return _Agent(
            agent_id=f"{KIND_NAME[table]}-agent-{n + 1:03d}",
            table=table,
            run_id=f"run-{rng.getrandbits(32):08x}",
            median=TABLE_MEDIAN[table] * math.exp(rng.gauss(0.0, 0.4)),
            sigma=rng.uniform(0.8, 1.1) if wide else rng.uniform(0.25, 0.45),
            weight=rng.lognormvariate(0.0, 0.8),
            start_s=start_s,
            end_s=self.horizon,
            currency=currency,
            mix=[m / sum(mix) for m in mix],
            wide=wide,
        )

    def _pick(self, table: str, *, busy: bool = False, wide: bool = False) -> _Agent:
        cands = [
            a
            for a in self.agents
            if a.table == table and a.start_s == 0.0 and a.incident is None and a.new_id is None and a.wide == wide
        ]
        if busy:  # a mass delete needs rows to delete; retries need writes to retry
            cands.sort(key=lambda a: -a.weight)
            cands = cands[: max(3, len(cands) // 3)]
        if not cands:
            raise ValueError(f"not enough agents on {table} for the incidents: raise --agents")
        return self.rng.choice(cands)

    def _plan_incidents(self) -> None:
        rng, h = self.rng, self.horizon
        # short_burst is planned last, with its own random stream (_plan_short_bursts): it moved no other scenario.
        kinds: list[tuple[str, int]] = [
            (k, n) for n in range(self.p.per_kind) for k in INCIDENT_KINDS if k != "short_burst"
        ]
        for kind, n in kinds:
            iid = f"{kind}-{n + 1}"
            if kind == "amount_inflation":
                a = self._pick(TABLES[n % 3])
                inc = _Incident(iid, kind, a, rng.uniform(DAY_S, h - 8 * HOUR_S), factor=20.0,
                                target=rng.randint(30, 60))
                inc.params = {"factor": 20, "writes": inc.target}
            elif kind == "mass_delete":
                a = self._pick((ORDERS, TICKETS)[n % 2], busy=True)
                inc = _Incident(iid, kind, a, rng.uniform(DAY_S, h - HOUR_S), target=rng.randint(50, 200))
                a.end_s = inc.start_s  # its normal writes stop; the burst is scripted
                times = sorted(inc.start_s + rng.uniform(0.0, 60.0) for _ in range(inc.target))
                for t in times:
                    self._push_scripted(t, ("delete", inc, None))
                inc.params = {"deletes": inc.target, "within_s": 60}
            elif kind == "retry_duplicates":
                a = self._pick(REFUNDS, busy=True)
                share = rng.uniform(0.15, 0.30)
                inc = _Incident(iid, kind, a, rng.uniform(DAY_S, h - 12 * HOUR_S), target=rng.randint(60, 150),
                                dup_q=share / (1.0 - share))
                inc.params = {"duplicate_share": round(share, 3), "writes": inc.target}
            elif kind == "first_day_rogue":
                table = TABLES[n % 3]
                a = self._new_agent(table, rng.uniform(DAY_S, h - 8 * HOUR_S))
                if a.wide:  # x20 must stand out from its own profile too
                    a.wide, a.sigma = False, rng.uniform(0.25, 0.45)
                a.rate = a.weight * self._scale
                self.agents.append(a)
                inc = _Incident(iid, kind, a, a.start_s, factor=20.0, target=rng.randint(20, 40))
                inc.params = {"factor": 20, "writes": inc.target}
            elif kind == "sustained_shift":
                a = self._pick(TABLES[n % 3], wide=True)
                inc = _Incident(iid, kind, a, rng.uniform(DAY_S, h - 8 * HOUR_S), factor=20.0,
                                target=rng.randint(40, 60))
                inc.params = {"factor": 20, "writes": inc.target, "sigma": round(a.sigma, 2)}
            elif kind == "multiplied_update":
                a = self._pick(ORDERS, busy=True)
                inc = _Incident(iid, kind, a, rng.uniform(DAY_S, h - 12 * HOUR_S), factor=10.0,
                                target=rng.randint(10, 20))
                inc.params = {"factor": 10, "writes": inc.target}
            elif kind == "delete_habit":
                a = self._pick((ORDERS, TICKETS)[n % 2])
                a.soft_deletes = True  # from its first write on: its habit has no hard deletes
                per_hour = rng.uniform(2.0, 4.0)
                inc = _Incident(iid, kind, a, rng.uniform(DAY_S, h - 12 * HOUR_S), target=rng.randint(6, 12))
                span = inc.target / per_hour * HOUR_S
                times = sorted(inc.start_s + rng.uniform(0.0, span) for _ in range(inc.target))
                for t in times:
                    self._push_scripted(t, ("delete", inc, None))
                inc.end_s = a.end_s = times[-1]  # stopped after its last hard delete
                inc.params = {"deletes": inc.target, "per_hour": round(per_hour, 2)}
            elif kind == "slow_drift":
                a = self._pick(TABLES[n % 3])
                start = rng.uniform(DAY_S, h - DAY_S - HOUR_S)
                inc = _Incident(iid, kind, a, start, end_s=start + DAY_S, factor=rng.uniform(0.01, 0.03))
                inc.params = {"per_hour": round(inc.factor, 4), "hours": 24}
            else:  # new_category
                table, column, value = NEW_VALUES[n % len(NEW_VALUES)]
                a = self._pick(table)
                inc = _Incident(iid, kind, a, rng.uniform(DAY_S, h - 12 * HOUR_S), target=rng.randint(10, 30),
                                column=column, value=value)
                inc.params = {"column": column, "value": value, "writes": inc.target}
            a.incident = inc
            self.incidents.append(inc)

    def _plan_shifts(self) -> None:
        """``benign_shift``: ``per_kind`` established agents (one per table in turn, ordinary sigma, among the
        busiest third, none with another scenario) whose level steps up by 0.6-0.8 of their own per-write sigma
        (x1.2-x1.4: a price rise) between day 1 and day 1.5, and stays; 400 writes later, a
        ``rogue_after_shift`` spell of 20-30 inserts at x20 the new level."""
        rng = self.rng
        for n in range(self.p.per_kind):
            table = TABLES[n % 3]
            cands = [a for a in self.agents if a.table == table and a.start_s == 0.0 and a.incident is None
                     and a.new_id is None and not a.wide and a.burst is None and a.batch is None]
            cands.sort(key=lambda a: -a.weight)
            if not cands:
                raise ValueError(f"not enough agents on {table} for the benign shifts: raise --agents")
            a = rng.choice(cands[: max(3, len(cands) // 3)])
            step = rng.uniform(0.6, 0.8)
            change = _Incident(f"{SHIFT}-{n + 1}", SHIFT, a, rng.uniform(DAY_S, 1.5 * DAY_S),
                               factor=math.exp(step * a.sigma))
            rogue = _Incident(f"{SHIFT_ROGUE}-{n + 1}", SHIFT_ROGUE, a, self.horizon, factor=20.0,
                              target=rng.randint(20, 30))
            a.incident, a.shift = change, _Shift(change, rogue, factor=change.factor)
            change.params = {"factor": round(change.factor, 3), "sigmas": round(step, 2),
                             "reported_inserts": a.shift.report}
            rogue.params = {"factor": 20, "of": "the new level", "after_writes": a.shift.rogue_after,
                            "writes": rogue.target}
            self.incidents += [change, rogue]

    def manifest(self) -> dict[str, Any]:
        us = self.p.start_us

        def ts(t: float) -> int:
            return us + int(t * 1e6)

        return {
            "params": {k: getattr(self.p, k) for k in self.p.__dataclass_fields__},
            "start_us": us,
            "tables": list(TABLES),
            "agents": len(self.agents),
            "incidents": [
                {"id": i.id, "scenario": i.kind, "agent_id": i.agent.agent_id, "table": i.agent.table,
                 "start_us": ts(i.start_s), **i.params}
                for i in self.incidents
            ],
            "benign": [
                {"id": "traffic_spike-1", "scenario": "traffic_spike", "factor": self.p.spike_factor,
                 "start_us": ts(self.spike[0]), "end_us": ts(self.spike[1])},
                *({"id": a.burst[2], "scenario": "benign_burst", "agent_id": a.agent_id, "table": a.table,
                   "start_us": ts(a.burst[0]), "end_us": ts(a.burst[1])} for a in self.agents if a.burst),
                *({"id": a.new_id, "scenario": "new_agent", "agent_id": a.agent_id, "table": a.table,
                   "start_us": ts(a.start_s), "labelled_until_us": ts(a.new_until)} for a in self.agents if a.new_id),
                *({"id": a.batch, "scenario": "nightly_batch", "agent_id": a.agent_id, "table": a.table}
                  for a in self.agents if a.batch),
            ],
        }

    # -- timing --

    def _push_scripted(self, t: float, what: tuple[str, _Incident, dict[str, Any] | None]) -> None:
        self._seq += 1
        self._scripted[self._seq] = what
        heapq.heappush(self._heap, (t, self._seq, -1))

    def _rate(self, a: _Agent, mid: float) -> float:
        r = a.rate * day_factor(mid)
        if a.burst is not None and a.burst[0] <= mid < a.burst[1]:
            r *= 2.0
        if self.spike[0] <= mid < self.spike[1]:
            r *= self.p.spike_factor
        return r

    def _next(self, a: _Agent, t: float) -> float | None:
        """The agent's next write after ``t``: exact for a rate that is constant within each slice."""
        while t < a.end_s:
            k = int(t // SLICE_S)
            edge = (k + 1) * SLICE_S
            lam = self._rate(a, (k + 0.5) * SLICE_S)
            if lam > 0:
                nt = t + self.rng.expovariate(lam)
                if nt < edge:
                    return nt if nt < a.end_s else None
            t = edge
        return None

    # -- rows --

    def _amount(self, a: _Agent, mult: float = 1.0) -> float:
        return round(max(0.5, a.median * math.exp(self.rng.gauss(0.0, a.sigma))) * mult, 2)

    def _prov(self, a: _Agent) -> dict[str, Any]:
        return {"agent_id": a.agent_id, "run_id": a.run_id, "agent_version": "2.3.0"}

    def _next_id(self, table: str) -> int:
        self._ids[table] += 1
        return self._ids[table]

    def _keep(self, a: _Agent, row: dict[str, Any]) -> None:
        a.live.append(row)
        if len(a.live) > 400:
            del a.live[:100]

    def _write(self, a: _Agent, *, mult: float = 1.0, create: bool = False,
               override: tuple[str, str] | None = None) -> _Write:
        """One normal-looking write by ``a``; ``mult`` scales its amount, ``override`` sets a column."""
        rng = self.rng
        r = rng.random()
        if a.table == REFUNDS:
            cur = a.currency if rng.random() >= 0.03 else rng.choice(CURRENCIES)
            row: dict[str, Any] = {
                "id": self._next_id(REFUNDS),
                "order_id": rng.randint(1, 2_000_000),
                "amount": self._amount(a, mult),
                "currency": cur,
                "reason": rng.choices(REASONS, a.mix)[0],
                "idempotency_key": f"rk-{rng.getrandbits(64):016x}",
                **self._prov(a),
            }
            if override is not None:
                row[override[0]] = override[1]
            return "c", None, row
        if a.table == ORDERS:
            if not create and a.live and r < 0.28:
                if r < 0.25:  # ship (or deliver) one of its orders; 20% of them with a discount on the total
                    idx = rng.randrange(len(a.live))
                    before = a.live[idx]
                    after = {**before, "status": "shipped" if before["status"] == "paid" else "delivered"}
                    if rng.random() < 0.2:
                        after["total"] = round(before["total"] * rng.uniform(0.85, 0.98), 2)
                    if after["status"] == "delivered":
                        del a.live[idx]
                    else:
                        a.live[idx] = after
                    return "u", before, after
                if a.soft_deletes:
                    return self._soft_delete(a)
                return "d", a.live.pop(rng.randrange(len(a.live))), None  # a cancellation
            items = 1 + min(int(rng.expovariate(0.6)), 9)
            row = {
                "id": self._next_id(ORDERS),
                "customer_id": rng.randint(1, 90_000),
                "total": round(self._amount(a, mult) * items, 2),
                "items": items,
                "status": "paid",
                **self._prov(a),
            }
            self._keep(a, row)
            return "c", None, row
        if not create and a.live and r < 0.40:
            if r < 0.37:  # resolve one of its tickets
                before = a.live.pop(rng.randrange(len(a.live)))
                return "u", before, {**before, "status": "resolved"}
            if a.soft_deletes:
                return self._soft_delete(a)
            return "d", a.live.pop(rng.randrange(len(a.live))), None  # spam clean-up
        row = {
            "id": self._next_id(TICKETS),
            "customer_id": rng.randint(1, 90_000),
            "category": rng.choices(CATEGORIES, a.mix)[0],
            "priority": rng.choices((1, 2, 3, 4), (0.4, 0.35, 0.2, 0.05))[0],
            "credit": self._amount(a, mult),
            "status": "open",
            **self._prov(a),
        }
        if override is not None:
            row[override[0]] = override[1]
        self._keep(a, row)
        return "c", None, row

    def _soft_delete(self, a: _Agent) -> _Write:
        """A delete_habit agent's cancellation: an update that sets ``deleted_at`` (the row stays)."""
        before = a.live.pop(self.rng.randrange(len(a.live)))
        stamp = datetime.fromtimestamp(self.p.start_us / 1e6 + self._now_s, UTC).isoformat()
        return "u", before, {**before, "deleted_at": stamp}

    def _old_row(self, a: _Agent, status: str = "delivered") -> dict[str, Any]:
        """A row of ``a``'s written before the run started (a mass delete may reach past its recent rows)."""
        self._legacy_id += 1
        if a.table == ORDERS:
            items = 1 + min(int(self.rng.expovariate(0.6)), 9)
            return {"id": self._legacy_id, "customer_id": self.rng.randint(1, 90_000),
                    "total": round(self._amount(a) * items, 2), "items": items, "status": status,
                    **self._prov(a)}
        return {"id": self._legacy_id, "customer_id": self.rng.randint(1, 90_000),
                "category": self.rng.choices(CATEGORIES, a.mix)[0], "priority": 2, "credit": self._amount(a),
                "status": "resolved", **self._prov(a)}

    # -- what each write is --

    def _benign(self, a: _Agent, t: float) -> tuple[str, str | None]:
        if a.burst is not None and a.burst[0] <= t < a.burst[1]:
            return "benign_burst", a.burst[2]
        if self.spike[0] <= t < self.spike[1]:
            return "traffic_spike", "traffic_spike-1"
        if t < a.new_until:
            return "new_agent", a.new_id
        return NORMAL, None

    def _shift_tick(self, a: _Agent, t: float, s: _Shift) -> tuple[_Write, str, str | None, bool]:
        change, rogue = s.change, s.rogue
        if t < change.start_s:
            scenario, iid = self._benign(a, t)
            return self._write(a), scenario, iid, False
        s.writes += 1
        if s.writes <= s.rogue_after:
            w = self._write(a, mult=s.factor)
            # Only an insert carries the new level (an update ships an older order): those are the change to report.
            report = w[0] == "c" and s.inserts < s.report
            s.inserts += w[0] == "c"
            return w, SHIFT, change.id, report
        if rogue.made == 0:
            rogue.start_s = t
        rogue.made += 1
        a.retired = rogue.made >= rogue.target
        return self._write(a, mult=s.factor * rogue.factor, create=True), SHIFT_ROGUE, rogue.id, True

    def _tick(self, a: _Agent, t: float) -> tuple[_Write, str, str | None, bool] | None:
        self._now_s = t  # delete_habit: the time a soft delete stamps
        if a.shift is not None:
            return self._shift_tick(a, t, a.shift)
        inc = a.incident
        if inc is None or t < inc.start_s:
            scenario, iid = self._benign(a, t)
            return self._write(a), scenario, iid, False
        kind = inc.kind
        if kind == "short_burst":  # its own writes in the 10 minutes are part of the burst; after, it goes on as before
            if t < inc.end_s:
                return self._write(a), kind, inc.id, True
            scenario, iid = self._benign(a, t)
            return self._write(a), scenario, iid, False
        if kind in ("amount_inflation", "first_day_rogue", "sustained_shift"):
            w = self._write(a, mult=inc.factor, create=True)
            inc.made += 1
            a.retired = inc.made >= inc.target
            return w, kind, inc.id, True
        if t >= inc.end_s:  # the window of a time-bounded incident is over: the agent was stopped
            a.retired = True
            return None
        if kind == "slow_drift":
            w = self._write(a, mult=(1.0 + inc.factor) ** ((t - inc.start_s) / HOUR_S))
            return w, kind, inc.id, w[0] == "c"
        if kind == "delete_habit":  # its normal writes go on around the scripted hard deletes
            return self._write(a), kind, inc.id, False
        if kind == "multiplied_update":
            if not a.live:
                return self._write(a), kind, inc.id, False
            idx = self.rng.randrange(len(a.live))
            before = a.live[idx]
            after = {**before, "total": round(before["total"] * inc.factor, 2)}
            a.live[idx] = after
            inc.made += 1
            a.retired = inc.made >= inc.target
            return ("u", before, after), kind, inc.id, True
        if kind == "retry_duplicates":
            w = self._write(a)
            if w[2] is not None and self.rng.random() < inc.dup_q:
                self._push_scripted(t + self.rng.uniform(10.0, 240.0), ("retry", inc, w[2]))
            inc.made += 1
            a.retired = inc.made >= inc.target
            return w, kind, inc.id, False
        misuse = self.rng.random() < 0.35  # new_category
        w = self._write(a, create=misuse, override=(inc.column, inc.value) if misuse else None)
        if misuse:
            inc.made += 1
            a.retired = inc.made >= inc.target
        return w, kind, inc.id, misuse

    def _script(self, what: tuple[str, _Incident, dict[str, Any] | None]) -> _Write:
        action, inc, row = what
        a = inc.agent
        if action == "retry":
            assert row is not None
            return "c", None, {**row, "id": self._next_id(a.table)}
        if action == "rush":  # short_burst: one more insert of the agent's; its rows and the ids left as they were
            live, ids = list(a.live), self._ids[a.table]
            op, before, after = self._write(a, create=True)
            a.live, self._ids[a.table] = live, ids
            assert after is not None
            self._rush_id += 1
            return op, before, {**after, "id": self._rush_id}
        if action == "batch":  # the nightly job ships paid orders, older than the run
            before = self._old_row(a, status="paid")
            return "u", before, {**before, "status": "shipped"}
        return "d", a.live.pop() if a.live else self._old_row(a), None

    def events(self) -> Iterator[tuple[bytes, Label]]:
        """Every write in commit order, as (Debezium value, label)."""
        for i, a in enumerate(self.agents):
            t = self._next(a, a.start_s)
            if t is not None:
                self._seq += 1
                heapq.heappush(self._heap, (t, self._seq, i))
        line = 0
        us = self.p.start_us
        while self._heap:
            t, seq, ref = heapq.heappop(self._heap)
            rush = False
            if ref >= 0:
                a = self.agents[ref]
                out = self._tick(a, t)
                nt = None if a.retired else self._next(a, t)
                if nt is not None:
                    self._seq += 1
                    heapq.heappush(self._heap, (nt, self._seq, ref))
                if out is None:
                    continue
                (op, before, after), scenario, iid, anomalous = out
            else:
                what = self._scripted.pop(seq)
                a = what[1].agent
                rush = what[0] == "rush"
                if rush:
                    self._swap_streams()  # short_burst's writes draw from its own stream, and are undone after
                op, before, after = self._script(what)
                scenario, iid, anomalous = what[1].kind, what[1].id, what[0] != "batch"
            line += 1
            ts_us = us + int(t * 1e6)
            value = self._wal.value(a.table, op, before, after, ts_us)
            if rush:
                self._swap_streams()
            yield value, Label(line, scenario, iid, anomalous, a.agent_id, a.table, op, ts_us)


@dataclass
class Generated:
    events: Path
    labels: Path
    config: Path
    manifest: Path
    lines: int
    anomalous: int


def generate_to(out: Path, p: Params, config: Path = DEFAULT_CONFIG) -> Generated:
    """Write events.jsonl, labels.jsonl, incidents.json and writeguard.yaml (a copy of ``config``) to ``out``."""
    load_config(config)  # refuse a bad config before spending time on the events
    out.mkdir(parents=True, exist_ok=True)
    gen = Generator(p)
    ev_path, lab_path = out / "events.jsonl", out / "labels.jsonl"
    n = anomalous = 0
    with ev_path.open("wb") as ev, lab_path.open("wb") as lab:
        for value, label in gen.events():
            ev.write(value + b"\n")
            lab.write(label.to_json() + b"\n")
            n += 1
            anomalous += label.anomalous
    man = gen.manifest()
    man["lines"], man["anomalous"] = n, anomalous
    man_path = out / "incidents.json"
    man_path.write_bytes(orjson.dumps(man, option=orjson.OPT_INDENT_2) + b"\n")
    cfg_path = out / "writeguard.yaml"
    if config.resolve() != cfg_path.resolve():
        shutil.copyfile(config, cfg_path)
    return Generated(ev_path, lab_path, cfg_path, man_path, n, anomalous)


# -- scoring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlertRef:
    """What scoring needs from one published alert."""

    agent_id: str
    detector: str
    table: str
    lines: tuple[int, ...]  # input lines of its triggering events
    quarantined: bool = False


def read_alerts(raw_lines: Iterable[bytes], line_map: Sequence[int] | None = None) -> list[AlertRef]:
    """Alerts (JSON lines); ``triggering_events[].source`` is ``path:line``, mapped through ``line_map``."""
    out: list[AlertRef] = []
    for raw in raw_lines:
        if not raw.strip():
            continue
        d = orjson.loads(raw)
        lines: list[int] = []
        for ev in d.get("triggering_events") or ():
            src = ev.get("source")
            if isinstance(src, str) and ":" in src:
                tail = src.rsplit(":", 1)[1]
                if tail.isdigit():
                    n = int(tail)
                    lines.append(line_map[n - 1] if line_map is not None else n)
        out.append(AlertRef(str(d["agent_id"]), str(d["detector"]), str(d["table"]), tuple(lines),
                            bool(d.get("quarantined"))))
    return out


@dataclass
class IncidentResult:
    id: str
    scenario: str
    agent_id: str
    table: str
    anomalous: int
    first_ts_us: int
    detector: str | None = None
    delay_events: int | None = None
    delay_s: float | None = None
    alerts: int = 0  # true-positive alerts on it

    @property
    def detected(self) -> bool:
        return self.delay_events is not None


@dataclass
class Row:
    scenario: str
    incidents: int = 0
    detected: int = 0
    alerts: int = 0
    tp: int = 0
    normal_events: int = 0
    anomalous_events: int = 0
    delays_events: list[int] = field(default_factory=list)
    delays_s: list[float] = field(default_factory=list)

    def add(self, r: Row) -> None:
        """Add ``r``'s counts to this row's and pool its delays (the overall row, several seeds' rows)."""
        self.incidents += r.incidents
        self.detected += r.detected
        self.alerts += r.alerts
        self.tp += r.tp
        self.normal_events += r.normal_events
        self.anomalous_events += r.anomalous_events
        self.delays_events += r.delays_events
        self.delays_s += r.delays_s

    @property
    def false_alarms(self) -> int:
        return self.alerts - self.tp

    @property
    def precision(self) -> float | None:
        return self.tp / self.alerts if self.alerts else None

    @property
    def recall(self) -> float | None:
        return self.detected / self.incidents if self.incidents else None

    @property
    def fa_per_10k(self) -> float | None:
        return self.false_alarms / (self.normal_events / 10_000) if self.normal_events else None


@dataclass
class Score:
    rows: list[Row]  # one per scenario present, in SCENARIOS order
    overall: Row
    incidents: list[IncidentResult]
    alerts_without_lines: int = 0
    false_alarms_by: Counter[tuple[str, str]] = field(default_factory=Counter)  # (scenario, detector) -> count

    def row(self, scenario: str) -> Row | None:
        return next((r for r in self.rows if r.scenario == scenario), None)


def score(labels: Sequence[Label], alerts: Sequence[AlertRef]) -> Score:
    """Precision, recall, false alarms per 10,000 normal events and time to detect, per scenario and overall."""
    rows: dict[str, Row] = {}
    incidents: dict[str, IncidentResult] = {}
    inc_lines: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        if lab.line != i + 1:
            raise ValueError(f"labels must be one per input line, in order: entry {i + 1} says line {lab.line}")
        row = rows.get(lab.scenario)
        if row is None:
            row = rows[lab.scenario] = Row(lab.scenario)
        if not lab.anomalous:
            row.normal_events += 1
            continue
        row.anomalous_events += 1
        if lab.incident is None:
            raise ValueError(f"line {lab.line} is anomalous but names no incident")
        res = incidents.get(lab.incident)
        if res is None:
            res = incidents[lab.incident] = IncidentResult(lab.incident, lab.scenario, lab.agent_id, lab.table, 0,
                                                           lab.ts_us)
            inc_lines[lab.incident] = []
        res.anomalous += 1
        inc_lines[lab.incident].append(lab.line)
    detected_at: dict[str, int] = {}  # incident -> last triggering line of its first detecting alert
    without = 0
    fa_by: Counter[tuple[str, str]] = Counter()
    for al in alerts:
        valid = [n for n in al.lines if 1 <= n <= len(labels)]
        if not valid:
            without += 1
            rows.setdefault(NORMAL, Row(NORMAL)).alerts += 1
            fa_by[NORMAL, al.detector] += 1
            continue
        last = max(valid)
        hits = [n for n in valid if labels[n - 1].anomalous and labels[n - 1].agent_id == al.agent_id]
        if not hits:
            scenario = labels[last - 1].scenario
            rows.setdefault(scenario, Row(scenario)).alerts += 1
            fa_by[scenario, al.detector] += 1
            continue
        res = incidents[labels[max(hits) - 1].incident or ""]
        row = rows[res.scenario]
        row.alerts += 1
        row.tp += 1
        res.alerts += 1
        if res.id not in detected_at or last < detected_at[res.id]:
            detected_at[res.id] = last
            res.detector = al.detector
            res.delay_events = bisect.bisect_right(inc_lines[res.id], last)
            res.delay_s = (labels[last - 1].ts_us - res.first_ts_us) / 1e6
    for res in incidents.values():
        row = rows[res.scenario]
        row.incidents += 1
        if res.detected:
            row.detected += 1
            row.delays_events.append(res.delay_events or 0)
            row.delays_s.append(res.delay_s or 0.0)
    ordered = [rows[s] for s in SCENARIOS if s in rows] + [r for s, r in rows.items() if s not in SCENARIOS]
    overall = Row("overall")
    for r in ordered:
        overall.add(r)
    order = {s: i for i, s in enumerate(SCENARIOS)}
    results = sorted(incidents.values(), key=lambda r: (order.get(r.scenario, 99), r.first_ts_us))
    return Score(ordered, overall, results, without, fa_by)


# -- the runs --------------------------------------------------------------------------------------------


@dataclass
class CliCheck:
    scenario: str
    command: str
    returncode: int
    lines: int
    alerts: int
    score_lines: int
    same_as_in_process: bool
    detail: str
    summary: str  # the replay summary line it printed on stderr
    seconds: float


def _alert_key(a: AlertRef) -> tuple[str, str, str, tuple[int, ...]]:
    return (a.table, a.agent_id, a.detector, a.lines)


def cli_check(workdir: Path, events: Path, labels: Sequence[Label], cfg_path: Path, scenario: str,
              in_process: Sequence[AlertRef], scored: Score) -> CliCheck:
    """``writeguard replay`` as a subprocess over every event of ``scenario``'s incident agents (or ``all``)."""
    if scenario == "all":
        agents = None
    else:
        agents = {r.agent_id for r in scored.incidents if r.scenario == scenario}
        agents |= {lab.agent_id for lab in labels if lab.scenario == scenario and lab.incident is not None}
    sub = workdir / f"cli-{scenario}.jsonl"
    line_map: list[int] = []
    with events.open("rb") as src, sub.open("wb") as dst:
        for lab, raw in zip(labels, src, strict=True):
            if agents is None or lab.agent_id in agents:
                dst.write(raw)
                line_map.append(lab.line)
    alerts_out, scores_out = workdir / f"cli-{scenario}.alerts.jsonl", workdir / f"cli-{scenario}.scores.jsonl"
    cmd = [sys.executable, "-m", "stream.cli", "replay", str(sub), "--config", str(cfg_path),
           "--alerts", str(alerts_out), "--scores", str(scores_out)]
    shown = " ".join(["python", "-m", "stream.cli", "replay", sub.name, "--config", cfg_path.name,
                      "--alerts", alerts_out.name, "--scores", scores_out.name])
    log(f"CLI: {shown} ({len(line_map):,} lines) ...")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    secs = time.perf_counter() - t0
    summary = next((ln for ln in proc.stderr.splitlines() if ln.startswith("replay: ") and "changes scored" in ln),
                   proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
    got = read_alerts(alerts_out.read_bytes().splitlines(), line_map) if alerts_out.exists() else []
    n_scores = 0
    if scores_out.exists():
        with scores_out.open("rb") as fh:
            n_scores = sum(1 for _ in fh)
    mine = {_alert_key(a) for a in in_process if agents is None or a.agent_id in agents}
    theirs = {_alert_key(a) for a in got}
    same = proc.returncode == 0 and mine == theirs
    if same:
        detail = f"the same {len(theirs)} alerts (agent, detector, triggering lines) as in process"
    else:
        # A subset holds fewer agents: models shared by the table (population, table-wide novelty, traffic) see
        # less of the fleet, so they may judge differently; an agent's own models see the same writes.
        only_cli = sorted({a.detector for a in got if _alert_key(a) not in mine})
        detail = (f"exit {proc.returncode}; {len(theirs - mine)} alerts only from the CLI "
                  f"({', '.join(only_cli) or '-'}), {len(mine - theirs)} only in process (the table's shared models "
                  "see fewer agents in a subset)")
        if proc.returncode != 0:
            detail += f"; stderr: {proc.stderr.strip()[-500:]}"
    return CliCheck(scenario, shown, proc.returncode, len(line_map), len(got), n_scores, same, detail, summary, secs)


def measure_memory(events: Path, cfg: Config, workdir: Path, limit: int = 0) -> tuple[float, int, int]:
    """Bytes held per (table, agent) after a fresh engine has seen the first ``limit`` events (0: all).

    Net tracemalloc growth over the replay, agent ids and retained alert triggers included; the compiled
    tables and population models are built before tracing starts. Returns (bytes per model set, model sets,
    events).
    """
    n_events = 0
    if limit > 0:
        prefix = workdir / "memory-prefix.jsonl"
        with events.open("rb") as src, prefix.open("wb") as dst:
            for raw in src:
                if n_events >= limit:
                    break
                dst.write(raw)
                n_events += 1
        events = prefix
    engine = Engine(list(cfg.tables))
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    stats = replay(events, cfg, engine=engine)
    n_events = stats.lines
    del stats
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    n = len(engine.states)
    return held / max(n, 1), n, n_events


def busiest_minutes(labels: Sequence[Label]) -> tuple[int, int]:
    """Most writes, and most deletes, of one agent in one clock minute of normal traffic."""
    writes: Counter[tuple[str, str, int]] = Counter()
    deletes: Counter[tuple[str, str, int]] = Counter()
    for lab in labels:
        if lab.anomalous:
            continue
        key = (lab.table, lab.agent_id, lab.ts_us // 60_000_000)
        writes[key] += 1
        if lab.op in ("d", "t"):
            deletes[key] += 1
    return max(writes.values(), default=0), max(deletes.values(), default=0)


# -- the table -------------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _p50_max(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{format(statistics.median(values), fmt)} / {format(max(values), fmt)}"


def format_table(sc: Score) -> list[str]:
    head = ("scenario", "incidents", "detected", "recall", "alerts", "TP", "precision", "normal events",
            "false alarms", "FA/10k normal", "TTD events p50/max", "TTD seconds p50/max", "TTD hours p50/max")
    body: list[tuple[str, ...]] = []
    for r in [*sc.rows, sc.overall]:
        incident_row = r.incidents > 0 or r.scenario == "overall"
        body.append((
            r.scenario,
            str(r.incidents) if incident_row else "-",
            str(r.detected) if incident_row else "-",
            _pct(r.recall),
            str(r.alerts),
            str(r.tp),
            _pct(r.precision),
            f"{r.normal_events:,}",
            str(r.false_alarms),
            _num(r.fa_per_10k),
            _p50_max(r.delays_events, ",.0f"),
            _p50_max(r.delays_s, ",.0f"),
            _p50_max([d / HOUR_S for d in r.delays_s], ",.1f"),
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                               strict=True)))

    out = [fmt(head)]
    for b in body:
        if b[0] == "overall":
            out.append("  ".join("-" * w for w in widths))
        out.append(fmt(b))
    return out


def combine(scores: Sequence[Score]) -> Score:
    """Several seeds' scores as one: each scenario's counts added up, its delays pooled."""
    rows: dict[str, Row] = {}
    overall = Row("overall")
    for one in scores:
        for r in [*one.rows, one.overall]:
            into = overall if r is one.overall else rows.setdefault(r.scenario, Row(r.scenario))
            into.add(r)
    fa_by: Counter[tuple[str, str]] = Counter()
    for one in scores:
        fa_by.update(one.false_alarms_by)
    ordered = [rows[s] for s in SCENARIOS if s in rows] + [r for s, r in rows.items() if s not in SCENARIOS]
    return Score(ordered, overall, [i for one in scores for i in one.incidents],
                 sum(one.alerts_without_lines for one in scores), fa_by)


def merged_precision(sc: Score) -> float | None:
    """Precision after merging repeats: the alerts on one incident (several detectors, or a reopened incident)
    count as one true positive; every false alarm counts."""
    fa = sc.overall.false_alarms
    detected = sum(r.detected for r in sc.incidents)
    return detected / (detected + fa) if detected + fa else None


def seeds_report(runs: Sequence[tuple[int, Score]]) -> list[str]:
    """The per-scenario table over several seeds, per-seed recall, and issue 14's targets with where a seed misses."""
    both = combine([s for _, s in runs])
    seeds = ", ".join(str(seed) for seed, _ in runs)
    per_seed: dict[str, list[str]] = {r.scenario: [] for r in both.rows}
    for _, one in runs:
        for r in both.rows:
            mine = one.row(r.scenario)
            per_seed[r.scenario].append(f"{mine.detected}/{mine.incidents}" if mine and mine.incidents else "-")
    per_seed["overall"] = [f"{one.overall.detected}/{one.overall.incidents}" for _, one in runs]
    table = format_table(both)
    width = max(17, *(len(" ".join(v)) for v in per_seed.values()))
    head = f"{table[0]}  {'detected per seed'.rjust(width)}"
    body = []
    # format_table: the header, a line per scenario, a rule, the overall line
    for line, row in zip(table[1:], [*both.rows, None, both.overall], strict=True):
        body.append(line if row is None else f"{line}  {' '.join(per_seed[row.scenario]).rjust(width)}")
    gross = [i for i in both.incidents if i.scenario in GROSS_CHECKED]
    slow = [i for i in gross if i.delay_events is None or i.delay_events > 5]
    o = both.overall
    lines = [f"over seeds {seeds} ({len(runs)} fleets, {o.incidents} incidents, {o.normal_events:,} normal events):",
             head, *body, "", f"targets (issue 14, over seeds {seeds}):"]
    lines.append(f"  recall over all incidents: {o.detected}/{o.incidents} = {_pct(o.recall)} (target: >= 95%)")
    lines.append(f"  gross incidents detected within 5 anomalous writes: {len(gross) - len(slow)}/{len(gross)} "
                 "(target: all)")
    lines.append(f"  false alarms per 10,000 normal events: {_num(o.fa_per_10k)} (target: <= 0.3)")
    lines.append(f"  precision after merging repeats of one incident: {_pct(merged_precision(both))} "
                 f"(target: >= 80%; {_pct(o.precision)} counting every alert)")
    for seed, one in runs:
        missed = [i.id for i in one.incidents if not i.detected]
        late = [f"{i.id} ({i.delay_events})" for i in one.incidents
                if i.scenario in GROSS_CHECKED and i.detected and (i.delay_events or 0) > 5]
        fas = ", ".join(f"{s}/{d} {n}" for (s, d), n in sorted(one.false_alarms_by.items()))
        lines.append(f"  seed {seed}: recall {one.overall.detected}/{one.overall.incidents}, FA/10k "
                     f"{_num(one.overall.fa_per_10k)}, precision merged {_pct(merged_precision(one))}; missed: "
                     f"{', '.join(missed) or 'none'}; gross after more than 5: {', '.join(late) or 'none'}; "
                     f"false alarms: {fas or 'none'}")
    return lines


def format_incidents(sc: Score) -> list[str]:
    out = []
    for r in sc.incidents:
        if r.detected:
            how = (f"detected by {r.detector} after {r.delay_events} anomalous events, {r.delay_s:,.0f} s "
                   f"({r.alerts} alert{'s' if r.alerts != 1 else ''})")
        else:
            how = "MISSED"
        out.append(f"  {r.id:<20} {r.table:<15} {r.agent_id:<17} {r.anomalous:>4} anomalous  {how}")
    return out


def shift_report(labels: Sequence[Label], raw_alerts: Sequence[bytes]) -> list[str]:
    """Regime changes: the alerts the ``benign_shift`` agents got for their step (by detector and severity), the
    regime alerts, whether any was quarantined before its rogue spell, and whether that spell was caught."""
    agents = {lab.agent_id for lab in labels if lab.scenario == SHIFT}
    if not agents:
        return []
    raws = [orjson.loads(r) for r in raw_alerts if r.strip()]
    step: Counter[str] = Counter()
    regime: Counter[str] = Counter()
    quarantined: set[str] = set()
    caught: set[str] = set()
    for raw, ref in zip(raws, read_alerts(raw_alerts), strict=True):
        valid = [n for n in ref.lines if 1 <= n <= len(labels)]
        if ref.agent_id not in agents or not valid:
            continue
        phase = labels[max(valid) - 1].scenario
        if phase == SHIFT:
            quarantined |= {ref.agent_id} if ref.quarantined else set()
            if ref.detector.endswith(".regime"):
                regime[ref.detector] += 1
            else:
                step[f"{ref.detector} {raw['severity']}" + (" (learning)" if raw.get("learning") else "")] += 1
        elif phase == SHIFT_ROGUE and raw["severity"] == "critical":
            caught.add(ref.agent_id)
    return [
        f"  regime changes ({SHIFT}, {len(agents)} agents): alerts on the step: "
        + (", ".join(f"{k} x{n}" for k, n in sorted(step.items())) or "none")
        + "; regime alerts (info): " + (", ".join(f"{k} x{n}" for k, n in sorted(regime.items())) or "none")
        + f"; quarantined before their rogue spell: {len(quarantined)} (target 0); {SHIFT_ROGUE} alerted critical: "
        f"{len(caught)}/{len(agents)}"
    ]


def acceptance(sc: Score) -> list[str]:
    gross = [r for r in sc.incidents if r.scenario in GROSS_CHECKED]
    fast = [r for r in gross if r.delay_events is not None and r.delay_events <= 10]
    o = sc.overall
    return [
        f"  gross incidents detected within 10 anomalous events: {len(fast)}/{len(gross)} (target: all)",
        f"  overall recall: {_pct(o.recall)} (target: >= 90%)",
        f"  false alarms per 10,000 normal events: {_num(o.fa_per_10k)} (target: <= 1)",
    ]


# -- a start on a running fleet (issue 13) -----------------------------------------------------------------


def _percentiles(values: Sequence[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{v[len(v) // 2]:.1f} / {v[-1]:.1f}"


def mid_stream(workdir: Path, events: Path, labels: Sequence[Label], cfg: Config, hours: float) -> list[str]:
    """Start a fresh engine ``hours`` into the fleet's life, with no history, and report its first hour and day.

    Every agent is already writing when detection starts, so every model set starts in its learning period at
    once: what a new deployment does on its first day. An alert is on a healthy agent when the last write that
    triggered it is a normal one (an agent is healthy until its incident starts).
    """
    start_us = START_US + int(hours * HOUR_S * 1e6)
    first = next((i for i, lab in enumerate(labels) if lab.ts_us >= start_us), len(labels))
    sub = workdir / "events-mid-stream.jsonl"
    with events.open("rb") as src, sub.open("wb") as out:
        for i, raw in enumerate(src):
            if i >= first:
                out.write(raw)
    sub_labels = [
        Label(j + 1, lab.scenario, lab.incident, lab.anomalous, lab.agent_id, lab.table, lab.op, lab.ts_us)
        for j, lab in enumerate(labels[first:])
    ]
    buf = io.BytesIO()
    replay(sub, cfg, alerts_out=buf)
    sub.unlink(missing_ok=True)
    raw_alerts = [orjson.loads(r) for r in buf.getvalue().splitlines() if r.strip()]
    refs = read_alerts(buf.getvalue().splitlines())
    sc = score(sub_labels, refs)
    on_healthy = [not ref.lines or not sub_labels[max(ref.lines) - 1].anomalous for ref in refs]

    def window(seconds: float) -> str:
        end = start_us + int(seconds * 1e6)
        times = [datetime.fromisoformat(a["commit_ts"]).timestamp() * 1e6 for a in raw_alerts]
        inside = [a for a, t in zip(raw_alerts, times, strict=True) if t < end]
        agents = {(lab.table, lab.agent_id) for lab in sub_labels if lab.ts_us < end}
        healthy = [a for a, t, h in zip(raw_alerts, times, on_healthy, strict=True) if t < end and h]
        learning = [a for a in healthy if a.get("learning")]
        per10 = len(learning) / (len(agents) / 10) if agents else 0.0
        return (f"{len(inside)} alerts ({sum(bool(a.get('learning')) for a in inside)} learning); on healthy agents: "
                f"{len(healthy)} alerts, {len(learning)} learning ({per10:.2f} per 10 model sets), "
                f"{sum(bool(a['quarantined']) for a in healthy)} quarantines (target 0)")

    # When each (table, agent) model set leaves its learning period: its table's writes AND seconds, both passed.
    specs = {t.name: t for t in cfg.tables}
    seen: dict[tuple[str, str], list[int]] = {}
    for lab in sub_labels:
        seen.setdefault((lab.table, lab.agent_id), []).append(lab.ts_us)
    leave_h: list[float] = []
    never = 0
    for (table, _), ts in seen.items():
        spec = specs.get(table)
        if spec is None:
            continue
        need = max(spec.learning.writes, 1)
        if len(ts) < need:
            never += 1
            continue
        at = max(ts[need - 1], ts[0] + int(spec.learning.seconds * 1e6))
        leave_h.append((at - start_us) / (HOUR_S * 1e6))
    gross = [r for r in sc.incidents if r.scenario in GROSS_CHECKED]
    fast = [r for r in gross if r.delay_events is not None and r.delay_events <= 5]
    # An incident already under way at the start: writeguard never saw the agent's normal writes, so only the
    # population model can judge it, and its earlier rogue writes are not counted.
    before = Counter(lab.incident for lab in labels[:first] if lab.anomalous and lab.incident is not None)
    slow = [
        f"    {r.id} ({r.table}, {r.agent_id}): "
        + (f"detected by {r.detector} after {r.delay_events} anomalous events" if r.detected else "MISSED")
        + (f"; {before[r.id]} anomalous writes before the start" if before[r.id] else "")
        for r in gross
        if r not in fast
    ]
    ongoing = [r for r in gross if before[r.id]]
    return [
        f"start mid-stream ({hours:g} h into the fleet's life, no history; {len(sub_labels):,} events, "
        f"{len(seen)} model sets):",
        *format_table(sc),
        f"  first hour: {window(HOUR_S)}",
        f"  first day : {window(DAY_S)}",
        f"  model sets leaving their learning period, hours after the start p50/max: {_percentiles(leave_h)}"
        f" ({never} still learning at the end: too few writes)",
        f"  gross incidents after the start detected within 5 anomalous events: {len(fast)}/{len(gross)} "
        f"({sum(r in fast for r in ongoing)}/{len(ongoing)} of those already under way at the start)",
        *slow,
    ]


# -- commands --------------------------------------------------------------------------------------------


def params_from(args: argparse.Namespace) -> Params:
    return Params(seed=args.seed, events=args.events, agents=args.agents, days=args.days, per_kind=args.per_kind)


def cmd_generate(args: argparse.Namespace) -> int:
    p = params_from(args)
    log(f"generating about {p.events:,} normal events from {p.agents} agents over {p.days:g} days (seed {p.seed}) ...")
    g = generate_to(Path(args.out), p, Path(args.config))
    log("done")
    print(f"{g.events}: {g.lines:,} lines ({g.anomalous:,} anomalous)")
    print(f"{g.labels}: one label per line")
    print(f"{g.manifest}: the incidents and benign scenarios")
    print(f"{g.config}: the writeguard config")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    wall0 = time.monotonic()
    tmp: Path | None = None
    if args.data:
        data = Path(args.data)
        cfg_path = data / "writeguard.yaml"
        if args.config or not cfg_path.exists():
            cfg_path = Path(args.config) if args.config else DEFAULT_CONFIG
        source = f"read from {data}"
        for name in ("events.jsonl", "labels.jsonl"):
            if not (data / name).exists():
                raise ValueError(f"{data / name} does not exist: write it with `generate --out {data}`")
    else:
        p = params_from(args)
        if args.out:
            data = Path(args.out)
        else:
            data = tmp = Path(tempfile.mkdtemp(prefix="writeguard-scenarios-"))
        cfg_path = Path(args.config) if args.config else DEFAULT_CONFIG
        log(f"generating about {p.events:,} normal events from {p.agents} agents over {p.days:g} days "
            f"(seed {p.seed}) into {data} ...")
        t0 = time.perf_counter()
        g = generate_to(data, p, cfg_path)
        cfg_path = g.config
        log(f"generated {g.lines:,} lines ({g.anomalous:,} anomalous) in {time.perf_counter() - t0:.1f} s")
        source = f"seed {p.seed}"
    try:
        events = data / "events.jsonl"
        cfg = load_config(cfg_path)
        labels = read_labels(data / "labels.jsonl")
        man = orjson.loads((data / "incidents.json").read_bytes()) if (data / "incidents.json").exists() else {}

        log(f"replay in process: {events} ...")
        buf = io.BytesIO()
        stats = replay(events, cfg, alerts_out=buf, progress=log)
        log(f"replay: {stats.events_per_second:,.0f} events/s, {stats.changes:,} changes, {stats.alerts} alerts")
        if tmp is None:
            (data / "alerts.jsonl").write_bytes(buf.getvalue())
        alerts = read_alerts(buf.getvalue().splitlines())
        sc = score(labels, alerts)

        cli: CliCheck | None = None
        if args.cli_scenario != "none":
            cli = cli_check(data, events, labels, cfg_path, args.cli_scenario, alerts, sc)
            log(f"CLI: exit {cli.returncode}, {cli.alerts} alerts, {cli.detail}")

        mem: tuple[float, int, int] | None = None
        if args.memory_events >= 0:
            what = f"the first {args.memory_events:,}" if args.memory_events else "all the"
            log(f"memory: a fresh engine over {what} events under tracemalloc ...")
            mem = measure_memory(events, cfg, data, args.memory_events)
            (data / "memory-prefix.jsonl").unlink(missing_ok=True)

        busy_w, busy_d = busiest_minutes(labels)
        p_ = man.get("params", {})
        n_new = sum(1 for b in man.get("benign", []) if b.get("scenario") == "new_agent")
        n_rogue = sum(1 for i in man.get("incidents", []) if i.get("scenario") == "first_day_rogue")
        shown_cfg = args.config or (str(cfg_path) if args.data else "benchmarks/scenarios.yaml")
        o = sc.overall
        lines = [
            f"writeguard scenario benchmark ({source}: {len(labels):,} events, {o.normal_events:,} normal, "
            f"{o.anomalous_events:,} anomalous; {len(TABLES)} tables; "
            + (f"{p_.get('agents')} agents + {n_new} new + {n_rogue} first-day rogues over {p_.get('days'):g} days; "
               if p_ else "")
            + f"{o.incidents} incidents; config {shown_cfg})",
            *format_table(sc),
            "",
            "acceptance (issue #4):",
            *acceptance(sc),
            f"replay (in process)  : {stats.events_per_second:,.0f} events/s ({stats.lines:,} lines, "
            f"{stats.changes:,} changes, {stats.alerts} alerts, {len(stats.quarantined)} quarantines, "
            f"{stats.seconds:.1f} s; {stats.events_per_cpu_second:,.0f} events per CPU second)",
        ]
        if mem is not None:
            lines.append(f"memory per (table, agent): {mem[0]:,.0f} bytes (tracemalloc over the engine's states, "
                         f"{mem[1]:,} model sets after {mem[2]:,} events)")
        if cli is not None:
            over = "the whole file" if cli.scenario == "all" else f"{cli.scenario}'s agents"
            lines.append(f"CLI replay           : `{cli.command}` over {over} ({cli.lines:,} lines): "
                         f"exit {cli.returncode}, {cli.alerts} alerts, {cli.score_lines:,} score lines, "
                         f"{cli.seconds:.1f} s; {cli.detail}")
        lines += [
            "",
            "incidents (TTD = anomalous events up to the first detecting alert's last triggering line, "
            "and commit-time seconds from the incident's first anomalous event):",
            *format_incidents(sc),
            "",
            "details:",
            f"  normal traffic: busiest agent-minute {busy_w} writes, most deletes in an agent-minute {busy_d}",
        ]
        if sc.alerts_without_lines:
            lines.append(f"  alerts without a triggering line (counted as false alarms): {sc.alerts_without_lines}")
        if sc.false_alarms_by:
            lines.append("  false alarms by scenario and detector: "
                         + ", ".join(f"{s}/{d} {n}" for (s, d), n in sorted(sc.false_alarms_by.items())))
        lines += shift_report(labels, buf.getvalue().splitlines())
        if cli is not None and cli.summary:
            lines.append(f"  CLI summary: {cli.summary}")
        # More seeds (issue 14: no threshold tuned to one draw): each fleet replayed in process and scored; its
        # start mid-stream too, while its files exist, if asked for.
        runs: list[tuple[int, Score]] = [(int(p_.get("seed", args.seed)), sc)]
        shifts = {runs[0][0]: shift_report(labels, buf.getvalue().splitlines())}
        mid_blocks: dict[int, list[str]] = {}
        for seed in args.more_seeds:
            log(f"seed {seed}: generating, then replaying in process ...")
            other = Path(tempfile.mkdtemp(prefix=f"scenarios-seed{seed}-"))
            try:
                g = generate_to(other, Params(seed=seed, events=args.events, agents=args.agents, days=args.days,
                                              per_kind=args.per_kind), cfg_path)
                other_labels = read_labels(g.labels)
                obuf = io.BytesIO()
                ostats = replay(g.events, cfg, alerts_out=obuf)
                log(f"seed {seed}: {ostats.events_per_second:,.0f} events/s, {ostats.alerts} alerts")
                runs.append((seed, score(other_labels, read_alerts(obuf.getvalue().splitlines()))))
                shifts[seed] = shift_report(other_labels, obuf.getvalue().splitlines())
                if args.start_mid_stream >= 0 and seed in args.mid_stream_seeds:
                    log(f"seed {seed}: a fresh engine from {args.start_mid_stream:g} h on ...")
                    mid_blocks[seed] = mid_stream(other, g.events, other_labels, cfg, args.start_mid_stream)
            finally:
                shutil.rmtree(other, ignore_errors=True)
        if len(runs) > 1:
            lines += ["", *seeds_report(runs)]
            lines += [f"  seed {seed}:{line[1:]}" for seed, block in shifts.items() for line in block]
        if args.start_mid_stream >= 0:
            log(f"replay in process from {args.start_mid_stream:g} h on, on a fresh engine ...")
            lines += ["", *mid_stream(data, events, labels, cfg, args.start_mid_stream)]
            for seed in args.mid_stream_seeds:
                block = mid_blocks.get(seed, [])
                if not block:
                    log(f"seed {seed}: generating, then a fresh engine from {args.start_mid_stream:g} h on ...")
                    other = Path(tempfile.mkdtemp(prefix=f"scenarios-seed{seed}-"))
                    try:
                        g = generate_to(other, Params(seed=seed, events=args.events, agents=args.agents,
                                                      days=args.days, per_kind=args.per_kind), cfg_path)
                        block = mid_stream(other, g.events, read_labels(g.labels), cfg, args.start_mid_stream)
                    finally:
                        shutil.rmtree(other, ignore_errors=True)
                lines += ["", f"seed {seed}: " + block[0], *block[-4:]]
        lines.append(f"  total wall time {time.monotonic() - wall0:.0f} s on {os.cpu_count()} cores"
                     + (f"; data kept in {data}" if tmp is None else ""))
        print("\n".join(lines), flush=True)
        return 0
    finally:
        if tmp is not None:
            if args.keep:
                log(f"work folder kept: {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Labelled scenario benchmark: a synthetic fleet (3 tables, daily seasonality, benign bursts, "
        "new agents and a traffic spike) with injected incidents, run through writeguard replay and scored per "
        "scenario: precision, recall, false alarms per 10,000 normal events, time to detect. Progress on stderr, "
        "the table on stdout.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def fleet_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("--seed", type=int, default=7, help="random seed (7)")
        s.add_argument("--events", type=int, default=300_000, help="normal events, approximately (300,000)")
        s.add_argument("--agents", type=int, default=200,
                       help="established agents (200); new agents (5%%) and first-day rogues come on top")
        s.add_argument("--days", type=float, default=4.0, help="simulated days, at least 3 (4)")
        s.add_argument("--per-kind", type=int, default=3, help="incidents of each kind (3)")

    g = sub.add_parser("generate", help="write events.jsonl, labels.jsonl, incidents.json and the config to DIR",
                       description="Write DIR/events.jsonl (Debezium values), DIR/labels.jsonl (one per line), "
                       "DIR/incidents.json and DIR/writeguard.yaml.")
    g.add_argument("--out", required=True, metavar="DIR")
    fleet_args(g)
    g.add_argument("--config", default=str(DEFAULT_CONFIG), help="config to copy to DIR (benchmarks/scenarios.yaml)")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", help="generate (or read --data), replay in process and by the CLI, score, print",
                       description="Generate the fleet (or read a generated DIR), replay it in process, replay one "
                       "scenario's agents through `python -m stream.cli replay`, measure memory per agent, and "
                       "print the per-scenario table.")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DIR", help="use a folder written by `generate` instead of generating")
    src.add_argument("--out", metavar="DIR", help="generate into DIR and keep it (default: a temporary folder)")
    fleet_args(r)
    r.add_argument("--config", help="writeguard config (default: DIR/writeguard.yaml with --data, else "
                   "benchmarks/scenarios.yaml)")
    r.add_argument("--cli-scenario", default="amount_inflation", choices=[*INCIDENT_KINDS, "all", "none"],
                   help="whose agents the CLI replay covers (amount_inflation); 'all': the whole file")
    r.add_argument("--memory-events", type=int, default=100_000, metavar="N",
                   help="measure bytes per (table, agent) with tracemalloc over a fresh engine fed the first N "
                   "events (100,000; tracing slows replay about 5x); 0: all of them; -1: skip")
    r.add_argument("--keep", action="store_true", help="keep the temporary folder")
    r.add_argument("--start-mid-stream", type=float, metavar="HOURS", default=36.0,
                   help="also start a fresh engine HOURS into the fleet's life (no warm-up history) and report "
                   "its first hour and day: alerts, quarantines of healthy agents, when models leave learning "
                   "(36: Tuesday noon, the fleet in full swing; a negative value skips it)")
    r.add_argument("--more-seeds", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                   metavar="S1,S2", help="also generate, replay and score these seeds' fleets, and print the "
                   "per-scenario table over all the seeds with per-seed recall and issue 14's targets (make quality: "
                   "8,9)")
    r.add_argument("--mid-stream-seeds", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                   metavar="S1,S2", help="also generate these seeds' fleets and report their start mid-stream "
                   "(make quality: 8,9, so that the start-up figures cover three seeds)")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:
        print(f"scenarios: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
