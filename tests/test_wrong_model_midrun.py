"""The model a server answers with, mid-run.

* A server that comes back serving the wrong model name (a misconfigured restart: requests get 404) costs no
  page attempts: the pipeline waits until ``/v1/models`` lists ``olmocr`` again, as for any outage.
* A server that keeps the name but answers with another model (a provider's silent switch, upstream #460:
  the answer's ``model`` field shows it) is different: none of its answers is written, it leaves the
  rotation for good, and with no other server the run stops with exit status 1 (#31)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from olmocr.pipeline.servers.fleet import LOG_NO_RIGHT_MODEL, LOG_OTHER_MODEL
from tests.pipeline_helpers import Standins, docs_by_source, log_line, running_pipeline, wait_for
from tests.provider_helpers import PROVIDER_MODEL, PROVIDER_PREFIX, control, info, launch_provider, make_docs
from tests.standin_helpers import REPO_ROOT, clean_env

pytestmark = pytest.mark.timeout(180)

OTHER = "someone/other-model"
KEY = "sk-provider-secret-4711"


def written_by_other(workspace: Path) -> list[str]:
    """Documents holding an answer of the other model (the stand-in's text says who wrote it)."""
    return [source for source, doc in docs_by_source(workspace).items() if f"Written by {OTHER}" in doc["text"]]


@pytest.mark.slow
def test_wrong_model_mid_run_waits_instead_of_burning_attempts(tmp_path: Path, standins: Standins) -> None:
    docs = make_docs(tmp_path)
    standin = standins(OLMOCR_STANDIN_LATENCY=0.5, OLMOCR_STANDIN_CONCURRENCY=1)
    log = tmp_path / "run.log"
    # One attempt per page: a 404 counted as a failed attempt would make pages fall back.
    with running_pipeline(tmp_path / "ws", standin.url, docs, "--max_page_retries", "1", log=log,
                          stop=[standin]) as run:
        run.wait_log("claimed work item", 60, "work claimed")
        standin.control(served_model_name="not-olmocr")
        # Until pages have met the wrong model (on a loaded machine rendering may outlast a fixed pause).
        run.wait_log("model 'olmocr' not served", 60)
        time.sleep(2)
        standin.control(served_model_name="olmocr")
        rc = run.wait(90)
    text = log.read_text()
    assert rc == 0, text
    found = docs_by_source(tmp_path / "ws")
    assert set(found) == set(map(str, docs))
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in found.values())


def test_silent_model_switch_mid_run_writes_nothing_of_it_and_stops(tmp_path: Path) -> None:
    """The provider switches model mid-run: no page of the other model is written, the server leaves the
    rotation naming the model, and with no other server the run stops with exit 1 and one line; the work
    not done stays queued (nothing is recorded as failed)."""
    docs = make_docs(tmp_path, 6, 2)
    provider = launch_provider(tmp_path, {"OLMOCR_STANDIN_LATENCY": "0.3", "OLMOCR_STANDIN_CONCURRENCY": "2"})
    log = tmp_path / "run.log"
    with running_pipeline(tmp_path / "ws", provider.url + PROVIDER_PREFIX, docs, "--model", PROVIDER_MODEL,
                          "--pages_per_group", "2", "--workers", "1", "--stop_timeout", "2", log=log,
                          stop=[provider]) as run:
        wait_for(lambda: info(provider)["image_requests_served"] >= 3, 60, "pages answered by the right model")
        control(provider, answer_model=OTHER)
        rc = run.wait(90)
    text = log.read_text()
    assert rc == 1, text
    assert log_line(LOG_OTHER_MODEL, provider.url + PROVIDER_PREFIX).search(text), text
    assert f"{OTHER!r}" in text
    assert len(log_line(LOG_NO_RIGHT_MODEL).findall(text)) == 1, text
    assert "Traceback" not in text
    assert written_by_other(tmp_path / "ws") == []
    assert 0 < len(docs_by_source(tmp_path / "ws")) < len(docs)  # written before the switch; the rest queued
    assert not (tmp_path / "ws" / "failed").exists() or not any((tmp_path / "ws" / "failed").iterdir())


def test_mixed_fleet_switch_mid_run_and_cost(tmp_path: Path, standins: Standins) -> None:
    """A local server ('olmocr') and a provider-style one (another name, a key from the key file, a price):
    every page written once; the provider switches model mid-run and leaves the rotation; the cost is
    the provider's tokens times its prices."""
    docs = make_docs(tmp_path, 8, 3)
    local = standins(OLMOCR_STANDIN_LATENCY=0.3)
    provider = launch_provider(tmp_path, {"VLLM_API_KEY": KEY, "OLMOCR_STANDIN_LATENCY": "0.3"})
    provider_url = provider.url + PROVIDER_PREFIX
    keys = tmp_path / "keys"
    keys.write_text(f"{provider_url} {KEY}\n")
    keys.chmod(0o600)
    log = tmp_path / "run.log"
    url = f"{provider_url}#model={PROVIDER_MODEL}&price_in=0.09&price_out=0.19"
    with running_pipeline(tmp_path / "ws", local.url, docs, "--vllm-url", url, "--api_key_file", str(keys),
                          "--max_page_retries", "1",
                          # A few requests out at a time, so that pages are still being sent after the switch.
                          "--max_concurrent_requests", "4", log=log, stop=[local, provider]) as run:
        wait_for(lambda: info(provider)["image_requests_served"] >= 2, 60, "the provider answered pages")
        control(provider, answer_model=OTHER)
        rc = run.wait(120)
        stats = info(provider)
    text = log.read_text()
    assert rc == 0, text
    found = docs_by_source(tmp_path / "ws")
    assert set(found) == set(map(str, docs))  # every page written once, by the right model
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in found.values())
    assert written_by_other(tmp_path / "ws") == []
    [stats_file] = (tmp_path / "ws" / "server_stats").glob("*")
    record = json.loads(stats_file.read_text())
    servers = {s["url"]: s for s in record["servers"]}
    mine = servers[provider_url]
    assert mine["model"] == PROVIDER_MODEL
    assert mine["input_tokens"] > 0, (mine, text[-4000:])
    assert mine["cost"] == pytest.approx((mine["input_tokens"] * 0.09 + mine["output_tokens"] * 0.19) / 1e6, rel=1e-3)
    assert servers[local.url]["cost"] is None
    assert stats["requests_served"] >= mine["pages"]
    assert KEY not in text
    assert "cost $" in text
    assert log_line(LOG_OTHER_MODEL, provider_url).search(text), text
    # --stats sums each server's tokens and cost over the runs
    stats_out = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(tmp_path / "ws"), "--stats"],
                               capture_output=True, text=True, env=clean_env(), cwd=str(REPO_ROOT), timeout=60)
    line = next(x for x in stats_out.stdout.splitlines() if provider_url in x)
    assert f"tokens {mine['input_tokens']} in / {mine['output_tokens']} out, cost ${mine['cost']:.4f}" in line, line
