"""``render_review``: the undo review page, one self-contained HTML file for the person who approves an undo.

No network and no script: inline CSS, inline SVG charts, and a Content-Security-Policy that forbids loading or
running anything, so that a value which slipped through would still do nothing. Every value from the data (row
values, keys, run metadata, table and column names, positions) is untrusted: it goes through :func:`esc`, and a
long one is cut to ``value_chars`` for display (the plan file holds it whole). Elements carry stable ids and
``data-*`` attributes (``data-count="steps"``, ``tbody.step[data-decision]``, ``svg.chart[data-points]``) for
tests and tools.

>>> from undo.models import Selection
>>> from undo.plan import plan_undo
>>> from undo.scope import build_scope
>>> page = render_review(build_scope([], Selection(agents=("<a1>",)), []), plan_undo(build_scope([],
...     Selection(agents=("<a1>",)), []), []), [])
>>> '<dd data-count="steps">0</dd>' in page, "&lt;a1&gt;" in page, "<a1>" in page
(True, True, False)
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import JsonValue

from undo.events import canonical_key, is_placeholder
from undo.models import Decision, Plan, Row, RowScope, Scope, Step
from undo.scope import summary_lines, ts, writer_name
from undo.series import AlertMark, Point, Series

DEFAULT_ROWS = 100  # steps shown per table; the rest are counted, and `writeguard undo show` lists them all
DEFAULT_VALUE_CHARS = 160  # of one value, as shown: a 100 KB text would drown the page
DECISIONS: tuple[Decision, ...] = ("apply", "conflict", "force", "skip")
# Nothing may load or run: styles are inline, images inline SVG. A value that escaped escaping still does nothing.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'; base-uri 'none'"

_W, _H = 960, 240  # chart viewBox
_ML, _MR, _MT, _MB = 84, 16, 14, 34  # its margins: y labels left, time labels below


def esc(value: object) -> str:
    """Text safe in HTML and SVG content and in quoted attributes.

    >>> esc('</script><b title="x">\\'&')
    '&lt;/script&gt;&lt;b title=&quot;x&quot;&gt;&#x27;&amp;'
    """
    return html.escape(str(value), quote=True)


def clip(text: str, chars: int) -> tuple[str, int]:
    """The first ``chars`` characters of ``text``, and how many were left out.

    >>> clip("abcdef", 4), clip("ab", 4)
    (('abcd', 2), ('ab', 0))
    """
    return (text, 0) if len(text) <= chars else (text[:chars], len(text) - chars)


def value_html(v: JsonValue, chars: int = DEFAULT_VALUE_CHARS) -> str:
    """One column value: NULL, the TOAST placeholder and JSON are told apart from text that looks like them.

    >>> value_html(None), value_html("NULL")
    ('<span class="null">NULL</span>', '<code class="str">NULL</code>')
    >>> value_html({"a": "<b>"})
    '<code class="json">{&quot;a&quot;: &quot;&lt;b&gt;&quot;}</code>'
    >>> value_html("x" * 10, chars=4)
    '<code class="str">xxxx</code><span class="cut">… +6 chars</span>'
    """
    if v is None:
        return '<span class="null">NULL</span>'
    if is_placeholder(v):
        return '<span class="absent">unavailable (unchanged TOAST value)</span>'
    if isinstance(v, bool):
        text, kind = ("true" if v else "false"), "bool"
    elif isinstance(v, int | float):
        text, kind = repr(v), "num"
    elif isinstance(v, str):
        text, kind = v, "str"
    else:
        text, kind = json.dumps(v, ensure_ascii=False, sort_keys=False), "json"
    shown, cut = clip(text, chars)
    out = f'<code class="{kind}">{esc(shown)}</code>'
    return out + (f'<span class="cut">… +{cut:,} chars</span>' if cut else "")


def absent(text: str) -> str:
    return f'<span class="absent">{esc(text)}</span>'


def num(v: float) -> str:
    """A value in the column's units, readable at any size.

    >>> num(250000.5), num(0.00012), num(3e15), num(0.0)
    ('250,000.50', '0.00012', '3e+15', '0.00')
    """
    if v != 0 and (abs(v) >= 1e12 or abs(v) < 0.01):
        return f"{v:.3g}"
    return f"{v:,.2f}"


def when(t: datetime | None) -> str:
    if t is None:
        return "-"
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _us(t: datetime) -> int:
    return int(t.timestamp()) * 1_000_000 + t.microsecond


# ---------------------------------------------------------------------------------------------------- the chart


def nice_step(span: float, n: int = 5) -> float:
    """An axis step of 1, 2 or 5 times a power of ten that cuts ``span`` into about ``n`` parts.

    >>> nice_step(100), nice_step(10, 3), nice_step(0.07)
    (20.0, 5.0, 0.02)
    """
    raw = span / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(round(m * mag, 12) for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round values between ``lo`` and ``hi`` (about ``n``) for an axis.

    >>> nice_ticks(0, 100), nice_ticks(-3, 7, 3)
    ([0.0, 20.0, 40.0, 60.0, 80.0, 100.0], [0.0, 5.0])
    """
    span = hi - lo
    if not span > 0 or not math.isfinite(span):
        return [lo]
    step = nice_step(span, n)
    first = math.ceil(lo / step) * step
    return [float(round(first + i * step, 12)) for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_label(v: float, step: float) -> str:
    """An axis value with as many decimals as its step needs.

    >>> tick_label(300000.0, 100000.0), tick_label(0.25, 0.05), tick_label(3e15, 1e15)
    ('300,000', '0.25', '3e+15')
    """
    if abs(v) >= 1e12:
        return f"{v:.3g}"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    return f"{v:,.{decimals}f}"


# Time axis steps, in seconds: the first that cuts the span into at most n parts is taken.
_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def time_ticks(x0_us: float, x1_us: float, n: int = 6) -> list[tuple[int, str]]:
    """Round commit times between ``x0_us`` and ``x1_us`` (UTC), at most about ``n``, and their labels.

    >>> time_ticks(60e6, 3_200e6)
    [(600000000, '00:10'), (1200000000, '00:20'), (1800000000, '00:30'), (2400000000, '00:40'), (3000000000, '00:50')]
    """
    span_s = max((x1_us - x0_us) / 1e6, 1e-6)
    step = next((st for st in _TIME_STEPS if span_s / st <= n), None)
    if step is None:  # days: a whole number of them
        step = 86400 * math.ceil(span_s / n / 86400)
    fmt = "%H:%M:%S" if step < 60 else ("%H:%M" if step < 86400 else "%Y-%m-%d")
    first = math.ceil(x0_us / 1e6 / step) * step
    out = []
    t = first
    while t * 1e6 <= x1_us:
        out.append((int(t * 1_000_000), ts(int(t * 1_000_000)).strftime(fmt)))
        t += step
    return out


def _domain(lo: float, hi: float, pad: float, flat: float | None = None) -> tuple[float, float]:
    """``lo`` .. ``hi`` widened by ``pad`` of the span; a single value by ``flat`` (default: a tenth of it)."""
    if hi > lo:
        d = (hi - lo) * pad
        return lo - d, hi + d
    d = flat if flat is not None else (abs(lo) * 0.1 or 1.0)
    return lo - d, hi + d


def chart_svg(s: Series, window: tuple[int, int] | None) -> str:
    """One inline SVG: the selection window shaded, every write a dot, the selected ones coloured, alerts ringed."""
    pts = s.points
    xs = [p.ts_us for p in pts] + (list(window) if window else [])
    x0, x1 = _domain(float(min(xs)), float(max(xs)), 0.02, flat=30e6)  # one commit: a minute around it
    y0, y1 = _domain(min(p.value for p in pts), max(p.value for p in pts), 0.08)
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def x(us: float) -> float:
        return _ML + (us - x0) / (x1 - x0) * pw

    def y(v: float) -> float:
        return _MT + (1 - (v - y0) / (y1 - y0)) * ph

    alerted = sum(1 for p in pts if p.alerted)
    selected = sum(1 for p in pts if p.selected)
    out = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" data-table="{esc(s.table)}" '
        f'data-feature="{esc(s.feature)}" data-points="{len(pts)}" data-selected="{selected}" '
        f'data-alerted="{alerted}" data-total="{s.total}">',
        f"<title>{esc(s.table)} {esc(s.feature)} over commit time</title>",
        f'<rect class="plot" x="{_ML}" y="{_MT}" width="{pw}" height="{ph}"/>',
    ]
    if window:
        a, b = x(window[0]), x(window[1])
        out.append(
            f'<rect class="window" x="{a:.1f}" y="{_MT}" width="{max(b - a, 2):.1f}" height="{ph}">'
            f"<title>selection: {esc(when(ts(window[0])))} .. {esc(when(ts(window[1])))}</title></rect>"
        )
    step = nice_step(y1 - y0)
    for v in nice_ticks(y0, y1):
        out.append(f'<line class="grid" x1="{_ML}" x2="{_W - _MR}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        out.append(f'<text class="ylab" x="{_ML - 6}" y="{y(v) + 4:.1f}">{esc(tick_label(v, step))}</text>')
    for us, label in time_ticks(x0, x1):
        out.append(f'<line class="tick" x1="{x(us):.1f}" x2="{x(us):.1f}" y1="{_MT + ph}" y2="{_MT + ph + 4}"/>')
        out.append(f'<text class="xlab" x="{x(us):.1f}" y="{_H - 12}">{esc(label)}</text>')
    # Others first, so that the selected writes and then the alert rings are drawn on top.
    for p in sorted(pts, key=lambda p: (p.selected, p.alerted)):
        out.append(_dot(p, x(p.ts_us), y(p.value), s.feature))
    out.append("</svg>")
    return "".join(out)


def _dot(p: Point, cx: float, cy: float, feature: str) -> str:
    cls = "pt" + (" sel" if p.selected else "") + (" alert" if p.alerted else "") + (" del" if p.op == "d" else "")
    key = clip(canonical_key(p.key), 80)[0]  # the reviewer's handle on the row, not its data
    tip = f"{when(ts(p.ts_us))} {feature}={num(p.value)} {p.op} {key} {clip(p.position, 200)[0]}"
    r = 5.5 if p.alerted else (3 if p.selected else 2.4)
    return f'<circle class="{cls}" cx="{cx:.1f}" cy="{cy:.1f}" r="{r}"><title>{esc(tip)}</title></circle>'


def _window(scope: Scope) -> tuple[int, int] | None:
    sel = scope.selection
    start = sel.since or scope.first_commit
    end = sel.until or scope.last_commit
    if start is None or end is None:
        return None
    return _us(start), max(_us(start), _us(end))


def charts_html(scope: Scope, series: Sequence[Series], marks: Sequence[AlertMark]) -> str:
    out = ['<section id="charts"><h2>Values over time</h2>']
    if not series:
        out.append('<p class="note">No numeric feature values of the selected agents were read.</p>')
    window = _window(scope)
    for s in series:
        if not s.points:
            continue
        shown = len(s.points)
        agents = ", ".join(s.agents) or "-"
        thinned = f"; {shown:,} shown (each stretch's lowest and highest kept)" if shown < s.total else ""
        span = f"{when(ts(s.points[0].ts_us))} .. {when(ts(s.points[-1].ts_us))}" if s.points else ""
        out.append(
            f'<figure class="chart-box"><figcaption><b>{esc(s.table)}</b> · <b>{esc(s.feature)}</b> '
            f"(column {esc(s.column)}): {s.total:,} writes by {esc(agents)}, {s.selected_total:,} selected"
            f'{esc(thinned)} <span class="pos">{esc(span)}</span></figcaption>{chart_svg(s, window)}</figure>'
        )
    if series:
        out.append(
            '<p class="legend"><span class="swatch sel"></span>selected write <span class="swatch other"></span>'
            "the same agents' other writes <span class=\"swatch alert\"></span>the alert's triggering write "
            '<span class="swatch window"></span>selection window</p>'
        )
    matched = sum(1 for s in series for p in s.points if p.alerted)
    if marks and not matched:
        out.append(
            f'<p class="note" data-count="alert-unmatched">The alert\'s {len(marks)} triggering writes are not among '
            "the writes read (another window or source).</p>"
        )
    out.append("</section>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------------- the rows


def _after(step: Step, value_html_: str) -> str:
    """The value after the undo: as planned, or what stays when the step will not run."""
    if step.decision == "conflict":
        return f'<span class="tag">if forced</span> {value_html_}'
    if step.decision == "skip":
        return '<span class="tag">skipped: unchanged</span>'
    return value_html_


def cells(step: Step, row: RowScope | None, chars: int = DEFAULT_VALUE_CHARS) -> list[tuple[str, str, str, str]]:
    """Per column the step touches: (column, before the selection, what the selection left, after the undo)."""
    before: Row = (row.first_before if row is not None else None) or {}
    agent = step.agent_values or ((row.last_after or {}) if row is not None else {})
    out: list[tuple[str, str, str, str]] = []
    if step.action in ("delete", "soft_delete"):
        cols = list(dict.fromkeys([*agent, *(step.values or {}), *step.now_columns]))
        for c in cols:
            if step.action == "delete":
                after = absent("row deleted")
            elif c in step.now_columns:
                after = absent("time of the undo")
            elif step.values is not None and c in step.values:
                after = value_html(step.values[c], chars)
            else:
                after = value_html(agent.get(c), chars)
            out.append((c, absent("no row"), value_html(agent.get(c), chars), _after(step, after)))
    elif step.action == "insert":
        image = step.values if step.values is not None else before
        for c in image:
            after = value_html(step.values[c], chars) if step.values is not None else absent("unknown")
            known = value_html(before[c], chars) if c in before else absent("unknown")
            out.append((c, known, absent("row deleted"), _after(step, after)))
    else:  # update, undelete
        for c in step.values if step.values is not None else agent:
            known = value_html(before[c], chars) if c in before else absent("unknown")
            if step.values is not None:
                after = value_html(step.values[c], chars)
            else:
                after = absent("unknown: before image incomplete")
            out.append((c, known, value_html(agent.get(c), chars), _after(step, after)))
    return out


def _conflict_html(step: Step) -> str:
    c = step.conflict
    if c is None:
        return ""
    who = f" by <b>{esc(c.writer)}</b>" if c.writer else ""
    at = f" at {esc(when(c.at))}" if c.at else ""
    pos = f' <span class="pos">({esc(c.position)})</span>' if c.position else ""
    return (
        f'<div class="why" data-reason="{esc(c.reason)}"><b>{esc(c.reason.replace("_", " "))}</b>{who}{at}'
        f"{pos}<br>{esc(clip(c.detail, 600)[0])}</div>"
    )


def step_html(step: Step, row: RowScope | None, chars: int = DEFAULT_VALUE_CHARS) -> str:
    cs = cells(step, row, chars) or [("", absent("no columns"), "", "")]
    key, cut = clip(canonical_key(step.key), chars)
    head = (
        f'<td rowspan="{len(cs)}" class="n">{step.n}</td>'
        f'<td rowspan="{len(cs)}"><span class="action {step.action}">{esc(step.action.replace("_", " "))}</span></td>'
        f'<td rowspan="{len(cs)}" class="key"><code>{esc(key)}</code>{"…" if cut else ""}</td>'
    )
    tail = (
        f'<td rowspan="{len(cs)}" class="decision"><span class="badge {step.decision}">{step.decision}</span>'
        f"{_conflict_html(step)}</td>"
    )
    conflict = f' data-conflict="{esc(step.conflict.reason)}"' if step.conflict is not None else ""
    # A value column that says the same for every column ("no row", "row deleted") is said once.
    same = [len(cs) > 1 and all(c[j] == cs[0][j] for c in cs) for j in range(4)]
    trs = []
    for i, c in enumerate(cs):
        row_cells = "".join(
            (f'<td rowspan="{len(cs)}">{v}</td>' if i == 0 else "")
            if same[j]
            else (f'<td class="col">{esc(v)}</td>' if j == 0 else f"<td>{v}</td>")
            for j, v in enumerate(c)
        )
        trs.append(f"<tr>{head}{row_cells}{tail}</tr>" if i == 0 else f"<tr>{row_cells}</tr>")
    cls = "step" + (" conflict" if step.conflict is not None else "")
    return (
        f'<tbody class="{cls}" data-step="{step.n}" data-action="{step.action}" data-decision="{step.decision}"'
        f"{conflict}>{''.join(trs)}</tbody>"
    )


def rows_html(scope: Scope, plan: Plan, max_rows: int, chars: int) -> str:
    rows = {(r.table, canonical_key(r.key)): r for r in scope.rows}
    out = ['<section id="rows"><h2>Rows</h2>']
    if not plan.steps:
        out.append('<p class="note">Nothing to undo.</p>')
    for table in dict.fromkeys(s.table for s in plan.steps):
        mine = [s for s in plan.steps if s.table == table]
        # Conflicts first: they are what the reviewer must decide on; the rest follow in plan order.
        ordered = [s for s in mine if s.conflict is not None] + [s for s in mine if s.conflict is None]
        shown = ordered[:max_rows]
        conflicts = sum(1 for s in mine if s.conflict is not None)
        out.append(
            f'<section class="table-rows" data-table="{esc(table)}" data-steps="{len(mine)}" '
            f'data-shown="{len(shown)}" data-conflicts="{conflicts}">'
            f"<h3>{esc(table)} <small>{len(mine):,} steps, {conflicts:,} conflicts</small></h3>"
            '<table class="steps"><colgroup><col class="c-n"><col class="c-action"><col class="c-key">'
            '<col class="c-col"><col class="c-val"><col class="c-val"><col class="c-val"><col class="c-decision">'
            "</colgroup><thead><tr><th>#</th><th>action</th><th>key</th><th>column</th>"
            "<th>before</th><th>agent's value</th><th>after undo</th><th>decision</th></tr></thead>"
        )
        out.extend(step_html(s, rows.get((s.table, canonical_key(s.key))), chars) for s in shown)
        out.append("</table>")
        if len(mine) > len(shown):
            more = len(mine) - len(shown)
            out.append(
                f'<p class="more" data-more="{more}">{more:,} more steps of {esc(table)} not shown: '
                "<code>writeguard undo show PLAN.json</code> lists every step with its SQL.</p>"
            )
        out.append("</section>")
    out.append("</section>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------------- the summary


def _selection_html(scope: Scope) -> str:
    s = scope.selection
    parts = []
    if s.alert_id:
        parts.append(f"alert <code>{esc(s.alert_id)}</code>")
    if s.agents:
        parts.append("agents " + ", ".join(f"<b>{esc(a)}</b>" for a in s.agents))
    if s.runs:
        parts.append("runs " + ", ".join(f"<b>{esc(r)}</b>" for r in s.runs))
    if s.since:
        parts.append(f"from {esc(when(s.since))}")
    if s.until:
        parts.append(f"before {esc(when(s.until))}")
    return "; ".join(parts) or "every writer"


def _figures(figures: Sequence[tuple[str, str, str]], attrs: str = "") -> str:
    """Big numbers, each with a stable ``data-count`` name."""
    items = "".join(
        f'<div class="fig-{key}"><dt>{esc(label)}</dt><dd data-count="{key}">{esc(value)}</dd></div>'
        for key, label, value in figures
    )
    return f'<dl class="figures" {attrs}>{items}</dl>'


def summary_html(scope: Scope) -> str:
    figures = [
        ("events-read", "events read", f"{scope.events_read:,}"),
        ("events-selected", "events selected", f"{scope.events_selected:,}"),
        ("rows", "rows touched", f"{len(scope.rows):,}"),
        ("scope-conflicts", "conflicting rows", f"{scope.conflicts:,}"),
    ]
    out = [
        '<section id="scope"><h2>Blast radius</h2>',
        f'<p class="selection">Selection: {_selection_html(scope)}. Commits {esc(when(scope.first_commit))} .. '
        f"{esc(when(scope.last_commit))}.</p>",
        _figures(figures),
        '<table class="grid"><thead><tr><th>table</th><th>inserts</th><th>updates</th><th>deletes</th>'
        "<th>rows created</th><th>rows updated</th><th>rows deleted</th><th>created and deleted again</th>"
        "<th>net change</th></tr></thead><tbody>",
    ]
    for t in scope.tables:
        net = "<br>".join(f"{esc(name)} <b>{esc(f'{v:+,.2f}')}</b>" for name, v in t.net.items()) or "-"
        out.append(
            f'<tr data-table="{esc(t.table)}"><td>{esc(t.table)}</td><td>{t.events.c:,}</td><td>{t.events.u:,}</td>'
            f"<td>{t.events.d:,}</td><td>{t.rows_created:,}</td><td>{t.rows_updated:,}</td>"
            f"<td>{t.rows_deleted:,}</td><td>{t.rows_transient:,}</td><td>{net}</td></tr>"
        )
    out.append("</tbody></table>")
    if scope.runs:
        out.append(
            '<table class="grid runs"><thead><tr><th>run</th><th>agent</th><th>writes</th><th>first commit</th>'
            "<th>last commit</th><th>metadata</th></tr></thead><tbody>"
        )
        for r in scope.runs:
            meta = ", ".join(f"{esc(k)}={esc(v)}" for k, v in sorted(r.metadata.items())) or "-"
            out.append(
                f"<tr><td>{esc(r.run_id or '-')}</td><td>{esc(writer_name(r.agent_id))}</td><td>{r.events:,}</td>"
                f"<td>{esc(when(r.first_commit))}</td><td>{esc(when(r.last_commit))}</td><td>{meta}</td></tr>"
            )
        out.append("</tbody></table>")
    out.append(
        '<details><summary>As the terminal says it</summary><pre class="terminal">'
        + esc("\n".join(summary_lines(scope)[:200]))
        + "</pre></details></section>"
    )
    return "".join(out)


def plan_html(plan: Plan) -> str:
    decisions = Counter(s.decision for s in plan.steps)
    conflicts = sum(1 for s in plan.steps if s.conflict is not None)
    figures = [
        ("steps", "steps", len(plan.steps)),
        *((d, d, decisions.get(d, 0)) for d in DECISIONS),
        ("conflicts", "conflicts", conflicts),
        ("unchanged", "rows left as they are", plan.unchanged_rows),
    ]
    out = [
        '<section id="plan"><h2>Plan</h2>',
        f'<p>Plan <code id="plan-id" data-plan-id="{esc(plan.plan_id)}">{esc(plan.plan_id)}</code>, made '
        f"{esc(when(plan.created_at))}{'; all or nothing' if plan.all_or_nothing else ''}. Conflicting steps do not "
        "run unless a reviewer sets their decision to <code>force</code> in the plan file.</p>",
        _figures([(key, label, f"{value:,}") for key, label, value in figures], 'id="counts"'),
        '<table class="grid"><thead><tr><th>table</th><th>steps</th><th>conflicts</th><th>undo changes</th>'
        "</tr></thead><tbody>",
    ]
    for t in plan.tables:
        steps = ", ".join(f"{n:,} {esc(a.replace('_', ' '))}" for a, n in sorted(t.steps.items()))
        net = "<br>".join(f"{esc(f)} <b>{esc(f'{v:+,.2f}')}</b>" for f, v in t.undo_net.items()) or "-"
        out.append(
            f'<tr data-table="{esc(t.table)}"><td>{esc(t.table)}</td><td data-steps="{sum(t.steps.values())}">'
            f"{steps}</td><td>{t.conflicts:,}</td><td>{net}</td></tr>"
        )
    out.append("</tbody></table></section>")
    return "".join(out)


def alert_html(marks: Sequence[AlertMark]) -> str:
    if not marks:
        return ""
    items = "".join(
        f"<li>{esc(when(ts(m.commit_ts_us)))} {esc(m.table)} by <b>{esc(m.agent_id)}</b>, score "
        f"{esc(num(m.score))} <span class='pos'>{esc(m.position or '')}</span></li>"
        for m in marks[:20]
    )
    more = f"<li>and {len(marks) - 20:,} more</li>" if len(marks) > 20 else ""
    return (
        f'<section id="alert"><h2>The alert</h2><p><span data-count="alert-writes">{len(marks):,}</span> '
        f"triggering writes, ringed in the charts:</p><ul>{items}{more}</ul></section>"
    )


STYLE = """
:root{--ink:#1d2430;--muted:#5d6b7e;--line:#d8dee8;--bg:#f6f8fb;--sel:#d9480f;--other:#8895a7;--alert:#c2255c;
--win:#fff0c2;--ok:#2b8a3e;--bad:#c92a2a;--warn:#e67700}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 "DejaVu Sans",system-ui,sans-serif;color:var(--ink);background:var(--bg)}
main{max-width:1280px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px;border-bottom:2px solid var(--line);
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}h3 small{color:var(--muted);font-weight:normal}
code,pre{font-family:"DejaVu Sans Mono",monospace;font-size:12.5px}
.sub{color:var(--muted);margin:0}
.figures{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.figures div{background:#fff;border:1px solid var(--line);border-radius:6px;padding:6px 14px;min-width:120px}
.figures dt{color:var(--muted);font-size:12px}.figures dd{margin:0;font-size:20px;font-weight:bold}
.fig-conflict dd,.fig-conflicts dd,.fig-scope-conflicts dd{color:var(--bad)}
.fig-apply dd{color:var(--ok)}.fig-force dd{color:var(--warn)}
table{border-collapse:collapse;background:#fff;width:100%;margin:6px 0 10px}
th,td{border:1px solid var(--line);padding:4px 7px;text-align:left;vertical-align:top}
th{background:#eef2f7;font-weight:600;font-size:12.5px}
table.grid td:not(:first-child){font-variant-numeric:tabular-nums}
table.steps{table-layout:fixed}table.steps td{overflow-wrap:anywhere;white-space:pre-wrap}
col.c-n{width:44px}col.c-action{width:92px}col.c-key{width:12%}col.c-col{width:10%}col.c-decision{width:15%}
table.steps td.n{color:var(--muted);text-align:right}
tbody.step{border-top:2px solid #b8c2d0}
tbody.step.conflict tr:first-child td:first-child{border-left:4px solid var(--bad)}
tbody.step.conflict{background:#fff5f5}
.col{font-family:"DejaVu Sans Mono",monospace;font-size:12.5px;color:#364152}
.null{color:#7048e8;font-style:italic;font-size:12px}
.absent{color:var(--muted);font-style:italic}
.cut{color:var(--muted);font-size:11px;margin-left:4px}
.tag{display:inline-block;font-size:11px;color:var(--muted);border:1px dashed var(--muted);border-radius:3px;
padding:0 3px}
.badge{display:inline-block;border-radius:10px;padding:0 8px;color:#fff;font-size:12px;font-weight:bold}
.badge.apply{background:var(--ok)}.badge.conflict{background:var(--bad)}.badge.force{background:var(--warn)}
.badge.skip{background:var(--other)}
.action{font-weight:bold}.action.delete,.action.soft_delete{color:var(--bad)}.action.insert{color:var(--ok)}
.why{margin-top:4px;font-size:12px;color:#862e2e}
.pos{color:var(--muted);font-size:11.5px}
.note,.more{color:var(--muted);font-style:italic}
.chart-box{background:#fff;border:1px solid var(--line);border-radius:6px;margin:0 0 12px;padding:8px 10px}
figcaption{font-size:13px;margin-bottom:4px}
svg.chart{width:100%;height:auto;display:block}
svg .plot{fill:#fbfcfe;stroke:var(--line)}svg .window{fill:var(--win);stroke:#f0c36d;stroke-dasharray:4 3}
svg .grid{stroke:#e5e9f0}svg text{font:11px "DejaVu Sans",sans-serif;fill:var(--muted)}
svg .ylab{text-anchor:end}svg .xlab{text-anchor:middle}svg .tick{stroke:#b8c2d0}
svg .pt{fill:var(--other);fill-opacity:.55}svg .pt.sel{fill:var(--sel);fill-opacity:.85}
svg .pt.del{fill:#fff;stroke:var(--sel);stroke-width:1.4}
svg .pt.alert{fill:none;stroke:var(--alert);stroke-width:2.4;fill-opacity:1}
.legend{font-size:12.5px;color:var(--muted)}
.swatch{display:inline-block;width:11px;height:11px;border-radius:50%;margin:0 4px 0 14px;vertical-align:-1px}
.swatch.sel{background:var(--sel)}.swatch.other{background:var(--other)}
.swatch.alert{border:2.4px solid var(--alert)}
.swatch.window{background:var(--win);border:1px dashed #f0c36d;border-radius:0}
details{margin-top:8px}pre.terminal{background:#fff;border:1px solid var(--line);padding:8px;white-space:pre-wrap;
overflow-wrap:anywhere}
"""


def render_review(
    scope: Scope,
    plan: Plan,
    series: Sequence[Series],
    alert_marks: Sequence[AlertMark] = (),
    max_rows: int = DEFAULT_ROWS,
    value_chars: int = DEFAULT_VALUE_CHARS,
) -> str:
    """The whole page. ``series`` from :mod:`undo.series`; ``alert_marks`` the alert's triggering writes, if any."""
    agents = ", ".join(scope.selection.agents) or "the selection"
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Undo review: {esc(clip(agents, 120)[0])} · plan {esc(plan.plan_id[:12])}</title>"
        f"<style>{STYLE}</style></head><body><main>"
        f"<header><h1>Undo review: what {esc(clip(agents, 200)[0])} wrote, and its compensation</h1>"
        f'<p class="sub">Plan <code>{esc(plan.plan_id[:16])}</code> · {len(plan.steps):,} steps · '
        "review it here, then <code>writeguard undo apply PLAN.json --dry-run</code>.</p></header>"
        + summary_html(scope)
        + plan_html(plan)
        + alert_html(alert_marks)
        + charts_html(scope, series, alert_marks)
        + rows_html(scope, plan, max_rows, value_chars)
        + "</main></body></html>\n"
    )
    # A lone surrogate (JSON allows "\ud800") cannot be written as UTF-8: replace it rather than fail the page.
    return page.encode("utf-8", "replace").decode("utf-8")
