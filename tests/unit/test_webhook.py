"""Tests for connectors.webhook without a network: signing, settings, backoff, and submit's bookkeeping."""

from __future__ import annotations

import asyncio
import doctest
import hashlib
import hmac
import json
import time

import pytest
from pydantic import ValidationError

from connectors import webhook
from connectors.webhook import (
    Delivery,
    WebhookSender,
    WebhookSettings,
    backoff_delay,
    idempotency_key,
    sign,
    verify,
)

SECRET = b"s3cret"
BODY = b'{"action":"pause","agent_id":"agent-7"}'


def settings(**kw) -> WebhookSettings:
    return WebhookSettings(**{"url": "https://orchestrator.example/agents/pause", "secret": "s3cret", **kw})


# --- sign / verify --------------------------------------------------------------------------------


def test_docstring_examples_run():
    result = doctest.testmod(webhook, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0


def test_sign_is_hmac_sha256_over_timestamp_dot_body():
    expected = hmac.new(SECRET, b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, "1700000000", BODY) == "sha256=" + expected


def test_verify_accepts_a_fresh_valid_signature():
    ts = "1700000000"
    assert verify(SECRET, ts, BODY, sign(SECRET, ts, BODY), now=1700000000 + 299)


@pytest.mark.parametrize(
    ("secret", "body", "ts_signed", "ts_sent", "now"),
    [
        (SECRET, BODY + b" ", "1700000000", "1700000000", 1700000000),  # tampered body
        (b"other", BODY, "1700000000", "1700000000", 1700000000),  # wrong secret
        (SECRET, BODY, "1700000000", "1700000000", 1700000000 + 301),  # too old
        (SECRET, BODY, "1700000000", "1700000000", 1700000000 - 301),  # too far in the future
        (SECRET, BODY, "1700000000", "1700000300", 1700000300),  # timestamp refreshed by a replayer
    ],
    ids=["tampered-body", "wrong-secret", "old-timestamp", "future-timestamp", "swapped-timestamp"],
)
def test_verify_refuses(secret, body, ts_signed, ts_sent, now):
    sig = sign(secret, ts_signed, BODY)
    assert not verify(SECRET, ts_sent, body, sig, now=now)


@pytest.mark.parametrize("signature", ["", "sha256=", "md5=abc", "sha256=" + "0" * 64, "sha256=é"])
def test_verify_refuses_malformed_signatures(signature):
    assert not verify(SECRET, "1700000000", BODY, signature, now=1700000000)


@pytest.mark.parametrize("ts", ["", "abc", "1.5e9", "nan"])
def test_verify_refuses_malformed_timestamps(ts):
    assert not verify(SECRET, ts, BODY, sign(SECRET, ts, BODY), now=1700000000)


def test_verify_uses_the_clock_by_default():
    ts = str(int(time.time()))
    assert verify(SECRET, ts, BODY, sign(SECRET, ts, BODY))
    old = str(int(time.time()) - 3600)
    assert not verify(SECRET, old, BODY, sign(SECRET, old, BODY))
    assert verify(SECRET, old, BODY, sign(SECRET, old, BODY), tolerance_s=7200)


# --- settings --------------------------------------------------------------------------------------


def test_settings_defaults_and_secret_kept_out_of_repr():
    s = settings()
    assert (s.timeout_s, s.retries, s.backoff_s, s.backoff_max_s, s.queue_size) == (2.0, 3, 0.5, 10.0, 1000)
    assert s.headers == {}
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://orchestrator.example/pause",
        "orchestrator.example/pause",
        "file:///etc/passwd",
        "https://",
        "http:///x",
        "https://host:notaport/x",
        "https://host/a b",
        "",
    ],
)
def test_settings_refuse_bad_urls(url):
    with pytest.raises(ValidationError) as e:
        settings(url=url)
    assert e.value.errors()[0]["loc"] == ("url",)


def test_settings_accept_http_and_https_with_port():
    assert settings(url="http://127.0.0.1:8080/pause").url == "http://127.0.0.1:8080/pause"
    assert settings(url="https://[::1]/pause").url == "https://[::1]/pause"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_s", -1.0),
        ("timeout_s", 0),
        ("retries", -1),
        ("backoff_s", -0.1),
        ("queue_size", 0),
        ("concurrency", 0),
        ("secret", ""),
    ],
)
def test_settings_refuse_bad_numbers(field, value):
    with pytest.raises(ValidationError) as e:
        settings(**{field: value})
    assert e.value.errors()[0]["loc"] == (field,)


def test_settings_forbid_unknown_keys_reserved_headers_and_mutation():
    with pytest.raises(ValidationError, match="Extra inputs"):
        settings(timeout=1.0)
    with pytest.raises(ValidationError, match="cannot be overridden"):
        settings(headers={"x-writeguard-signature": "forged"})
    with pytest.raises(ValidationError, match="backoff_max_s"):
        settings(backoff_s=5.0, backoff_max_s=1.0)
    s = settings(headers={"Authorization": "Bearer t"})
    with pytest.raises(ValidationError):
        s.timeout_s = 5.0  # type: ignore[misc]


def test_settings_from_a_yaml_mapping():
    s = WebhookSettings.model_validate(
        {"url": "https://o.example/pause", "secret": "from-env", "timeout_s": 1, "headers": {"X-Team": "a"}}
    )
    assert s.timeout_s == 1.0 and s.headers == {"X-Team": "a"}


# --- backoff ---------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_jitter_only_shortens():
    s = settings(backoff_s=0.5, backoff_max_s=3.0)
    assert [backoff_delay(s, r, rand=lambda: 0.0) for r in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(s, 1, rand=lambda: 1.0) == pytest.approx(0.4)
    for r in range(1, 8):
        assert 0.8 * min(0.5 * 2 ** (r - 1), 3.0) <= backoff_delay(s, r) <= min(0.5 * 2 ** (r - 1), 3.0)


def test_backoff_honours_retry_after_seconds_capped():
    s = settings(backoff_s=0.5, backoff_max_s=3.0)
    assert backoff_delay(s, 1, "2") == 2.0
    assert backoff_delay(s, 1, " 1.5 ") == 1.5
    assert backoff_delay(s, 1, "3600") == 3.0
    assert backoff_delay(s, 1, "-5") == 0.0
    for ignored in ("Wed, 21 Oct 2015 07:28:00 GMT", "soon", "nan", "inf"):
        assert 0.4 <= backoff_delay(s, 1, ignored) <= 0.5


# --- submit ----------------------------------------------------------------------------------------


def test_idempotency_key():
    assert idempotency_key("a1b2", "pause") == "a1b2:pause"


def test_submit_is_idempotent_by_key_and_the_body_is_sorted_json():
    results: list[Delivery] = []
    sender = WebhookSender(settings(), on_result=results.append)
    assert sender.submit("alert-1:pause", {"b": 2, "a": 1})
    assert not sender.submit("alert-1:pause", {"b": 2, "a": 1})
    assert not sender.submit("alert-1:pause", {"other": True})
    assert sender.submit("alert-1:notify", {"a": 1})
    assert sender.pending == 2 and sender.duplicates == 2 and sender.dropped == 0
    assert results == []  # a duplicate is not a new delivery: nothing to report
    job = sender._queue.get_nowait()
    assert job.body == b'{"a":1,"b":2}' and json.loads(job.body) == {"a": 1, "b": 2}


def test_seen_keys_are_a_bounded_lru():
    sender = WebhookSender(settings())
    sender.seen_keys_max = 3
    for k in ("k1", "k2", "k3"):
        assert sender.submit(k, {})
    assert not sender.submit("k1", {})  # refreshes k1: k2 is now the oldest
    assert sender.submit("k4", {})  # evicts k2
    assert len(sender._seen) == 3
    assert sender.submit("k2", {})
    assert not sender.submit("k1", {})


def test_queue_full_drops_without_blocking_and_reports():
    results: list[Delivery] = []
    sender = WebhookSender(settings(queue_size=2), on_result=results.append)
    assert sender.submit("k1", {"n": 1}) and sender.submit("k2", {"n": 2})
    t0 = time.perf_counter()
    accepted = [sender.submit(f"more-{i}", {"n": i}) for i in range(1000)]
    took = time.perf_counter() - t0
    print(f"1000 submits on a full queue: {took * 1000:.2f} ms")
    assert not any(accepted) and took < 1.0
    assert sender.dropped == 1000 and sender.pending == 2
    assert len(results) == 1000
    first = results[0]
    assert (first.key, first.delivered, first.error, first.attempts, first.status) == (
        "more-0",
        False,
        "queue_full",
        0,
        None,
    )
    assert first.body == b'{"n":0}'
    # a dropped key is not remembered: once there is room it can be submitted again
    assert sender.duplicates == 0
    sender._queue.get_nowait()
    assert sender.submit("more-0", {"n": 0})


def test_submit_never_raises():
    results: list[Delivery] = []

    def broken(d: Delivery) -> None:
        results.append(d)
        raise RuntimeError("metrics are down")

    sender = WebhookSender(settings(queue_size=1), on_result=broken)
    assert not sender.submit("bad", {"when": object()})
    assert results[-1].error is not None and results[-1].error.startswith("invalid_payload")
    assert sender.submit("ok", {})
    assert not sender.submit("full", {})  # the callback raises; submit still just returns False
    assert results[-1].error == "queue_full"


def test_stop_before_start_reports_pending_as_stopped_and_refuses_new_work():
    results: list[Delivery] = []
    sender = WebhookSender(settings(), on_result=results.append)
    sender.submit("k1", {})
    sender.submit("k2", {})
    asyncio.run(sender.stop(timeout=0.1))
    assert [(d.key, d.error, d.delivered) for d in results] == [("k1", "stopped", False), ("k2", "stopped", False)]
    assert not sender.submit("k3", {})
    assert results[-1].key == "k3" and results[-1].error == "stopped"
    with pytest.raises(RuntimeError):
        asyncio.run(sender.start())
