"""Pipeline ``--metrics_port``: /metrics scraped while a real pipeline runs against the stand-in, parsed with
prometheus_client's parser; the exact mapping from the run's counters; the token rule."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import requests
from prometheus_client import generate_latest

from olmocr.pipeline.metrics import PipelineMetrics
from olmocr.pipeline.progress import Progress
from tests.metrics_helpers import parse_metrics
from tests.pipeline_helpers import Standins, run_pipeline, running_pipeline, wait_for
from tests.sample_docs import samples
from tests.standin_helpers import free_port


def scrape(port: int, headers: dict | None = None) -> dict[str, float] | None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/metrics", headers=headers or {}, timeout=2)
    except requests.ConnectionError:
        return None
    response.raise_for_status()
    return parse_metrics(response.text)


@pytest.mark.slow
@pytest.mark.integration
def test_metrics_while_the_pipeline_runs(tmp_path, standins: Standins):
    standin = standins(OLMOCR_STANDIN_LATENCY="0.4", OLMOCR_STANDIN_CONCURRENCY="2", OLMOCR_STANDIN_ERROR_RATE="0.15")
    port = free_port()
    docs = samples().resilience  # 23 pages
    server = f"server={standin.url}"
    scrapes: list[dict[str, float]] = []
    with running_pipeline(tmp_path / "ws", standin.url, docs, "--metrics_port", str(port), "--progress_interval",
                          "1", "--max_concurrent_requests", "4", log=tmp_path / "pipeline.log") as run:
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline:
            got = scrape(port)
            if got is not None:
                scrapes.append(got)
            time.sleep(0.3)
        assert run.wait(5) == 0, run.output()[-3000:]
    assert len(scrapes) >= 5, "too few scrapes while the pipeline ran"
    mid = [s for s in scrapes if s.get("olmocr_pipeline_work_items_remaining{}", 0) >= 1]
    assert mid, "the queue's remaining items never showed"
    assert any(s[f"olmocr_pipeline_requests_in_flight{{{server}}}"] >= 1 for s in scrapes)
    assert all(s[f"olmocr_pipeline_server_healthy{{{server}}}"] == 1.0 for s in scrapes)
    # Counters never go back, and the last scrape shows most of the work done.
    for name in ("olmocr_pipeline_pages_done_total{}", f"olmocr_pipeline_requests_completed_total{{{server}}}",
                 f"olmocr_pipeline_request_retries_total{{{server}}}"):
        values = [s[name] for s in scrapes]
        assert values == sorted(values), name
    last = scrapes[-1]
    assert last["olmocr_pipeline_pages_done_total{}"] >= 15
    assert last["olmocr_pipeline_pages_started_total{}"] == 23
    assert last[f"olmocr_pipeline_request_retries_total{{{server}}}"] >= 1  # the stand-in's 15 % of 500s
    assert last[f"olmocr_pipeline_request_errors_total{{kind=transient,{server}}}"] >= 1
    requests_seen = last[f"olmocr_pipeline_request_seconds_count{{{server}}}"]
    assert requests_seen >= last[f"olmocr_pipeline_requests_completed_total{{{server}}}"] >= 15
    # The stand-in answers after 0.4 s: only its (immediate) error answers can be faster.
    failed = sum(last[f"olmocr_pipeline_request_errors_total{{kind={kind},{server}}}"]
                 for kind in ("timeout", "transient", "rejected"))
    assert last[f"olmocr_pipeline_request_seconds_bucket{{le=0.25,{server}}}"] <= failed
    assert last["olmocr_pipeline_render_seconds_count{}"] >= last["olmocr_pipeline_pages_done_total{}"]
    # The endpoint goes away with the pipeline.
    assert scrape(port) is None


def test_exact_values_from_the_run_counters():
    progress = Progress(pages_total=30, pages_done=20, fallback_pages=2, pages_failed=5, attempts_failed=7,
                        docs_done=3, docs_failed=1, items_done=1, input_tokens=100, output_tokens=50)
    # The fleet's per-server counters (olmocr.pipeline.servers.balance.Server).
    servers = [SimpleNamespace(url=f"http://127.0.0.1:{p}", in_flight=i, state=state, pages=10 * i, errors=4,
                               timeouts=1, rejected=2, ejections=i)
               for i, (p, state) in enumerate([(1001, "up"), (1002, "down")], start=1)]
    metrics = PipelineMetrics(progress, lambda: servers)
    metrics.queue_counts = {"pending": 3, "leased": 2, "done": 4, "total": 9}
    metrics.render_seconds.observe(0.03)
    metrics.observe_request(servers[0].url)(1.5)
    got = parse_metrics(generate_latest(metrics.registry).decode())
    s1, s2 = "server=http://127.0.0.1:1001", "server=http://127.0.0.1:1002"
    expected = {
        "olmocr_pipeline_pages_done_total{}": 20, "olmocr_pipeline_pages_fallback_total{}": 2,
        "olmocr_pipeline_pages_failed_total{}": 5, "olmocr_pipeline_page_attempts_failed_total{}": 7,
        "olmocr_pipeline_documents_done_total{}": 3, "olmocr_pipeline_documents_failed_total{}": 1,
        f"olmocr_pipeline_requests_in_flight{{{s1}}}": 1, f"olmocr_pipeline_requests_in_flight{{{s2}}}": 2,
        f"olmocr_pipeline_server_healthy{{{s1}}}": 1, f"olmocr_pipeline_server_healthy{{{s2}}}": 0,
        f"olmocr_pipeline_requests_completed_total{{{s2}}}": 20,
        f"olmocr_pipeline_request_errors_total{{kind=timeout,{s1}}}": 1,
        f"olmocr_pipeline_request_errors_total{{kind=transient,{s1}}}": 3,
        f"olmocr_pipeline_request_errors_total{{kind=rejected,{s1}}}": 2,
        f"olmocr_pipeline_request_retries_total{{{s1}}}": 4, f"olmocr_pipeline_server_outages_total{{{s2}}}": 2,
        "olmocr_pipeline_work_items{state=pending}": 3, "olmocr_pipeline_work_items_remaining{}": 5,
        "olmocr_pipeline_render_seconds_count{}": 1, "olmocr_pipeline_render_seconds_bucket{le=0.05}": 1,
        f"olmocr_pipeline_request_seconds_bucket{{le=1.0,{s1}}}": 0,
        f"olmocr_pipeline_request_seconds_bucket{{le=2.5,{s1}}}": 1,
    }
    assert {k: got.get(k) for k in expected} == expected


@pytest.mark.slow
@pytest.mark.integration
def test_token_rule_and_a_busy_port_fail_before_any_work_is_claimed(tmp_path, standins: Standins):
    doc = [samples().letter]
    # Beyond loopback without a token: refused at once (nothing is bound, no server needed).
    rc, out = run_pipeline(tmp_path / "ws0", "http://127.0.0.1:9", doc, "--metrics_port", str(free_port()),
                           "--metrics_host", "0.0.0.0", log=tmp_path / "refused.log", timeout=60)
    assert rc == 2 and "OLMOCR_METRICS_TOKEN" in out and "0.0.0.0" in out
    standin = standins(OLMOCR_STANDIN_LATENCY="1.0")
    # A token on loopback is enforced too.
    port = free_port()
    with running_pipeline(tmp_path / "ws1", standin.url, doc, "--metrics_port", str(port),
                          env={"OLMOCR_METRICS_TOKEN": "pm-9f-token"}, log=tmp_path / "token.log") as run:
        # (a Response is falsy for a 401: wait for its status code)
        status = wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code, 30,
                          "the metrics endpoint")
        assert status == 401
        assert scrape(port, {"Authorization": "Bearer pm-9f-token"}) is not None
        assert run.wait(60) == 0
    assert "pm-9f-token" not in (tmp_path / "token.log").read_text()
    # A port in use: a clear error, exit 2, and the work item is left for others.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc, out = run_pipeline(tmp_path / "ws2", standin.url, doc, "--metrics_port",
                               str(busy.getsockname()[1]), log=tmp_path / "busy.log", timeout=60)
    assert rc == 2 and "cannot listen on 127.0.0.1" in out
    assert not list((tmp_path / "ws2").glob("results/*"))
    assert "claimed" not in out
