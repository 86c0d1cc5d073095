"""How fast the *reading* stand-in is: ``bench/run reading``.

The reading stand-in (``OLMOCR_STANDIN_ANSWER=read``; olmocr/standin/reading.py) answers each page with
what **Tesseract, not olmOCR**, reads on its image. It is a check of the plumbing, and slow: this section
says how slow, so that nobody mistakes its pages/s for a model's. Measured in one run, on the same pages:

1. the corpus's first pages rendered as the pipeline renders them (1288 px PNG, pypdfium2);
2. sent to the reading stand-in, ``2 x`` CPUs requests at a time (the stand-in runs one Tesseract per
   CPU): pages/s, and CPU seconds per page of the stand-in and its Tesseract processes (psutil: the
   process's own and its waited-for children's times);
3. the same pages to a canned stand-in, the same way: the ratio says what reading costs.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import requests

from bench.common import Corpus, Figure, StandIn, log, make_tmpdir

SECTION = "reading"
LABEL = "Tesseract, not olmOCR"
TARGET_DIM = 1288  # the pipeline's default --target_longest_image_dim


def _render(corpus: Corpus, count: int) -> list[bytes]:
    """The first ``count`` pages of the corpus as the pipeline renders them (base64 PNG)."""
    from olmocr.pipeline.pages import render

    pages = []
    try:
        for path, index in corpus.page_list()[:count]:
            pages.append(render._job_render(str(path), "pdf", index + 1, TARGET_DIM, 0))
    finally:
        while render._docs:
            render._docs.popitem()[1].close()
    return pages


def _cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _post_all(url: str, pages: list[bytes], at_once: int) -> list[dict[str, Any]]:
    def one(png_b64: bytes) -> dict[str, Any]:
        body = {"model": "olmocr", "max_tokens": 8000, "temperature": 0.1, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Attached is one page of a document."},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64.decode()}}]}]}
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()

    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(one, pages))


def _measure(standin: StandIn, pages: list[bytes], at_once: int) -> dict[str, Any]:
    standin.wait_ready()
    cpu0, t0 = _cpu_seconds(standin.pid), time.monotonic()
    answers = _post_all(standin.base_url, pages, at_once)
    wall = time.monotonic() - t0
    cpu = _cpu_seconds(standin.pid) - cpu0
    return {"pages": len(pages), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "pages_per_s": len(pages) / wall, "cpu_s_per_page": cpu / len(pages),
            "fingerprint": answers[0].get("system_fingerprint") if answers else None,
            "first_answer": (answers[0]["choices"][0]["message"]["content"][:300] if answers else "")}


def run(corpus: Corpus, *, quick: bool = False) -> tuple[list[Figure], dict[str, Any]]:
    from olmocr.standin import reading

    reading.find_tesseract()  # TesseractMissing says how to install it
    count = 6 if quick else 16
    pages = _render(corpus, count)
    at_once = 2 * reading.default_slots()
    logs = make_tmpdir("reading")
    log(f"reading: {len(pages)} pages at {TARGET_DIM} px, {at_once} requests at a time ({LABEL})")
    with StandIn(log_dir=logs, extra_env={"OLMOCR_STANDIN_ANSWER": "read"}) as reader:
        read = _measure(reader, pages, at_once)
    with StandIn(log_dir=logs) as canned_server:
        canned = _measure(canned_server, pages, at_once)
    read_pps, canned_pps = read["pages_per_s"], canned["pages_per_s"]
    context = (f"{read['cpu_s_per_page']:.2f} CPU-s/page (Tesseract: OSD + OCR); {len(pages)} pages at "
               f"{TARGET_DIM} px, {at_once} at once, {os.cpu_count()} CPUs; canned {canned_pps:.0f} pages/s")
    figures = [
        Figure(SECTION, f"reading stand-in pages/s ({LABEL})", read_pps, "pages/s",
               "canned stand-in, same pages", ratio=read_pps / canned_pps if canned_pps else None,
               context=context),
        Figure(SECTION, f"reading stand-in CPU per page ({LABEL})", read["cpu_s_per_page"], "CPU-s",
               "canned stand-in, same pages",
               ratio=(read["cpu_s_per_page"] / canned["cpu_s_per_page"]) if canned["cpu_s_per_page"] else None,
               context=f"stand-in + its Tesseract processes; canned {canned['cpu_s_per_page'] * 1000:.1f} ms/page"),
    ]
    detail = {"read": read, "canned": canned, "target_dim": TARGET_DIM, "at_once": at_once,
              "label": LABEL, "image_bytes": [len(base64.b64decode(p)) for p in pages]}
    shutil.rmtree(logs, ignore_errors=True)
    return figures, detail
