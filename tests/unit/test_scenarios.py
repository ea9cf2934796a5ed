"""The scenario benchmark's generator (deterministic, labels one per line) and its scorer, on small inputs."""

from __future__ import annotations

import random
import statistics

import orjson
import pytest

from benchmarks import scenarios as sc
from benchmarks.scenarios import AlertRef, Generator, Label, Params, read_alerts, score

SMALL = Params(seed=3, events=4000, agents=30, days=3, per_kind=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenarios")
    gen = sc.generate_to(out, SMALL)
    events = out.joinpath("events.jsonl").read_bytes().splitlines()
    labels = sc.read_labels(gen.labels)
    return gen, events, labels


def test_same_seed_same_bytes_other_seed_other_bytes():
    first = list(Generator(SMALL).events())
    again = list(Generator(SMALL).events())
    assert first == again
    other = list(Generator(Params(seed=4, events=4000, agents=30, days=3, per_kind=1)).events())
    assert [v for v, _ in other] != [v for v, _ in first]


def test_generate_writes_the_files_and_refuses_bad_params(small, tmp_path):
    gen, events, labels = small
    assert gen.lines == len(events) == len(labels)
    assert gen.anomalous == sum(lab.anomalous for lab in labels)
    man = orjson.loads(gen.manifest.read_bytes())
    assert {i["scenario"] for i in man["incidents"]} == set(sc.INCIDENT_KINDS + sc.SHIFTS)
    assert sc.load_config(gen.config).tables
    with pytest.raises(ValueError, match="days"):
        sc.generate_to(tmp_path, Params(days=2))


def test_labels_align_one_to_one_with_events(small):
    _, events, labels = small
    last_ts = 0
    for i, (raw, lab) in enumerate(zip(events, labels, strict=True), 1):
        ev = orjson.loads(raw)
        row = ev["before"] if ev["op"] == "d" else ev["after"]
        assert lab.line == i
        assert (lab.agent_id, lab.op, lab.ts_us) == (row["agent_id"], ev["op"], ev["source"]["ts_us"])
        assert lab.table == f"{ev['source']['schema']}.{ev['source']['table']}"
        assert lab.ts_us >= last_ts  # commit order
        last_ts = lab.ts_us
        assert lab.scenario in sc.SCENARIOS
        if lab.anomalous:
            assert lab.incident is not None and lab.scenario in sc.INCIDENT_KINDS + sc.SHIFTS
        if lab.scenario in sc.BENIGN or lab.scenario == sc.NORMAL:
            assert not lab.anomalous
    assert {lab.scenario for lab in labels if lab.anomalous} >= set(sc.INCIDENT_KINDS) | {sc.SHIFT}
    assert {"traffic_spike", "new_agent"} <= {lab.scenario for lab in labels}


def test_incidents_look_like_their_description(small):
    _, events, labels = small
    rows = [orjson.loads(raw) for raw in events]
    deletes = [lab for lab in labels if lab.scenario == "mass_delete" and lab.anomalous]
    assert 50 <= len(deletes) <= 200 and {lab.op for lab in deletes} == {"d"}
    assert deletes[-1].ts_us - deletes[0].ts_us < 60_000_000
    # every duplicate repeats an idempotency key the same agent used within the last 240 s
    seen: dict[str, int] = {}
    dups = 0
    for lab, ev in zip(labels, rows, strict=True):
        if lab.table != sc.REFUNDS:
            continue
        key = ev["after"]["idempotency_key"]
        if lab.scenario == "retry_duplicates" and lab.anomalous:
            dups += 1
            assert 0 < lab.ts_us - seen[key] <= 240_000_000
        else:
            assert key not in seen
            seen[key] = lab.ts_us
    assert dups > 0
    # the misused category value appears nowhere but on the incident's anomalous writes
    table, column, value = sc.NEW_VALUES[0]
    for lab, ev in zip(labels, rows, strict=True):
        row = ev["before"] if ev["op"] == "d" else ev["after"]
        used = lab.table == table and row.get(column) == value
        assert used == (lab.scenario == "new_category" and lab.anomalous)


def _value(lab, ev):
    """The value the agent's level is about: a refund's amount, an order's unit price, a ticket's credit."""
    row = ev["before"] if ev["op"] == "d" else ev["after"]
    if lab.table == sc.ORDERS:
        return row["total"] / row["items"]
    return row["amount"] if lab.table == sc.REFUNDS else row["credit"]


def test_a_benign_shift_is_a_lasting_step_labelled_anomalous_only_at_first_then_a_rogue_spell(tmp_path):
    gen = sc.generate_to(tmp_path, Params(seed=5, events=60_000, agents=80, days=3, per_kind=3))
    labels = sc.read_labels(gen.labels)
    rows = [orjson.loads(raw) for raw in gen.events.read_bytes().splitlines()]
    agents = sorted({lab.agent_id for lab in labels if lab.scenario == sc.SHIFT})
    assert len(agents) == 3 and {lab.table for lab in labels if lab.agent_id in agents} == set(sc.TABLES)
    rogues = 0
    for agent in agents:
        mine = [(lab, ev) for lab, ev in zip(labels, rows, strict=True) if lab.agent_id == agent]
        step = next(i for i, (lab, _) in enumerate(mine) if lab.scenario == sc.SHIFT)
        assert not any(lab.anomalous for lab, _ in mine[:step])  # an established agent, normal until its step
        assert 86_400 <= (mine[step][0].ts_us - sc.START_US) / 1e6 <= 1.5 * 86_400 + 3_600
        shift = [(lab, ev) for lab, ev in mine[step:] if lab.scenario == sc.SHIFT]
        inserts = [lab.anomalous for lab, _ in shift if lab.op == "c"]
        assert inserts[:200] == [True] * min(200, len(inserts)) and not any(inserts[200:])
        assert not any(lab.anomalous for lab, _ in shift if lab.op != "c")  # an update re-reports an older row
        before = sorted(v for lab, ev in mine[:step] if lab.op == "c" and (v := _value(lab, ev)))
        after = sorted(v for lab, ev in shift if lab.op == "c" and (v := _value(lab, ev)))
        ratio = after[len(after) // 2] / before[len(before) // 2]
        assert 1.1 < ratio < 1.6  # x1.2-x1.4, and it lasts: the median of every write at the new level
        rogue = [(lab, ev) for lab, ev in mine if lab.scenario == sc.SHIFT_ROGUE]
        if len(shift) < 400:
            assert rogue == []  # the run ended first
            continue
        rogues += 1
        assert len(shift) == 400 and mine[-len(rogue) :] == rogue  # after 400 writes at the new level, the last ones
        assert 20 <= len(rogue) <= 30 and all(lab.anomalous and lab.op == "c" for lab, _ in rogue)
        assert statistics.median(_value(lab, ev) for lab, ev in rogue) > 8 * after[len(after) // 2]
    assert rogues >= 1


def _labels(spec):
    """spec: (scenario, incident, anomalous, agent) per line; commit times 10 s apart."""
    return [Label(i, s, inc, anom, agent, "public.refunds", "c", 1_000_000_000 + 10_000_000 * i)
            for i, (s, inc, anom, agent) in enumerate(spec, 1)]


def test_scorer_on_a_hand_made_example():
    labels = _labels([
        ("normal", None, False, "a"),                       # 1
        ("normal", None, False, "a"),                       # 2
        ("normal", None, False, "b"),                       # 3
        ("traffic_spike", "traffic_spike-1", False, "c"),   # 4
        ("amount_inflation", "inf-1", True, "b"),           # 5  first anomalous event of inf-1
        ("amount_inflation", "inf-1", True, "b"),           # 6
        ("traffic_spike", "traffic_spike-1", False, "c"),   # 7
        ("amount_inflation", "inf-1", True, "b"),           # 8
        ("slow_drift", "drift-1", True, "d"),               # 9
        ("slow_drift", "drift-1", False, "d"),              # 10 an update during the drift: not anomalous
        ("slow_drift", "drift-1", True, "d"),               # 11
        ("normal", None, False, "a"),                       # 12
    ])
    alerts = [
        AlertRef("a", "zscore", "public.refunds", (2,)),        # false alarm on normal traffic
        AlertRef("b", "zscore", "public.refunds", (3, 5, 6)),  # detects inf-1 at line 6: 2 anomalous events, 10 s
        AlertRef("c", "rate", "public.refunds", (4, 7)),       # false alarm in the spike
        AlertRef("b", "rate", "public.refunds", (8,)),         # a second true positive, later: not the first
        AlertRef("d", "zscore", "public.refunds", (10,)),      # the drift agent, on a non-anomalous line
    ]
    s = score(labels, alerts)
    inf = s.row("amount_inflation")
    assert inf is not None
    assert (inf.incidents, inf.detected, inf.alerts, inf.tp, inf.precision, inf.recall) == (1, 1, 2, 2, 1.0, 1.0)
    assert inf.delays_events == [2] and inf.delays_s == [10.0]
    drift = s.row("slow_drift")
    assert drift is not None
    assert (drift.incidents, drift.detected, drift.alerts, drift.tp, drift.normal_events) == (1, 0, 1, 0, 1)
    assert drift.precision == 0.0 and drift.fa_per_10k == pytest.approx(10_000.0)
    normal = s.row("normal")
    assert normal is not None
    assert (normal.alerts, normal.false_alarms, normal.normal_events) == (1, 1, 4)
    assert normal.fa_per_10k == pytest.approx(1 / (4 / 10_000))
    spike = s.row("traffic_spike")
    assert spike is not None and (spike.alerts, spike.false_alarms, spike.recall) == (1, 1, None)
    o = s.overall
    assert (o.incidents, o.detected, o.alerts, o.tp, o.false_alarms) == (2, 1, 5, 2, 3)
    assert o.precision == pytest.approx(2 / 5) and o.recall == pytest.approx(0.5)
    assert o.normal_events == 7 and o.fa_per_10k == pytest.approx(3 / (7 / 10_000))
    by_id = {r.id: r for r in s.incidents}
    assert by_id["inf-1"].detector == "zscore" and by_id["inf-1"].alerts == 2
    assert not by_id["drift-1"].detected
    assert s.false_alarms_by == {("normal", "zscore"): 1, ("traffic_spike", "rate"): 1, ("slow_drift", "zscore"): 1}
    assert [r.scenario for r in s.rows] == ["amount_inflation", "slow_drift", "traffic_spike", "normal"]


def test_an_anomalous_line_of_another_agent_is_no_true_positive():
    labels = _labels([("normal", None, False, "a"), ("mass_delete", "md-1", True, "b")])
    s = score(labels, [AlertRef("a", "rate", "public.refunds", (2,))])
    assert s.overall.tp == 0 and s.overall.detected == 0 and s.overall.false_alarms == 1


def test_read_alerts_maps_sources_to_lines():
    raw = orjson.dumps({"agent_id": "b", "detector": "zscore", "table": "public.refunds", "quarantined": True,
                        "triggering_events": [{"source": "C:/runs/x.jsonl:2"}, {"source": "x.jsonl:3"},
                                              {"topic": "t", "partition": 0, "offset": 9}]})
    assert read_alerts([raw]) == [AlertRef("b", "zscore", "public.refunds", (2, 3), True)]
    assert read_alerts([raw, b""], line_map=[10, 20, 30]) == [AlertRef("b", "zscore", "public.refunds", (20, 30), True)]


def test_scorer_refuses_labels_that_skip_a_line():
    labels = _labels([("normal", None, False, "a"), ("normal", None, False, "a")])
    with pytest.raises(ValueError, match="one per input line"):
        score([labels[1]], [])


def test_help_lists_both_commands():
    text = sc.parser().format_help()
    assert "generate" in text and "run" in text


def test_a_mid_stream_start_replays_only_the_events_after_it_and_reports_its_first_hour_and_day(small, tmp_path):
    gen, _, labels = small
    cfg = sc.load_config(gen.config)
    out = sc.mid_stream(tmp_path, gen.events, labels, cfg, 36.0)
    after = sum(1 for lab in labels if lab.ts_us >= sc.START_US + 36 * 3_600_000_000)
    assert 0 < after < len(labels)
    assert out[0].startswith(f"start mid-stream (36 h into the fleet's life, no history; {after:,} events")
    hour = next(line for line in out if line.startswith("  first hour: "))
    day = next(line for line in out if line.startswith("  first day : "))
    assert "quarantines (target 0)" in hour and "quarantines (target 0)" in day
    assert any("leaving their learning period" in line for line in out)
    assert not (tmp_path / "events-mid-stream.jsonl").exists()


def test_short_burst_is_a_low_rate_agents_ten_minutes_at_x20_and_leaves_the_rest_of_the_stream_alone(small):
    gen, events, labels = small
    man = orjson.loads(gen.manifest.read_bytes())
    (inc,) = [i for i in man["incidents"] if i["scenario"] == "short_burst"]
    g = Generator(SMALL)
    agent = next(a for a in g.agents if a.agent_id == inc["agent_id"])
    peers = sorted(a.rate for a in g.agents if a.table == agent.table and a.start_s == 0.0)
    assert agent.rate <= peers[len(peers) // 2]  # a quiet agent of its table
    start, end = inc["start_us"], inc["start_us"] + 600_000_000
    burst = [lab for lab in labels if lab.incident == "short_burst-1"]
    assert burst and all(start <= lab.ts_us < end and lab.anomalous for lab in burst)
    assert len(burst) >= inc["writes"] >= 19 * inc["usual_writes"] - 1  # x20 its usual for the hour
    # every other event is what the fleet writes without the scenario: its extra inserts (their own ids) aside,
    # the same rows at the same times (the envelopes' LSNs and transaction ids move on by its events)

    class NoBurst(Generator):
        def _plan_short_bursts(self) -> None:
            self._rush_rng, self._rush_id = random.Random(0), 0

    def rows(values):
        out = []
        for raw in values:
            e = orjson.loads(raw)
            if (e["after"] or {}).get("id", 0) < 95_000_000:
                out.append((e["op"], e["before"], e["after"], e["source"]["ts_us"]))
        return out

    plain = [v for v, _ in NoBurst(SMALL).events()]
    assert len(events) - len(plain) == inc["writes"]
    assert rows(events) == rows(plain)
