"""A fleet: one pipeline across several stand-ins of different capacity, one of them killed and brought
back, and two pipelines of different priority sharing one priority-scheduling stand-in.

Each stand-in answers a request after ``latency`` s with at most ``concurrency`` in parallel, so its
capacity is known (concurrency / latency pages/s). Every run's output is checked: each document exactly
once with its page count. Pages served by each stand-in are read from its ``/admin/info``
(``image_requests_served``: page requests, not probes). Throughput = pages in the output / wall time of
the whole pipeline command (start-up included).

1. **capacity**: stand-ins of 8, 4 and 2 pages/s (2 s x 16, 8, 4). Throughput vs the summed capacity
   (target >= 0.95); each server's share of the pages vs its share of the capacity (target: within 10%).
2. **outage**: the same three; the 4 p/s one is killed at a quarter of the ideal run time and started
   again (same port) at half. Pages served by the other two during the outage vs their capacity (target
   >= 0.90), the killed one re-admitted and serving pages again, every page exactly once.
3. **priority**: one stand-in with ``--scheduling-policy priority`` (8 p/s). A high-priority pipeline
   (``--priority -10``) alone over a set of pages, then again while a low-priority pipeline
   (``--priority 10``) floods the same server with a larger batch. Its throughput shared vs solo
   (target >= 0.80); what the low-priority one got meanwhile, and the server's total use in that window.

The corpus is repeated (hard links or copies under distinct names) so that each run lasts long enough
for start-up and the last wave to matter little. Pages are rendered at 640 px (``IMAGE_DIM``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from bench.common import (
    OUT_DIR,
    Corpus,
    Figure,
    ProcGroup,
    StandIn,
    count_output,
    http_get,
    log,
    make_tmpdir,
    our_env,
    our_pipeline_argv,
    wait_until,
)

CAPACITY = [(2.0, 16), (2.0, 8), (2.0, 4)]  # (latency s, concurrency): 8, 4, 2 pages/s
#: The wide fleet: one pipeline, 16 stand-ins of 2 pages/s each (2 s x 4), 32 pages/s summed.
WIDE = [(2.0, 4)] * 16
#: Pages for the wide fleet are rendered at 256 px: it measures whether one pipeline process can fan out to
#: 16 servers, not how fast 2 shared cores render (at 640 px, 32 pages/s of rendering alone takes 0.6 of a
#: core, which a 2-core machine shared with other work does not reliably have; a GPU box has the cores).
WIDE_IMAGE_DIM = "256"
PRIORITY_SERVER = (2.0, 16)


def _run_parts(section: str, parts: tuple, pdfs: dict[Path, int], log_dir: Path, tmp: Path,
               figs: list[Figure], detail: dict) -> None:
    """Run each ``(name, fn)`` part over ``pdfs``, adding its figures to ``figs`` and its details under its name."""
    for name, fn in parts:
        log(f"{section} [{name}]")
        f, d = fn(pdfs, log_dir, tmp)
        figs += f
        detail[name] = d
        for fig in f:
            log(f"  {fig.name}: {fig.value} {fig.unit} (ratio {fig.ratio}) {fig.context}")


def _replicate(corpus: Corpus, copies: int, into: Path) -> dict[Path, int]:
    """``copies`` of every corpus PDF under distinct names (hard links where possible): {path: pages}."""
    out: dict[Path, int] = {}
    for c in range(copies):
        d = into / f"copy{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i, pdf in enumerate(corpus.pdfs):
            dest = d / f"{i:04d}-{pdf.name}"
            try:
                os.link(pdf, dest)
            except OSError:
                shutil.copyfile(pdf, dest)
            out[dest] = corpus.pages[pdf]
    return out


def _served(standin: StandIn) -> int:
    return int(http_get(standin.base_url + "/admin/info").json()["image_requests_served"])


def _priorities(standin: StandIn) -> dict[str, int]:
    return dict(http_get(standin.base_url + "/admin/info").json().get("priorities") or {})


#: Smaller page images than the default 1288 px: this section measures balancing, not rendering, and on a
#: small shared machine the renders of 14 pages/s (two pipelines at once in the priority run) would
#: otherwise compete with the stand-ins for the CPU.
IMAGE_DIM = "640"


def _start(tag: str, ws: Path, urls: list[str], pdfs: list[Path], log_dir: Path, *extra: str,
           image_dim: str = IMAGE_DIM) -> ProcGroup:
    argv = our_pipeline_argv(ws, ",".join(urls), pdfs,
                             ["--progress_interval", "5", "--target_longest_image_dim", image_dim, *extra])
    return ProcGroup(argv, env=our_env(), cwd=str(ws.parent), log_path=log_dir / f"fleet-{tag}.log", name=tag)


def _finish(proc: ProcGroup, timeout: float) -> tuple[int | None, float]:
    try:
        rc = proc.wait(timeout=timeout)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
        rc = None
    wall = time.monotonic() - proc.started
    proc.stop()
    return rc, wall


def _integrity(ws: Path, expected: dict[Path, int]) -> tuple[bool, str, int]:
    c = count_output(ws, expected)
    total = sum(expected.values())
    ok = c.lost_pages == 0 and c.duplicate_pages == 0 and c.pages == total
    return ok, f"{c.pages}/{total} pages, lost {c.lost_pages}, dup {c.duplicate_pages}", c.pages


def _standins(log_dir: Path, specs: list[tuple[float, int]], extra_args: tuple[str, ...] = (),
              ready_timeout: float = 60.0) -> list[StandIn]:
    out = []
    try:
        for latency, conc in specs:
            out.append(StandIn(latency=latency, concurrency=conc, log_dir=log_dir, extra_args=extra_args))
        for s in out:
            s.wait_ready(timeout=ready_timeout)
    except BaseException:
        for s in out:
            s.stop()
        raise
    return out


def run_capacity(pdfs: dict[Path, int], log_dir: Path, tmp: Path) -> tuple[list[Figure], dict]:
    servers = _standins(log_dir, CAPACITY)
    caps = [c / lat for lat, c in CAPACITY]
    total_cap = sum(caps)
    pages = sum(pdfs.values())
    try:
        proc = _start("capacity", tmp / "ws-capacity", [s.base_url for s in servers], list(pdfs), log_dir)
        rc, wall = _finish(proc, 4 * pages / total_cap + 120)
        served = [_served(s) for s in servers]
    finally:
        for s in servers:
            s.stop()
    ok, integrity, got = _integrity(tmp / "ws-capacity", pdfs)
    rate = got / wall
    ratio = rate / total_cap
    shares = [n / max(1, sum(served)) for n in served]
    cap_shares = [c / total_cap for c in caps]
    errors = [abs(s - c) / c for s, c in zip(shares, cap_shares, strict=True)]
    share_txt = ", ".join(f"{c:g} p/s: {s:.1%} (capacity {cs:.1%})" for c, s, cs in zip(caps, shares, cap_shares,
                                                                                         strict=True))
    figs = [
        Figure("fleet", "3 servers 8+4+2 p/s: throughput", rate, "pages/s", f"summed capacity {total_cap:g} p/s",
               ratio=ratio, context=f"{integrity}; wall {wall:.1f}s; rc {rc}", target=">= 0.95",
               ok=ratio >= 0.95 and ok and rc == 0),
        Figure("fleet", "3 servers: worst share vs capacity share", max(errors), "rel. error",
               "each server's share of the capacity", ratio=max(errors), context=share_txt, target="<= 0.10",
               ok=max(errors) <= 0.10),
    ]
    return figs, {"wall_s": wall, "rc": rc, "served": served, "shares": shares, "capacity_shares": cap_shares,
                  "integrity": integrity}


def run_wide(corpus: Corpus, quick: bool = False) -> tuple[list[Figure], dict]:
    """One pipeline driving 16 stand-ins (2 pages/s each): throughput vs the summed capacity, over the whole
    command and over the middle of the run (20 %..80 % of the pages served: start-up and the last wave left
    out), plus the pipeline's main-process CPU per page."""
    from bench.common import CpuMeter, wait_with_rusage

    log_dir = OUT_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = make_tmpdir("fleet16")
    caps = [c / lat for lat, c in WIDE]
    total_cap = sum(caps)
    try:
        copies = 1 if quick else max(1, round(110 * total_cap / max(1, corpus.total_pages)))  # ~110 s of work
        pdfs = _replicate(corpus, copies, tmp / "in")
        pages = sum(pdfs.values())
        log(f"fleet16: {len(WIDE)} stand-ins, {total_cap:g} p/s summed; {len(pdfs)} PDFs, {pages} pages")
        servers = _standins(log_dir, WIDE, ready_timeout=300.0)  # 16 start at once on 2 shared cores
        timeline: list[tuple[float, int]] = []
        try:
            proc = _start("wide", tmp / "ws-wide", [s.base_url for s in servers], list(pdfs), log_dir,
                          image_dim=WIDE_IMAGE_DIM)
            meter = CpuMeter(proc.pid).start()
            deadline = time.monotonic() + 4 * pages / total_cap + 120
            rc = reaped = None
            while time.monotonic() < deadline:
                rc, reaped = wait_with_rusage(proc.proc, 1.0)
                with contextlib.suppress(Exception):
                    timeline.append((time.monotonic() - proc.started, sum(_served(s) for s in servers)))
                if rc is not None:
                    break
            wall = time.monotonic() - proc.started
            meter.stop()
            proc.stop()
            served = [_served(s) for s in servers]
        finally:
            for s in servers:
                s.stop()
        ok, integrity, got = _integrity(tmp / "ws-wide", pdfs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = got / wall
    ratio = rate / total_cap
    lo = next(((t, n) for t, n in timeline if n >= 0.2 * pages), None)
    hi = next(((t, n) for t, n in timeline if n >= 0.8 * pages), None)
    mid_rate = (hi[1] - lo[1]) / (hi[0] - lo[0]) if lo and hi and hi[0] > lo[0] else None
    cpu = meter.by_role(reaped)
    main_ms = 1000 * cpu["main"] / max(1, got)
    floor_s = -(-pages // sum(c for _, c in WIDE)) * WIDE[0][0]
    detail = {"pages": pages, "copies": copies, "wall_s": round(wall, 2), "rc": rc, "served": served,
              "mid_run_pages_per_s": mid_rate, "timeline": timeline[::5], "cpu_s": cpu, "integrity": integrity,
              "whole_waves_floor_s": floor_s}
    figs = [
        Figure("fleet16", "16 servers x 2 p/s: throughput (whole command)", rate, "pages/s",
               f"summed capacity {total_cap:g} p/s", ratio=ratio, target=">= 0.95",
               ok=ratio >= 0.95 and ok and rc == 0,
               context=f"{integrity}; wall {wall:.1f}s vs {floor_s:.0f}s for whole waves; rc {rc}; "
                       f"fewest pages on one server {min(served)}, most {max(served)}"),
        Figure("fleet16", "16 servers x 2 p/s: throughput (20-80 % of the run)", mid_rate, "pages/s",
               f"summed capacity {total_cap:g} p/s", ratio=mid_rate / total_cap if mid_rate else None,
               context="start-up and the last wave left out"),
        Figure("fleet16", "16 servers: main process CPU per page", main_ms, "ms",
               "render processes' CPU per page", ratio=cpu["main"] / cpu["renderer"] if cpu["renderer"] else None,
               context=f"main {cpu['main']:.1f} CPU-s, renderers {cpu['renderer']:.1f} CPU-s "
                       f"({WIDE_IMAGE_DIM} px pages); one process could feed {1000 / main_ms:.0f} p/s"),
    ]
    return figs, detail


def run_outage(pdfs: dict[Path, int], log_dir: Path, tmp: Path) -> tuple[list[Figure], dict]:
    servers = _standins(log_dir, CAPACITY)
    caps = [c / lat for lat, c in CAPACITY]
    victim = 1  # the 4 p/s server
    pages = sum(pdfs.values())
    ideal = pages / sum(caps)
    detail: dict = {}
    try:
        proc = _start("outage", tmp / "ws-outage", [s.base_url for s in servers], list(pdfs), log_dir)
        try:
            wait_until(lambda: proc.poll() is not None or time.monotonic() - proc.started >= ideal / 4, ideal + 60,
                       interval=0.2, what="a quarter of the run")
            before = [_served(s) for i, s in enumerate(servers) if i != victim]
            servers[victim].signal_group(signal.SIGKILL)
            killed_at = time.monotonic()
            servers[victim].stop()
            wait_until(lambda: proc.poll() is not None or time.monotonic() - killed_at >= ideal / 4, ideal + 60,
                       interval=0.2, what="the outage")
            after = [_served(s) for i, s in enumerate(servers) if i != victim]
            outage_s = time.monotonic() - killed_at
            lat, conc = CAPACITY[victim]
            servers[victim] = StandIn(latency=lat, concurrency=conc, log_dir=log_dir, port=servers[victim].port)
            servers[victim].wait_ready()
            restarted_at = time.monotonic()
            readmitted = None
            with contextlib.suppress(TimeoutError):
                back = f"{servers[victim].base_url} re-admitted"  # the log file is appended to by every run
                wait_until(lambda: back in (log_dir / "fleet-outage.log").read_text(), 60, interval=0.2,
                           what="re-admission")
                readmitted = time.monotonic() - restarted_at
            rc, wall = _finish(proc, 4 * ideal + 120)
            victim_after = _served(servers[victim])
        finally:
            proc.stop()
    finally:
        for s in servers:
            s.stop()
    ok, integrity, _ = _integrity(tmp / "ws-outage", pdfs)
    remaining = sum(c for i, c in enumerate(caps) if i != victim)
    outage_rate = (sum(after) - sum(before)) / outage_s
    ratio = outage_rate / remaining
    detail.update({"wall_s": wall, "rc": rc, "outage_s": outage_s, "outage_pages_per_s": outage_rate,
                   "readmitted_after_restart_s": readmitted, "victim_pages_after_restart": victim_after,
                   "integrity": integrity})
    figs = [
        Figure("fleet", "4 p/s server killed: throughput of the rest", outage_rate, "pages/s",
               f"remaining capacity {remaining:g} p/s", ratio=ratio,
               context=f"outage {outage_s:.0f}s; {integrity}; rc {rc}", target=">= 0.90",
               ok=ratio >= 0.90 and ok and rc == 0),
        Figure("fleet", "killed server back: re-admitted, pages after", victim_after, "pages",
               "pages it served after its restart", context=f"re-admitted {readmitted or -1:.1f}s after its restart",
               target="> 0", ok=readmitted is not None and victim_after > 0),
    ]
    return figs, detail


def run_priority(solo_pdfs: dict[Path, int], bulk_pdfs: dict[Path, int], log_dir: Path,
                 tmp: Path) -> tuple[list[Figure], dict]:
    lat, conc = PRIORITY_SERVER
    cap = conc / lat
    solo_pages = sum(solo_pdfs.values())
    budget = 4 * solo_pages / cap + 120
    (server,) = _standins(log_dir, [PRIORITY_SERVER], ("--scheduling-policy", "priority"))
    try:
        proc = _start("solo", tmp / "ws-solo", [server.base_url], list(solo_pdfs), log_dir, "--priority", "-10")
        rc_solo, wall_solo = _finish(proc, budget)
        ok_solo, integ_solo, got_solo = _integrity(tmp / "ws-solo", solo_pdfs)
        solo_rate = got_solo / wall_solo
        bulk = _start("bulk", tmp / "ws-bulk", [server.base_url], list(bulk_pdfs), log_dir, "--priority", "10")
        try:
            # The low-priority pipeline has the server to itself and a full queue before the urgent one starts.
            wait_until(lambda: _priorities(server).get("10", 0) >= 2 * conc, 120, interval=0.2, what="bulk running")
            p0 = _priorities(server)
            high = _start("high", tmp / "ws-high", [server.base_url], list(solo_pdfs), log_dir, "--priority", "-10")
            rc_high, wall_high = _finish(high, budget)
            p1 = _priorities(server)
            bulk_alive = bulk.poll() is None
        finally:
            bulk.stop()
    finally:
        server.stop()
    ok_high, integ_high, got_high = _integrity(tmp / "ws-high", solo_pdfs)
    high_rate = got_high / wall_high
    ratio = high_rate / solo_rate if solo_rate else 0.0
    low_pages = p1.get("10", 0) - p0.get("10", 0)
    high_pages = p1.get("-10", 0) - p0.get("-10", 0)
    used = (low_pages + high_pages) / wall_high / cap
    figs = [
        Figure("fleet", "high priority beside a bulk run: throughput", high_rate, "pages/s",
               f"the same pipeline alone ({solo_rate:.2f} p/s)", ratio=ratio,
               context=f"{integ_high}; solo {integ_solo}; rc {rc_high}/{rc_solo}", target=">= 0.80",
               ok=ratio >= 0.80 and ok_high and ok_solo and rc_high == 0 and rc_solo == 0 and bulk_alive),
        Figure("fleet", "low priority meanwhile: pages (server use)", low_pages, "pages",
               f"server capacity {cap:g} p/s over {wall_high:.0f}s", ratio=used,
               context=f"high {high_pages} + low {low_pages} pages in the window; bulk still running: {bulk_alive}"),
    ]
    return figs, {"solo_wall_s": wall_solo, "high_wall_s": wall_high, "solo_pages_per_s": solo_rate,
                  "high_pages_per_s": high_rate, "low_pages_during_high": low_pages, "server_use": used}


def run(corpus: Corpus, quick: bool = False) -> tuple[list[Figure], dict]:
    log_dir = OUT_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = make_tmpdir("fleet")
    figs: list[Figure] = []
    detail: dict = {"corpus": corpus.describe()}
    try:
        # ~2 min of work at 14 p/s for the full run (the corpus repeated), one copy for --quick.
        copies = 1 if quick else max(1, round(1700 / max(1, corpus.total_pages)))
        pdfs = _replicate(corpus, copies, tmp / "in")
        detail["pages"] = sum(pdfs.values())
        log(f"fleet: {len(pdfs)} PDFs, {detail['pages']} pages ({copies} copies of the corpus)")
        _run_parts("fleet", (("capacity", run_capacity), ("outage", run_outage)), pdfs, log_dir, tmp, figs, detail)
        # Priority: the urgent set is ~25 s of the server's capacity; the bulk set is everything else.
        ordered = sorted(pdfs, key=lambda p: (p.parent.name, p.name))
        solo: dict[Path, int] = {}
        for p in ordered:
            if sum(solo.values()) >= (100 if quick else 200):
                break
            solo[p] = pdfs[p]
        # The bulk run must outlast the urgent one: its own copies of the corpus, at least two.
        bulk = _replicate(corpus, max(2, copies), tmp / "bulk")
        log("fleet [priority]")
        f, d = run_priority(solo, bulk, log_dir, tmp)
        figs += f
        detail["priority"] = d
        for fig in f:
            log(f"  {fig.name}: {fig.value} {fig.unit} (ratio {fig.ratio}) {fig.context}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figs, detail
