"""The stand-in as a hosted provider (control keys; docs/standin.md, "Playing a provider").

A provider serves the OpenAI API under a path (``path_prefix``: ``/v1/openai`` is DeepInfra's form), has no
``/health``, may have no ``/v1/models`` (``models_missing``), serves the model under its own name
(``--served-model-name``), refuses what goes over its quota with 429 and ``Retry-After`` (``rpm_quota`` over
``quota_window_s``, and ``tpm_quota`` tokens answered per window likewise; ``throttle_next`` answers the next N requests so, in ``retry_after_form`` seconds or
date, with ``throttle_status`` 429 or 503), and may silently answer with another model (``answer_model``).

:class:`Gate` is the quota and the Retry-After bookkeeping: it also counts requests that arrived before a
Retry-After it gave had passed (``early``), which the tests and the benchmark read from ``/admin/info``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from email.utils import formatdate
from typing import Any


def api_path(path: str, prefix: str | None) -> str | None:
    """The vLLM path a request path means under a provider's ``prefix``: ``/v1/openai/models`` ->
    ``/v1/models``. Without a prefix the path itself; None when it is not under the prefix (404)."""
    if not prefix:
        return path
    prefix = "/" + prefix.strip("/")
    if path == prefix or path.startswith(prefix + "/"):
        return "/v1" + path[len(prefix):]
    return None


def retry_after_header(seconds: float, form: str, now: float | None = None) -> tuple[str, float]:
    """(``Retry-After`` value, the epoch time it names). ``form`` "seconds": whole seconds, rounded up;
    "date": an HTTP date (one-second resolution, rounded up)."""
    now = time.time() if now is None else now
    whole = max(1, math.ceil(seconds))
    if form == "date":
        when = math.ceil(now + seconds)
        return formatdate(when, usegmt=True), float(when)
    return str(whole), now + whole


#: A request arriving this soon after a refusal was sent before the client could have read it (requests
#: already on their way): it does not count as early.
IN_FLIGHT_GRACE_S = 0.2


class Gate:
    """A sliding-window quota of chat requests and the Retry-After promises made."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: deque[float] = deque()  # epoch times of requests let through, within the window
        self.spent: deque[tuple[float, int]] = deque()  # (epoch, tokens) of answers, within the window
        self.not_before = 0.0  # epoch: the latest Retry-After given
        self.refused_at = 0.0  # epoch: when it was given
        self.throttled = 0  # answers 429/503 with Retry-After
        self.early = 0  # requests that arrived before a Retry-After given had passed
        self.admitted = 0
        self.first_admitted: float | None = None  # epoch times of the first and last request let through
        self.last_admitted: float | None = None

    def check(self, control: Any, now: float | None = None) -> tuple[int, str] | None:
        """None to serve the request, else (status, Retry-After value) to refuse it with."""
        now = time.time() if now is None else now
        form = str(control.get("retry_after_form") or "seconds")
        with self.lock:
            if self.refused_at + IN_FLIGHT_GRACE_S < now < self.not_before:
                self.early += 1
            pending = int(control.get("throttle_next") or 0)
            if pending > 0:
                control.update({"throttle_next": pending - 1})
                wait = float(control.get("throttle_retry_after") or 1.0)
                return self._refuse(int(control.get("throttle_status") or 429), wait, form, now)
            window = float(control.get("quota_window_s") or 60.0)
            while self.accepted and self.accepted[0] <= now - window:
                self.accepted.popleft()
            while self.spent and self.spent[0][0] <= now - window:
                self.spent.popleft()
            quota = control.get("rpm_quota")
            if quota and len(self.accepted) >= int(quota):
                return self._refuse(429, self.accepted[0] + window - now, form, now)
            tokens = control.get("tpm_quota")
            if tokens and sum(n for _, n in self.spent) >= int(tokens):
                return self._refuse(429, self.spent[0][0] + window - now, form, now)
            self.accepted.append(now)
            self.admitted += 1
            if self.first_admitted is None:
                self.first_admitted = now
            self.last_admitted = now
            return None

    def spend(self, tokens: int, now: float | None = None) -> None:
        """An answer's tokens, counted against ``tpm_quota`` for the window."""
        with self.lock:
            self.spent.append((time.time() if now is None else now, tokens))

    def _refuse(self, status: int, wait: float, form: str, now: float) -> tuple[int, str]:
        value, until = retry_after_header(wait, form, now)
        if until > self.not_before:
            self.not_before, self.refused_at = until, now
        self.throttled += 1
        return status, value

    def info(self) -> dict[str, Any]:
        with self.lock:
            return {"throttled": self.throttled, "early_requests": self.early, "admitted": self.admitted,
                    "first_admitted": self.first_admitted, "last_admitted": self.last_admitted}
