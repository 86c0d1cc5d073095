"""Hosted providers (#31): the stand-in plays one (a path prefix, another served name, a key, 429 with
Retry-After, a quota, a silent model switch, no model list), started the way vLLM is, and the pipeline
runs against it as a user would (upstream's README command line)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from olmocr.exit_codes import STATUS_BUDGET
from olmocr.pipeline.servers.checks import LOG_NO_MODEL_LIST
from olmocr.pipeline.servers.fleet import LOG_BUDGET, LOG_PAUSED, LOG_RESUMED
from tests.metrics_helpers import parse_metrics
from tests.pipeline_helpers import docs_by_source, log_line, logged, running_pipeline
from tests.provider_helpers import PROVIDER_MODEL, PROVIDER_PREFIX, control, info, launch_provider, make_docs
from tests.standin_helpers import free_port

pytestmark = pytest.mark.timeout(180)

KEY = "sk-provider-secret-4711"


def all_written(workspace: Path, docs: list[Path]) -> None:
    found = docs_by_source(workspace)
    assert set(found) == set(map(str, docs))
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in found.values())


def workspace_files(workspace: Path, sub: str) -> list[Path]:
    return sorted((workspace / sub).glob("*")) if (workspace / sub).exists() else []


@pytest.mark.parametrize("key_from", ["flag", "environment"])
def test_upstream_readme_example_runs_unchanged(tmp_path: Path, key_from: str) -> None:
    """``--server URL/v1/openai --model NAME --api_key KEY`` (upstream's README for DeepInfra), and the same
    with the key from the environment; the key is in no log line and no record of the run."""
    docs = make_docs(tmp_path)
    provider = launch_provider(tmp_path, {"VLLM_API_KEY": KEY})
    key_args = ("--api_key", KEY) if key_from == "flag" else ()
    env = {"OLMOCR_API_KEY": KEY} if key_from == "environment" else None
    log = tmp_path / "run.log"
    with running_pipeline(tmp_path / "ws", provider.url + PROVIDER_PREFIX, docs, "--model", PROVIDER_MODEL,
                          *key_args, env=env, log=log, stop=[provider]) as run:
        rc = run.wait(120)
    text = log.read_text()
    assert rc == 0, text
    all_written(tmp_path / "ws", docs)
    assert f"serves '{PROVIDER_MODEL}'" in text
    assert ("visible to every user in ps" in text) == (key_from == "flag")
    assert KEY not in text
    for path in (tmp_path / "ws").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    record = json.loads(workspace_files(tmp_path / "ws", "server_stats")[0].read_text())
    [server] = record["servers"]
    assert server["model"] == PROVIDER_MODEL
    # which weights answered, from /v1/models (the stand-in's root is the model of its command line)
    assert server["model_card"] == {"root": "allenai/olmOCR-7B-0825-FP8", "max_model_len": 16384, "owned_by": "vllm"}


def test_without_model_name_says_what_it_serves(tmp_path: Path) -> None:
    """The default name 'olmocr' against a provider: one line naming what it serves and the flag to use."""
    docs = make_docs(tmp_path, 1, 1)
    provider = launch_provider(tmp_path)
    log = tmp_path / "run.log"
    with running_pipeline(tmp_path / "ws", provider.url + PROVIDER_PREFIX, docs, log=log, stop=[provider]) as run:
        rc = run.wait(60)
    text = log.read_text()
    assert rc == 1, text
    assert PROVIDER_MODEL in text and "--model NAME" in text
    assert "Traceback" not in text


def test_path_is_kept_and_not_dropped(tmp_path: Path) -> None:
    """The URL without its path reaches the provider's root, where there is no API: one line, exit 1."""
    docs = make_docs(tmp_path, 1, 1)
    provider = launch_provider(tmp_path)
    log = tmp_path / "run.log"
    with running_pipeline(tmp_path / "ws", provider.url, docs, "--model", PROVIDER_MODEL, log=log,
                          stop=[provider]) as run:
        rc = run.wait(60)
    text = log.read_text()
    assert rc == 1, text
    assert "answered HTTP 404 on /v1/chat/completions (and has no model list): check the URL's path" in text


@pytest.mark.parametrize("explicit", [True, False])
def test_model_list_missing(tmp_path: Path, explicit: bool) -> None:
    """No /v1/models (some gateways): said, and the run goes on only when the model was named."""
    docs = make_docs(tmp_path, 2, 1)
    provider = launch_provider(tmp_path, {"OLMOCR_STANDIN_MODELS_MISSING": "true"},
                               served_model_name=PROVIDER_MODEL if explicit else "olmocr")
    log = tmp_path / "run.log"
    extra = ("--model", PROVIDER_MODEL) if explicit else ()
    with running_pipeline(tmp_path / "ws", provider.url + PROVIDER_PREFIX, docs, *extra, log=log,
                          stop=[provider]) as run:
        rc = run.wait(60)
    text = log.read_text()
    if explicit:
        assert rc == 0, text
        assert [m[3] for m in logged(text, LOG_NO_MODEL_LIST)] == [repr(PROVIDER_MODEL)], text
        all_written(tmp_path / "ws", docs)
    else:
        assert rc == 1, text
        assert "answered HTTP 404 on /v1/openai/models" in text


def run_with_quota(tmp_path: Path, env: dict[str, str], url_options: str = "", *extra: str, docs: int = 2) -> dict:
    """One run of ``docs`` 2-page documents (one attempt a page) against the provider with ``env``; every
    page written. Returns the provider's ``/admin/info`` and the run's log as ``log``."""
    pdfs = make_docs(tmp_path, docs, 2)
    provider = launch_provider(tmp_path, env)
    log = tmp_path / "run.log"
    url = f"{provider.url}{PROVIDER_PREFIX}#model={PROVIDER_MODEL}{url_options}"
    with running_pipeline(tmp_path / "ws", url, pdfs, "--max_page_retries", "1", *extra, log=log,
                          stop=[provider]) as run:
        rc = run.wait(90)
        stats = info(provider)
    text = log.read_text()
    assert rc == 0, text
    all_written(tmp_path / "ws", pdfs)
    return {**{k: stats[k] for k in ("throttled", "early_requests", "admitted")}, "log": text}


@pytest.mark.parametrize(("form", "status"), [("seconds", 429), ("date", 429), ("seconds", 503)])
def test_retry_after_waited_out_without_attempts(tmp_path: Path, form: str, status: int) -> None:
    """429/503 with Retry-After: no page attempt used (one attempt per page, none falls back), and no
    request reaches the provider before the time it named."""
    stats = run_with_quota(tmp_path, {"OLMOCR_STANDIN_THROTTLE_NEXT": "3", "OLMOCR_STANDIN_THROTTLE_RETRY_AFTER": "2",
                                      "OLMOCR_STANDIN_RETRY_AFTER_FORM": form,
                                      "OLMOCR_STANDIN_THROTTLE_STATUS": str(status)})
    assert (stats["throttled"], stats["early_requests"]) == (3, 0), stats
    assert "Retry-After" in stats["log"]


def test_paced_under_quota_gets_no_429(tmp_path: Path) -> None:
    """A quota of 3 requests per 6 s (30 a minute): with #rpm=30 the pipeline is never refused."""
    stats = run_with_quota(tmp_path, {"OLMOCR_STANDIN_RPM_QUOTA": "3", "OLMOCR_STANDIN_QUOTA_WINDOW_S": "6"}, "&rpm=30")
    assert stats["throttled"] == 0, stats


@pytest.mark.parametrize("paced", [True, False])
def test_token_quota(tmp_path: Path, paced: bool) -> None:
    """A token quota of 8,000 per 3 s (160,000 a minute; a page costs about 2,600 tokens, counted when
    answered). With #tpm=160000 the pipeline spaces its requests by the tokens its answers report and is
    never refused; without, even one request at a time is refused, and no page is lost."""
    env = {"OLMOCR_STANDIN_TPM_QUOTA": "8000", "OLMOCR_STANDIN_QUOTA_WINDOW_S": "3"}
    stats = run_with_quota(tmp_path, env, "&tpm=160000" if paced else "", "--max_concurrent_requests", "1", docs=5)
    assert (stats["throttled"] == 0) == paced, stats
    assert stats["early_requests"] == 0, stats


def test_unpaced_over_quota_loses_nothing(tmp_path: Path) -> None:
    """The same kind of quota without a configured limit: refused requests wait out Retry-After, no page lost."""
    stats = run_with_quota(tmp_path, {"OLMOCR_STANDIN_RPM_QUOTA": "2", "OLMOCR_STANDIN_QUOTA_WINDOW_S": "2"})
    assert stats["throttled"] > 0 and stats["early_requests"] == 0, stats


def test_max_cost_stops_gracefully(tmp_path: Path) -> None:
    """--max_cost: the run stops once the budget would be exceeded, the rest stays queued, exit status 3."""
    docs = make_docs(tmp_path, 8, 2)
    provider = launch_provider(tmp_path, {"OLMOCR_STANDIN_LATENCY": "0.2"})
    log = tmp_path / "run.log"
    # About 1,800 input and 780 output tokens a page: $0.0003 a page at $0.09/$0.19; $0.001 is ~3 pages.
    with running_pipeline(tmp_path / "ws", provider.url + PROVIDER_PREFIX, docs, "--model", PROVIDER_MODEL,
                          "--price_in", "0.09", "--price_out", "0.19", "--max_cost", "0.001",
                          "--pages_per_group", "2", "--workers", "1", log=log, stop=[provider]) as run:
        rc = run.wait(90)
    text = log.read_text()
    assert rc == STATUS_BUDGET, text
    assert logged(text, LOG_BUDGET, 0.001), text
    written = docs_by_source(tmp_path / "ws")
    assert 0 < len(written) < len(docs)
    assert workspace_files(tmp_path / "ws", "failed") == []



def scrape(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return parse_metrics(resp.read().decode())
    except OSError:
        return None


def test_metrics_report_tokens_and_cost(tmp_path: Path) -> None:
    """/metrics: each server's tokens and cost so far; the cost is the tokens times the prices."""
    docs = make_docs(tmp_path, 4, 2)
    provider = launch_provider(tmp_path, {"OLMOCR_STANDIN_LATENCY": "0.3", "OLMOCR_STANDIN_CONCURRENCY": "2"})
    port = free_port()
    url = provider.url + PROVIDER_PREFIX
    server = f"server={url}"
    scrapes: list[dict[str, float]] = []
    with running_pipeline(tmp_path / "ws", f"{url}#model={PROVIDER_MODEL}&price_in=0.09&price_out=0.19", docs,
                          "--metrics_port", str(port), "--max_concurrent_requests", "2",
                          log=tmp_path / "run.log", stop=[provider]) as run:
        deadline = time.monotonic() + 90
        while run.poll() is None and time.monotonic() < deadline:
            got = scrape(port)
            if got is not None and f"olmocr_pipeline_server_cost_dollars_total{{{server}}}" in got:
                scrapes.append(got)
            time.sleep(0.2)
        assert run.wait(5) == 0, run.output()[-3000:]
    costs = [s[f"olmocr_pipeline_server_cost_dollars_total{{{server}}}"] for s in scrapes]
    assert costs == sorted(costs) and costs[-1] > 0, costs
    last = scrapes[-1]
    tokens_in = last[f"olmocr_pipeline_server_tokens_total{{kind=input,{server}}}"]
    tokens_out = last[f"olmocr_pipeline_server_tokens_total{{kind=output,{server}}}"]
    assert costs[-1] == pytest.approx((tokens_in * 0.09 + tokens_out * 0.19) / 1e6)


def test_a_provider_without_health_comes_back_after_an_outage(tmp_path: Path) -> None:
    """A provider has no /health (404): after 5xx take it out of rotation, its probes (model list and a
    test completion) bring it back, and every page is written."""
    docs = make_docs(tmp_path, 3, 2)
    provider = launch_provider(tmp_path, {"OLMOCR_STANDIN_LATENCY": "0.2", "OLMOCR_STANDIN_ERROR_RATE": "1.0"})
    log = tmp_path / "run.log"
    with running_pipeline(tmp_path / "ws", provider.url + PROVIDER_PREFIX, docs, "--model", PROVIDER_MODEL,
                          log=log, stop=[provider]) as run:
        run.wait_log(log_line(LOG_PAUSED), 60, "the provider taken out of rotation")
        control(provider, error_rate=0.0)
        rc = run.wait(90)
    text = log.read_text()
    assert rc == 0, text
    assert log_line(LOG_RESUMED).search(text), text
    all_written(tmp_path / "ws", docs)
