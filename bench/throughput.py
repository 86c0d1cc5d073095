"""Pipeline throughput against a server of known capacity (the stand-in), ours vs upstream 0.4.27.

The stand-in answers each request after ``latency`` s with at most ``concurrency`` requests in
parallel and ~750 output tokens per page, so its capacity is known: ideal pages/s = concurrency /
latency. Each setting gets a fresh stand-in; our pipeline and then upstream run against it, each in a
fresh workspace, over the same PDFs. pages/s = pages found in the output JSONL / wall time of the
whole command (start-up included). Every run's output is checked: each input document exactly once,
with its page count (none lost, none duplicated).

With ``latency 0`` the server is instant and the client is the bottleneck; that run is compared with
the client limit measured in the same run: our render + PNG + base64 in 2 processes over the same
pages (``bench.render.client_limit``).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    OUT_DIR,
    Corpus,
    CpuMeter,
    Figure,
    ProcGroup,
    StandIn,
    count_output,
    log,
    make_tmpdir,
    our_env,
    our_pipeline_argv,
    upstream_available,
    upstream_env,
    upstream_pipeline_argv,
    wait_with_rusage,
)


@dataclass(frozen=True)
class Setting:
    name: str
    latency: float
    concurrency: int | None
    upstream: bool = True

    @property
    def ideal(self) -> float | None:
        return self.concurrency / self.latency if self.latency > 0 and self.concurrency else None


FULL_SETTINGS = [
    Setting("instant server (client-bound)", 0.0, None),
    Setting("GPU-like 8 p/s (2 s x 16)", 2.0, 16),
    Setting("GPU-like 4 p/s (2 s x 8)", 2.0, 8, upstream=False),
    Setting("GPU-like 10 p/s (1 s x 10)", 1.0, 10, upstream=False),
]
#: ``OLMOCR_BENCH_THROUGHPUT=client``: only the client-bound setting (the one the upstream ratio is taken on).
CLIENT_ONLY = [FULL_SETTINGS[0]]
QUICK_SETTINGS = [
    Setting("instant server (client-bound)", 0.0, None),
    Setting("GPU-like 8 p/s (2 s x 16)", 2.0, 16),
]


def run_pipeline(which: str, url: str, corpus: Corpus, log_dir: Path, timeout: float,
                 tag: str) -> dict:
    """Run one pipeline (``ours`` or ``upstream``) to completion in a fresh workspace; returns wall
    time and the output count."""
    tmp = make_tmpdir(f"{which}-{tag}")
    ws = tmp / "ws"
    if which == "ours":
        argv, env = our_pipeline_argv(ws, url, corpus.pdfs), our_env()
    else:
        argv, env = upstream_pipeline_argv(ws, url, corpus.pdfs), upstream_env()
    log_path = log_dir / f"{which}-{tag}.log"
    # cwd = the temp dir: upstream must not see this checkout's `olmocr/` package on sys.path.
    t0 = time.perf_counter()
    proc = ProcGroup(argv, env=env, cwd=tmp, log_path=log_path, name=which)
    meter = CpuMeter(proc.pid).start()
    rc, reaped = wait_with_rusage(proc.proc, timeout)
    timed_out = rc is None
    wall = time.perf_counter() - t0
    meter.stop()
    proc.stop()
    cpu = meter.by_role(reaped)
    # Everything the run cost: the process and every descendant it reaped (upstream's pdftoppm calls too).
    cpu["tree"] = reaped if reaped is not None else cpu["main"] + cpu["renderer"] + cpu["other"]
    count = count_output(ws, corpus.pages)
    shutil.rmtree(tmp, ignore_errors=True)
    ok = rc == 0 and not timed_out
    if not ok:
        log(f"{which} [{tag}] rc={rc} timed_out={timed_out}; log tail:\n{proc.log_tail(15)}")
    return {"which": which, "rc": rc, "timed_out": timed_out, "wall_s": wall,
            "pages_per_s": count.pages / wall if wall > 0 else 0.0, "output": count.as_dict(),
            "cpu_s": cpu, "cpu_ms_per_page": 1000 * cpu["tree"] / max(1, count.pages),
            "log": str(log_path), "argv": [str(a) for a in argv[:6]] + ["..."]}


def _integrity(r: dict, corpus: Corpus) -> str:
    o = r["output"]
    return (f"{o['pages']}/{corpus.total_pages} pages, lost {o['lost_pages']}, dup {o['duplicate_pages']}, "
            f"fallback {o['fallback_pages']}")


def run(corpus: Corpus, quick: bool = False, with_upstream: bool = True) -> tuple[list[Figure], dict]:
    import os

    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    if os.environ.get("OLMOCR_BENCH_THROUGHPUT") == "client":
        settings = CLIENT_ONLY
    log_dir = OUT_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if with_upstream and not upstream_available():
        log("upstream venv missing (bench/setup_upstream.sh); skipping upstream runs")
        with_upstream = False
    figs: list[Figure] = []
    detail: dict = {"corpus": corpus.describe(), "settings": []}
    client_limit: float | None = None
    for s in settings:
        if not s.ideal and client_limit is None:
            from bench import render

            # Measured right before the client-bound runs, on the same pages, so that load from other
            # work on the machine affects both alike.
            log("throughput: measuring the client limit (render+PNG+base64, 2 processes) on these pages")
            client_limit = render.client_limit(corpus, quick=False)
            detail["client_limit_pages_per_s"] = client_limit
            log(f"client limit: {client_limit:.1f} pages/s")
        tag = f"lat{s.latency:g}-conc{s.concurrency or 'inf'}"
        log(f"throughput [{s.name}]: starting stand-in")
        standin = StandIn(latency=s.latency, concurrency=s.concurrency, log_dir=log_dir)
        runs: dict[str, dict] = {}
        try:
            standin.wait_ready()
            # Generous: 4x the ideal time, or 15 min for a client-bound run.
            budget = 4 * corpus.total_pages / s.ideal + 120 if s.ideal else 900
            for which in (["ours", "upstream"] if (with_upstream and s.upstream) else ["ours"]):
                log(f"throughput [{s.name}]: {which} pipeline over {corpus.describe()}")
                runs[which] = run_pipeline(which, standin.base_url, corpus, log_dir, budget, tag)
                r = runs[which]
                log(f"  {which}: {r['pages_per_s']:.2f} pages/s, wall {r['wall_s']:.1f}s, {_integrity(r, corpus)}")
        finally:
            standin.stop()
        detail["settings"].append({"name": s.name, "latency": s.latency, "concurrency": s.concurrency,
                                   "ideal_pages_per_s": s.ideal, "runs": runs})

        ours = runs["ours"]
        clean = ours["output"]["lost_pages"] == 0 and ours["output"]["duplicate_pages"] == 0 and ours["rc"] == 0
        if s.ideal:
            frac = ours["pages_per_s"] / s.ideal
            # The server finishes whole waves of `concurrency` requests: no client can beat this time.
            floor_s = math.ceil(corpus.total_pages / s.concurrency) * s.latency
            figs.append(Figure("throughput", f"ours, {s.name}", ours["pages_per_s"], "pages/s",
                               f"stand-in capacity {s.ideal:g} p/s", ratio=frac,
                               context=f"{_integrity(ours, corpus)}; wall {ours['wall_s']:.1f}s vs "
                                       f"{floor_s:.0f}s for whole waves", target=">= 0.95",
                               ok=frac >= 0.95 and clean))
        else:
            frac = ours["pages_per_s"] / client_limit
            figs.append(Figure("throughput", f"ours, {s.name}", ours["pages_per_s"], "pages/s",
                               f"client limit {client_limit:.1f} p/s (render+PNG+b64, 2 procs)", ratio=frac,
                               context=f"{_integrity(ours, corpus)}; {ours['cpu_ms_per_page']:.1f} ms CPU a page (all processes)",
                               target=">= 0.9", ok=frac >= 0.9 and clean))
        if "upstream" in runs:
            up = runs["upstream"]
            ratio = ours["pages_per_s"] / up["pages_per_s"] if up["pages_per_s"] > 0 else None
            base = f"stand-in capacity {s.ideal:g} p/s" if s.ideal else f"client limit {client_limit:.1f} p/s"
            frac_up = up["pages_per_s"] / (s.ideal or client_limit)
            figs.append(Figure("throughput", f"upstream 0.4.27, {s.name}", up["pages_per_s"], "pages/s",
                               base, ratio=frac_up, context=_integrity(up, corpus)))
            figs.append(Figure("throughput", f"ours / upstream, {s.name}", ratio, "x",
                               "upstream 0.4.27, same server, same pages", ratio=ratio,
                               target=">= 10" if not s.ideal else "",
                               ok=(ratio is not None and ratio >= 10) if not s.ideal else None,
                               context=f"ours {ours['pages_per_s']:.2f} vs upstream {up['pages_per_s']:.2f} p/s"))
            cpu_ratio = up["cpu_ms_per_page"] / ours["cpu_ms_per_page"] if ours["cpu_ms_per_page"] else None
            figs.append(Figure("throughput", f"CPU per page, upstream / ours, {s.name}", up["cpu_ms_per_page"],
                               "ms", f"ours {ours['cpu_ms_per_page']:.1f} ms (every process of the run)",
                               ratio=cpu_ratio, context="CPU time from the kernel: robust to other work on the "
                                                        "machine, unlike pages/s"))
    return figs, detail
