"""Workspace faults: a real S3 API (moto, server mode) behind a fault-injecting proxy on 127.0.0.1.

503 SlowDown, 500s, connection resets before and after the request reached the store: claims, lease
renewals and result uploads are retried (botocore's standard retry mode); a conditional write whose
answer was lost is recognised as ours; a result is never marked done unless it was written; a lease
that cannot be renewed is given up before it expires.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from olmocr.pipeline.runner import LOG_CLAIMED
from olmocr.pipeline.workspace.storage import open_storage
from tests.fault_proxy import FaultProxy
from tests.pipeline_helpers import Standins, log_line, logged, run_pipeline, running_pipeline
from tests.s3_helpers import S3Server
from tests.sample_docs import write_text_docs

pytestmark = pytest.mark.timeout(180)


class Switch:
    """A fault rule that can be turned on and off from the test: ``action`` for requests matching
    ``method`` and a path fragment while on; ``times`` limits how often it fires (None: no limit)."""

    def __init__(self, method: str, fragment: str, action: str, times: int | None = None) -> None:
        self.method, self.fragment, self.action, self.times = method, fragment, action, times
        self.on = True
        self.fired = 0
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str) -> str | None:
        with self._lock:
            if not self.on or method != self.method or self.fragment not in path:
                return None
            if self.times is not None and self.fired >= self.times:
                return None
            self.fired += 1
            return self.action


@pytest.fixture
def proxy(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint, seed=11) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def _keys(server: S3Server, prefix: str) -> list[str]:
    """Straight from moto, not through the proxy."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _results(server: S3Server, prefix: str) -> dict[str, int]:
    """Source-File -> number of times it appears in the results."""
    client = server.client()
    seen: dict[str, int] = {}
    for key in _keys(server, f"{prefix}/results/"):
        body = client.get_object(Bucket=server.bucket, Key=key)["Body"].read().decode()
        for line in body.splitlines():
            source = json.loads(line)["metadata"]["Source-File"]
            seen[source] = seen.get(source, 0) + 1
    return seen


def _env(proxy: FaultProxy, **extra: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": proxy.url, **extra}


def test_conditional_write_whose_answer_was_lost_is_recognised(proxy: FaultProxy, s3_server: S3Server) -> None:
    storage = open_storage(s3_server.url("ws"))
    proxy.rule = Switch("PUT", "/ws/locks/a", "reset-after", times=1)
    assert storage.create("locks/a", b"lease mine-1")  # written, answer lost, resent: 412, read back: ours
    assert proxy.counts["reset-after"] == 1
    assert not storage.create("locks/a", b"lease other")  # a real conflict stays a conflict
    _, tag = storage.read_versioned("locks/a") or (b"", "")
    proxy.rule = Switch("PUT", "/ws/locks/a", "reset-after", times=1)
    assert storage.replace_if("locks/a", b"lease mine-2", tag)
    assert not storage.replace_if("locks/a", b"lease other", tag)
    assert storage.read("locks/a") == b"lease mine-2"
    proxy.rule = Switch("PUT", "/ws/locks/b", "503", times=2)  # throttled twice, then written
    assert storage.create("locks/b", b"lease b")
    proxy.rule = Switch("GET", "/ws/locks/b", "reset-before", times=1)
    assert storage.read("locks/b") == b"lease b"


def test_workspace_client_uses_standard_retries_with_8_attempts(proxy: FaultProxy, s3_server: S3Server,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's standard retry mode, 8 attempts in all (what AWS_MAX_ATTEMPTS means): 7 failures of one
    request in a row are absorbed, the 8th reaches the caller; AWS_MAX_ATTEMPTS and AWS_RETRY_MODE override."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.retries import standard

    from olmocr.pipeline.workspace.storage import (
        DEFAULT_S3_MAX_ATTEMPTS,
        DEFAULT_S3_RETRY_MODE,
        make_s3_client,
    )

    for var in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    assert (DEFAULT_S3_RETRY_MODE, DEFAULT_S3_MAX_ATTEMPTS) == ("standard", 8)
    assert make_s3_client().meta.config.retries == {"mode": "standard", "total_max_attempts": 8}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert make_s3_client().meta.config.retries == {"mode": "adaptive", "total_max_attempts": 3}
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    monkeypatch.delenv("AWS_RETRY_MODE")
    # The behaviour, against moto: the backoff between attempts (up to 20 s each) is not what is pinned here.
    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    storage = open_storage(s3_server.url("ws"))
    assert storage.create("probe", b"x")
    for failures, absorbed in ((DEFAULT_S3_MAX_ATTEMPTS - 1, True), (DEFAULT_S3_MAX_ATTEMPTS, False)):
        for action in ("503", "500", "reset-before"):
            rule = proxy.rule = Switch("GET", "/ws/probe", action, times=failures)
            if absorbed:
                assert storage.read("probe") == b"x", action
            else:
                with pytest.raises((ClientError, BotoCoreError)):
                    storage.read("probe")
            assert rule.fired == failures, (action, rule.fired)
    proxy.rule = None


@pytest.mark.slow
def test_pipeline_under_random_s3_faults_loses_and_duplicates_nothing(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path, standins: Standins) -> None:
    docs = write_text_docs(tmp_path / "docs", 8, 2)
    proxy.error_rate, proxy.drop_rate = 0.08, 0.08  # 503/500 and resets before/after, 16% of requests
    standin = standins(OLMOCR_STANDIN_LATENCY="0.3")
    rc, log = run_pipeline(s3_server.url("ws"), standin.url, docs, "--pages_per_group", "2", "--workers", "3",
                           "--lease_seconds", "6", env=_env(proxy), timeout=150, log=tmp_path / "run.log")
    assert rc == 0, log
    assert proxy.faults >= 20, proxy.counts
    assert _results(s3_server, "ws") == {str(p): 1 for p in docs}
    done = {k.rsplit("done_", 1)[1].removesuffix(".flag") for k in _keys(s3_server, "ws/done_flags/")}
    written = {k.rsplit("output_", 1)[1].removesuffix(".jsonl") for k in _keys(s3_server, "ws/results/")}
    assert len(done) == 8 and done <= written
    assert _keys(s3_server, "ws/worker_locks/") == []


@pytest.mark.slow
def test_result_upload_failing_is_never_marked_done(proxy: FaultProxy, s3_server: S3Server, tmp_path: Path, standins: Standins) -> None:
    docs = write_text_docs(tmp_path / "docs", 1, 1)
    failing = Switch("PUT", "/ws/results/", "503")
    proxy.rule = failing
    standin = standins()
    log = tmp_path / "run.log"
    with running_pipeline(s3_server.url("ws"), standin.url, docs, env=_env(proxy, AWS_MAX_ATTEMPTS="2"),
                          log=log) as run:
        run.wait_log("releasing it for a retry", 60, "the failed upload")
        assert _keys(s3_server, "ws/done_flags/") == []
        failing.on = False
        rc = run.wait(60)
    text = log.read_text()
    assert rc == 0, text
    assert failing.fired >= 2  # botocore's own resend, then given up to the pipeline
    assert _results(s3_server, "ws") == {str(docs[0]): 1}
    assert len(_keys(s3_server, "ws/done_flags/")) == 1


@pytest.mark.slow
def test_lease_that_cannot_be_renewed_is_given_up(proxy: FaultProxy, s3_server: S3Server, tmp_path: Path, standins: Standins) -> None:
    docs = write_text_docs(tmp_path / "docs", 1, 2)
    locks = Switch("PUT", "/ws/worker_locks/", "503")
    locks.on = False
    proxy.rule = locks
    # 2 pages answered one at a time after 2.5 s: the item takes 5 s, longer than the 4 s lease.
    standin = standins(OLMOCR_STANDIN_LATENCY="2.5", OLMOCR_STANDIN_CONCURRENCY="1")
    log = tmp_path / "run.log"
    with running_pipeline(s3_server.url("ws"), standin.url, docs, "--lease_seconds", "4", "--workers", "1",
                          env=_env(proxy, AWS_MAX_ATTEMPTS="2"), log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "the item claimed")
        locks.on = True
        run.wait_log("giving it up", 30, "the lease given up")
        assert _keys(s3_server, "ws/done_flags/") == []
        locks.on = False
        rc = run.wait(90)
    text = log.read_text()
    assert rc == 0, text
    assert "could not renew the lease" in text
    assert len(logged(text, LOG_CLAIMED)) == 2  # given up, then claimed again once the store recovered
    assert _results(s3_server, "ws") == {str(docs[0]): 1}


def test_read_timeout_is_retried(proxy: FaultProxy, s3_server: S3Server) -> None:
    from botocore.config import Config

    from olmocr.pipeline.workspace.storage import S3Storage, make_s3_client

    # The shipped read timeout is 60 s; a short one here, the same retry handling.
    client = make_s3_client(config=Config(retries={"mode": "standard", "max_attempts": 3}, read_timeout=1,
                                          connect_timeout=2))
    storage = S3Storage(s3_server.url("ws"), client=client)
    storage.write("results/output_x.jsonl", b"{}\n")
    proxy.stall_s = 3
    proxy.rule = Switch("GET", "/ws/results/output_x.jsonl", "stall", times=1)
    assert storage.read("results/output_x.jsonl") == b"{}\n"
    assert proxy.counts["stall"] == 1 and proxy.counts["forwarded"] >= 2


def test_connection_breaking_while_an_object_streams_in_is_read_again(
        proxy: FaultProxy, s3_server: S3Server) -> None:
    storage = open_storage(s3_server.url("ws"))
    body = b"x" * 200_000
    storage.write("results/output_big.jsonl", body)
    proxy.rule = Switch("GET", "/ws/results/output_big.jsonl", "truncate", times=2)  # BODY_READ_ATTEMPTS is 3
    assert storage.read("results/output_big.jsonl") == body
    assert proxy.counts["truncate"] == 2
