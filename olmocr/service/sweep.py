"""The service's periodic sweep of its own prefix: expired jobs, orphan uploads, the priority lane.

Every ``OLMOCR_SERVICE_SWEEP_INTERVAL`` seconds (default 300) each replica runs one sweep in a thread:

* **Expired jobs** (``OLMOCR_SERVICE_JOB_TTL`` seconds; 0, the default: never). A job finished longer ago
  than the TTL is removed: its record, its uploads, its markers, and its own items' results and failure
  records (``JobStore.remove``); its id then answers 404. Other items' results are never touched. Only
  jobs submitted longer ago than the TTL are read (a job's id carries its submit time).
* **Orphan uploads.** A service killed while it wrote a job's uploads leaves them without a record: no job,
  nothing queued. Upload folders with no record whose id is older than :data:`ORPHAN_GRACE_S` are deleted
  (a submit writes its record seconds after its uploads).
* **The priority lane**: its done items are removed (olmocr/pipeline/workspace/lane_compaction.py).

Cost of a sweep: a paged LIST of ``service/jobs/`` and one of ``service/uploads/`` (1 request per 1,000
keys; nothing outside the service's prefix is listed); per job older than the TTL and not yet removed, a
status read (about five requests); a DELETE per removed object; the lane's pass (its docstring). No request
of a client triggers any of it. Replicas may sweep at once: every delete is idempotent and the lane's
write conditional.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from olmocr import envs
from olmocr.pipeline.workspace.lane_compaction import LaneCompactor
from olmocr.service.jobs import UPLOADS, JobStore, job_time, valid_job_id

logger = logging.getLogger("olmocr.service")

#: Upload folders without a job record are deleted once their id is this old (seconds).
ORPHAN_GRACE_S = 3600.0


@dataclass
class Sweeper:
    store: JobStore
    ttl_s: float = 0.0  # 0: finished jobs are kept
    orphan_grace_s: float = ORPHAN_GRACE_S
    compactor: LaneCompactor | None = None
    clock: Callable[[], float] = time.time
    removed: dict[str, int] = field(default_factory=lambda: {"jobs": 0, "orphan_uploads": 0, "lane_items": 0})

    def sweep(self) -> dict[str, int]:
        """One sweep; returns what it removed (jobs, orphan upload files, lane items)."""
        storage = self.store.storage
        now = self.clock()
        jobs = sorted(self.store.all_ids())
        done = {"jobs": 0, "orphan_uploads": 0, "lane_items": 0}
        if self.ttl_s > 0:
            for job_id in jobs:  # oldest first: ids sort by submit time
                if not valid_job_id(job_id) or job_time(job_id) > now - self.ttl_s:
                    break
                record = self.store.record(job_id)
                finished = None if record is None else self.store.finished_at(record)
                if record is not None and finished is not None and finished <= now - self.ttl_s:
                    self.store.remove(record)
                    done["jobs"] += 1
        known = set(jobs)
        for key in list(storage.iter_list(UPLOADS)):
            job_id = key[len(UPLOADS):].split("/", 1)[0]
            if (valid_job_id(job_id) and job_id not in known
                    and job_time(job_id) <= now - self.orphan_grace_s):
                storage.delete(key)
                done["orphan_uploads"] += 1
        if self.compactor is not None:
            done["lane_items"] = self.compactor.compact()
        for name, n in done.items():
            self.removed[name] += n
        if any(done.values()):
            logger.info("sweep: %d expired jobs removed, %d orphan upload files deleted, %d done items removed "
                        "from the priority lane", done["jobs"], done["orphan_uploads"], done["lane_items"])
        return done

    async def run_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.sweep)
            except Exception as exc:  # noqa: BLE001 - the workspace failed: the next sweep tries again
                logger.warning("sweep of the service's prefix failed (%s: %s); next in %.0fs",
                               type(exc).__name__, exc, interval)


def sweep_context(store: JobStore) -> Callable[..., AsyncIterator[None]]:
    """For ``app.cleanup_ctx``: the sweep runs while the app does, with the settings' TTL and interval."""

    async def run(app: object) -> AsyncIterator[None]:
        sweeper = Sweeper(store, float(envs.value("OLMOCR_SERVICE_JOB_TTL")),  # type: ignore[arg-type]
                          compactor=LaneCompactor(store.queue))
        task = asyncio.create_task(sweeper.run_forever(float(envs.value("OLMOCR_SERVICE_SWEEP_INTERVAL"))))  # type: ignore[arg-type]
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return run
