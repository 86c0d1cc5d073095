"""olmocr-service's limits and malformed inputs: each gets its own status, code and one-line message as JSON,
no traceback, and leaves nothing in the workspace; good jobs around them are kept. Over real HTTP on
loopback, with a bearer token and deliberately small limits."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from urllib3 import encode_multipart_formdata

from olmocr.pipeline.workspace.queue import PRIORITY_INDEX_KEY, decode_index
from olmocr.pipeline.workspace.storage import LocalStorage
from tests.pipeline_helpers import REPO_ROOT, SAMPLES
from tests.sample_docs import bad_inputs
from tests.standin_helpers import clean_env, free_port
from tests.test_service import running_service

TOKEN = "s3cret-token-for-tests"
LIMITS = {"OLMOCR_SERVICE_MAX_UPLOAD_MB": "0.25", "OLMOCR_SERVICE_MAX_PAGES": "3",
          "OLMOCR_SERVICE_MAX_DOCUMENTS": "2", "OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT": "1"}


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def refused(r: requests.Response, status: int, code: str, words: str = "") -> dict:
    """The answer is ``status`` with a JSON error of ``code`` whose one-line message holds ``words``."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert error["code"] == code, error
    assert words in error["message"] and "\n" not in error["message"] and "Traceback" not in r.text, error
    return error


def test_every_limit_and_malformed_input_has_its_own_answer(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside.pdf").write_bytes(SAMPLES.letter.read_bytes())
    secret = tmp_path / "secret.pdf"
    secret.write_bytes(SAMPLES.letter.read_bytes())
    (root / "link.pdf").symlink_to(secret)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with running_service(ws, None, tmp_path / "service.log", "--token-file", str(token_file), "--root", str(root),
                         env=LIMITS, token=TOKEN) as svc:
        url = svc.url
        auth = svc.headers()

        def upload(*files: tuple[str, bytes], ctype: str = "application/pdf") -> requests.Response:
            return requests.post(f"{url}/v1/jobs", headers=auth, timeout=60,
                                 files=[("file", (name, data, ctype)) for name, data in files])

        def paths(*named: str) -> requests.Response:
            return requests.post(f"{url}/v1/jobs", headers=auth, json={"paths": list(named)}, timeout=60)

        # The token: missing, wrong; the probes stay open.
        refused(requests.get(f"{url}/v1/jobs", timeout=10), 401, "missing_token", "Authorization: Bearer")
        refused(requests.post(f"{url}/v1/jobs", headers={"Authorization": "Bearer nope"}, timeout=10,
                              files=[("file", ("a.pdf", SAMPLES.letter.read_bytes()))]), 401, "wrong_token")
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200

        # Documents: empty, not a document, damaged, locked, too many pages, too many, too large.
        bad = bad_inputs(SAMPLES.letter)
        refused(upload(("empty.pdf", b"")), 422, "empty_file", "empty.pdf is empty")
        refused(upload(("notes.pdf", bad["notes.pdf"][0])), 415, "unsupported_type", "not a PDF, PNG, JPEG or TIFF")
        refused(upload(("corrupt.pdf", bad["corrupt.pdf"][0])), 422, "bad_pdf", "corrupt.pdf cannot be opened")
        refused(upload(("locked.pdf", bad["locked.pdf"][0])), 422, "bad_pdf", "locked.pdf")
        refused(upload(("paper.pdf", SAMPLES.paper.read_bytes())), 422, "too_many_pages", "5 pages")
        three = [(f"d{i}.pdf", SAMPLES.letter.read_bytes()) for i in range(3)]
        refused(upload(*three), 422, "too_many_documents", "3 documents")
        big = SAMPLES.letter.read_bytes() + b"\n%" + b"x" * 300_000
        refused(upload(("big.pdf", big)), 413, "upload_too_large", "OLMOCR_SERVICE_MAX_UPLOAD_MB")
        body, ctype = encode_multipart_formdata([("file", ("big.pdf", big, "application/pdf"))])
        chunked = requests.post(f"{url}/v1/jobs", headers={**auth, "Content-Type": ctype}, timeout=60,
                                data=(body[i:i + 65536] for i in range(0, len(body), 65536)))  # no Content-Length
        refused(chunked, 413, "upload_too_large")
        # A huge streamed body is refused as it arrives: the service never holds it (its peak memory stays).
        peak = peak_rss(svc.proc.pid)
        block = b"%" + b"x" * 65535
        huge = requests.post(f"{url}/v1/jobs", headers={**auth, "Content-Type": ctype}, timeout=120,
                             data=(body[:512] if i == 0 else block for i in range(3200)))  # 200 MiB
        refused(huge, 413, "upload_too_large")
        assert peak_rss(svc.proc.pid) - peak < 64 * 2**20, "the service read the whole body into memory"

        # The request itself: wrong content type, bad JSON, no documents.
        refused(requests.post(f"{url}/v1/jobs", headers={**auth, "Content-Type": "text/plain"}, data=b"hello",
                              timeout=10), 415, "unsupported_content_type", "multipart/form-data")
        refused(requests.post(f"{url}/v1/jobs", headers={**auth, "Content-Type": "application/json"},
                              data=b"{not json", timeout=10), 400, "bad_json")
        refused(requests.post(f"{url}/v1/jobs", headers=auth, json={"files": []}, timeout=10), 400, "bad_request")
        refused(paths(), 422, "no_documents")

        # Paths: confined to --root.
        refused(paths("../secret.pdf"), 403, "path_not_allowed", "'..'")
        refused(paths(f"{root}/../secret.pdf"), 403, "path_not_allowed", "'..'")
        refused(paths(str(secret)), 403, "path_not_allowed", "outside the configured roots")
        refused(paths(str(root / "link.pdf")), 403, "path_not_allowed", "symbolic links")
        refused(paths(f"file://{root}/inside.pdf"), 403, "path_not_allowed", "file:// URLs are not accepted")
        refused(paths("s3://elsewhere/doc.pdf"), 403, "path_not_allowed", "not under a configured root")
        refused(paths("http://example.com/doc.pdf"), 403, "path_not_allowed")
        refused(paths(str(root / "missing.pdf")), 404, "not_found")
        refused(paths(7), 400, "bad_request")  # type: ignore[arg-type]

        # One good job, named by a path relative to the root; then the in-flight limit.
        good = paths("inside.pdf")
        assert good.status_code == 202, good.text
        job = good.json()["id"]
        limited = upload(("letter.pdf", SAMPLES.letter.read_bytes()))
        refused(limited, 429, "too_many_jobs", "retry after 5 s")
        assert limited.headers["Retry-After"] == "5"

        # Reading: unknown job, bad id, bad format, not finished, unknown route, wrong method.
        refused(requests.get(f"{url}/v1/jobs/{'0' * 24}", headers=auth, timeout=10), 404, "job_not_found")
        refused(requests.get(f"{url}/v1/jobs/../../etc", headers=auth, timeout=10), 404, "not_found")
        refused(requests.get(f"{url}/v1/jobs/{job}/result?format=pdf", headers=auth, timeout=10), 400, "bad_format")
        refused(requests.get(f"{url}/v1/jobs/{job}/result", headers=auth, timeout=10), 409, "not_finished")
        refused(requests.get(f"{url}/v1/nothing", headers=auth, timeout=10), 404, "not_found")
        refused(requests.put(f"{url}/v1/jobs", headers=auth, timeout=10), 405, "method_not_allowed")
        refused(requests.get(f"{url}/v1/jobs?limit=1000", headers=auth, timeout=10), 400, "bad_request")

        # Cancelling frees the slot; the next good job is taken.
        assert requests.delete(f"{url}/v1/jobs/{job}", headers=auth, timeout=10).json()["state"] == "cancelled"
        second = upload(("letter.pdf", SAMPLES.letter.read_bytes()))
        assert second.status_code == 202, second.text

    # Nothing half-written: exactly the two accepted jobs, their uploads, their two work items.
    storage = LocalStorage(ws)
    records = sorted(k for k in storage.list("service/jobs/"))
    assert [k.rsplit("/", 1)[-1] for k in records] == sorted([f"{job}.json", f"{second.json()['id']}.json"])
    assert {k.split("/")[2] for k in storage.list("service/uploads/")} == {job, second.json()["id"]}
    lane = decode_index(storage.read(PRIORITY_INDEX_KEY) or b"")  # the jobs' items: the priority lane
    assert len(lane) == 2
    records_json = [json.loads(storage.read(k) or b"") for k in records]
    assert {r["item"] for r in records_json} == set(lane)


def test_beyond_loopback_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "olmocr.service", str(tmp_path / "ws"), "--host", "0.0.0.0",
                           "--workers", "0"], env=clean_env(), cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "OLMOCR_SERVICE_TOKEN" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_concurrent_submits_never_pass_the_in_flight_limit_together(tmp_path: Path) -> None:
    """16 submits at once to one replica with 3 slots: 3 are taken, 13 get 429, and 3 markers exist."""
    body = SAMPLES.guide.read_bytes()
    with running_service(tmp_path / "ws", None, tmp_path / "service.log",
                         env={"OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT": "3"}) as svc:  # no workers: jobs stay queued
        start = threading.Barrier(16)

        def submit(n: int) -> int:
            start.wait()
            return svc.post("/v1/jobs", files=[("file", (f"doc-{n}.pdf", body, "application/pdf"))]).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = sorted(pool.map(submit, range(16)))
        assert codes == [202] * 3 + [429] * 13, codes
        assert len(svc.get("/v1/jobs").json()["jobs"]) == 3
    assert len(LocalStorage(tmp_path / "ws").list("service/inflight/")) == 3


class SlowStorage(LocalStorage):
    """A local workspace whose in-flight listing answers late (a slow S3 LIST: the listing is taken, then the
    answer takes 1 s) and whose upload writes take 0.5 s (a slow PUT)."""

    def list(self, prefix: str) -> list[str]:
        keys = super().list(prefix)
        if prefix.startswith("service/inflight/"):
            time.sleep(1.0)
        return keys

    def write(self, key: str, data: bytes) -> None:
        if key.startswith("service/uploads/"):
            time.sleep(0.5)
        super().write(key, data)


def test_a_check_never_misses_a_submit_that_finished_during_its_listing(tmp_path: Path) -> None:
    """One slot. A is admitted (t = 1 s) and writes its upload, then its marker (t = 1.5 s). B's listing is taken
    at t = 1.2 s, before A's marker, and answers at t = 2.2 s. B must still count A (its reservation is
    given back only under the lock B holds): A is taken, B gets 429."""
    from aiohttp import web

    from olmocr.pipeline.workspace.queue import WorkQueue
    from olmocr.service.app import Service as App
    from olmocr.service.app import ServiceConfig
    from olmocr.service.intake import Limits

    storage = SlowStorage(tmp_path / "ws")
    app = App(storage, WorkQueue(storage), ServiceConfig(limits=Limits(max_jobs_in_flight=1))).app()
    body = SAMPLES.letter.read_bytes()

    async def run() -> list[int]:
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            def submit(delay: float) -> int:
                time.sleep(delay)
                return requests.post(f"http://127.0.0.1:{port}/v1/jobs", timeout=30,
                                     files=[("file", ("a.pdf", body, "application/pdf"))]).status_code

            return list(await asyncio.gather(asyncio.to_thread(submit, 0.0), asyncio.to_thread(submit, 1.2)))
        finally:
            await runner.cleanup()

    assert asyncio.run(run()) == [202, 429]
    assert len(storage.list("service/inflight/")) == 1
