"""deploy/grafana: the dashboard is provisioning-ready, uses only metrics we (or vLLM 0.32) export, and every
panel's query, its variables substituted, runs on a real Prometheus (Debian's) that scraped a running
supervisord deployment (stand-in as vLLM) and a running pipeline: each query on this project's metrics
returns data; those on metrics only real vLLM has are checked for syntax by Prometheus' parser."""

from __future__ import annotations

import re

import pytest
import requests
import yaml

from tests.deployment_helpers import wait_for
from tests.grafana_queries import DASHBOARD, GRAFANA, panels, queries, substitute
from tests.metrics_helpers import exported_names as shared_exported_names
from tests.pipeline_helpers import start_pipeline
from tests.prometheus_helpers import Prometheus
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import free_port, stop_process_group
from tests.tiers import require_tool

#: vLLM 0.32's metric names (vllm/v1/metrics/loggers.py) that the stand-in does not play.
VLLM_ONLY = {"vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket"}
#: ... and those it plays with vLLM's names and labels.
VLLM_PLAYED = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total"}


def exported_names() -> set[str]:
    """What the panels may query: this project's series, and Prometheus' own ``up``."""
    return shared_exported_names() | {"up"}


def test_dashboard_is_provisioning_ready_and_uses_only_exported_metrics():
    assert DASHBOARD["uid"] == "olmocr-serve" and DASHBOARD["id"] is None  # provisioning assigns the id
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "server"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"], name
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    exported = exported_names()
    used: set[str] = set()
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bolmocr_[a-z_]+|\bvllm:[a-z_]+|\bup(?=\{)", target["expr"]))
            assert names, target["expr"]
            used |= names
            assert {n for n in names if not n.startswith("vllm:")} <= exported, (panel["title"], names - exported)
    assert {n for n in used if n.startswith("vllm:")} == VLLM_ONLY | VLLM_PLAYED
    # What the issue asks the dashboard to show.
    titles = " ".join(p["title"] for p in panels()).lower()
    for what in ("health", "phase", "restarts", "kills by reason", "probe latency", "running / waiting", "kv-cache",
                 "first token", "generation throughput", "pages per second", "done / remaining", "eta",
                 "fallback", "requests per server", "errors per server", "ejections"):
        assert what in titles, what
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "olmocr.yaml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"


@pytest.mark.slow
@pytest.mark.integration
def test_every_panel_query_runs_on_a_real_prometheus_scraping_a_deployment_and_a_pipeline(deployments, tmp_path):
    binary = require_tool("prometheus", "prometheus")
    # A slow stand-in (1 s a page, one at a time) and far more pages (120, ~2 minutes) than the test needs keep the
    # pipeline running while Prometheus scrapes it; the test stops it. (With the 23 pages of the resilience samples
    # it once finished during the health kill and restart, under load, before the ETA was scraped.)
    dep = deployments(control={"latency": 1.0}, env={"OLMOCR_HEALTH_COMPLETION_TIMEOUT": "5"})
    dep.wait_status(lambda s: s["healthy"], 30, "healthy")
    metrics_port = free_port()
    (tmp_path / "docs").mkdir()
    docs = [write_text_pdf(tmp_path / "docs" / f"report{i:02d}.pdf", 3) for i in range(40)]
    pipeline = start_pipeline(tmp_path / "ws", dep.base_url, docs, "--metrics_port", str(metrics_port),
                              "--progress_interval", "1", "--max_concurrent_requests", "1", "--pages_per_group", "3",
                              log=tmp_path / "pipeline.log")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [
        {"job_name": "olmocr-status", "static_configs": [{"targets": [f"127.0.0.1:{dep.status_port}"]}]},
        {"job_name": "olmocr-vllm", "static_configs": [{"targets": [f"127.0.0.1:{dep.port}"]}]},
        {"job_name": "olmocr-pipeline", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
    prom = Prometheus(binary, tmp_path / "prometheus", yaml.safe_dump(config))
    try:
        wait_for(lambda: set(prom.targets().values()) == {"up"} and len(prom.targets()) == 3, 30, "three targets up")
        # A health kill (the server's /health fails: killed, restarted) while the pipeline runs.
        wait_for(lambda: prom.result("olmocr_pipeline_pages_done_total > 0"), 40, "pages done")
        dep.set_control({"latency": 1.0, "health_status": 503})
        wait_for(lambda: prom.result('olmocr_server_health_kills_total{reason="health_endpoint"} > 0'), 30,
                 "a health kill scraped")
        dep.set_control({"latency": 1.0})
        wait_for(lambda: prom.result("olmocr_server_healthy == 1 and olmocr_server_restarts_total > 0"), 30,
                 "healthy again after the restart")
        # The workspace rate (hence the ETA) needs items done within its window after the restart: slow under load.
        wait_for(lambda: prom.result("olmocr_pipeline_workspace_eta_seconds"), 90, "an ETA")
        assert pipeline.poll() is None, "the pipeline ended before the queries ran: give it more pages"

        server = prom.result("olmocr_pipeline_requests_completed_total")[0]["metric"]["server"]
        assert server == dep.base_url
        for instance, srv in (("127.0.0.1", server), (".*", ".*")):  # one value each, and All
            empty = []
            for title, expr in queries():
                query = substitute(expr, instance, srv)
                answer = prom.query(query)
                assert answer["status"] == "success", (title, query, answer)  # Prometheus parsed it
                if not set(re.findall(r"vllm:[a-z_]+", expr)) & VLLM_ONLY and not answer["data"]["result"]:
                    empty.append((title, query))
            assert not empty, f"queries on our metrics that returned no data: {empty}"
        # The variables' own queries find the values substituted above.
        labels = requests.get(f"{prom.api}/label/instance/values", timeout=5).json()["data"]
        assert f"127.0.0.1:{dep.status_port}" in labels
        assert pipeline.poll() is None
    finally:
        prom.stop()
        stop_process_group(pipeline)
    log = (tmp_path / "pipeline.log").read_text()
    assert "Traceback" not in log, log[-3000:]
