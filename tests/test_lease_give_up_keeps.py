"""Issue 29: a lease given up because it cannot be renewed (S3 answering 503 SlowDown to the lock's writes)
keeps the item's finished documents when it is given up while still ours, as a stop does: they are written
once, and only the rest is queued again. A real S3 API (moto) behind the fault proxy of test_s3_faults."""

from __future__ import annotations

from pathlib import Path

import pytest

from olmocr.pipeline.runner import LOG_GIVE_UP_KEEP
from tests.fault_proxy import FaultProxy
from tests.pipeline_helpers import launch_standin, running_pipeline, wait_for
from tests.s3_helpers import S3Server
from tests.sample_docs import write_text_docs
from tests.test_s3_faults import Switch, _env, _keys, _results, proxy  # noqa: F401 - proxy: a fixture

pytestmark = pytest.mark.timeout(180)

DOCS = 30
IN_FLIGHT = 1  # --max_concurrent_requests


def _pages_answered(url: str) -> int:
    import requests

    return int(requests.get(f"{url}/admin/info", timeout=5).json()["image_requests_served"])


@pytest.mark.slow
def test_a_lease_given_up_in_time_keeps_its_finished_documents(proxy: FaultProxy, s3_server: S3Server,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    docs = write_text_docs(tmp_path / "docs", DOCS, 1)
    locks = Switch("PUT", "/ws/worker_locks/", "503")
    locks.on = False
    proxy.rule = locks
    # One item of 30 one-page documents answered one at a time, 1 s each: the first renewal (at a third of
    # the 45 s lease) comes in the middle of it.
    standin = launch_standin(tmp_path, env={"OLMOCR_STANDIN_LATENCY": "1", "OLMOCR_STANDIN_CONCURRENCY": "1"})
    log = tmp_path / "run.log"
    give_up = LOG_GIVE_UP_KEEP.rsplit("%s)", 1)[1]  # "; giving it up while it is still ours: ..."
    with running_pipeline(s3_server.url("ws"), standin.url, docs, "--lease_seconds", "45", "--workers", "1",
                          "--pages_per_group", "100", "--max_concurrent_requests", str(IN_FLIGHT),
                          env=_env(proxy, AWS_MAX_ATTEMPTS="2"), log=log, stop=[standin]) as run:
        run.wait_log("claimed work item", 60, "the item claimed")
        wait_for(lambda: _pages_answered(standin.url) >= 2, 60, "two pages answered")
        locks.on = True  # every renewal fails from here
        run.wait_log(give_up, 40, "the lease given up in time")
        run.wait_log("handed back as work item", 30, "the rest handed back")
        kept = _results(s3_server, "ws")
        answered_then = _pages_answered(standin.url)
        assert len(_keys(s3_server, "ws/done_flags/")) == 1  # the first item, with what it finished
        locks.on = False
        rc = run.wait(120)
        text = log.read_text()
        answered = _pages_answered(standin.url)
    assert rc == 0, text
    assert locks.fired >= 1
    assert 2 <= len(kept) < DOCS, (len(kept), text[-3000:])
    assert set(kept.values()) == {1}
    assert text.count("claimed work item") == 2, text[-3000:]  # the first item, then the rest of it
    # Every document written once; the kept ones were not asked for again by the next claim.
    assert _results(s3_server, "ws") == {str(p): 1 for p in docs}
    assert answered - DOCS <= IN_FLIGHT, (answered, len(kept))  # wasted: only the page in flight at the give-up
    assert answered_then - len(kept) <= IN_FLIGHT + 1  # wasted: at most what was in flight at the give-up
    assert _keys(s3_server, "ws/worker_locks/") == []
