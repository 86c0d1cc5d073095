"""Recovery under the real supervisord deployment, with the stand-in in place of vLLM.

``supervisord -n -c supervisord.conf`` (the repository's config, copied into a temp dir so that
``%(here)s`` puts its socket, pid file and logs there) with ``OLMOCR_VLLM_BIN=scripts/vllm-standin``,
``OLMOCR_PORT`` and the health settings in the environment. While our pipeline runs over the corpus
against it:

1. ``kill -9`` of the server process (the pid supervisord reports): time until it serves a real
   completion again, and until the health listener reports it healthy again (status ``healthy``);
2. a hang (``POST /admin/control {"hang": true}``: completions stop, ``/health`` and ``/v1/models``
   stay 200): time until the listener detects it and kills the server, and until healthy again;
3. afterwards: pages lost or duplicated in the pipeline's output (must be 0) and its exit status.

Each time is compared with the nominal figure computed from the health settings, and with a bound
that models the listener's tick-driven probing (both in ``bounds()``); a plain ``vllm serve`` (or
upstream's pipeline) never detects a hang at all.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Corpus,
    Figure,
    ProcGroup,
    admin_control,
    completion_ok,
    count_output,
    free_port,
    log,
    make_tmpdir,
    our_env,
    our_pipeline_argv,
    wait_until,
)
from olmocr.server.listener import TICK_SECONDS, probe_start_slack

PROGRAM = "vllm"
TICK = TICK_SECONDS  # the listener wakes on supervisord's TICK_5 events
RESPAWN = 1.0  # supervisord's poll interval

# Full runs use the shipped defaults (what an operator gets); --quick uses a fast profile.
FAST_HEALTH = {
    "OLMOCR_HEALTH_INTERVAL": "2",
    "OLMOCR_HEALTH_TIMEOUT": "2",
    "OLMOCR_HEALTH_COMPLETION_TIMEOUT": "3",
    "OLMOCR_HEALTH_FAILURE_THRESHOLD": "3",
    "OLMOCR_RESTART_DELAY": "1",
    "OLMOCR_HEALTH_KILL_GRACE": "5",
}


def _bin_dir() -> Path:
    return Path(sys.executable).parent


class Deployment:
    """The repository's supervisord deployment in a temp dir, in the foreground (``-n``) in its own
    process group. ``stop()`` shuts supervisord down and then kills, by pid, every process it was
    seen to have spawned that is still alive (a ``kill -9`` orphans the stand-in's engine child)."""

    def __init__(self, log_dir: Path, health_env: dict[str, str] | None = None,
                 standin_env: dict[str, str] | None = None) -> None:
        conf_src = REPO / "supervisord.conf"
        if not conf_src.exists():
            raise FileNotFoundError(f"{conf_src} not found: the deployment is not in this checkout yet")
        self.dir = make_tmpdir("deploy")
        (self.dir / "run").mkdir()
        (self.dir / "logs").mkdir()
        self.conf = self.dir / "supervisord.conf"
        shutil.copy(conf_src, self.conf)
        # The config runs %(here)s/scripts/...: link the checkout's scripts/ beside the copy (they
        # resolve the link and find the checkout's interpreter, as the tests do).
        (self.dir / "scripts").symlink_to(REPO / "scripts")
        self.port = free_port()
        env = dict(os.environ)
        env["PATH"] = f"{_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
        env["OLMOCR_VLLM_BIN"] = str(REPO / "scripts" / "vllm-standin")
        env["OLMOCR_PYTHON"] = sys.executable
        env["OLMOCR_PORT"] = str(self.port)
        self.status_port = free_port()  # the status service ([program:olmocr-status]), never the shared default
        env["OLMOCR_STATUS_PORT"] = str(self.status_port)
        env.update(health_env or {})
        env.update(standin_env or {})
        self.env = env
        self.health_env = dict(health_env or {})
        self.log_dir = log_dir
        self._seen: dict[int, float] = {}
        self.proc = ProcGroup([str(_bin_dir() / "supervisord"), "-n", "-c", str(self.conf)], env=env,
                              cwd=self.dir, log_path=log_dir / "supervisord-stdout.log", name="supervisord")

    # -- XML-RPC -----------------------------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        return str(self.dir / "run" / "supervisor.sock")

    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        # A fresh transport per call: SupervisorTransport stays broken after one failed connect.
        return xmlrpc.client.ServerProxy("http://127.0.0.1",
                                         transport=SupervisorTransport(None, None, "unix://" + self.socket_path))

    def info(self) -> dict:
        return self.rpc().supervisor.getProcessInfo(PROGRAM)

    def stats(self) -> dict:
        return self.rpc().olmocr.getProcessStats(PROGRAM)

    def healthy_since(self, t_wall: float) -> bool:
        """The listener recorded a healthy probe made after wall-clock time ``t_wall``."""
        info = self.info()
        if info["statename"] != "RUNNING":
            return False
        h = self.stats().get("health") or {}
        return bool(h.get("healthy")) and float(h.get("time") or 0) > t_wall

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status_argv(self) -> list[str]:
        return [str(_bin_dir() / "olmocr-server-status"), "-c", str(self.conf)]

    def supervisorctl_argv(self, *args: str) -> list[str]:
        return [str(_bin_dir() / "supervisorctl"), "-c", str(self.conf), *args]

    def remember_children(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self._seen[p.pid] = p.create_time()

    def wait_healthy(self, timeout: float, since: float = 0.0) -> float:
        def ok() -> bool:
            self.remember_children()
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited:\n{self.proc.log_tail()}")
            return self.healthy_since(since)

        return wait_until(ok, timeout, interval=0.2, what="deployment healthy")

    def stop(self) -> None:
        import psutil

        self.remember_children()
        if self.proc.poll() is None:
            self.proc.signal_group(signal.SIGTERM)  # supervisord stops its programs (stopasgroup)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        self.proc.stop(grace=5)
        for pid, created in self._seen.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01:
                    log(f"deployment: killing leftover pid {pid} ({' '.join(p.cmdline()[:3])})")
                    p.kill()
        # Keep the deployment's logs next to the benchmark's.
        with contextlib.suppress(OSError):
            shutil.copytree(self.dir / "logs", self.log_dir / "deployment-logs", dirs_exist_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ticks(seconds: float) -> float:
    """``seconds`` rounded up to whole TICK_5 periods."""
    return math.ceil(seconds / TICK - 1e-9) * TICK


def bounds(settings: dict[str, float]) -> dict[str, float]:
    """Two readings of the health settings (seconds).

    *Nominal* is what an operator computes from the settings alone:
    - after ``kill -9``: ``restart_delay`` then one probe ``interval``;
    - a hang is killed after ``failure_threshold`` failed probes back to back, each taking the longer
      of ``interval`` and ``completion_timeout`` (a probe waits for its completion before the next).

    *Tick model* adds the listener's design, as a worst case: it acts only on supervisord events
    (TICK_5). A probe starts at the first tick at which its interval has (nearly: half a tick of
    slack) elapsed; a probe that times out is collected at the first tick after it ended (a little
    after ``completion_timeout``), and the next one starts on that same tick. The hang may begin just
    after a probe started.
    """
    interval, ctimeout = settings["interval"], settings["completion_timeout"]
    f = settings["failure_threshold"]
    nominal_kill = settings["restart_delay"] + interval
    nominal_hang = f * max(interval, ctimeout)
    period_ok = max(_ticks(interval - probe_start_slack(interval)), TICK)
    period_hung = max(period_ok, math.floor(ctimeout / TICK) * TICK + TICK)  # first tick after it ends
    tick_kill = RESPAWN + settings["restart_delay"] + period_ok + TICK
    tick_hang = period_ok + f * period_hung
    return {"nominal_kill_to_healthy": nominal_kill, "nominal_hang_to_kill": nominal_hang,
            "nominal_hang_to_healthy": nominal_hang + nominal_kill,
            "tick_model_kill_to_healthy": tick_kill, "tick_model_hang_to_kill": tick_hang,
            "tick_model_hang_to_healthy": tick_hang + settings["kill_grace"] + tick_kill}


def _effective_settings(env: dict[str, str]) -> dict[str, float]:
    try:
        from olmocr.server.settings import ServerSettings

        s = ServerSettings.from_env(env)
        return {"interval": s.health_interval, "completion_timeout": s.completion_timeout,
                "failure_threshold": s.failure_threshold, "restart_delay": s.restart_delay,
                "kill_grace": s.kill_grace}
    except Exception:  # noqa: BLE001 - fall back to the documented defaults
        d = {"interval": 10.0, "completion_timeout": 18.0, "failure_threshold": 3, "restart_delay": 10.0,
             "kill_grace": 15.0}
        m = {"OLMOCR_HEALTH_INTERVAL": "interval", "OLMOCR_HEALTH_COMPLETION_TIMEOUT": "completion_timeout",
             "OLMOCR_HEALTH_FAILURE_THRESHOLD": "failure_threshold", "OLMOCR_RESTART_DELAY": "restart_delay",
             "OLMOCR_HEALTH_KILL_GRACE": "kill_grace"}
        for k, v in m.items():
            if k in env:
                d[v] = float(env[k])
        return d


def _serving(url: str) -> bool:
    return completion_ok(url, timeout=2)


def run(corpus: Corpus, quick: bool = False) -> tuple[list[Figure], dict]:
    from bench.common import OUT_DIR

    log_dir = OUT_DIR / "logs" / "recovery"
    log_dir.mkdir(parents=True, exist_ok=True)
    health_env = dict(FAST_HEALTH) if quick else {}
    # The stand-in answers after 1 s, 8 at a time (8 pages/s), so the pipeline is mid-run for both events.
    standin_env = {"OLMOCR_STANDIN_LATENCY": "1.0", "OLMOCR_STANDIN_CONCURRENCY": "8" if not quick else "4"}
    settings = _effective_settings({**os.environ, **health_env})
    bound = bounds(settings)
    detail: dict[str, Any] = {"health_settings": settings, "profile": "fast" if quick else "defaults",
                              "bounds_s": bound, "standin": standin_env, "corpus": corpus.describe()}
    figs: list[Figure] = []

    dep = Deployment(log_dir, health_env, standin_env)
    pipe = None
    try:
        t0 = time.monotonic()
        dep.wait_healthy(120, since=0)
        detail["start_to_healthy_s"] = time.monotonic() - t0
        log(f"recovery: deployment healthy after {detail['start_to_healthy_s']:.1f}s on port {dep.port}")
        restarts0 = dep.stats().get("restarts", 0)

        tmp = make_tmpdir("recovery-ws")
        ws = tmp / "ws"
        pipe = ProcGroup(our_pipeline_argv(ws, dep.base_url, corpus.pdfs), env=our_env(), cwd=tmp,
                         log_path=log_dir / "pipeline.log", name="pipeline")
        time.sleep(8)

        # -- 1. kill -9 --------------------------------------------------------------------------
        dep.remember_children()
        pid = dep.info()["pid"]
        log(f"recovery: kill -9 {pid} (pipeline running: {pipe.poll() is None})")
        t_kill, wall_kill = time.monotonic(), time.time()
        os.kill(pid, signal.SIGKILL)
        t_serving = wait_until(lambda: _serving(dep.base_url), 300, 0.1, "serving after kill -9")
        t_healthy = dep.wait_healthy(300, since=wall_kill)
        kill_serving, kill_healthy = t_serving - t_kill, t_healthy - t_kill
        log(f"  serving again after {kill_serving:.1f}s, healthy after {kill_healthy:.1f}s")
        detail["kill9"] = {"pid": pid, "to_serving_s": kill_serving, "to_healthy_s": kill_healthy,
                           "pipeline_running": pipe.poll() is None}
        time.sleep(3)

        # -- 2. hang ------------------------------------------------------------------------------
        dep.remember_children()
        pid = dep.info()["pid"]
        pipeline_running_at_hang = pipe.poll() is None
        log(f"recovery: hang {pid} (pipeline running: {pipeline_running_at_hang})")
        t_hang = time.monotonic()
        admin_control(dep.base_url, {"hang": True})

        def killed() -> bool:
            dep.remember_children()
            info = dep.info()
            return info["pid"] != pid or info["statename"] != "RUNNING"

        t_detect = wait_until(killed, 600, 0.1, "hung server killed")
        wall_detect = time.time()
        t_serving = wait_until(lambda: _serving(dep.base_url), 300, 0.1, "serving after hang")
        t_healthy = dep.wait_healthy(300, since=wall_detect)
        hang_kill, hang_serving, hang_healthy = t_detect - t_hang, t_serving - t_hang, t_healthy - t_hang
        log(f"  killed after {hang_kill:.1f}s, serving after {hang_serving:.1f}s, healthy after {hang_healthy:.1f}s")
        stats = dep.stats()
        detail["hang"] = {"pid": pid, "to_kill_s": hang_kill, "to_serving_s": hang_serving,
                          "to_healthy_s": hang_healthy, "pipeline_running": pipeline_running_at_hang,
                          "kill_reason": stats.get("last_failure_reason")}
        detail["restart_count_delta"] = stats.get("restarts", 0) - restarts0

        # -- 3. the pipeline finishes with every page exactly once -----------------------------------
        log("recovery: waiting for the pipeline to finish")
        try:
            rc = pipe.wait(timeout=900)
        except subprocess.TimeoutExpired:
            rc = None
        pipe.stop()
        count = count_output(ws, corpus.pages)
        detail["pipeline"] = {"rc": rc, "wall_s": time.monotonic() - t0, "output": count.as_dict(),
                              "log": str(log_dir / "pipeline.log")}
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"  pipeline rc={rc}: {count.pages}/{corpus.total_pages} pages, lost {count.lost_pages}, "
            f"duplicated {count.duplicate_pages}")

        # Status script latency on this deployment, while it is healthy.
        from bench import memory

        sfigs, sdet = memory.status_latency(dep)
        detail["status_latency"] = sdet
    finally:
        if pipe is not None:
            pipe.stop()
        dep.stop()

    prof = "fast profile" if quick else "default settings"

    def timing(name: str, measured: float, key: str, extra: str = "") -> Figure:
        nominal, model = bound[f"nominal_{key}"], bound[f"tick_model_{key}"]
        return Figure("recovery", name, measured, "s", f"nominal {nominal:.0f}s from {prof}{extra}",
                      ratio=measured / nominal, context=f"tick-model bound {model:.0f}s (ratio {measured / model:.2f})")

    figs += [
        timing("kill -9 -> serving again", kill_serving, "kill_to_healthy"),
        timing("kill -9 -> status healthy", kill_healthy, "kill_to_healthy"),
        timing("hang -> detected and killed", hang_kill, "hang_to_kill", "; plain vLLM: never"),
        timing("hang -> status healthy", hang_healthy, "hang_to_healthy"),
        Figure("recovery", "pipeline pages lost / duplicated across both", float(count.lost_pages + count.duplicate_pages),
               "pages", f"{corpus.total_pages} pages expected, each once", ratio=None, target="0",
               ok=count.lost_pages == 0 and count.duplicate_pages == 0 and rc == 0,
               context=f"lost {count.lost_pages}, duplicated {count.duplicate_pages}, rc {rc}, "
                       f"restarts counted {detail['restart_count_delta']}"),
    ]
    figs += sfigs
    return figs, detail
