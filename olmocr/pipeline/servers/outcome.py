"""The retry policy in one place: what one server's answer to one page request means (a pure function).

:func:`classify` turns the answer (a :class:`Response`) or the exception the request ended with into an
:class:`Outcome`; :meth:`Fleet.chat` only acts on it. docs/pipeline.md's table "What does and does not use
up a page attempt" is this module in prose; ``tests/test_outcome.py`` checks it row by row.

============================================  ============  ================================================
what came back                                outcome       what happens
============================================  ============  ================================================
200 with a JSON answer                        SUCCESS       the page's attempt is judged on its content
200 whose ``model`` is not the name asked     TRANSIENT     not written; page resent; the server leaves the
                                                            rotation for good (OTHER_MODEL), naming the model
200 ``finish_reason: abort`` (vLLM stopping)  TRANSIENT     resent; counts as a server error (ABORTED)
200 that is not JSON                          REJECTED      one failed attempt (retryable)
429 or 503 with ``Retry-After`` (seconds     TRANSIENT     the server gets no request until it has passed
or an HTTP date)                                            (RATE_LIMITED); resent; never a page attempt,
                                                            never the server's failure
HTTP 429 without ``Retry-After``              TRANSIENT     resent after a pause; not the server's failure
HTTP 5xx                                      TRANSIENT     resent; 3 in a row eject the server
404 "model does not exist"                    TRANSIENT     the server restarted with another served name:
                                                            it is ejected like a failing one, page resent
408, 409, 425                                 REJECTED      one failed attempt (retryable)
any other 4xx (400, 401, 413, 422 ...)        REJECTED      not retryable: the page falls back at once
no answer within the request timeout          TRANSIENT     resent; the server is ejected at once (hung?)
connection refused / reset / malformed        TRANSIENT     resent; 3 in a row eject the server
the server left rotation (ServerAborted)      RESEND        resent elsewhere: no error, no pause
============================================  ============  ================================================

A TRANSIENT outcome never uses up a page attempt, however long the outage, except that 20 server errors in
a row for one request while the server stays in rotation count as one failed attempt (a poisonous page must
not loop forever): that rule needs the count across resends and lives in :meth:`Fleet.chat`.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from olmocr.envs import SERVED_MODEL_NAME
from olmocr.pipeline.errors import RequestTimeout, ServerAborted, TransportError
from olmocr.pipeline.servers.http import Response

#: 4xx answers that may change when the same request is sent again; any other 4xx (400 context too
#: small, 401 key, 413, 422 ...) would be refused again: the page stops trying at once.
RETRYABLE_4XX = frozenset({408, 409, 425})
#: Answers whose ``Retry-After`` is honoured: a provider's rate limit (429) or a gateway's overload (503).
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: The longest ``Retry-After`` waited out as such; a longer one (a daily quota) is waited out this long, then
#: the server is tried again.
MAX_RETRY_AFTER_S = 3600.0


class Outcome(enum.Enum):
    SUCCESS = "success"
    TRANSIENT = "transient"  # resend (to the best server), never a page attempt
    RESEND = "resend elsewhere"  # the request was moved off a server: resend at once, nothing went wrong
    REJECTED = "rejected"  # a failed page attempt (``retryable`` says whether another attempt may help)


class Problem(enum.Enum):
    """Why a TRANSIENT request failed: travels as a value, becomes text only in logs."""

    TIMEOUT = "timeout"
    CONNECTION = "connection error"
    BUSY = "HTTP 429"
    SERVER_ERROR = "HTTP 5xx"
    ABORTED = "aborted"
    WRONG_MODEL = "model not served"
    OTHER_MODEL = "answered by another model"
    RATE_LIMITED = "rate limited (Retry-After)"

    @property
    def is_server_error(self) -> bool:
        """Counts toward the "20 server errors in a row" rule (an abort is a 5xx in a 200)."""
        return self in (Problem.SERVER_ERROR, Problem.ABORTED)

    @property
    def counts_against_server(self) -> bool:
        """Counts toward ejecting the server (a 429 means busy, not broken)."""
        return self not in (Problem.BUSY, Problem.RATE_LIMITED)

    @property
    def ejects_at_once(self) -> bool:
        """No request finished for the whole request timeout: the engine is presumably hung."""
        return self in (Problem.TIMEOUT, Problem.OTHER_MODEL)


@dataclass(frozen=True)
class Classified:
    outcome: Outcome
    problem: Problem | None = None
    #: Human text for logs and RequestRejected (never parsed again).
    detail: str = ""
    status: int | None = None
    retryable: bool = True
    data: dict[str, Any] | None = None
    #: RATE_LIMITED: seconds before the server may be sent another request.
    retry_after: float | None = None


def aborted(data: dict[str, Any]) -> bool:
    """vLLM answers 200 with ``finish_reason: abort`` for a request it cut short while stopping."""
    choices = data.get("choices") or []
    return bool(choices) and isinstance(choices[0], dict) and choices[0].get("finish_reason") == "abort"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from ``now`` (epoch seconds): ``"7"`` -> 7.0, an HTTP date -> the time
    until it (0 when past), capped at :data:`MAX_RETRY_AFTER_S`; None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def classify(resp: Response | None, exc: BaseException | None = None, *, model: str | None = None,
             now: float | None = None) -> Classified:
    """What the answer ``resp`` (or the exception ``exc`` the request ended with) means for the page.

    ``model``: the name the request asked for; an answer whose ``model`` field names another is not the
    page's answer. ``now``: epoch seconds, for a ``Retry-After`` given as an HTTP date."""
    if exc is not None:
        if isinstance(exc, RequestTimeout):
            return Classified(Outcome.TRANSIENT, Problem.TIMEOUT, f"timeout: {exc}")
        if isinstance(exc, ServerAborted):
            return Classified(Outcome.RESEND, detail="moved to another server")
        if isinstance(exc, TransportError):
            return Classified(Outcome.TRANSIENT, Problem.CONNECTION, f"connection error: {exc}")
        raise exc
    assert resp is not None
    status = resp.status
    if status == 200:
        try:
            data = json.loads(resp.body)
        except ValueError:
            return Classified(Outcome.REJECTED, detail="answer is not JSON", status=200)
        if not isinstance(data, dict):
            return Classified(Outcome.REJECTED, detail="answer is not a JSON object", status=200)
        if aborted(data):
            return Classified(Outcome.TRANSIENT, Problem.ABORTED,
                              "the server aborted the request (finish_reason abort: it is stopping)", status)
        answered = data.get("model")
        if model is not None and answered is not None and str(answered) != model:
            return Classified(Outcome.TRANSIENT, Problem.OTHER_MODEL,
                              f"answered by model {str(answered)[:100]!r}, not {model!r}", status)
        return Classified(Outcome.SUCCESS, status=200, data=data)
    if status in RETRY_AFTER_STATUSES and (wait := retry_after_seconds(resp.retry_after, now)) is not None:
        return Classified(Outcome.TRANSIENT, Problem.RATE_LIMITED,
                          f"HTTP {status}, Retry-After {resp.retry_after}", status, retry_after=wait)
    if status == 429:
        return Classified(Outcome.TRANSIENT, Problem.BUSY, "HTTP 429", status)
    if status >= 500:
        return Classified(Outcome.TRANSIENT, Problem.SERVER_ERROR, f"HTTP {status}", status)
    if status == 404 and b"does not exist" in resp.body:
        # A server restarted with the wrong --served-model-name: not the page's fault; it leaves the
        # rotation like a failing one (its probes check /v1/models) and the page goes elsewhere.
        return Classified(Outcome.TRANSIENT, Problem.WRONG_MODEL, f"HTTP 404, model {model or SERVED_MODEL_NAME!r} not served",
                          status)
    return Classified(Outcome.REJECTED, detail=resp.body[:300].decode("utf-8", "replace"), status=status,
                      retryable=status in RETRYABLE_4XX)
