"""Stopping the pipeline on purpose: the first SIGTERM / Ctrl+C asks for a graceful stop, a second one
exits at once.

A graceful stop (see ``Runner.run``): no new work items are claimed; items in progress get
``--stop_timeout`` seconds to finish, then are abandoned and their leases deleted so that another
pipeline takes them at once; the process exits 0 with a summary. The second signal kills the render
workers and exits 130 without releasing anything: the leases expire by themselves, as after ``kill -9``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

logger = logging.getLogger("olmocr.pipeline")

#: Default seconds a graceful stop waits for work items in progress before abandoning them. Below the
#: usual process managers' kill timeouts (Kubernetes 30 s, systemd 90 s, supervisord stopwaitsecs).
DEFAULT_STOP_TIMEOUT_S = 25.0

HARD_EXIT_STATUS = 130


class StopRequest:
    """The stop state of one run; ``install`` hooks SIGTERM and SIGINT into the running loop."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal_name: str | None = None
        self._hard_exit_hooks: list[Callable[[], None]] = []

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_hard_exit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (e.g. kill child processes) before a hard exit."""
        self._hard_exit_hooks.append(hook)

    def request(self, reason: str) -> None:
        if not self.event.is_set():
            self.signal_name = reason
            self.event.set()

    def on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if not self.event.is_set():
            logger.warning("%s: stopping gracefully (no new work; work in progress finishes or is handed back); "
                           "send it again to exit at once", name)
            self.request(name)
            return
        logger.warning("second %s: exiting at once; unfinished work items become free when their leases "
                       "expire", name)
        for hook in self._hard_exit_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - exiting anyway
                logger.exception("while exiting")
        for handler in logging.getLogger("olmocr.pipeline").handlers:
            handler.flush()
        os._exit(HARD_EXIT_STATUS)
