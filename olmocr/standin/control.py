"""In-memory control of the stand-in server's behaviour (how tests make it misbehave).

Sources, merged in this order (later wins): defaults < environment variables
``OLMOCR_STANDIN_<KEY>`` < the command line (``--answer``) < the JSON file named by ``OLMOCR_STANDIN_CONTROL`` (re-read when its mtime
changes) < ``POST /admin/control`` overrides.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from olmocr import envs

CONTROL_FILE_ENV = "OLMOCR_STANDIN_CONTROL"
ENV_PREFIX = "OLMOCR_STANDIN_"

DEFAULTS: dict[str, Any] = {
    "load_delay": 0.0,
    "crash_after": None,
    "crash_exit_code": 1,
    "crash_now": False,
    "hang": False,
    "latency": 0.0,
    "concurrency": None,
    "error_rate": 0.0,
    "error_status": 500,
    "health_status": 200,
    "served_model_name": None,
    "rotation": "none",
    "answer": "ok",  # or "read": Tesseract reads the image (olmocr/standin/reading.py)
    "output_tokens": 750,
    # The vLLM version the stand-in plays (``/version``, and which guided-decoding fields it honours).
    "vllm_version": "0.32.0",
    # Playing a hosted provider (olmocr/standin/provider.py).
    "path_prefix": None,  # e.g. "/v1/openai": the API lives there; /v1/* and /health answer 404
    "models_missing": False,  # the model list answers 404
    "answer_model": None,  # answers name this model (a silent switch); requests still use the served name
    "rpm_quota": None,  # chat requests allowed per quota_window_s; the excess gets 429 + Retry-After
    "tpm_quota": None,  # tokens (prompt + answer) per quota_window_s; once spent, 429 + Retry-After
    "quota_window_s": 60.0,
    "throttle_next": 0,  # the next N chat requests get throttle_status + Retry-After throttle_retry_after s
    "throttle_status": 429,
    "throttle_retry_after": 1.0,
    "retry_after_form": "seconds",  # or "date" (an HTTP date)
}


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Known keys found in the environment as ``OLMOCR_STANDIN_<KEY upper>``."""
    environ = dict(os.environ) if environ is None else environ
    found: dict[str, Any] = {}
    for key in DEFAULTS:
        name = ENV_PREFIX + key.upper()
        if name in environ:
            found[key] = _parse_env_value(environ[name])
    return found


class Control:
    """Thread-safe merged view of the control sources."""

    def __init__(self, environ: dict[str, str] | None = None, command_line: dict[str, Any] | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        self._lock = threading.Lock()
        self._env = {**env_overrides(environ), **(command_line or {})}
        self._file_path = envs.text(CONTROL_FILE_ENV, environ)
        self._file_mtime: float | None = None
        self._file: dict[str, Any] = {}
        self._admin: dict[str, Any] = {}
        self._merged: dict[str, Any] = {}
        self._warned_bad_file = False
        self._remerge()
        self.refresh()

    def _remerge(self) -> None:
        self._merged = {**DEFAULTS, **self._env, **self._file, **self._admin}

    def refresh(self) -> None:
        """Re-read the control file if its mtime changed (cheap: one stat)."""
        path = self._file_path
        if not path:
            return
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = None
        with self._lock:
            if mtime == self._file_mtime:
                return
        data: dict[str, Any] = {}
        if mtime is not None:
            try:
                with open(path, encoding="utf-8") as fh:
                    loaded = json.load(fh)
                if not isinstance(loaded, dict):
                    raise ValueError("control file must hold a JSON object")
                data = loaded
            except (OSError, ValueError) as exc:
                if not self._warned_bad_file:
                    print(f"WARNING: stand-in control file unreadable ({exc}); keeping previous values",
                          file=sys.stderr, flush=True)
                    self._warned_bad_file = True
                return
        with self._lock:
            self._file_mtime = mtime
            self._file = data
            self._warned_bad_file = False
            self._remerge()

    def update(self, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge admin overrides (``{"_reset": true}`` drops earlier admin overrides first)."""
        with self._lock:
            if patch.get("_reset"):
                self._admin = {}
            self._admin.update({k: v for k, v in patch.items() if k != "_reset"})
            self._remerge()
            return dict(self._merged)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._merged)

    def get(self, key: str) -> Any:
        with self._lock:
            return self._merged.get(key, DEFAULTS.get(key))
