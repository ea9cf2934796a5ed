"""Tests for connectors.webhook without a network: signing, settings, backoff, and submit's bookkeeping."""

from __future__ import annotations

import asyncio
import doctest
import hashlib
import hmac
import inspect
import json
import threading
import time
from typing import Any

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


def settings(**kw: Any) -> WebhookSettings:
    return WebhookSettings(**{"url": "https://orchestrator.example/agents/pause", "secret": "s3cret", **kw})


# --- sign / verify --------------------------------------------------------------------------------


def test_docstring_examples_run() -> None:
    result = doctest.testmod(webhook, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0


def test_sign_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET, b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, "1700000000", BODY) == "sha256=" + expected


def test_verify_accepts_a_fresh_valid_signature() -> None:
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
def test_verify_refuses(secret: bytes, body: bytes, ts_signed: str, ts_sent: str, now: int) -> None:
    sig = sign(secret, ts_signed, BODY)
    assert not verify(SECRET, ts_sent, body, sig, now=now)


@pytest.mark.parametrize("signature", ["", "sha256=", "md5=abc", "sha256=" + "0" * 64, "sha256=é"])
def test_verify_refuses_malformed_signatures(signature: str) -> None:
    assert not verify(SECRET, "1700000000", BODY, signature, now=1700000000)


@pytest.mark.parametrize("ts", ["", "abc", "1.5e9", "nan"])
def test_verify_refuses_malformed_timestamps(ts: str) -> None:
    assert not verify(SECRET, ts, BODY, sign(SECRET, ts, BODY), now=1700000000)


def test_verify_uses_the_clock_by_default() -> None:
    ts = str(int(time.time()))
    assert verify(SECRET, ts, BODY, sign(SECRET, ts, BODY))
    old = str(int(time.time()) - 3600)
    assert not verify(SECRET, old, BODY, sign(SECRET, old, BODY))
    assert verify(SECRET, old, BODY, sign(SECRET, old, BODY), tolerance_s=7200)


# --- settings --------------------------------------------------------------------------------------


def test_settings_defaults_and_secret_kept_out_of_repr() -> None:
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
def test_settings_refuse_bad_urls(url: str) -> None:
    with pytest.raises(ValidationError) as e:
        settings(url=url)
    assert e.value.errors()[0]["loc"] == ("url",)


def test_settings_accept_http_and_https_with_port() -> None:
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
def test_settings_refuse_bad_numbers(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as e:
        settings(**{field: value})
    assert e.value.errors()[0]["loc"] == (field,)


def test_settings_forbid_unknown_keys_reserved_headers_and_mutation() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        settings(timeout=1.0)
    with pytest.raises(ValidationError, match="cannot be overridden"):
        settings(headers={"x-writeguard-signature": "forged"})
    with pytest.raises(ValidationError, match="backoff_max_s"):
        settings(backoff_s=5.0, backoff_max_s=1.0)
    s = settings(headers={"Authorization": "Bearer t"})
    with pytest.raises(ValidationError):
        s.timeout_s = 5.0  # type: ignore[misc]


def test_settings_from_a_yaml_mapping() -> None:
    s = WebhookSettings.model_validate(
        {"url": "https://o.example/pause", "secret": "from-env", "timeout_s": 1, "headers": {"X-Team": "a"}}
    )
    assert s.timeout_s == 1.0 and s.headers == {"X-Team": "a"}


# --- backoff ---------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_jitter_only_shortens() -> None:
    s = settings(backoff_s=0.5, backoff_max_s=3.0)
    assert [backoff_delay(s, r, rand=lambda: 0.0) for r in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(s, 1, rand=lambda: 1.0) == pytest.approx(0.4)
    for r in range(1, 8):
        assert 0.8 * min(0.5 * 2 ** (r - 1), 3.0) <= backoff_delay(s, r) <= min(0.5 * 2 ** (r - 1), 3.0)


def test_backoff_honours_retry_after_seconds_capped() -> None:
    s = settings(backoff_s=0.5, backoff_max_s=3.0)
    assert backoff_delay(s, 1, "2") == 2.0
    assert backoff_delay(s, 1, " 1.5 ") == 1.5
    assert backoff_delay(s, 1, "3600") == 3.0
    assert backoff_delay(s, 1, "-5") == 0.0
    for ignored in ("Wed, 21 Oct 2015 07:28:00 GMT", "soon", "nan", "inf"):
        assert 0.4 <= backoff_delay(s, 1, ignored) <= 0.5


# --- submit ----------------------------------------------------------------------------------------


def test_idempotency_key() -> None:
    assert idempotency_key("a1b2", "pause") == "a1b2:pause"


def test_submit_is_idempotent_by_key_and_the_body_is_sorted_json() -> None:
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


def test_seen_keys_are_a_bounded_lru() -> None:
    sender = WebhookSender(settings())
    sender.seen_keys_max = 3  # type: ignore[misc]  # this instance only
    for k in ("k1", "k2", "k3"):
        assert sender.submit(k, {})
    assert not sender.submit("k1", {})  # refreshes k1: k2 is now the oldest
    assert sender.submit("k4", {})  # evicts k2
    assert len(sender._seen) == 3
    assert sender.submit("k2", {})
    assert not sender.submit("k1", {})


def test_queue_full_drops_without_blocking_and_reports() -> None:
    results: list[Delivery] = []
    sender = WebhookSender(settings(queue_size=2), on_result=results.append)
    assert sender.submit("k1", {"n": 1}) is True and sender.submit("k2", {"n": 2}) is True
    # submit is a plain call (nothing to await) that answers at once with a bool.
    assert not inspect.iscoroutinefunction(WebhookSender.submit)

    # Nobody ever makes room in the queue (the sender is not even started): a submit that waited for room
    # would never return. The burst runs in a thread so that such a wait fails this test instead of hanging it.
    accepted: list[object] = []
    reported: list[int] = []
    done = threading.Event()

    def burst() -> None:
        for i in range(1000):
            accepted.append(sender.submit(f"more-{i}", {"n": i}))
            reported.append(len(results))
        done.set()

    threading.Thread(target=burst, daemon=True).start()
    assert done.wait(120), f"submit blocked on a full queue after {len(accepted)} of 1000 calls"
    assert accepted == [False] * 1000 and all(type(a) is bool for a in accepted)
    # Each drop is reported once, inside the submit that dropped it (before submit returned).
    assert reported == list(range(1, 1001))
    assert sender.dropped == 1000 and sender.pending == 2
    assert [d.key for d in results] == [f"more-{i}" for i in range(1000)]
    assert all((d.delivered, d.error, d.attempts, d.status) == (False, "queue_full", 0, None) for d in results)
    assert [d.body for d in results[:2]] == [b'{"n":0}', b'{"n":1}']
    # a dropped key is not remembered: once there is room it can be submitted again
    assert sender.duplicates == 0
    sender._queue.get_nowait()
    assert sender.submit("more-0", {"n": 0}) is True


def test_submit_never_raises() -> None:
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


def test_stop_before_start_reports_pending_as_stopped_and_refuses_new_work() -> None:
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
