"""deploy/grafana: the dashboard is provisioning-ready, uses only metrics we (or vLLM 0.32) export, selects
series by what this project controls (metric names, the served model name), never by a scrape job's name,
and every panel's query, its variables substituted, runs on two real Prometheus servers (Debian's) that
scrape a running supervisord deployment (stand-in as vLLM) and a running pipeline: one with the shipped
static configuration's job names, one with the job names the Prometheus Operator gives the shipped
PodMonitors. On both, each query on this project's metrics returns data; those on metrics only real vLLM has
are checked for syntax by Prometheus' parser. The health-kill panel shows 0 before the first kill."""

from __future__ import annotations

import contextlib
import re

import pytest
import requests
import yaml

from olmocr.envs import SERVED_MODEL_NAME
from olmocr.server.health import KillKind
from tests.deployment_helpers import wait_for
from tests.grafana_queries import DASHBOARD, GRAFANA, panels, queries, substitute
from tests.metrics_helpers import exported_names as shared_exported_names
from tests.pipeline_helpers import running_pipeline
from tests.prometheus_helpers import Prometheus
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import REPO_ROOT, free_port
from tests.tiers import require_tool

#: vLLM 0.32's metric names (vllm/v1/metrics/loggers.py) that the stand-in does not play.
VLLM_ONLY = {"vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket"}
#: ... and those it plays with vLLM's names and labels.
VLLM_PLAYED = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total"}


def exported_names() -> set[str]:
    """What the panels may query: this project's series, and Prometheus' own ``up``."""
    return shared_exported_names() | {"up"}


PODMONITORS = REPO_ROOT / "deploy" / "kubernetes" / "components" / "prometheus-operator" / "podmonitors.yaml"
STATIC_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
#: The namespace the PodMonitor-style jobs are named after (the Operator names a job ``namespace/monitor``).
NAMESPACE = "olmocr-test"


def static_config(ports: dict[str, int]) -> dict:
    """deploy/prometheus/prometheus.yml as shipped (its job names), each job's target on the test's port
    (``ports``: job name -> port), scraped every second; its alert rules are tests/test_prometheus_rules.py's."""
    config = yaml.safe_load(STATIC_CONFIG.read_text())
    config.pop("rule_files", None)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    return config


def podmonitor_config(ports: dict[str, int]) -> dict:
    """What the Prometheus Operator makes of the shipped PodMonitors (``ports``: container port name -> the
    test's port): one scrape pool per endpoint, ``podMonitor/NS/NAME/I``, whose series carry
    ``job="NS/NAME"`` (both endpoints of the server pod, status service and vLLM, in one job) and the
    ``namespace``, ``pod``, ``container`` and ``endpoint`` labels. Bearer tokens are left out: the status
    service and the pipeline listen on loopback here and need none."""
    jobs = []
    for monitor in yaml.safe_load_all(PODMONITORS.read_text()):
        assert monitor["kind"] == "PodMonitor"
        name = monitor["metadata"]["name"]
        for i, endpoint in enumerate(monitor["spec"]["podMetricsEndpoints"]):
            port = endpoint["port"]
            labels = {"job": f"{NAMESPACE}/{name}", "namespace": NAMESPACE, "pod": f"{name}-0",
                      "container": name, "endpoint": port}
            jobs.append({"job_name": f"podMonitor/{NAMESPACE}/{name}/{i}", "metrics_path": endpoint["path"],
                         "static_configs": [{"targets": [f"127.0.0.1:{ports[port]}"]}],
                         "relabel_configs": [{"target_label": key, "replacement": value}
                                             for key, value in labels.items()]})
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": jobs}


def empty_queries(prom: Prometheus, server: str) -> list[tuple[str, str]]:
    """Every panel query, its variables set to one value and to All: each must parse, and each on metrics we
    (or the stand-in, as vLLM) export must return data. Returns those that returned none."""
    empty = []
    for instance, srv in (("127.0.0.1", server), (".*", ".*")):  # one value each, and All
        for title, expr in queries():
            query = substitute(expr, instance, srv)
            answer = prom.query(query)
            assert answer["status"] == "success", (title, query, answer)  # Prometheus parsed it
            if not set(re.findall(r"vllm:[a-z_]+", expr)) & VLLM_ONLY and not answer["data"]["result"]:
                empty.append((title, query))
    return empty


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


def test_panels_select_by_metric_and_model_name_never_by_job_name():
    """A scrape job's name belongs to the Prometheus configuration (``olmocr-vllm`` in ours, ``NS/olmocr-server``
    under the PodMonitors): a panel that filtered on it would be empty under the other one."""
    for title, expr in queries():
        assert "job=" not in expr.replace(" ", ""), (title, expr)
        for selector in re.findall(r"vllm:[a-z_]+\{([^}]*)\}", expr):  # vLLM's series of our server only
            assert f'model_name="{SERVED_MODEL_NAME}"' in selector, (title, expr)


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
    with running_pipeline(tmp_path / "ws", dep.base_url, docs, "--metrics_port", str(metrics_port),
                          "--progress_interval", "1", "--max_concurrent_requests", "1", "--pages_per_group", "3",
                          log=tmp_path / "pipeline.log") as pipeline:
        configs = {
            "static": static_config({"olmocr-status": dep.status_port, "olmocr-vllm": dep.port,
                                     "olmocr-pipeline": metrics_port}),
            "podmonitor": podmonitor_config({"status": dep.status_port, "http": dep.port, "metrics": metrics_port}),
        }
        jobs = {"static": {"olmocr-status", "olmocr-vllm", "olmocr-pipeline"},
                "podmonitor": {f"{NAMESPACE}/olmocr-server", f"{NAMESPACE}/olmocr-pipeline"}}
        kills_panel = substitute(next(expr for title, expr in queries() if title.startswith("Health kills by reason")),
                                 "127.0.0.1", ".*")
        proms: dict[str, Prometheus] = {}
        try:
            for name, config in configs.items():
                proms[name] = prom = Prometheus(binary, tmp_path / f"prometheus-{name}", yaml.safe_dump(config))
                wait_for(lambda p=prom: [h for _, h in p.targets()] == ["up"] * 3, 30, f"three targets up ({name})")
                assert {job for job, _ in prom.targets()} == jobs[name]
            # Before the first kill: every kill reason at 0, and the panel shows 0 (not "No data"); so does every
            # other panel over one of our counters (errors, ejections, restarts, fallback pages...).
            counters = [(title, substitute(expr, "127.0.0.1", dep.base_url)) for title, expr in queries()
                        if re.search(r"olmocr_[a-z_]+_total", expr)]
            for name, prom in proms.items():
                wait_for(lambda p=prom: p.result("olmocr_pipeline_pages_done_total > 0"), 40, f"pages done ({name})")
                kills = {r["metric"]["reason"]: r["value"][1] for r in prom.result("olmocr_server_health_kills_total")}
                assert kills == {kind.value: "0" for kind in KillKind}, (name, kills)
                shown = wait_for(lambda p=prom: p.result(kills_panel), 10, f"the kills panel before a kill ({name})")
                assert {r["metric"]["reason"]: float(r["value"][1]) for r in shown} == {k.value: 0.0 for k in KillKind}
                with contextlib.suppress(AssertionError):  # (the rates need two scrapes)
                    wait_for(lambda p=prom: all(p.result(q) for _, q in counters), 10, "every counter panel")
                assert [(title, q) for title, q in counters if not prom.result(q)] == [], name
            assert dep.status()["health_kills"] == 0
            # A health kill (the server's /health fails: killed, restarted) while the pipeline runs.
            dep.set_control({"latency": 1.0, "health_status": 503})
            for name, prom in proms.items():
                wait_for(lambda p=prom: p.result('olmocr_server_health_kills_total{reason="health_endpoint"} > 0'), 30,
                         f"a health kill scraped ({name})")
            dep.set_control({"latency": 1.0})
            for name, prom in proms.items():
                wait_for(lambda p=prom: p.result("olmocr_server_healthy == 1 and olmocr_server_restarts_total > 0"), 30,
                         f"healthy again after the restart ({name})")
                # The panel counts the first kill: its series was there, at 0, before it.
                shown = prom.result(kills_panel)
                assert [r["metric"]["reason"] for r in shown if float(r["value"][1]) > 0] == ["health_endpoint"], shown
            for name, prom in proms.items():
                # The workspace rate (hence the ETA) needs items done within its window after the restart: slow under
                # load.
                wait_for(lambda p=prom: p.result("olmocr_pipeline_workspace_eta_seconds"), 90, f"an ETA ({name})")
            assert pipeline.poll() is None, "the pipeline ended before the queries ran: give it more pages"

            for name, prom in proms.items():
                server = prom.result("olmocr_pipeline_requests_completed_total")[0]["metric"]["server"]
                assert server == dep.base_url
                empty = empty_queries(prom, server)
                assert not empty, f"{name}: queries on our metrics that returned no data: {empty}"
                # The variables' own queries find the values substituted above.
                labels = requests.get(f"{prom.api}/label/instance/values", timeout=5).json()["data"]
                assert f"127.0.0.1:{dep.status_port}" in labels
            assert pipeline.poll() is None
        finally:
            for prom in proms.values():
                prom.stop()
    log = (tmp_path / "pipeline.log").read_text()
    assert "Traceback" not in log, log[-3000:]
