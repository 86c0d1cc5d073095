"""Run counters, the periodic progress (a live bar on a terminal, the plain line in logs and pipes) and
the final summary.

The progress shows the whole workspace (olmocr.pipeline.workspace.totals: done/total pages of every
pipeline, the workspace's rate and an ETA) beside this process's own rate. On a terminal it is a tqdm
bar, redrawn every second, with the other log lines printed above it; the plain line then still goes
to the debug log. Piped or redirected, it is the plain line every ``--progress_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from olmocr.logformat import RUN_LOGGERS
from olmocr.pipeline.workspace.totals import PageTotals, eta_text, pages_text

logger = logging.getLogger(__name__)

RATE_WINDOW_S = 30.0

#: The pages answered so far for the work item this task works on (set by :meth:`Progress.open_item`; the
#: page tasks of an item inherit it): they count in the workspace's progress before the item is done.
_ITEM_PAGES: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("olmocr_item_pages", default=None)


@dataclass
class FailFast:
    """Stop a run that fails nearly every page the same way (a wrong model behind the name ``olmocr`` would
    otherwise burn every page's attempts over the whole input, and "succeed").

    Of the first ``pages`` page verdicts (a page answered, or failed for good), when ``share`` of ``pages`` or
    more failed for the same reason the run is doomed: :meth:`verdict` returns the one line saying so. It is
    decided as soon as that many have failed, before all ``pages`` verdicts are in. Later pages never count:
    a run that started well is not stopped. ``pages`` 0 turns it off (``OLMOCR_FAIL_FAST_PAGES``).
    """

    pages: int = 50
    share: float = 0.95
    seen: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    tripped: str | None = None

    def record(self, failure: str | None) -> str | None:
        """One page's verdict (``failure`` None: answered); the one-line reason once the run should stop."""
        if self.tripped is not None or self.pages <= 0 or self.seen >= self.pages:
            return self.tripped
        self.seen += 1
        if failure is None:
            return None
        self.failures[failure] += 1
        reason, count = self.failures.most_common(1)[0]
        if count >= self.share * self.pages - 1e-9:
            self.tripped = (
                f"stopping the run: {count} of the first {self.seen} pages failed the same way ({reason}); "
                "the server answers, but no page gets a usable answer: check that the model behind the name "
                "'olmocr' is an olmOCR model and that the server takes this run's requests (see the page lines "
                "above), then run again (the work items were handed back; OLMOCR_FAIL_FAST_PAGES=0 turns this "
                "check off)")
        return self.tripped

    @classmethod
    def from_env(cls) -> FailFast:
        from olmocr import envs

        pages = int(envs.value("OLMOCR_FAIL_FAST_PAGES"))  # type: ignore[arg-type]
        share = float(envs.value("OLMOCR_FAIL_FAST_SHARE"))  # type: ignore[arg-type]
        if pages < 0:
            raise envs.SettingValueError(f"OLMOCR_FAIL_FAST_PAGES={pages} must be 0 (off) or more; fix or unset it")
        if not 0 < share <= 1:
            raise envs.SettingValueError(f"OLMOCR_FAIL_FAST_SHARE={share:g} must be above 0 and at most 1; fix or "
                                         "unset it")
        return cls(pages, share)


@dataclass
class Progress:
    """Counters shared by all workers (single event loop: no locking needed)."""

    pages_total: int = 0
    pages_done: int = 0
    fallback_pages: int = 0
    pages_failed: int = 0  # pages of documents recorded as failed after their pages ran
    attempts_failed: int = 0  # model attempts without a usable answer
    docs_done: int = 0
    docs_failed: int = 0
    docs_retryable: int = 0  # of those, failed for a reason a rerun may fix (server, timeouts, unreadable input)
    docs_filtered: int = 0  # skipped by --apply_filter (recorded, not failures)
    items_done: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    workspace: PageTotals | None = None  # the whole workspace, refreshed every --progress_interval
    fail_fast: FailFast = field(default_factory=lambda: FailFast(pages=0))  # the runner sets it from the env
    on_fail_fast: Callable[[str], None] | None = None  # called once when fail_fast trips
    workspace_read_at: float = float("-inf")  # when the last reading of ``workspace`` began
    _window: deque[tuple[float, int, int]] = field(default_factory=deque)
    _open_items: list[list[int]] = field(default_factory=list)  # pages answered in items not done yet
    _closed_items: list[tuple[float, int]] = field(default_factory=list)  # (done at, pages) since that reading

    def open_item(self) -> list[int]:
        """Count the pages answered from here on (this task and the tasks it starts) for one work item."""
        counter = [0]
        self._open_items.append(counter)
        _ITEM_PAGES.set(counter)
        return counter

    def close_item(self, counter: list[int], *, done: bool) -> None:
        """The item is marked done (its pages are in the workspace's totals from their next reading) or was
        handed back (``done`` False: its pages will be done again)."""
        self._open_items = [c for c in self._open_items if c is not counter]  # by identity: counts may be equal
        if done:
            self._closed_items.append((time.monotonic(), counter[0]))

    def answered_not_flagged(self) -> int:
        """Pages this process answered that the last reading of the workspace's totals does not hold yet."""
        self._closed_items = [(at, n) for at, n in self._closed_items if at >= self.workspace_read_at]
        return sum(c[0] for c in self._open_items) + sum(n for _, n in self._closed_items)

    def live_totals(self) -> PageTotals | None:
        """The workspace's totals with the pages this process answered in items not done yet, and, while the
        workspace has no rate (no item finished in its window), this process's rate."""
        totals = self.workspace
        if totals is None:
            return None
        done = min(totals.total, totals.done + self.answered_not_flagged())
        rate = totals.rate
        if not rate:
            own, _ = self._rates()
            rate = own if own > 0 else rate
        return dataclasses.replace(totals, done=done, rate=rate)

    def add_pages(self, n: int) -> None:
        self.pages_total += n

    def page_done(self, *, fallback: bool, failure: str | None = None) -> None:
        """A page finished: answered, or fell back to its text layer (``failure``: why, when the server's
        answers are to blame; None for a page that cannot be rendered)."""
        self.pages_done += 1
        self.fallback_pages += int(fallback)
        item = _ITEM_PAGES.get()
        if item is not None:
            item[0] += 1
        was = self.fail_fast.tripped
        if not fallback or failure is not None:
            reason = self.fail_fast.record(failure)
            if reason is not None and was is None and self.on_fail_fast is not None:
                self.on_fail_fast(reason)

    def add_tokens(self, input_tokens: int, output_tokens: int) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens

    def _rates(self) -> tuple[float, float]:
        now = time.monotonic()
        self._window.append((now, self.pages_done, self.output_tokens))
        while len(self._window) > 2 and now - self._window[0][0] > RATE_WINDOW_S:
            self._window.popleft()
        t0, p0, o0 = self._window[0]
        if now - t0 < 1e-6:
            elapsed = max(now - self.started, 1e-6)
            return self.pages_done / elapsed, self.output_tokens / elapsed
        return (self.pages_done - p0) / (now - t0), (self.output_tokens - o0) / (now - t0)

    def line(self, server_state: str, in_flight: int) -> str:
        return f"{self.head()} | {self.tail(server_state, in_flight)}"

    def head(self) -> str:
        """Where the workspace stands: ``workspace 120/500 pages (24.0%), 380 remaining, 2.0 pages/s, ETA 3m 10s``
        (pages count as they are answered; the rate is the workspace's, or this process's until an item
        finishes). While the total rests on estimated page counts it is ``120/~500 pages (24.0%; estimated:
        3 of 10 items counted), ~380 remaining, ..., ETA ~3m 10s`` (olmocr.pipeline.workspace.totals)."""
        totals = self.live_totals()
        if totals is None:
            return f"pages {self.pages_done}/{self.pages_total} (this process; workspace totals not read yet)"
        if totals.rate is None:
            rate = "rate unknown"
        else:
            own = "" if self.workspace is not None and self.workspace.rate else " (this process)"
            rate = f"{totals.rate:.1f} pages/s{own}"
        return f"workspace {pages_text(totals)}, {rate}, ETA {eta_text(totals)}"  # marked while estimated

    def tail(self, server_state: str, in_flight: int) -> str:
        pages_s, tokens_s = self._rates()
        return (
            f"this process {self.pages_done} pages, {pages_s:.1f} pages/s, {tokens_s:.0f} output tokens/s | "
            f"fallback pages {self.fallback_pages} | docs done {self.docs_done}, failed {self.docs_failed}"
            f"{self._filtered()} | server {server_state}, {in_flight} requests in flight"
        )

    def short(self, server_state: str, in_flight: int) -> str:
        """The bar's part of :meth:`tail`: this process's rate, fallback pages, the server."""
        pages_s, _ = self._rates()
        return (f"this process {pages_s:.1f} pages/s | fallback {self.fallback_pages} | server {server_state}, "
                f"{in_flight} in flight")

    def _filtered(self) -> str:
        return f", skipped by filter {self.docs_filtered}" if self.docs_filtered else ""

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (
            f"finished in {elapsed:.1f}s: {self.pages_done} pages ({self.pages_done / elapsed:.1f} pages/s), "
            f"{self.fallback_pages} fallback pages, {self.docs_done} documents written, {self.docs_failed} "
            f"failed{self._filtered()}, {self.items_done} work items completed; tokens in {self.input_tokens:,}, "
            f"out {self.output_tokens:,} ({self.output_tokens / elapsed:.0f}/s)"
        )


def wants_bar(stream: IO[str] | None = None) -> bool:
    """A live bar only on an interactive terminal (not a pipe, a file, a dumb terminal or CI logs)."""
    stream = stream or sys.stderr
    try:
        return stream.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
    except (AttributeError, ValueError):
        return False


async def refresh_totals_forever(progress: Progress, read: Callable[[], PageTotals], interval: float) -> None:
    """Read the workspace's totals in a worker thread (they list storage) every ``interval`` seconds."""
    while True:
        await refresh_totals(progress, read)
        await asyncio.sleep(interval)


#: The totals are read on a thread of their own: a slow storage (S3 retrying) never takes one of the
#: default executor's few threads from the workers' claims, renewals and writes.
_TOTALS_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="olmocr-totals")


async def refresh_totals(progress: Progress, read: Callable[[], PageTotals], timeout: float | None = None) -> None:
    """One reading of the totals (kept if it fails or takes over ``timeout`` seconds: display only)."""
    try:
        started = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(_TOTALS_EXECUTOR, read)
        progress.workspace = await asyncio.wait_for(future, timeout)
        progress.workspace_read_at = started
    except Exception as exc:  # noqa: BLE001 - a storage hiccup: keep the last totals, try again
        logger.debug("progress: cannot read the workspace totals: %s", exc or type(exc).__name__)


async def report_progress(progress: Progress, state: Callable[[], tuple[str, int]], interval: float,
                          bar: bool | None = None,
                          detail: Callable[[], tuple[str, bool] | None] | None = None) -> None:
    """The progress until cancelled: a bar on a terminal, else the line every ``interval`` seconds.

    ``detail`` (several servers): each server's counters, on a line of its own after the progress line --
    shown when it matters (a server is not up), else only in the debug log: the progress line stays short."""
    if bar if bar is not None else wants_bar():
        await _bar_forever(progress, state, interval, detail)
        return
    while True:
        await asyncio.sleep(interval)
        server_state, in_flight = state()
        logger.info("%s", progress.line(server_state, in_flight))
        _log_detail(detail)


def _log_detail(detail: Callable[[], tuple[str, bool] | None] | None) -> None:
    found = detail() if detail is not None else None
    if found is not None:
        text, matters = found
        logger.log(logging.INFO if matters else logging.DEBUG, "%s", text)


async def _bar_forever(progress: Progress, state: Callable[[], tuple[str, int]], interval: float,
                       detail: Callable[[], tuple[str, bool] | None] | None = None) -> None:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    fmt = "{desc} {percentage:5.1f}%|{bar}| {n_fmt}/{total_fmt} pages{postfix}"
    # The run's handlers sit on the loggers the CLI set up (its modules' loggers have none of their own).
    run_loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    console = [h for lg in run_loggers for h in lg.handlers if type(h) is logging.StreamHandler]
    level = console[0].level if console else logging.INFO
    try:
        sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):
        sized = False  # a terminal that reports no size (some serial consoles, a bare pty): 120 columns
    with logging_redirect_tqdm(loggers=run_loggers), tqdm(total=0, unit="page", bar_format=fmt, dynamic_ncols=sized,
                                                        ncols=None if sized else 120, file=sys.stderr,
                                                        desc="workspace", leave=True) as bar:
        for handler in [h for lg in run_loggers for h in lg.handlers]:  # tqdm's stand-in for the console
            if type(handler) is not logging.FileHandler:                  # handler: keep the console's level
                handler.setLevel(max(handler.level, level))

        def draw() -> str:
            server_state, in_flight = state()
            totals = progress.live_totals()
            if totals is not None:
                bar.total, bar.n = totals.total, totals.done
                rate = "?" if totals.rate is None else f"{totals.rate:.1f}"
                bar.set_postfix_str(f"ETA {eta_text(totals)} | workspace {rate} pages/s | "
                                    f"{progress.short(server_state, in_flight)}", refresh=False)
            else:
                bar.set_postfix_str(progress.line(server_state, in_flight), refresh=False)
            bar.refresh()
            return progress.line(server_state, in_flight)

        last_line = time.monotonic()
        try:
            while True:
                await asyncio.sleep(min(1.0, interval))
                line = draw()
                if time.monotonic() - last_line >= interval:  # the plain line still goes to the debug log
                    last_line = time.monotonic()
                    logger.debug("%s", line)
                    _log_detail(detail)
        finally:
            draw()  # the state at the end (the runner reads the totals once more before it stops the bar)
