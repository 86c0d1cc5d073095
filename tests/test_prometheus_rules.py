"""deploy/prometheus: the scrape configuration and alerting rules are valid, their alerts fire when they should
(promtool's rule unit tests, olmocr-alerts.test.yml), and every metric they use is one we export."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest
import requests
import yaml

from olmocr import envs
from tests.deployment_helpers import Deployment, wait_for
from tests.metrics_helpers import exported_names
from tests.standin_helpers import REPO_ROOT, free_port
from tests.tiers import require_tool

PROM_DIR = REPO_ROOT / "deploy" / "prometheus"


def test_rules_are_well_formed_and_use_only_exported_metrics():
    rules = yaml.safe_load((PROM_DIR / "olmocr-alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {"OlmocrServerUnhealthy", "OlmocrServerRestarting",
                                            "OlmocrServerCrashLoopGaveUp", "OlmocrPipelineNoProgress"}
    exported = exported_names()
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]
        used = set(re.findall(r"\bolmocr_[a-z_]+", alert["expr"]))
        assert used <= exported, (alert["alert"], used - exported)
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["olmocr-alerts.yml"]
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs["olmocr-status"] == [f"127.0.0.1:{envs.DEFAULT_STATUS_PORT}"]  # the status service's one port


def test_promtool_accepts_the_config_and_the_rules():
    promtool = require_tool("promtool", "prometheus")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "olmocr-alerts.yml"]):
        done = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_when_they_should():
    promtool = require_tool("promtool", "prometheus")
    done = subprocess.run([promtool, "test", "rules", "olmocr-alerts.test.yml"], cwd=PROM_DIR,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_real_prometheus_scrapes_the_status_service_and_a_kill_fires_the_restart_alert(tmp_path):
    """deploy/prometheus as shipped (only the target port and intervals changed): Prometheus reads our
    exposition, loads the rules, and a kill -9 of the server fires the restart alert."""
    prometheus = require_tool("prometheus", "prometheus")
    dep = Deployment().start()
    prom_port = free_port()
    config = (PROM_DIR / "prometheus.yml").read_text()
    config = config.replace(f'"127.0.0.1:{envs.DEFAULT_STATUS_PORT}"', f'"127.0.0.1:{dep.status_port}"')
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s").replace("evaluation_interval: 15s",
                                                                                   "evaluation_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(PROM_DIR / "olmocr-alerts.yml", tmp_path)
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def query(expr: str) -> list:
        return requests.get(f"{api}/query", params={"query": expr}, timeout=5).json()["data"]["result"]

    try:
        dep.wait_status(lambda s: s["healthy"], 30, "healthy")
        healthy = wait_for(lambda: query('olmocr_server_healthy{job="olmocr-status"} == 1'), 30,
                           "Prometheus to scrape a healthy server")
        assert healthy[0]["metric"]["model"] == "allenai/olmOCR-7B-0825-FP8"
        status_target = [t for t in requests.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
                         if t["labels"]["job"] == "olmocr-status"]
        assert status_target[0]["health"] == "up", status_target
        groups = requests.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 7 and all(rule["health"] in ("ok", "unknown") for rule in rules), rules
        wait_for(lambda: all(r["health"] == "ok" for g in requests.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
                             for r in g["rules"]), 20, "every rule evaluated without error")
        # A kill -9 of the server: the restart alert fires from what Prometheus scraped.
        os.kill(dep.status()["pid"], signal.SIGKILL)
        firing = wait_for(lambda: query('ALERTS{alertname="OlmocrServerRestarting", alertstate="firing"}'), 30,
                          "OlmocrServerRestarting to fire")
        assert firing[0]["metric"]["model"] == "allenai/olmOCR-7B-0825-FP8"
    finally:
        os.killpg(prom.pid, signal.SIGTERM)
        prom.wait(timeout=20)
        dep.cleanup()
