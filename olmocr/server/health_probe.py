"""One health probe of a vLLM server over HTTP: liveness, served model, and real progress.

vLLM's ``/health`` and ``/v1/models`` keep answering 200 while a single-GPU engine is hung (vLLM
#39863, #37729), so the probe also sends a tiny real completion (``max_tokens`` 1). When that times
out but ``vllm:generation_tokens_total`` in ``/metrics`` advanced while it waited, the server
is busy, not hung, and the probe says so instead of failing.
"""

from __future__ import annotations

import re
import time

import requests

from olmocr.model_list import parse_models
from olmocr.server.health import KillKind, ProbeResult
from olmocr.server.settings import SERVED_MODEL_NAME

_GENERATION_TOKENS = re.compile(r"^vllm:generation_tokens_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)


class ServerProbe:
    """Callable probe for one server (thread-compatible: it keeps no state between calls)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, health_timeout: float = 5.0,
                 completion_timeout: float = 18.0, served_model_name: str = SERVED_MODEL_NAME) -> None:
        self.base_url = base_url.rstrip("/")
        self.health_timeout = health_timeout
        self.completion_timeout = completion_timeout
        self.served_model_name = served_model_name
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def __call__(self) -> ProbeResult:
        started = time.monotonic()

        def result(ok: bool, reason: str, **kw: object) -> ProbeResult:
            return ProbeResult(ok, reason, time.monotonic() - started, **kw)  # type: ignore[arg-type]

        try:
            health = requests.get(f"{self.base_url}/health", timeout=self.health_timeout)
        except requests.ConnectionError as exc:
            if _is_refused(exc):
                return result(False, "connection refused (server not listening)", refused=True,
                              kind=KillKind.NOT_LISTENING)
            return result(False, f"GET /health failed: {_short(exc)}", kind=KillKind.HEALTH_ENDPOINT)
        except requests.Timeout:
            return result(False, f"GET /health timed out after {self.health_timeout:g} s", kind=KillKind.HEALTH_ENDPOINT)
        if health.status_code != 200:
            return result(False, f"GET /health returned {health.status_code}", kind=KillKind.HEALTH_ENDPOINT)

        try:
            models = requests.get(f"{self.base_url}/v1/models", headers=self._headers,
                                  timeout=self.health_timeout)
        except requests.RequestException as exc:
            return result(False, f"GET /v1/models failed: {_short(exc)}", kind=KillKind.MODELS_ENDPOINT)
        if models.status_code == 401:
            return result(False, "GET /v1/models returned 401: the listener's API key does not match "
                                 "the server's (VLLM_API_KEY / OLMOCR_API_KEY_FILE)", config_error=True,
                          kind=KillKind.MODELS_ENDPOINT)
        if models.status_code != 200:
            return result(False, f"GET /v1/models returned {models.status_code}", kind=KillKind.MODELS_ENDPOINT)
        try:
            served = list(parse_models(models.content))
        except ValueError:
            return result(False, "GET /v1/models did not return a model list", kind=KillKind.MODELS_ENDPOINT)
        if self.served_model_name not in served:
            return result(False, f"model {self.served_model_name} not served (server lists {served})",
                          config_error=True, kind=KillKind.MODELS_ENDPOINT)

        tokens = self._generation_tokens()
        body = {
            "model": self.served_model_name,
            "messages": [{"role": "user", "content": "Reply with one word."}],
            "max_tokens": 1,
            "temperature": 0.0,
        }
        try:
            answer = requests.post(f"{self.base_url}/v1/chat/completions", json=body,
                                   headers=self._headers, timeout=self.completion_timeout)
        except requests.Timeout:
            # Progress *while this probe waited*, not since the previous probe: tokens generated
            # before an engine hung must not excuse the first probe after it.
            tokens_after = self._generation_tokens()
            if tokens is not None and tokens_after is not None and tokens_after > tokens:
                return result(True, "completion probe timed out but the server generated "
                                    f"{tokens_after - tokens:.0f} tokens meanwhile (busy, not hung)",
                              busy=True, generation_tokens=tokens_after)
            return result(False, f"completion probe timed out after {self.completion_timeout:g} s "
                                 "(engine hung?)", generation_tokens=tokens_after,
                          kind=KillKind.COMPLETION_TIMEOUT)
        except requests.RequestException as exc:
            return result(False, f"completion probe failed: {_short(exc)}", generation_tokens=tokens,
                          kind=KillKind.COMPLETION_ERROR)
        if answer.status_code != 200:
            return result(False, f"completion probe returned {answer.status_code}",
                          generation_tokens=tokens, kind=KillKind.COMPLETION_ERROR)
        return result(True, "ok", generation_tokens=tokens)

    def _generation_tokens(self) -> float | None:
        try:
            text = requests.get(f"{self.base_url}/metrics", timeout=self.health_timeout).text
        except requests.RequestException:
            return None
        match = _GENERATION_TOKENS.search(text)
        return float(match.group(1)) if match else None


def _is_refused(exc: BaseException) -> bool:
    """True when the chain of wrapped errors (requests > urllib3 > socket) holds ECONNREFUSED."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending and len(seen) < 20:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return True
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None),
                    *current.args[:1]]
    return "Connection refused" in str(exc)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."
