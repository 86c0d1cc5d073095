"""Rendering: pages/s per core at longest side 1288 px, our renderer vs ``pdftoppm`` per page as
upstream olmOCR 0.4.27 does it (``olmocr/data/renderpdf.py``: ``pdfinfo`` for the MediaBox, then
``pdftoppm -png -f N -l N -r DPI``, base64 of its output).

Both produce the same thing: a base64 PNG of one page, longest side 1288 px. The per-core figure runs
both on one core, page by page, *interleaved* (our page k, then pdftoppm's page k), so the shared
machine's noise hits both alike. The 2-process figures run each renderer over all pages in a pool of
two worker processes: that is the client's rendering limit on a 2-core machine.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import subprocess
import time
from dataclasses import dataclass

from bench.common import Corpus, Figure, log

TARGET_DIM = 1288


# --------------------------------------------------------------------------- the two renderers


def _ours_impl():
    """Our renderer's page function (the one the pipeline's worker processes run), or a pypdfium2
    equivalent if the pipeline's renderer is not importable."""
    try:
        from olmocr.pipeline.pages.render import _job_render

        def render(path: str, page_num: int, target: int = TARGET_DIM) -> bytes:
            return _job_render(path, "pdf", page_num, target, 0)

        render.source = "olmocr.pipeline.pages.render"  # type: ignore[attr-defined]
        return render
    except ImportError:
        import io

        import pypdfium2 as pdfium

        cache: dict[str, object] = {}

        def render(path: str, page_num: int, target: int = TARGET_DIM) -> bytes:
            doc = cache.get(path)
            if doc is None:
                doc = cache[path] = pdfium.PdfDocument(path)
            page = doc[page_num - 1]  # type: ignore[index]
            w, h = page.get_size()
            img = page.render(scale=target / max(w, h)).to_pil()
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=1)
            return base64.b64encode(buf.getvalue())

        render.source = "pypdfium2 (fallback)"  # type: ignore[attr-defined]
        return render


def _mediabox_longest(path: str, page_num: int) -> float:
    out = subprocess.run(["pdfinfo", "-f", str(page_num), "-l", str(page_num), "-box", "-enc", "UTF-8", path],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "MediaBox" in line:
            b = [float(x) for x in line.split(":")[1].split()]
            return max(abs(b[0] - b[2]), abs(b[3] - b[1]))
    raise ValueError("MediaBox not found")


def pdftoppm_render(path: str, page_num: int, target: int = TARGET_DIM) -> bytes:
    """Upstream 0.4.27's render_pdf_to_base64png, reproduced (same commands, same arguments)."""
    longest = _mediabox_longest(path, page_num)
    r = subprocess.run(["pdftoppm", "-png", "-f", str(page_num), "-l", str(page_num), "-r",
                        str(target * 72 / longest), path], capture_output=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.decode(errors="replace")[:200])
    return base64.b64encode(r.stdout)


# --------------------------------------------------------------------------- pool workers

_worker_fn = None


def _pool_init(which: str) -> None:
    global _worker_fn
    _worker_fn = _ours_impl() if which == "ours" else pdftoppm_render


def _pool_job(job: tuple[str, int]) -> tuple[int, float]:
    """(bytes of the page's base64 image, 0 for a failed page; CPU seconds this job took in this worker)."""
    assert _worker_fn is not None
    c0 = time.process_time()
    try:
        size = len(_worker_fn(job[0], job[1]))
    except Exception:  # noqa: BLE001 - count a failed page as 0 bytes
        size = 0
    return size, time.process_time() - c0


def _pool_rate(which: str, jobs: list[tuple[str, int]], procs: int) -> tuple[float, int]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs, initializer=_pool_init, initargs=(which,)) as pool:
        # Warm the workers (imports) before timing.
        list(pool.imap_unordered(_pool_job, jobs[:procs], chunksize=1))
        t0 = time.perf_counter()
        results = list(pool.imap_unordered(_pool_job, jobs, chunksize=1))
        dt = time.perf_counter() - t0
    return len(jobs) / dt, sum(1 for size, _ in results if size == 0)


# --------------------------------------------------------------------------- the section


def run(corpus: Corpus, quick: bool = False) -> tuple[list[Figure], dict]:
    jobs = [(str(p), i + 1) for p, i in corpus.page_list()]
    if quick:
        jobs = jobs[::3]
    ours = _ours_impl()
    log(f"render: {len(jobs)} pages, ours = {ours.source}, one core, interleaved with pdftoppm")

    ours_wall = ours_cpu = ppm_wall = ppm_cpu = 0.0
    ours_fail = ppm_fail = 0
    ours_bytes = ppm_bytes = 0
    ours(jobs[0][0], jobs[0][1])  # warm imports / first-open costs out of the timing
    for path, page in jobs:
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            ours_bytes += len(ours(path, page))
        except Exception:  # noqa: BLE001
            ours_fail += 1
        t1, c1 = time.perf_counter(), time.process_time()
        ours_wall += t1 - t0
        ours_cpu += c1 - c0

        ch0 = os.times()
        t0 = time.perf_counter()
        try:
            ppm_bytes += len(pdftoppm_render(path, page))
        except Exception:  # noqa: BLE001
            ppm_fail += 1
        t1 = time.perf_counter()
        ch1 = os.times()
        ppm_wall += t1 - t0
        ppm_cpu += (ch1.children_user - ch0.children_user) + (ch1.children_system - ch0.children_system)

    n = len(jobs)
    ours_rate, ppm_rate = n / ours_wall, n / ppm_wall
    log(f"render 1 core: ours {ours_rate:.1f} p/s, pdftoppm {ppm_rate:.1f} p/s")

    log("render: 2 processes, ours (render + PNG + base64)")
    ours2, ours2_fail = _pool_rate("ours", jobs, 2)
    log("render: 2 processes, pdftoppm per page")
    ppm2, ppm2_fail = _pool_rate("pdftoppm", jobs, 2)
    log(f"render 2 procs: ours {ours2:.1f} p/s, pdftoppm {ppm2:.1f} p/s")

    cmp_name = "pdftoppm per page (upstream 0.4.27 way)"
    figs = [
        Figure("render", "ours, pages/s per core (wall)", ours_rate, "pages/s", cmp_name,
               ratio=ours_rate / ppm_rate, context=f"pdftoppm {ppm_rate:.1f} p/s; {n} pages"),
        Figure("render", "ours, pages per CPU-second", n / ours_cpu if ours_cpu else None, "pages/cpu-s",
               cmp_name + ", CPU time of pdfinfo+pdftoppm",
               ratio=(n / ours_cpu) / (n / ppm_cpu) if ours_cpu and ppm_cpu else None,
               context=f"pdftoppm {n / ppm_cpu if ppm_cpu else 0:.1f} pages/cpu-s"),
        Figure("render", "ours render+PNG+base64, 2 processes", ours2, "pages/s",
               "pdftoppm per page, 2 processes", ratio=ours2 / ppm2,
               context=f"pdftoppm 2 procs {ppm2:.1f} p/s; this is the client limit"),
    ]
    detail = {
        "pages": n,
        "ours_source": ours.source,
        "target_longest_image_dim": TARGET_DIM,
        "one_core": {"ours_pages_per_s": ours_rate, "pdftoppm_pages_per_s": ppm_rate,
                     "ours_cpu_s": ours_cpu, "pdftoppm_cpu_s": ppm_cpu,
                     "ours_wall_s": ours_wall, "pdftoppm_wall_s": ppm_wall,
                     "ours_failed_pages": ours_fail, "pdftoppm_failed_pages": ppm_fail,
                     "ours_mean_b64_kib": ours_bytes / max(1, n - ours_fail) / 1024,
                     "pdftoppm_mean_b64_kib": ppm_bytes / max(1, n - ppm_fail) / 1024},
        "two_processes": {"ours_pages_per_s": ours2, "pdftoppm_pages_per_s": ppm2,
                          "ours_failed_pages": ours2_fail, "pdftoppm_failed_pages": ppm2_fail},
    }
    return figs, detail


@dataclass(frozen=True)
class ColdLimit:
    pages: int
    failures: int
    wall_s: float  # the whole command: interpreter, imports, page counts, pool start, every page
    cpu_s: float  # the command and its pool workers (wait4), start-up included
    job_cpu_s: float  # of that, the jobs themselves (render, PNG, base64; the request too with a server)

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_per_page(self) -> float:
        return self.cpu_s / max(1, self.pages)

    @property
    def job_cpu_per_page(self) -> float:
        return self.job_cpu_s / max(1, self.pages)


def render_limit_command(corpus: Corpus, url: str | None = None, timeout: float = 600) -> ColdLimit:
    """The render limit as a whole command, like a pipeline run: ``python -m bench.render limit PDF...`` counts
    the pages, starts two render processes and renders every page (render + PNG + base64, our job) in corpus
    order, sending back only sizes. With ``url`` each render process also POSTs every page it renders to that
    server (the pipeline's request) and reads the answer: the least a client could do against that server,
    which shares the cores. A pipeline run (also a whole command) is compared with it."""
    import json
    import sys

    from bench.common import REPO, our_env, wait_with_rusage

    argv = [sys.executable, "-m", "bench.render", "limit", *(["--url", url] if url else []), *map(str, corpus.pdfs)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=our_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()  # one line at the end: reading it waits for the command's work
    rc, cpu = wait_with_rusage(proc, timeout)
    wall = time.perf_counter() - t0
    if rc != 0 or cpu is None:
        raise RuntimeError(f"render limit command failed (rc {rc})")
    got = json.loads(out)
    return ColdLimit(got["pages"], got["failures"], wall, cpu, got["job_cpu_s"])


_sender: tuple | None = None


def _pool_init_send(url: str) -> None:
    """A render process that also sends each page to the server itself (the least a client can do)."""
    global _sender
    import http.client
    import urllib.parse

    from olmocr.pipeline.pages.page import request_template

    _pool_init("ours")
    before, after = request_template(0.1, False)
    parts = urllib.parse.urlsplit(url)
    _sender = (http.client.HTTPConnection(parts.hostname, parts.port, timeout=120), before, after)


def _pool_job_send(job: tuple[str, int]) -> tuple[int, float]:
    """Render the page, POST it with the pipeline's request to /v1/chat/completions, read the answer."""
    assert _worker_fn is not None and _sender is not None
    c0 = time.process_time()
    conn, before, after = _sender
    try:
        image = _worker_fn(job[0], job[1])
        conn.request("POST", "/v1/chat/completions", b"".join((before, image, after)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        size = len(image) if resp.status == 200 else 0
    except Exception:  # noqa: BLE001 - count a failed page as 0 bytes
        size = 0
    return size, time.process_time() - c0


def _limit_main(argv: list[str]) -> None:
    import json

    import pypdfium2

    url = None
    if argv[:1] == ["--url"]:
        url, argv = argv[1], argv[2:]
    jobs = []
    for path in argv:
        doc = pypdfium2.PdfDocument(path)
        jobs += [(path, i + 1) for i in range(len(doc))]
        doc.close()
    ctx = multiprocessing.get_context("spawn")
    init, initargs, job = (_pool_init_send, (url,), _pool_job_send) if url else (_pool_init, ("ours",), _pool_job)
    # Two processes (one a core): with a server, 3, 4 and 6 senders were measured and were slower (2026-12-01:
    # 74.8 vs 67.3, 69.6, 67.9 pages/s), the extra processes costing more CPU than the round trips they hide.
    with ctx.Pool(min(2, os.cpu_count() or 2), initializer=init, initargs=initargs) as pool:
        results = list(pool.imap_unordered(job, jobs, chunksize=1))
    print(json.dumps({"pages": len(jobs), "failures": sum(1 for size, _ in results if size == 0),
                      "job_cpu_s": sum(cpu for _, cpu in results)}))


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:2] == ["limit"]:
        _limit_main(sys.argv[2:])
        raise SystemExit(0)
    from bench.common import load_corpus

    figs, det = run(load_corpus(quick=True), quick=True)
    print(det)
