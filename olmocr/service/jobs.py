"""Jobs: records in the workspace, one work item of the shared queue each, states derived from the queue.

Workspace layout (beside the queue's own files, docs/service.md):

* ``service/uploads/<job>/<n>-<name>`` -- the job's documents: uploads, and copies of the paths a client
  named (a snapshot: what was checked at submit time is what is converted). Written first.
* ``service/jobs/<job>.json`` -- the job record (documents, their page counts, the work item's hash, who
  submitted it). Written second, with create-if-absent.
* the work item ``sha1(the document paths)`` in the queue's priority lane (``work_index_priority.csv.zstd``,
  claimed before the batch items of the main index) -- written third (``WorkQueue.populate(...,
  priority=True)`` with every document in one group). A record whose item is missing (the service died between the two
  writes) is queued again the next time anyone reads it.
* ``service/cancelled/<job>.json`` -- written by ``DELETE``; the job is ``cancelled`` from then on.
* ``service/inflight/<token>/<job>`` -- one empty marker per unfinished job of a token (the 429 limit);
  removed once the job is seen finished.

Nothing else is kept: a job's state comes from the queue (done flag, live lease), its results and failure
records, and the cancel record, so any number of replicas (and a restarted one) agree.

Cost: a submit or a status read makes a fixed number of requests whatever the workspace's size. The queue's
indexes are never downloaded per request: ``WorkQueue.has_item`` looks in the queue's cached indexes and
re-reads one only when it changed (a conditional GET).

The queue's layout helpers used here (``results_key``, ``failed_key``, ``lock_key``, ``retry_hash``) are the
whole of this module's knowledge of the queue beyond ``WorkQueue``'s methods.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from olmocr.pipeline.job_cancel import CANCEL_DROPPED_REASON, CANCELLED, SERVICE_PREFIX, UPLOADS
from olmocr.pipeline.workspace.queue import (
    WorkQueue,
    done_key,
    failed_key,
    group_hash,
    lock_key,
    results_key,
    retry_hash,
)
from olmocr.pipeline.workspace.storage import Storage

PREFIX = SERVICE_PREFIX
JOBS = f"{PREFIX}/jobs/"
INFLIGHT = f"{PREFIX}/inflight/"
#: A job's whole work item: every document in one group, whatever its pages.
ONE_GROUP = 10**12
#: Retry items (of retryable failures) a job follows before it reports the failure as final.
MAX_RETRY_ROUNDS = 2
CANCEL_REASON = "cancelled before it started"
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = frozenset({"done", "failed", "cancelled"})
_ID = re.compile(r"^[0-9a-f]{24}$")
#: ``list_ids`` lists the jobs whose ids share this many leading digits with its bound first (4.7 hours).
ID_BUCKET_DIGITS = 6
#: Ids up to this far ahead of this replica's clock (another replica's clock) are listed as the newest.
FUTURE_IDS_S = 3600.0


def new_job_id(clock: float | None = None) -> str:
    """24 hex digits: milliseconds since 1970 (12), then 12 random: ids sort by submission time."""
    millis = int((time.time() if clock is None else clock) * 1000)
    return f"{millis:012x}{secrets.token_hex(6)}"


def is_cancel_reason(reason: str) -> bool:
    """Whether a failure record's reason says the job's cancel dropped the document."""
    return reason == CANCEL_REASON or reason.startswith(CANCEL_DROPPED_REASON)


def job_time(job_id: str) -> float:
    """When the job was submitted (Unix seconds), from its id."""
    return int(job_id[:12], 16) / 1000.0


def valid_job_id(job_id: str) -> bool:
    return bool(_ID.match(job_id))


def token_key(token: str | None) -> str:
    """Who submitted: a short hash of the bearer token (never the token), or ``anonymous``."""
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else "anonymous"


def safe_name(name: str) -> str:
    """A file name for the workspace: the base name, characters outside ``[A-Za-z0-9._-]`` replaced."""
    base = os.path.basename(name.replace("\\", "/")) or "document"
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".") or "document"
    return cleaned[:100]


def workspace_path(storage: Storage, key: str) -> str:
    """The path the pipeline reads ``key`` of the workspace by (``s3://...`` or a local path)."""
    url = str(getattr(storage, "url", ""))
    return f"{url.rstrip('/')}/{key}" if url.startswith("s3://") else os.path.join(url, key)


@dataclass(frozen=True)
class Document:
    name: str  # what the client called it (file name or path)
    key: str  # its copy in the workspace
    kind: str  # one of inputs.KINDS: pdf, png, jpeg, tiff
    pages: int


def _read_json(storage: Storage, key: str) -> Any:
    data = storage.read(key)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _jsonl(data: bytes | None) -> list[dict]:
    out = []
    for line in (data or b"").decode("utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


class JobStore:
    """Submit, read, list and cancel jobs in one workspace (thread-safe: storage calls only)."""

    def __init__(self, storage: Storage, queue: WorkQueue, clock: Any = time.time) -> None:
        self.storage = storage
        self.queue = queue
        self.clock = clock

    # ---- submitting ---------------------------------------------------------------------------------

    def upload_key(self, job_id: str, index: int, name: str, suffixes: tuple[str, ...] = ()) -> str:
        """Where a job's document goes. Its name ends with one of ``suffixes`` (the file name endings of the kind
        its content is, first one added if needed): the pipeline goes by a name's ending for tarballs, so a PDF
        called ``scan.tar.gz`` would be taken for one."""
        base = safe_name(name)
        if suffixes and not base.lower().endswith(suffixes):
            base = base[: 100 - len(suffixes[0])] + suffixes[0]
        return f"{UPLOADS}{job_id}/{index}-{base}"

    def submit(self, job_id: str, documents: list[Document], token: str, source: str) -> dict:
        """Write the record, then queue the item (the uploads are written by the caller, before)."""
        paths = [workspace_path(self.storage, d.key) for d in documents]
        record = {
            "id": job_id,
            "created": self.clock(),
            "token": token,
            "source": source,
            "item": group_hash(paths),
            "documents": [{"name": d.name, "key": d.key, "path": p, "kind": d.kind, "pages": d.pages}
                          for d, p in zip(documents, paths, strict=True)],
        }
        if not self.storage.create(f"{JOBS}{job_id}.json", json.dumps(record).encode()):
            raise RuntimeError(f"job {job_id} exists already")
        self.storage.write(f"{INFLIGHT}{token}/{job_id}", b"")
        self._queue(record)
        return record

    def _queue(self, record: dict) -> None:
        pages = {d["path"]: int(d["pages"]) for d in record["documents"]}
        self.queue.populate(list(pages), ONE_GROUP, lambda p: pages.get(p, 1), priority=True)

    def record(self, job_id: str) -> dict | None:
        if not valid_job_id(job_id):
            return None
        value = _read_json(self.storage, f"{JOBS}{job_id}.json")
        return value if isinstance(value, dict) else None

    # ---- reading ------------------------------------------------------------------------------------

    def _chain(self, record: dict, failures: dict[str, bytes | None] | None = None) -> tuple[list[str], bool, bool]:
        """The job's items (its own, then retry items it follows), whether the last is done, and whether
        it is leased now. Re-queues the job when its item is missing from the queue. ``failures`` keeps the
        failure records it read, per item (:meth:`report` reads them once)."""
        failures = {} if failures is None else failures
        item = record["item"]
        # A done item may be gone from the lane (lane_compaction.py): its done flag is the job's word.
        if not self.queue.has_item(item) and not self.queue.is_done(item):
            self._queue(record)  # the service died between the record and the queue
            return [item], False, False
        chain = [item]
        while True:
            current = chain[-1]
            if not self.queue.is_done(current):
                return chain, False, self._leased(current)
            failures[current] = self.storage.read(failed_key(current))
            retry = [str(f["source"]) for f in _jsonl(failures[current]) if f.get("retryable") and f.get("source")]
            if not retry or len(chain) > MAX_RETRY_ROUNDS:
                return chain, True, False
            nxt = retry_hash(current, sorted(set(retry)))
            if not self.queue.has_item(nxt) and not self.queue.is_done(nxt):
                self.queue.requeue_retryable()
                if not self.queue.has_item(nxt):  # re-queued elsewhere under another rule: report what we have
                    return chain, True, False
            chain.append(nxt)

    def item_done(self, record: dict) -> bool:
        """Whether the job's own item is done or the job cancelled: one or two reads (for polling)."""
        return (self.queue.is_done(record["item"])
                or self.storage.read(f"{CANCELLED}{record['id']}.json") is not None)

    def _leased(self, item: str) -> bool:
        lease = _read_json(self.storage, lock_key(item))
        try:
            return float(lease["expires_at"]) > self.clock()
        except (TypeError, KeyError, ValueError):
            return False

    def status(self, record: dict, rate: float | None = None) -> dict:
        """The job as ``GET /v1/jobs/{id}`` answers it."""
        return self.report(record, rate)[0]

    def report(self, record: dict, rate: float | None = None) -> tuple[dict, list[tuple[dict, dict | None]]]:
        """The job's status and its results (``(document entry, Dolma document or None)`` per document, in
        submission order), from one read of its items' results: a finished convert needs both."""
        job_id = record["id"]
        cancel = _read_json(self.storage, f"{CANCELLED}{job_id}.json")
        failures: dict[str, bytes | None] = {}
        chain, done, leased = self._chain(record, failures)
        outcomes = self._outcomes(record, chain, failures)
        docs = []
        pages_done = 0
        for d in record["documents"]:
            outcome = outcomes.get(d["path"])
            entry = {"name": d["name"], "kind": d["kind"], "pages": d["pages"]}
            if outcome is None:
                entry["outcome"] = "cancelled" if cancel is not None and done else "pending"
            elif outcome.get("doc") is not None:
                entry["outcome"] = "done"
                pages_done += d["pages"]
            else:
                failure = outcome["failure"]
                cancelled = is_cancel_reason(str(failure.get("reason", "")))
                entry["outcome"] = "cancelled" if cancelled else "failed"
                entry["reason"] = str(failure.get("reason", ""))
                if not cancelled:
                    pages_done += d["pages"]
            docs.append(entry)
        pages_total = sum(int(d["pages"]) for d in record["documents"])
        if cancel is not None:
            state = "cancelled"
        elif done:
            state = "done" if any(e["outcome"] == "done" for e in docs) else "failed"
        else:
            state = "running" if leased or len(chain) > 1 else "queued"
        remaining = 0 if state in FINISHED else pages_total - pages_done
        eta = None if state not in FINISHED and not rate else (remaining / rate if rate else 0.0)
        finished_at = None
        if state in FINISHED:
            finished_at = (cancel or {}).get("time") or self._done_time(chain[-1])
        status = {
            "id": job_id,
            "state": state,
            "created": record["created"],
            "finished": finished_at,
            "pages_done": pages_done,
            "pages_total": pages_total,
            "eta_seconds": eta,
            "documents": docs,
        }
        results = [(d, (outcomes.get(d["path"]) or {}).get("doc")) for d in record["documents"]]
        return status, results

    def state(self, record: dict) -> str:
        """The job's state alone, for a watcher that polls many jobs: an unfinished job costs three reads
        (its cancel record, its item's done flag and lease) instead of a status's seven. A finished one, or one
        whose item is missing from the queue, is read whole (:meth:`status` re-queues a missing item)."""
        if self.storage.read(f"{CANCELLED}{record['id']}.json") is not None:
            return "cancelled"
        item = record["item"]
        if self.queue.is_done(item) or not self.queue.has_item(item):
            return self.status(record)["state"]
        return "running" if self._leased(item) else "queued"

    def _done_time(self, item: str) -> float | None:
        flag = _read_json(self.storage, done_key(item))  # written by WorkQueue.complete
        try:
            return float(flag["time"])
        except (TypeError, KeyError, ValueError):
            return None

    def _outcomes(self, record: dict, chain: list[str], failures: dict[str, bytes | None]) -> dict[str, dict]:
        """Per document path: ``{"doc": dolma}`` or ``{"failure": record}``, the latest item's word first."""
        out: dict[str, dict] = {}
        for item in chain:
            for doc in _jsonl(self.storage.read(results_key(item))):
                source = str((doc.get("metadata") or {}).get("Source-File", ""))
                out[source] = {"doc": doc}
            failed = failures[item] if item in failures else self.storage.read(failed_key(item))
            for failure in _jsonl(failed):
                source = str(failure.get("source", ""))
                if source and "doc" not in out.get(source, {}):
                    out[source] = {"failure": failure}
        return out

    def results(self, record: dict) -> list[tuple[dict, dict | None]]:
        """``(document entry, Dolma document or None)`` per document, in submission order."""
        return self.report(record)[1]

    # ---- listing, cancelling ------------------------------------------------------------------------

    def list_ids(self, limit: int, before: str | None = None) -> list[str]:
        """Up to ``limit`` job ids, newest first, older than ``before`` (ids sort by submission time).

        Only the time bucket that holds them is listed, not every job kept. An id starts with its submit time
        in hexadecimal milliseconds, so the ids sharing its first 6 digits were submitted within the same 4.7
        hours, its first 5 within 3 days, and so on. The smallest such bucket around ``before`` (or now) that
        holds ``limit`` ids older than it is listed; every id older than those lies in an older bucket."""
        if before and not valid_job_id(before):  # not an id: compared as a string, as before buckets
            return sorted((i for i in self.all_ids() if i < before), reverse=True)[:limit]
        high = before or new_job_id(self.clock() + FUTURE_IDS_S)
        for digits in range(ID_BUCKET_DIGITS, -1, -1):
            ids = sorted((i for i in self._ids_from(high[:digits]) if i < high), reverse=True)
            if len(ids) >= limit or digits == 0:
                return ids[:limit]
        return []

    def all_ids(self) -> list[str]:
        """Every job id (one listing of ``service/jobs/``: the watcher's and the sweep's full readings)."""
        return list(self._ids_from(""))

    def _ids_from(self, id_prefix: str) -> Iterator[str]:
        return (k[len(JOBS):-5] for k in self.storage.iter_list(f"{JOBS}{id_prefix}") if k.endswith(".json"))

    def cancel(self, record: dict) -> None:
        """Record the cancel; an item no worker holds is leased here and completed at once with every
        document ``cancelled`` (work not started is dropped). A worker holding it sees the record within
        seconds, drops the pages not started and completes it (olmocr/pipeline/job_cancel.py). Holding the
        lease to complete it, the service never writes an item a worker writes too."""
        job_id = record["id"]
        self.storage.create(f"{CANCELLED}{job_id}.json", json.dumps({"time": self.clock()}).encode())
        chain, done, _ = self._chain(record)
        if done:
            return
        item = self.queue.claim_item(chain[-1])
        if item is not None:  # no worker has it: nothing started
            self.queue.complete(item, b"", [{"source": p, "reason": CANCEL_REASON, "retryable": False}
                                            for p in item.paths])

    # ---- retention (olmocr/service/sweep.py) -----------------------------------------------------------

    def finished_at(self, record: dict) -> float | None:
        """When the job finished, or None while it is not finished or a worker still works its item (a job
        cancelled while it ran: its item is completed moments later)."""
        status = self.status(record)
        if status["state"] not in FINISHED or any(d["outcome"] == "pending" for d in status["documents"]):
            return None
        return float(status["finished"] or job_time(record["id"]))

    def remove(self, record: dict) -> None:
        """Delete a finished job: its items' results and failure records, its uploads, its markers, and its
        record last, so that a removal cut short is redone by the next sweep (the chain of items is read
        from the failure records, deleted from the last item back). The done flags stay: no worker redoes
        the items, and the queue's counts stay true. Nothing of other items is touched."""
        job_id = record["id"]
        chain, _, _ = self._chain(record)
        for item in reversed(chain):
            self.storage.delete(results_key(item))
            self.storage.delete(failed_key(item))
        for key in list(self.storage.iter_list(f"{UPLOADS}{job_id}/")):
            self.storage.delete(key)
        self.storage.delete(f"{CANCELLED}{job_id}.json")
        self.forget_in_flight(record)
        self.storage.delete(f"{JOBS}{job_id}.json")

    def unfinished_ids(self) -> list[str]:
        """The jobs with an in-flight marker (every token's): each unfinished job, and finished ones whose marker
        nobody removed yet. One listing of ``service/inflight/``, whatever the number of jobs kept."""
        return [key.rsplit("/", 1)[-1] for key in self.storage.iter_list(INFLIGHT)]

    def forget_in_flight(self, record: dict) -> None:
        """Remove the in-flight marker of a job seen finished."""
        self.storage.delete(f"{INFLIGHT}{record.get('token', 'anonymous')}/{record['id']}")

    def in_flight(self, token: str, limit: int | None = None) -> list[str]:
        """The token's unfinished jobs (markers of finished ones are removed on the way). A job counts until
        its own item is done or it is cancelled (two or three reads each): its retries, if any, are not
        counted. With ``limit``, fewer markers than the limit (one listing) cannot reach it: they are
        counted as they are, and each job is read only at the limit (100 reads a submit with 50 jobs in
        flight before)."""
        keys = self.storage.list(f"{INFLIGHT}{token}/")
        if limit is not None and len(keys) < limit:
            return [key.rsplit("/", 1)[-1] for key in keys]
        live = []
        for key in keys:
            job_id = key.rsplit("/", 1)[-1]
            record = self.record(job_id)
            if record is not None and not self.item_done(record):
                live.append(job_id)
                continue
            self.storage.delete(key)
        return live
