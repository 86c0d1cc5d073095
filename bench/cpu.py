"""CPU seconds per page by process: one pipeline over the corpus against an instant stand-in.

The pipeline's main process only moves requests and results (HTTP, JSON, the work queue, output); its
render processes (pebble workers) render, PNG-encode and base64 the pages. Against an instant server
(``latency 0``) nothing waits, so the CPU each one spends per page is its cost per page. CPU time is
read from the kernel (``/proc`` while the run goes, ``wait4`` rusage when the main process exits), so,
unlike a wall-time rate, it barely moves with other work on a shared machine.

Figures:

* main-process CPU per page, and as a fraction of the render processes' CPU per page (target <= 0.15:
  the main process costs little next to rendering);
* the pages/s one pipeline process could feed = 1 / main-process CPU per page (the ceiling of one
  pipeline for a box of GPUs, given enough render cores);
* the stand-in's CPU per page (context: it decodes and inspects every image it is sent);
* client-bound efficiency in CPU terms: a command that only renders (``bench.render.render_limit_command``:
  it counts the pages, starts two processes and runs the same ``_job_render`` over every page, sending back
  sizes only), CPU per page from the kernel with its start-up, divided by the whole pipeline's CPU per page
  (main + renderers + multiprocessing's helper, start-up included too). It is what the client-bound
  throughput / render limit ratio would be with the server on other cores (target >= 0.9), without the
  wall-time noise of a shared machine.

The pipeline run and the render job alone alternate for ``OLMOCR_BENCH_ROUNDS`` rounds (default 3); the
figures are those of the median round (by efficiency), and every round is kept in the raw results.

``OLMOCR_BENCH_PYSPY=1`` also records a py-spy profile of the main process (``bench/out/logs/cpu-instant-r1-main.txt``,
py-spy's raw collapsed stacks; ``python -m bench.cpu top FILE`` prints the hottest functions).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import (
    OUT_DIR,
    Corpus,
    CpuMeter,
    Figure,
    StandIn,
    count_output,
    log,
    make_tmpdir,
    median_round,
    our_env,
    our_pipeline_argv,
    process_cpu_seconds,
    rounds_wanted,
    wait_with_rusage,
)

TARGET_MAIN_VS_RENDER = 0.15


def measure(corpus: Corpus, url: str, log_dir: Path, tag: str, extra: tuple[str, ...] = (),
            profile: bool = False, timeout: float = 900) -> dict:
    """One pipeline run to completion; CPU seconds by role, pages written, wall time."""
    import time

    tmp = make_tmpdir(f"cpu-{tag}")
    ws = tmp / "ws"
    argv = our_pipeline_argv(ws, url, corpus.pdfs, ["--render_processes", "2", *extra])
    log_path = log_dir / f"cpu-{tag}.log"
    spy = None
    with open(log_path, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=our_env(), cwd=tmp, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        meter = CpuMeter(proc.pid).start()
        if profile and shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep
                                    + os.environ.get("PATH", "")):
            spy_bin = shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep
                                   + os.environ.get("PATH", ""))
            spy = subprocess.Popen([str(spy_bin), "record", "--pid", str(proc.pid), "--rate", "100",
                                    "--format", "raw", "--gil", "--nonblocking", *(["--subprocesses"] if os.environ.get("OLMOCR_BENCH_PYSPY_ALL") == "1" else []), "-o", str(log_dir / f"cpu-{tag}-main.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            rc, reaped = wait_with_rusage(proc, timeout)
        finally:
            wall = time.perf_counter() - t0
            meter.stop()
            if proc.returncode is None:
                os.killpg(proc.pid, 9)
                proc.wait()
            if spy is not None:
                try:
                    spy.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
    cpu = meter.by_role(reaped)
    count = count_output(ws, corpus.pages)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"rc": rc, "wall_s": round(wall, 2), "pages": count.pages, "output": count.as_dict(),
            "cpu_s": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in cpu.items()},
            "log": str(log_path)}


def run(corpus: Corpus, quick: bool = False) -> tuple[list[Figure], dict]:
    from bench import render as render_bench

    log_dir = OUT_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    profile = os.environ.get("OLMOCR_BENCH_PYSPY") == "1"
    rounds: list[dict] = []
    standin = StandIn(latency=0.0, log_dir=log_dir)
    try:
        standin.wait_ready()
        for i in range(rounds_wanted(quick)):
            standin_before = process_cpu_seconds(standin.pid) or 0.0
            r = measure(corpus, standin.base_url, log_dir, f"instant-r{i + 1}", profile=profile and i == 0)
            standin_cpu = (process_cpu_seconds(standin.pid) or 0.0) - standin_before
            # The render job alone: a command that only renders, in two processes (as the pipeline's renderers
            # run), start-up included as in the pipeline run: the least CPU any client could spend on these pages.
            limit = render_bench.render_limit_command(corpus)
            alone = limit.cpu_per_page
            pages = max(1, r["pages"])
            main, rend, other = (r["cpu_s"][k] / pages for k in ("main", "renderer", "other"))
            rounds.append({"round": i + 1, "run": r, "standin_cpu_s": round(standin_cpu, 3),
                           "main_cpu_ms_per_page": round(1000 * main, 3), "render_cpu_ms_per_page": round(1000 * rend, 3),
                           "standin_cpu_ms_per_page": round(1000 * standin_cpu / pages, 3),
                           "other_cpu_ms_per_page": round(1000 * other, 3),
                           "render_alone_cpu_ms_per_page": round(1000 * alone, 3),
                           "render_alone_job_cpu_ms_per_page": round(1000 * limit.job_cpu_per_page, 3),
                           # Every process of the pipeline (multiprocessing's resource tracker too, as in the
                           # limit's figure).
                           "efficiency": alone / (main + rend + other) if main + rend + other > 0 else 0.0})
            log(f"cpu round {i + 1}: main {1000 * main:.2f} ms, renderers {1000 * rend:.2f} ms, render job alone "
                f"{1000 * alone:.2f} ms a page: efficiency {rounds[-1]['efficiency']:.3f}")
    finally:
        standin.stop()
    mid = median_round(rounds, "efficiency")
    r = mid["run"]
    pages = max(1, r["pages"])
    main = mid["main_cpu_ms_per_page"] / 1000
    render = mid["render_cpu_ms_per_page"] / 1000
    alone = mid["render_alone_cpu_ms_per_page"] / 1000
    other = mid["other_cpu_ms_per_page"] / 1000
    standin_cpu = mid["standin_cpu_s"]
    ok_run = all(x["run"]["rc"] == 0 and x["run"]["output"]["lost_pages"] == 0
                 and x["run"]["output"]["duplicate_pages"] == 0 for x in rounds)
    integrity = f"{r['pages']}/{corpus.total_pages} pages, lost {r['output']['lost_pages']}, " \
                f"dup {r['output']['duplicate_pages']}, rc {r['rc']}"
    detail = {"corpus": corpus.describe(), "rounds": rounds, "median_round": mid["round"], "run": r,
              **{k: mid[k] for k in ("standin_cpu_s", "main_cpu_ms_per_page", "render_cpu_ms_per_page",
                                      "standin_cpu_ms_per_page", "other_cpu_ms_per_page",
                                      "render_alone_cpu_ms_per_page")}}
    efficiency = mid["efficiency"]
    ratio = main / render if render > 0 else None
    each = ", ".join(f"{x['efficiency']:.3f}" for x in rounds)
    figs = [
        Figure("cpu", "main process CPU per page", 1000 * main, "ms", "render processes' CPU per page "
               f"({1000 * render:.1f} ms, {r['cpu_s']['renderers']} processes)", ratio=ratio,
               target=f"<= {TARGET_MAIN_VS_RENDER}", ok=ok_run and ratio is not None and ratio <= TARGET_MAIN_VS_RENDER,
               context=f"{integrity}; main {r['cpu_s']['main']:.1f} CPU-s, renderers {r['cpu_s']['renderer']:.1f} "
                       f"CPU-s over {r['wall_s']:.0f}s wall; the median round of {len(rounds)}"),
        Figure("cpu", "pages/s one pipeline process could feed", 1 / main if main > 0 else None, "pages/s",
               "1 / main-process CPU per page", context="ceiling of one pipeline, given render cores"),
        Figure("cpu", "render processes' CPU per page", 1000 * render, "ms", "main process CPU per page",
               ratio=render / main if main > 0 else None, context="pypdfium2 render + PNG (zlib 1) + base64"),
        Figure("cpu", "stand-in CPU per page", 1000 * standin_cpu / pages, "ms", "render processes' CPU per page",
               ratio=(standin_cpu / pages) / render if render > 0 else None,
               context="it decodes (pybase64, as vLLM) and hashes every image (shares the cores in client-bound runs)"),
        Figure("cpu", "client-bound efficiency (CPU): render alone / whole pipeline", efficiency, "",
               f"render job alone {1000 * alone:.1f} ms CPU a page (a command that only renders) vs pipeline "
               f"{1000 * (main + render + other):.1f} ms (main + renderers + helper)", ratio=efficiency, target=">= 0.9",
               ok=efficiency >= 0.9,
               context=f"median of {len(rounds)} rounds ({each}); both whole commands, start-up included; the "
                       "throughput/render-limit ratio with the server on other cores; "
                       "wall-time version: throughput section"),
    ]
    return figs, detail


def top(raw: Path, n: int = 30) -> str:
    """The hottest functions of a py-spy raw (collapsed stacks) file: self and inclusive sample shares."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        frames = stack.split(";")
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    lines = [f"{total} samples", "self%  incl%  function"]
    for f, k in own.most_common(n):
        lines.append(f"{100 * k / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    lines.append("--- inclusive")
    for f, k in incl.most_common(n):
        lines.append(f"{100 * own[f] / total:5.1f}  {100 * k / total:5.1f}  {f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) >= 3 and sys.argv[1] == "top":
        print(top(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 30))
    else:
        from bench.common import load_corpus

        figs, det = run(load_corpus(quick="--quick" in sys.argv), quick=True)
        for f in figs:
            print(f.as_dict())
        print({k: v for k, v in det.items() if k != "run"}, det["run"]["cpu_s"])
