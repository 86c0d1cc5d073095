"""olmocr-service's own overhead: a one-page PDF through ``POST /v1/convert`` against an instant stand-in,
against the same page (rendered once, as the pipeline renders it) sent straight to the stand-in.

    .venv/bin/python -m bench.service [--rounds 100]

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
                                            "--render-processes", "1"], env={**clean_env(), "OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT": "1000"},
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
            print(json.dumps({"rounds": args.rounds, "direct": d, "convert": c,
                              "overhead_p50_ms": c["p50_ms"] - d["p50_ms"],
                              "overhead_p99_ms": c["p99_ms"] - d["p99_ms"]}, indent=2))
        finally:
            if service is not None:
                stop_process_group(service)
            stop_process_group(standin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
