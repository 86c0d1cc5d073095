"""What the pipeline learns from the server at start-up (max_model_len, guided-decoding field), and how it
treats answers no retry can change (400) and aborted requests: pure functions, then the pipeline CLI
against the stand-in, which behaves as vLLM 0.32 does in these respects (docs/real-vllm.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from olmocr.pipeline.errors import ServerMismatch
from olmocr.pipeline.servers.checks import (
    GUIDED_REGEX_FIELD,
    LOG_CONTEXT_TOO_SMALL,
    MIN_USEFUL_MAX_TOKENS,
    STRUCTURED_OUTPUTS,
    guided_field_for,
    parse_models,
    plan_max_tokens,
    prompt_tokens_bound,
)
from tests.pipeline_helpers import (
    SAMPLES,
    StandIn,
    Standins,
    _close_cached_render_docs,  # noqa: F401 - autouse fixture
    docs_by_source,
    failures,
    log_line,
    logged,
    page_count,
    run_pipeline,
)
from tests.standin_helpers import VLLM_FLAGS, chat_payload, make_png

pytestmark = pytest.mark.timeout(240)

#: The wrapper's flags with a 2048-token context (the real-vLLM tier's server).
SMALL_CONTEXT = (*VLLM_FLAGS, "--max-model-len", "2048")


# ------------------------------------------------------------------------------------------ pure


@pytest.mark.parametrize("version,field", [
    ("0.32.0", STRUCTURED_OUTPUTS), ("0.32.0+cpu", STRUCTURED_OUTPUTS), ("0.11.0", STRUCTURED_OUTPUTS),
    ("0.11.2", STRUCTURED_OUTPUTS), ("0.10.2", GUIDED_REGEX_FIELD), ("0.10.1.1", GUIDED_REGEX_FIELD), ("0.9.2", GUIDED_REGEX_FIELD), (None, STRUCTURED_OUTPUTS), ("dev", STRUCTURED_OUTPUTS),
])
def test_guided_field_follows_the_server_version(version: str | None, field: str) -> None:
    assert guided_field_for(version) == field


def test_models_list_gives_max_model_len_per_model() -> None:
    body = json.dumps({"data": [{"id": "olmocr", "max_model_len": 2048}, {"id": "other"}]}).encode()
    assert parse_models(body) == {"olmocr": 2048, "other": None}
    with pytest.raises(ValueError):
        parse_models(b"<html>")


def test_max_tokens_fit_the_servers_context() -> None:
    assert plan_max_tokens(None, 1288) == 8000  # a server that does not say: upstream's value
    assert plan_max_tokens(16384, 1288) == 8000  # olmocr-serve's default context has room
    # A small context caps the answer so prompt + answer always fit (vLLM refuses max_tokens > context).
    capped = plan_max_tokens(2048, 640)
    assert capped == 2048 - prompt_tokens_bound(640) and MIN_USEFUL_MAX_TOKENS <= capped < 8000
    with pytest.raises(ServerMismatch) as err:
        plan_max_tokens(2048, 1288)
    message = str(err.value)
    assert "\n" not in message
    # Restart with 16384 (the next power of two above prompt + 8000), said for both ways to start a server.
    assert log_line(LOG_CONTEXT_TOO_SMALL, 2048, 1288, prompt_tokens_bound(1288), MIN_USEFUL_MAX_TOKENS, 16384,
                    16384).fullmatch(message), message


# ------------------------------------------------------------------------------ stand-in as vLLM


def test_standin_honours_structured_outputs_and_warns_about_guided_regex(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_ANSWER="garbage", extra_args=SMALL_CONTEXT)
    assert requests.get(s.url + "/version", timeout=5).json()["version"].startswith("0.32.0")
    assert requests.get(s.url + "/v1/models", timeout=5).json()["data"][0]["max_model_len"] == 2048
    png = make_png(400, 300)
    regex = "---\\nprimary_language: .*"

    def content(**extra: object) -> str:
        r = requests.post(s.url + "/v1/chat/completions", json={**chat_payload(png, max_tokens=100), **extra},
                          timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    assert not content().startswith("---")  # garbage unless constrained
    assert content(structured_outputs={"regex": regex}).startswith("---\nprimary_language")
    assert not content(guided_regex=regex).startswith("---")  # removed field: ignored, as vLLM 0.32
    log = s.log.read_text()
    assert log.count("removed guided-decoding field(s) ['guided_regex']") == 1
    # Over the context: vLLM 0.32's 400 for max_tokens alone larger than max_model_len.
    r = requests.post(s.url + "/v1/chat/completions", json=chat_payload(png, max_tokens=8000), timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("max_tokens=8000 cannot be greater than max_model_len=2048")
    # An old vLLM honours guided_regex.
    s.control(vllm_version="0.9.2")
    assert content(guided_regex=regex).startswith("---\nprimary_language")


# ---------------------------------------------------------------------------- pipeline end to end


def _pages(docs: list[Path]) -> int:
    return sum(page_count(p) for p in docs)


def _info(s: StandIn) -> dict:
    return requests.get(s.url + "/admin/info", timeout=5).json()


def test_small_context_stops_before_claiming_work_with_a_clear_error(tmp_path: Path, standins: Standins) -> None:
    s = standins(extra_args=SMALL_CONTEXT)
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, s.url, SAMPLES.small[:1], log=tmp_path / "run.log")
    assert rc == 1, log
    errors = [line for line in log.splitlines() if " - ERROR - " in line]
    assert len(errors) == 1 and logged(errors[0], LOG_CONTEXT_TOO_SMALL, 2048, 1288), log
    assert logged(errors[0], LOG_CONTEXT_TOO_SMALL)[0].groups()[-2:] == ("16384", "16384"), errors[0]
    assert "claimed" not in log and not (ws / "results").exists()
    assert _info(s)["completions_seen"] == 0


def test_small_context_caps_max_tokens_and_guided_decoding_uses_structured_outputs(tmp_path: Path, standins: Standins) -> None:
    # A server that answers garbage unless constrained, with a 2048-token context: every page still gets
    # the model's answer (constrained, capped), none falls back, and the server never refused a request.
    s = standins(OLMOCR_STANDIN_ANSWER="garbage", extra_args=SMALL_CONTEXT)
    ws = tmp_path / "ws"
    docs = SAMPLES.small[:2]
    rc, log = run_pipeline(ws, s.url, docs, "--guided_decoding", "--target_longest_image_dim", "640",
                           log=tmp_path / "run.log")
    assert rc == 0, log
    assert "answers are capped at" in log and "'structured_outputs' request field (vLLM 0.32.0" in log
    found = docs_by_source(ws)
    assert set(found) == {str(p) for p in docs} and failures(ws) == []
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in found.values())
    assert " 400 " not in s.log.read_text() and "removed guided-decoding" not in s.log.read_text()
    assert _info(s)["completions_seen"] == _pages(docs)


def test_old_server_gets_guided_regex(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_ANSWER="garbage", OLMOCR_STANDIN_VLLM_VERSION="0.9.2")
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, s.url, SAMPLES.small[:1], "--guided_decoding", log=tmp_path / "run.log")
    assert rc == 0, log
    assert "'guided_regex' request field (vLLM 0.9.2" in log
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in docs_by_source(ws).values())


def test_a_refusal_no_retry_can_change_uses_one_request_per_page(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_ERROR_RATE="1", OLMOCR_STANDIN_ERROR_STATUS="400")
    ws = tmp_path / "ws"
    doc = SAMPLES.small[0]
    rc, log = run_pipeline(ws, s.url, [doc], "--max_page_error_rate", "1", log=tmp_path / "run.log")
    assert rc == 0, log
    pages = page_count(doc)
    assert _info(s)["completions_seen"] == pages  # not 8 attempts each
    assert log.count("no retry can change that") == pages
    assert docs_by_source(ws)[str(doc)]["metadata"]["total-fallback-pages"] == pages


def test_aborted_requests_are_resent_and_no_page_is_lost(tmp_path: Path, standins: Standins) -> None:
    # Every second answer is cut short with finish_reason "abort", as vLLM answers in-flight requests
    # when it stops: those pages are sent again (not counted as failed attempts) and all get answers.
    s = standins(OLMOCR_STANDIN_ANSWER="abort:2")
    ws = tmp_path / "ws"
    docs = SAMPLES.small[:2]
    rc, log = run_pipeline(ws, s.url, docs, "--max_page_retries", "1", log=tmp_path / "run.log")
    assert rc == 0, log
    found = docs_by_source(ws)
    assert set(found) == {str(p) for p in docs} and failures(ws) == []
    assert all(d["metadata"]["total-fallback-pages"] == 0 for d in found.values())
    pages = _pages(docs)
    assert _info(s)["completions_seen"] > pages
    assert "finish_reason abort" in log
