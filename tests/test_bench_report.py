"""bench/RESULTS.md is what ``python -m bench report`` makes of bench/results/*.json (never edited by hand),
every committed results file says when, where and under what load its figures were taken, and every
headline figure agrees with the raw detail it was derived from, wherever it is quoted: the figure rows of
the results file, the remarks RESULTS.md prints with them, and the guides in docs/."""

from __future__ import annotations

import difflib
import json
import re
import statistics
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from bench.__main__ import SECTIONS
from bench.report import REPORT, RESULTS_DIR, generate, load_records
from tests.standin_helpers import REPO_ROOT

Derived = dict[str, tuple[float | None, float | None]]  # figure name -> (value, ratio), from the detail


def test_results_md_is_generated_from_the_raw_figures() -> None:
    want, have = generate(), REPORT.read_text()
    if want != have:
        diff = [d for d in difflib.unified_diff(want.splitlines(), have.splitlines(), "generated", "RESULTS.md",
                                                lineterm="", n=0) if d[:1] in "+-" and d[:3] not in ("+++", "---")]
        pytest.fail("bench/RESULTS.md differs from what bench/results/*.json give (run `python -m bench report` "
                    "and edit the JSON files, not RESULTS.md); the lines that differ:\n" + "\n".join(diff[:10]))


def test_every_results_file_says_when_and_where_it_ran() -> None:
    files = sorted(RESULTS_DIR.glob("*.json"))
    assert files
    for path, record in ((f, r) for f in files for r in load_records(f)):
        assert record.get("run_at"), f"{path.name}: no run_at"
        assert record.get("source"), f"{path.name}: no source"
        assert record.get("machine"), f"{path.name}: no machine"
        assert record.get("loadavg_before") or record.get("loadavg_after"), f"{path.name}: no load average"
        assert record.get("figures"), f"{path.name}: no figures"
        for fig in record["figures"]:
            assert fig.get("name") and "value" in fig, f"{path.name}: a figure without name or value"


# ---- each section's headline figures, recomputed from its raw detail ------------------------------------

def _cpu(d: dict[str, Any]) -> Derived:
    rounds = d["rounds"]
    effs = sorted(r["efficiency"] for r in rounds)
    median = next(r for r in rounds if r["efficiency"] == effs[len(effs) // 2])
    pages = median["run"]["pages"]
    cpu = median["run"]["cpu_s"]
    main, render = cpu["main"] / pages * 1000, cpu["renderer"] / pages * 1000
    other = cpu["other"] / pages * 1000
    standin = median["standin_cpu_s"] / pages * 1000
    eff = median["render_alone_cpu_ms_per_page"] / (main + render + other)
    return {"main process CPU per page": (main, main / render),
            "pages/s one pipeline process could feed": (1000 / main, None),
            "render processes' CPU per page": (render, render / main),
            "stand-in CPU per page": (standin, standin / render),
            "client-bound efficiency (CPU): render alone / whole pipeline": (eff, eff)}


def _throughput(d: dict[str, Any]) -> Derived:
    out: Derived = {}
    for s in d["settings"]:
        name, runs = s["name"], s["runs"]
        ours = runs["ours"]["output"]["pages"] / runs["ours"]["wall_s"]
        if s.get("rounds"):  # client-bound: the median round against the render limit taken in it
            by_ratio = sorted(s["rounds"], key=lambda r: r["ours"]["pages_per_s"] / r["limit_pages_per_s"])
            median = by_ratio[len(by_ratio) // 2]
            limit = median["limit_pages_per_s"]
            assert median["ours"]["pages_per_s"] == pytest.approx(ours), f"throughput {name}: not the median round"
        else:
            limit = s["ideal_pages_per_s"]
        out[f"ours, {name}"] = (ours, ours / limit)
        if "upstream" in runs:
            up = runs["upstream"]["output"]["pages"] / runs["upstream"]["wall_s"]
            up_cpu = runs["upstream"]["cpu_s"]["tree"] / runs["upstream"]["output"]["pages"] * 1000
            ours_cpu = runs["ours"]["cpu_s"]["tree"] / runs["ours"]["output"]["pages"] * 1000
            out[f"upstream 0.4.27, {name}"] = (up, up / limit)
            out[f"ours / upstream, {name}"] = (ours / up, ours / up)
            out[f"CPU per page, upstream / ours, {name}"] = (up_cpu, up_cpu / ours_cpu)
    return out


def _render(d: dict[str, Any]) -> Derived:
    one, two, pages = d["one_core"], d["two_processes"], d["pages"]
    ours_cpu, pdftoppm_cpu = pages / one["ours_cpu_s"], pages / one["pdftoppm_cpu_s"]
    return {"ours, pages/s per core (wall)": (one["ours_pages_per_s"],
                                              one["ours_pages_per_s"] / one["pdftoppm_pages_per_s"]),
            "ours, pages per CPU-second": (ours_cpu, ours_cpu / pdftoppm_cpu),
            "ours render+PNG+base64, 2 processes": (two["ours_pages_per_s"],
                                                    two["ours_pages_per_s"] / two["pdftoppm_pages_per_s"])}


def _memory(d: dict[str, Any]) -> Derived:
    small, big, up = d["pages_100"], d["pages_10000"], d["upstream_pages_10000"]
    return {"peak RSS, 100 pages queued": (small["peak_rss_mb"], small["peak_rss_mb"] / 300),
            "peak RSS, 10,000 pages queued": (big["peak_rss_mb"], big["peak_rss_mb"] / small["peak_rss_mb"]),
            "ours vs upstream 0.4.27, 10,000 pages queued (PSS)": (big["peak_pss_mb"],
                                                                   big["peak_pss_mb"] / up["peak_pss_mb"])}


def _reading(d: dict[str, Any]) -> Derived:
    read, canned = d["read"], d["canned"]
    pps, canned_pps = read["pages"] / read["wall_s"], canned["pages"] / canned["wall_s"]
    cpu, canned_cpu = read["cpu_s"] / read["pages"], canned["cpu_s"] / canned["pages"]
    # wall_s is kept rounded to 10 ms: the rates are checked against the unrounded ones it was taken from
    assert pps == pytest.approx(read["pages_per_s"], rel=0.01)
    assert canned_pps == pytest.approx(canned["pages_per_s"], rel=0.1)
    return {"reading stand-in pages/s (Tesseract, not olmOCR)": (read["pages_per_s"],
                                                                 read["pages_per_s"] / canned["pages_per_s"]),
            "reading stand-in CPU per page (Tesseract, not olmOCR)": (cpu, cpu / canned_cpu)}


def _probes(d: dict[str, Any]) -> Derived:
    http, rpc, wedged = d["readyz"], d["xmlrpc"], d["readyz_supervisord_wedged"]
    exec_ms = d["exec_status_script_s"] * 1000
    sup_http, sup_rpc = http["cpu_ms_per_call"]["supervisord"], rpc["cpu_ms_per_call"]["supervisord"]
    return {"GET /readyz latency (median)": (http["median_ms"], http["median_ms"] / rpc["median_ms"]),
            "supervisord CPU per /readyz": (sup_http, sup_http / sup_rpc),
            "exec probe (olmocr-server-status)": (exec_ms, exec_ms / http["median_ms"]),
            "GET /readyz, supervisord wedged (median)": (
                wedged["median_ms"], wedged["median_ms"] / (d["xmlrpc_supervisord_wedged"]["seconds"] * 1000))}


def _statusd(d: dict[str, Any]) -> Derived:
    idle, busy, n = d["idle"], d["with_clients"], d["clients"]
    sup = d["supervisord_cpu_percent"]
    ws = d["websocket"]
    return {"status service RSS, idle": (idle["service"]["rss_mb"],
                                         idle["service"]["rss_mb"] / idle["supervisord"]["rss_mb"]),
            f"status service RSS, {n} WebSocket clients": (busy["service"]["rss_mb"],
                                                           busy["service"]["rss_mb"] / idle["service"]["rss_mb"]),
            "status service CPU, idle": (idle["service"]["cpu_percent"],
                                         idle["service"]["cpu_percent"] / idle["supervisord"]["cpu_percent"]),
            f"status service CPU, {n} WebSocket clients": (
                busy["service"]["cpu_percent"], busy["service"]["cpu_percent"] / idle["service"]["cpu_percent"]),
            "supervisord CPU with the service polling": (sup["with_service"],
                                                         sup["with_service"] / sup["without_service"]),
            f"kill -9 -> all {n} clients told": (ws["kill_to_all_notified_s"], ws["kill_to_all_notified_s"] / 2)}


def _fleet(d: dict[str, Any]) -> Derived:
    cap, out, pri = d["capacity"], d["outage"], d["priority"]
    pps = d["pages"] / cap["wall_s"]
    worst = max(abs(s - c) / c for s, c in zip(cap["shares"], cap["capacity_shares"], strict=True))
    served = sum(cap["served"])
    assert [s / served for s in cap["served"]] == pytest.approx(cap["shares"]), "fleet: shares != pages served"
    return {"3 servers 8+4+2 p/s: throughput": (pps, pps / 14),
            "3 servers: worst share vs capacity share": (worst, worst),
            "4 p/s server killed: throughput of the rest": (out["outage_pages_per_s"], out["outage_pages_per_s"] / 10),
            "killed server back: re-admitted, pages after": (out["victim_pages_after_restart"], None),
            "high priority beside a bulk run: throughput": (pri["high_pages_per_s"],
                                                            pri["high_pages_per_s"] / pri["solo_pages_per_s"]),
            "low priority meanwhile: pages (server use)": (pri["low_pages_during_high"], pri["server_use"])}


def _fleet16(d: dict[str, Any]) -> Derived:
    capacity = len(d["served"]) * 2
    pps = d["pages"] / d["wall_s"]
    assert sum(d["served"]) == d["pages"], "fleet16: pages served != pages"
    cpu = d["cpu_s"]
    return {f"{len(d['served'])} servers x 2 p/s: throughput (whole command)": (pps, pps / capacity),
            f"{len(d['served'])} servers x 2 p/s: throughput (20-80 % of the run)": (
                d["mid_run_pages_per_s"], d["mid_run_pages_per_s"] / capacity),
            f"{len(d['served'])} servers: main process CPU per page": (cpu["main"] / d["pages"] * 1000,
                                                                       cpu["main"] / cpu["renderer"])}


def _multigpu(d: dict[str, Any]) -> Derived:
    per_server = d["concurrency"] / d["latency_s"]
    cap, hung = d["capacity"], d["hung"]
    steady = cap["steady_requests"] / cap["window_s"]
    others = hung["served_others"] / hung["window_s"]
    n = d["servers"]
    return {f"{n} GPUs, one deployment, one --vllm-url: steady throughput": (steady, steady / (n * per_server)),
            f"{n} GPUs, one hung: the other {n - 1} while it is caught and restarted": (
                others, others / ((n - 1) * per_server)),
            f"{n} GPUs, one hung: restart count per server": (float(sum(hung["restarts"])), None)}


def _recovery(d: dict[str, Any]) -> Derived:
    b = d["bounds_s"]
    k, h = d["kill9"], d["hang"]
    status = statistics.median(d["status_latency"]["status_ms"]) * 1000
    ctl = statistics.median(d["status_latency"]["supervisorctl_ms"]) * 1000
    out = d["pipeline"]["output"]
    return {"kill -9 -> serving again": (k["to_serving_s"], k["to_serving_s"] / b["nominal_kill_to_healthy"]),
            "kill -9 -> status healthy": (k["to_healthy_s"], k["to_healthy_s"] / b["nominal_kill_to_healthy"]),
            "hang -> detected and killed": (h["to_kill_s"], h["to_kill_s"] / b["nominal_hang_to_kill"]),
            "hang -> status healthy": (h["to_healthy_s"], h["to_healthy_s"] / b["nominal_hang_to_healthy"]),
            "pipeline pages lost / duplicated across both": (float(out["lost_pages"] + out["duplicate_pages"]), None),
            "olmocr-server-status latency (median)": (status, status / ctl)}


def _providers(d: dict[str, Any]) -> Derived:
    rpm = d["quota"] * 60 / d["window_s"]
    paced = d["paced"]
    return {"paced (#rpm=R): requests/min let through": (paced["admitted_per_minute"],
                                                         paced["admitted_per_minute"] / rpm),
            **{f"unpaced, Retry-After as {how}: pages lost": (d[key]["lost_pages"],
                                                              d[key]["lost_pages"] / d[key]["pages_expected"])
               for how, key in (("seconds", "unpaced_seconds"), ("HTTP date", "unpaced_date"))}}


def _scale(d: dict[str, Any]) -> Derived:
    out: Derived = {}
    first = min(d["claiming"], key=int)
    for n, q in d["queueing"].items():
        per_doc = q["requests"] / q["docs"]
        out[f"queue {int(n):,} docs: workspace requests per document"] = (per_doc, per_doc / 0.001)
    for n, c in d["claiming"].items():
        base = d["claiming"][first]
        out[f"one claim, {int(n):,} docs: requests (mean)"] = (c["mean_requests"],
                                                                c["mean_requests"] / base["mean_requests"])
        out[f"time to first claim, {int(n):,} docs"] = (c["first_claim"]["seconds"],
                                                         c["first_claim"]["seconds"] / base["first_claim"]["seconds"])
    for n, w in d["whole_run"].items():
        out[f"run in a {int(n):,}-doc workspace: workspace requests per page"] = (
            w["requests_per_page"], w["requests_per_page"] / 0.05)
    m, st, f = d["memory"], d["stats"], d["fleet"]
    out[f"pipeline process RSS, {m['docs']:,} docs"] = (m["peak_kib"] / 1024, m["peak_kib"] / m["imports_kib"])
    out[f"--stats, {st['docs']:,} docs, 20 ms/request"] = (st["seconds"], st["seconds"] / 60)
    out[f"{f['workers']} workers, {f['docs']:,} docs, ±2 min skew, 5% SlowDown: items done once"] = (
        f["items_done"], f["items_done"] / f["items"])
    for m in d.get("queue_memory", {}).values():
        out[f"queue {m['keys']:,} keys from a {m['source']}: peak RSS"] = (m["peak_kib"] / 1024,
                                                                         m["peak_kib"] / m["imports_kib"])
    for n, runs in d.get("against_upstream", {}).items():
        if not n.isdigit():
            continue
        ours, theirs = runs["ours"], runs["upstream"]
        label = f"queue {int(n):,} S3 docs (moto, {d['against_upstream']['latency_s'] * 1000:.0f} ms/request)"
        out[f"{label}: seconds"] = (ours["seconds"], ours["seconds"] / theirs["seconds"])
        out[f"{label}: requests"] = (ours["requests"], ours["requests"] / theirs["requests"])
    return out


def _service(d: dict[str, Any]) -> Derived:
    o, t, i = d["overhead"], d["throughput"], d["interactive"]
    n = o["index_documents"]
    service, batch = t["documents"] / t["service_s"], t["documents"] / t["batch_s"]
    return {"POST /v1/convert overhead, one page (p50)": (o["convert"]["p50_ms"] - o["direct"]["p50_ms"], None),
            "POST /v1/convert overhead, one page (p99)": (o["convert"]["p99_ms"] - o["direct"]["p99_ms"], None),
            f"POST /v1/jobs (submit), {n:,} documents queued (p50)": (o["submit"]["p50_ms"], None),
            f"GET /v1/jobs/ID (status), {n:,} documents queued (p50)": (o["status"]["p50_ms"], None),
            f"throughput, {t['clients']} clients x {t['documents'] // t['clients']} one-page documents": (
                service, service / batch),
            f"one-page job during a {i['batch_pages']:,}-page batch (p50)": (
                i["busy_p50_ms"], i["busy_p50_ms"] / i["idle_p50_ms"]),
            **_service_fleet(d)}


def _service_fleet(d: dict[str, Any]) -> Derived:
    from bench.service import FLEET

    f = d.get("throughput_fleet")
    if f is None:  # results from before the server-bound run
        return {}
    service, batch = f["documents"] / f["service_s"], f["documents"] / f["batch_s"]
    return {f"throughput, server-bound (a stand-in answering {FLEET['OLMOCR_STANDIN_CONCURRENCY']} pages at a time, "
            f"{FLEET['OLMOCR_STANDIN_LATENCY']} s each), {f['clients']} clients x {f['documents'] // f['clients']} "
            "one-page documents": (service, service / batch)}


def _micro(d: dict[str, Any]) -> Derived:
    fm, png, b64, js = d["front_matter"], d["png"], d["base64"], d["json"]
    hand = {k: statistics.median(d["handover"][k]) for k in ("empty_s", "pipe_s", "file_s")}
    orjson = js.get("orjson_s")
    return {"front matter, CSafeLoader": (fm["c_safe_loader_s"] * 1e6, fm["c_safe_loader_s"] / fm["safe_loader_s"]),
            "PNG encode, Pillow (adaptive filter)": (png["pillow_s"] * 1e3,
                                                     png["pillow_s"] / (png["pillow_s"] + png["render_s"])),
            "PNG encode, png_rgb (unfiltered rows)": (png["png_rgb_s"] * 1e3, png["png_rgb_s"] / png["pillow_s"]),
            **{f"base64 {way} 350 KB, pybase64": (b64[f"pybase64_{way}_s"] * 1e3,
                                                  b64[f"pybase64_{way}_s"] / b64[f"stdlib_{way}_s"])
               for way in ("encode", "decode")},
            "350 KB through pebble's pipe: main-process CPU per job": (hand["pipe_s"] * 1e3,
                                                                       hand["pipe_s"] / hand["empty_s"]),
            "350 KB in a file instead: main-process CPU per job": (hand["file_s"] * 1e3,
                                                                   hand["file_s"] / hand["pipe_s"]),
            "3 KB chat answer, orjson.loads": ((None, None) if orjson is None
                                               else (orjson * 1e6, orjson / js["json_s"]))}


RECOMPUTE: dict[str, Callable[[dict[str, Any]], Derived]] = {
    "cpu": _cpu, "throughput": _throughput, "render": _render, "memory": _memory, "reading": _reading,
    "probes": _probes, "statusd": _statusd, "fleet": _fleet, "fleet16": _fleet16, "multigpu": _multigpu,
    "recovery": _recovery, "providers": _providers, "scale": _scale, "service": _service, "micro": _micro}
#: Files without the detail to recompute from: the storm's is too large to commit (bench/out only), the
#: 2026-11-25 throughput table was transcribed by hand from a report older than the results files.
NO_DETAIL = {"storm.json", "throughput-2026-11-25.json"}


def _record(name: str) -> dict[str, Any]:
    return json.loads((RESULTS_DIR / f"{name}.json").read_text())


def derived(section: str) -> Derived:
    return RECOMPUTE[section](_record(section)["detail"])


def test_every_results_file_with_detail_is_recomputed() -> None:
    files = {p.name for p in RESULTS_DIR.glob("*.json")}
    assert files - NO_DETAIL == {f"{s}.json" for s in RECOMPUTE}, (
        "a results file without a recomputation here (or one listed here without its file): add it to RECOMPUTE")


@pytest.mark.parametrize("section", sorted(RECOMPUTE))
def test_each_headline_figure_is_what_its_detail_gives(section: str) -> None:
    want = derived(section)
    figures = _record(section)["figures"]
    assert {f["name"] for f in figures} == set(want), (
        f"bench/results/{section}.json: figure names differ from the recomputed ones: "
        f"{sorted({f['name'] for f in figures} ^ set(want))}")
    for fig in figures:
        value, ratio = want[fig["name"]]
        for what, have, should in (("value", fig.get("value"), value), ("ratio", fig.get("ratio"), ratio)):
            if should is None:
                assert have is None, f"bench/results/{section}.json: {fig['name']!r} has a {what} ({have}) " \
                                     "its detail does not give"
                continue
            assert have == pytest.approx(should, rel=2e-3, abs=1e-9), (
                f"bench/results/{section}.json: figure {fig['name']!r} {what} is {have}, its detail gives {should:.6g}")


# ---- the same figures where prose quotes them -------------------------------------------------------------

def _v(section: str, name: str) -> float:
    value = derived(section)[name][0]
    assert value is not None
    return value


def _r(section: str, name: str) -> float:
    ratio = derived(section)[name][1]
    assert ratio is not None
    return ratio


def q(value: float, digits: int) -> str:
    """``value`` rounded to ``digits`` as prose may quote it: from the raw figure, or from the two decimals
    the RESULTS.md table shows, as its reader does (11.7486 is 11.75 there: 11.7 or 11.8 in a sentence).
    Either is accepted: the words hold a marked choice that :func:`_candidates` expands."""
    raw = f"{value:.{digits}f}"
    shown = str(Decimal(f"{value:.2f}").quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))
    return raw if raw == shown else f"\x00{raw}\x01{shown}\x00"


def _candidates(words: str) -> list[str]:
    parts = words.split("\x00")
    out = [""]
    for i, part in enumerate(parts):
        choices = part.split("\x01") if i % 2 else [part]
        out = [o + c for o in out for c in choices]
    return out


def _minutes(*sections: str) -> int:
    """How long the sections' committed runs took together, in whole minutes (at least 1)."""
    return max(1, round(sum(_record(s)["duration_s"] for s in sections) / 60))


def quotes() -> list[tuple[str, str]]:
    """(where, the exact words there), each number formatted from the recomputed figures."""
    cpu_main = _v("cpu", "main process CPU per page")
    cpu_ratio = _r("cpu", "main process CPU per page")
    cpu_render = _v("cpu", "render processes' CPU per page")
    eff = _v("cpu", "client-bound efficiency (CPU): render alone / whole pipeline")
    rounds = sorted(_record("cpu")["detail"]["rounds"], key=lambda r: r["efficiency"])
    alone = rounds[len(rounds) // 2]["render_alone_cpu_ms_per_page"]
    alone_each = [r["render_alone_cpu_ms_per_page"] for r in rounds]
    feed = round(1000 / cpu_main, -1)
    cb = "instant server (client-bound)"
    ours, ours_r = derived("throughput")[f"ours, {cb}"]
    up = _v("throughput", f"upstream 0.4.27, {cb}")
    x = _r("throughput", f"ours / upstream, {cb}")
    up_cpu, cpu_x = derived("throughput")[f"CPU per page, upstream / ours, {cb}"]
    limit = ours / (ours_r or 1)
    gpu_like = [r for n, (_, r) in derived("throughput").items() if n.startswith("ours, GPU-like") and r]
    render = derived("render")
    one_wall, one_ratio = render["ours, pages/s per core (wall)"]
    two, two_ratio = render["ours render+PNG+base64, 2 processes"]
    mem = derived("memory")
    m100 = mem["peak RSS, 100 pages queued"][0]
    m10k, m_ratio = mem["peak RSS, 10,000 pages queued"]
    pss, _ = mem["ours vs upstream 0.4.27, 10,000 pages queued (PSS)"]
    up_pss = _record("memory")["detail"]["upstream_pages_10000"]["peak_pss_mb"]
    read = _record("reading")["detail"]
    f16 = derived("fleet16")
    f16_whole = f16["16 servers x 2 p/s: throughput (whole command)"][1]
    f16_main = f16["16 servers: main process CPU per page"][0]
    fleet = derived("fleet")
    prov = _record("providers")["detail"]
    probes = derived("probes")
    rec = derived("recovery")
    results = "bench/results/{}.json notes"
    return [
        (results.format("cpu"), f"the main process costs {cpu_main:.2f} ms CPU a page"),
        (results.format("cpu"), f"{cpu_ratio:.2f} of the render processes' {q(cpu_render, 1)} ms"),
        (results.format("cpu"), f"could feed about {q(feed, 0)} pages/s"),
        (results.format("cpu"), f"took {q(alone, 1)} ms a page: the pipeline spends {eff:.2f} of that"),
        (results.format("render"), f"makes {q(one_wall, 1)} pages a second on one core, {q(one_ratio, 1)}x `pdftoppm`"),
        (results.format("render"), f"and {q(two, 1)} pages/s in two processes ({q(two_ratio, 1)}x)"),
        (results.format("throughput"), f"made {q(ours, 1)} pages/s in the median round, {ours_r:.2f} of the render limit"),
        (results.format("throughput"), f"({q(limit, 1)} pages/s: a command"),
        (results.format("throughput"), f"Upstream 0.4.27 made {up:.2f} pages/s"),
        (results.format("throughput"), f"**{q(x, 1)}x** in pages/s"),
        (results.format("throughput"), f"**{q(cpu_x, 1)}x** in CPU seconds a page"),
        (results.format("throughput"), f"({q(up_cpu, 0)} ms against {q(up_cpu / cpu_x, 1)} ms)"),
        (results.format("throughput"), f"({min(gpu_like):.2f}-{max(gpu_like):.2f} of a GPU-like server)"),
        (results.format("memory"), f"{q(m10k, 0)} MB peak (all processes, RSS) with 10,000 pages queued against "
                                   f"{q(m100, 0)} MB with 100 (ratio {m_ratio:.2f}"),
        (results.format("memory"), f"holds {q(up_pss, 0)} MB PSS"),
        (results.format("memory"), f"against our {q(pss, 0)} MB PSS"),
        (results.format("reading"), f"reads {read['read']['pages_per_s']:.2f} pages/s on 2 cores at "
                                    f"{read['read']['cpu_s_per_page']:.2f} CPU-s a page, "
                                    f"1/{q(read['canned']['pages_per_s'] / read['read']['pages_per_s'], 0)} of the canned "
                                    f"stand-in's {q(read['canned']['pages_per_s'], 0)} pages/s"),
        (results.format("probes"), f"`GET /readyz` takes {q(probes['GET /readyz latency (median)'][0], 1)} ms"),
        (results.format("probes"), f"takes {q(probes['exec probe (olmocr-server-status)'][0], 0)} ms, a new interpreter"),
        (results.format("probes"), f"still answers in {probes['GET /readyz, supervisord wedged (median)'][0]:.2f} ms"),
        (results.format("fleet16"), f"kept 16 servers at {f16_whole:.2f} of their summed 32 pages/s"),
        (results.format("fleet16"), f"took {q(f16_main, 1)} ms CPU a page"),
        (results.format("fleet"), f"made {q(fleet['3 servers 8+4+2 p/s: throughput'][0], 1)} pages/s, "
                                  f"{fleet['3 servers 8+4+2 p/s: throughput'][1]:.2f} of the summed 14"),
        (results.format("fleet"), f"served {q(fleet['4 p/s server killed: throughput of the rest'][0], 1)} pages/s"),
        (results.format("fleet"), f"ran at {fleet['high priority beside a bulk run: throughput'][1]:.2f} of its solo speed"),
        (results.format("recovery"), f"again after {q(rec['kill -9 -> serving again'][0], 1)} s"),
        (results.format("recovery"), f"healthy after {q(rec['kill -9 -> status healthy'][0], 1)} s"),
        (results.format("recovery"), f"killed after {q(rec['hang -> detected and killed'][0], 1)} s, healthy again "
                                     f"after {q(rec['hang -> status healthy'][0], 1)} s"),
        # the guides
        ("docs/benchmarks.md", f"the 16-server fleet (~{_minutes('cpu', 'fleet16')} min)"),
        ("docs/benchmarks.md", f"`bench/run multigpu` takes about {_minutes('multigpu')} minutes"),
        ("docs/benchmarks.md", f"about {_minutes('storm')} minutes"),
        ("docs/reliability.md", f"about {_minutes('storm')} minutes on 2 cores"),
        ("docs/benchmarks.md", f"took {q(min(alone_each), 1)} to {q(max(alone_each), 1)} ms CPU a page over its "
                               f"{len(alone_each)} rounds"),
        ("docs/pipeline.md", f"{cpu_main:.2f} ms CPU a page, {cpu_ratio:.2f} of what the render processes spend"),
        ("docs/pipeline.md", f"could feed ~{q(feed, 0)} pages/s"),
        ("docs/pipeline.md", f"16 servers at {f16_whole:.2f} of their summed capacity"),
        ("docs/pipeline.md", f"{ours_r:.2f} of the render limit on that server"),
        ("docs/pipeline.md", f"{eff:.2f} of a render-only command's CPU a page"),
        ("docs/pipeline.md", f"{q(x, 1)}x upstream 0.4.27 in pages/s and {q(cpu_x, 1)}x in CPU seconds a page"),
        ("docs/pipeline.md", f"{min(gpu_like):.2f}-{max(gpu_like):.2f} of a GPU-like server's capacity"),
        ("docs/pipeline.md", f"{q(m10k, 0)} MB (all processes) with 10,000 pages queued, {q(m100, 0)} MB with 100"),
        ("docs/standin.md", f"{read['read']['pages_per_s']:.2f} pages/s and {read['read']['cpu_s_per_page']:.2f} "
                            "CPU-s a page"),
        ("docs/kubernetes.md", f"it took {q(probes['exec probe (olmocr-server-status)'][0], 0)} ms, "
                               f"{q(probes['exec probe (olmocr-server-status)'][1], 0)} times a `GET /readyz`"),
        ("docs/fleet.md", f"{q(prov['paced']['admitted_per_minute'], 1)} requests a minute let through, "
                          f"{_r('providers', 'paced (#rpm=R): requests/min let through'):.2f} of R"),
        ("docs/fleet.md", f"{prov['unpaced_seconds']['throttled']} and {prov['unpaced_date']['throttled']} refusals"),
        *[("docs/benchmarks.md", q) for q in micro_quotes()],
    ]


def micro_quotes() -> list[str]:
    from bench.micro import quotes as micro

    return micro(_record("micro")["detail"])


def _text(where: str) -> str:
    if where.endswith(" notes"):
        return "\n".join(json.loads((REPO_ROOT / where.removesuffix(" notes")).read_text()).get("notes", []))
    return " ".join((REPO_ROOT / where).read_text().split())  # a quote may run across a line break


def test_prose_quotes_the_figures_its_results_give() -> None:
    wrong = [f"{where}: expected the words {' or '.join(map(repr, _candidates(words)))}"
             for where, words in quotes() if not any(c in _text(where) for c in _candidates(words))]
    assert not wrong, ("figures quoted in prose differ from what bench/results/*.json give (fix the prose, or "
                       "re-run the section):\n" + "\n".join(wrong))


def test_the_whole_suites_time_is_the_committed_runs_sum() -> None:
    """Within 15 %: other sections' owners re-run theirs, and a minute more or less is not a wrong claim."""
    total = sum(_record(s)["duration_s"] for s in SECTIONS) / 60
    for where, pattern in (("bench/run", r"everything \(about (\d+) minutes"),
                           ("docs/benchmarks.md", r"every section \(about (\d+) minutes")):
        found = re.search(pattern, (REPO_ROOT / where).read_text())
        assert found, f"{where}: no time given for the whole suite"
        assert abs(int(found.group(1)) - total) <= 0.15 * total, (
            f"{where} says the whole suite takes about {found.group(1)} minutes; the committed runs took "
            f"{total:.0f} together")


def test_the_micro_section_runs_and_gives_the_figures_its_detail_does(tmp_path) -> None:
    """``python -m bench --quick micro`` on a small generated corpus: every figure, each what its detail gives."""
    from bench import micro
    from bench.common import load_corpus
    from tests.sample_docs import write_text_pdf

    write_text_pdf(tmp_path / "doc.pdf", 3)
    figures, detail = micro.run(load_corpus(root=tmp_path), quick=True)
    assert [f.name for f in figures] == list(micro.FIGURES)
    want = _micro(json.loads(json.dumps(detail)))  # as committed: through JSON
    for fig in figures:
        value, ratio = want[fig.name]
        assert (fig.value, fig.ratio) == (pytest.approx(value), pytest.approx(ratio)), fig.name
    assert detail["png"]["pages"] == 3 and detail["handover"]["jobs"] == 400
    assert all(micro.quotes(detail))
