"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for the status page tests.

Why the protocol by hand and not selenium/playwright: the tests need five commands (navigate, evaluate,
screenshot, window size, wait), aiohttp (already a dependency) speaks WebSocket, and this avoids a
chromedriver of the exact matching version plus another package. Chromium writes the DevTools port to
``DevToolsActivePort`` in its profile directory (``--remote-debugging-port=0`` picks a free one).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.standin_helpers import stop_process_group

#: Flags known to work here (no sandbox as root, no background connections: the network is closed).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
                  "--remote-debugging-port=0", "--remote-allow-origins=*")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """One Chromium process and one page; every call is synchronous (the test's own event loop)."""

    def __init__(self, profile_dir: Path, width: int = 1280, height: int = 800) -> None:
        binary = chromium_path()
        if binary is None:
            raise RuntimeError("chromium is not installed (Debian package 'chromium')")
        profile_dir.mkdir(parents=True, exist_ok=True)
        # Chromium's own temporary files, its singleton socket (AF_UNIX: the path must stay short) and what
        # it keeps in $HOME go to a directory of ours, removed by close(): nothing is left behind.
        self.tmp_dir = tempfile.mkdtemp(prefix="olmocr-cr-")
        self.log_path = profile_dir.parent / f"{profile_dir.name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}",
                 "about:blank"], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                env={**os.environ, "TMPDIR": self.tmp_dir, "HOME": self.tmp_dir,  # its crash
                     "XDG_CONFIG_HOME": self.tmp_dir, "XDG_CACHE_HOME": self.tmp_dir})  # dirs, dconf: ours too
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            # 60 s: once, with the suite's other processes on both cores, 30 s was not enough (its log was not kept).
            port = self._devtools_port(profile_dir / "DevToolsActivePort", timeout=60)
            self.loop.run_until_complete(self._attach(port))
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.set_size(width, height)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, path: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.process.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.05)
        raise RuntimeError(f"chromium did not open its DevTools port within {timeout} s; its log: "
                           f"{self.log_path.read_text(errors='replace')[-2000:]}")

    async def _attach(self, port: int) -> None:
        self.session = aiohttp.ClientSession()
        deadline = time.monotonic() + 20
        while True:
            async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json(content_type=None) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 * 2**20)

    async def _call(self, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.ws is not None
        call_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:  # events arrive in between: skip them until our answer
            msg = await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed: {msg}")
            data = json.loads(msg.data)
            if data.get("id") == call_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params, timeout))

    # -- what the tests use ----------------------------------------------------------------------------
    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def text(self, selector: str = "body") -> str:
        return self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JavaScript expression in the page until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except RuntimeError as exc:  # the page is navigating
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value {last!r}; page text:\n"
                             f"{self.text()}")

    def set_size(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self.ws is not None:
            self.loop.run_until_complete(self.ws.close())
        if self.session is not None:
            self.loop.run_until_complete(self.session.close())
        self.loop.close()
        # Its helpers (zygote, renderers) are in its process group and go with it.
        stop_process_group(self.process, timeout=10)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
