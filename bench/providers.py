"""Hosted providers (issue 31): a quota of R requests per minute, paced and not.

The stand-in plays a provider (olmocr/standin/provider.py): the API under ``/v1/openai``, the model served
as ``allenai/olmOCR-2-7B-1025``, and a quota of ``QUOTA`` requests per ``WINDOW_S`` seconds (a sliding
window; the excess gets 429 with ``Retry-After``). The window is shorter than a minute so that a run spans
several of them in a minute of benchmark; R, its rate per minute, is ``QUOTA * 60 / WINDOW_S``. The
stand-in itself answers at once (latency 0.2 s, no concurrency limit): the quota is the only limit.

1. **paced**: the pipeline is told the quota (``URL#rpm=R``). Requests per minute the provider let through,
   from its first to its last request (``/admin/info``), vs R (target >= 0.95), and 429s (target 0).
2. **unpaced, Retry-After in seconds** and 3. **in HTTP-date form**: no limit configured; the provider
   refuses the excess. Pages lost (target 0: every page written, none from the text layer, one attempt per
   page) and requests that arrived after a 429 and before the time its Retry-After named (target 0;
   requests within 0.2 s of the refusal were already on their way and do not count).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    OUT_DIR,
    REPO,
    Corpus,
    Figure,
    ProcGroup,
    count_output,
    free_port,
    http_get,
    log,
    make_tmpdir,
    our_env,
    our_pipeline_argv,
    wait_until,
)
from bench.fleet import _replicate

MODEL = "allenai/olmOCR-2-7B-1025"
PREFIX = "/v1/openai"
QUOTA = 20
WINDOW_S = 10.0
RPM = QUOTA * 60 / WINDOW_S  # 120 requests per minute
LATENCY_S = 0.2
#: Pages rendered small: this section measures pacing, not rendering.
IMAGE_DIM = "512"
TARGET_PAGES = 90  # at R = 120/min, about 45 s of requests


class Provider(ProcGroup):
    """The stand-in started as vLLM, playing a provider with a quota."""

    def __init__(self, log_dir: Path, form: str = "seconds") -> None:
        self.port = free_port()
        env = dict(os.environ)
        env.update({"OLMOCR_STANDIN_PATH_PREFIX": PREFIX, "OLMOCR_STANDIN_LATENCY": json.dumps(LATENCY_S),
                    "OLMOCR_STANDIN_RPM_QUOTA": str(QUOTA), "OLMOCR_STANDIN_QUOTA_WINDOW_S": json.dumps(WINDOW_S),
                    "OLMOCR_STANDIN_RETRY_AFTER_FORM": form})
        argv = [sys.executable, "-m", "olmocr.standin", "serve", "stand-in/olmocr", "--served-model-name", MODEL,
                "--port", str(self.port), "--host", "127.0.0.1"]
        super().__init__(argv, env=env, cwd=str(REPO), log_path=log_dir / f"provider-{self.port}.log",
                         name="provider")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def info(self) -> dict[str, Any]:
        return http_get(f"http://127.0.0.1:{self.port}/admin/info").json()

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(lambda: http_get(self.url + "/models", timeout=2).status_code == 200, timeout,
                   what="provider stand-in /v1/openai/models")


def _one(name: str, pdfs: dict[Path, int], log_dir: Path, tmp: Path, *, paced: bool, form: str) -> dict[str, Any]:
    provider = Provider(log_dir, form)
    try:
        provider.wait_ready()
        url = f"{provider.url}#model={MODEL}" + (f"&rpm={RPM:g}" if paced else "")
        ws = tmp / f"ws-{name}"
        argv = our_pipeline_argv(ws, url, list(pdfs), ["--progress_interval", "5", "--target_longest_image_dim",
                                                        IMAGE_DIM, "--max_page_retries", "1"])
        proc = ProcGroup(argv, env=our_env(), cwd=str(tmp), log_path=log_dir / f"providers-{name}.log", name=name)
        started = time.monotonic()
        try:
            rc = proc.wait(timeout=4 * sum(pdfs.values()) * 60 / RPM + 120)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            rc = None
        wall = time.monotonic() - started
        proc.stop()
        info = provider.info()
    finally:
        provider.stop()
    out = count_output(ws, pdfs)
    total = sum(pdfs.values())
    span = (info["last_admitted"] or 0) - (info["first_admitted"] or 0)
    per_minute = (info["admitted"] - 1) * 60 / span if span > 0 else None
    return {"rc": rc, "wall_s": round(wall, 1), "pages": out.pages, "pages_expected": total,
            "lost_pages": out.lost_pages, "duplicate_pages": out.duplicate_pages,
            "fallback_pages": out.fallback_pages, "admitted": info["admitted"],
            "throttled": info["throttled"], "early_requests": info["early_requests"],
            "admitted_per_minute": per_minute, "span_s": round(span, 1)}


def _pick(corpus: Corpus, wanted: int, into: Path) -> dict[Path, int]:
    """About ``wanted`` pages of the corpus, small documents first (copied in again if it has fewer)."""
    copies = max(1, -(-wanted // max(1, corpus.total_pages)))
    every = _replicate(corpus, copies, into)
    out: dict[Path, int] = {}
    for pdf, pages in sorted(every.items(), key=lambda kv: (kv[1], str(kv[0]))):
        if sum(out.values()) >= wanted:
            break
        out[pdf] = pages
    return out


def run(corpus: Corpus, quick: bool = False) -> tuple[list[Figure], dict]:
    log_dir = OUT_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = make_tmpdir("providers")
    try:
        pdfs = _pick(corpus, TARGET_PAGES // 2 if quick else TARGET_PAGES, tmp / "in")
        log(f"providers: {len(pdfs)} PDFs, {sum(pdfs.values())} pages; quota {QUOTA} per {WINDOW_S:g} s "
            f"(R = {RPM:g}/min)")
        detail = {"quota": QUOTA, "window_s": WINDOW_S, "rpm": RPM, "latency_s": LATENCY_S}
        detail["paced"] = paced = _one("paced", pdfs, log_dir, tmp, paced=True, form="seconds")
        log(f"  paced: {paced}")
        detail["unpaced_seconds"] = secs = _one("unpaced-seconds", pdfs, log_dir, tmp, paced=False, form="seconds")
        log(f"  unpaced, Retry-After seconds: {secs}")
        detail["unpaced_date"] = date = _one("unpaced-date", pdfs, log_dir, tmp, paced=False, form="date")
        log(f"  unpaced, Retry-After date: {date}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = paced["admitted_per_minute"]
    ratio = rate / RPM if rate else None
    figs = [
        Figure("providers", "paced (#rpm=R): requests/min let through", rate, "req/min",
               f"the quota R = {RPM:g}/min ({QUOTA} per {WINDOW_S:g} s)", ratio=ratio,
               context=f"{paced['throttled']} 429s; {paced['pages']}/{paced['pages_expected']} pages over "
                       f"{paced['span_s']} s; rc {paced['rc']}", target=">= 0.95, no 429",
               ok=ratio is not None and ratio >= 0.95 and paced["throttled"] == 0 and paced["rc"] == 0),
    ]
    for label, d in (("seconds", secs), ("HTTP date", date)):
        lost = d["lost_pages"] + (d["fallback_pages"] or 0)  # missing, or written from the text layer
        figs.append(Figure(
            "providers", f"unpaced, Retry-After as {label}: pages lost", lost, "pages",
            f"{d['pages_expected']} pages", ratio=lost / d["pages_expected"],
            context=f"{d['throttled']} 429s, {d['early_requests']} requests before Retry-After; "
                    f"{d['admitted_per_minute'] or 0:.0f} req/min let through; rc {d['rc']}",
            target="0 lost, 0 early", ok=lost == 0 and d["early_requests"] == 0 and d["rc"] == 0))
    return figs, detail
