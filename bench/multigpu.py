"""One box, many GPUs: four stand-in "GPUs" in ONE supervised deployment and one pipeline that reaches them
all through one address (a port range).

``python -m olmocr.vllm_server_manager --gpus 0,1,2,3`` runs four supervised stand-ins (the real manager,
supervisord, wrapper, health listener and status service), each with a known capacity (``LATENCY`` s per
request, ``CONCURRENCY`` at a time: 1.5 pages/s). One pipeline runs with ``--vllm-url http://127.0.0.1:P-(P+3)``.

1. **capacity**: pages the four servers answered in the steady part of the run (after the first
   ``WARMUP_S``, until the first server runs out of work) vs their summed capacity over that window
   (target >= 0.95); the whole-command throughput (start-up included) is given as context.
2. **one hung**: a fresh run; server 2's engine is hung (the stand-in's ``hang`` control: completions never
   answer, ``/health`` stays 200, as vLLM's does). Pages the other three answered from the hang until the
   health listener has killed and supervisord restarted the hung one, vs their capacity over that window
   (target >= 0.95); restart counts per server from the status service (target: only the hung one, once);
   every page written exactly once.

What a server did comes from its ``/metrics`` (``vllm:request_success_total``, as vLLM exports it: every
finished completion, the pipeline's pages and the health listener's 1-token probes) and the stand-in's
``/admin/info`` (``image_requests_served``: pages). The ratio
counts both: the stand-in charges a probe a whole request's time and slot (``LATENCY``), where vLLM batches
a 1-token request into one decode step, so with the listener probing every few seconds the probes take
several percent of a stand-in's capacity that they would not take of a GPU's. Capacity left unused (by the
deployment or by the balancing) is what the figure is about; the pages-only ratio is in *context*.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import (
    OUT_DIR,
    REPO,
    Corpus,
    Figure,
    ProcGroup,
    admin_control,
    http_get,
    log,
    make_tmpdir,
    our_env,
    our_pipeline_argv,
    wait_until,
)
from bench.fleet import IMAGE_DIM, _integrity, _replicate, _run_parts

SERVERS = 4
LATENCY = 2.0
#: 1.5 pages/s per server, 6 for the box: below what one pipeline renders on the small shared machine the
#: benchmarks run on (at 8 p/s a first run measured 0.95 with four servers but 0.99 with three: the client,
#: not the deployment, was the limit), so the figure measures the deployment and the balancing.
CONCURRENCY = 3
WARMUP_S = 8.0
HUNG = 2
#: The health listener's settings for the run: a completion probe may wait behind the pipeline's queued
#: requests on a busy stand-in (LATENCY or two), so its timeout is a few times that; a hang is caught in
#: about 2 probes x 12 s.
HEALTH_ENV = {"OLMOCR_HEALTH_INTERVAL": "2", "OLMOCR_HEALTH_COMPLETION_TIMEOUT": "12",
              "OLMOCR_HEALTH_TIMEOUT": "5", "OLMOCR_HEALTH_FAILURE_THRESHOLD": "2",
              "OLMOCR_HEALTH_KILL_GRACE": "3", "OLMOCR_RESTART_DELAY": "0.5"}


class Box:
    """The manager with four stand-in GPUs."""

    def __init__(self, log_dir: Path, tmp: Path, tag: str) -> None:
        from tests.standin_helpers import free_port_run

        self.port = free_port_run(SERVERS + 1)  # + the status service
        self.status_port = self.port + SERVERS
        env = dict(os.environ)
        env.update(HEALTH_ENV)
        env.update({"OLMOCR_STANDIN_LATENCY": str(LATENCY), "OLMOCR_STANDIN_CONCURRENCY": str(CONCURRENCY),
                    "OLMOCR_STANDIN_OUTPUT_TOKENS": "750", "OLMOCR_PYTHON": sys.executable,
                    "CUDA_VISIBLE_DEVICES": ""})
        env["OLMOCR_STATUS_PORT"] = str(self.status_port)  # beside the servers (the default is one fixed port)
        run_dir = tmp / f"box-{tag}"
        run_dir.mkdir(parents=True)
        self.proc = ProcGroup([sys.executable, "-m", "olmocr.vllm_server_manager", "--gpus",
                               ",".join(str(i) for i in range(SERVERS)), "--vllm-bin",
                               str(REPO / "scripts" / "vllm-standin"), "--port", str(self.port),
                               "--run-dir", str(run_dir / "run"), "--log-file", str(run_dir / "manager.log"),
                               "--status-interval", "3600"],
                              env=env, cwd=str(run_dir), log_path=log_dir / f"multigpu-{tag}-manager.log",
                              name="manager")

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port + i}" for i in range(SERVERS)]

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.port}-{self.port + SERVERS - 1}"

    def status(self) -> dict:
        return http_get(f"http://127.0.0.1:{self.status_port}/status").json()

    def wait_healthy(self, timeout: float = 90.0) -> None:
        wait_until(lambda: self.status().get("healthy"), timeout, interval=0.5, what="every server healthy")

    def served(self) -> list[tuple[int, int]]:
        """(requests finished, pages finished) per server: ``vllm:request_success_total`` (as vLLM exports
        it: pages and probes) and the stand-in's ``image_requests_served``."""
        from prometheus_client.parser import text_string_to_metric_families

        out = []
        for url in self.urls:
            finished = sum(sample.value for family in text_string_to_metric_families(http_get(url + "/metrics").text)
                           for sample in family.samples if sample.name == "vllm:request_success_total")
            out.append((int(finished), int(http_get(url + "/admin/info").json()["image_requests_served"])))
        return out

    def stop(self) -> None:
        self.proc.stop(grace=90)


def _pipeline(tag: str, box: Box, ws: Path, pdfs: list[Path], log_dir: Path) -> ProcGroup:
    # The pipeline's own settings are the defaults: the deployment's health listener, not the pipeline's
    # no-progress timeout, ends the hang (a first version with --request_timeout 10 had the pipeline eject
    # healthy servers whose queues were deep on this loaded machine).
    argv = our_pipeline_argv(ws, box.vllm_url, pdfs, ["--progress_interval", "5", "--target_longest_image_dim",
                                                      IMAGE_DIM])
    return ProcGroup(argv, env=our_env(), cwd=str(ws.parent), log_path=log_dir / f"multigpu-{tag}.log", name=tag)


def _sample(box: Box, proc: ProcGroup, until: float) -> list[tuple[float, list[int]]]:
    samples = []
    while proc.poll() is None and time.monotonic() < until:
        try:
            samples.append((time.monotonic(), box.served()))
        except Exception:  # noqa: BLE001 - a server restarting: skip this sample
            pass
        time.sleep(0.5)
    return samples


def run_capacity(pdfs: dict[Path, int], log_dir: Path, tmp: Path) -> tuple[list[Figure], dict]:
    box = Box(log_dir, tmp, "capacity")
    capacity = SERVERS * CONCURRENCY / LATENCY
    pages = sum(pdfs.values())
    try:
        box.wait_healthy()
        proc = _pipeline("capacity", box, tmp / "ws-capacity", list(pdfs), log_dir)
        samples = _sample(box, proc, time.monotonic() + 4 * pages / capacity + 120)
        rc = proc.wait(timeout=60)
        wall = time.monotonic() - proc.started
        proc.stop()
    finally:
        box.stop()
    ok, integrity, got = _integrity(tmp / "ws-capacity", pdfs)
    start = next(s for s in samples if s[0] >= proc.started + WARMUP_S)
    # Steady until the work runs out: the last sample where every server still gained pages since the one
    # before (the tail, where fewer pages are left than servers, is not capacity).
    end = start
    for prev, cur in zip(samples, samples[1:], strict=False):
        if cur[0] <= start[0]:
            continue
        if all(c[1] > p[1] for c, p in zip(cur[1], prev[1], strict=True)):
            end = cur
    window = end[0] - start[0]
    done = sum(c for c, _ in end[1]) - sum(c for c, _ in start[1])
    pages_done = sum(p for _, p in end[1]) - sum(p for _, p in start[1])
    ratio = done / (capacity * window) if window > 0 else 0.0
    whole = got / wall
    figs = [Figure("multigpu", f"{SERVERS} GPUs, one deployment, one --vllm-url: steady throughput",
                   done / window if window else 0.0, "requests/s", f"summed capacity {capacity:g} req/s",
                   ratio=ratio, target=">= 0.95", ok=ratio >= 0.95 and ok and rc == 0,
                   context=f"{integrity}; window {window:.0f}s; pages alone {pages_done / window:.2f} p/s "
                           f"({pages_done / (capacity * window):.2f}); whole command {whole:.2f} p/s "
                           f"({whole / capacity:.2f} with start-up) in {wall:.0f}s; pages per server "
                           f"{[p for _, p in end[1]]}; rc {rc}")]
    return figs, {"wall_s": wall, "rc": rc, "window_s": window, "steady_requests": done,
                  "steady_pages": pages_done, "served": end[1], "integrity": integrity,
                  "whole_ratio": whole / capacity}


def run_hung(pdfs: dict[Path, int], log_dir: Path, tmp: Path) -> tuple[list[Figure], dict]:
    box = Box(log_dir, tmp, "hung")
    others = [i for i in range(SERVERS) if i != HUNG]
    capacity = len(others) * CONCURRENCY / LATENCY
    pages = sum(pdfs.values())
    detail: dict = {}
    try:
        box.wait_healthy()
        proc = _pipeline("hung", box, tmp / "ws-hung", list(pdfs), log_dir)
        wait_until(lambda: sum(p for _, p in box.served()) >= WARMUP_S * SERVERS * CONCURRENCY / LATENCY, 120,
                   what="the run under way")
        before = box.served()
        hung_at = time.monotonic()
        admin_control(box.urls[HUNG], {"hang": True})
        log(f"  multigpu: hung server {HUNG} ({box.urls[HUNG]})")

        def restarted() -> bool:
            entry = box.status()["servers"][HUNG]
            return entry["restart_count"] >= 1 and entry["state"] == "RUNNING"

        back_at = wait_until(restarted, 120, interval=0.25, what="the hung server restarted")
        after = box.served()
        detail["detect_and_restart_s"] = back_at - hung_at
        rc = proc.wait(timeout=4 * pages / capacity + 120)
        wall = time.monotonic() - proc.started
        proc.stop()
        status = box.status()
    finally:
        box.stop()
    ok, integrity, _got = _integrity(tmp / "ws-hung", pdfs)
    window = back_at - hung_at
    served_others = sum(after[i][0] - before[i][0] for i in others)
    pages_others = sum(after[i][1] - before[i][1] for i in others)
    ratio = served_others / (capacity * window)
    restarts = [e["restart_count"] for e in status["servers"]]
    only_hung = restarts == [1 if i == HUNG else 0 for i in range(SERVERS)]
    detail.update({"wall_s": wall, "rc": rc, "window_s": window, "served_others": served_others,
                   "pages_others": pages_others,
                   "restarts": restarts, "integrity": integrity})
    figs = [
        Figure("multigpu", f"{SERVERS} GPUs, one hung: the other {len(others)} while it is caught and restarted",
               served_others / window, "requests/s", f"their capacity {capacity:g} req/s", ratio=ratio,
               target=">= 0.95", ok=ratio >= 0.95 and ok and rc == 0,
               context=f"{integrity}; window {window:.0f}s (hang to restarted); pages alone "
                       f"{pages_others / window:.2f} p/s ({pages_others / (capacity * window):.2f}); rc {rc}"),
        Figure("multigpu", f"{SERVERS} GPUs, one hung: restart count per server", float(sum(restarts)),
               "restarts", "only the hung one, once", ratio=None, target=f"{[int(i == HUNG) for i in range(SERVERS)]}",
               ok=only_hung, context=f"restart_count per server {restarts}"),
    ]
    return figs, detail


def run(corpus: Corpus, quick: bool = False) -> tuple[list[Figure], dict]:
    log_dir = OUT_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = make_tmpdir("multigpu")
    figs: list[Figure] = []
    detail: dict = {"corpus": corpus.describe(), "servers": SERVERS, "latency_s": LATENCY,
                    "concurrency": CONCURRENCY}
    try:
        # ~60 s of work at 8 p/s (~40 s for --quick): the hung run must still have work for the other three
        # until the hung server is back (~25 s after the hang).
        target = 320 if quick else 480
        copies = max(1, round(target / max(1, corpus.total_pages)))
        pdfs = _replicate(corpus, copies, tmp / "in")
        detail["pages"] = sum(pdfs.values())
        log(f"multigpu: {len(pdfs)} PDFs, {detail['pages']} pages")
        _run_parts("multigpu", (("capacity", run_capacity), ("hung", run_hung)), pdfs, log_dir, tmp, figs, detail)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figs, detail
