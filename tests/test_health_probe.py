"""The health probe against a real stand-in on 127.0.0.1: a server that is slow but generating tokens is
busy (passes); one whose completions stopped is hung (fails), even if it generated tokens before."""

from __future__ import annotations

import threading

import pytest
import requests

from olmocr.server.health_probe import ServerProbe
from tests.pipeline_helpers import Standins
from tests.standin_helpers import (
    chat_payload,
    make_png,
)


@pytest.fixture
def slow_standin(standins: Standins) -> str:
    # Every completion takes 1.5 s: longer than the probe's 1 s completion timeout.
    return standins(OLMOCR_STANDIN_LATENCY=1.5).url


def _keep_server_busy(base: str, stop: threading.Event) -> None:
    payload = chat_payload(make_png(8, 8), max_tokens=100)
    while not stop.is_set():
        try:
            requests.post(base + "/v1/chat/completions", json=payload, timeout=5)
        except requests.RequestException:
            return


def test_slow_but_generating_is_busy_and_hung_is_a_failure(slow_standin: str) -> None:
    probe = ServerProbe(slow_standin, completion_timeout=1.0, health_timeout=2.0)
    stop = threading.Event()
    # Staggered clients: some completion finishes during any 1 s window.
    clients = []
    for _ in range(4):
        clients.append(threading.Thread(target=_keep_server_busy, args=(slow_standin, stop), daemon=True))
        clients[-1].start()
        stop.wait(0.4)
    try:
        busy = probe()
        assert busy.ok and busy.busy, busy.reason
        assert "busy, not hung" in busy.reason

        # The engine stops: /health and /v1/models stay 200. Tokens were generated before the hang
        # (and since the previous probe), but none while this probe waits: that is a hang.
        requests.post(slow_standin + "/admin/control", json={"hang": True}, timeout=5).raise_for_status()
        stop.wait(1.6)  # completions already past the gate finish
        hung = probe()
        assert not hung.ok and not hung.busy
        assert "engine hung?" in hung.reason
    finally:
        stop.set()
        requests.post(slow_standin + "/admin/control", json={"hang": False}, timeout=5)
        for client in clients:
            client.join(timeout=10)
