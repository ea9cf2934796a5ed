"""Every label set the config can produce exists at 0 from the start, so increase() sees the first increment."""

from __future__ import annotations

from prometheus_client import generate_latest

from stream.config import EXAMPLE_CONFIG, load_config
from stream.metrics import Metrics


def test_prime_creates_the_configs_series_at_zero() -> None:
    cfg = load_config(EXAMPLE_CONFIG)
    m = Metrics()
    before = generate_latest(m.registry).decode()
    assert 'writeguard_alerts_total{' not in before
    m.prime(cfg)
    text = generate_latest(m.registry).decode()
    for line in (
        'writeguard_alerts_total{detector="zscore",severity="critical",table="public.refunds"} 0.0',
        'writeguard_alerts_total{detector="op_burst",severity="warning",table="public.orders"} 0.0',
        'writeguard_dead_letters_total{reason="invalid_json"} 0.0',
        'writeguard_dead_letters_total{reason="internal_error"} 0.0',
        'writeguard_skipped_events_total{reason="undo"} 0.0',
        'writeguard_quarantines_total{table="public.orders"} 0.0',
        'writeguard_events_total{op="d",table="public.refunds"} 0.0',
        'writeguard_detection_lag_seconds_count{table="public.refunds"} 0.0',
    ):
        assert line in text, line
    # An increment then counts from 0: the first alert is visible to increase().
    m.alerts.labels("public.refunds", "zscore", "critical").inc()
    assert 'writeguard_alerts_total{detector="zscore",severity="critical",table="public.refunds"} 1.0' in (
        generate_latest(m.registry).decode()
    )


def test_a_full_collection_is_timed_in_the_gc_pause_histogram() -> None:
    import gc

    m = Metrics()
    on_gc = m.watch_gc()
    try:
        gc.collect()  # a collection of generation 2, the oldest
    finally:
        gc.callbacks.remove(on_gc)
    full = m.registry.get_sample_value("writeguard_gc_pause_seconds_count", {"generation": "2"})
    took = m.registry.get_sample_value("writeguard_gc_pause_seconds_sum", {"generation": "2"})
    assert full is not None and full >= 1 and took is not None and took > 0
