"""Tests for connectors.messages and stream.pipeline.build_alert: JSON round trips, schema files, alert text."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic
import pytest

from connectors.messages import PUBLISHED, Alert, ControlRecord, DeadLetter
from detectors.engine import FileCoords, Finding, KafkaCoords, Trigger
from detectors.models import Contribution
from stream import cli
from stream.pipeline import build_alert
from undo.models import Plan, Scope

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"

COMMIT_US = 1_700_000_000_123_456
DETECTED_US = COMMIT_US + 250_500  # 250.5 ms later


def finding(**kw: Any) -> Finding:
    base: dict[str, Any] = dict(
        alert_id="6a1f2b4c-0000-5000-8000-000000000001",
        table="public.refunds",
        agent_id="refund-agent-00",
        run_id="run-1234abcd",
        detector="zscore",
        kind="zscore",
        scope="agent",
        severity="critical",
        score=0.74,
        threshold=0.6,
        contributions=[Contribution("amount", 1410.65, 16.43, 147.33, 9.3)],
        triggers=[
            Trigger(KafkaCoords("shop.public.refunds", 1, 42), COMMIT_US - 2_000_000, 0.71),
            Trigger(KafkaCoords("shop.public.refunds", 1, 57), COMMIT_US, 0.74),
        ],
        actions=("alert", "quarantine"),
        quarantine=True,
        commit_ts_us=COMMIT_US,
        agent_events=61,
    )
    base.update(kw)
    return Finding(**base)


# --- round trips --------------------------------------------------------------------------------


def test_alert_json_round_trip() -> None:
    alert = build_alert(finding(), DETECTED_US)
    raw = alert.to_bytes()
    assert Alert.model_validate_json(raw) == alert
    doc = json.loads(raw)
    assert doc["schema_version"] == 1
    assert doc["alert_id"] == "6a1f2b4c-0000-5000-8000-000000000001"
    assert doc["actions"] == ["alert", "quarantine"]


def test_control_record_json_round_trip() -> None:
    rec = ControlRecord(
        agent_id="a1",
        state="released",
        reason="false positive",
        by="alice@laptop",
        alert_id="x",
        table="public.refunds",
    )
    assert ControlRecord.model_validate_json(rec.to_bytes()) == rec
    assert rec.at.tzinfo is not None
    again = ControlRecord.model_validate_json(rec.to_bytes())
    assert (again.state, again.by, again.at) == ("released", "alice@laptop", rec.at)


def test_dead_letter_json_round_trip() -> None:
    dl = DeadLetter(
        reason="invalid_json",
        detail="expected ',' at byte 12",
        topic="shop.public.orders",
        partition=3,
        offset=1234567,
        timestamp_ms=1_700_000_000_000,
        key_b64="eyJpZCI6MX0=",
        value_b64="e25vdCBqc29u",
    )
    assert DeadLetter.model_validate_json(dl.to_bytes()) == dl


def test_messages_refuse_unknown_fields_and_other_versions() -> None:
    raw = json.loads(ControlRecord(agent_id="a", state="quarantined", reason="r", by="w").to_bytes())
    with pytest.raises(pydantic.ValidationError):
        ControlRecord.model_validate({**raw, "surprise": 1})
    with pytest.raises(pydantic.ValidationError):
        ControlRecord.model_validate({**raw, "schema_version": 2})
    with pytest.raises(pydantic.ValidationError):
        ControlRecord.model_validate({**raw, "state": "paused"})


# --- schema files -------------------------------------------------------------------------------


def test_schema_files_match_the_models() -> None:
    """schemas/ ships with the repository: one file per published model (and the config), as the code generates it."""
    assert SCHEMAS.is_dir(), f"{SCHEMAS} is missing; run `writeguard schemas --write`"
    files = {p.name.removesuffix(".schema.json"): p for p in sorted(SCHEMAS.glob("*.schema.json"))}
    assert files, f"{SCHEMAS} has no *.schema.json; run `writeguard schemas --write`"
    generated = cli.all_schemas()
    assert set(generated) == {
        "config",
        *PUBLISHED,
        "undo-correction",
        "undo-apply-report",
        "restore-report",
        "guard-refusal",
    }
    assert PUBLISHED == {
        "alert": Alert,
        "control-record": ControlRecord,
        "dead-letter": DeadLetter,
        "undo-scope": Scope,
        "undo-plan": Plan,
    }
    missing = sorted(set(generated) - set(files))
    extra = sorted(set(files) - set(generated))
    assert not missing and not extra, f"schemas/: missing {missing}, extra {extra}; run `writeguard schemas --write`"
    for name, model in PUBLISHED.items():
        assert generated[name] == model.model_json_schema()
    for name, schema in generated.items():
        # Byte for byte what `writeguard schemas --write` writes, so `--check` in CI agrees with this test.
        text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
        assert files[name].read_text() == text, f"{files[name]} is stale; run `writeguard schemas --write`"


def test_schemas_write_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "schemas"
    assert cli.main(["schemas", "--dir", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "alert.schema.json",
        "config.schema.json",
        "control-record.schema.json",
        "dead-letter.schema.json",
        "guard-refusal.schema.json",
        "restore-report.schema.json",
        "undo-apply-report.schema.json",
        "undo-correction.schema.json",
        "undo-plan.schema.json",
        "undo-scope.schema.json",
    ]
    assert cli.main(["schemas", "--check", "--dir", str(folder)]) == 0
    alert = folder / "alert.schema.json"
    alert.write_text(alert.read_text().replace('"lag_ms"', '"lag_s"'))
    capsys.readouterr()
    assert cli.main(["schemas", "--check", "--dir", str(folder)]) == 1
    assert str(alert) in capsys.readouterr().err


# --- build_alert --------------------------------------------------------------------------------


def test_build_alert_copies_the_finding() -> None:
    alert = build_alert(finding(), DETECTED_US)
    assert (alert.agent_id, alert.run_id, alert.table, alert.detector, alert.detector_kind) == (
        "refund-agent-00",
        "run-1234abcd",
        "public.refunds",
        "zscore",
        "zscore",
    )
    assert (alert.scope, alert.severity, alert.score, alert.threshold) == ("agent", "critical", 0.74, 0.6)
    assert alert.commit_ts == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert alert.detected_at == datetime(2023, 11, 14, 22, 13, 20, 373956, tzinfo=UTC)
    assert (alert.anomalous_events, alert.agent_events) == (2, 61)
    assert alert.actions == ["alert", "quarantine"] and alert.quarantined is True
    [e] = alert.explanation
    assert (e.feature, e.value, e.expected_low, e.expected_high, e.z) == ("amount", 1410.65, 16.43, 147.33, 9.3)


def test_build_alert_lag_is_detected_minus_commit() -> None:
    assert build_alert(finding(), DETECTED_US).lag_ms == pytest.approx(250.5)
    assert build_alert(finding(), COMMIT_US + 3_000_000).lag_ms == pytest.approx(3000.0)


def test_build_alert_parses_kafka_coords() -> None:
    first, second = build_alert(finding(), DETECTED_US).triggering_events
    assert (first.topic, first.partition, first.offset, first.source) == ("shop.public.refunds", 1, 42, None)
    assert (second.topic, second.partition, second.offset) == ("shop.public.refunds", 1, 57)
    assert first.score == 0.71
    assert first.commit_ts == datetime(2023, 11, 14, 22, 13, 18, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("path", "line", "source"),
    [
        ("file.jsonl", 7, "file.jsonl:7"),
        ("/data/2024/10/events.jsonl", 7, "/data/2024/10/events.jsonl:7"),
        ("/data/1/42", 7, "/data/1/42:7"),
        ("x/y", 3, "x/y:3"),
    ],
)
def test_build_alert_replay_coords_go_to_source(path: str, line: int, source: str) -> None:
    triggers = [Trigger(FileCoords(path, line), COMMIT_US, 0.9)]
    [t] = build_alert(finding(triggers=triggers), DETECTED_US).triggering_events
    assert (t.topic, t.partition, t.offset, t.source) == (None, None, None, source)


def test_summary_names_feature_value_and_expected_range() -> None:
    summary = build_alert(finding(), DETECTED_US).summary.split("; quarantined: ")[0]
    assert summary == ("public.refunds: agent refund-agent-00: amount = 1,410.65 (expected 16.43 to 147.33, z=+9.3)")


def test_summary_of_a_population_finding() -> None:
    f = finding(
        scope="population",
        detector="zscore.population",
        contributions=[Contribution("amount", 2_500_000.0, 10.0, 120.0, 14.2)],
    )
    summary = build_alert(f, DETECTED_US).summary
    assert "agent refund-agent-00 (judged against the table's population)" in summary
    assert "amount = 2.5e+06 (expected 10.00 to 120.00, z=+14.2)" in summary


def test_summary_of_a_guard_shows_the_ceiling() -> None:
    f = finding(
        detector="rate",
        kind="rate",
        score=1.0,
        threshold=1.0,
        contributions=[Contribution("events_per_60s", 1201.0, 0.0, 1200.0)],
    )
    summary = build_alert(f, DETECTED_US).summary.split("; quarantined: ")[0]
    assert summary.endswith("events_per_60s = 1,201.00 (ceiling 1,200.00)")


def test_summary_without_contributions_shows_the_score() -> None:
    f = finding(contributions=[])
    alert = build_alert(f, DETECTED_US)
    assert alert.summary.split("; quarantined: ")[0] == "public.refunds: agent refund-agent-00: score 0.740"
    assert alert.explanation == []


def test_a_quarantine_alert_names_the_undo_command_with_the_agent_id_shell_quoted() -> None:
    import shlex

    hostile = "evil'; rm -rf / #"
    alert = build_alert(finding(agent_id=hostile), DETECTED_US)
    assert alert.undo_command is not None and f"`{alert.undo_command}`" in alert.summary
    argv = shlex.split(alert.undo_command)
    assert argv[:3] == ["writeguard", "undo", "plan"]
    assert argv[argv.index("--agent") + 1] == hostile
    first = min(t.commit_ts_us for t in finding().triggers)
    since = datetime.fromisoformat(argv[argv.index("--since") + 1])
    assert int(since.timestamp() * 1_000_000) == first
    assert build_alert(finding(quarantine=False), DETECTED_US).undo_command is None
