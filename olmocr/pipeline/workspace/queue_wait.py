"""``--wait_for_queue``: a pipeline started before its workspace has a queue waits for another process to fill
it (the first Slurm array task, the Kubernetes pod of completion index 0; docs/slurm.md, "Fill once").

It looks for the work index (:data:`~olmocr.pipeline.workspace.queue.INDEX_KEY`) once every
:data:`POLL_S` seconds: one ``HEAD`` request on S3 (a ``stat`` on a local workspace), about 12 a minute per
waiting pipeline, nothing listed and nothing downloaded. The filler writes the index whole, in one
compare-and-swap, so once it exists every input of that filler is in it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from olmocr.pipeline.errors import WorkspaceError
from olmocr.pipeline.stopping import StopRequest
from olmocr.pipeline.workspace.queue import INDEX_KEY
from olmocr.pipeline.workspace.storage import Storage

logger = logging.getLogger(__name__)

#: Seconds between two looks for the index (one HEAD request each).
POLL_S = 5.0
#: The one line a pipeline logs when it starts waiting.
WAITING = ("workspace %s has no work queue yet: waiting up to %.0f s for the task that adds the inputs (--pdfs) "
           "to fill it (--wait_for_queue; one HEAD request every %.0f s)")
#: The one line it logs when the queue appears.
FOUND = "work queue of %s found after %.0f s of waiting"


def never_filled(workspace: str, seconds: float) -> str:
    """The one-line reason a waiting pipeline gives up (exit status 1)."""
    return (f"workspace {workspace}: still no work queue after waiting {seconds:g} s (--wait_for_queue): the task "
            "that adds the inputs (--pdfs) did not fill it; see its log (Slurm: the array's first task; "
            "Kubernetes: the pod of completion index 0), or fill it once yourself: python -m olmocr.pipeline "
            f"{workspace} --pdfs INPUTS --stats")


async def wait_for_queue(storage: Storage, workspace: str, seconds: float, stop: StopRequest,
                         poll_s: float = POLL_S) -> bool:
    """Until the work index exists: True. False when ``stop`` is requested first (nothing was claimed).
    Raises :class:`WorkspaceError` after ``seconds``."""
    started = time.monotonic()
    logger.info(WAITING, workspace, seconds, poll_s)
    while True:
        if await asyncio.to_thread(storage.stat, INDEX_KEY) is not None:
            logger.info(FOUND, workspace, time.monotonic() - started)
            return True
        remaining = started + seconds - time.monotonic()
        if remaining <= 0:
            raise WorkspaceError(never_filled(workspace, seconds))
        try:
            await asyncio.wait_for(stop.event.wait(), min(poll_s, remaining))
            return False
        except TimeoutError:
            continue
