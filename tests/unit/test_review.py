"""The review page's pure parts: undo/series.py (chart points, bounded) and undo/review.py (the HTML)."""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from connectors.messages import Alert, TriggeringEvent
from detectors.spec import FeatureSpec, TableSpec
from stream import cli
from undo.events import TOAST_PLACEHOLDER, RowEvent
from undo.models import Plan, Selection
from undo.plan import plan_undo
from undo.review import chart_svg, render_review, value_html
from undo.scope import build_scope
from undo.series import Point, Series, SeriesCollector, alert_marks, collect, downsample, same_write

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z, µs
S = 1_000_000
REFUNDS = TableSpec(
    name="public.refunds",
    topic="shop.public.refunds",
    features=(FeatureSpec(name="amount", column="amount"), FeatureSpec(name="unit", column="amount", divide_by="n")),
)
NOTES = TableSpec(
    name="public.notes", topic="shop.public.notes", features=(FeatureSpec(name="score", column="meta.score"),)
)
TABLES = [REFUNDS, NOTES]
SCRIPT = "</script><script>alert(1)</script>"
QUOTES = "it's \"quoted\" & <b class='injected'>bold</b> ünïcode"
BIG = "BIG " + "y" * 100_000
HOSTILE_JSON = {"html": '<img src="http://127.0.0.1:9/x" onerror="alert(1)">', "n": [1, None]}


def ev(op, table, key, before, after, at_s, agent=None, run=None, position=""):
    return RowEvent(table, {"id": key}, op, before, after, T0 + int(at_s * S), None, agent, run, position)


def refund(i, amount, reason="late", details=None):
    return {"id": i, "amount": amount, "n": 2, "reason": reason, "details": details}


def story() -> list[RowEvent]:
    """A human's rows, the rogue's normal writes, then its bad ones, then a human's later writes (conflicts)."""
    out = [ev("c", "public.refunds", 900 + i, None, refund(900 + i, 40.0 + i), i) for i in range(4)]
    out += [ev("c", "public.refunds", i, None, refund(i, 20 + i), 10 + i, "rogue", "run-1") for i in range(20)]
    out += [ev("c", "public.refunds", 500, None, refund(500, 55.0), 31, "good", "run-g")]
    for i, reason in enumerate([SCRIPT, QUOTES, BIG, None, HOSTILE_JSON]):
        row = refund(100 + i, 250_000 + i, reason)
        out.append(ev("c", "public.refunds", 100 + i, None, row, 100 + i, "rogue", "run-7"))
    out += [
        ev("u", "public.refunds", 900, refund(900, 40.0), refund(900, 9_999.0, SCRIPT), 110, "rogue", "run-7"),
        ev("u", "public.refunds", 901, refund(901, 41.0), refund(901, 8_888.0, QUOTES), 111, "rogue", "run-7"),
        ev("d", "public.refunds", 902, refund(902, 42.0), None, 112, "rogue", "run-7"),
        ev("c", "public.notes", 1, None, {"id": 1, "body": BIG, "meta": {"score": 99}}, 113, "rogue", "run-7"),
        ev("c", "public.notes", 2, None, {"id": 2, "body": "x", "meta": {"score": "n/a"}}, 114, "rogue", "run-7"),
        # A human afterwards: one rogue insert and one rogue update are conflicts now.
        ev("u", "public.refunds", 101, refund(101, 250_001, QUOTES), refund(101, 1.0), 200),
        ev("u", "public.refunds", 901, refund(901, 8_888.0, QUOTES), refund(901, 41.0), 201),
    ]
    return out


SELECTION = Selection(agents=("rogue",), since=datetime.fromtimestamp((T0 + 100 * S) / 1e6, UTC))


class Doc(HTMLParser):
    """Every element with its attributes, and the page's text as a browser would show it."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.chunks: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs) -> None:
        self.elements.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag

    def handle_data(self, data) -> None:
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def having(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in want.items())]


def page(max_rows: int = 200, marks=()) -> tuple[str, Plan]:
    events = story()
    scope = build_scope(events, SELECTION, TABLES)
    plan = plan_undo(scope, TABLES)
    series = collect(events, SELECTION, TABLES, marks)
    return render_review(scope, plan, series, alert_marks=marks, max_rows=max_rows), plan


def count(html: str, name: str) -> int:
    found = re.findall(rf'<dd data-count="{name}">([\d,]+)</dd>', html)
    assert len(found) == 1, (name, found)
    return int(found[0].replace(",", ""))


# ------------------------------------------------------------------------------------------------ escaping


@pytest.mark.parametrize("value", [SCRIPT, QUOTES, '"><svg onload=alert(1)>', "a\x00b\u2028c", "NULL"])
def test_a_hostile_text_value_is_one_code_element_holding_exactly_that_text(value) -> None:
    doc = Doc(value_html(value))
    assert [t for t, _ in doc.elements] == ["code"]
    assert doc.text == value


def test_null_json_numbers_and_the_toast_placeholder_are_told_apart() -> None:
    assert Doc(value_html(None)).elements == [("span", {"class": "null"})]
    assert Doc(value_html("NULL")).elements == [("code", {"class": "str"})]
    obj = Doc(value_html(HOSTILE_JSON))
    assert obj.elements == [("code", {"class": "json"})] and json.loads(obj.text) == HOSTILE_JSON
    assert Doc(value_html(3.5)).text == "3.5" and Doc(value_html(True)).text == "true"
    toast = Doc(value_html(TOAST_PLACEHOLDER))
    assert toast.elements == [("span", {"class": "absent"})] and TOAST_PLACEHOLDER not in toast.text


def test_a_100_kb_value_is_cut_for_display_and_says_how_much_was_left_out() -> None:
    out = value_html(BIG, chars=100)
    assert len(out) < 300
    assert Doc(out).text == BIG[:100] + f"… +{len(BIG) - 100:,} chars"


# The elements the page is made of: anything else came from the data.
PAGE_TAGS = set(
    "html head meta title style body main header h1 h2 h3 p small code b br span section dl div dt dd table "
    "colgroup col thead tbody tr th td figure figcaption svg rect line text circle details summary pre ul li".split()
)


def test_the_page_holds_no_element_or_attribute_that_came_from_the_data() -> None:
    html, _ = page()
    doc = Doc(html)
    tags = {t for t, _ in doc.elements}
    assert tags <= PAGE_TAGS, tags - PAGE_TAGS
    assert "script" not in tags and "img" not in tags
    # Nothing to load, nothing to run: no source, link or handler attribute anywhere.
    names = {k for _, a in doc.elements for k in a}
    assert not names & {"src", "href", "srcset", "action", "xlink:href"} and not any(n.startswith("on") for n in names)
    assert [a for t, a in doc.elements if t == "b" and a.get("class") == "injected"] == []
    csp = doc.having("meta", http_equiv="Content-Security-Policy")
    assert csp and "default-src 'none'" in str(csp[0]["content"])
    # ... and the values read as written, the big one cut.
    for value in (SCRIPT, QUOTES, HOSTILE_JSON["html"].replace('"', '\\"'), "BIG yyyy"):
        assert value in doc.text, value
    assert BIG not in doc.text and len(html) < 200_000


def test_a_lone_surrogate_in_a_value_does_not_fail_the_page() -> None:
    # JSON may escape one ("\ud800"); orjson refuses it when reading, but a plan file read otherwise may hold it.
    events = [ev("c", "public.refunds", 1, None, refund(1, 5.0), 1, "rogue")]
    scope = build_scope(events, Selection(agents=("rogue",)), TABLES)
    plan = plan_undo(scope, TABLES)
    step = plan.steps[0].model_copy(update={"agent_values": {"reason": "a\ud800b"}})
    html = render_review(scope, plan.model_copy(update={"steps": [step]}), [])
    assert "a?b" in html
    html.encode("utf-8")


# ------------------------------------------------------------------------------------------------ counts


def test_the_pages_counts_and_rows_are_the_plans() -> None:
    html, plan = page()
    doc = Doc(html)
    decisions = {d: sum(1 for s in plan.steps if s.decision == d) for d in ("apply", "conflict", "force", "skip")}
    assert {d: count(html, d) for d in decisions} == decisions
    assert count(html, "steps") == len(plan.steps) == 10
    assert count(html, "conflicts") == sum(1 for s in plan.steps if s.conflict is not None) == 2
    assert count(html, "unchanged") == plan.unchanged_rows
    steps = [a for a in doc.having("tbody") if "data-step" in a]
    assert sorted(int(str(a["data-step"])) for a in steps) == [s.n for s in plan.steps]
    by_n = {s.n: s for s in plan.steps}
    for a in steps:
        s = by_n[int(str(a["data-step"]))]
        assert (a["data-action"], a["data-decision"]) == (s.action, s.decision)
        assert a.get("data-conflict") == (s.conflict.reason if s.conflict else None)
    sections = {a["data-table"]: a for a in doc.having("section", **{"class": "table-rows"})}
    assert {t: (a["data-steps"], a["data-shown"]) for t, a in sections.items()} == {
        "public.refunds": ("8", "8"),
        "public.notes": ("2", "2"),
    }
    assert doc.having("code", id="plan-id")[0]["data-plan-id"] == plan.plan_id


def test_a_big_plan_shows_the_first_rows_per_table_conflicts_first_and_counts_the_rest() -> None:
    html, plan = page(max_rows=3)
    doc = Doc(html)
    refunds = [s for s in plan.steps if s.table == "public.refunds"]
    shown = re.search(r'data-table="public.refunds" data-steps="8" data-shown="3".*?</section>', html, re.S)
    assert shown is not None
    rows = re.findall(r'<tbody class="step( conflict)?" data-step="(\d+)"', shown.group(0))
    conflicts = [s.n for s in refunds if s.conflict is not None]
    assert [int(n) for _, n in rows][:2] == conflicts and len(rows) == 3
    assert doc.having("p", **{"class": "more", "data_more": "5"})
    assert count(html, "steps") == len(plan.steps)  # the totals are the whole plan's


def test_an_update_row_reads_before_then_the_agents_value_then_the_value_after_undo() -> None:
    html, plan = page()
    step = next(s for s in plan.steps if s.key == {"id": 900})
    body = re.search(rf'<tbody class="step" data-step="{step.n}".*?</tbody>', html, re.S)
    assert body is not None
    cells = [Doc(c).text for c in re.findall(r"<td[^>]*>(.*?)</td>", body.group(0), re.S)]
    amount = cells.index("amount")
    assert cells[amount : amount + 4] == ["amount", "40.0", "9999.0", "40.0"]
    reason = cells.index("reason")
    assert cells[reason : reason + 4] == ["reason", "late", SCRIPT, "late"]


# ------------------------------------------------------------------------------------------------ series


def test_the_charts_hold_the_selected_agents_writes_only_marked_selected_inside_the_window() -> None:
    series = {(s.table, s.feature): s for s in collect(story(), SELECTION, TABLES)}
    # A ratio feature has no chart (numeric_columns), a non-numeric value no point.
    assert set(series) == {("public.refunds", "amount"), ("public.notes", "score")}
    amount = series[("public.refunds", "amount")]
    assert amount.total == 20 + 5 + 3 and amount.selected_total == 8 and amount.agents == ["rogue"]
    assert [p.value for p in amount.points if not p.selected] == [20.0 + i for i in range(20)]
    deleted = [p for p in amount.points if p.op == "d"]
    assert [p.value for p in deleted] == [42.0]  # a delete's point is its before image
    assert [p.value for p in series[("public.notes", "score")].points] == [99.0]


def test_a_selection_by_run_charts_the_agents_seen_in_it() -> None:
    series = collect(story(), Selection(runs=("run-7",)), TABLES)
    amount = next(s for s in series if s.feature == "amount")
    assert amount.agents == ["rogue"] and amount.total == 8 and amount.selected_total == 8


def pts(values, selected=lambda i: False, alerted=()):
    return [Point(i, float(v), selected(i), "c", alerted=i in alerted) for i, v in enumerate(values)]


def test_downsample_keeps_the_extremes_of_the_selected_and_the_other_writes_in_commit_order() -> None:
    rng = random.Random(7)
    values = [rng.gauss(50, 5) for _ in range(10_000)]
    values[1234], values[8765], values[9500] = 10_000.0, -10_000.0, 900.0
    points = pts(values, selected=lambda i: i >= 9_000, alerted={4321})
    kept = downsample(points, 100)
    assert len(kept) <= 100
    assert [p.ts_us for p in kept] == sorted(p.ts_us for p in kept)
    assert {p.ts_us for p in kept} >= {1234, 8765, 9500, 4321}
    sel = [p for p in points if p.selected]
    assert max(sel, key=lambda p: p.value) in kept and min(sel, key=lambda p: p.value) in kept
    assert downsample(points[:50], 100) == points[:50]


def test_the_collector_stays_bounded_over_a_long_scan_and_keeps_a_spike() -> None:
    c = SeriesCollector(Selection(agents=("a1",)), [REFUNDS], limit=50)
    spike_at = 77_777
    most = 0
    for i in range(100_000):
        amount = 1e9 if i == spike_at else 10.0 + i % 7
        c.add(ev("c", "public.refunds", i, None, {"id": i, "amount": amount}, i / 10, "a1"))
        most = max(most, len(c._series[("public.refunds", "amount")].points))  # noqa: SLF001
    assert most <= 4 * 50 + 1
    (s,) = c.series()
    assert s.total == 100_000 and len(s.points) <= 50
    assert max(p.value for p in s.points) == 1e9 and min(p.value for p in s.points) == 10.0


def test_alert_marks_match_their_writes_by_file_position_kafka_position_or_commit_time() -> None:
    at = datetime.fromtimestamp((T0 + 7 * S) / 1e6, UTC)
    alert = Alert(
        alert_id="a",
        agent_id="rogue",
        run_id=None,
        table="public.refunds",
        detector="z",
        detector_kind="zscore",
        scope="agent",
        severity="critical",
        score=9.0,
        threshold=4.0,
        summary="s",
        explanation=[],
        commit_ts=at,
        detected_at=at,
        lag_ms=1.0,
        anomalous_events=1,
        agent_events=9,
        actions=["alert"],
        quarantined=False,
        triggering_events=[
            TriggeringEvent(source="/var/data/events.jsonl:12", commit_ts=at, score=9.0),
            TriggeringEvent(topic="shop.public.refunds", partition=2, offset=40, commit_ts=at, score=8.0),
        ],
    )
    by_file, by_kafka = alert_marks(alert)
    assert (by_file.position, by_file.commit_ts_us) == ("/var/data/events.jsonl:12", T0 + 7 * S)
    assert by_kafka.position == "shop.public.refunds/2/40"
    t = T0 + 7 * S
    assert same_write(by_file, "public.refunds", "rogue", t, "./events.jsonl:12")
    assert not same_write(by_file, "public.refunds", "rogue", t, "./events.jsonl:13")
    assert not same_write(by_file, "public.refunds", "other", t, "./events.jsonl:12")
    assert not same_write(by_file, "public.refunds", "rogue", t + 5_000, "./events.jsonl:12")
    assert same_write(by_kafka, "public.refunds", "rogue", t, "shop.public.refunds/2/40")
    assert not same_write(by_kafka, "public.refunds", "rogue", t, "shop.public.refunds/2/41")
    assert same_write(by_kafka, "public.refunds", "rogue", t, "events.jsonl:3")  # not comparable: the time decides


def test_a_chart_has_a_dot_per_point_the_window_and_the_alert_rings() -> None:
    s = Series("public.t", "amount", "amount", pts([1, 5, 3, 9], selected=lambda i: i >= 2, alerted={3}), total=4)
    doc = Doc(chart_svg(s, (2, 3)))
    circles = [a for t, a in doc.elements if t == "circle"]
    assert len(circles) == 4 and doc.having("svg")[0]["data-points"] == "4"
    assert sorted(str(a["class"]) for a in circles) == ["pt", "pt", "pt sel", "pt sel alert"]
    assert len(doc.having("rect", **{"class": "window"})) == 1


# ------------------------------------------------------------------------------------------------ the CLI


CONFIG = """
tables:
  - name: public.refunds
    topic: shop.public.refunds
    key_columns: [id]
    features:
      - {name: amount, column: amount}
"""


def debezium(op, before, after, at_s, tx, agent=None):
    row = after if after is not None else before
    if agent is not None:
        row["agent_id"] = agent
    return {
        "op": op,
        "before": before,
        "after": after,
        "source": {"schema": "public", "table": "refunds", "ts_ms": T0 // 1000 + at_s * 1000, "txId": tx},
    }


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    lines = [debezium("c", None, {"id": i, "amount": 10 + i}, i, i, "rogue") for i in range(1, 6)]
    lines.append(debezium("c", None, {"id": 9, "amount": 500_000}, 20, 20, "rogue"))
    lines.append(debezium("u", {"id": 9, "amount": 500_000}, {"id": 9, "amount": 1}, 30, 30))  # a human: conflict
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    config = tmp_path / "writeguard.yaml"
    config.write_text(CONFIG)
    return events, config


def test_undo_plan_html_writes_the_page_after_the_plan_and_prints_its_path(files, tmp_path, capsys) -> None:
    events, config = files
    at = datetime.fromtimestamp(T0 / 1e6 + 20, UTC)
    alert = Alert(
        alert_id="a",
        agent_id="rogue",
        run_id=None,
        table="public.refunds",
        detector="z",
        detector_kind="zscore",
        scope="agent",
        severity="critical",
        score=9.0,
        threshold=4.0,
        summary="s",
        explanation=[],
        commit_ts=at,
        detected_at=at,
        lag_ms=1.0,
        anomalous_events=1,
        agent_events=6,
        actions=["alert"],
        quarantined=False,
        triggering_events=[TriggeringEvent(source=f"{events}:6", commit_ts=at, score=9.0)],
    )
    alert_file = tmp_path / "alert.json"
    alert_file.write_text(alert.model_dump_json())
    plan_file, html_file = tmp_path / "plan.json", tmp_path / "review.html"
    argv = ["undo", "plan", "--events", str(events), "-c", str(config), "--agent", "rogue", "-o", str(plan_file)]
    assert cli.main([*argv, "--html", str(html_file)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"review page written to {html_file}"
    plan = Plan.model_validate_json(plan_file.read_text())
    html = html_file.read_text(encoding="utf-8")
    assert count(html, "steps") == len(plan.steps) == 6 and count(html, "conflict") == 1
    svg = Doc(html).having("svg")[0]
    assert (svg["data-points"], svg["data-selected"], svg["data-alerted"]) == ("6", "6", "0")
    # With the alert, the selection starts at its write, the others are context, and its write is ringed.
    argv[-4:-2] = ["--alert", str(alert_file)]
    assert cli.main([*argv, "--html", str(html_file)]) == 0
    svg = Doc(html_file.read_text(encoding="utf-8")).having("svg")[0]
    assert (svg["data-points"], svg["data-selected"], svg["data-alerted"]) == ("6", "1", "1")


def test_a_refused_plan_writes_no_page(files, tmp_path, capsys) -> None:
    events, config = files
    html_file = tmp_path / "review.html"
    argv = ["undo", "plan", "--events", str(events), "-c", str(config), "--agent", "rogue", "-o", str(tmp_path / "p")]
    assert cli.main([*argv, "--all-or-nothing", "--html", str(html_file)]) == 1
    assert not html_file.exists() and "review page" not in capsys.readouterr().out
