"""connectors.webhook against a real aiohttp server on 127.0.0.1: signatures, retries, timeouts, drops.

No Kafka here: the receiver stands in for the agent orchestrator's pause endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from connectors.webhook import USER_AGENT, Delivery, WebhookSender, WebhookSettings, verify

pytestmark = pytest.mark.integration

SECRET = "integration-secret"


@dataclass
class Seen:
    """One request as the receiver got it."""

    at: float
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
        ok = verify(
            SECRET.encode(),
            request.headers.get("X-Writeguard-Timestamp", ""),
            body,
            request.headers.get("X-Writeguard-Signature", ""),
        )
        rec.requests.append(Seen(time.monotonic(), dict(request.headers), body, ok))
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


def make(url: str, **kw) -> WebhookSettings:
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

    async def wait(self, key: str, timeout: float = 10.0) -> Delivery:
        for d in self.all:
            if d.key == key:
                return d
        fut = self._waiters.setdefault(key, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(fut, timeout)


def test_success_is_signed_and_carries_the_exact_json():
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


def test_503_twice_then_200_is_delivered_after_three_attempts_with_growing_delays():
    async def flaky(rec: Receiver, n: int) -> web.StreamResponse:
        return web.Response(status=503) if n <= 2 else web.Response(status=204)

    async def main() -> None:
        async with receiver(flaky) as rec:
            results = Results()
            sender = WebhookSender(make(rec.url, backoff_s=0.1), on_result=results)
            await sender.start()
            sender.submit("a2:pause", {"agent_id": "agent-8"})
            d = await results.wait("a2:pause")
            await sender.stop()

        assert d.delivered and d.attempts == 3 and d.status == 204 and d.error is None
        assert len(rec.requests) == 3 and all(r.verified for r in rec.requests)
        assert {r.headers["Idempotency-Key"] for r in rec.requests} == {"a2:pause"}
        t = [r.at for r in rec.requests]
        gaps = [t[1] - t[0], t[2] - t[1]]
        print(f"retry gaps: {gaps[0] * 1000:.0f} ms, {gaps[1] * 1000:.0f} ms")
        assert gaps[0] >= 0.08 * 0.95  # first retry: backoff_s less at most 20% jitter
        assert gaps[1] >= 0.16 * 0.95 and gaps[1] > gaps[0]
        assert results.all == [d]

    asyncio.run(main())


def test_retry_after_is_honoured():
    async def busy(rec: Receiver, n: int) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "0.3"}) if n == 1 else web.Response(status=200)

    async def main() -> None:
        async with receiver(busy) as rec:
            results = Results()
            sender = WebhookSender(make(rec.url, backoff_s=0.01), on_result=results)
            await sender.start()
            sender.submit("a3:pause", {})
            d = await results.wait("a3:pause")
            await sender.stop()
        assert d.delivered and d.attempts == 2
        assert rec.requests[1].at - rec.requests[0].at >= 0.28

    asyncio.run(main())


def test_a_hanging_endpoint_times_out_after_retries_and_submit_stays_immediate():
    async def hang(rec: Receiver, n: int) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):  # the test's end releases it; the sender gives up first
            await asyncio.wait_for(rec.release.wait(), 5)
        return web.Response(status=200)

    async def main() -> None:
        async with receiver(hang) as rec:
            results = Results()
            s = make(rec.url, timeout_s=0.2, retries=2, backoff_s=0.02, concurrency=1, queue_size=500)
            sender = WebhookSender(s, on_result=results)
            await sender.start()
            assert sender.submit("slow:pause", {"agent_id": "agent-9"})
            await asyncio.wait_for(rec.arrived.wait(), 5)  # the first POST is now hanging

            t0 = time.perf_counter()
            accepted = sum(sender.submit(f"burst-{i}:pause", {"i": i}) for i in range(1000))
            took = time.perf_counter() - t0
            print(f"1000 submits while the endpoint hangs: {took * 1000:.2f} ms ({accepted} queued, 500 dropped)")
            assert took < 1.0
            assert accepted == 500 and sender.dropped == 500

            d = await results.wait("slow:pause")
            assert (d.delivered, d.error, d.status, d.attempts) == (False, "timeout", None, 3)
            assert d.elapsed_s >= 3 * 0.2
            assert len(rec.requests) >= 3
            await sender.stop(timeout=0.05)

        # every submitted delivery has exactly one outcome: the slow one, 500 dropped, the rest stopped
        keys = [r.key for r in results.all]
        assert len(keys) == len(set(keys)) == 1001
        errors = [r.error for r in results.all]
        assert errors.count("queue_full") == 500 and errors.count("timeout") == 1
        assert errors.count("stopped") + errors.count("timeout") + errors.count("queue_full") == 1001

    asyncio.run(main())


def test_400_is_not_retried():
    async def bad(rec: Receiver, n: int) -> web.StreamResponse:
        return web.Response(status=400, text="unknown agent")

    async def main() -> None:
        async with receiver(bad) as rec:
            results = Results()
            sender = WebhookSender(make(rec.url, retries=5), on_result=results)
            await sender.start()
            sender.submit("a4:pause", {"agent_id": "ghost"})
            d = await results.wait("a4:pause")
            await asyncio.sleep(0.1)  # any retry would have arrived by now (backoff 10 ms)
            await sender.stop()
        assert (d.delivered, d.status, d.error, d.attempts) == (False, 400, "http 400", 1)
        assert len(rec.requests) == 1

    asyncio.run(main())


def test_connection_refused_is_retried_then_reported():
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


def test_queue_full_drops_and_reports_then_delivers_the_rest():
    async def gated(rec: Receiver, n: int) -> web.StreamResponse:
        await asyncio.wait_for(rec.release.wait(), 5)
        return web.Response(status=200)

    async def main() -> None:
        async with receiver(gated) as rec:
            results = Results()
            sender = WebhookSender(make(rec.url, queue_size=2, concurrency=1), on_result=results)
            await sender.start()
            assert sender.submit("k1", {"n": 1})
            await asyncio.wait_for(rec.arrived.wait(), 5)  # k1 in flight, the queue is empty
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


def test_stop_drains_what_is_queued():
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
