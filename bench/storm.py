"""The storm: every fault at once, nothing lost.

Two pipelines share one S3 workspace (moto in server mode, behind ``tests/fault_proxy.py``), each against
its own supervised stand-in server (the repository's ``supervisord.conf`` in a temp dir, as in
``bench/recovery.py``, with a fast health profile). In one run, while they work through the corpus:

* 20 ``kill -9`` of a server (10 each) and 5 hangs (the listener must detect and kill them);
* a wrong-model start (server A comes back serving another name; the operator fixes it and restarts);
* a crash loop on server B that ends in the given-up state, then ``supervisorctl start`` by an operator;
* ``kill -9`` of pipeline 1 and SIGTERM of pipeline 2, both restarted;
* 5% of S3 requests failing (503 SlowDown / 500 / connection reset before or after the request ran).

The same setup first runs without faults (the baseline). Figures: pages lost and duplicated and
documents unaccounted for (all must be 0), restarts counted by the deployments against the faults that
must cause one, and the storm's wall time against the baseline's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Corpus,
    Figure,
    ProcGroup,
    admin_control,
    count_output,
    log,
    make_tmpdir,
    our_env,
    wait_until,
)
from bench.recovery import FAST_HEALTH, PROGRAM, Deployment

KILLS_PER_SERVER = 10
HANGS = (3, 2)  # server A, server B
S3_FAULT_SHARE = 0.05
LEASE_S = 20
# Runs longer than this reset the consecutive-restart count (the kills are spaced further apart), and a
# crash loop is given up after this many restarts in a row.
HEALTH_ENV = {**FAST_HEALTH, "OLMOCR_RESTART_RESET_AFTER": "4", "OLMOCR_MAX_RESTART_ATTEMPTS": "3"}
# Each server answers 3 requests at a time after 1.2 s (for the 568-page corpus; scaled to the corpus
# size): the baseline lasts long enough (about two minutes) for the storm to hit it many times.
STANDIN_CONCURRENCY = 3
LATENCY_FOR_568_PAGES_S = 1.2


def standin_env(total_pages: int) -> dict[str, str]:
    latency = min(6.0, max(0.3, LATENCY_FOR_568_PAGES_S * 568 / max(1, total_pages)))
    return {"OLMOCR_STANDIN_LATENCY": f"{latency:.2f}", "OLMOCR_STANDIN_CONCURRENCY": str(STANDIN_CONCURRENCY)}


@dataclass
class Pipeline:
    """One pipeline process, restartable; every incarnation's exit status is kept."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_dir: Path
    proc: ProcGroup | None = None
    exits: list[int | None] = field(default_factory=list)
    starts: int = 0

    def start(self, with_inputs: bool = True) -> None:
        argv = self.argv if with_inputs else self.argv[: self.argv.index("--pdfs")]
        self.starts += 1
        self.proc = ProcGroup(argv, env=self.env, cwd=self.cwd, log_path=self.log_dir / f"{self.name}.log",
                              name=self.name)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.proc.stop()
        self.exits.append(rc)
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stop(grace=10)
            self.exits.append(self.proc.proc.returncode)


class Storm:
    """The fault schedule for one run; counts what it injected."""

    def __init__(self, deps: list[Deployment], controls: list[Path], pipes: list[Pipeline]) -> None:
        self.deps, self.controls, self.pipes = deps, controls, pipes
        self.injected: dict[str, int] = {"server kill -9": 0, "server hang": 0, "wrong-model start": 0,
                                         "crash loop": 0, "pipeline kill -9": 0, "pipeline SIGTERM": 0}
        self.expected_restarts = [0, 0]  # automatic restarts each fault must cause, per server
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def note(self, what: str, **kw: Any) -> None:
        with self._lock:
            self.events.append({"t": round(time.monotonic() - self.t0, 1), "event": what, **kw})
        log(f"storm +{time.monotonic() - self.t0:5.1f}s: {what} {kw if kw else ''}")

    # -- server faults ------------------------------------------------------------------------------
    def _pid(self, i: int) -> int:
        return int(self.deps[i].info()["pid"])

    def _healthy_again(self, i: int, since: float, timeout: float = 120) -> None:
        self.deps[i].wait_healthy(timeout, since=since)

    def kill(self, i: int) -> None:
        dep = self.deps[i]
        dep.remember_children()
        pid = self._pid(i)
        since = time.time()
        os.kill(pid, signal.SIGKILL)
        self.injected["server kill -9"] += 1
        self.expected_restarts[i] += 1
        self.note("server kill -9", server="AB"[i], pid=pid)
        self._healthy_again(i, since)

    def hang(self, i: int) -> None:
        dep = self.deps[i]
        dep.remember_children()
        pid = self._pid(i)
        admin_control(dep.base_url, {"hang": True})
        self.injected["server hang"] += 1
        self.expected_restarts[i] += 1
        self.note("server hang", server="AB"[i], pid=pid)

        def killed() -> bool:
            dep.remember_children()
            info = dep.info()
            return info["pid"] != pid or info["statename"] != "RUNNING"

        wait_until(killed, 120, 0.2, "hung server killed")
        since = time.time()
        self.note("hang detected, server killed by the listener", server="AB"[i])
        self._healthy_again(i, since)

    def wrong_model(self, i: int) -> None:
        """The server comes back serving another model name; an operator notices and fixes it."""
        dep = self.deps[i]
        self.controls[i].write_text(json.dumps({"served_model_name": "not-olmocr"}))
        dep.remember_children()
        pid = self._pid(i)
        os.kill(pid, signal.SIGKILL)  # the restart picks up the bad configuration
        self.injected["wrong-model start"] += 1
        self.expected_restarts[i] += 1
        self.note("wrong-model start", server="AB"[i])

        def config_error_seen() -> bool:
            dep.remember_children()
            health = dep.stats().get("health") or {}
            return "not served" in str(health.get("reason", ""))

        wait_until(config_error_seen, 90, 0.5, "the listener reporting the wrong model")
        self.note("listener reports the wrong model; operator fixes it and restarts", server="AB"[i])
        self.controls[i].write_text("{}")
        since = time.time()
        subprocess.run(dep.supervisorctl_argv("restart", PROGRAM), capture_output=True, timeout=120, check=False)
        self._healthy_again(i, since)

    def crash_loop(self, i: int) -> None:
        """Every start crashes after 0.5 s until the listener gives up; an operator then starts it."""
        dep = self.deps[i]
        before = dep.stats().get("restarts", 0)
        self.controls[i].write_text(json.dumps({"crash_after": 0.5}))
        self.injected["crash loop"] += 1
        self.note("crash loop begins", server="AB"[i])

        def given_up() -> bool:
            dep.remember_children()
            stats = dep.stats()
            return bool(stats.get("gave_up")) or dep.info()["statename"] == "FATAL"

        wait_until(given_up, 120, 0.3, "the crash loop given up")
        loop_restarts = dep.stats().get("restarts", 0) - before
        # The listener stops it at the start that makes MAX_RESTART_ATTEMPTS + 1 restarts in a row (that
        # start is counted too).
        self.expected_restarts[i] += int(HEALTH_ENV["OLMOCR_MAX_RESTART_ATTEMPTS"]) + 1
        info, stats = dep.info(), dep.stats()
        self.note("given up", server="AB"[i], state=info["statename"], gave_up=stats.get("gave_up"),
                  restarts_in_loop=loop_restarts)
        self.crash_loop_detail = {"restarts_in_loop": loop_restarts, "state": info["statename"],
                                  "gave_up_reason": stats.get("gave_up_reason")}
        time.sleep(3)  # the operator reads the log
        self.controls[i].write_text("{}")
        since = time.time()
        t = time.monotonic()
        out = subprocess.run(dep.supervisorctl_argv("start", PROGRAM), capture_output=True, text=True,
                             timeout=120, check=False)
        self.note("operator: supervisorctl start", server="AB"[i], output=out.stdout.strip())
        self._healthy_again(i, since)
        self.crash_loop_detail["operator_start_to_healthy_s"] = round(time.monotonic() - t, 1)

    def server_schedule(self, i: int) -> None:
        kills, hangs = KILLS_PER_SERVER, HANGS[i]
        special = self.wrong_model if i == 0 else self.crash_loop
        plan: list[Any] = []
        # Interleaved so that every kind of fault lands early, while the pipelines are busy.
        for n in range(kills):
            plan.append(self.kill)
            if n < hangs:
                plan.append(self.hang)
            if n == 1:
                plan.append(special)
        time.sleep(4 + 3 * i)
        for step in plan:
            try:
                step(i)
            except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                self.errors.append(f"server {'AB'[i]} {step.__name__}: {exc}")
                self.note("fault step failed", server="AB"[i], step=step.__name__, error=str(exc)[:200])
            time.sleep(1.0)  # runs between faults outlast OLMOCR_RESTART_RESET_AFTER with the startup

    # -- pipeline faults ----------------------------------------------------------------------------
    def pipeline_schedule(self) -> None:
        try:
            time.sleep(25)
            p1 = self.pipes[0]
            if p1.running():
                assert p1.proc is not None
                p1.proc.signal_group(signal.SIGKILL)
                p1.wait(10)
                self.injected["pipeline kill -9"] += 1
                self.note("pipeline 1 kill -9 (its leases must expire)")
                time.sleep(3)
                p1.start(with_inputs=False)
                self.note("pipeline 1 restarted")
            time.sleep(25)
            p2 = self.pipes[1]
            if p2.running():
                assert p2.proc is not None
                os.kill(p2.proc.pid, signal.SIGTERM)
                self.injected["pipeline SIGTERM"] += 1
                t = time.monotonic()
                rc = p2.wait(60)
                self.note("pipeline 2 SIGTERM", exit_status=rc, stop_s=round(time.monotonic() - t, 1))
                self.sigterm_exit = rc
                p2.start(with_inputs=False)
                self.note("pipeline 2 restarted")
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"pipeline schedule: {exc}")


def _pipeline_argv(ws_url: str, server_url: str, pdfs: list[Path]) -> list[str]:
    return [sys.executable, "-m", "olmocr.pipeline", ws_url, "--vllm-url", server_url,
            "--pages_per_group", "20", "--workers", "4", "--render_processes", "2",
            "--target_longest_image_dim", "512", "--lease_seconds", str(LEASE_S), "--request_timeout", "30",
            "--stop_timeout", "5", "--progress_interval", "10", "--pdfs", *[str(p) for p in pdfs]]


def _download(client: Any, bucket: str, prefix: str, dest: Path) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            if rel.startswith(("results/", "failed/", "done_flags/", "worker_locks/")):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())


def _failed_sources(ws: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in sorted((ws / "failed").glob("*.jsonl")) if (ws / "failed").is_dir() else []:
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[str(rec.get("source"))] = str(rec.get("reason"))
    return out


def _one_run(name: str, corpus: Corpus, deps: list[Deployment], controls: list[Path], s3: dict[str, Any],
             proxy: Any, log_dir: Path, with_faults: bool) -> dict[str, Any]:
    prefix = f"{name}-{uuid.uuid4().hex[:6]}"
    ws_url = f"s3://{s3['bucket']}/{prefix}"
    env = {**our_env(), "AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("AWS_PROFILE", None)
    tmp = make_tmpdir(f"storm-{name}")
    run_logs = log_dir / name
    run_logs.mkdir(parents=True, exist_ok=True)
    pipes = [Pipeline(f"pipeline{i + 1}", _pipeline_argv(ws_url, deps[i].base_url, corpus.pdfs), env, tmp, run_logs)
             for i in range(2)]
    restarts0 = [d.stats().get("restarts", 0) for d in deps]
    proxy.counts.clear()
    share = S3_FAULT_SHARE if with_faults else 0.0
    proxy.error_rate, proxy.drop_rate = share / 2, share / 2
    storm = Storm(deps, controls, pipes)
    t0 = time.monotonic()
    for p in pipes:
        p.start()
    threads = []
    if with_faults:
        threads = [threading.Thread(target=storm.server_schedule, args=(i,), daemon=True) for i in range(2)]
        threads.append(threading.Thread(target=storm.pipeline_schedule, daemon=True))
        for t in threads:
            t.start()
    try:
        # Wait for the pipelines to drain the queue. A pipeline that exits while the other still works (it
        # found nothing claimable) is fine; one that exits non-zero is restarted, as an operator would.
        deadline = time.monotonic() + 900
        end = None
        while time.monotonic() < deadline:
            time.sleep(1)
            if with_faults and any(t.is_alive() for t in threads[2:]):
                continue  # the pipeline schedule restarts them itself
            if all(not p.running() for p in pipes):
                for p in pipes:
                    if p.proc is not None and p.proc.poll() is not None and len(p.exits) < p.starts:
                        p.exits.append(p.proc.poll())
                        p.proc.stop()
                if all(p.exits and p.exits[-1] == 0 for p in pipes):
                    end = time.monotonic()
                    break
                for p in pipes:
                    if p.exits and p.exits[-1] not in (0, None):
                        log(f"storm: {p.name} exited {p.exits[-1]}; restarting it")
                        p.start(with_inputs=False)
        wall = (end or time.monotonic()) - t0
        for t in threads:
            t.join(timeout=600)
    finally:
        for p in pipes:
            p.stop()
        proxy.error_rate = proxy.drop_rate = 0.0
        for c in controls:
            c.write_text("{}")
    ws = tmp / "ws"
    _download(s3["client"], s3["bucket"], prefix, ws)
    count = count_output(ws, corpus.pages)
    failed = _failed_sources(ws)
    written = set()
    for f in sorted((ws / "results").glob("*.jsonl")) if (ws / "results").is_dir() else []:
        for line in f.read_text().splitlines():
            if line.strip():
                written.add(os.path.realpath(json.loads(line)["metadata"]["Source-File"]))
    unaccounted = [str(p) for p in corpus.pdfs
                   if os.path.realpath(p) not in written and str(p) not in failed]
    leftover_locks = len(list((ws / "worker_locks").glob("*"))) if (ws / "worker_locks").is_dir() else 0
    restarts = [d.stats().get("restarts", 0) - r0 for d, r0 in zip(deps, restarts0, strict=True)]
    shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "completed": end is not None, "wall_s": round(wall, 1), "output": count.as_dict(),
        "written": sorted(written),
        "failed_documents": failed, "unaccounted": unaccounted, "leftover_locks": leftover_locks,
        "pipeline_exits": {p.name: p.exits for p in pipes}, "pipeline_starts": {p.name: p.starts for p in pipes},
        "restarts_counted": restarts, "restarts_expected": storm.expected_restarts,
        "faults_injected": storm.injected, "s3_requests": dict(proxy.counts),
        "events": storm.events, "errors": storm.errors,
        "crash_loop": getattr(storm, "crash_loop_detail", None), "sigterm_exit": getattr(storm, "sigterm_exit", None),
    }
    log(f"storm[{name}]: done={end is not None} wall {wall:.0f}s, pages {count.pages} (lost {count.lost_pages}, "
        f"duplicated {count.duplicate_pages}), unaccounted {len(unaccounted)}, restarts {restarts} "
        f"(expected {storm.expected_restarts}), S3 {dict(proxy.counts)}")
    return result


def run(corpus: Corpus, quick: bool = False) -> tuple[list[Figure], dict]:
    from bench.common import OUT_DIR

    sys.path.insert(0, str(REPO))
    from tests.fault_proxy import FaultProxy
    from tests.s3_helpers import start_s3_server

    log_dir = OUT_DIR / "logs" / "storm"
    log_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log: thousands of lines
    standin = standin_env(corpus.total_pages)
    detail: dict[str, Any] = {"corpus": corpus.describe(), "health_env": HEALTH_ENV, "standin_env": standin,
                              "lease_s": LEASE_S, "s3_fault_share": S3_FAULT_SHARE}
    ctl_dir = make_tmpdir("storm-control")
    controls = [ctl_dir / "server-a.json", ctl_dir / "server-b.json"]
    for c in controls:
        c.write_text("{}")
    endpoint, stop_s3 = start_s3_server()
    proxy = FaultProxy(endpoint, seed=5).start()
    deps: list[Deployment] = []
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench")
        bucket = f"storm-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        s3 = {"client": client, "bucket": bucket}
        for i, c in enumerate(controls):
            dep_logs = log_dir / f"server-{'ab'[i]}"
            dep_logs.mkdir(exist_ok=True)
            deps.append(Deployment(dep_logs, HEALTH_ENV, {**standin, "OLMOCR_STANDIN_CONTROL": str(c)}))
        for d in deps:
            d.wait_healthy(120, since=0)
        log(f"storm: two deployments healthy on ports {[d.port for d in deps]}; moto at {endpoint} behind {proxy.url}")
        detail["baseline"] = _one_run("baseline", corpus, deps, controls, s3, proxy, log_dir, with_faults=False)
        detail["storm"] = _one_run("storm", corpus, deps, controls, s3, proxy, log_dir, with_faults=True)
        # Pages lost: of documents the baseline wrote, those the storm did not (a document that fails on
        # its own, faults or not, is not the storm's loss; it must still be accounted for).
        pages = {os.path.realpath(p): n for p, n in corpus.pages.items()}
        missing = set(detail["baseline"]["written"]) - set(detail["storm"]["written"])
        detail["storm"]["lost_vs_baseline"] = {"documents": sorted(missing),
                                               "pages": sum(pages.get(m, 0) for m in missing)}
    finally:
        for d in deps:
            with contextlib.suppress(Exception):
                d.stop()
        proxy.stop()
        stop_s3()
        shutil.rmtree(ctl_dir, ignore_errors=True)
    return _figures(detail), detail


def _figures(detail: dict[str, Any]) -> list[Figure]:
    base, st = detail["baseline"], detail["storm"]
    out = st["output"]
    figs: list[Figure] = []

    def zero(name: str, value: int, unit: str, context: str) -> Figure:
        return Figure("storm", name, float(value), unit, "must be 0", target="0", ok=value == 0 and st["completed"],
                      context=context)

    lost = st["lost_vs_baseline"]["pages"]
    figs.append(zero("pages lost", lost, "pages",
                     f"{out['pages']} pages written (baseline {base['output']['pages']}) of {detail['corpus']}"))
    figs.append(zero("pages duplicated", out["duplicate_pages"], "pages",
                     f"{out['duplicate_documents']} duplicate documents"))
    figs.append(zero("documents unaccounted for", len(st["unaccounted"]), "docs",
                     f"neither in results nor failed; {len(st['failed_documents'])} failed with a reason "
                     f"(baseline {len(base['failed_documents'])})"))
    inj = st["faults_injected"]
    counted, expected = sum(st["restarts_counted"]), sum(st["restarts_expected"])
    figs.append(Figure("storm", "server restarts counted / caused by faults", float(counted), "restarts",
                       f"{expected} restarts the faults must cause", ratio=counted / expected if expected else None,
                       target="1.00", ok=counted == expected,
                       context=f"{inj['server kill -9']} kill -9, {inj['server hang']} hangs, "
                               f"{inj['wrong-model start']} wrong-model start, crash loop "
                               f"{(st.get('crash_loop') or {}).get('restarts_in_loop', '?')} restarts "
                               f"then given up ({(st.get('crash_loop') or {}).get('state', '?')})"))
    cl = st.get("crash_loop") or {}
    figs.append(Figure("storm", "crash loop given up, operator start -> healthy",
                       cl.get("operator_start_to_healthy_s"), "s", "supervisorctl start after the give-up",
                       ok=bool(cl) and cl.get("operator_start_to_healthy_s") is not None,
                       context=f"state {cl.get('state')}; {str(cl.get('gave_up_reason') or '')[:60]}"))
    figs.append(Figure("storm", "pipeline kill -9 + SIGTERM, both restarted", float(
        inj["pipeline kill -9"] + inj["pipeline SIGTERM"]), "faults", "2 injected", target="2",
        ok=inj["pipeline kill -9"] == 1 and inj["pipeline SIGTERM"] == 1 and st.get("sigterm_exit") == 0,
        context=f"SIGTERM exit status {st.get('sigterm_exit')}; exits {st['pipeline_exits']}"))
    s3req = st["s3_requests"]
    total = sum(s3req.values())
    faults = total - s3req.get("forwarded", 0)
    figs.append(Figure("storm", "S3 requests failed by the proxy", float(faults), "requests",
                       f"{total} S3 requests", ratio=faults / total if total else None,
                       target=f"{S3_FAULT_SHARE:.2f}", context=json.dumps(s3req)))
    figs.append(Figure("storm", "wall time, storm / no faults", st["wall_s"], "s",
                       f"same run without faults: {base['wall_s']:.0f}s",
                       ratio=st["wall_s"] / base["wall_s"] if base["wall_s"] else None,
                       ok=st["completed"] and base["completed"],
                       context=f"fallback pages {out['fallback_pages']} (baseline {base['output']['fallback_pages']}); "
                               f"errors: {len(st['errors'])}"))
    return figs
