"""``bench/run service`` (``python -m bench service``): olmocr-service (issue 32) against the stand-in.

Three measurements, each against a comparison taken in the same run:

* **overhead**: a one-page PDF through ``POST /v1/convert`` against an instant stand-in, against the same
  page (rendered once, as the pipeline renders it) sent straight to the stand-in. The service path is
  what the service adds on top of the server: the upload, the job record and work item in a local
  workspace, the claim, rendering the page, writing the results, and reading them back. Also ``POST
  /v1/jobs`` alone (the submit) and ``GET /v1/jobs/{id}`` (a status read), in a workspace whose main index
  holds 100,000 queued documents (quick: 10,000): neither reads that index.
* **throughput**: 50 clients converting 10 different one-page documents each (quick: 10 x 5), against the
  batch pipeline on the same documents and the same stand-in. Every result must name its own document.
  Twice: against an instant stand-in, where this machine's two cores are the limit and the figure is the
  service's CPU per page against the batch's; and against a stand-in that answers like a small GPU fleet
  (:data:`FLEET`: 8 pages at a time, 0.25 s each, 32 pages/s, about 7 H100s of olmOCR-2 at 4.53 pages/s),
  where the server is the limit, as it is where the service runs.
* **interactive during a batch**: a one-page job's convert time while a batch of 10,000 pages (quick:
  2,000) in 500-page items runs on the same service's workers and a stand-in that serves 4 requests at a
  time, 50 ms each, by priority, against the same job on the idle service (``--priority 0``: the job's
  pages go with -10). The batch need not finish.

    .venv/bin/python -m bench.service [--quick]     # prints the figures as JSON
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from bench.common import Figure, log
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import chat_payload, clean_env, free_port, start_standin, stop_process_group, wait_http_ok

SECTION = "service"
#: The stand-in of the server-bound throughput run: it answers 8 requests at a time, 0.25 s each.
FLEET = {"OLMOCR_STANDIN_LATENCY": "0.25", "OLMOCR_STANDIN_CONCURRENCY": "8"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children (Linux /proc; 0.0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


class _Run:
    """A stand-in and a service on a fresh workspace, stopped on exit."""

    def __init__(self, root: Path, name: str, *, workers: int, standin_env: dict[str, str] | None = None,
                 standin_args: tuple[str, ...] = (), service_args: tuple[str, ...] = ()) -> None:
        from tests.standin_helpers import VLLM_FLAGS

        self.root, self.ws = root, root / f"{name}-ws"
        self.sport, self.port = free_port(), free_port()
        self.standin = start_standin(self.sport, log_path=root / f"{name}-standin.log", env=standin_env or {},
                                     extra_args=(*VLLM_FLAGS, *standin_args))
        self.service: subprocess.Popen[bytes] | None = None
        self.workers, self.service_args, self.name = workers, service_args, name

    def __enter__(self) -> _Run:
        try:
            wait_http_ok(f"{self.standin_url}/health", timeout=30, proc=self.standin)
        except BaseException:
            stop_process_group(self.standin)
            raise
        return self

    def start_service(self) -> None:
        with open(self.root / f"{self.name}-service.log", "ab") as out:
            self.service = subprocess.Popen(
                [sys.executable, "-m", "olmocr.service", str(self.ws), "--vllm-url", self.standin_url, "--port",
                 str(self.port), "--workers", str(self.workers), *self.service_args],
                env={**clean_env(), "OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT": "1000"}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        wait_http_ok(f"{self.url}/readyz", timeout=60, proc=self.service)

    def __exit__(self, *exc: object) -> None:
        if self.service is not None:
            stop_process_group(self.service)
        stop_process_group(self.standin)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def standin_url(self) -> str:
        return f"http://127.0.0.1:{self.sport}"


def _big_index(ws: Path, documents: int) -> None:
    """A main index of ``documents`` queued one-document items, written directly (never claimed: the
    service runs no workers in that run)."""
    from olmocr.pipeline.workspace.queue import INDEX_KEY, encode_index, group_hash

    ws.mkdir(parents=True, exist_ok=True)
    groups = {group_hash([p]): (p,) for p in (f"/data/batch/{i:07d}.pdf" for i in range(documents))}
    (ws / INDEX_KEY).write_bytes(encode_index(groups))


def overhead(root: Path, rounds: int, index_docs: int) -> dict[str, Any]:
    pdf = write_text_pdf(root / "one.pdf", ["A one-page document for the service benchmark."])
    out: dict[str, Any] = {"rounds": rounds}
    with _Run(root, "overhead", workers=4) as run:
        run.start_service()
        from olmocr.service.intake import page_image

        image, _ = page_image(pdf.read_bytes(), "pdf", 1, longest=1288)
        payload = chat_payload(image)
        session = requests.Session()
        direct, converted = [], []
        for _ in range(3):  # warm both paths
            session.post(f"{run.standin_url}/v1/chat/completions", json=payload, timeout=60)
            session.post(f"{run.url}/v1/convert", files=[("file", ("one.pdf", pdf.read_bytes()))])
        for _ in range(rounds):
            started = time.perf_counter()
            r = session.post(f"{run.standin_url}/v1/chat/completions", json=payload, timeout=60)
            direct.append(time.perf_counter() - started)
            r.raise_for_status()
            started = time.perf_counter()
            r = session.post(f"{run.url}/v1/convert", files=[("file", ("one.pdf", pdf.read_bytes()))], timeout=120)
            converted.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
        out["direct"], out["convert"] = percentiles(direct), percentiles(converted)
    # Submit and status alone, in a workspace whose main index is big (no workers: the jobs stay queued).
    with _Run(root, "submit", workers=0) as run:
        _big_index(run.ws, index_docs)
        run.start_service()
        session = requests.Session()
        submits, reads = [], []
        ids = []
        for i in range(rounds + 3):
            started = time.perf_counter()
            r = session.post(f"{run.url}/v1/jobs", files=[("file", ("one.pdf", pdf.read_bytes()))], timeout=60)
            elapsed = time.perf_counter() - started
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            if i >= 3:
                submits.append(elapsed)
        for job_id in ids[3:]:
            started = time.perf_counter()
            r = session.get(f"{run.url}/v1/jobs/{job_id}", timeout=60)
            reads.append(time.perf_counter() - started)
            assert r.status_code == 200 and r.json()["state"] == "queued", r.text
        out["submit"], out["status"], out["index_documents"] = percentiles(submits), percentiles(reads), index_docs
    out["overhead_p50_ms"] = out["convert"]["p50_ms"] - out["direct"]["p50_ms"]
    out["overhead_p99_ms"] = out["convert"]["p99_ms"] - out["direct"]["p99_ms"]
    return out


def throughput(root: Path, clients: int, docs: int, workers: int, standin_env: dict[str, str] | None = None,
               name: str = "throughput") -> dict[str, Any]:
    """Pages per second: ``clients`` clients converting ``docs`` documents each through the service, then the
    batch pipeline on the same documents in a fresh workspace. Every result must name its own document."""
    folder = root / f"{name}-docs"
    folder.mkdir()
    paths = [write_text_pdf(folder / f"d{i:04d}.pdf", [f"Document {i} of the throughput run."])
             for i in range(clients * docs)]
    with _Run(root, name, workers=workers, standin_env=standin_env) as run:
        run.start_service()

        def client(mine: list[Path]) -> int:
            session = requests.Session()
            for path in mine:
                r = session.post(f"{run.url}/v1/convert?format=dolma&timeout=600",
                                 files=[("file", (path.name, path.read_bytes()))], timeout=900)
                assert r.status_code == 200, r.text
                source = json.loads(r.text.splitlines()[0])["metadata"]["Source-File"]
                assert source.endswith("-" + path.name), (source, path.name)
            return len(mine)

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = sum(pool.map(client, [paths[i::clients] for i in range(clients)]))
        service_s = time.perf_counter() - started
        # CPU seconds say what wall time on a shared machine cannot: the service's own cost per page (its
        # process and its render workers, from start-up), against the batch pipeline's (the whole run).
        service_cpu = cpu_seconds(run.service.pid) if run.service is not None else 0.0
        if run.service is not None:
            stop_process_group(run.service)
            run.service = None
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(root / f"{name}-batch-ws"), "--vllm-url",
                        run.standin_url, "--pdfs", str(folder / "*.pdf")], env=clean_env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        batch_s = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        batch_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"documents": done, "clients": clients, "workers": workers, "service_s": service_s, "batch_s": batch_s,
            "service_pages_per_s": done / service_s, "batch_pages_per_s": done / batch_s, "ratio": batch_s / service_s,
            "service_cpu_ms_per_page": 1000 * service_cpu / done, "batch_cpu_ms_per_page": 1000 * batch_cpu / done}


def interactive(root: Path, batch_pages: int, jobs: int) -> dict[str, Any]:
    """A one-page job's convert time on the idle service, then while a batch of ``batch_pages`` pages runs."""
    from olmocr.pipeline.workspace.queue import WorkQueue
    from olmocr.pipeline.workspace.storage import LocalStorage

    pdf = write_text_pdf(root / "job.pdf", ["An interactive one-page document."])
    book = write_text_pdf(root / "book.pdf", 500)
    folder = root / "batch"
    folder.mkdir()
    items = max(1, batch_pages // 500)
    copies = []
    for i in range(items):
        copies.append(folder / f"book{i:03d}.pdf")
        shutil.copyfile(book, copies[-1])

    def convert_times(url: str, n: int) -> list[float]:
        session = requests.Session()
        times = []
        for _ in range(n):
            started = time.perf_counter()
            r = session.post(f"{url}/v1/convert", files=[("file", ("job.pdf", pdf.read_bytes()))], timeout=300)
            times.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
        return times

    env = {"OLMOCR_STANDIN_LATENCY": "0.1", "OLMOCR_STANDIN_CONCURRENCY": "2"}
    with _Run(root, "interactive", workers=4, standin_env=env, standin_args=("--scheduling-policy", "priority"),
              service_args=("--priority", "0")) as run:
        run.start_service()
        convert_times(run.url, 2)  # warm
        idle = convert_times(run.url, jobs)
        WorkQueue(LocalStorage(str(run.ws))).populate([str(c) for c in copies], 500, lambda p: 500)
        info = f"{run.standin_url}/admin/info"
        # The batch under way: its pages are being answered.
        deadline = time.monotonic() + 120
        while requests.get(info, timeout=5).json().get("priorities", {}).get("0", 0) < 50:
            assert time.monotonic() < deadline, "the batch did not start"
            time.sleep(0.5)
        busy = convert_times(run.url, jobs)
        batch_answered = requests.get(info, timeout=5).json().get("priorities", {}).get("0", 0)
    idle_ms, busy_ms = 1000 * statistics.median(idle), 1000 * statistics.median(busy)
    return {"batch_pages": items * 500, "jobs": jobs, "idle_p50_ms": idle_ms, "busy_p50_ms": busy_ms,
            "busy_max_ms": 1000 * max(busy), "ratio": busy_ms / idle_ms, "batch_pages_answered": batch_answered}


def run(quick: bool = False) -> tuple[list[Figure], dict[str, Any]]:
    detail: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="olmocr-bench-service-") as tmp:
        root = Path(tmp)
        log("service: overhead of one convert, submit and status")
        detail["overhead"] = o = overhead(root, 30 if quick else 100, 10_000 if quick else 100_000)
        log("service: throughput against the batch pipeline")
        detail["throughput"] = t = throughput(root, 10 if quick else 50, 5 if quick else 10, 20)
        log("service: throughput against the batch pipeline, server-bound")
        detail["throughput_fleet"] = f = throughput(root, 10 if quick else 50, 5 if quick else 10, 20, FLEET,
                                                    "fleet")
        log("service: a one-page job during a batch")
        detail["interactive"] = i = interactive(root, 2_000 if quick else 10_000, 5 if quick else 10)
    figs = [
        Figure(SECTION, "POST /v1/convert overhead, one page (p50)", o["overhead_p50_ms"], "ms",
               "the page straight to the stand-in", context=f"convert p50 {o['convert']['p50_ms']:.0f} ms, p99 "
               f"{o['convert']['p99_ms']:.0f} ms; direct p50 {o['direct']['p50_ms']:.1f} ms; {o['rounds']} rounds",
               target="<= 50 ms", ok=o["overhead_p50_ms"] <= 50),
        Figure(SECTION, "POST /v1/convert overhead, one page (p99)", o["overhead_p99_ms"], "ms",
               "the page straight to the stand-in"),
        Figure(SECTION, f"POST /v1/jobs (submit), {o['index_documents']:,} documents queued (p50)",
               o["submit"]["p50_ms"], "ms", "", context=f"p99 {o['submit']['p99_ms']:.0f} ms"),
        Figure(SECTION, f"GET /v1/jobs/ID (status), {o['index_documents']:,} documents queued (p50)",
               o["status"]["p50_ms"], "ms", "", context=f"p99 {o['status']['p99_ms']:.0f} ms"),
        Figure(SECTION, f"throughput, {t['clients']} clients x {t['documents'] // t['clients']} one-page documents",
               t["service_pages_per_s"], "pages/s", "the batch pipeline on the same documents", ratio=t["ratio"],
               context=f"batch {t['batch_pages_per_s']:.1f} pages/s; {t['workers']} embedded workers; every result "
               f"its own document; CPU per page: service {t['service_cpu_ms_per_page']:.0f} ms, batch "
               f"{t['batch_cpu_ms_per_page']:.0f} ms", target=">= 0.9", ok=t["ratio"] >= 0.9),
        Figure(SECTION, f"throughput, server-bound (a stand-in answering {FLEET['OLMOCR_STANDIN_CONCURRENCY']} "
               f"pages at a time, {FLEET['OLMOCR_STANDIN_LATENCY']} s each), {f['clients']} clients x "
               f"{f['documents'] // f['clients']} one-page documents", f["service_pages_per_s"], "pages/s",
               "the batch pipeline on the same documents", ratio=f["ratio"],
               context=f"batch {f['batch_pages_per_s']:.1f} pages/s; CPU per page: service "
               f"{f['service_cpu_ms_per_page']:.0f} ms, batch {f['batch_cpu_ms_per_page']:.0f} ms",
               target=">= 0.9", ok=f["ratio"] >= 0.9),
        Figure(SECTION, f"one-page job during a {i['batch_pages']:,}-page batch (p50)", i["busy_p50_ms"], "ms",
               "the same job on the idle service", ratio=i["ratio"],
               context=f"idle p50 {i['idle_p50_ms']:.0f} ms; busy max {i['busy_max_ms']:.0f} ms; {i['jobs']} jobs; "
               f"{i['batch_pages_answered']} batch pages answered meanwhile", target="<= 2", ok=i["ratio"] <= 2),
    ]
    return figs, detail


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.service")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    figs, detail = run(args.quick)
    print(json.dumps({"figures": [f.as_dict() for f in figs], "detail": detail}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
