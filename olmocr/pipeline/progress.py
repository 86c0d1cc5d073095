"""Run counters, the periodic progress line and the final summary."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("olmocr.pipeline")

RATE_WINDOW_S = 30.0


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
    items_done: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    _window: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add_pages(self, n: int) -> None:
        self.pages_total += n

    def page_done(self, *, fallback: bool) -> None:
        self.pages_done += 1
        self.fallback_pages += int(fallback)

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
        pages_s, tokens_s = self._rates()
        return (
            f"pages {self.pages_done}/{self.pages_total} | {pages_s:.1f} pages/s | {tokens_s:.0f} output tokens/s | "
            f"fallback pages {self.fallback_pages} | docs done {self.docs_done}, failed {self.docs_failed} | "
            f"server {server_state}, {in_flight} requests in flight"
        )

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (
            f"finished in {elapsed:.1f}s: {self.pages_done} pages ({self.pages_done / elapsed:.1f} pages/s), "
            f"{self.fallback_pages} fallback pages, {self.docs_done} documents written, {self.docs_failed} "
            f"failed, {self.items_done} work items completed; tokens in {self.input_tokens:,}, "
            f"out {self.output_tokens:,} ({self.output_tokens / elapsed:.0f}/s)"
        )


async def report_progress(progress: Progress, state: Callable[[], tuple[str, int]], interval: float) -> None:
    """Log the progress line every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        server_state, in_flight = state()
        logger.info("%s", progress.line(server_state, in_flight))
