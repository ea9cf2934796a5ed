"""A small Chrome DevTools Protocol client over aiohttp's websocket, and a headless Chromium to drive with it.

Just what the review page's test needs: start Debian's ``chromium`` with ``--remote-debugging-port=0``, read the
browser's websocket address from its stderr ("DevTools listening on ws://..."), open a page target in a flat
session, send commands and collect every event, so that a test can load a file and then read what the page
logged, threw and requested.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class CdpError(RuntimeError):
    """A command answered with an error, or the browser went away."""


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless Chromium process, its own profile in ``workdir``; ``stop()`` ends it and its children."""

    def __init__(self, workdir: Path, window: tuple[int, int] = (1400, 1000)) -> None:
        binary = chromium_binary()
        if binary is None:
            raise FileNotFoundError("chromium is not installed (bash scripts/system-deps installs it)")
        self.log_path = workdir / "chromium.log"
        argv = [
            binary,
            "--headless",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--window-size={window[0]},{window[1]}",
            f"--user-data-dir={workdir / 'profile'}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self._log = open(self.log_path, "wb")  # closed in stop()
        # Its own process group: the renderer and utility processes end with it.
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log, start_new_session=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def ws_url(self, timeout: float = 60.0) -> str:
        """The browser's DevTools websocket address, once Chromium has printed it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.log_tail(1_000_000))
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise CdpError(f"chromium printed no DevTools address in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        self._log.close()


class Session:
    """A page target attached in flat mode: commands carry its ``sessionId``, and so do its events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.session_id: str | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)
                self._changed.set()
        for fut in self._pending.values():
            fut.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False) -> Any:
        """One command; its result, or CdpError. ``browser``: to the browser itself, not the page session."""
        n = next(self._ids)
        msg: dict[str, Any] = {"id": n, "method": method, "params": params or {}}
        if not browser and self.session_id is not None:
            msg["sessionId"] = self.session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[n] = fut
        await self._ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, timeout=60)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def open_page(self) -> None:
        target = await self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, browser=True
        )
        self.session_id = attached["sessionId"]

    def page_events(self, method: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["method"] == method and e.get("sessionId") == self.session_id]

    async def wait_event(
        self, method: str, timeout: float = 60.0, when: Callable[[dict[str, Any]], bool] = bool
    ) -> Any:
        """The first page event ``method`` (whose params satisfy ``when``); fails with the events seen."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.page_events(method):
                if when(e.get("params", {})):
                    return e.get("params", {})
            left = deadline - time.monotonic()
            if left <= 0:
                seen = sorted({e["method"] for e in self.events})
                raise CdpError(f"no {method} in {timeout:.0f} s; events seen: {seen}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                pass

    async def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value (JSON-able), evaluated by the DevTools, not by the page's own scripts."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def close(self) -> None:
        await self._ws.close()
        await self._reader


async def connect(ws_url: str, http: aiohttp.ClientSession) -> Session:
    # A big page's screenshot is a long base64 string: no message size limit.
    ws = await http.ws_connect(ws_url, max_msg_size=0)
    return Session(ws)
