"""olmocr-service over real HTTP on loopback: every route and result format, local and moto-S3 workspaces,
50 concurrent clients, kill -9 and restart, two replicas on one workspace, cancel, a --follow pipeline.

The service runs as users run it (``python -m olmocr.service``, its own process group) against the
stand-in vLLM server; its limits and malformed inputs are in tests/test_service_limits.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.pipeline_helpers import REPO_ROOT, SAMPLES, StandIn, page_count, start_pipeline
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import clean_env, free_port, stop_process_group
from tests.waiting import wait_for


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, headers: Mapping[str, str] | None = None, **kwargs: object) -> requests.Response:
        return requests.get(self.url + path, headers={**self.headers(), **(headers or {})}, timeout=30,
                            **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, headers: Mapping[str, str] | None = None, **kwargs: object) -> requests.Response:
        return requests.post(self.url + path, headers={**self.headers(), **(headers or {})}, timeout=300,
                             **kwargs)  # type: ignore[arg-type]

    def submit(self, *docs: Path, path: str = "/v1/jobs", **kwargs: object) -> requests.Response:
        files = [("file", (d.name, d.read_bytes(), "application/pdf")) for d in docs]
        return self.post(path, files=files, **kwargs)

    def wait_state(self, job_id: str, states: tuple[str, ...] = ("done",), timeout: float = 90) -> dict:
        def reached() -> dict | None:
            job = self.get(f"/v1/jobs/{job_id}").json()
            return job if job["state"] in states else None

        try:
            return wait_for(reached, timeout, f"job {job_id} in {states}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.get(f'/v1/jobs/{job_id}').text}\n{self.output()[-3000:]}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(workspace: str | Path, standin: StandIn | None, log: Path, *extra: str,
                  env: Mapping[str, str] | None = None, port: int | None = None,
                  token: str | None = None) -> Service:
    """``python -m olmocr.service`` in its own session, waited for until /healthz answers."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "olmocr.service", str(workspace), "--port", str(port), "--render-processes", "1",
           *(["--vllm-url", standin.url] if standin else ["--workers", "0"]), *extra]
    full_env = clean_env(env)
    full_env.update(env or {})
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=full_env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    service = Service(proc, port, log, token)

    def up() -> bool:
        assert proc.poll() is None, f"the service exited ({proc.returncode}):\n{service.output()[-3000:]}"
        try:
            return requests.get(service.url + "/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(up, 60, "olmocr-service /healthz")
    except BaseException:
        stop_process_group(proc)
        raise
    return service


@contextmanager
def running_service(workspace: str | Path, standin: StandIn | None, log: Path, *extra: str,
                    **kwargs: object) -> Iterator[Service]:
    service = start_service(workspace, standin, log, *extra, **kwargs)  # type: ignore[arg-type]
    try:
        yield service
    finally:
        stop_process_group(service.proc)


def one_page_pdfs(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [write_text_pdf(directory / f"doc-{i:02d}.pdf", [f"Document number {i} of the batch."])
            for i in range(count)]


# ---- round trips ----------------------------------------------------------------------------------------


def test_round_trip_every_route_and_format(workspace: str, standin: StandIn, tmp_path: Path) -> None:
    """Submit two documents, poll, read Markdown, Dolma and per-page JSON, list, convert, metrics."""
    root = tmp_path / "client-root"
    root.mkdir()
    named = root / "named.pdf"
    named.write_bytes(SAMPLES.report.read_bytes())
    with running_service(workspace, standin, tmp_path / "service.log", "--root", str(root)) as svc:
        docs = [SAMPLES.letter, SAMPLES.guide]
        r = svc.submit(*docs)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] == "queued" and r.headers["Location"] == f"/v1/jobs/{job['id']}"
        assert job["pages_total"] == sum(page_count(d) for d in docs)
        done = svc.wait_state(job["id"])
        assert done["pages_done"] == done["pages_total"] and done["eta_seconds"] == 0
        assert [d["outcome"] for d in done["documents"]] == ["done", "done"]

        markdown = svc.get(f"/v1/jobs/{job['id']}/result").json()
        dolma = [json.loads(line) for line in svc.get(f"/v1/jobs/{job['id']}/result?format=dolma").text.splitlines()]
        pages = svc.get(f"/v1/jobs/{job['id']}/result?format=pages").json()
        assert [d["name"] for d in markdown["documents"]] == ["letter.pdf", "guide.pdf"]
        assert len(dolma) == 2
        by_source = {Path(d["metadata"]["Source-File"]).name.split("-", 1)[1]: d for d in dolma}
        for md, pg in zip(markdown["documents"], pages["documents"], strict=True):
            doc = by_source[md["name"]]
            assert md["markdown"] == doc["text"] and md["markdown"].startswith("Stand-in OCR")
            assert [p["page"] for p in pg["pages"]] == list(range(1, doc["metadata"]["pdf-total-pages"] + 1))
            assert "\n".join(p["text"] for p in pg["pages"]) == doc["text"]
            assert pg["input_tokens"] == doc["metadata"]["total-input-tokens"] and pg["fallback_pages"] == 0
            assert set(pg["pages"][0]) >= {"primary_language", "is_rotation_valid", "rotation_correction",
                                           "is_table", "is_diagram"}
        raw = svc.get(f"/v1/jobs/{job['id']}/result", headers={"Accept": "text/markdown"})
        assert raw.headers["Content-Type"].startswith("text/markdown") and raw.text.startswith("Stand-in OCR")

        # A path under --root, as JSON; then convert (sync) with an upload.
        r = svc.post("/v1/jobs", json={"paths": [str(named)]})
        assert r.status_code == 202, r.text
        by_path = svc.wait_state(r.json()["id"])
        assert by_path["documents"][0]["name"] == str(named)
        r = svc.submit(SAMPLES.earnings, path="/v1/convert?format=markdown")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "done" and r.json()["documents"][0]["markdown"].startswith("Stand-in OCR")
        # Idle embedded workers are woken by a new job: no wait for their next poll of the queue (10 s).
        for _ in range(2):
            started = time.monotonic()
            assert svc.submit(SAMPLES.earnings, path="/v1/convert").status_code == 200
            assert time.monotonic() - started < 5

        listing = svc.get("/v1/jobs?limit=2").json()
        assert len(listing["jobs"]) == 2 and listing["next"]
        rest = svc.get(f"/v1/jobs?limit=3&before={listing['next']}").json()
        ids = [j["id"] for j in listing["jobs"] + rest["jobs"]]
        assert job["id"] in ids and ids == sorted(ids, reverse=True) and len(set(ids)) == 5 and rest["next"] is None

        assert svc.get("/healthz").text == "ok\n" and svc.get("/readyz").status_code == 200
        assert svc.get("/openapi.json").json()["openapi"].startswith("3.")

        def metrics_caught_up() -> str | None:
            text = svc.get("/metrics").text
            wanted = ('olmocr_service_jobs{state="done"} 5.0', "olmocr_service_job_seconds_count 5.0",
                      'olmocr_service_queue_items{state="done"} 5.0')  # one refresh sets them one after another
            return text if all(w in text for w in wanted) else None

        wait_for(metrics_caught_up, 20, "5 done jobs, their times and the queue's 5 done items in /metrics")


def test_openapi_document_is_valid_and_names_every_route(tmp_path: Path) -> None:
    """The document passes a real OpenAPI validator, and its paths and methods are the app's routes."""
    from openapi_spec_validator import validate

    from olmocr.pipeline.workspace.queue import WorkQueue
    from olmocr.pipeline.workspace.storage import LocalStorage
    from olmocr.service import openapi
    from olmocr.service.app import Service as App
    from olmocr.service.app import ServiceConfig

    document = openapi.document()
    validate(document)
    storage = LocalStorage(tmp_path / "ws")
    app = App(storage, WorkQueue(storage), ServiceConfig()).app()
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()  # type: ignore[union-attr]
              if r.method != "HEAD"}
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routes == documented


def test_fifty_concurrent_clients(standin: StandIn, tmp_path: Path) -> None:
    """50 clients convert 50 different one-page documents at once: each gets its own document's result."""
    docs = one_page_pdfs(tmp_path / "docs", 50)
    env = {"OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT": "100"}
    with running_service(tmp_path / "ws", standin, tmp_path / "service.log", "--workers", "8", env=env) as svc:
        def client(doc: Path) -> tuple[Path, requests.Response]:
            return doc, svc.submit(doc, path="/v1/convert?format=dolma&timeout=240")

        started = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(client, docs))
        elapsed = time.monotonic() - started
        texts = set()
        for doc, r in answers:
            assert r.status_code == 200, f"{doc.name}: {r.status_code} {r.text}"
            (line,) = r.text.splitlines()
            result = json.loads(line)
            assert result["metadata"]["Source-File"].endswith(f"-{doc.name}"), (doc.name, result["metadata"])
            texts.add(result["text"])
        assert len(texts) == 50  # every page image differs, so every answer does
        print(f"50 concurrent one-page conversions in {elapsed:.1f}s")


# ---- durability -----------------------------------------------------------------------------------------


def test_killed_mid_job_then_restarted_the_job_finishes(workspace: str, standin: StandIn, tmp_path: Path) -> None:
    """kill -9 while a job's pages are at the server; a new service on the same workspace finishes it."""
    standin.control(latency=1.0, concurrency=1)
    log = tmp_path / "service.log"
    svc = start_service(workspace, standin, log, "--lease-seconds", "4")
    try:
        job = svc.submit(SAMPLES.manual).json()  # 6 pages, ~6 s at the stand-in
        svc.wait_state(job["id"], ("running",), timeout=30)
        time.sleep(1.5)
    finally:
        os.killpg(svc.proc.pid, signal.SIGKILL)
        stop_process_group(svc.proc)
    standin.control(latency=0.0, concurrency=0)
    with running_service(workspace, standin, log, "--lease-seconds", "4", port=svc.port) as again:
        done = again.wait_state(job["id"], timeout=90)
        assert done["pages_done"] == 6
        pages = again.get(f"/v1/jobs/{job['id']}/result?format=pages").json()
        assert [p["page"] for p in pages["documents"][0]["pages"]] == [1, 2, 3, 4, 5, 6]


def test_two_replicas_share_one_workspace(workspace: str, standin: StandIn, tmp_path: Path) -> None:
    """A job submitted to one replica is seen, listed, done and fetched through the other."""
    ws = workspace
    with running_service(ws, standin, tmp_path / "a.log") as a, running_service(ws, None, tmp_path / "b.log") as b:
        job = b.submit(SAMPLES.guide).json()
        assert job["id"] in [j["id"] for j in a.get("/v1/jobs").json()["jobs"]]
        done = a.wait_state(job["id"])
        assert b.get(f"/v1/jobs/{job['id']}").json() == done
        assert a.get(f"/v1/jobs/{job['id']}/result").json() == b.get(f"/v1/jobs/{job['id']}/result").json()
        assert "claimed work item" in a.output() and "claimed work item" not in b.output()


def test_cancel_drops_work_not_started(tmp_path: Path, standin: StandIn) -> None:
    """A cancelled job's item is never worked: a --follow pipeline started afterwards leaves it alone and
    does the next job, submitted while it runs."""
    ws = tmp_path / "ws"
    with running_service(ws, None, tmp_path / "service.log") as svc:
        job = svc.submit(SAMPLES.letter, SAMPLES.report).json()
        r = requests.delete(f"{svc.url}/v1/jobs/{job['id']}", timeout=30)
        assert r.status_code == 200, r.text
        cancelled = r.json()
        assert cancelled["state"] == "cancelled"
        assert [d["outcome"] for d in cancelled["documents"]] == ["cancelled", "cancelled"]
        result = svc.get(f"/v1/jobs/{job['id']}/result").json()
        assert [d["markdown"] for d in result["documents"]] == [None, None]
        plog = tmp_path / "pipeline.log"
        follower = start_pipeline(ws, standin.url, (), "--follow", "--workers", "2", log=plog)
        try:
            wait_for(lambda: "is ready and serves" in plog.read_text(), 60, "the --follow pipeline ready")
            time.sleep(2)  # its workers found nothing to claim: they wait for new items
            assert follower.poll() is None, plog.read_text()
            later = svc.submit(SAMPLES.guide).json()
            svc.wait_state(later["id"], timeout=60)
            assert svc.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
            assert follower.poll() is None, "the --follow pipeline exited"
            assert plog.read_text().count("claimed work item") == 1, plog.read_text()
        finally:
            stop_process_group(follower)
        assert requests.delete(f"{svc.url}/v1/jobs/{later['id']}", timeout=30).json()["error"]["code"] == "job_finished"


# ---- failures -------------------------------------------------------------------------------------------


def test_a_failed_document_reports_its_reason(standin: StandIn, tmp_path: Path) -> None:
    """A document the pipeline cannot convert: the job is failed with the document's reason; convert says
    so with 422; a good document beside it is done."""
    from tests.sample_docs import bad_inputs

    huge = tmp_path / "huge.pdf"
    huge.write_bytes(bad_inputs(SAMPLES.letter)["huge.pdf"][0])
    with running_service(tmp_path / "ws", standin, tmp_path / "service.log") as svc:
        r = svc.submit(huge, path="/v1/convert")
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "conversion_failed" and "enormous page" in r.json()["error"]["message"]
        job = svc.submit(huge, SAMPLES.letter).json()
        done = svc.wait_state(job["id"], ("done", "failed"))
        assert done["state"] == "done"  # one of its documents is
        outcomes = {d["name"]: (d["outcome"], d.get("reason", "")) for d in done["documents"]}
        assert outcomes["letter.pdf"] == ("done", "")
        assert outcomes["huge.pdf"][0] == "failed" and "enormous page" in outcomes["huge.pdf"][1]
        result = svc.get(f"/v1/jobs/{job['id']}/result").json()["documents"]
        assert result[0]["markdown"] is None and "enormous page" in result[0]["reason"]
        assert result[1]["markdown"].startswith("Stand-in OCR")


def test_a_document_named_like_a_tarball_is_converted_as_what_its_content_is(standin: StandIn,
                                                                             tmp_path: Path) -> None:
    """The pipeline takes a name ending in .tar.gz for a tarball: an upload is stored under a name ending as its
    content's kind, so a PDF called ``scan.tar.gz`` (beside a true one) is converted as a PDF."""
    named = tmp_path / "scan.tar.gz"
    named.write_bytes(SAMPLES.letter.read_bytes())
    with running_service(tmp_path / "ws", standin, tmp_path / "service.log") as svc:
        r = svc.submit(named, SAMPLES.letter, path="/v1/convert?timeout=60")
        assert r.status_code == 200, r.text
        assert [(d["name"], d["outcome"]) for d in r.json()["documents"]] == [("scan.tar.gz", "done"),
                                                                              ("letter.pdf", "done")]
        assert r.json()["documents"][0]["markdown"].startswith("Stand-in OCR")
    uploads = sorted(p.name for p in (tmp_path / "ws" / "service" / "uploads").rglob("*") if p.is_file())
    assert uploads == ["0-scan.tar.gz.pdf", "1-letter.pdf"], uploads


def test_a_retryable_failure_is_retried_and_the_job_finishes(standin: StandIn, tmp_path: Path) -> None:
    """The server answers garbage: the document fails (retryable); the job stays running, follows the
    queue's retry item, and is done once the server answers well."""
    standin.control(answer="garbage")
    ws = tmp_path / "ws"
    with running_service(ws, standin, tmp_path / "service.log") as svc:
        job = svc.submit(SAMPLES.letter).json()
        wait_for(lambda: list((ws / "failed").glob("failed_*.jsonl")), 120, "the first attempt's failure record")
        assert svc.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
        standin.control(answer="ok")
        done = svc.wait_state(job["id"], timeout=120)
        assert [d["outcome"] for d in done["documents"]] == ["done"]
        assert svc.get(f"/v1/jobs/{job['id']}/result").json()["documents"][0]["markdown"].startswith("Stand-in")
