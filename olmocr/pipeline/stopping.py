"""Stopping the pipeline on purpose: the first SIGTERM / Ctrl+C asks for a graceful stop, a second one
exits at once.

One Ctrl+C is one stop however many processes receive it. A terminal, GNU ``timeout -s INT`` (the process,
then its group), systemd's ``KillMode=control-group`` and Slurm's ``scancel`` signal every process of the
group at once, so the pipeline may get the same signal twice within milliseconds: the same signal again
within :data:`BURST_S` of the first is that same stop, not the impatient second one. (The render workers
ignore such group signals: see ``olmocr.pipeline.pages.render``; the pipeline stops them itself.)

A graceful stop (see ``Runner.run``): no new work items are claimed; items in progress get
``--stop_timeout`` seconds to finish. Then each keeps what is finished: its finished documents are written
as its results, the answered pages of documents in flight go to ``partial_pages/``, and only the rest goes
back to the queue as a new item that another pipeline takes at once (``WorkQueue.complete_partial``,
docs/workspace.md); the process exits 0 with a summary. The second signal kills the render
workers and exits 130 without releasing anything: the leases expire by themselves, as after ``kill -9``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable

from olmocr.exit_codes import STATUS_INTERRUPTED
from olmocr.logformat import RUN_LOGGERS

logger = logging.getLogger(__name__)

#: Default seconds a graceful stop waits for work items in progress before abandoning them. Below the
#: usual process managers' kill timeouts (Kubernetes 30 s, systemd 90 s, supervisord stopwaitsecs).
DEFAULT_STOP_TIMEOUT_S = 25.0

#: The same signal again within this many seconds of the first is one stop delivered twice (see above).
BURST_S = 1.0
#: The log lines of a stop (tests match them with tests.pipeline_helpers.log_line, not with a copy of the text).
LOG_GRACEFUL = ("%s: stopping gracefully (no new work; work in progress finishes or is handed back); send it again "
                "to exit at once")
LOG_SAME_STOP = ("%s again within %gs of the first: the same stop, delivered to the whole process group; still "
                 "stopping gracefully")
LOG_HARD_EXIT = "second %s: exiting at once; unfinished work items become free when their leases expire"


class StopRequest:
    """The stop state of one run; ``install`` hooks SIGTERM and SIGINT into the running loop."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal_name: str | None = None
        self._hard_exit_hooks: list[Callable[[], None]] = []
        self._first: tuple[int, float] | None = None  # the first signal and when it came
        self._temp_dirs: list[str] = []

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_hard_exit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (e.g. kill child processes) before a hard exit."""
        self._hard_exit_hooks.append(hook)

    def remove_on_hard_exit(self, path: str | os.PathLike[str]) -> None:
        """Remove the temporary directory ``path`` (made by this run) if the process exits at once."""
        self._temp_dirs.append(os.fspath(path))

    def request(self, reason: str) -> None:
        if not self.event.is_set():
            self.signal_name = reason
            self.event.set()

    def on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        now = time.monotonic()
        if not self.event.is_set():
            logger.warning(LOG_GRACEFUL, name)
            self._first = (sig, now)
            self.request(name)
            return
        if is_same_stop(self._first, sig, now):
            logger.info(LOG_SAME_STOP, name, BURST_S)
            return
        logger.warning(LOG_HARD_EXIT, name)
        for hook in self._hard_exit_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - exiting anyway
                logger.exception("while exiting")
        for path in [*self._temp_dirs, *_multiprocessing_temp_dir()]:
            shutil.rmtree(path, ignore_errors=True)
        for name in RUN_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.flush()
        os._exit(STATUS_INTERRUPTED)


def is_same_stop(first: tuple[int, float] | None, sig: int, now: float) -> bool:
    """True when signal ``sig`` at ``now`` is the ``first`` one delivered again (same signal within
    :data:`BURST_S`), False when it is a second request."""
    return first is not None and first[0] == sig and now - first[1] < BURST_S


def _multiprocessing_temp_dir() -> list[str]:
    """multiprocessing's ``pymp-*`` directory, removed by a finalizer that ``os._exit`` skips."""
    import multiprocessing

    path = multiprocessing.current_process()._config.get("tempdir")  # type: ignore[attr-defined]
    return [path] if path else []
