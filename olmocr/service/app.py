"""The HTTP API (aiohttp): routes, bearer token, JSON errors, metrics. State lives in the workspace only."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram

from olmocr.endpoints import metrics_response
from olmocr.pipeline.workspace.queue import WorkQueue
from olmocr.pipeline.workspace.storage import Storage
from olmocr.service import openapi
from olmocr.service.intake import (
    MEDIA,
    Limits,
    Roots,
    ServiceError,
    check_document_count,
    confine,
    inspect,
    page_image,
    read_named,
    too_large,
)
from olmocr.service.jobs import FINISHED, STATES, Document, JobStore, new_job_id, token_key
from olmocr.service.sweep import sweep_context

logger = logging.getLogger("olmocr.service")

#: Answered without the token (the kubelet's probes).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})  # "/": the page itself holds no data
FORMATS = ("markdown", "dolma", "pages")
#: Seconds a 429 asks the client to wait.
RETRY_AFTER_S = 5
#: How often the metrics' view of the jobs is refreshed.
WATCH_INTERVAL_S = 2.0
#: POST /v1/convert's longest pause between two reads of its item's done flag while this process runs workers.
LOCAL_POLL_S = 1.0
CHUNK = 1 << 16


@dataclass
class ServiceConfig:
    limits: Limits = field(default_factory=Limits)
    roots: Roots = field(default_factory=Roots)
    token: str | None = field(default=None, repr=False)
    #: Set when jobs are submitted: embedded workers claim at once.
    wake: asyncio.Event | None = None
    #: The embedded pipeline's task (None: no embedded workers); /readyz fails once it has ended.
    workers: asyncio.Task | None = None
    #: Seconds between two readings of every job for /metrics (OLMOCR_SERVICE_SWEEP_INTERVAL, the sweep's pace:
    #: it lists the same prefix); the rounds between read only the unfinished jobs.
    watch_all_s: float = 300.0


def error_response(exc: ServiceError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """Every error as ``{"error": {"code", "message"}}``; never a traceback."""
    try:
        return await handler(request)
    except ServiceError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}.get(exc.status, "bad_request")
        message = {404: f"no route {request.path}: see /openapi.json",
                   405: f"{request.method} is not allowed on {request.path}: see /openapi.json"}.get(
                       exc.status, exc.reason)
        return web.json_response({"error": {"code": code, "message": message}}, status=exc.status)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("internal error on %s %s", request.method, request.path)
        return web.json_response({"error": {"code": "internal", "message": "internal error; the service's log "
                                            "has the details"}}, status=500)


def bearer(token: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if expected is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if not given:
                raise ServiceError(401, "missing_token", "this service requires 'Authorization: Bearer <token>'",
                                   {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(given.encode(), expected):
                raise ServiceError(401, "wrong_token", "the bearer token is wrong: send the service's token",
                                   {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return await handler(request)

    return check


class Service:
    """The routes over one workspace (``storage`` + ``queue``)."""

    def __init__(self, storage: Storage, queue: WorkQueue, config: ServiceConfig) -> None:
        self.storage = storage
        self.queue = queue
        self.store = JobStore(storage, queue)
        self.config = config
        self.registry = CollectorRegistry()
        self.jobs_gauge = Gauge("olmocr_service_jobs", "jobs in the workspace by state (as this replica last saw "
                                "them)", ["state"], registry=self.registry)
        self.queue_gauge = Gauge("olmocr_service_queue_items", "work items of the workspace queue by state "
                                 "(pending, leased, done)", ["state"], registry=self.registry)
        self.job_seconds = Histogram("olmocr_service_job_seconds", "seconds from submit to done (jobs submitted "
                                     "through this replica)", registry=self.registry,
                                     buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf")))
        for state in STATES:
            self.jobs_gauge.labels(state).set(0)
        self._states: dict[str, str] = {}  # job id -> last state seen (finished ones are final)
        self._watched_all_at = float("-inf")
        self._submitted: dict[str, float] = {}  # jobs submitted here, not yet seen finished
        self._rate: tuple[float, float | None] = (float("-inf"), None)
        self._admit = asyncio.Lock()  # the in-flight check of a submit (see _submit)
        self._reserved: dict[str, int] = {}  # token -> submits past the check whose record is not written yet

    # ---- the app ------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors, bearer(self.config.token)],
                              client_max_size=max(1 << 20, self.config.limits.max_upload_bytes + (1 << 20)))
        app.add_routes([
            web.post("/v1/jobs", self.post_job),
            web.get("/v1/jobs", self.list_jobs),
            web.get("/v1/jobs/{id}", self.get_job),
            web.delete("/v1/jobs/{id}", self.delete_job),
            web.get("/v1/jobs/{id}/result", self.get_result),
            web.get("/v1/jobs/{id}/documents/{doc}/pages/{page}/image", self.get_page_image),
            web.post("/v1/convert", self.convert),
            web.get("/openapi.json", self.openapi),
            web.get("/", self.page),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
        ])
        app.on_startup.append(self._start_watch)
        app.on_cleanup.append(self._stop_watch)
        app.cleanup_ctx.append(sweep_context(self.store))  # svc-jobs (#32): retention, orphans, lane compaction
        return app

    async def _start_watch(self, app: web.Application) -> None:
        self._watch = asyncio.create_task(self._watch_forever())

    async def _stop_watch(self, app: web.Application) -> None:
        self._watch.cancel()
        await asyncio.gather(self._watch, return_exceptions=True)

    # ---- submitting ---------------------------------------------------------------------------------

    async def _read_documents(self, request: web.Request) -> tuple[list[tuple[str, bytes]], str]:
        """``[(name, content)]`` from a multipart upload, a JSON body or a form; and how they came."""
        limits = self.config.limits
        if request.content_length is not None and request.content_length > limits.max_upload_bytes:
            raise too_large(limits)
        # The media type alone: aiohttp's ``content_type`` runs the e-mail header parser over the whole header,
        # boundary included (7 % of the service's CPU in bench/service.py's throughput run, py-spy).
        ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        named: list[str] = []
        uploads: list[tuple[str, bytes]] = []
        if ctype == "multipart/form-data":
            try:
                reader = await request.multipart()
                total = 0
                while (part := await reader.next()) is not None:
                    if part.name == "file":
                        chunks = []
                        while chunk := await part.read_chunk(CHUNK):
                            total += len(chunk)
                            if total > limits.max_upload_bytes:
                                raise too_large(limits)
                            chunks.append(chunk)
                        uploads.append((part.filename or f"document-{len(uploads) + 1}", b"".join(chunks)))
                    elif part.name == "path":
                        named.append((await part.text()).strip())
                    check_document_count(len(uploads) + len(named) or 1, limits)
            except (ValueError, AssertionError, KeyError) as exc:
                raise ServiceError(400, "bad_request", f"malformed multipart body ({exc}): send "
                                   "multipart/form-data with field 'file'") from None
        elif ctype == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise ServiceError(400, "bad_json", "the body is not valid JSON: send {\"paths\": [...]}") from None
            paths = body.get("paths") if isinstance(body, dict) else None
            if not isinstance(paths, list):
                raise ServiceError(400, "bad_request", "the JSON body must be {\"paths\": [\"s3://...\" or a "
                                   "local path under a configured root, ...]}")
            named = paths
        elif ctype == "application/x-www-form-urlencoded":
            form = await request.post()
            named = [str(v) for v in form.getall("path", [])]
        else:
            raise ServiceError(415, "unsupported_content_type", f"Content-Type {ctype or '(none)'} is not "
                               "accepted: send multipart/form-data (field 'file') or JSON {\"paths\": [...]}")
        check_document_count(len(uploads) + len(named), limits)
        for path in named:
            real = confine(path, self.config.roots)
            uploads.append((str(path), await asyncio.to_thread(read_named, str(path), real, limits)))
        if sum(len(d) for _, d in uploads) > limits.max_upload_bytes:
            raise too_large(limits)
        return uploads, "paths" if named else "upload"

    async def _submit(self, request: web.Request) -> dict:
        token = token_key(self.config.token)  # the request passed the bearer check: it holds this token
        limits = self.config.limits
        # The check and a reservation under one lock, the reservation held until the job's record (and its
        # in-flight marker) is written: concurrent submits to this replica never pass the limit together. It is
        # given back under the lock too, so a check's listing never misses both a job's marker and its reservation.
        async with self._admit:
            reserved = self._reserved.get(token, 0)
            live = reserved + len(await asyncio.to_thread(self.store.in_flight, token,
                                                             limits.max_jobs_in_flight - reserved))
            if live >= limits.max_jobs_in_flight:
                raise ServiceError(429, "too_many_jobs", f"{live} jobs of this token are unfinished, the limit is "
                                   f"{limits.max_jobs_in_flight} (OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT): wait for one "
                                   f"to finish and retry after {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
            self._reserved[token] = self._reserved.get(token, 0) + 1
        try:
            return await self._submit_admitted(request, token)
        finally:
            await asyncio.shield(self._release(token))  # given back even if the request is cancelled

    async def _release(self, token: str) -> None:
        async with self._admit:
            self._reserved[token] -= 1

    async def _submit_admitted(self, request: web.Request, token: str) -> dict:
        limits = self.config.limits
        documents, source = await self._read_documents(request)
        record = await asyncio.to_thread(self._store_job, documents, token, source, limits)
        self._submitted[record["id"]] = time.time()
        logger.info("job %s: %d documents, %d pages queued (%s)", record["id"], len(record["documents"]),
                    sum(d["pages"] for d in record["documents"]), source)
        return record

    def _store_job(self, documents: list[tuple[str, bytes]], token: str, source: str, limits: Limits) -> dict:
        """Check every document, then write the uploads, the record and the work item: one trip to a thread
        for the whole submit (each trip is a hand-over between the event loop and a thread)."""
        checked = [(name, data, *inspect(name, data, limits)) for name, data in documents]
        job_id = new_job_id()
        docs = []
        for n, (name, data, kind, pages) in enumerate(checked):
            key = self.store.upload_key(job_id, n, name, MEDIA[kind][1])
            self.storage.write(key, data)
            docs.append(Document(name=name, key=key, kind=kind, pages=pages))
        return self.store.submit(job_id, docs, token, source)

    def _wake_workers(self) -> None:
        """The embedded lane worker claims the new item now instead of at its next poll (it clears the event
        before each claim round, so a job submitted while it claims is not missed)."""
        if self.config.wake is not None:
            self.config.wake.set()

    async def post_job(self, request: web.Request) -> web.Response:
        record = await self._submit(request)
        status = await asyncio.to_thread(self.store.status, record)  # before any worker can claim it: queued
        self._wake_workers()
        return web.json_response(status, status=202, headers={"Location": f"/v1/jobs/{record['id']}"})

    async def convert(self, request: web.Request) -> web.StreamResponse:
        fmt = self._format(request)
        timeout = self._number(request, "timeout", self.config.limits.convert_timeout_s)
        timeout = min(timeout, self.config.limits.convert_timeout_s)
        record = await self._submit(request)
        self._wake_workers()
        deadline = time.monotonic() + timeout
        # Completed by this process's workers: woken at once. By another process: found by polling, close
        # together when no worker runs here, every LOCAL_POLL_S at most when one does (its completions wake us;
        # fast polls were 8 reads per job, a third of a convert's, in bench/service.py's throughput run).
        completed = asyncio.Event()
        loop = asyncio.get_running_loop()
        watch = getattr(self.queue, "watch", None)
        unwatch = watch(record["item"], lambda: loop.call_soon_threadsafe(completed.set)) if watch else None
        pause, longest = (LOCAL_POLL_S / 4, LOCAL_POLL_S) if watch and self.config.workers else (0.01, 0.5)
        try:
            while True:
                # Until the job's own item is done, one read of its done flag per poll (the whole status is a
                # dozen reads); the job was queued just now: no status read before its item is done.
                while time.monotonic() < deadline:
                    try:
                        await asyncio.wait_for(completed.wait(), min(pause, max(0.0, deadline - time.monotonic())))
                        completed.clear()
                        break
                    except TimeoutError:
                        pass
                    pause = min(longest, pause * 1.2)
                    if await asyncio.to_thread(self.store.item_done, record):
                        break
                status, results = await asyncio.to_thread(self._report, record)
                if status["state"] in FINISHED or time.monotonic() >= deadline:
                    break
        finally:
            if unwatch is not None:
                unwatch()
        if status["state"] not in FINISHED:
            status["message"] = (f"not finished within {timeout:g} s; the job goes on: poll "
                                 f"/v1/jobs/{record['id']}")
            return web.json_response(status, status=202, headers={"Location": f"/v1/jobs/{record['id']}"})
        if status["state"] == "failed":
            reasons = "; ".join(f"{d['name']}: {d.get('reason', '')}" for d in status["documents"])
            raise ServiceError(422, "conversion_failed", f"job {record['id']} failed: {reasons}")
        return await self._result_response(request, record, status, fmt, results)

    # ---- reading ------------------------------------------------------------------------------------

    def _record(self, request: web.Request) -> dict:
        record = self.store.record(request.match_info["id"])
        if record is None:
            raise ServiceError(404, "job_not_found", f"no job {request.match_info['id']!r} in this workspace")
        return record

    async def _job_rate(self) -> float | None:
        """The workspace's pages per second (for ETAs), read at most every 5 s."""
        read_at, rate = self._rate
        if time.monotonic() - read_at > 5.0:
            try:
                rate = (await asyncio.to_thread(self.queue.page_totals)).rate
            except Exception as exc:  # noqa: BLE001 - an ETA is optional
                logger.debug("no page totals: %s", exc)
                rate = None
            self._rate = (time.monotonic(), rate)
        return rate

    async def get_job(self, request: web.Request) -> web.Response:
        record = await asyncio.to_thread(self._record, request)
        rate = await self._job_rate()
        return web.json_response((await asyncio.to_thread(self._report, record, rate))[0])

    async def list_jobs(self, request: web.Request) -> web.Response:
        limit = int(self._number(request, "limit", 20))
        if not 1 <= limit <= 100:
            raise ServiceError(400, "bad_request", "limit must be between 1 and 100")
        before = request.query.get("before") or None

        def page() -> dict:
            ids = self.store.list_ids(limit + 1, before)
            jobs = [self.store.status(r) for i in ids[:limit] if (r := self.store.record(i)) is not None]
            return {"jobs": jobs, "next": ids[limit - 1] if len(ids) > limit else None}

        return web.json_response(await asyncio.to_thread(page))

    async def delete_job(self, request: web.Request) -> web.Response:
        record = await asyncio.to_thread(self._record, request)
        status = await asyncio.to_thread(self.store.status, record)
        if status["state"] in ("done", "failed"):
            raise ServiceError(409, "job_finished", f"job {record['id']} is {status['state']} already: nothing "
                               "to cancel")
        await asyncio.to_thread(self.store.cancel, record)
        logger.info("job %s cancelled", record["id"])
        return web.json_response(await asyncio.to_thread(self.store.status, record))

    def _format(self, request: web.Request) -> str:
        fmt = request.query.get("format", "markdown")
        if fmt not in FORMATS:
            raise ServiceError(400, "bad_format", f"format {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt

    @staticmethod
    def _number(request: web.Request, name: str, default: float) -> float:
        raw = request.query.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ServiceError(400, "bad_request", f"{name}={raw!r} is not a number") from None
        if value < 0:
            raise ServiceError(400, "bad_request", f"{name} must not be negative")
        return value

    async def get_result(self, request: web.Request) -> web.StreamResponse:
        fmt = self._format(request)
        record = await asyncio.to_thread(self._record, request)
        status, results = await asyncio.to_thread(self._report, record)
        if status["state"] not in FINISHED:
            raise ServiceError(409, "not_finished", f"job {record['id']} is {status['state']} "
                               f"({status['pages_done']}/{status['pages_total']} pages): poll /v1/jobs/{record['id']}")
        return await self._result_response(request, record, status, fmt, results)

    async def _result_response(self, request: web.Request, record: dict, status: dict, fmt: str,
                               results: list[tuple[dict, dict | None]]) -> web.StreamResponse:
        outcomes = {d["name"]: d for d in status["documents"]}
        if fmt == "dolma":
            body = "".join(json.dumps(doc) + "\n" for _, doc in results if doc is not None)
            return web.Response(text=body, content_type="application/x-ndjson")
        if fmt == "markdown" and "text/markdown" in request.headers.get("Accept", ""):
            text = "\n\n".join(doc["text"] for _, doc in results if doc is not None)
            return web.Response(text=text, content_type="text/markdown")
        documents = []
        for entry, doc in results:
            out: dict = {"name": entry["name"], "outcome": outcomes[entry["name"]]["outcome"]}
            if "reason" in outcomes[entry["name"]]:
                out["reason"] = outcomes[entry["name"]]["reason"]
            if fmt == "markdown":
                out["markdown"] = doc["text"] if doc is not None else None
            else:
                out.update(pages_of(doc, entry["pages"]))
            documents.append(out)
        return web.json_response({"id": record["id"], "state": status["state"], "format": fmt,
                                  "documents": documents})

    async def get_page_image(self, request: web.Request) -> web.Response:
        record = await asyncio.to_thread(self._record, request)
        try:
            doc, page = int(request.match_info["doc"]), int(request.match_info["page"])
            entry = record["documents"][doc]
        except (ValueError, IndexError):
            raise ServiceError(404, "not_found", f"job {record['id']} has no document "
                               f"{request.match_info['doc']!r} or page {request.match_info['page']!r}") from None
        data = await asyncio.to_thread(self.storage.read, entry["key"])
        if data is None:
            raise ServiceError(404, "not_found", f"the upload of {entry['name']} is gone from the workspace")
        image, ctype = await asyncio.to_thread(page_image, data, entry["kind"], page)
        return web.Response(body=image, content_type=ctype, headers={"Cache-Control": "private, max-age=3600"})

    # ---- the rest -----------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        from olmocr.service.page import PAGE

        return web.Response(text=PAGE, content_type="text/html")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        workers = self.config.workers
        if workers is not None and workers.done():
            return web.Response(status=503, text="the embedded pipeline workers have stopped; see the log\n")
        try:
            await asyncio.wait_for(asyncio.to_thread(self.storage.list, "service/jobs/"), 10)
        except Exception as exc:  # noqa: BLE001 - the reason is the answer
            return web.Response(status=503, text=f"the workspace cannot be read: {type(exc).__name__}\n")
        return web.Response(text="ok\n")

    async def metrics(self, request: web.Request) -> web.Response:
        return metrics_response(self.registry)

    async def _watch_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._watch_once)
            except Exception as exc:  # noqa: BLE001 - metrics only; try again next time
                logger.warning("could not read the jobs for /metrics: %s", exc)
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _report(self, record: dict, rate: float | None = None) -> tuple[dict, list[tuple[dict, dict | None]]]:
        """``JobStore.report``, noting a finished job as the watcher would (it then skips the job): its final state
        for /metrics, its time in the histogram, its in-flight marker removed. A convert's job is seen finished
        here first; the watcher reading it again was ten reads a job."""
        status, results = self.store.report(record, rate)
        if status["state"] in FINISHED:
            self._seen_finished(record, status["state"])
        return status, results

    def _seen_finished(self, record: dict, state: str) -> None:
        """Called in a thread (the watcher's, or a request's): dict and histogram updates are atomic enough."""
        if self._states.get(record["id"]) in FINISHED:
            return
        self._states[record["id"]] = state
        self.store.forget_in_flight(record)
        started = self._submitted.pop(record["id"], None)
        if started is not None:
            self.job_seconds.observe(max(0.0, time.time() - started))

    def _watch_once(self) -> None:
        """One round of /metrics' view of the jobs. Every ``watch_all_s``: every job (one listing of the records,
        a job read once it is finished: its state is final), and jobs gone (removed by a sweep) leave it. In
        between, every WATCH_INTERVAL_S: only the unfinished ones (a listing of the in-flight markers, and the
        ones this replica saw unfinished), three reads each. A job seen finished loses its in-flight marker.

        Listing every record every 2 s cost one LIST request per 1,000 jobs kept, each round: 500 requests a
        second per replica with a million jobs kept."""
        if time.monotonic() - self._watched_all_at >= self.config.watch_all_s:
            ids = set(self.store.all_ids())
            self._watched_all_at = time.monotonic()
            for gone in self._states.keys() - ids:
                del self._states[gone]
        else:
            ids = set(self.store.unfinished_ids()) | {i for i, state in self._states.items() if state not in FINISHED}
        for job_id in sorted(ids):
            if self._states.get(job_id) in FINISHED:
                continue
            record = self.store.record(job_id)
            if record is None:
                self._states.pop(job_id, None)
                continue
            state = self.store.state(record)
            if state in FINISHED:
                self._seen_finished(record, state)
            else:
                self._states[job_id] = state
        for state in STATES:
            self.jobs_gauge.labels(state).set(sum(1 for s in self._states.values() if s == state))
        counts = self.queue.counts()
        for state in ("pending", "leased", "done"):
            self.queue_gauge.labels(state).set(counts.get(state, 0))


def pages_of(doc: dict | None, pages: int) -> dict:
    """The ``pages`` format of one document: each page's text and front matter, the document's tokens."""
    if doc is None:
        return {"pages": []}
    attrs = doc.get("attributes") or {}
    meta = doc.get("metadata") or {}
    text = doc.get("text", "")
    out = []
    for i, (start, end, number) in enumerate(attrs.get("pdf_page_numbers") or []):
        page = {"page": number, "text": text[start:end].rstrip("\n")}
        for name in ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram"):
            values = attrs.get(name) or []
            page[name] = values[i] if i < len(values) else None
        out.append(page)
    return {"pages": out, "input_tokens": meta.get("total-input-tokens"),
            "output_tokens": meta.get("total-output-tokens"), "fallback_pages": meta.get("total-fallback-pages")}
