"""One address for many servers: port ranges and dns+http:// names in --vllm-url (row by row), and a real
pipeline run whose DNS name gains one address and loses another mid-run, every page written once.

The DNS test resolves through OLMOCR_HOSTS_FILE (a hosts-format file of the test's own): /etc/hosts and the
machine's resolver configuration are never touched. The system resolver path is checked with localhost."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest
import requests

from olmocr.pipeline.errors import FleetConfigError
from olmocr.pipeline.servers.discovery import (
    name_has_no_address,
    parse_hosts,
    refresh_interval,
    server_urls,
    system_resolve,
)
from olmocr.pipeline.servers.fleet import LOG_LEFT_OUT
from olmocr.pipeline.servers.membership import LOG_DRAINING, LOG_VERIFYING
from olmocr.pipeline.servers.serverlist import DnsName, expand_port_range, parse_dns_names, parse_url_list
from tests.metrics_helpers import parse_metrics
from tests.pipeline_helpers import assert_every_page_once, logged, start_pipeline, wait_for
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import (
    VLLM_FLAGS,
    free_port,
    free_port_run,
    loopback_alias_works,
    start_standin,
    stop_process_group,
    wait_http_ok,
)


@pytest.mark.parametrize("url, expected", [
    ("http://gpu-a:30024-30026", ["http://gpu-a:30024", "http://gpu-a:30025", "http://gpu-a:30026"]),
    ("http://gpu-a:30024", ["http://gpu-a:30024"]),
    ("https://[::1]:5-6", ["https://[::1]:5", "https://[::1]:6"]),
    ("http://gpu-a:30024-30024", ["http://gpu-a:30024"]),
])
def test_expand_port_range(url: str, expected: list[str]) -> None:
    assert expand_port_range(url) == expected


@pytest.mark.parametrize("url, message", [
    ("http://gpu-a:30031-30024", "1 <= FIRST <= LAST"),
    ("http://gpu-a:30024-40024", "a range names at most 256"),
])
def test_bad_port_ranges(url: str, message: str) -> None:
    with pytest.raises(FleetConfigError, match=message):
        expand_port_range(url)


def test_port_ranges_dns_names_and_plain_urls_mix_with_weights() -> None:
    values = ["http://gpu-a:30024-30025#weight=2,dns+http://olmocr-vllm.ns.svc:30024", "http://gpu-b:30024/v1"]
    assert parse_url_list(values) == [("http://gpu-a:30024", 2.0), ("http://gpu-a:30025", 2.0),
                                      ("http://gpu-b:30024", None)]
    assert parse_dns_names(values) == [DnsName("http", "olmocr-vllm.ns.svc", (30024,))]
    assert parse_dns_names(["dns+https://n:1-2#weight=3"]) == [DnsName("https", "n", (1, 2), 3.0)]
    with pytest.raises(FleetConfigError, match="listed twice"):
        parse_url_list(["http://a:1-3", "http://a:2"])


@pytest.mark.parametrize("value, message", [
    ("dns+http://name", "the port is required"),
    ("dns+ftp://name:1", "write dns\\+http://NAME:PORT"),
    ("dns+http://name:1#w=2", "#weight=N"),
])
def test_bad_dns_names(value: str, message: str) -> None:
    with pytest.raises(FleetConfigError, match=message):
        parse_dns_names([value])


def test_hosts_format_and_server_urls() -> None:
    hosts = parse_hosts("127.0.0.2 olmocr\n# 127.0.0.9 olmocr\n127.0.0.3 olmocr other  # two names\n"
                        "::1 olmocr\nnot-an-ip olmocr\n127.0.0.2 olmocr\n")
    assert hosts["olmocr"] == ["127.0.0.2", "127.0.0.3", "::1"]
    assert hosts["other"] == ["127.0.0.3"]
    name = DnsName("http", "olmocr", (30024, 30025))
    assert server_urls(name, ["127.0.0.2", "::1"]) == ["http://127.0.0.2:30024", "http://127.0.0.2:30025",
                                                      "http://[::1]:30024", "http://[::1]:30025"]
    # Which of them join or leave: tests/test_membership.py.


def test_refresh_interval_is_at_most_30_s() -> None:
    assert refresh_interval({}) == 10.0
    assert refresh_interval({"OLMOCR_DNS_REFRESH_S": "0.5"}) == 0.5
    for bad in ("31", "0", "x"):
        with pytest.raises(FleetConfigError, match="OLMOCR_DNS_REFRESH_S"):
            refresh_interval({"OLMOCR_DNS_REFRESH_S": bad})


def test_the_system_resolver_gives_every_address_of_a_name() -> None:
    # localhost comes from the machine's hosts file: no DNS query leaves the machine.
    addresses = asyncio.run(system_resolve("localhost"))
    assert "127.0.0.1" in addresses or "::1" in addresses



@pytest.mark.parametrize("errno, empty", [
    (socket.EAI_NONAME, True),  # NXDOMAIN: the name has no address (its servers are drained)
    (socket.EAI_AGAIN, False),  # resolver unreachable / timed out: keep the servers
    (socket.EAI_FAIL, False),
])
def test_which_lookup_errors_empty_a_name(errno: int, empty: bool) -> None:
    assert name_has_no_address(socket.gaierror(errno, "x")) is empty


# ------------------------------------------------------------------------------------- a real run


def _standin_on(address: str, port: int, tmp_path: Path, env: dict[str, str], *,  # noqa: ANN202
                served_model_name: str = "olmocr"):
    # The access log on (one line per request): a test can count what reached this address.
    proc = start_standin(port, env=env, extra_args=(*VLLM_FLAGS, "--host", address, "--uvicorn-log-level", "info"),
                         served_model_name=served_model_name, log_path=tmp_path / f"standin-{address}-{port}.log")
    wait_http_ok(f"http://{address}:{port}/health", timeout=30, proc=proc)
    return proc


def _served(address: str, port: int) -> int:
    return int(requests.get(f"http://{address}:{port}/admin/info", timeout=5).json()["completions_seen"])


def _chat_requests(address: str, port: int, tmp_path: Path) -> int:
    """Chat requests that reached the stand-in at ``address``, answered or not (from its access log)."""
    log = (tmp_path / f"standin-{address}-{port}.log").read_text()
    return log.count('"POST /v1/chat/completions"')


@pytest.mark.slow
@pytest.mark.integration
def test_a_port_range_reaches_every_server_of_a_box(tmp_path: Path) -> None:
    base = free_port_run(3)
    env = {"OLMOCR_STANDIN_LATENCY": "0.05"}
    procs = [_standin_on("127.0.0.1", base + i, tmp_path, env) for i in range(3)]
    try:
        pdfs = [write_text_pdf(tmp_path / f"doc{i}.pdf", 3) for i in range(6)]
        log = tmp_path / "pipeline.log"
        proc = start_pipeline(tmp_path / "ws", f"http://127.0.0.1:{base}-{base + 2}", pdfs, log=log)
        try:
            assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            stop_process_group(proc)
        assert_every_page_once(tmp_path / "ws", pdfs)
        assert all(_served("127.0.0.1", base + i) > 0 for i in range(3))
    finally:
        for p in procs:
            stop_process_group(p)


@pytest.mark.slow
@pytest.mark.integration
def test_dns_name_servers_added_and_removed_mid_run_every_page_once(tmp_path: Path) -> None:
    assert loopback_alias_works(), "127.0.0.2 is not usable here (Linux routes all of 127.0.0.0/8 to lo)"
    port = free_port()
    env = {"OLMOCR_STANDIN_LATENCY": "0.25", "OLMOCR_STANDIN_CONCURRENCY": "2"}
    procs = {a: _standin_on(a, port, tmp_path, env) for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
    # An address that joins the name but serves another model: verification must leave it out before any
    # page goes to it (it would answer each page 404).
    procs["127.0.0.5"] = _standin_on("127.0.0.5", port, tmp_path, env, served_model_name="some-other-model")
    hosts = tmp_path / "hosts"

    def publish(*addresses: str) -> None:
        tmp = hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{a} olmocr-vllm.test\n" for a in addresses))
        os.replace(tmp, hosts)

    publish("127.0.0.2", "127.0.0.3")
    try:
        pdfs = [write_text_pdf(tmp_path / f"doc{i}.pdf", 4) for i in range(20)]
        log = tmp_path / "pipeline.log"
        metrics_port = free_port()
        proc = start_pipeline(tmp_path / "ws", f"dns+http://olmocr-vllm.test:{port}", pdfs, "--workers", "8",
                              "--metrics_port", str(metrics_port),
                              env={"OLMOCR_HOSTS_FILE": str(hosts), "OLMOCR_DNS_REFRESH_S": "0.5"}, log=log)
        try:
            deadline = time.monotonic() + 60
            while _served("127.0.0.2", port) < 4:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            assert _served("127.0.0.4", port) == 0  # not in the name yet: no work
            publish("127.0.0.3", "127.0.0.4", "127.0.0.5")  # .4 and .5 join, .2 leaves
            removed_at = time.monotonic()
            while _served("127.0.0.4", port) == 0:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            # The new server has its own series in the pipeline's metrics (with its request-latency hook).
            def scrape() -> dict[str, float]:
                return parse_metrics(requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text)

            latency_of_new = f"olmocr_pipeline_request_seconds_count{{server=http://127.0.0.4:{port}}}"
            wait_for(lambda: scrape().get(latency_of_new, 0) > 0, 10, "the new server's request latencies")
            assert scrape()[f"olmocr_pipeline_server_healthy{{server=http://127.0.0.4:{port}}}"] == 1.0
            time.sleep(max(0.0, removed_at + 2.5 - time.monotonic()))  # a refresh, plus its in-flight finishing
            drained_count = _served("127.0.0.2", port)
            assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            stop_process_group(proc)
        out = log.read_text()
        assert_every_page_once(tmp_path / "ws", pdfs)
        assert _served("127.0.0.2", port) == drained_count  # drained: no request after it left the name
        assert _served("127.0.0.3", port) > 0 and _served("127.0.0.4", port) > 0
        assert logged(out, LOG_VERIFYING, f"dns+http://olmocr-vllm.test:{port}", f"http://127.0.0.4:{port}")
        # The wrong-model address was verified, left out, and sent no page.
        assert _chat_requests("127.0.0.5", port, tmp_path) == 0
        assert logged(out, LOG_LEFT_OUT, f"http://127.0.0.5:{port}"), out[-3000:]
        assert _chat_requests("127.0.0.4", port, tmp_path) > 0  # (the count sees the pages a server gets)
        assert logged(out, LOG_DRAINING, f"http://127.0.0.2:{port}", f"its address left dns+http://olmocr-vllm.test:{port}")
    finally:
        for p in procs.values():
            stop_process_group(p)
