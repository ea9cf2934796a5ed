"""connectors.webhook against a real aiohttp server on 127.0.0.1: signatures, retries, timeouts, drops.

No Kafka here: the receiver stands in for the agent orchestrator's pause endpoint. Nothing here measures time:
the retry policy is checked by what the server saw and by the delays the sender chose (a spy on
``backoff_delay``), in order, never by how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from connectors import webhook
from connectors.webhook import USER_AGENT, Delivery, WebhookSender, WebhookSettings, verify_headers

pytestmark = pytest.mark.integration

SECRET = "integration-secret"
DEADLINE_S = 60.0  # generous: the machine is shared and has two cores


@dataclass
class Seen:
    """One request as the receiver got it."""

    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class Receiver:
    url: str
    requests: list[Seen] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


Respond = Callable[[Receiver, int], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def receiver(respond: Respond) -> AsyncIterator[Receiver]:
    """A real HTTP server on a free port; ``respond(receiver, n)`` answers the n-th request (from 1)."""
    rec = Receiver(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        ok = verify_headers(SECRET.encode(), request.headers, body)
        rec.requests.append(Seen(dict(request.headers), body, ok))
        rec.arrived.set()
        return await respond(rec, len(rec.requests))

    app = web.Application()
    app.router.add_post("/pause", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    rec.url = f"http://{host}:{port}/pause"
    try:
        yield rec
    finally:
        rec.release.set()
        await runner.cleanup()


def make(url: str, **kw: Any) -> WebhookSettings:
    return WebhookSettings(
        url=url, secret=SECRET, **{"timeout_s": 1.0, "retries": 3, "backoff_s": 0.01, "backoff_max_s": 1.0, **kw}
    )


class Results:
    """on_result target: every outcome, plus a way to await one key's."""

    def __init__(self) -> None:
        self.all: list[Delivery] = []
        self._waiters: dict[str, asyncio.Future[Delivery]] = {}

    def __call__(self, d: Delivery) -> None:
        self.all.append(d)
        fut = self._waiters.get(d.key)
        if fut is not None and not fut.done():
            fut.set_result(d)

    async def wait(self, key: str, timeout: float = DEADLINE_S) -> Delivery:
        for d in self.all:
            if d.key == key:
                return d
        fut = self._waiters.setdefault(key, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AssertionError(f"no outcome for {key} within {timeout} s; outcomes so far: {self.all}") from None


@dataclass
class Backoff:
    """One call of the sender's backoff_delay: which retry, the server's Retry-After, the delay it returned,
    and how many requests the server had seen at that moment (so its place among the attempts is known)."""

    retry: int
    retry_after: str | None
    delay: float
    requests_seen: int


@pytest.fixture
def backoffs(monkeypatch: pytest.MonkeyPatch) -> Callable[[Receiver], list[Backoff]]:
    """Record every backoff_delay the sender asks for, while it keeps using the real one."""
    real = webhook.backoff_delay

    def install(rec: Receiver) -> list[Backoff]:
        calls: list[Backoff] = []

        def spy(settings: WebhookSettings, retry: int, retry_after: str | None = None) -> float:
            delay = real(settings, retry, retry_after)
            calls.append(Backoff(retry, retry_after, delay, len(rec.requests)))
            return delay

        monkeypatch.setattr(webhook, "backoff_delay", spy)
        return calls

    return install


def keys(rec: Receiver) -> list[str]:
    return [r.headers["Idempotency-Key"] for r in rec.requests]


def test_success_is_signed_and_carries_the_exact_json() -> None:
    async def ok(rec: Receiver, n: int) -> web.StreamResponse:
        return web.json_response({"paused": True})

    async def main() -> None:
        async with receiver(ok) as rec:
            results = Results()
            sender = WebhookSender(make(rec.url, headers={"Authorization": "Bearer t0k"}), on_result=results)
            await sender.start()
            payload = {"agent_id": "agent-7", "action": "pause", "alert_id": "a1", "reason": "refund 40x usual"}
            assert sender.submit("a1:pause", payload)
            d = await results.wait("a1:pause")
            await sender.stop()

        assert d.delivered and d.status == 200 and d.attempts == 1 and d.error is None and d.elapsed_s > 0
        [got] = rec.requests
        assert got.verified
        assert json.loads(got.body) == payload
        assert got.body == json.dumps(payload, sort_keys=True, separators=(",", ":")).encode() == d.body
        h = got.headers
        assert h["Content-Type"] == "application/json"
        assert h["Idempotency-Key"] == "a1:pause"
        assert h["User-Agent"] == USER_AGENT and USER_AGENT.startswith("writeguard/")
        assert h["Authorization"] == "Bearer t0k"
        assert abs(int(h["X-Writeguard-Timestamp"]) - time.time()) < 5
        assert h["X-Writeguard-Signature"].startswith("sha256=")
        assert results.all == [d]

    asyncio.run(main())


def test_503_twice_then_200_is_delivered_after_three_attempts_with_growing_delays(
    backoffs: Callable[[Receiver], list[Backoff]],
) -> None:
    async def flaky(rec: Receiver, n: int) -> web.StreamResponse:
        return web.Response(status=503) if n <= 2 else web.Response(status=204)

    async def main() -> None:
        async with receiver(flaky) as rec:
            calls = backoffs(rec)
            results = Results()
            sender = WebhookSender(make(rec.url, backoff_s=0.1), on_result=results)
            await sender.start()
            assert sender.submit("a2:pause", {"agent_id": "agent-8"})
            d = await results.wait("a2:pause")
            await sender.stop()

        assert d.delivered and d.attempts == 3 and d.status == 204 and d.error is None
        # Three attempts, all signed, all of the same delivery, the server answered 503, 503, 204.
        assert keys(rec) == ["a2:pause"] * 3 and all(r.verified for r in rec.requests)
        assert len({r.body for r in rec.requests}) == 1
        # A backoff after each 503 and none after the 204: retry 1 after the first request, retry 2 after the
        # second; each delay is backoff_s * 2**(retry-1) less at most 20% of jitter, so the second is longer.
        assert [(c.retry, c.retry_after, c.requests_seen) for c in calls] == [(1, None, 1), (2, None, 2)]
        first, second = (c.delay for c in calls)
        assert 0.08 <= first <= 0.1 and 0.16 <= second <= 0.2 and second > first
        assert results.all == [d]

    asyncio.run(main())


def test_retry_after_is_honoured(backoffs: Callable[[Receiver], list[Backoff]]) -> None:
    async def busy(rec: Receiver, n: int) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "0.3"}) if n == 1 else web.Response(status=200)

    async def main() -> None:
        async with receiver(busy) as rec:
            calls = backoffs(rec)
            results = Results()
            sender = WebhookSender(make(rec.url, backoff_s=0.01), on_result=results)
            await sender.start()
            assert sender.submit("a3:pause", {})
            d = await results.wait("a3:pause")
            await sender.stop()
        assert d.delivered and d.attempts == 2 and d.status == 200
        assert keys(rec) == ["a3:pause"] * 2
        # The one retry waited what the server asked (0.3 s), not the 10 ms backoff_s.
        assert [(c.retry, c.retry_after, c.delay, c.requests_seen) for c in calls] == [(1, "0.3", 0.3, 1)]

    asyncio.run(main())


def test_a_hanging_endpoint_times_out_after_retries_and_submit_stays_immediate(
    backoffs: Callable[[Receiver], list[Backoff]],
) -> None:
    async def hang(rec: Receiver, n: int) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):  # the test's end releases it; the sender gives up first
            await asyncio.wait_for(rec.release.wait(), 5)
        return web.Response(status=200)

    async def main() -> None:
        async with receiver(hang) as rec:
            calls = backoffs(rec)
            results = Results()
            s = make(rec.url, timeout_s=0.2, retries=2, backoff_s=0.02, concurrency=1, queue_size=500)
            sender = WebhookSender(s, on_result=results)
            await sender.start()
            assert sender.submit("slow:pause", {"agent_id": "agent-9"})
            await asyncio.wait_for(rec.arrived.wait(), DEADLINE_S)  # the first POST is now hanging

            # submit runs on the event loop: had it waited on the network, the hanging POST (or the sender's
            # timeout) would have ended first. It returned a bool for each of 1,000 calls while that POST still
            # hangs and before the delivery has any outcome.
            answers = [sender.submit(f"burst-{i}:pause", {"i": i}) for i in range(1000)]
            assert all(type(a) is bool for a in answers)
            assert answers == [True] * 500 + [False] * 500
            assert sender.dropped == 500 and sender.pending == 500
            assert len(rec.requests) == 1  # only the hanging POST: submit sent nothing itself
            assert [r.key for r in results.all] == [f"burst-{i}:pause" for i in range(500, 1000)]
            assert {r.error for r in results.all} == {"queue_full"}

            d = await results.wait("slow:pause")
            assert (d.delivered, d.error, d.status, d.attempts) == (False, "timeout", None, 3)
            await sender.stop(timeout=0.05)

        # 1 + retries attempts of the slow delivery, one after the other (concurrency 1), each timed out,
        # with a backoff after the first and the second and none after the last.
        assert keys(rec)[:3] == ["slow:pause"] * 3
        assert keys(rec).count("slow:pause") == 3
        assert [(c.retry, c.retry_after, c.requests_seen) for c in calls[:2]] == [(1, None, 1), (2, None, 2)]
        assert all(c.retry_after is None and c.requests_seen > 3 for c in calls[2:])  # later ones: burst-0's

        # every submitted delivery has exactly one outcome: the slow one, 500 dropped, the rest stopped
        outcome = {r.key: r for r in results.all}
        assert len(results.all) == len(outcome) == 1001
        errors = [r.error for r in results.all]
        assert errors.count("queue_full") == 500 and outcome["slow:pause"].error == "timeout"
        queued = [outcome[f"burst-{i}:pause"] for i in range(500)]
        assert all(not r.delivered and r.error in ("stopped", "timeout") for r in queued)
        assert sum(r.error == "stopped" for r in queued) >= 499  # at most the one in flight may have run out

    asyncio.run(main())


def test_400_is_not_retried() -> None:
    async def bad(rec: Receiver, n: int) -> web.StreamResponse:
        return web.Response(status=400, text="unknown agent")

    async def main() -> None:
        async with receiver(bad) as rec:
            results = Results()
            sender = WebhookSender(make(rec.url, retries=5, concurrency=1), on_result=results)
            await sender.start()
            assert sender.submit("a4:pause", {"agent_id": "ghost"})
            d = await results.wait("a4:pause")
            # One delivery task: a retry of a4 would reach the server before this later delivery does.
            assert sender.submit("sentinel:pause", {})
            await results.wait("sentinel:pause")
            await sender.stop()
        assert (d.delivered, d.status, d.error, d.attempts) == (False, 400, "http 400", 1)
        assert keys(rec) == ["a4:pause", "sentinel:pause"]

    asyncio.run(main())


def test_connection_refused_is_retried_then_reported() -> None:
    async def main() -> None:
        async with receiver(lambda rec, n: asyncio.sleep(0, web.Response())) as rec:
            url = rec.url
        results = Results()  # the server is gone: its port now refuses connections
        sender = WebhookSender(make(url, retries=2), on_result=results)
        await sender.start()
        sender.submit("a5:pause", {})
        d = await results.wait("a5:pause")
        await sender.stop()
        assert not d.delivered and d.attempts == 3 and d.status is None
        assert d.error is not None and d.error.startswith("connection: ")

    asyncio.run(main())


def test_queue_full_drops_and_reports_then_delivers_the_rest() -> None:
    async def gated(rec: Receiver, n: int) -> web.StreamResponse:
        await asyncio.wait_for(rec.release.wait(), DEADLINE_S)
        return web.Response(status=200)

    async def main() -> None:
        async with receiver(gated) as rec:
            results = Results()
            sender = WebhookSender(make(rec.url, queue_size=2, concurrency=1), on_result=results)
            await sender.start()
            assert sender.submit("k1", {"n": 1})
            await asyncio.wait_for(rec.arrived.wait(), DEADLINE_S)  # k1 in flight, the queue is empty
            assert sender.submit("k2", {"n": 2}) and sender.submit("k3", {"n": 3})
            assert not sender.submit("k4", {"n": 4})
            assert sender.dropped == 1 and sender.pending == 2
            dropped = await results.wait("k4", timeout=0)
            assert (dropped.delivered, dropped.error, dropped.attempts) == (False, "queue_full", 0)

            rec.release.set()
            done = [await results.wait(k) for k in ("k1", "k2", "k3")]
            await sender.stop()
        assert all(d.delivered and d.attempts == 1 for d in done)
        assert [json.loads(r.body)["n"] for r in rec.requests] == [1, 2, 3]
        assert len(results.all) == 4

    asyncio.run(main())


def test_stop_drains_what_is_queued() -> None:
    async def ok(rec: Receiver, n: int) -> web.StreamResponse:
        await asyncio.sleep(0.02)
        return web.Response(status=200)

    async def main() -> None:
        async with receiver(ok) as rec:
            results = Results()
            sender = WebhookSender(make(rec.url, concurrency=2), on_result=results)
            await sender.start()
            for i in range(6):
                sender.submit(f"d{i}:pause", {"i": i})
            await sender.stop(timeout=5)
        assert sorted(d.key for d in results.all if d.delivered) == [f"d{i}:pause" for i in range(6)]
        assert len(rec.requests) == 6 and len(results.all) == 6

    asyncio.run(main())
