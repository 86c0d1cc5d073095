"""No page can hang the pipeline: the render time limit, and render workers that die.

The renderer runs real pypdfium2 worker processes; faults are injected with the test-only
``OLMOCR_TEST_RENDER_FAULT`` (a worker sleeps forever or SIGKILLs itself on a chosen page), and one test
uses a real PDF that pdfium takes minutes to load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from olmocr.pipeline.errors import RenderError
from olmocr.pipeline.pages.render import TEST_FAULT_ENV, Renderer
from tests.pdf_builders import slow_pdf, text_pdf
from tests.pipeline_helpers import Standins, failures, results, run_pipeline, wait_for
from tests.standin_helpers import pid_alive

pytestmark = pytest.mark.timeout(120)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _render_all(renderer: Renderer, path: str, pages: int) -> list[bytes | BaseException]:
    async def go() -> list[bytes | BaseException]:
        jobs = [renderer.render(path, "pdf", n, 200) for n in range(1, pages + 1)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    return asyncio.run(go())


def test_hung_page_fails_alone_and_its_worker_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_FAULT_ENV, "hang:stuck:2")
    path = _write(tmp_path / "stuck.pdf", text_pdf(["one", "two", "three", "four"]))
    renderer = Renderer(processes=2, timeout=1.5)
    try:
        asyncio.run(renderer.probe(path, "pdf"))  # workers up before the clock starts
        before = set(renderer.worker_pids())
        t0 = time.monotonic()
        out = _render_all(renderer, path, 4)
        elapsed = time.monotonic() - t0
        assert isinstance(out[1], RenderError) and "render time limit" in str(out[1])
        assert all(isinstance(b, bytes) and b for i, b in enumerate(out) if i != 1), out
        assert elapsed < 10, elapsed
        assert renderer.timed_out == 1
        # The stuck worker is gone and a fresh one took its place; the pool still renders.
        wait_for(lambda: len(renderer.worker_pids()) == 2, 10, "a replacement worker")
        after = set(renderer.worker_pids())
        assert len(after) == 2 and before - after and all(not pid_alive(p) for p in before - after)
        assert isinstance(asyncio.run(renderer.render(path, "pdf", 1, 200)), bytes)
        # The text layer is under the same limit: a fallback for the stuck page gives up, not hangs.
        assert asyncio.run(renderer.text(path, "pdf", 2)) == ""
        assert asyncio.run(renderer.text(path, "pdf", 3)).strip() == "three"
        assert renderer.timed_out == 2
    finally:
        renderer.close()


def test_worker_that_dies_costs_only_its_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_FAULT_ENV, "crash:crashy:3")
    path = _write(tmp_path / "crashy.pdf", text_pdf(["one", "two", "three"]))
    renderer = Renderer(processes=2, timeout=30)
    try:
        out = _render_all(renderer, path, 3)
        assert isinstance(out[2], RenderError) and "crashed" in str(out[2]) and "SIGKILL" in str(out[2])
        assert isinstance(out[0], bytes) and isinstance(out[1], bytes)
        # Tried once more in a fresh worker: two deaths, or (seen under load) pebble reports the first death as a
        # broken pool, which is retried without being counted as a crash.
        assert renderer.crashed in (1, 2)
        wait_for(lambda: len(renderer.worker_pids()) == 2, 10, "replacement workers")
        assert isinstance(asyncio.run(renderer.render(path, "pdf", 1, 200)), bytes)
    finally:
        renderer.close()


def test_real_pdf_slow_to_render_is_stopped_at_the_limit(tmp_path: Path) -> None:
    path = _write(tmp_path / "nested-forms.pdf", slow_pdf(depth=8))
    renderer = Renderer(processes=1, timeout=2)
    try:
        assert asyncio.run(renderer.probe(path, "pdf")).page_count == 1  # opening is quick
        t0 = time.monotonic()
        with pytest.raises(RenderError, match="render time limit"):
            asyncio.run(renderer.render(path, "pdf", 1, 1288))
        assert time.monotonic() - t0 < 15
        assert asyncio.run(renderer.text(path, "pdf", 1)) == ""  # also over the limit: no text, no hang
        wait_for(lambda: len(renderer.worker_pids()) == 1, 10, "a replacement worker")
        pids = renderer.worker_pids()
    finally:
        renderer.close()
    assert pids and not any(pid_alive(p) for p in pids)


def test_pipeline_finishes_the_batch_with_hung_and_crashing_pages(tmp_path: Path, standins: Standins) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    good = [_write(docs / f"good{i}.pdf", text_pdf([f"good {i} page {n}" for n in range(2)])) for i in range(3)]
    stuck = _write(docs / "stuck.pdf", text_pdf(["s1", "s2", "s3"]))
    crashy = _write(docs / "crashy.pdf", text_pdf(["c1"]))
    standin = standins()
    rc, log = run_pipeline(tmp_path / "ws", standin.url, [*good, stuck, crashy], "--render_timeout", "1.5",
                           env={TEST_FAULT_ENV: "hang-render:stuck:2,crash:crashy:1"}, timeout=90,
                           log=tmp_path / "pipeline.log")
    assert rc == 0, log
    written = {d["metadata"]["Source-File"] for d in results(tmp_path / "ws")}
    assert written == set(good)
    reasons = {f["source"]: f["reason"] for f in failures(tmp_path / "ws")}
    assert set(reasons) == {stuck, crashy}
    # stuck.pdf: page 2 over the limit falls back to its text layer, one page in three is over the error
    # rate; crashy.pdf: its only page kills the renderer.
    assert "page 2" in reasons[stuck] and "render time limit" in reasons[stuck], reasons
    assert "crashed" in reasons[crashy], reasons
    assert "render time limit" in log and "render worker died" in log


def test_worker_killed_while_idle_does_not_break_rendering(tmp_path: Path) -> None:
    """An OOM kill can hit an idle worker too; pebble then gives up on its pool, the renderer starts anew."""
    path = _write(tmp_path / "doc.pdf", text_pdf(["one", "two"]))
    renderer = Renderer(processes=2, timeout=30)
    try:
        asyncio.run(renderer.probe(path, "pdf"))
        wait_for(lambda: len(renderer.worker_pids()) == 2, 10, "two workers")
        for pid in renderer.worker_pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        out = _render_all(renderer, path, 2)
        assert all(isinstance(b, bytes) for b in out), out
    finally:
        renderer.close()
