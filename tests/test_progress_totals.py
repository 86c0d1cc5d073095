"""Progress with a true total: the workspace stores its page counts once inputs are queued (local and a real
S3 API, concurrent populators), the totals/rate/ETA decisions row by row, the progress line and --stats of a
real run against the stand-in, and the live bar on a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from olmocr.pipeline.progress import Progress
from olmocr.pipeline.runner import Runner
from olmocr.pipeline.servers.fleet import Fleet
from olmocr.pipeline.servers.serverlist import ServerSpec
from olmocr.pipeline.workspace.queue import WorkQueue, load_index
from olmocr.pipeline.workspace.storage import open_storage
from olmocr.pipeline.workspace.totals import PageTotals, compute_totals, format_duration, load_pages
from tests.pipeline_helpers import Standins, run_pipeline, running_pipeline
from tests.sample_docs import samples
from tests.standin_helpers import REPO_ROOT, clean_env

# ------------------------------------------------------------------------------------- pure decisions

INDEX = {"a": (), "b": (), "c": (), "d": ()}


@pytest.mark.parametrize(("pages", "done", "now", "expect"), [
    # nothing done yet: no rate, no ETA
    ({"a": 10, "b": 20, "c": 30, "d": 40}, {}, 1000.0, (100, 0, None, None)),
    # the first item done: its own pages are the anchor, not a rate (one finish says nothing of speed)
    ({"a": 10, "b": 20, "c": 30, "d": 40}, {"a": 900.0}, 1000.0, (100, 10, None, None)),
    # two in the window: the pages after the first, over the time since the first
    ({"a": 10, "b": 20, "c": 30, "d": 40}, {"a": 900.0, "b": 950.0}, 1000.0, (100, 30, 0.2, 350.0)),
    # one finished before the window anchors it: c's pages since a's finish
    ({"a": 10, "b": 20, "c": 30, "d": 40}, {"a": 0.0, "c": 900.0}, 1000.0, (100, 40, 0.03, 2000.0)),
    # nothing finished in the last 10 minutes: stalled, rate 0, ETA unknown
    ({"a": 10, "b": 20, "c": 30, "d": 40}, {"a": 0.0}, 1000.0, (100, 10, 0.0, None)),
    # all done: ETA 0 whatever the rate
    ({"a": 10, "b": 20, "c": 30, "d": 40}, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, 10_000.0, (100, 100, 0.0, 0.0)),
    # two items queued without a count (upstream olmOCR): estimated at the mean of the known ones
    ({"a": 10, "b": 30}, {}, 1000.0, (80, 0, None, None)),
])
def test_totals_rate_and_eta(pages, done, now, expect):
    totals = compute_totals(INDEX, pages, done, now)
    rate = None if totals.rate is None else round(totals.rate, 4)
    assert (totals.total, totals.done, rate, totals.eta_seconds) == expect
    assert totals.remaining == expect[0] - expect[1]
    assert totals.unknown_items == len(INDEX) - len(pages)


def test_durations_and_the_plain_line():
    assert [format_duration(s) for s in (None, 0, 42, 185, 3720, 200_000)] == \
        ["unknown", "0s", "42s", "3m 05s", "1h 02m", "2d 07h"]
    progress = Progress(pages_total=7, pages_done=5)
    assert progress.line("up", 2).startswith("pages 5/7 (this process; workspace totals not read yet) | ")
    progress.workspace = PageTotals(total=500, done=120, items=5, items_done=1, rate=2.0)
    line = progress.line("up", 2)
    assert line.startswith("workspace 120/500 pages (24.0%), 380 remaining, 2.0 pages/s, ETA 3m 10s | "
                           "this process 5 pages, "), line
    progress.workspace = PageTotals(total=500, done=0, items=5, items_done=0, rate=None)
    assert "0/500 pages (0.0%), 500 remaining, rate unknown, ETA unknown | " in progress.line("up", 2)


def test_pages_count_in_the_workspace_progress_as_they_are_answered_not_when_their_item_is_done() -> None:
    progress = Progress()
    progress.workspace = PageTotals(total=27, done=0, items=1, items_done=0, rate=None)
    progress.workspace_read_at = time.monotonic()
    assert progress.head() == "workspace 0/27 pages (0.0%), 27 remaining, rate unknown, ETA unknown"

    async def one_item(pages: int, done: bool, shown: int) -> None:
        counter = progress.open_item()

        async def page() -> None:  # a page task of the item (they inherit its counter)
            await asyncio.sleep(0)
            progress.page_done(fallback=False)

        await asyncio.gather(*(page() for _ in range(pages)))
        assert progress.head().startswith(f"workspace {shown}/27 pages"), progress.head()
        progress.close_item(counter, done=done)

    asyncio.run(one_item(5, done=True, shown=5))
    assert progress.head().startswith("workspace 5/27 pages"), "done, not yet in a reading of the totals"
    assert "pages/s (this process), ETA" in progress.head(), "no workspace rate yet: this process's"
    progress.workspace = PageTotals(total=27, done=5, items=1, items_done=1, rate=None)
    progress.workspace_read_at = time.monotonic()
    assert progress.head().startswith("workspace 5/27 pages"), "counted once when the totals hold it"
    asyncio.run(one_item(3, done=False, shown=8))
    assert progress.head().startswith("workspace 5/27 pages"), "an item handed back: its pages are not done"
    first, second = progress.open_item(), progress.open_item()  # two items, equal counts so far
    progress.close_item(second, done=False)
    first[0] += 2  # the open one goes on
    assert progress.head().startswith("workspace 7/27 pages"), "the item closed is the one given"
    progress.close_item(first, done=False)


def test_the_progress_line_stays_short_with_8_servers_and_their_detail_has_a_line_of_its_own() -> None:
    fleet = Fleet([ServerSpec(f"http://127.0.0.1:{30024 + i}") for i in range(8)])
    runner = Runner.__new__(Runner)  # only its fleet: what the progress line says of the servers
    runner.fleet = fleet
    progress = Progress(pages_total=7, pages_done=5)
    progress.workspace = PageTotals(total=2_000_000, done=1_234_567, items=4000, items_done=2469, rate=61.0)
    line = progress.line(runner._server_state(), 1600)
    assert len(line) <= 250 and "server 0/8 up, 1600 requests in flight" in line, (len(line), line)
    detail, matters = runner._server_detail()
    assert matters and detail.startswith("servers: ") and all(f":{30024 + i}" in detail for i in range(8))


# ---------------------------------------------------------------------------------- stored totals

def test_populate_stores_the_total_once_and_concurrent_populators_lose_none(workspace: str) -> None:
    storage = open_storage(workspace)
    counts: dict[str, int] = {}

    def page_count(path: str) -> int:
        counts[path] = counts.get(path, 0) + 1
        return int(path.split("-")[1].split(".")[0])  # "m0-7.pdf": 7 pages

    batches = [[f"m{j}-{i + 1}.pdf" for i in range(5)] for j in range(4)]
    threads = [threading.Thread(target=WorkQueue(storage).populate, args=(b,),
                                kwargs={"pages_per_group": 4, "page_count": page_count}) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    index, pages = load_index(storage), load_pages(storage)
    assert set(pages) == set(index)  # every item has its page count
    assert WorkQueue(storage).page_totals().total == 4 * (1 + 2 + 3 + 4 + 5)
    # Queuing the same inputs again counts nothing again and changes nothing.
    before = dict(counts)
    WorkQueue(storage).populate(batches[0], pages_per_group=4, page_count=page_count)
    assert counts == before and load_pages(storage) == pages
    # Done pages and the rate come from the done flags.
    queue = WorkQueue(storage)
    for _ in range(2):
        item = queue.claim()
        assert item is not None
        queue.complete(item, b"", [])
    totals = queue.page_totals()
    done_pages = sum(pages[h] for h in index if queue.is_done(h))
    assert (totals.done, totals.items_done, totals.remaining) == (done_pages, 2, 60 - done_pages)


def test_a_workspace_queued_before_page_counts_gets_them_when_its_inputs_are_queued_again(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "ws"))
    WorkQueue(storage).populate(["a.pdf", "b.pdf"], pages_per_group=1, page_count=lambda p: 3)
    storage.delete("work_index_pages.json")  # as upstream olmOCR or an older version leaves it
    assert WorkQueue(storage).page_totals().unknown_items == 2
    WorkQueue(storage).populate(["a.pdf", "b.pdf"], pages_per_group=1, page_count=lambda p: 3)
    totals = WorkQueue(storage).page_totals()
    assert (totals.total, totals.unknown_items) == (6, 0)


# ----------------------------------------------------------------------------------------- real runs

@pytest.mark.slow
@pytest.mark.integration
def test_progress_line_and_stats_show_the_true_total_and_an_eta(tmp_path: Path, standins: Standins) -> None:
    docs = samples().resilience  # 8 documents, 23 pages
    standin = standins(OLMOCR_STANDIN_LATENCY="0.15")
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url, docs, "--progress_interval", "0.5", "--pages_per_group", "3",
                           "--max_concurrent_requests", "2", log=tmp_path / "run.log")
    assert rc == 0, log
    lines = re.findall(r"workspace (\d+)/(\d+) pages \([\d.]+%\), (\d+) remaining, (?:rate )?(\S+) (?:pages/s)?"
                       r"(?: \(this process\))?,? ?ETA (.+?) \| this process (\d+) pages", log)
    assert len(lines) >= 3, log
    assert {int(total) for _, total, *_ in lines} == {23}, "the total is the workspace's from the first line"
    assert all(int(done) + int(remaining) == 23 for done, _, remaining, *_ in lines)
    assert any(eta not in ("unknown", "0s") for *_, eta, _ in lines), "an ETA while work remained"
    assert lines[-1][0] == "23" and lines[-1][4] == "0s"
    stats = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--stats"], capture_output=True,
                           text=True, timeout=60, cwd=REPO_ROOT, env=clean_env()).stdout
    assert re.search(r"Progress: 23/23 pages \(100\.0%\), 0 remaining, workspace [\d.]+ pages/s, ETA 0s", stats), stats


def test_a_run_of_one_big_item_shows_its_pages_as_they_are_answered(tmp_path: Path, standins: Standins) -> None:
    docs = samples().resilience  # 23 pages, all in one work item: no item finishes before the end
    standin = standins(OLMOCR_STANDIN_LATENCY="0.15")
    rc, log = run_pipeline(tmp_path / "ws", standin.url, docs, "--progress_interval", "0.5",
                           "--max_concurrent_requests", "2", log=tmp_path / "run.log")
    assert rc == 0, log
    assert "1 new work items added" in log, log[-2000:]
    done = [int(n) for n in re.findall(r"workspace (\d+)/23 pages", log)]
    assert any(0 < n < 23 for n in done), done  # before its item was done
    assert done == sorted(done) and done[-1] == 23, done
    assert "workspace unknown" not in log


@pytest.mark.integration
def test_a_terminal_gets_a_live_bar(tmp_path: Path, standins: Standins) -> None:
    docs = samples().resilience
    standin = standins(OLMOCR_STANDIN_LATENCY="0.15")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # a 200-column terminal
    out = b""
    try:
        with running_pipeline(tmp_path / "ws", standin.url, docs, "--progress_interval", "0.5", "--pages_per_group",
                              "3", "--max_concurrent_requests", "2", env={"TERM": "xterm"}, log=tmp_path / "unused.log",
                              terminal=slave) as run:
            os.close(slave)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # the pipeline closed the terminal
                        break
                    if not chunk:
                        break
                    out += chunk
                elif run.poll() is not None:
                    break
            assert run.proc.wait(timeout=30) == 0, out.decode(errors="replace")[-3000:]
    finally:
        os.close(master)
    text = out.decode(errors="replace")
    bars = re.findall(r"workspace +([\d.]+)%\|[^|]*\| (\d+)/(\d+) pages, ETA \S+ \| workspace", text)
    assert bars and {total for *_, total in bars} == {"23"}, text[-3000:]
    assert "\r" in text and "█" in text  # redrawn in place
    assert bars[-1][0] == "100.0"
    assert "finished in" in text  # the other log lines still print (above the bar)
    # ... through tqdm, which clears the bar first: never a log line glued to the end of a bar on one line.
    glued = [seg for seg in re.split(r"[\r\n]", text) if "pages, ETA" in seg and " - INFO - " in seg]
    assert not glued, glued[:3]
