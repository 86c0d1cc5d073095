"""Cancel of a running job: the worker holding a cancelled job's item drops the pages not yet started.

``DELETE /v1/jobs/{id}`` writes ``service/cancelled/<job>.json``. The worker working an item of that job
(the embedded workers, or a ``--follow`` pipeline on any machine: they run the same runner) polls for that
record while it works the item: **one HEAD every** :data:`CANCEL_POLL_S` **seconds per job item in
progress** (30 requests a minute per running job; none for batch items, whose paths are not uploads).

Once the record is seen, a page that has not started (its render, the first thing a page does, has not
begun) is never run; pages already rendering or at the server finish. Each document whose pages all
finished is written as usual; each document missing a page is recorded as a failure with
:data:`CANCEL_DROPPED_REASON` (final, never retried). The item is then completed as
any item is (results, failure records, done flag: each written once), so no worker does it again, the
job reads ``cancelled``, and the finished documents' results stay readable.

The runner calls :func:`watch` per item (its task's context carries the item's cancel state); the page's
request calls :func:`check_page_start` before its render; the document runs each page through
:func:`unless_dropped` and asks :func:`dropped`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Iterable
from contextvars import ContextVar
from typing import TypeVar

from olmocr.pipeline.workspace.storage import Storage

#: olmocr-service's part of the workspace (olmocr/service/jobs.py draws its layout). Defined here, below the
#: service, because the pipeline's workers read the cancel records (the pipeline never imports the service).
SERVICE_PREFIX = "service"
UPLOADS = f"{SERVICE_PREFIX}/uploads/"
CANCELLED = f"{SERVICE_PREFIX}/cancelled/"
#: A document its worker was working when the job was cancelled: its pages not started were not run; the
#: record's reason starts with this.
CANCEL_DROPPED_REASON = "cancelled while it ran: its pages not yet started were dropped"

logger = logging.getLogger(__name__)  # it runs in the pipeline's workers: their log

#: Seconds between two looks at a running job's cancel record (one HEAD each).
CANCEL_POLL_S = 2.0
_UPLOAD = re.compile(r"(?:^|/)" + re.escape(UPLOADS) + r"([0-9a-f]{24})/[^/]+$")
#: Set when the job of the item this task works was cancelled (None: not a job's item).
_DROP: ContextVar[asyncio.Event | None] = ContextVar("olmocr_job_cancelled", default=None)
T = TypeVar("T")


class _Dropped(Exception):
    """A page of a cancelled job that had not started: it is not run (control flow inside this module)."""


def job_of(paths: Iterable[str]) -> str | None:
    """The job whose uploads ``paths`` are (olmocr-service's layout), or None for a batch item."""
    for path in paths:
        match = _UPLOAD.search(path)
        if match:
            return match.group(1)
    return None


def watch(storage: Storage, paths: Iterable[str], every: float = CANCEL_POLL_S) -> asyncio.Future[None]:
    """Called in the task working an item: for a job's item, poll its cancel record until cancelled (then
    :func:`dropped` is true in this task and the tasks it starts). Cancel the returned future when done."""
    job = job_of(paths)
    if job is None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done
    event = asyncio.Event()
    _DROP.set(event)
    return asyncio.ensure_future(_poll(storage, job, event, every))


async def _poll(storage: Storage, job: str, event: asyncio.Event, every: float) -> None:
    key = f"{CANCELLED}{job}.json"
    while True:
        try:
            if await asyncio.to_thread(storage.stat, key) is not None:
                logger.info("job %s was cancelled: its pages not yet started are dropped", job)
                event.set()
                return
        except Exception as exc:  # noqa: BLE001 - the workspace failed this once: look again next time
            logger.debug("could not read the cancel record of job %s: %s", job, exc)
        await asyncio.sleep(every)


def dropped() -> bool:
    """Whether the job of the item this task works was cancelled."""
    event = _DROP.get()
    return event is not None and event.is_set()


def check_page_start() -> None:
    """Before a page starts (its render): a cancelled job's page goes no further."""
    if dropped():
        raise _Dropped


async def unless_dropped(work: Awaitable[T]) -> T | None:
    """``work``'s result, or None when it was a page of a cancelled job that had not started."""
    try:
        return await work
    except _Dropped:
        return None


def cancelled_failure(source: str, missing: int, total: int) -> dict:
    """The failure record of a document cut short by its job's cancel (final: never retried)."""
    return {"source": source, "reason": f"{CANCEL_DROPPED_REASON} ({missing} of {total} pages not run)",
            "retryable": False}
