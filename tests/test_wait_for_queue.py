"""``--wait_for_queue`` (fill once, issue #29): a pipeline started on a workspace with no queue yet waits for
another process to fill it, looking once every few seconds with one HEAD request, then works as usual; after
its bound it gives up with one line and exit status 1. Real processes: the pipeline, the filler (``--pdfs
--stats``) and the stand-in as vLLM."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from olmocr.exit_codes import STATUS_FAILED, STATUS_OK, STATUS_USAGE
from olmocr.pipeline.errors import WorkspaceError
from olmocr.pipeline.stopping import StopRequest
from olmocr.pipeline.workspace import queue_wait
from olmocr.pipeline.workspace.queue import INDEX_KEY, WorkQueue
from olmocr.pipeline.workspace.storage import LocalStorage
from tests.pipeline_helpers import StandIn, assert_every_page_once, logged, run_pipeline, running_pipeline
from tests.sample_docs import write_text_docs
from tests.standin_helpers import REPO_ROOT, clean_env, free_port

pytestmark = pytest.mark.timeout(120)


def test_a_waiting_pipeline_works_once_another_process_fills_the_queue(tmp_path: Path, standin: StandIn) -> None:
    docs = write_text_docs(tmp_path / "docs", 3, 2)
    ws = tmp_path / "ws"
    with running_pipeline(ws, standin.url, (), "--wait_for_queue", "60", "--pages_per_group", "2",
                          log=tmp_path / "waiter.log", stop=[standin]) as waiter:
        waiter.wait_log(queue_wait.WAITING.split(":")[0] % str(ws), 60, "the waiting line")
        assert not (ws / INDEX_KEY).exists()
        # The filler: another process adds the inputs (as the first Slurm task, or `--pdfs ... --stats`).
        filler = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--pdfs", *map(str, docs),
                                 "--pages_per_group", "2", "--stats"], env=clean_env(), cwd=str(REPO_ROOT),
                                capture_output=True, text=True, timeout=60)
        assert filler.returncode == 0, filler.stderr
        assert waiter.wait(90) == STATUS_OK, waiter.output()[-4000:]
    out = waiter.output()
    assert len(logged(out, queue_wait.WAITING, str(ws))) == 1, out  # the wait is stated in one line
    assert logged(out, queue_wait.FOUND, str(ws)), out
    assert "found 3 documents" not in out  # the waiter never listed the inputs
    assert_every_page_once(ws, docs)


def test_a_queue_never_filled_is_one_line_and_exit_1_after_the_bound(tmp_path: Path) -> None:
    ws = tmp_path / "new ws"
    started = time.monotonic()
    rc, out = run_pipeline(ws, f"http://127.0.0.1:{free_port()}", (), "--wait_for_queue", "2",
                           log=tmp_path / "run.log", timeout=60)
    took = time.monotonic() - started
    assert rc == STATUS_FAILED, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "still no work queue after waiting 2 s (--wait_for_queue)" in line]
    assert len(lines) == 1 and "ERROR" in lines[0] and "first task" in lines[0], out
    assert took >= 2, took
    assert not ws.exists()  # the run found nothing to put in it: no empty workspace left behind


def test_without_the_flag_an_empty_workspace_is_still_exit_2_at_once(tmp_path: Path) -> None:
    rc, out = run_pipeline(tmp_path / "ws", f"http://127.0.0.1:{free_port()}", (), log=tmp_path / "run.log",
                           timeout=60)
    assert rc == STATUS_USAGE and "no work items (nothing has been queued there yet)" in out, out
    assert queue_wait.WAITING.split(":")[0] % str(tmp_path / "ws") not in out


class _Counting(LocalStorage):
    """A real local workspace that counts what the waiter asks of it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[str] = []

    def stat(self, key: str):  # noqa: ANN201
        self.calls.append(f"stat {key}")
        return super().stat(key)

    def read_versioned(self, key: str):  # noqa: ANN201
        self.calls.append(f"read {key}")
        return super().read_versioned(key)

    def list(self, prefix: str):  # noqa: ANN201
        self.calls.append(f"list {prefix}")
        return super().list(prefix)


def test_waiting_costs_one_head_request_per_look_and_nothing_else(tmp_path: Path) -> None:
    storage = _Counting(tmp_path / "ws")

    async def wait_then_fill() -> bool:
        waiting = asyncio.ensure_future(queue_wait.wait_for_queue(storage, "ws", 30, StopRequest(), poll_s=0.05))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        WorkQueue(LocalStorage(tmp_path / "ws")).populate(["/data/a.pdf"], page_count=lambda p: 1)
        return await asyncio.wait_for(waiting, 10)

    assert asyncio.run(wait_then_fill()) is True
    assert set(storage.calls) == {f"stat {INDEX_KEY}"}, storage.calls  # a HEAD on S3: nothing listed or read
    assert 5 <= len(storage.calls) <= 20, storage.calls  # one look per poll interval


def test_a_stop_while_waiting_returns_false_and_the_bound_raises(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "ws")

    async def stopped() -> bool:
        stop = StopRequest()
        asyncio.get_running_loop().call_later(0.2, stop.request, "SIGTERM")
        return await queue_wait.wait_for_queue(storage, "ws", 30, stop, poll_s=5)

    started = time.monotonic()
    assert asyncio.run(stopped()) is False
    assert time.monotonic() - started < 3  # the stop ends the wait at once, not at the next look
    with pytest.raises(WorkspaceError, match="still no work queue after waiting 0.3 s"):
        asyncio.run(queue_wait.wait_for_queue(storage, "ws", 0.3, StopRequest(), poll_s=0.1))
