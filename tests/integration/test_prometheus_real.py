"""The Grafana dashboard's queries and the alert rules, run by a real Prometheus on a real worker's metrics.

A Prometheus from Debian's package (testbed.prometheus) scrapes a real worker every second and evaluates
deploy/prometheus/writeguard-rules.yml, the file the compose stack and the chart use. A fleet writes, one agent
goes rogue (quarantined; its pause webhook cannot be reached, so the enforcement fails), a poison record and a
tombstone arrive. Then every target of deploy/grafana/writeguard.json runs through the HTTP API as Grafana runs it
(``/api/v1/query_range``, ``$__rate_interval``, ``$__interval`` and ``$job`` substituted), and every rule's
expression through ``/api/v1/query``; each must return the series it should, with the values the worker's own
/metrics and the alert topic imply. A query that returns nothing fails with the query named. Last, the worker stops
and the `up` rule must see it.

Every commit is at least 90 s old when it is written (the rogue's 100 s): the lag rules' thresholds are crossed
for real (pending: they need 10 minutes), while the consumer-lag one (10,000 records behind) is not.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.metrics import LAG_BUCKETS
from testbed.broker import LocalKafka
from testbed.fleet import ORDERS, REFUNDS, Fleet, Record
from testbed.prometheus import LocalPrometheus, Series
from tests.integration.conftest import Out, Worker, produce, read_topic, start_worker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "writeguard-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "writeguard.json"
TIMEOUT_S = 120.0  # generous: 2 busy cores, shared with other test runs
SCRAPE_S = 1.0
NORMAL_EVENTS = 3_000
ROGUE_WRITES = 80
ROGUE_AGE_S = 100.0  # the rogue's commits are this old when it writes: detection lag ~100 s, in the 60-300 s bucket
JOB = "writeguard"  # the rules' `up{job="writeguard"}`; the chart renders its own Service name there


def grafana_intervals(step_s: float, scrape_s: float) -> dict[str, str]:
    """What Grafana puts for ``$__interval`` and ``$__rate_interval`` (max(interval + scrape, 4 x scrape)).

    >>> grafana_intervals(1, 1)
    {'$__rate_interval': '4s', '$__interval': '1s'}
    """
    rate = max(step_s + scrape_s, 4 * scrape_s)
    return {"$__rate_interval": f"{rate:g}s", "$__interval": f"{step_s:g}s"}


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables in a target, longest name first (``$__rate_interval`` before ``$__interval``)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    left = re.findall(r"\$\{?\w+", expr)
    assert not left, f"unsubstituted variables {left} in {expr}"
    return expr


def wait_until(what: str, probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = TIMEOUT_S) -> Any:
    """Poll ``probe()`` until ``ok`` holds; on timeout fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if ok(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f} s; last seen: {seen!r}")
        time.sleep(0.25)


def quantile_of_one(q: float, value: float) -> float:
    """histogram_quantile(q) over buckets holding one observation: linear within its LAG_BUCKETS bucket."""
    upper = next(b for b in LAG_BUCKETS if value <= b)
    lower = max([0.0, *(b for b in LAG_BUCKETS if b < upper)])
    return lower + (upper - lower) * q


@pytest.fixture(scope="module")
def unreachable_webhook() -> Iterator[str]:
    """A URL whose port is bound and never listened on: every connection is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/agents/pause"


@pytest.fixture(scope="module")
def worker(kafka: LocalKafka, unreachable_webhook: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    def edit(data: dict[str, Any]) -> None:
        data["enforcement"] = {"webhook": {"url": unreachable_webhook, "secret": "not-a-secret", "retries": 0}}
        for t in data["tables"]:
            t["actions"] = {"info": ["alert"], "warning": ["alert"], "critical": ["alert", "quarantine", "webhook"]}

    w = start_worker(kafka, Path(tmp_path_factory.mktemp("prom-worker")), edit=edit)
    try:
        yield w
    finally:
        w.process.stop()


@pytest.fixture(scope="module")
def prom(worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrometheus]:
    p = LocalPrometheus(
        [f"127.0.0.1:{worker.process.metrics_port}"],
        [RULES],
        job=JOB,
        interval_s=SCRAPE_S,
        workdir=Path(tmp_path_factory.mktemp("prometheus")),
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()


@dataclass
class Run:
    """What the module's run wrote and what the worker made of it, read from its /metrics when all was scored."""

    worker: Worker
    fleet: Fleet
    start: float  # unix time before the first write
    records: list[Record] = field(default_factory=list)
    alert: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def send(self, recs: list[Record]) -> None:
        self.records += recs
        produce(self.worker.bootstrap, recs)

    def wait_scored(self) -> None:
        want = len(self.records)
        got = self.worker.wait_for("writeguard_events_total", want, timeout=TIMEOUT_S)
        assert got == want, f"the worker scored {got} events, {want} were sent"

    def table_of(self, r: Record) -> str:
        return {self.worker.topic(t): t for t in (REFUNDS, ORDERS)}[r.topic]

    def table_ops(self) -> set[tuple[str, str]]:
        return {(self.table_of(r), r.op) for r in self.records}

    def models_by_table(self) -> dict[tuple[str, ...], float]:
        counts = Counter(table for table, _ in {(self.table_of(r), r.agent_id) for r in self.records})
        return {(t,): float(n) for t, n in counts.items()}

    def labelled(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        """The worker's samples of one metric by the values of ``labels``; a counter's only where it moved."""
        out: dict[tuple[str, ...], float] = {}
        for key, value in self.metrics.items():
            if key.startswith(name + "{"):
                pairs = dict(re.findall(r'(\w+)="([^"]*)"', key))
                k = tuple(pairs.get(n, "") for n in labels)
                out[k] = out.get(k, 0.0) + value
        if not name.endswith("_total"):
            return out
        return {k: v for k, v in out.items() if v != 0}  # the label sets that moved (the others are primed at 0)

    def total(self, name: str) -> float:
        return sum(v for k, v in self.metrics.items() if k == name or k.startswith(name + "{"))


@pytest.fixture(scope="module")
def run(worker: Worker, prom: LocalPrometheus) -> Run:
    wait_until(
        "Prometheus scrapes the worker", lambda: prom.query(f'up{{job="{JOB}"}}'), lambda s: s and s[0].last == 1
    )
    r = Run(worker, Fleet(n_agents=12, seed=5, prefix=worker.prefix), start=time.time())
    now_us = time.time_ns() // 1000
    r.send(list(r.fleet.stream(NORMAL_EVENTS, now_us - 200_000_000)))
    r.wait_scored()
    assert worker.total("writeguard_alerts_total") == 0, "the normal fleet raised an alert: the run is not as planned"

    rogue = next(a for a in r.fleet.agents if a.table == REFUNDS)
    rogue.rogue = "inflate"
    rogue_start = time.time_ns() // 1000 - int(ROGUE_AGE_S * 1e6)
    r.send([r.fleet.write(rogue, rogue_start + i * 20_000) for i in range(ROGUE_WRITES)])
    worker.wait_for("writeguard_alerts_total", 1, timeout=TIMEOUT_S)
    r.wait_scored()

    # One undecodable record (a dead letter) and one tombstone (skipped input), then normal writes again.
    normal = next(a for a in r.fleet.agents if a.table == REFUNDS and a.rogue is None)
    topic = worker.topic(REFUNDS)
    odd: list[Record | Out] = [(topic, None, b"k", b"{not json"), (topic, None, b"k", None)]
    good = [r.fleet.write(normal, time.time_ns() // 1000 - 90_000_000 + i) for i in range(20)]
    produce(worker.bootstrap, [*odd, *good])
    r.records += good
    r.wait_scored()
    worker.wait_for("writeguard_dead_letters_total", 1, timeout=TIMEOUT_S)
    worker.wait_for("writeguard_skipped_events_total", 1, timeout=TIMEOUT_S)
    worker.wait_for("writeguard_enforcement_actions_total", 1, timeout=TIMEOUT_S)  # the webhook's failure
    wait_until(  # the model-set gauge refreshes on a timer
        "writeguard_active_models",
        lambda: worker.total("writeguard_active_models"),
        lambda n: n == sum(r.models_by_table().values()),
    )
    wait_until(  # and so does consumer lag, once the worker has fetched from each partition
        "writeguard_consumer_lag_messages",
        lambda: {k for k in worker.metrics() if k.startswith("writeguard_consumer_lag_messages{")},
        lambda keys: (
            {worker.topic(REFUNDS), worker.topic(ORDERS)} <= {k.split('topic="')[1].split('"')[0] for k in keys}
        ),
    )
    published = read_topic(worker.bootstrap, worker.config.topics.alerts, expect=1)
    alerts = [json.loads(v) for _, v, _, _ in published if v is not None]
    assert [a["agent_id"] for a in alerts] == [rogue.agent_id], [a["summary"] for a in alerts]
    r.alert = alerts[0]
    r.metrics = worker.metrics()

    # Prometheus has scraped the final state when its sums are the worker's.
    def prometheus_sums() -> dict[str, float]:
        return {
            name: sum(s.last for s in prom.query(f"sum({name})"))
            for name in (
                "writeguard_events_total",
                "writeguard_alerts_total",
                "writeguard_dead_letters_total",
                "writeguard_skipped_events_total",
                "writeguard_enforcement_actions_total",
                "writeguard_quarantined_agent_events_total",
                "writeguard_quarantined_agents",
                "writeguard_active_models",
            )
        }

    wanted = {name: r.total(name) for name in prometheus_sums()}
    wait_until("Prometheus' samples are the worker's", prometheus_sums, lambda seen: seen == wanted)
    return r


# -- the dashboard ----------------------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panel_targets() -> list[tuple[str, str]]:
    """(name, expr) of every panel target; name: 'type: title / refId'."""
    return [
        (f"{p['type']}: {p['title']} / {t['refId']}", t["expr"])
        for p in dashboard()["panels"]
        for t in p.get("targets", [])
    ]


Check = Callable[[list[Series], Run], None]


def _counter(query: str) -> bool:
    # Counters and histograms are the metrics primed at 0; a gauge at 0 (no consumer lag) is a value.
    return "_total" in query or "_bucket" in query


def moved(result: list[Series]) -> list[Series]:
    """The series that ever held a value other than 0: the worker creates every label set its config can produce
    at 0 when it starts (stream/metrics.py Metrics.prime), and those that never moved say nothing here. When all
    are still, all are kept (a gauge that stays 0, the consumer lag)."""
    live = [s for s in result if any(v != 0 for v in s.finite)]
    return live or result


def one(result: list[Series]) -> Series:
    assert len(result) == 1, f"one series expected, got {[s.labels for s in result]}"
    return result[0]


def by(result: list[Series], *labels: str) -> dict[tuple[str, ...], Series]:
    out = {s.key(*labels): s for s in result}
    assert len(out) == len(result), f"series not told apart by {labels}: {[s.labels for s in result]}"
    return out


def peak(s: Series) -> float:
    assert s.finite, f"{s.labels}: no value is a number: {s.points[:5]}..."
    return max(s.finite)


def last_is(value: Callable[[Run], float]) -> Check:
    def check(result: list[Series], run: Run) -> None:
        s = one(result)
        assert s.last == pytest.approx(value(run)), s.points[-5:]

    return check


def counts_from_zero(value: Callable[[Run], float]) -> Check:
    """A stat over a window: 0 before anything happened (``or vector(0)``), the exact count at the end."""

    def check(result: list[Series], run: Run) -> None:
        s = one(result)
        assert s.points[0][1] == 0, s.points[:5]
        assert s.last == value(run), s.points[-5:]

    return check


def rises(result: list[Series], run: Run) -> None:
    assert peak(one(result)) > 0


def numbers(result: list[Series], run: Run) -> None:
    s = one(result)
    assert s.finite and all(v >= 0 for v in s.finite), s.points[-5:]


def gauge(name: str) -> Check:
    """The last value is the worker's when the run ended (and, should they differ, says what the worker has now)."""

    def check(result: list[Series], run: Run) -> None:
        s = one(result)
        now = {k: v for k, v in run.worker.metrics().items() if k.startswith(name)}
        assert s.last == run.total(name), f"{s.points[-5:]}; the worker's {name} now: {now}"

    return check


def counted_by(metric: str, *labels: str) -> Check:
    """A per-interval count panel: one series per label set the worker has, each peaking at 1 up to its total."""

    def check(result: list[Series], run: Run) -> None:
        want = run.labelled(metric, *labels)
        got = by(result, *labels)
        assert set(got) == set(want), f"series {sorted(got)}, the worker has {sorted(want)}"
        for key, s in got.items():
            # increase() extrapolates to its window's edges: with 4 s windows over 1 s scrapes, by up to 4/3.
            assert 1 <= peak(s) <= want[key] * 4 / 3, (key, peak(s), want[key])

    return check


def lag_quantile(q: float, *labels: str) -> Check:
    """Detection lag over 30 minutes holding the one alert: its bucket's interpolation, at the end of the run."""

    def check(result: list[Series], run: Run) -> None:
        s = one(result)
        assert s.key(*labels) == tuple(run.alert[n] for n in labels), s.labels
        assert math.isfinite(s.last), f"p{q * 100:g} is {s.last} at the end"
        assert s.last == pytest.approx(quantile_of_one(q, run.alert["lag_ms"] / 1000)), (s.last, run.alert["lag_ms"])

    return check


def processing_lag(result: list[Series], run: Run) -> None:
    # Every event was committed at least 90 s before it was written, so before it was scored.
    assert min(one(result).finite or [math.nan]) > 60, one(result).points[-10:]


def events_by_table(result: list[Series], run: Run) -> None:
    got = by(result, "table", "op")
    assert set(got) == run.table_ops(), f"series {sorted(got)}, written {sorted(run.table_ops())}"
    for table in (REFUNDS, ORDERS):
        assert max(peak(s) for (t, _), s in got.items() if t == table) > 0, table


def models_by_table(result: list[Series], run: Run) -> None:
    got = {k: s.last for k, s in by(result, "table").items()}
    assert got == run.models_by_table()


def consumer_lag_by_topic(result: list[Series], run: Run) -> None:
    got = by(result, "topic")
    assert set(got) == set(run.labelled("writeguard_consumer_lag_messages", "topic")), sorted(got)
    assert {(run.worker.topic(REFUNDS),), (run.worker.topic(ORDERS),)} <= set(got), sorted(got)
    for key, s in got.items():
        assert s.finite and all(v >= 0 for v in s.finite), (key, s.points[-5:])


def quarantined_over_time(result: list[Series], run: Run) -> None:
    s = one(result)
    assert s.points[0][1] == 0 and s.last == 1, (s.points[:3], s.points[-3:])


PANELS: dict[str, Check] = {
    "stat: Quarantined agents / A": last_is(lambda run: 1),
    "stat: Alerts (1h) / A": counts_from_zero(lambda run: run.total("writeguard_alerts_total")),
    "stat: Events scored /s / A": rises,
    "stat: Dead letters (1h) / A": counts_from_zero(lambda run: 1),
    "stat: Consumer lag / A": numbers,
    "stat: Agent model sets in memory / A": gauge("writeguard_active_models"),
    "timeseries: Events per table / A": events_by_table,
    "timeseries: Skipped input / A": counted_by("writeguard_skipped_events_total", "reason"),
    "timeseries: Alerts by detector and severity / A": counted_by("writeguard_alerts_total", "detector", "severity"),
    "timeseries: Alerts by table / A": counted_by("writeguard_alerts_total", "table"),
    "timeseries: Detection lag (commit -> alert published) / A": lag_quantile(0.5),
    "timeseries: Detection lag (commit -> alert published) / B": lag_quantile(0.9),
    "timeseries: Detection lag (commit -> alert published) / C": lag_quantile(0.99),
    "timeseries: Processing lag (commit -> scored, 1 event in 16) / A": processing_lag,
    "timeseries: Processing lag (commit -> scored, 1 event in 16) / B": processing_lag,
    "timeseries: Detection lag p99 by table / A": lag_quantile(0.99, "table"),
    "timeseries: Agent model sets by table / A": models_by_table,
    "timeseries: Quarantined agents / A": quarantined_over_time,
    "timeseries: Quarantined agents / B": counted_by("writeguard_quarantines_total", "table"),
    "timeseries: Writes by quarantined agents (blast radius) / A": counted_by(
        "writeguard_quarantined_agent_events_total", "table"
    ),
    "timeseries: Enforcement actions / A": counted_by("writeguard_enforcement_actions_total", "action", "outcome"),
    "timeseries: Dead letters by reason / A": counted_by("writeguard_dead_letters_total", "reason"),
    "timeseries: Consumer lag by topic / A": consumer_lag_by_topic,
    "timeseries: Suppressed findings and evicted model sets (since start) / A": gauge("writeguard_suppressed_findings"),
    "timeseries: Suppressed findings and evicted model sets (since start) / B": gauge("writeguard_evicted_models"),
}


def test_prometheus_scrapes_the_worker_and_loads_every_rule(prom: LocalPrometheus, run: Run) -> None:
    targets = prom.targets()
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [(JOB, "up")], targets
    rules = prom.rules()
    names = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert [r["name"] for r in rules] == names
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules] == [(n, "ok", "") for n in names]


def test_every_dashboard_target_has_an_expectation_here() -> None:
    names = [name for name, _ in panel_targets()]
    assert len(names) == len(set(names)), names
    assert set(names) == set(PANELS), (
        f"without expectations: {set(names) - set(PANELS)}; stale: {set(PANELS) - set(names)}"
    )


def test_the_job_variable_lists_the_worker(prom: LocalPrometheus, run: Run) -> None:
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "job"]
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
    assert match, variable["query"]
    metric, label = match.groups()
    assert prom.label_values(label, metric) == [JOB]


@pytest.mark.parametrize("name, expr", panel_targets(), ids=[name for name, _ in panel_targets()])
def test_dashboard_target_returns_its_series(prom: LocalPrometheus, run: Run, name: str, expr: str) -> None:
    step = SCRAPE_S
    query = substitute(expr, {**grafana_intervals(step, SCRAPE_S), "$job": JOB})
    # A time-series panel is a range query; a stat panel too (it draws a sparkline and shows the last value).
    # Prometheus holds what it last scraped: a gauge the worker refreshes on a timer (model sets, consumer lag)
    # may read its value of a moment ago, after a rebalance say. The panel must show the worker's state within
    # a few scrapes and timer ticks, not at once.
    deadline = time.monotonic() + 15
    while True:
        try:
            result = prom.query_range(query, run.start, time.time(), step)
            assert result, f"the query returned no series: {query}"
            assert prom.query(query), f"the instant query returned no series: {query}"
            PANELS[name](moved(result) if _counter(query) else result, run)
            return
        except AssertionError as e:
            if time.monotonic() < deadline:
                time.sleep(step)
                continue
            raise AssertionError(f"{name}: {query}\n{e}\n{group_history(run.worker)}") from None


def group_history(worker: Worker) -> str:
    """The worker's consumer-group events, to tell a rebalance during the run from a wrong panel."""
    n = worker.total("writeguard_rebalances_total")  # over both groups
    lines = [ln for ln in worker.process.log_tail(200_000).splitlines() if re.search(r"generation|[Rr]evok", ln)]
    return f"partition assignments: {n:g}\n" + "\n".join(lines[-20:])


# -- the alert rules --------------------------------------------------------------------------------------------------


def rule_exprs() -> list[tuple[str, str]]:
    return [(r["alert"], str(r["expr"])) for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def left_side(expr: str) -> str:
    """The expression before its final comparison with a number: what the threshold is compared with.

    >>> left_side('sum by (topic) (x) > 10000')
    'sum by (topic) (x)'
    """
    match = re.fullmatch(r"(.*\S)\s+(?:>|==)\s+[0-9.]+", expr.strip(), re.DOTALL)
    assert match, expr
    return match.group(1)


@dataclass(frozen=True)
class RuleWant:
    """What a rule's expression returns at the end of the run; with ``left``, nothing (the run does not cross the
    threshold) while the left side of its comparison returns what ``left`` checks."""

    check: Check
    left: Check | None = None


def returns(*keys: tuple[str, ...], labels: tuple[str, ...] = (), value: Callable[[Run], float] | None = None) -> Check:
    def check(result: list[Series], run: Run) -> None:
        got = by(result, *labels)
        assert set(got) == set(keys), f"series {[s.labels for s in result]}, expected {labels}={keys}"
        if value is not None:
            assert one(result).last == pytest.approx(value(run)), one(result).last

    return check


def no_series(result: list[Series], run: Run) -> None:
    assert result == [], f"returned {[s.labels for s in result]}"


def up_is_one(result: list[Series], run: Run) -> None:
    assert [(s.labels.get("job"), s.last) for s in result] == [(JOB, 1.0)], result


def lag_by_topic(result: list[Series], run: Run) -> None:
    got = by(result, "topic")
    assert {(run.worker.topic(REFUNDS),), (run.worker.topic(ORDERS),)} <= set(got), sorted(got)
    assert all(math.isfinite(s.last) and 0 <= s.last < 10_000 for s in result), result


RULES_WANT: dict[str, RuleWant] = {
    "WriteguardDown": RuleWant(no_series, left=up_is_one),  # and test_worker_down_is_seen_... below
    "WriteguardAgentQuarantined": RuleWant(returns((), value=lambda run: 1)),
    "WriteguardDetectionLagHigh": RuleWant(
        returns((REFUNDS,), labels=("table",), value=lambda run: quantile_of_one(0.99, run.alert["lag_ms"] / 1000))
    ),
    "WriteguardProcessingLagHigh": RuleWant(returns(())),
    "WriteguardConsumerLagHigh": RuleWant(no_series, left=lag_by_topic),
    "WriteguardDeadLetters": RuleWant(returns(("invalid_json",), labels=("reason",))),
    "WriteguardEnforcementFailed": RuleWant(returns(("webhook",), labels=("action",))),
}
# What the run leaves active: no `for` fires at once; `for: 10m` stays pending for the length of this test.
ACTIVE = {
    "WriteguardAgentQuarantined": "firing",
    "WriteguardDeadLetters": "firing",
    "WriteguardEnforcementFailed": "firing",
    "WriteguardDetectionLagHigh": "pending",
    "WriteguardProcessingLagHigh": "pending",
}


def test_every_rule_has_an_expectation_here() -> None:
    assert [n for n, _ in rule_exprs()] == list(RULES_WANT)


@pytest.mark.parametrize("alert, expr", rule_exprs(), ids=[n for n, _ in rule_exprs()])
def test_rule_expression_returns_its_series(prom: LocalPrometheus, run: Run, alert: str, expr: str) -> None:
    want = RULES_WANT[alert]
    result = prom.query(expr)
    if want.left is None:
        assert result, f"{alert}: the rule's expression returned no series: {expr}"
    try:
        want.check(moved(result) if _counter(expr) else result, run)
    except AssertionError as e:
        raise AssertionError(f"{alert}: {expr}\n{e}") from None
    if want.left is not None:
        lhs = left_side(expr)
        lhs_result = prom.query(lhs)
        assert lhs_result, f"{alert}: the left side of the rule's comparison returned no series: {lhs}"
        try:
            want.left(lhs_result, run)
        except AssertionError as e:
            raise AssertionError(f"{alert}: {lhs}\n{e}") from None


def test_the_alerts_the_run_causes_are_pending_or_firing(prom: LocalPrometheus, run: Run) -> None:
    def states() -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in prom.alerts()}

    wait_until("active alerts", states, lambda seen: seen == ACTIVE)
    quarantined = next(a for a in prom.alerts() if a["labels"]["alertname"] == "WriteguardAgentQuarantined")
    assert quarantined["annotations"]["summary"] == "1 agent(s) quarantined by writeguard"
    (dead,) = [a for a in prom.alerts() if a["labels"]["alertname"] == "WriteguardDeadLetters"]
    assert dead["labels"]["reason"] == "invalid_json" and "(invalid_json)" in dead["annotations"]["summary"], dead


def test_worker_down_is_seen_when_the_worker_stops(prom: LocalPrometheus, worker: Worker, run: Run) -> None:
    (expr,) = [e for n, e in rule_exprs() if n == "WriteguardDown"]
    worker.process.stop()
    result = wait_until(f"WriteguardDown: {expr}", lambda: prom.query(expr), bool)
    assert [(s.labels["job"], s.labels["instance"], s.last) for s in result] == [
        (JOB, f"127.0.0.1:{worker.process.metrics_port}", 0.0)
    ]
    wait_until(
        "WriteguardDown pending",
        lambda: {a["labels"]["alertname"]: a["state"] for a in prom.alerts()}.get("WriteguardDown"),
        lambda state: state == "pending",
    )
