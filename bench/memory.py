"""Memory and scale: our pipeline's peak RSS (summed over its whole process tree, sampled with psutil
every 0.1 s) with 100 vs 10,000 pages queued, against a GPU-like stand-in (2 s x 16 = 8 pages/s).

A slow server is the worst case for memory: a pipeline without back-pressure renders ahead and holds
every page image (~0.5 MB of base64 each) in memory. The 100-page run goes to completion; the
10,000-page run (10 generated PDFs of 1,000 pages each) is sampled for a fixed window and then stopped
(its process group is killed), since at 8 pages/s it would take 20 minutes. The PDFs are generated in a
temp dir by repeating corpus pages (pypdfium2, one import call per file so resources are shared).

Also: the status script's latency (``olmocr-server-status``, one call = one process, as an operator
runs it) against ``supervisorctl status`` on the same running deployment.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import (
    OUT_DIR,
    Figure,
    ProcGroup,
    RssSampler,
    StandIn,
    corpus_root,
    count_output,
    load_corpus,
    log,
    make_tmpdir,
    our_env,
    our_pipeline_argv,
    upstream_available,
    upstream_env,
    upstream_pipeline_argv,
)

SOURCE_PDF = "gnarly/bws_book_ch2.pdf"  # 48 text pages of a book chapter
RSS_LIMIT_MB = 300


def _source_pdf() -> Path:
    """The book chapter of the olmOCR corpus, or in another corpus its longest PDF."""
    root = corpus_root()
    if (root / SOURCE_PDF).is_file():
        return root / SOURCE_PDF
    return max(load_corpus(root=root).pages.items(), key=lambda kv: kv[1])[0]


def make_pdfs(dst: Path, n_files: int, pages_per_file: int, source: Path | None = None) -> list[Path]:
    import pypdfium2 as pdfium

    source = source or _source_pdf()
    src = pdfium.PdfDocument(str(source))
    n = len(src)
    out = []
    dst.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        doc = pdfium.PdfDocument.new()
        doc.import_pages(src, [(f + k) % n for k in range(pages_per_file)])
        path = dst / f"gen-{pages_per_file}p-{f:03d}.pdf"
        doc.save(str(path))
        doc.close()
        out.append(path)
    src.close()
    return out


def measure_rss(pdfs: list[Path], url: str, window: float | None, tag: str, log_dir: Path,
                which: str = "ours") -> dict:
    tmp = make_tmpdir(f"mem-{which}-{tag}")
    ws = tmp / "ws"
    if which == "ours":
        argv, env = our_pipeline_argv(ws, url, pdfs), our_env()
    else:
        argv, env = upstream_pipeline_argv(ws, url, pdfs), upstream_env()
    t0 = time.perf_counter()
    proc = ProcGroup(argv, env=env, cwd=tmp, log_path=log_dir / f"memory-{which}-{tag}.log", name=f"{which}-{tag}")
    sampler = RssSampler(proc.pid, 0.1).start()
    completed = False
    try:
        proc.wait(timeout=window if window else 1800)
        completed = True
    except subprocess.TimeoutExpired:
        pass
    wall = time.perf_counter() - t0
    sampler.stop()
    rc = proc.stop()
    pages_done = _pages_done(ws)
    shutil.rmtree(tmp, ignore_errors=True)
    return {**sampler.report(), "completed": completed, "rc": rc if completed else None, "wall_s": wall,
            "pages_written": pages_done}


def _pages_done(ws: Path) -> int:
    try:
        return count_output(ws).pages
    except Exception:  # noqa: BLE001 - a run stopped mid-write may leave a partial line
        return -1


def _breakdown(r: dict) -> str:
    parts = ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(r["peak_breakdown_mb"], key=lambda x: -x[1]))
    return f"PSS {r['peak_pss_mb']:.0f} MB; at peak: {parts}"


def run_rss(quick: bool = False, with_upstream: bool = True) -> tuple[list[Figure], dict]:
    log_dir = OUT_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    window = 60.0 if quick else 150.0
    with_upstream = with_upstream and not quick
    gen = make_tmpdir("pdfs")
    try:
        small = make_pdfs(gen / "small", 1, 100)
        large = make_pdfs(gen / "large", 10, 1000)
        standin = StandIn(latency=2.0, concurrency=16, log_dir=log_dir)
        try:
            standin.wait_ready()
            log("memory: 100 pages queued (to completion)")
            r100 = measure_rss(small, standin.base_url, None, "100", log_dir)
            log(f"  peak {r100['peak_rss_mb']:.0f} MB over {r100['peak_processes']} processes")
            log(f"memory: 10,000 pages queued ({window:.0f} s window)")
            r10k = measure_rss(large, standin.base_url, window, "10000", log_dir)
            log(f"  peak {r10k['peak_rss_mb']:.0f} MB over {r10k['peak_processes']} processes")
            rup = None
            if with_upstream and upstream_available():
                log(f"memory: upstream 0.4.27, 10,000 pages queued ({window:.0f} s window)")
                rup = measure_rss(large, standin.base_url, window, "10000", log_dir, which="upstream")
                log(f"  peak {rup['peak_rss_mb']:.0f} MB over {rup['peak_processes']} processes")
        finally:
            standin.stop()
    finally:
        shutil.rmtree(gen, ignore_errors=True)
    ratio = r10k["peak_rss_mb"] / r100["peak_rss_mb"] if r100["peak_rss_mb"] else None
    figs = [
        Figure("memory", "peak RSS, 100 pages queued", r100["peak_rss_mb"], "MB", f"limit {RSS_LIMIT_MB} MB",
               ratio=r100["peak_rss_mb"] / RSS_LIMIT_MB, target="< 1 (i.e. < 300 MB)",
               ok=r100["peak_rss_mb"] < RSS_LIMIT_MB and r100["rc"] == 0,
               context=f"{_breakdown(r100)}; ran to completion in {r100['wall_s']:.0f}s"),
        Figure("memory", "peak RSS, 10,000 pages queued", r10k["peak_rss_mb"], "MB", "peak RSS with 100 pages queued",
               ratio=ratio, target="~1, and < 300 MB", ok=r10k["peak_rss_mb"] < RSS_LIMIT_MB,
               context=f"{_breakdown(r10k)}; {window:.0f}s window, {r10k['pages_written']} pages written"),
    ]
    if rup is not None:
        # PSS, not RSS: upstream forks a child that shares most of its pages, so summed RSS counts them
        # twice; PSS counts shared pages once for either pipeline.
        figs.append(Figure("memory", "ours vs upstream 0.4.27, 10,000 pages queued (PSS)", r10k["peak_pss_mb"], "MB",
                           f"upstream peak PSS {rup['peak_pss_mb']:.0f} MB, same pages, server, window",
                           ratio=r10k["peak_pss_mb"] / rup["peak_pss_mb"] if rup["peak_pss_mb"] else None,
                           context=f"upstream RSS {rup['peak_rss_mb']:.0f} MB; {_breakdown(rup)}"))
    return figs, {"pages_100": r100, "pages_10000": r10k, "upstream_pages_10000": rup, "window_s": window,
                  "server": "stand-in 2 s x 16"}


def status_latency(deployment, n: int = 10) -> tuple[list[Figure], dict]:
    """Wall time of ``olmocr-server-status -c CONF`` vs ``supervisorctl -c CONF status`` (each a fresh
    process, alternated), on a running deployment (``bench.recovery.Deployment``)."""
    ours, ctl = [], []
    rcs = set()
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(deployment.status_argv(), capture_output=True, text=True, env=deployment.env, timeout=30)
        ours.append(time.perf_counter() - t0)
        rcs.add(r.returncode)
        t0 = time.perf_counter()
        subprocess.run(deployment.supervisorctl_argv("status"), capture_output=True, text=True,
                       env=deployment.env, timeout=30)
        ctl.append(time.perf_counter() - t0)
    med_ours, med_ctl = statistics.median(ours) * 1000, statistics.median(ctl) * 1000
    figs = [Figure("status", "olmocr-server-status latency (median)", med_ours, "ms",
                   "supervisorctl status (median, same deployment)", ratio=med_ours / med_ctl,
                   context=f"supervisorctl {med_ctl:.0f} ms; {n} calls each; exit codes {sorted(rcs)}")]
    return figs, {"status_ms": ours, "supervisorctl_ms": ctl, "exit_codes": sorted(rcs)}
