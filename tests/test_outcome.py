"""The retry policy, row by row (olmocr/pipeline/servers/outcome.py; docs/pipeline.md "What does and does not
use up a page attempt")."""

from __future__ import annotations

import json

import pytest

from olmocr.pipeline.errors import RequestTimeout, ServerAborted, TlsError, TransportError
from olmocr.pipeline.servers.http import Response
from olmocr.pipeline.servers.outcome import MAX_RETRY_AFTER_S, Outcome, Problem, classify, retry_after_seconds
from tests.standin_helpers import REPO_ROOT

OK = json.dumps({"choices": [{"finish_reason": "stop", "message": {"content": "x"}}]}).encode()
ABORT = json.dumps({"choices": [{"finish_reason": "abort", "message": {"content": ""}}]}).encode()
NO_MODEL = b'{"object":"error","message":"The model `olmocr` does not exist.","type":"NotFoundError","code":404}'


@pytest.mark.parametrize("status, body, outcome, problem, retryable", [
    (200, OK, Outcome.SUCCESS, None, True),
    (200, ABORT, Outcome.TRANSIENT, Problem.ABORTED, True),
    (200, b"<html>", Outcome.REJECTED, None, True),
    (200, b"[1, 2]", Outcome.REJECTED, None, True),
    (429, b"busy", Outcome.TRANSIENT, Problem.BUSY, True),
    (500, b"", Outcome.TRANSIENT, Problem.SERVER_ERROR, True),
    (503, b"", Outcome.TRANSIENT, Problem.SERVER_ERROR, True),
    (404, NO_MODEL, Outcome.TRANSIENT, Problem.WRONG_MODEL, True),
    (404, b"Not Found", Outcome.REJECTED, None, False),
    (408, b"", Outcome.REJECTED, None, True),
    (409, b"", Outcome.REJECTED, None, True),
    (425, b"", Outcome.REJECTED, None, True),
    (400, b"max_tokens=8000 cannot be greater than max_model_len=2048", Outcome.REJECTED, None, False),
    (401, b"Unauthorized", Outcome.REJECTED, None, False),
    (413, b"", Outcome.REJECTED, None, False),
    (422, b"", Outcome.REJECTED, None, False),
])
def test_answers(status, body, outcome, problem, retryable):
    result = classify(Response(status, body))
    assert (result.outcome, result.problem, result.retryable) == (outcome, problem, retryable)
    if outcome is Outcome.SUCCESS:
        assert result.data["choices"][0]["finish_reason"] == "stop"
    if outcome is Outcome.REJECTED and status != 200:
        assert result.detail == body.decode()[:300]


@pytest.mark.parametrize("exc, outcome, problem", [
    (RequestTimeout("no answer in 600 s"), Outcome.TRANSIENT, Problem.TIMEOUT),
    (ServerAborted("ejected"), Outcome.RESEND, None),
    (TransportError("connection refused"), Outcome.TRANSIENT, Problem.CONNECTION),
    (TlsError("certificate verify failed"), Outcome.TRANSIENT, Problem.CONNECTION),
])
def test_failed_requests(exc, outcome, problem):
    result = classify(None, exc)
    assert (result.outcome, result.problem) == (outcome, problem)


def test_an_exception_that_is_not_a_transport_failure_is_not_swallowed():
    with pytest.raises(KeyError):
        classify(None, KeyError("bug"))


@pytest.mark.parametrize("problem, server_error, against_server, eject_now", [
    (Problem.TIMEOUT, False, True, True),
    (Problem.CONNECTION, False, True, False),
    (Problem.BUSY, False, False, False),
    (Problem.SERVER_ERROR, True, True, False),
    (Problem.ABORTED, True, True, False),
    (Problem.WRONG_MODEL, False, True, False),
    (Problem.OTHER_MODEL, False, True, True),
    (Problem.RATE_LIMITED, False, False, False),
])
def test_what_each_problem_counts_toward(problem, server_error, against_server, eject_now):
    assert (problem.is_server_error, problem.counts_against_server, problem.ejects_at_once) == (
        server_error, against_server, eject_now)


def test_the_docs_table_names_every_kind_of_answer():
    table = (REPO_ROOT / "docs" / "pipeline.md").read_text()
    section = table[table.index("## What does and does not use up a page attempt"):]
    section = section[:section.index("\n## ")]
    for words in ("finish_reason", "4xx", "429", "5xx", "timeout", "connection refused", "20 times"):
        assert words in section, words


# ---------------------------------------------------------------------------------------------- providers (#31)

ASKED = "allenai/olmOCR-2-7B-1025"
NOW = 1_800_000_000.0  # epoch seconds: Fri, 15 Jan 2027 08:00:00 GMT


def answer(model: str | None) -> bytes:
    data = {"choices": [{"finish_reason": "stop", "message": {"content": "x"}}]}
    if model is not None:
        data["model"] = model
    return json.dumps(data).encode()


@pytest.mark.parametrize("answered, outcome, problem", [
    (ASKED, Outcome.SUCCESS, None),  # the model asked for
    (None, Outcome.SUCCESS, None),  # no model field: nothing to check
    ("someone/other-model", Outcome.TRANSIENT, Problem.OTHER_MODEL),  # a silent switch: never written
    ("olmocr", Outcome.TRANSIENT, Problem.OTHER_MODEL),  # another name is another model
])
def test_every_answer_names_the_model_asked_for(answered, outcome, problem):
    result = classify(Response(200, answer(answered)), model=ASKED)
    assert (result.outcome, result.problem) == (outcome, problem)
    if problem is Problem.OTHER_MODEL:
        assert repr(answered) in result.detail and result.data is None


def test_without_a_model_asked_for_the_field_is_not_checked():
    assert classify(Response(200, answer("anything"))).outcome is Outcome.SUCCESS


@pytest.mark.parametrize("status, header, problem, wait", [
    (429, "7", Problem.RATE_LIMITED, 7.0),
    (503, "7", Problem.RATE_LIMITED, 7.0),
    (429, "Fri, 15 Jan 2027 08:00:30 GMT", Problem.RATE_LIMITED, 30.0),  # an HTTP date, 30 s ahead
    (429, "Fri, 15 Jan 2027 07:59:00 GMT", Problem.RATE_LIMITED, 0.0),  # already past
    (429, "0", Problem.RATE_LIMITED, 0.0),
    (429, "99999", Problem.RATE_LIMITED, MAX_RETRY_AFTER_S),  # a daily quota: capped, then tried again
    (429, None, Problem.BUSY, None),  # no header: today's pause and resend
    (429, "soon", Problem.BUSY, None),  # unreadable: likewise
    (503, None, Problem.SERVER_ERROR, None),  # no header: a failing server (3 in a row eject it)
    (500, "7", Problem.SERVER_ERROR, None),  # only 429 and 503 carry a rate limit
])
def test_retry_after(status, header, problem, wait):
    result = classify(Response(status, b"", header), now=NOW)
    assert (result.outcome, result.problem, result.retry_after) == (Outcome.TRANSIENT, problem, wait)


@pytest.mark.parametrize("value, seconds", [
    ("12", 12.0), (" 3 ", 3.0), ("1.5", 1.5), ("-4", 0.0), ("nan", None), ("", None), (None, None),
    ("Fri, 15 Jan 2027 08:01:00 GMT", 60.0), ("Friday, 15-Jan-27 08:01:00 GMT", 60.0),
    ("Fri Jan 15 08:01:00 2027", None),  # asctime has no zone: not trusted
])
def test_retry_after_seconds(value, seconds):
    assert retry_after_seconds(value, now=NOW) == seconds
