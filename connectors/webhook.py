"""The webhook enforcement action: tell the agent orchestrator to pause an agent writeguard quarantined.

The worker's stream must never wait on the orchestrator, so :meth:`WebhookSender.submit` only puts the
delivery on a bounded in-memory queue and returns; background tasks POST it, retry it, and report the
outcome once through ``on_result`` (for metrics, and to record it on the control topic). When the queue
is full the delivery is dropped and reported rather than blocking the stream: the quarantine itself is
already on the control topic, the webhook only speeds up enforcement.

Every POST carries::

    Content-Type: application/json
    X-Writeguard-Timestamp: <unix seconds, of this attempt>
    X-Writeguard-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<idempotency key>." + body)>
    Idempotency-Key: <alert id>:<action>        (the same on every retry)
    User-Agent: writeguard/<version>

The signed message is the timestamp (ASCII decimal digits), a ``.``, the idempotency key, a ``.``, then the
raw body bytes. The key is 1 to 255 visible ASCII characters other than ``.`` (writeguard's are
``<uuid>:<action>``), so the message splits one way only: no byte can move between key and body without
breaking the signature.

What the receiver must do, in this order:

1. Keep the raw body bytes: the signature covers those bytes, not a re-serialisation of the parsed JSON.
2. ``verify_headers(secret, request_headers, raw_body)`` (or ``verify(secret, timestamp, idempotency_key,
   raw_body, signature)`` with the three header values): the HMAC must match (compared in constant time)
   and the timestamp must be within ``tolerance_s`` (5 minutes) of its own clock. Both return False, never
   raise, on anything malformed or missing. Because the timestamp is signed, an attacker who captured a
   request cannot replay it later with a fresh one; because the key is signed, they cannot send it again
   under a new key to get past the receiver's dedupe.
3. Remember each ``Idempotency-Key`` for at least the tolerance window and act on it once: within that
   window a captured request could still be replayed, and writeguard itself retries when it did not see
   a 2xx (each retry is signed anew, with a new timestamp, so a long backoff never makes it stale).

Delivery is at most ``1 + retries`` attempts; 2xx is success; connection errors, timeouts, 429 and 5xx are
retried (honouring ``Retry-After`` seconds, capped at ``backoff_max_s``); any other status is final,
redirects included (a redirected signed POST is not followed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.metadata
import json
import logging
import math
import random
import re
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeGuard
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from detectors.masking import HttpHeaders

log = logging.getLogger("writeguard.webhook")

TIMESTAMP_HEADER = "X-Writeguard-Timestamp"
SIGNATURE_HEADER = "X-Writeguard-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_RESERVED = frozenset(
    h.lower() for h in ("Content-Type", "User-Agent", TIMESTAMP_HEADER, SIGNATURE_HEADER, IDEMPOTENCY_HEADER)
)


def _version() -> str:
    """The package version for User-Agent, also from a source checkout (where no metadata is installed)."""
    try:
        return importlib.metadata.version("writeguard")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
        return str(data["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


USER_AGENT = f"writeguard/{_version()}"


class WebhookSettings(BaseModel):
    """Where and how to POST the pause request; embedded in writeguard's YAML config.

    ``secret`` should come from ``${ENV}`` in the YAML. It and the values of secret-looking ``headers``
    (``Authorization``, ``Cookie``, ``*-Key``, ``*Token*``) are masked in ``repr`` and JSON dumps, so they
    never reach logs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="The orchestrator's pause endpoint, http:// or https://.")
    secret: SecretStr = Field(min_length=1, description="HMAC-SHA256 key; use ${ENV_VAR}.")
    timeout_s: float = Field(2.0, gt=0, description="Per attempt: connect, send and response headers.")
    retries: int = Field(3, ge=0, le=20, description="Attempts after the first.")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles each retry, with jitter.")
    backoff_max_s: float = Field(10.0, ge=0, description="Cap on any retry delay, Retry-After included.")
    queue_size: int = Field(1000, ge=1, description="Pending deliveries; when full, new ones are dropped.")
    concurrency: int = Field(
        4,
        ge=1,
        le=100,
        description="Deliveries in flight at once, so one slow pause request does not hold back the next "
        "agent's. Deliveries are independent: their order is not kept.",
    )
    headers: HttpHeaders = Field(
        default_factory=HttpHeaders, description="Extra headers, e.g. Authorization: Bearer ${ORCHESTRATOR_TOKEN}."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            _port = parts.port  # raises on a non-numeric or out-of-range port
        except ValueError as e:
            raise ValueError(f"not a valid URL: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise ValueError("the URL has no host")
        if any(c.isspace() for c in v):
            raise ValueError("the URL contains whitespace")
        return v

    @field_validator("headers")
    @classmethod
    def _not_reserved(cls, v: HttpHeaders) -> HttpHeaders:
        clash = sorted(k for k in v if k.lower() in _RESERVED)
        if clash:
            raise ValueError(f"headers set by writeguard cannot be overridden: {clash}")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> WebhookSettings:
        if self.backoff_max_s < self.backoff_s:
            raise ValueError("backoff_max_s must be at least backoff_s")
        return self


SIGNATURE_PREFIX = "sha256="
_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # ASCII digits only: int() also takes " 1_7", "+17", other scripts' digits
_KEY = re.compile(r"[\x21-\x2d\x2f-\x7e]{1,255}")  # visible ASCII without "."
_SIGNATURE = re.compile(SIGNATURE_PREFIX + r"[0-9a-fA-F]{64}")


def valid_idempotency_key(key: object) -> TypeGuard[str]:
    """True if ``key`` can be signed: 1 to 255 visible ASCII characters, none of them ``.``."""
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def signed_message(timestamp: str, idempotency_key: str, body: bytes) -> bytes:
    """The bytes the HMAC covers: ``"<timestamp>.<idempotency key>." + body``."""
    return f"{timestamp}.{idempotency_key}.".encode("ascii") + body


def sign(secret: bytes, timestamp: str, idempotency_key: str, body: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256 of ``"<timestamp>.<idempotency key>." + body``.

    The timestamp is signed so that a receiver can refuse old requests: a captured request replayed later
    carries a stale timestamp, and changing it breaks the signature. The idempotency key is signed so that
    a captured request cannot be re-sent under another key to get past the receiver's dedupe. The receiver
    recomputes the signature over the raw body and checks the timestamp window with :func:`verify`.
    Raises ValueError on an empty secret, a timestamp that is not 1 to 12 ASCII digits, or a key that
    :func:`valid_idempotency_key` refuses.

    Examples
    --------

    >>> import time
    >>> body = b'{"action":"pause","agent_id":"agent-7"}'
    >>> ts = str(int(time.time()))  # sent as X-Writeguard-Timestamp
    >>> key = "4f9c1e7a-alert:webhook"  # sent as Idempotency-Key
    >>> sig = sign(b"s3cret", ts, key, body)  # sent as X-Writeguard-Signature
    >>> verify(b"s3cret", ts, key, body, sig)  # the receiver's check
    True
    >>> verify(b"s3cret", ts, key, body.replace(b"agent-7", b"agent-8"), sig)
    False
    >>> verify(b"s3cret", ts, "another-alert:webhook", body, sig)  # the key is signed too
    False
    >>> verify(b"s3cret", None, key, body, sig)  # a missing header: False, not an exception
    False

    """
    if not secret:
        raise ValueError("the webhook secret is empty")
    if _TIMESTAMP.fullmatch(timestamp) is None:
        raise ValueError(f"timestamp must be 1 to 12 ASCII digits, got {timestamp!r}")
    if not valid_idempotency_key(idempotency_key):
        raise ValueError(
            f"idempotency key must be 1 to 255 visible ASCII characters without '.', got {idempotency_key!r}"
        )
    mac = hmac.new(secret, signed_message(timestamp, idempotency_key, body), hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify(
    secret: bytes | bytearray,
    timestamp: str | None,
    idempotency_key: str | None,
    body: bytes | bytearray,
    signature: str | None,
    *,
    now: float | None = None,
    tolerance_s: float = 300,
) -> bool:
    """The receiver's check: the signature matches and the timestamp is within ``tolerance_s`` of ``now``.

    ``timestamp``, ``idempotency_key`` and ``signature`` are the header values as received (None when a
    header is missing); ``body`` is the raw body. Returns False, and never raises, on anything malformed: a
    missing value, a value of the wrong type, a timestamp that is not 1 to 12 ASCII digits, a key
    :func:`valid_idempotency_key` refuses, a signature that is not ``sha256=`` and 64 hex digits, an empty
    secret, or a non-finite ``now`` or ``tolerance_s``.

    The window is symmetric, so a sender clock that runs ahead is tolerated as much as one that lags. The
    comparison is constant-time so the response time does not reveal how much of a forged signature was
    right. Within the window a replay is still possible: dedupe on ``Idempotency-Key`` for that long.
    """
    if not isinstance(secret, bytes | bytearray) or not secret:
        return False
    if not isinstance(timestamp, str) or _TIMESTAMP.fullmatch(timestamp) is None:
        return False
    if not valid_idempotency_key(idempotency_key):
        return False
    if not isinstance(body, bytes | bytearray):
        return False
    if not isinstance(signature, str) or _SIGNATURE.fullmatch(signature) is None:
        return False
    try:
        current = float(time.time() if now is None else now)
        tolerance = float(tolerance_s)
    except (TypeError, ValueError, OverflowError):
        return False
    if not (math.isfinite(current) and math.isfinite(tolerance)) or abs(current - int(timestamp)) > tolerance:
        return False
    expected = hmac.new(bytes(secret), signed_message(timestamp, idempotency_key, bytes(body)), hashlib.sha256)
    return hmac.compare_digest(expected.digest(), bytes.fromhex(signature[len(SIGNATURE_PREFIX) :]))


class _Headers(Protocol):
    def items(self) -> Iterable[tuple[Any, Any]]: ...


def verify_headers(
    secret: bytes,
    headers: _Headers,
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: float = 300,
) -> bool:
    """:func:`verify` on a request's headers, looked up case-insensitively.

    ``headers`` is anything with ``items()``: a dict, aiohttp's ``request.headers``, ``http.server``'s
    ``self.headers``, Flask's or Starlette's. A header that is missing, or that appears more than once, makes it
    False; like :func:`verify` it never raises on what the request carries.
    """
    wanted = {TIMESTAMP_HEADER.lower(), IDEMPOTENCY_HEADER.lower(), SIGNATURE_HEADER.lower()}
    found: dict[str, Any] = {}
    try:
        for name, value in headers.items():
            low = name.lower() if isinstance(name, str) else ""
            if low in wanted:
                if low in found:
                    return False  # two values: which one was signed is ambiguous
                found[low] = value
    except Exception:  # a headers object that cannot be iterated is malformed input, not a crash
        return False
    return verify(
        secret,
        found.get(TIMESTAMP_HEADER.lower()),
        found.get(IDEMPOTENCY_HEADER.lower()),
        body,
        found.get(SIGNATURE_HEADER.lower()),
        now=now,
        tolerance_s=tolerance_s,
    )


def idempotency_key(alert_id: str, action: str) -> str:
    """The key of one enforcement: the same alert reprocessed yields the same key, so it is sent once."""
    return f"{alert_id}:{action}"


def backoff_delay(
    settings: WebhookSettings,
    retry: int,
    retry_after: str | None = None,
    *,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first retry).

    ``backoff_s * 2**(retry-1)``, capped at ``backoff_max_s``, minus up to 20% of jitter so that several
    workers retrying against the same endpoint spread out; the jitter never makes a delay longer than the
    nominal one, so successive delays still grow until the cap. A ``Retry-After`` in seconds from the
    server replaces it (capped too: a server cannot park a delivery for an hour); an HTTP-date or a
    malformed value is ignored.
    """
    if retry_after is not None:
        try:
            seconds = float(retry_after.strip())
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds):
            return min(max(seconds, 0.0), settings.backoff_max_s)
    nominal = min(settings.backoff_s * 2.0 ** max(retry - 1, 0), settings.backoff_max_s)
    return nominal * (1.0 - 0.2 * rand())


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one submitted delivery, reported once through ``on_result``.

    ``error`` is ``None`` on success, else a short code first: ``"timeout"``, ``"http <status>"``,
    ``"connection: <detail>"``, ``"queue_full"`` (dropped at submit), ``"stopped"`` (the sender stopped
    before the delivery finished), ``"invalid_payload: <detail>"``, ``"invalid_key: <detail>"`` (a key that
    cannot be signed, refused at submit) or ``"internal: <detail>"``.
    ``elapsed_s`` runs from :meth:`WebhookSender.submit` to the outcome, so queueing counts.
    """

    key: str
    body: bytes
    attempts: int
    status: int | None
    error: str | None
    delivered: bool
    elapsed_s: float


@dataclass(slots=True)
class _Job:
    key: str
    body: bytes
    submitted: float
    attempts: int = 0
    status: int | None = None
    error: str | None = None


_RETRY_STATUS = frozenset({429})


def _retryable(status: int) -> bool:
    return status in _RETRY_STATUS or 500 <= status <= 599


class WebhookSender:
    """Delivers signed POSTs from a bounded queue in the background; ``submit`` never blocks.

    Use from the worker's event loop: ``await start()`` once, ``submit()`` from the stream, ``await
    stop()`` at shutdown. ``on_result`` runs on the event loop, also synchronously inside ``submit`` for a
    dropped delivery, so it must be quick and must not block (increment a counter, hand a record to the
    producer); an exception it raises is logged and swallowed.
    """

    seen_keys_max: ClassVar[int] = 10_000

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        on_result: Callable[[Delivery], None] | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        self.settings = settings
        self._on_result = on_result
        self._session_factory = session_factory
        self._secret = settings.secret.get_secret_value().encode()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=settings.queue_size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.dropped = 0
        """Deliveries refused because the queue was full (also reported with error ``queue_full``)."""
        self.duplicates = 0
        """Submits refused because their key was already submitted (not reported: not a new delivery)."""

    @property
    def pending(self) -> int:
        """Deliveries waiting in the queue, not counting those in flight."""
        return self._queue.qsize()

    async def start(self) -> None:
        """Open the HTTP session and start the delivery tasks; a second call does nothing."""
        if self._tasks:
            return
        if self._closed:
            raise RuntimeError("a stopped WebhookSender cannot be restarted")
        self._session = self._session_factory() if self._session_factory else aiohttp.ClientSession()
        self._tasks = [
            asyncio.create_task(self._run(), name=f"writeguard-webhook-{i}") for i in range(self.settings.concurrency)
        ]

    def submit(self, key: str, payload: Mapping[str, Any]) -> bool:
        """Queue one delivery without waiting; False if the queue is full or ``key`` was already submitted.

        Never raises and never blocks, because it is called from the stream. ``key`` is the
        ``Idempotency-Key``, which is signed: one that :func:`valid_idempotency_key` refuses is reported with
        error ``invalid_key`` and not queued. The key is remembered (the
        last ``seen_keys_max`` of them) only when the delivery is queued, so a dropped one can be tried
        again. The body is the payload as JSON with sorted keys, so equal payloads give equal bytes.
        """
        now = time.monotonic()
        if not valid_idempotency_key(key):  # it could not be signed
            log.error("webhook delivery key %r is not a valid idempotency key", key)
            self._report(_Job(str(key), b"", now, error="invalid_key: 1 to 255 visible ASCII characters, no '.'"))
            return False
        if key in self._seen:
            self._seen.move_to_end(key)
            self.duplicates += 1
            return False
        try:
            body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        except Exception as e:  # TypeError, ValueError (circular), RecursionError: never into the stream
            log.error("webhook payload for %s is not JSON-serialisable: %s", key, e)
            self._report(_Job(key, b"", now, error=f"invalid_payload: {e}"))
            return False
        job = _Job(key, body, now)
        if self._closed:
            job.error = "stopped"
            self._report(job)
            return False
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1
            job.error = "queue_full"
            if self.dropped == 1 or self.dropped % 1000 == 0:  # each drop is reported; the log stays short
                log.warning(
                    "webhook queue full (%d pending): dropped delivery %s, %d dropped so far",
                    self.settings.queue_size,
                    key,
                    self.dropped,
                )
            self._report(job)
            return False
        self._seen[key] = None
        if len(self._seen) > self.seen_keys_max:
            self._seen.popitem(last=False)
        return True

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop taking deliveries, finish what completes within ``timeout``, then cancel the rest.

        Everything not delivered by then is reported with error ``stopped``, so each submitted delivery
        gets exactly one outcome.
        """
        self._closed = True
        try:
            if self._tasks:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), timeout)
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
            while not self._queue.empty():
                job = self._queue.get_nowait()
                job.error = "stopped"
                self._report(job)
                self._queue.task_done()
            if self._session is not None:
                await self._session.close()
                self._session = None

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._deliver(job)
            except asyncio.CancelledError:
                job.error = "stopped"
                self._report(job)
                raise
            except Exception as e:  # a bug must not silently end the delivery task
                log.exception("webhook delivery %s failed unexpectedly", job.key)
                job.error = f"internal: {e!r}"[:500]
                self._report(job)
            finally:
                self._queue.task_done()

    async def _deliver(self, job: _Job) -> None:
        s = self.settings
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=s.timeout_s)
        while True:
            job.attempts += 1
            retry_after: str | None = None
            ts = str(int(time.time()))
            headers = {
                **s.headers,
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                TIMESTAMP_HEADER: ts,
                SIGNATURE_HEADER: sign(self._secret, ts, job.key, job.body),
                IDEMPOTENCY_HEADER: job.key,
            }
            try:
                async with self._session.post(
                    s.url, data=job.body, headers=headers, timeout=timeout, allow_redirects=False
                ) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                job.status = status
                if 200 <= status <= 299:
                    job.error = None
                    self._report(job, delivered=True)
                    return
                job.error = f"http {status}"
                retry = _retryable(status)
            except TimeoutError:  # aiohttp's own timeouts subclass it
                job.status, job.error, retry = None, "timeout", True
            except aiohttp.ClientError as e:
                job.status, job.error, retry = None, f"connection: {e}"[:500], True
            if not retry or job.attempts > s.retries:
                log.warning("webhook delivery %s failed after %d attempt(s): %s", job.key, job.attempts, job.error)
                self._report(job)
                return
            await asyncio.sleep(backoff_delay(s, job.attempts, retry_after))

    def _report(self, job: _Job, *, delivered: bool = False) -> None:
        if self._on_result is None:
            return
        result = Delivery(
            key=job.key,
            body=job.body,
            attempts=job.attempts,
            status=job.status,
            error=job.error,
            delivered=delivered,
            elapsed_s=time.monotonic() - job.submitted,
        )
        try:
            self._on_result(result)
        except Exception:  # the callback must not break the stream (submit) or a delivery task
            log.exception("webhook on_result callback failed for %s", job.key)
