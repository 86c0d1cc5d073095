"""The stand-in playing a hosted provider (olmocr/standin/provider.py), for the provider tests and bench."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.pipeline_helpers import StandIn
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import free_port, start_standin, wait_http_ok

#: DeepInfra's form (field-facts.md, "Hosted olmOCR endpoints").
PROVIDER_MODEL = "allenai/olmOCR-2-7B-1025"
PROVIDER_PREFIX = "/v1/openai"


def make_docs(tmp_path: Path, count: int = 3, pages: int = 3) -> list[Path]:
    """``count`` text PDFs of ``pages`` pages each, every page with its own words."""
    return [write_text_pdf(tmp_path / f"doc{i}.pdf", pages) for i in range(count)]


def launch_provider(tmp_path: Path, env: Mapping[str, str] | None = None, *,
                    served_model_name: str = PROVIDER_MODEL, prefix: str = PROVIDER_PREFIX) -> StandIn:
    """A stand-in started the way vLLM is, serving ``served_model_name`` under ``prefix`` (no /health)."""
    port = free_port()
    log = tmp_path / f"provider-{port}.log"
    full_env = {"OLMOCR_STANDIN_PATH_PREFIX": prefix, **(env or {})}
    proc = start_standin(port, env=full_env, log_path=log, served_model_name=served_model_name)
    started = StandIn(port, proc, full_env, log)
    try:
        wait_http_ok(f"{started.url}/admin/info", timeout=30, proc=proc, headers=_auth(started))
    except BaseException:
        started.stop()
        raise
    return started


def _auth(standin: StandIn) -> dict[str, str]:
    key = standin.env.get("VLLM_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def info(standin: StandIn) -> dict[str, Any]:
    """``/admin/info``: requests served, 429s given (``throttled``), requests before their Retry-After."""
    request = urllib.request.Request(f"{standin.url}/admin/info", headers=_auth(standin))
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def control(standin: StandIn, **patch: object) -> None:
    """``POST /admin/control`` with the provider's key."""
    request = urllib.request.Request(f"{standin.url}/admin/control", data=json.dumps(patch).encode(),
                                     headers={"Content-Type": "application/json", **_auth(standin)})
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()
