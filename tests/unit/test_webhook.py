"""Tests for connectors.webhook without a network: signing, settings, backoff, and submit's bookkeeping."""

from __future__ import annotations

import asyncio
import doctest
import email.message
import hashlib
import hmac
import inspect
import math
import threading
import time
from typing import Any

import pytest
from multidict import CIMultiDict
from pydantic import ValidationError

from connectors import webhook
from connectors.webhook import (
    Delivery,
    WebhookSender,
    WebhookSettings,
    backoff_delay,
    idempotency_key,
    sign,
    valid_idempotency_key,
    verify,
    verify_headers,
)

SECRET = b"s3cret"
BODY = b'{"action":"pause","agent_id":"agent-7"}'
TS = "1700000000"
NOW = 1700000000
KEY = "a1:pause"


def settings(**kw: Any) -> WebhookSettings:
    return WebhookSettings(**{"url": "https://orchestrator.example/agents/pause", "secret": "s3cret", **kw})


# --- sign / verify --------------------------------------------------------------------------------


def test_docstring_examples_run() -> None:
    result = doctest.testmod(webhook, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 9 and result.failed == 0  # the examples of sign(), including the key and None cases


def raw_signature(ts: str, key: str, body: bytes, secret: bytes = SECRET) -> str:
    """The documented format computed independently of connectors.webhook, for any strings at all."""
    return "sha256=" + hmac.new(secret, ts.encode() + b"." + key.encode() + b"." + body, hashlib.sha256).hexdigest()


def test_sign_is_hmac_sha256_over_timestamp_key_and_body() -> None:
    expected = hmac.new(SECRET, b"1700000000.a1:pause." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, TS, KEY, BODY) == "sha256=" + expected == raw_signature(TS, KEY, BODY)


def test_verify_accepts_a_fresh_valid_signature() -> None:
    assert verify(SECRET, TS, KEY, BODY, sign(SECRET, TS, KEY, BODY), now=NOW + 299)
    assert verify(SECRET, TS, KEY, BODY, sign(SECRET, TS, KEY, BODY), now=NOW - 299)
    # Upper-case hex is the same digest; bytearray secret and body are bytes too.
    upper = "sha256=" + sign(SECRET, TS, KEY, BODY).removeprefix("sha256=").upper()
    assert verify(bytearray(SECRET), TS, KEY, bytearray(BODY), upper, now=NOW)


@pytest.mark.parametrize(
    ("secret", "ts_sent", "key_sent", "body_sent", "now"),
    [
        (SECRET, TS, KEY, BODY + b" ", NOW),  # tampered body
        (b"other", TS, KEY, BODY, NOW),  # wrong secret
        (SECRET, TS, KEY, BODY, NOW + 301),  # too old
        (SECRET, TS, KEY, BODY, NOW - 301),  # too far in the future
        (SECRET, "1700000300", KEY, BODY, NOW + 300),  # timestamp refreshed by a replayer
        (SECRET, TS, "a2:pause", BODY, NOW),  # the same request re-sent under another key
        (SECRET, TS, "a1:pause-again", BODY, NOW),  # a key extended to dodge the receiver's dedupe
        (SECRET, TS, "a1", BODY, NOW),  # a key shortened
    ],
    ids=[
        "tampered-body",
        "wrong-secret",
        "old-timestamp",
        "future-timestamp",
        "swapped-timestamp",
        "swapped-idempotency-key",
        "extended-idempotency-key",
        "shortened-idempotency-key",
    ],
)
def test_verify_refuses(secret: bytes, ts_sent: str, key_sent: str, body_sent: bytes, now: int) -> None:
    sig = sign(SECRET, TS, KEY, BODY)
    assert verify(SECRET, TS, KEY, BODY, sig, now=NOW)  # the untouched request passes: only the change fails it
    assert verify(secret, ts_sent, key_sent, body_sent, sig, now=now) is False


def test_bytes_cannot_move_between_key_and_body() -> None:
    """The key may not contain ".", so "<ts>.<key>.<body>" splits one way only."""
    body = b"x." + BODY
    sig = sign(SECRET, TS, "k", body)  # signs b"1700000000.k.x.{...}"
    assert raw_signature(TS, "k.x", BODY) == sig  # the same bytes, split differently
    assert verify(SECRET, TS, "k", body, sig, now=NOW)
    assert verify(SECRET, TS, "k.x", BODY, sig, now=NOW) is False
    with pytest.raises(ValueError, match="idempotency key"):
        sign(SECRET, TS, "k.x", BODY)


def _valid() -> dict[str, Any]:
    return {
        "secret": SECRET,
        "timestamp": TS,
        "idempotency_key": KEY,
        "body": BODY,
        "signature": sign(SECRET, TS, KEY, BODY),
        "now": float(NOW),
        "tolerance_s": 300,
    }


_HEX = sign(SECRET, TS, KEY, BODY).removeprefix("sha256=")

# Each case changes one argument of a valid call. Where the changed value is well-formed enough for a lenient
# implementation to compute an HMAC over it, the signature is recomputed over exactly those bytes
# (raw_signature), so that only the format check can make the result False.
MALFORMED: dict[str, dict[str, Any]] = {
    # missing headers
    "timestamp-missing": {"timestamp": None},
    "key-missing": {"idempotency_key": None},
    "signature-missing": {"signature": None},
    "body-missing": {"body": None},
    # wrong types
    "timestamp-int": {"timestamp": NOW},
    "timestamp-bytes": {"timestamp": TS.encode()},
    "key-bytes": {"idempotency_key": KEY.encode()},
    "key-int": {"idempotency_key": 7},
    "signature-bytes": {"signature": sign(SECRET, TS, KEY, BODY).encode()},
    "body-str": {"body": BODY.decode()},
    "body-memoryview": {"body": memoryview(BODY)},
    "body-list": {"body": list(BODY)},
    "secret-str": {"secret": SECRET.decode()},
    "secret-empty": {"secret": b""},
    "secret-none": {"secret": None},
    # timestamps
    "timestamp-empty": {"timestamp": ""},
    "timestamp-letters": {"timestamp": "abc"},
    "timestamp-float": {"timestamp": "1700000000.0", "signature": raw_signature("1700000000.0", KEY, BODY)},
    "timestamp-exponent": {"timestamp": "1.7e9", "signature": raw_signature("1.7e9", KEY, BODY)},
    "timestamp-nan": {"timestamp": "nan"},
    "timestamp-negative": {"timestamp": "-1700000000", "signature": raw_signature("-1700000000", KEY, BODY)},
    "timestamp-plus-sign": {"timestamp": "+1700000000", "signature": raw_signature("+1700000000", KEY, BODY)},
    "timestamp-spaces": {"timestamp": " 1700000000 ", "signature": raw_signature(" 1700000000 ", KEY, BODY)},
    "timestamp-newline": {"timestamp": "1700000000\n", "signature": raw_signature("1700000000\n", KEY, BODY)},
    "timestamp-underscores": {"timestamp": "1_700_000_000", "signature": raw_signature("1_700_000_000", KEY, BODY)},
    "timestamp-arabic-digits": {
        "timestamp": "\u0661\u0667" + "\u0660" * 8,
        "signature": raw_signature("\u0661\u0667" + "\u0660" * 8, KEY, BODY),
    },
    "timestamp-20-digits": {
        "timestamp": "99999999999999999999",
        "signature": raw_signature("99999999999999999999", KEY, BODY),
        "now": 1e20,
    },
    "timestamp-400-digits": {"timestamp": "9" * 400, "signature": raw_signature("9" * 400, KEY, BODY)},
    "timestamp-5000-digits": {"timestamp": "9" * 5000},
    # idempotency keys
    "key-empty": {"idempotency_key": "", "signature": raw_signature(TS, "", BODY)},
    "key-with-dot": {"idempotency_key": "a1.pause", "signature": raw_signature(TS, "a1.pause", BODY)},
    "key-with-space": {"idempotency_key": "a1 pause", "signature": raw_signature(TS, "a1 pause", BODY)},
    "key-with-newline": {"idempotency_key": "a1\npause", "signature": raw_signature(TS, "a1\npause", BODY)},
    "key-non-ascii": {"idempotency_key": "a1:päuse", "signature": raw_signature(TS, "a1:päuse", BODY)},
    "key-256-chars": {"idempotency_key": "k" * 256, "signature": raw_signature(TS, "k" * 256, BODY)},
    # signatures
    "signature-empty": {"signature": ""},
    "signature-prefix-only": {"signature": "sha256="},
    "signature-without-prefix": {"signature": sign(SECRET, TS, KEY, BODY).removeprefix("sha256=")},
    "signature-upper-case-prefix": {"signature": "SHA256=" + sign(SECRET, TS, KEY, BODY).removeprefix("sha256=")},
    "signature-other-algorithm": {"signature": "md5=" + hashlib.md5(b"x").hexdigest()},
    "signature-zeros": {"signature": "sha256=" + "0" * 64},
    "signature-not-hex": {"signature": "sha256=" + "g" * 64},
    "signature-one-short": {"signature": sign(SECRET, TS, KEY, BODY)[:-1]},
    "signature-one-long": {"signature": sign(SECRET, TS, KEY, BODY) + "0"},
    "signature-twice": {"signature": sign(SECRET, TS, KEY, BODY) * 2},
    "signature-with-spaces": {"signature": " " + sign(SECRET, TS, KEY, BODY)},
    "signature-hex-with-a-space": {"signature": "sha256=" + _HEX[:2] + " " + _HEX[2:-1]},  # bytes.fromhex takes it
    "signature-non-ascii": {"signature": "sha256=é" + "0" * 63},
    "signature-trailing-newline": {"signature": sign(SECRET, TS, KEY, BODY) + "\n"},
    # the receiver's clock and window
    "now-nan": {"now": math.nan},
    "now-inf": {"now": math.inf},
    "now-huge-int": {"now": 10**400},
    "now-str": {"now": "soon"},
    "tolerance-nan": {"tolerance_s": math.nan, "now": float(NOW + 10**6)},
    "tolerance-negative": {"tolerance_s": -1},
    "tolerance-huge-int": {"tolerance_s": 10**400},
}


@pytest.mark.parametrize("change", list(MALFORMED.values()), ids=list(MALFORMED))
def test_verify_returns_false_on_malformed_input(change: dict[str, Any]) -> None:
    assert verify(**_valid()) is True  # the baseline passes: the one change below is what fails it
    args = {**_valid(), **change}
    try:
        result = verify(**args)
    except Exception as e:
        pytest.fail(f"verify raised {e!r} on {change}")
    assert result is False, change


def test_the_recomputed_cases_carry_the_real_hmac_of_what_was_sent() -> None:
    """In those cases the HMAC itself matches, so only verify's format checks can refuse them."""
    recomputed = [k for k, v in MALFORMED.items() if "signature" in v and len(v) > 1]
    assert len(recomputed) == 16, recomputed
    for case in recomputed:
        args = {**_valid(), **MALFORMED[case]}
        expected = raw_signature(args["timestamp"], args["idempotency_key"], args["body"])
        assert args["signature"] == expected, case


def test_verify_uses_the_clock_by_default() -> None:
    ts = str(int(time.time()))
    assert verify(SECRET, ts, KEY, BODY, sign(SECRET, ts, KEY, BODY))
    old = str(int(time.time()) - 3600)
    assert not verify(SECRET, old, KEY, BODY, sign(SECRET, old, KEY, BODY))
    assert verify(SECRET, old, KEY, BODY, sign(SECRET, old, KEY, BODY), tolerance_s=7200)


@pytest.mark.parametrize(
    ("secret", "ts", "key", "message"),
    [
        (b"", TS, KEY, "secret is empty"),
        (SECRET, "", KEY, "timestamp"),
        (SECRET, "17e8", KEY, "timestamp"),
        (SECRET, "1" * 13, KEY, "timestamp"),
        (SECRET, TS, "", "idempotency key"),
        (SECRET, TS, "a.b", "idempotency key"),
        (SECRET, TS, "a b", "idempotency key"),
        (SECRET, TS, "k" * 256, "idempotency key"),
    ],
)
def test_sign_refuses_what_verify_would_refuse(secret: bytes, ts: str, key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sign(secret, ts, key, BODY)


def test_valid_idempotency_keys() -> None:
    assert valid_idempotency_key(idempotency_key("0b7a4c1e-3f7d-5c2a-9e1b-2d4f6a8c0e1f", "webhook"))
    assert valid_idempotency_key("k" * 255) and valid_idempotency_key("!~")
    for bad in ("", "a.b", "k" * 256, "a b", "a\tb", "a\x7fb", "é", None, b"k", 1):
        assert not valid_idempotency_key(bad), bad


def _headers() -> dict[str, str]:
    return {
        "X-Writeguard-Timestamp": TS,
        "X-Writeguard-Signature": sign(SECRET, TS, KEY, BODY),
        "Idempotency-Key": KEY,
    }


def test_verify_headers_reads_the_three_headers_in_any_case() -> None:
    assert verify_headers(SECRET, _headers(), BODY, now=NOW)
    assert verify_headers(SECRET, {k.lower(): v for k, v in _headers().items()}, BODY, now=NOW)
    assert verify_headers(SECRET, CIMultiDict(_headers()), BODY, now=NOW)  # aiohttp's request.headers
    message = email.message.Message()  # http.server's self.headers
    for k, v in _headers().items():
        message[k.upper()] = v
    assert verify_headers(SECRET, message, BODY, now=NOW)
    assert not verify_headers(SECRET, _headers(), BODY, now=NOW + 301)
    assert not verify_headers(SECRET, {**_headers(), "Idempotency-Key": "a2:pause"}, BODY, now=NOW)


@pytest.mark.parametrize(
    "headers",
    [
        {k: v for k, v in _headers().items() if k != "X-Writeguard-Timestamp"},
        {k: v for k, v in _headers().items() if k != "Idempotency-Key"},
        {k: v for k, v in _headers().items() if k != "X-Writeguard-Signature"},
        {},
        {**_headers(), "idempotency-key": "a2:pause"},  # two keys: which one was signed?
        CIMultiDict([*_headers().items(), ("Idempotency-Key", KEY)]),  # the same one twice
        {**_headers(), "X-Writeguard-Timestamp": None},
        {**_headers(), "X-Writeguard-Timestamp": 1700000000},
        None,
        42,
        [("X-Writeguard-Timestamp", TS)],
    ],
    ids=[
        "no-timestamp",
        "no-key",
        "no-signature",
        "empty",
        "two-keys",
        "duplicate-key",
        "none-value",
        "int-value",
        "none",
        "int",
        "list",
    ],
)
def test_verify_headers_returns_false_on_missing_duplicate_or_malformed_headers(headers: Any) -> None:
    try:
        result = verify_headers(SECRET, headers, BODY, now=NOW)
    except Exception as e:
        pytest.fail(f"verify_headers raised {e!r}")
    assert result is False


def deliver_once(
    wh: WebhookSettings, key: str, payload: dict[str, Any]
) -> tuple[list[Delivery], dict[str, str], bytes]:
    """One delivery through a real WebhookSender to a fake HTTP session: (outcomes, headers sent, body sent)."""
    sent: list[tuple[dict[str, str], bytes]] = []

    class Response:
        status = 200
        headers: dict[str, str] = {}

        async def __aenter__(self) -> Response:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

    class Session:
        def post(self, url: str, *, data: bytes, headers: dict[str, str], **kw: Any) -> Response:
            sent.append((headers, data))
            return Response()

        async def close(self) -> None:
            return None

    results: list[Delivery] = []

    async def main() -> None:
        sender = WebhookSender(wh, on_result=results.append, session_factory=Session)  # type: ignore[arg-type]
        await sender.start()
        assert sender.submit(key, payload)
        deadline = time.monotonic() + 60
        while not results:
            assert time.monotonic() < deadline, "no outcome within 60 s"
            await asyncio.sleep(0.01)
        await sender.stop()

    asyncio.run(main())
    [(headers, body)] = sent
    return results, headers, body


def test_the_sender_signs_the_idempotency_key_it_sends() -> None:
    """What WebhookSender puts on the wire verifies, and only under the Idempotency-Key it sent."""
    results, headers, body = deliver_once(settings(), "a9:webhook", {"agent_id": "agent-9"})
    assert [r.delivered for r in results] == [True]
    assert headers["Idempotency-Key"] == "a9:webhook"
    assert verify_headers(SECRET, headers, body)
    assert headers["X-Writeguard-Signature"] == raw_signature(headers["X-Writeguard-Timestamp"], "a9:webhook", body)
    assert not verify_headers(SECRET, {**headers, "Idempotency-Key": "a8:webhook"}, body)


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
    asyncio.run(sender.stop(timeout=0.1))  # never started: each queued delivery is reported "stopped", with its body
    assert [(d.key, d.body, d.error) for d in results] == [
        ("alert-1:pause", b'{"a":1,"b":2}', "stopped"),
        ("alert-1:notify", b'{"a":1}', "stopped"),
    ]


def test_seen_keys_are_a_bounded_lru() -> None:
    sender = WebhookSender(settings())
    sender.seen_keys_max = 3  # type: ignore[misc]  # this instance only
    for k in ("k1", "k2", "k3"):
        assert sender.submit(k, {})
    assert not sender.submit("k1", {})  # refreshes k1: k2 is now the oldest
    assert sender.submit("k4", {})  # evicts k2
    assert sender.submit("k2", {})  # forgotten, so accepted again; evicts k3
    assert not sender.submit("k1", {})  # refreshed above, still remembered
    assert not sender.submit("k4", {}) and not sender.submit("k2", {})
    assert sender.submit("k3", {})  # only three keys are remembered: k3 was the oldest
    assert sender.duplicates == 4


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
    # A dropped key is not remembered: submitted again it is a new delivery (dropped and reported once more, the
    # queue being still full), not a refused duplicate, so it goes out once there is room.
    assert sender.duplicates == 0
    assert sender.submit("more-0", {"n": 0}) is False
    assert sender.duplicates == 0 and sender.dropped == 1001
    assert (results[-1].key, results[-1].error) == ("more-0", "queue_full")


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
