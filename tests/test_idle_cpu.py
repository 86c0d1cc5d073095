"""A waiting pipeline uses (about) no CPU: its main process's CPU time over a 10 s wait, read from /proc.

Three ways a pipeline waits, each with more workers than work items (the default ``--workers 20`` on a small
batch, which used to make ``Runner.run`` spin from its first second):

* every work item is leased by another (live) pipeline;
* the only server is down (killed mid-run; the pipeline waits for it to come back);
* the server is slow (each answer takes minutes; requests are in flight).

The limit (0.5 CPU-s per 10 s, 5 % of a core) is generous for a loaded 2-core machine, and far below a
spinning loop (which takes a whole core: ~10 CPU-s per 10 s, or several where other work competes).
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from olmocr.pipeline.runner import LOG_CLAIMED
from olmocr.pipeline.servers.fleet import LOG_PAUSED
from olmocr.pipeline.workspace.queue import WorkQueue
from olmocr.pipeline.workspace.storage import LocalStorage
from tests.pipeline_helpers import RESILIENCE_DOCS, SMALL_DOCS, Standins, log_line, running_pipeline
from tests.waiting import wait_for

pytestmark = pytest.mark.serial

WINDOW_S = 10.0
MAX_CPU_S = 0.5


def main_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process itself (not its children), from /proc via psutil."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def cpu_over_window(proc, log: Path) -> float:  # type: ignore[no-untyped-def]
    before = main_cpu_seconds(proc.pid)
    time.sleep(WINDOW_S)
    assert proc.poll() is None, f"the pipeline exited while it should wait:\n{log.read_text()[-3000:]}"
    return main_cpu_seconds(proc.pid) - before


def assert_idle(cpu: float, what: str, log: Path) -> None:
    print(f"main process CPU over {WINDOW_S:g} s while {what}: {cpu:.3f} s")
    assert cpu < MAX_CPU_S, (f"the pipeline burnt {cpu:.2f} CPU-s in {WINDOW_S:g} s while {what} "
                             f"(limit {MAX_CPU_S}):\n{log.read_text()[-2000:]}")


def test_waiting_on_items_leased_by_others(tmp_path: Path, standins: Standins) -> None:
    ws = tmp_path / "ws"
    other = WorkQueue(LocalStorage(str(ws)), lease_seconds=600)
    other.populate([str(p) for p in SMALL_DOCS[:2]], pages_per_group=500)
    assert other.claim() is not None  # another pipeline holds the only item for 10 minutes
    standin = standins()
    log = tmp_path / "pipeline.log"
    with running_pipeline(ws, standin.url, (), "--workers", "20", log=log) as run:
        # Every worker has found nothing claimable and waits (for the lease to expire or one of ours to end).
        run.wait_log("is ready and serves", 60)
        time.sleep(3)
        assert_idle(cpu_over_window(run, log), "waiting on an item leased by another pipeline", log)


def test_waiting_on_a_server_that_is_down(tmp_path: Path, standins: Standins) -> None:
    # Answers take 1 s, so the run is still going when the server is killed.
    standin = standins(OLMOCR_STANDIN_LATENCY="1", OLMOCR_STANDIN_CONCURRENCY="2")
    ws = tmp_path / "ws"
    log = tmp_path / "pipeline.log"
    with running_pipeline(ws, standin.url, RESILIENCE_DOCS, "--workers", "20", log=log) as run:
        wait_for(lambda: standin_info(standin.url)["image_requests_served"] >= 1, 60, "the first answer",
                 interval=0.1)  # the run is under way
        assert run.poll() is None, log.read_text()[-3000:]
        standin.kill()
        run.wait_log(log_line(LOG_PAUSED), 60, "the outage noticed")
        time.sleep(3)
        assert_idle(cpu_over_window(run, log), "waiting for a server that is down", log)


def test_waiting_on_a_slow_server(tmp_path: Path, standins: Standins) -> None:
    standin = standins(OLMOCR_STANDIN_LATENCY="600")
    ws = tmp_path / "ws"
    log = tmp_path / "pipeline.log"
    # One small work item for 20 workers: 19 of them are done at once.
    with running_pipeline(ws, standin.url, SMALL_DOCS[:2], "--workers", "20", log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60)
        time.sleep(4)  # rendered and sent: every page now waits for its answer
        info = standin_info(standin.url)
        assert info["requests_served"] == 0
        assert_idle(cpu_over_window(run, log), "waiting for a slow server's answers", log)


def test_follow_waits_for_new_items(tmp_path: Path, standins: Standins) -> None:
    """``--follow``: the queue done, the pipeline keeps running at about zero CPU and takes the next item."""
    standin = standins()
    ws = tmp_path / "ws"
    log = tmp_path / "pipeline.log"
    with running_pipeline(ws, standin.url, SMALL_DOCS[:1], "--follow", "--workers", "20", log=log) as run:
        run.wait_log("done: 1 documents written", 60)
        time.sleep(3)
        assert_idle(cpu_over_window(run, log), "following an empty queue", log)
        WorkQueue(LocalStorage(str(ws))).populate([str(SMALL_DOCS[1])])  # as olmocr-service adds a job
        run.wait_log(log_line(LOG_CLAIMED), 60)
        wait_for(lambda: log.read_text().count("done: 1 documents written") == 2, 60, "the new item done")
        assert run.poll() is None, log.read_text()[-3000:]


def standin_info(url: str) -> dict:
    import requests

    r = requests.get(f"{url}/admin/info", timeout=10)
    r.raise_for_status()
    return r.json()


@pytest.fixture(autouse=True)
def _no_stray_processes() -> None:
    """Every process a test here starts, it stops (checked: no child of ours is left)."""
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"
