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
from tests.pipeline_helpers import StandIn, Standins, assert_every_page_once, logged, running_pipeline, wait_for
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import VLLM_FLAGS, free_port, free_port_run, loopback_alias_works


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



def _standin_on(standins: Standins, address: str, port: int, env: dict[str, object], *,
                served_model_name: str = "olmocr") -> StandIn:
    # The access log on (one line per request): a test can count what reached this address.
    return standins(host=address, port=port, served_model_name=served_model_name, env=env,
                    extra_args=(*VLLM_FLAGS, "--uvicorn-log-level", "info"))


def _served(server: StandIn) -> int:
    return int(requests.get(f"{server.url}/admin/info", timeout=5).json()["completions_seen"])


def _chat_requests(server: StandIn) -> int:
    """Chat requests that reached the stand-in, answered or not (from its access log)."""
    return server.log.read_text().count('"POST /v1/chat/completions"')


@pytest.mark.slow
@pytest.mark.integration
def test_a_port_range_reaches_every_server_of_a_box(tmp_path: Path, standins: Standins) -> None:
    base = free_port_run(3)
    servers = [_standin_on(standins, "127.0.0.1", base + i, {"OLMOCR_STANDIN_LATENCY": 0.05}) for i in range(3)]
    pdfs = [write_text_pdf(tmp_path / f"doc{i}.pdf", 3) for i in range(6)]
    with running_pipeline(tmp_path / "ws", f"http://127.0.0.1:{base}-{base + 2}", pdfs,
                          log=tmp_path / "pipeline.log") as run:
        assert run.wait(120) == 0, run.output()[-3000:]
    assert_every_page_once(tmp_path / "ws", pdfs)
    assert all(_served(server) > 0 for server in servers)


@pytest.mark.slow
@pytest.mark.integration
def test_dns_name_servers_added_and_removed_mid_run_every_page_once(tmp_path: Path, standins: Standins) -> None:
    assert loopback_alias_works(), "127.0.0.2 is not usable here (Linux routes all of 127.0.0.0/8 to lo)"
    port = free_port()
    env: dict[str, object] = {"OLMOCR_STANDIN_LATENCY": 0.25, "OLMOCR_STANDIN_CONCURRENCY": 2}
    two, three, four = (_standin_on(standins, a, port, env) for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    # An address that joins the name but serves another model: verification must leave it out before any
    # page goes to it (it would answer each page 404).
    wrong = _standin_on(standins, "127.0.0.5", port, env, served_model_name="some-other-model")
    hosts = tmp_path / "hosts"

    def publish(*servers: StandIn) -> None:
        tmp = hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{s.host} olmocr-vllm.test\n" for s in servers))
        os.replace(tmp, hosts)

    publish(two, three)
    pdfs = [write_text_pdf(tmp_path / f"doc{i}.pdf", 4) for i in range(20)]
    metrics_port = free_port()
    name = f"dns+http://olmocr-vllm.test:{port}"
    with running_pipeline(tmp_path / "ws", name, pdfs, "--workers", "8", "--metrics_port", str(metrics_port),
                          env={"OLMOCR_HOSTS_FILE": str(hosts), "OLMOCR_DNS_REFRESH_S": "0.5"},
                          log=tmp_path / "pipeline.log") as run:
        deadline = time.monotonic() + 60
        while _served(two) < 4:
            assert run.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
            time.sleep(0.1)
        assert _served(four) == 0  # not in the name yet: no work
        publish(three, four, wrong)  # .4 and .5 join, .2 leaves
        removed_at = time.monotonic()
        while _served(four) == 0:
            assert run.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
            time.sleep(0.1)
        # The new server has its own series in the pipeline's metrics (with its request-latency hook).
        def scrape() -> dict[str, float]:
            return parse_metrics(requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text)

        wait_for(lambda: scrape().get(f"olmocr_pipeline_request_seconds_count{{server={four.url}}}", 0) > 0, 10,
                 "the new server's request latencies")
        assert scrape()[f"olmocr_pipeline_server_healthy{{server={four.url}}}"] == 1.0
        time.sleep(max(0.0, removed_at + 2.5 - time.monotonic()))  # a refresh, plus its in-flight finishing
        drained_count = _served(two)
        assert run.wait(120) == 0, run.output()[-3000:]
        out = run.output()
    assert_every_page_once(tmp_path / "ws", pdfs)
    assert _served(two) == drained_count  # drained: no request after it left the name
    assert _served(three) > 0 and _served(four) > 0
    assert logged(out, LOG_VERIFYING, name, four.url)
    # The wrong-model address was verified, left out, and sent no page.
    assert _chat_requests(wrong) == 0
    assert logged(out, LOG_LEFT_OUT, wrong.url), out[-3000:]
    assert _chat_requests(four) > 0  # (the count sees the pages a server gets)
    assert logged(out, LOG_DRAINING, two.url, f"its address left {name}")
