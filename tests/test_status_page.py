"""The status page at ``/`` in a real browser (Debian's headless Chromium over the DevTools protocol)
against a real supervisord deployment with the stand-in as vLLM; and its sign-in rules in-process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from olmocr.server.status_page import COOKIE, session_value
from olmocr.server.status_service import ServiceSettings, Snapshot, StatusService
from tests.browser import Browser, chromium_path
from tests.tiers import require

TOKEN = "page-Tk-5531"
#: Where the page's phase badge and fields are (data-field attributes of olmocr/server/page/status.js).
FIELD = "((document.querySelector('[data-field={0}]') || {{}}).innerText || '')"


def field(browser: Browser, name: str) -> str:
    return browser.evaluate(FIELD.format(name))


@pytest.mark.slow
@pytest.mark.integration
def test_page_shows_health_a_kill_9_restart_live_and_a_lost_connection(deployments, tmp_path):
    require(chromium_path() is not None, "chromium not installed (Debian package 'chromium': apt-get install chromium)")
    token_file = tmp_path / "status.token"
    token_file.write_text(TOKEN + "\n")
    dep = deployments(env={"OLMOCR_STATUS_TOKEN_FILE": str(token_file)})
    dep.wait_status(lambda s: s["healthy"], 30, "healthy")
    browser = Browser(tmp_path / "chromium-profile")
    try:
        # Signing in with ?token= sets the cookie and takes the token out of the address bar.
        browser.goto(f"{dep.status_url}/?token={TOKEN}")
        browser.wait_for(FIELD.format("phase") + " === 'healthy'", 20, "the server shown healthy")
        assert browser.evaluate("location.href") == f"{dep.status_url}/"
        assert browser.text("#connection") == "live"
        assert "1 of 1 server healthy" in browser.text("#summary")
        assert field(browser, "restarts").startswith("0")
        assert "allenai/olmOCR-7B-0825-FP8" in browser.text(".server")
        browser.wait_for("document.querySelectorAll('svg.spark polyline').length === 1", 20, "a latency sparkline")
        browser.evaluate("window.sameDocument = true")  # gone if the page reloads
        # Everything the live page loaded or links to is the service's own (clusters have no internet).
        urls = browser.evaluate("[...performance.getEntriesByType('resource').map(e => e.name), "
                                "...[...document.querySelectorAll('[src], [href]')].map(e => e.src || e.href)]")
        assert f"{dep.status_url}/assets/status.js" in urls
        assert [u for u in urls if not u.startswith((f"{dep.status_url}/", "data:"))] == []

        pid = dep.status()["pid"]
        os.kill(pid, signal.SIGKILL)
        browser.wait_for(FIELD.format("restarts") + ".startsWith('1')", 30, "the restart counted on the page")
        reasons = browser.wait_for(FIELD.format("reasons") + ".match(/SIGKILL/) && " + FIELD.format("reasons"),
                                   10, "the restart's reason, with the signal named")
        assert "killed by SIGKILL" in reasons
        browser.wait_for(FIELD.format("phase") + " === 'healthy'", 30, "healthy again")
        assert browser.evaluate("window.sameDocument") is True, "the page reloaded"
        assert "exited" in field(browser, "decisions")
        browser.screenshot(tmp_path / "status-page.png")

        # A narrow window: one column, nothing wider than the window.
        browser.set_size(400, 900)
        assert browser.wait_for("document.documentElement.scrollWidth <= 400 && 'fits'", 5, "no sideways scrolling")
        browser.screenshot(tmp_path / "status-page-narrow.png")
        browser.set_size(1280, 800)

        # The service stops: the page says so plainly.
        assert "stopped" in dep.supervisorctl("stop", "olmocr-status").stdout
        browser.wait_for("document.getElementById('connection').innerText.startsWith('disconnected')", 10,
                         "'disconnected' on the page")
        assert browser.evaluate("document.body.classList.contains('disconnected')")
        browser.screenshot(tmp_path / "status-page-disconnected.png")
        # ... and comes back by itself when the service is back.
        dep.supervisorctl("start", "olmocr-status")
        browser.wait_for("document.getElementById('connection').innerText === 'live'", 30, "reconnected")
        assert browser.evaluate("window.sameDocument") is True
    finally:
        browser.close()
    for name in ("status-page.png", "status-page-narrow.png", "status-page-disconnected.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_page_shows_one_row_per_gpu_server(tmp_path):
    """The multi-GPU status (``servers: [...]``, each entry the top-level fields plus gpus/url): one card each."""
    require(chromium_path() is not None, "chromium not installed (Debian package 'chromium': apt-get install chromium)")
    base = {"state": "RUNNING", "model": "m", "restart_count": 0, "uptime_seconds": 75, "health_kills": 0,
            "probe_history": [[1000.0 + i, 10.0 + i, True] for i in range(5)], "health_decisions": []}
    servers = [{**base, "healthy": True, "health_phase": "healthy", "url": "http://127.0.0.1:30024", "gpus": [0],
                "port": 30024, "pid": 11},
               {**base, "healthy": False, "health_phase": "unhealthy", "url": "http://127.0.0.1:30026", "gpus": [1],
                "port": 30026, "pid": 12, "restart_count": 3,
                "recent_failures": [{"time": 1004.0, "reason": "killed by the health check: completion probe timed "
                                     "out (3 consecutive failed probes) (SIGTERM)"}]}]
    status = {**servers[0], "healthy": False, "servers": servers}
    snapshot = Snapshot(status, info={"statename": "RUNNING"}, stats={}, settings={"model": "m"})
    service = StatusService(ServiceSettings(), read=lambda: snapshot)
    service.update(snapshot)
    loop = asyncio.new_event_loop()
    server = TestServer(service.app(), loop=loop)
    loop.run_until_complete(server.start_server())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    browser = Browser(tmp_path / "chromium-profile")
    try:
        browser.goto(str(server.make_url("/")))
        browser.wait_for("document.querySelectorAll('section.server').length === 2", 20, "two server cards")
        assert "1 of 2 servers healthy" in browser.text("#summary")
        cards = browser.evaluate("[...document.querySelectorAll('section.server')].map(c => c.innerText)")
        assert "http://127.0.0.1:30024" in cards[0] and "GPUs\n0" in cards[0] and "healthy" in cards[0]
        assert "unhealthy" in cards[1] and "(SIGTERM)" in cards[1] and "Restarts\n3" in cards[1]
    finally:
        browser.close()
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ------------------------------------------------------------------------------- sign-in, in-process

def _service(token: str | None) -> StatusService:
    snapshot = Snapshot({"healthy": True, "state": "RUNNING", "health_phase": "healthy"},
                        info={"statename": "RUNNING"}, stats={}, settings={"model": "m"})
    service = StatusService(ServiceSettings(token=token), read=lambda: snapshot)
    service.update(snapshot)
    return service


def _run(coroutine_fn):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine_fn())


def test_sign_in_exchanges_the_token_for_a_cookie_that_opens_every_endpoint():
    async def scenario() -> None:
        async with TestClient(TestServer(_service(TOKEN).app())) as client:
            # No credentials: a browser gets the sign-in form (401), a script the JSON error.
            page = await client.get("/", headers={"Accept": "text/html"})
            assert page.status == 401 and "<form" in await page.text()
            assert (await client.get("/status")).status == 401
            assert (await client.get("/assets/status.js")).status == 200  # no secret in the assets
            for probe in ("/livez", "/readyz"):  # the kubelet's probes stay open (olmocr.server.livez_readyz)
                assert (await client.get(probe)).status in (200, 503), probe
            # A wrong token: refused, no cookie.
            wrong = await client.post("/login", data={"token": "nope"}, allow_redirects=False)
            assert wrong.status == 401 and COOKIE not in wrong.cookies
            # The right one: a cookie (an HMAC, not the token), HttpOnly and SameSite=Strict.
            good = await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
            assert good.status == 303 and good.headers["Location"] == "/"
            morsel = good.cookies[COOKIE]
            assert morsel.value == session_value(TOKEN) and TOKEN not in morsel.value
            assert morsel["httponly"] and morsel["samesite"] == "Strict"
            client.session.cookie_jar.clear()  # below, each request says which cookie it carries
            cookie = {COOKIE: morsel.value}
            assert "status.js" in await (await client.get("/", cookies=cookie)).text()
            assert (await client.get("/status", cookies=cookie)).status == 200
            ws = await client.ws_connect("/ws", headers={"Cookie": f"{COOKIE}={morsel.value}"})
            assert json.loads((await ws.receive(timeout=5)).data)["healthy"] is True
            await ws.close()
            # Another site's page in the same browser: the cookie is sent, the WebSocket is refused.
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect("/ws", headers={"Cookie": f"{COOKIE}={morsel.value}",
                                                        "Origin": "http://evil.example"})
            assert refused.value.status == 403
            # A cookie for another token opens nothing; the header still works as before.
            assert (await client.get("/status", cookies={COOKIE: session_value("old")})).status == 401
            assert (await client.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
            # ?token= signs in too, and redirects to the bare address.
            query = await client.get(f"/?token={TOKEN}", allow_redirects=False)
            assert query.status == 303 and query.headers["Location"] == "/" and COOKIE in query.cookies

    _run(scenario)


def test_without_a_token_the_page_needs_no_sign_in():
    async def scenario() -> None:
        async with TestClient(TestServer(_service(None).app())) as client:
            page = await client.get("/")
            assert page.status == 200 and 'src="assets/status.js"' in await page.text()
            assert (await client.get("/assets/status.css")).headers["Content-Type"].startswith("text/css")
            assert (await client.get("/assets/index.py")).status == 404
            login = await client.get("/login", allow_redirects=False)
            assert login.status == 303

    _run(scenario)


def test_the_page_loads_nothing_from_outside_the_service():
    """Clusters have no internet: every URL the page names is the service's own (relative)."""
    page_dir = Path(__file__).resolve().parents[1] / "olmocr" / "server" / "page"
    files = {path.name: path.read_text() for path in page_dir.iterdir()}
    assert {"index.html", "status.js", "status.css"} <= files.keys()  # what the page is made of, all checked
    for name, text in files.items():
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, name
        assert "//cdn" not in text and "@import" not in text, name
    # Every address in the markup and the style sheet is relative (or inline data), never another host's,
    # with or without a scheme ("//host/x.css" has none).
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", files["index.html"])
    urls += re.findall(r"""url\(\s*["']?([^"')]*)""", files["status.css"])
    assert "assets/status.js" in urls and "assets/status.css" in urls
    outside = [url for url in urls if re.match(r"[a-z][a-z0-9+.-]*:|//", url, re.I) and not url.startswith("data:")]
    assert outside == []
    # The script's own requests: the WebSocket's address is made relative to the page's, and no string in it
    # names another host.
    script = files["status.js"]
    assert re.findall(r"new URL\(([^)]*)\)", script) == ['"ws", location.href']
    assert not re.findall(r"""["'`]//""", script)


# ------------------------------------------------------------------------- the history the page shows

def test_store_keeps_reasons_with_the_signal_decisions_and_probe_latencies(tmp_path):
    from supervisor.states import ProcessStates as S

    from olmocr.server.rpc import PROBE_HISTORY, ProcessStatsStore, signal_name

    assert signal_name(signal.SIGKILL) == "SIGKILL"  # a wait status of "killed by signal 9"
    assert signal_name(3 << 8) is None  # exited with status 3
    assert signal_name(None) is None
    now = [1000.0]
    store = ProcessStatsStore(str(tmp_path / "state.json"), clock=lambda: now[0])
    store.on_state_change("vllm", S.STOPPED, S.STARTING)
    for i in range(PROBE_HISTORY + 5):
        store.record_probe("vllm", {"time": 1000.0 + i, "phase": "healthy", "ok": True, "healthy": True,
                                    "latency_ms": float(i), "failed_probe": False})
    store.record_probe("vllm", {"time": 2000.0, "phase": "healthy", "ok": False, "healthy": True,
                                "latency_ms": 2000.0, "failed_probe": True, "consecutive_failures": 1,
                                "reason": "completion probe timed out"})
    now[0] = 2001.0
    store.record_kill("vllm", "completion probe timed out (2 consecutive failed probes)")
    store.on_state_change("vllm", S.RUNNING, S.EXITED, exitstatus=-1, expected=False, signal_name="SIGTERM")
    now[0] = 2100.0
    store.on_state_change("vllm", S.EXITED, S.STARTING)
    store.on_state_change("vllm", S.RUNNING, S.EXITED, exitstatus=-1, expected=False, signal_name="SIGKILL")
    stats = ProcessStatsStore(str(tmp_path / "state.json")).stats("vllm")  # as read back after a restart
    history = stats["probe_history"]
    assert len(history) == PROBE_HISTORY and history[-1] == [2000.0, 2000.0, False]
    assert [f["reason"] for f in stats["recent_failures"]] == [  # the kill's own entry became the exit's
        "killed by the health check: completion probe timed out (2 consecutive failed probes) (SIGTERM)",
        "process exited (EXITED: killed by SIGKILL)",
    ]
    assert stats["last_exit_signal"] == "SIGKILL"
    decisions = [d["decision"] for d in stats["recent_decisions"]]
    assert decisions == ["healthy", "probe failed (1 in a row)", "kill", "exited", "exited"]
