"""The undo review page (``writeguard undo plan --html``) in a real headless Chromium, driven over DevTools.

A rogue agent's inserts, updates and deletes over two tables, with hostile values (markup, quotes, a 100 KB text,
JSON objects, NULLs), a human who changes two of its rows afterwards (conflicts), and an alert naming two of its
writes. The CLI plans it from a JSONL file of Debezium values and writes the page; Chromium loads the file and the
test reads what the page logged, threw and requested, the counts in its DOM, and a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
import sys
import zlib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from connectors.messages import Alert, TriggeringEvent
from tests.integration.cdp import Chromium, Session, connect
from undo.models import Plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BIG = "BIG-VALUE-START " + "x" * 100_000
SCRIPT = "</script><script>document.title='pwned'</script>"
QUOTES = 'it\'s "quoted" & <b class="injected">bold</b> ünïcode ✓'
IMG = '<img src="http://127.0.0.1:9/x.png" onerror="document.title=1">'

CONFIG = """
tables:
  - name: public.refunds
    topic: shop.public.refunds
    key_columns: [id]
    features:
      - {name: amount, column: amount}
      - {name: items, column: items}
  - name: public.notes
    topic: shop.public.notes
    key_columns: [id]
    features:
      - {name: score, column: meta.score}
worker:
  agent_messages:
    topic: shop.message
"""


def value(op: str, table: str, before: Any, after: Any, at_s: float, tx: int) -> dict[str, Any]:
    return {
        "op": op,
        "before": before,
        "after": after,
        "source": {"schema": "public", "table": table, "ts_ms": T0_MS + int(at_s * 1000), "txId": tx, "lsn": tx},
    }


def message(agent: str, run: str, tx: int, at_s: float) -> dict[str, Any]:
    body = json.dumps({"agent_id": agent, "run_id": run, "version": "2.1"}).encode()
    return {
        "op": "m",
        "source": {"ts_ms": T0_MS + int(at_s * 1000), "txId": tx},
        "message": {"prefix": "writeguard", "content": base64.b64encode(body).decode()},
    }


def refund(i: int, amount: float, items: int = 1, reason: Any = "late", details: Any = None) -> dict[str, Any]:
    return {"id": i, "amount": amount, "items": items, "reason": reason, "details": details}


def note(i: int, body: Any, score: float) -> dict[str, Any]:
    return {"id": i, "body": body, "meta": {"score": score, "html": IMG}}


class Events:
    """A JSONL file of Debezium values, written in commit order; ``line`` remembers where each row went."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.tx = 100

    def write(self, agent: str | None, at_s: float, *rows: tuple[str, str, Any, Any]) -> list[int]:
        """One transaction; the agent (if any) names itself in a logical decoding message. Line numbers of rows."""
        self.tx += 1
        at = []
        for op, table, before, after in rows:
            self.lines.append(value(op, table, before, after, at_s, self.tx))
            at.append(len(self.lines))
        if agent is not None:
            self.lines.append(message(agent, "run-7" if agent == "rogue" else "run-1", self.tx, at_s))
        return at


def build_events() -> tuple[Events, list[tuple[int, float]]]:
    """The story; returns the events and the (line, commit second) of the two writes the alert names."""
    ev = Events()
    for i in range(1, 6):  # a human's rows, before everything
        ev.write(None, i, ("c", "refunds", None, refund(1000 + i, 40.0 + i)))
    ev.write(None, 6, ("c", "notes", None, note(1, "a human's note", 3)))
    for i in range(40):  # the rogue's normal hour: refunds of 20 to 80
        ev.write("rogue", 60 + 60 * i, ("c", "refunds", None, refund(i + 1, 20 + (i * 37) % 60, 1 + i % 3)))
        if i % 4 == 0:
            ev.write("good", 90 + 60 * i, ("c", "refunds", None, refund(500 + i, 55.0)))
    t = 3_000
    flagged = []
    for i in range(12):  # then it goes rogue
        amount = 250_000.5 + 10_000 * i
        reason = [SCRIPT, QUOTES, BIG, None][i % 4]
        details = {"html": IMG, "nested": {"n": [1, 2, None]}} if i % 3 == 0 else None
        lines = ev.write("rogue", t + 5 * i, ("c", "refunds", None, refund(100 + i, amount, 40 + i, reason, details)))
        if i in (0, 5):
            flagged.append((lines[0], t + 5 * i))
    ev.write(
        "rogue",
        t + 70,
        ("u", "refunds", refund(1001, 41.0), refund(1001, 9_999.0, 1, QUOTES)),
        ("u", "refunds", refund(1002, 42.0), refund(1002, 8_888.0, 9, SCRIPT)),
        ("d", "refunds", refund(1003, 43.0), None),
        ("d", "refunds", refund(1004, 44.0), None),
    )
    ev.write(
        "rogue",
        t + 80,
        ("c", "notes", None, note(2, BIG, 99)),
        ("c", "notes", None, note(3, SCRIPT, 98)),
        ("u", "notes", note(1, "a human's note", 3), note(1, QUOTES, 97)),
    )
    # Afterwards a human corrects one of the rogue's refunds and one it updated: two conflicts.
    ev.write(None, t + 200, ("u", "refunds", refund(103, 280_000.5), refund(103, 28.0)))
    ev.write(None, t + 210, ("u", "refunds", refund(1002, 8_888.0, 9, SCRIPT), refund(1002, 42.0)))
    return ev, flagged


def alert_for(events: Path, flagged: list[tuple[int, float]]) -> Alert:
    at = [datetime.fromtimestamp(T0_MS / 1000 + s, UTC) for _, s in flagged]
    return Alert(
        alert_id="alert-1",
        agent_id="rogue",
        run_id="run-7",
        table="public.refunds",
        detector="amount_z",
        detector_kind="zscore",
        scope="agent",
        severity="critical",
        score=42.0,
        threshold=4.0,
        summary="amount 270,000.50 against 20..80",
        explanation=[],
        commit_ts=at[-1],
        detected_at=at[-1],
        lag_ms=3.0,
        triggering_events=[
            TriggeringEvent(source=f"{events}:{line}", commit_ts=t, score=42.0)
            for (line, _), t in zip(flagged, at, strict=True)
        ],
        anomalous_events=2,
        agent_events=52,
        actions=["alert", "quarantine"],
        quarantined=True,
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Plan]:
    tmp = tmp_path_factory.mktemp("review")
    ev, flagged = build_events()
    events = tmp / "events.jsonl"
    events.write_text("\n".join(json.dumps(x) for x in ev.lines) + "\n")
    config = tmp / "writeguard.yaml"
    config.write_text(CONFIG)
    alert = tmp / "alert.json"
    alert.write_text(alert_for(events, flagged).model_dump_json())
    plan_file, html_file = tmp / "plan.json", tmp / "review.html"
    argv = ["undo", "plan", "--events", str(events), "-c", str(config), "--alert", str(alert), "-o", str(plan_file)]
    done = subprocess.run(
        [sys.executable, "-m", "stream.cli", *argv, "--html", str(html_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"review page written to {html_file}" in done.stdout
    return html_file, Plan.model_validate_json(plan_file.read_bytes())


def png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """Width, height, bytes per pixel and the rows of an 8-bit RGB(A), non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + n
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


DOM = """(() => {
  const q = (s) => Array.from(document.querySelectorAll(s));
  const count = (k) => { const e = document.querySelector(`#counts [data-count="${k}"]`); return e && e.textContent; };
  const tables = {};
  for (const sec of q('section.table-rows')) {
    tables[sec.dataset.table] = {
      steps: +sec.dataset.steps, shown: sec.querySelectorAll('tbody.step').length,
      decisions: Array.from(sec.querySelectorAll('tbody.step')).map((t) => t.dataset.decision),
      conflicts: Array.from(sec.querySelectorAll('tbody.step.conflict'))
        .map((t) => [+t.dataset.step, t.dataset.conflict]),
    };
  }
  const charts = q('svg.chart').map((s) => { const r = s.getBoundingClientRect(); return {
    table: s.dataset.table, feature: s.dataset.feature, points: +s.dataset.points,
    circles: s.querySelectorAll('circle.pt').length, selected: s.querySelectorAll('circle.pt.sel').length,
    alerted: s.querySelectorAll('circle.pt.alert').length, window: s.querySelectorAll('rect.window').length,
    width: r.width, height: r.height, top: r.top + window.scrollY, left: r.left }; });
  return {
    title: document.title, planId: document.getElementById('plan-id').dataset.planId,
    counts: Object.fromEntries(
      ['steps', 'apply', 'conflict', 'force', 'skip', 'conflicts', 'unchanged'].map((k) => [k, count(k)])),
    tables, charts,
    scripts: q('script').length, imgs: q('img').length, injected: q('.injected').length,
    nulls: q('tbody.step .null').length,
    text: document.body.innerText,
    hasBig: document.body.textContent.includes('BIG-VALUE-START xxxx'),
    height: document.documentElement.scrollHeight,
  };
})()"""


async def load(html_file: Path, out: Path) -> tuple[dict[str, Any], Session, bytes, bytes]:
    browser = Chromium(out)
    try:
        ws_url = await asyncio.to_thread(browser.ws_url)
        async with aiohttp.ClientSession() as http:
            s = await connect(ws_url, http)
            try:
                await s.open_page()
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await s.send(f"{domain}.enable")
                await s.send("Page.navigate", {"url": html_file.as_uri()})
                await s.wait_event("Page.loadEventFired")
                dom = await s.evaluate(DOM)
                full = await s.send(
                    "Page.captureScreenshot",
                    {
                        "format": "png",
                        "captureBeyondViewport": True,
                        "clip": {"x": 0, "y": 0, "width": 1400, "height": dom["height"], "scale": 1},
                    },
                )
                c = dom["charts"][0]
                clip = {"x": c["left"], "y": c["top"], "width": c["width"], "height": c["height"], "scale": 1}
                chart = await s.send(
                    "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}
                )
            finally:
                await s.close()
        return dom, s, base64.b64decode(full["data"]), base64.b64decode(chart["data"])
    finally:
        browser.stop()


def test_review_page_loads_clean_in_chromium_with_the_plans_counts_and_hostile_values_as_text(page, tmp_path) -> None:
    html_file, plan = page
    # The 100 KB values are cut for display: the page stays small.
    assert html_file.stat().st_size < 400_000, html_file.stat().st_size
    dom, s, full_png, chart_png = asyncio.run(load(html_file, tmp_path))

    # Nothing logged, thrown or fetched: the page has no script and loads nothing but itself.
    assert s.page_events("Runtime.consoleAPICalled") == []
    assert s.page_events("Runtime.exceptionThrown") == []
    logged = [e["params"]["entry"] for e in s.page_events("Log.entryAdded")]
    assert [e for e in logged if e["level"] in ("error", "warning")] == [], logged
    requested = [e["params"]["request"]["url"] for e in s.page_events("Network.requestWillBeSent")]
    assert requested == [html_file.as_uri()]

    # The DOM says what the plan says.
    assert dom["planId"] == plan.plan_id
    decisions = Counter(st.decision for st in plan.steps)
    conflicts = [st for st in plan.steps if st.conflict is not None]
    assert dom["counts"] == {
        "steps": str(len(plan.steps)),
        **{d: str(decisions.get(d, 0)) for d in ("apply", "conflict", "force", "skip")},
        "conflicts": str(len(conflicts)),
        "unchanged": str(plan.unchanged_rows),
    }
    per_table = Counter(st.table for st in plan.steps)
    assert {t: (v["steps"], v["shown"]) for t, v in dom["tables"].items()} == {t: (n, n) for t, n in per_table.items()}
    assert sorted(c for v in dom["tables"].values() for c in v["conflicts"]) == sorted(
        [st.n, st.conflict.reason] for st in conflicts if st.conflict is not None
    )
    # The story's own numbers, so that a planner that lost rows would not pass by agreeing with itself.
    assert per_table == {"public.refunds": 16, "public.notes": 3} and len(conflicts) == 2

    # Hostile values are text: no element came out of them, and they read as written.
    assert dom["scripts"] == 0 and dom["imgs"] == 0 and dom["injected"] == 0
    assert dom["title"].startswith("Undo review") and "pwned" not in dom["title"]
    assert SCRIPT in dom["text"] and QUOTES in dom["text"] and json.dumps(IMG)[1:41] in dom["text"]
    assert dom["hasBig"] and dom["nulls"] > 0

    # One chart per numeric feature; the alert's two writes ringed, the selection window shaded.
    charts = {(c["table"], c["feature"]): c for c in dom["charts"]}
    assert set(charts) == {("public.refunds", "amount"), ("public.refunds", "items"), ("public.notes", "score")}
    amount = charts[("public.refunds", "amount")]
    assert amount["circles"] == amount["points"] == 40 + 12 + 4  # normal hour, rogue inserts, 2 updates 2 deletes
    assert amount["selected"] == 16 and amount["alerted"] == 2 and amount["window"] == 1
    assert amount["width"] > 800 and amount["height"] > 150

    # The screenshot: a PNG of the whole page, and the chart's selected dots are there in their colour.
    shot = tmp_path / "review.png"
    shot.write_bytes(full_png)
    assert full_png[:8] == b"\x89PNG\r\n\x1a\n" and len(full_png) > 50_000
    width, height, bpp, rows = png_pixels(chart_png)
    assert width > 800 and height > 150
    # --sel (#d9480f) at 85 % over the plot's near-white
    orange = sum(
        1 for row in rows for i in range(0, len(row), bpp) if row[i] > 190 and 50 < row[i + 1] < 130 and row[i + 2] < 80
    )
    assert orange > 50, f"no selected-write dots drawn in the chart ({orange} orange pixels); see {shot}"
