"""olmocr-service's own overhead: a one-page PDF through ``POST /v1/convert`` against an instant stand-in,
against the same page (rendered once, as the pipeline renders it) sent straight to the stand-in; and with
``--clients 50 --docs 10``, 50 clients converting 10 different one-page documents each, against the batch
pipeline on the same 500 documents and the same stand-in.

    .venv/bin/python -m bench.service [--rounds 100] [--clients 50 --docs 10 --workers 20]

Not yet a section of ``bench/run`` (its report and RESULTS.md are generated from bench/results/): it prints
its figures as JSON. The service path includes what the service adds on top of the server: the upload,
the job record and work item in a local workspace, the claim, rendering the page, writing the results,
and reading them back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.sample_docs import write_text_pdf
from tests.standin_helpers import chat_payload, clean_env, free_port, start_standin, stop_process_group, wait_http_ok


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=0, help="also the throughput run: this many clients")
    parser.add_argument("--docs", type=int, default=10, help="documents per client")
    parser.add_argument("--workers", type=int, default=20, help="the service's embedded workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="olmocr-bench-service-") as tmp:
        root = Path(tmp)
        pdf = write_text_pdf(root / "one.pdf", ["A one-page document for the service benchmark."])
        sport, port = free_port(), free_port()
        standin = start_standin(sport, log_path=root / "standin.log")
        service = None
        try:
            wait_http_ok(f"http://127.0.0.1:{sport}/health", timeout=30, proc=standin)
            with open(root / "service.log", "wb") as log:
                service = subprocess.Popen([sys.executable, "-m", "olmocr.service", str(root / "ws"), "--vllm-url",
                                            f"http://127.0.0.1:{sport}", "--port", str(port),
                                            "--workers", str(args.workers)], env={**clean_env(), "OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT": "1000"},
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_http_ok(f"http://127.0.0.1:{port}/readyz", timeout=60, proc=service)
            from olmocr.service.intake import page_image

            image, _ = page_image(pdf.read_bytes(), "pdf", 1, longest=1288)
            payload = chat_payload(image)
            session = requests.Session()
            direct, converted = [], []
            for _ in range(3):  # warm both paths
                session.post(f"http://127.0.0.1:{sport}/v1/chat/completions", json=payload, timeout=60)
                session.post(f"http://127.0.0.1:{port}/v1/convert", files=[("file", ("one.pdf", pdf.read_bytes()))])
            for _ in range(args.rounds):
                started = time.perf_counter()
                r = session.post(f"http://127.0.0.1:{sport}/v1/chat/completions", json=payload, timeout=60)
                direct.append(time.perf_counter() - started)
                r.raise_for_status()
                started = time.perf_counter()
                r = session.post(f"http://127.0.0.1:{port}/v1/convert",
                                 files=[("file", ("one.pdf", pdf.read_bytes()))], timeout=120)
                converted.append(time.perf_counter() - started)
                assert r.status_code == 200, r.text
            d, c = percentiles(direct), percentiles(converted)
            out = {"rounds": args.rounds, "direct": d, "convert": c, "overhead_p50_ms": c["p50_ms"] - d["p50_ms"],
                   "overhead_p99_ms": c["p99_ms"] - d["p99_ms"]}
            if args.clients:
                out["throughput"] = throughput(root, port, sport, args.clients, args.docs)
            print(json.dumps(out, indent=2))
        finally:
            if service is not None:
                stop_process_group(service)
            stop_process_group(standin)
    return 0


def throughput(root: Path, port: int, sport: int, clients: int, docs: int) -> dict:
    """Pages per second: ``clients`` clients converting ``docs`` documents each through the service, then the
    batch pipeline on the same documents in a fresh workspace. Every result must name its own document."""
    folder = root / "docs"
    folder.mkdir()
    paths = [write_text_pdf(folder / f"d{i:04d}.pdf", [f"Document {i} of the throughput run."])
             for i in range(clients * docs)]

    def client(mine: list[Path]) -> int:
        session = requests.Session()
        for path in mine:
            r = session.post(f"http://127.0.0.1:{port}/v1/convert?format=dolma&timeout=600",
                             files=[("file", (path.name, path.read_bytes()))], timeout=900)
            assert r.status_code == 200, r.text
            source = json.loads(r.text.splitlines()[0])["metadata"]["Source-File"]
            assert source.endswith("-" + path.name), (source, path.name)
        return len(mine)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(client, [paths[i::clients] for i in range(clients)]))
    service_s = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(root / "batch-ws"), "--vllm-url",
                    f"http://127.0.0.1:{sport}", "--pdfs", str(folder / "*.pdf")], env=clean_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    batch_s = time.perf_counter() - started
    return {"documents": done, "service_pages_per_s": done / service_s, "batch_pages_per_s": done / batch_s,
            "ratio": batch_s / service_s}


if __name__ == "__main__":
    raise SystemExit(main())
