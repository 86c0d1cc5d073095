"""Internal mode: the pipeline without --vllm-url runs its own supervised server (the stand-in here) and
stops it, with its whole process tree, however the run ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from olmocr.pipeline.stopping import BURST_S
from tests.pipeline_helpers import Standins, assert_every_page_once, failures, wait_for
from tests.sample_docs import write_text_docs
from tests.standin_helpers import (
    REPO_ROOT,
    STANDIN_SHIM,
    clean_env,
    free_port,
    free_port_run,
    stop_process_group,
)

pytestmark = pytest.mark.integration


class InternalRun:
    """``python -m olmocr.pipeline WS --pdfs ...`` with no server URL, in its own session; every descendant
    it ever had is remembered so that the test can check (and teardown ensure) that none is left."""

    def __init__(self, tmp_path: Path, pdfs: list[Path], *extra: str, control: dict | None = None,
                 port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp_path
        self.workspace = tmp_path / "ws"
        self.run_dir = tmp_path / "server-run"
        self.port = port or free_port()
        self.log = tmp_path / "pipeline.log"
        self.control_file = tmp_path / "control.json"
        self.control_file.write_text(json.dumps(control or {}))
        extra_env = env
        env = clean_env({
            "OLMOCR_VLLM_BIN": str(STANDIN_SHIM), "OLMOCR_PYTHON": sys.executable,
            "OLMOCR_STANDIN_CONTROL": str(self.control_file), "OLMOCR_RESTART_DELAY": "0.5",
            "OLMOCR_HEALTH_INTERVAL": "1", "OLMOCR_HEALTH_COMPLETION_TIMEOUT": "2",
            "OLMOCR_HEALTH_FAILURE_THRESHOLD": "2", "TMPDIR": str(tmp_path),
        })
        env.pop("OLMOCR_API_KEY", None)
        env.update(extra_env or {})
        cmd = [sys.executable, "-m", "olmocr.pipeline", str(self.workspace), "--pdfs", *map(str, pdfs),
               "--port", str(self.port), "--server_run_dir", str(self.run_dir), "--render_processes", "1",
               "--progress_interval", "2", *extra]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set[psutil.Process] = set()
        self._watching = True
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while self._watching:
            with contextlib.suppress(psutil.Error):
                self.seen |= set(psutil.Process(self.proc.pid).children(recursive=True))
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_output(self, text: str, timeout: float) -> None:
        wait_for(lambda: text in self.output() or self.proc.poll() is not None, timeout, repr(text))
        assert text in self.output(), self.output()[-3000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pipeline still running after {timeout}s:\n{self.output()[-3000:]}") from None

    def leftovers(self) -> list[str]:
        """Processes of the run still alive, as ``pid command line``."""
        found = []
        for proc in psutil.process_iter():  # also any straggler the watcher missed: it keeps the run's group
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(proc.pid) == self.proc.pid:
                    self.seen.add(proc)
        for proc in self.seen:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
        return found

    def assert_nothing_left(self, grace: float) -> None:
        """Nothing of the run alive ``grace`` seconds after it ended (multiprocessing's resource tracker
        exits when it reads EOF from the dead pipeline, a moment later)."""
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self.leftovers(), grace, "every process of the run to exit")
        assert self.leftovers() == []

    def server_pid(self) -> int:
        return int(requests.get(f"{self.url}/admin/info", timeout=5).json()["pid"])

    def close(self) -> None:
        self._watching = False
        self._watcher.join(timeout=2)
        if self.proc.poll() is None:
            stop_process_group(self.proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers keep the pipeline's group after it died
        for proc in self.seen:
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture
def internal_run(tmp_path: Path):
    runs: list[InternalRun] = []

    def start(*args, **kwargs) -> InternalRun:  # type: ignore[no-untyped-def]
        run = InternalRun(tmp_path, *args, **kwargs)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


@pytest.mark.slow
def test_internal_mode_serves_the_run_and_stops_everything(internal_run, tmp_path: Path) -> None:
    pdfs = write_text_docs(tmp_path / "docs", 2, 2)
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret-key\n")  # the server requires it; the pipeline sends it
    run = internal_run(pdfs, "--max_model_len", "20000", "--gpu-memory-utilization", "0.5", "-tp", "1",
                       "--enforce-eager", env={"OLMOCR_API_KEY_FILE": str(key_file)})
    assert run.wait(90) == 0, run.output()[-3000:]
    assert_every_page_once(run.workspace, pdfs)
    out = run.output()
    vllm_log = run.run_dir / "logs" / "vllm.log"
    assert f"server log: {vllm_log}" in out
    # Upstream's server flags, and a flag the pipeline does not know, reach the server's command line.
    started = next(line for line in vllm_log.read_text().splitlines() if "starting:" in line)
    for piece in ("--max-model-len 20000", "--gpu-memory-utilization 0.5", "--tensor-parallel-size 1",
                  f"--port {run.port}", "--served-model-name olmocr", "--enforce-eager"):
        assert piece in started
    assert "s3cret-key" not in started and "s3cret-key" not in out
    assert run.seen, "the run started no process"
    run.assert_nothing_left(5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{run.url}/health", timeout=2)


@pytest.mark.slow
def test_internal_mode_rides_out_a_crash_and_a_hang(internal_run, tmp_path: Path) -> None:
    pdfs = write_text_docs(tmp_path / "docs", 6, 2)
    # One document at a time, 1.5 s a page: the run lasts through both faults.
    run = internal_run(pdfs, "--workers", "1", "--pages_per_group", "1", control={"latency": 1.5})
    run.wait_output("vLLM server ready", 60)
    first = run.server_pid()
    requests.post(f"{run.url}/admin/control", json={"crash_now": True}, timeout=5)
    wait_for(lambda: _pid_or_none(run) not in (None, first), 60, "the crashed server to be restarted")
    second = run.server_pid()
    requests.post(f"{run.url}/admin/control", json={"hang": True}, timeout=5)
    wait_for(lambda: _pid_or_none(run) not in (None, second), 60, "the hung server to be killed and restarted")
    assert run.wait(120) == 0, run.output()[-3000:]
    assert_every_page_once(run.workspace, pdfs)
    assert failures(run.workspace) == []
    assert (run.run_dir / "logs" / "vllm.log").read_text().count("starting:") >= 3
    run.assert_nothing_left(5)


def _in_flight(run: InternalRun) -> int:
    """Completions the run's server is working on (0 when it does not answer)."""
    try:
        metrics = requests.get(f"{run.url}/metrics", timeout=2).text
    except requests.RequestException:
        return 0
    return int(sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("vllm:num_requests_running")))


def _pid_or_none(run: InternalRun) -> int | None:
    try:
        return run.server_pid()
    except (requests.RequestException, ValueError, KeyError):
        return None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "ctrl-c-twice", "sigkill", "ctrl-c-while-loading"])
def test_internal_mode_stopped_leaves_no_process(internal_run, tmp_path: Path, how: str) -> None:
    pdfs = write_text_docs(tmp_path / "docs", 2, 2)
    if how == "ctrl-c-while-loading":  # the model takes minutes to load: Ctrl+C then must stop it too
        run = internal_run(pdfs, control={"load_delay": 120})
        run.wait_output("started a vLLM server for this run", 60)
        wait_for(lambda: any("olmocr.standin" in p for p in run.leftovers()), 30, "the server process")
    else:
        # Pages take 30 s: a graceful stop waits --stop_timeout (1 s) for them, then hands the items back.
        # Twice: the first stop waits 60 s for the pages, so the second signal comes while vLLM still serves
        # and only the second signal's own stop can end it. (With 1 s, supervisord was often already stopping
        # vLLM when the second came, which then stopped by itself: a second signal that SIGKILLed supervisord,
        # orphaning vLLM, passed.)
        stop_timeout = "60" if how == "ctrl-c-twice" else "1"
        run = internal_run(pdfs, "--stop_timeout", stop_timeout, control={"latency": 30})
        run.wait_output("claimed work item", 60)
        wait_for(lambda: _in_flight(run) > 0, 30, "a page at the server")
    assert run.leftovers(), "no server process seen"
    if how.startswith("ctrl-c"):
        os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl+C does: the foreground group
        if how == "ctrl-c-twice":
            run.wait_output("stopping gracefully", 10)
            time.sleep(BURST_S)  # sooner, it would be the same Ctrl+C delivered twice
            assert _in_flight(run) > 0, "the server is no longer working on a page: the test would prove nothing"
            assert "stopping the vLLM server of this run" not in run.output()
            os.killpg(run.proc.pid, signal.SIGINT)  # the impatient second one: exit at once
    elif how == "sigterm":
        os.kill(run.proc.pid, signal.SIGTERM)
    else:
        os.kill(run.proc.pid, signal.SIGKILL)  # the pipeline dies: its server must not outlive it
    status = run.wait(60)
    expected = {"sigkill": -9, "ctrl-c-twice": 130}.get(how, 0)  # a first signal is a graceful stop
    assert status == expected, run.output()[-3000:]
    run.assert_nothing_left(30 if how in ("sigkill", "ctrl-c-twice") else 5)
    if how in ("ctrl-c", "sigterm", "ctrl-c-while-loading"):
        assert "stopping the vLLM server of this run" in run.output()
    if how == "ctrl-c-twice":  # vLLM was stopped by its supervisord (SIGTERM), not orphaned and killed later
        assert "Shutting down" in (run.run_dir / "logs" / "vllm.log").read_text()
    if how == "ctrl-c-while-loading":
        assert "while the server was starting; no work was claimed" in run.output()
    elif how in ("ctrl-c", "sigterm"):
        assert not list((run.workspace / "worker_locks").glob("*.lock"))  # items handed back at once


def test_internal_mode_uses_an_olmocr_server_already_on_the_port(internal_run, tmp_path: Path,
                                                                standins: Standins) -> None:
    pdfs = write_text_docs(tmp_path / "docs", 1, 1)
    port = free_port()
    other = standins(port=port, served_model_name="something-else")
    run = internal_run(pdfs, port=port)
    assert run.wait(30) == 2
    assert f"port {port} is taken by a server that does not serve 'olmocr'" in run.output()
    other.stop()
    ours = standins(port=port)
    run = internal_run(pdfs, port=port)
    assert run.wait(60) == 0, run.output()[-3000:]
    assert "already answering" in run.output() and "serves 'olmocr': using it" in run.output()
    assert not run.run_dir.exists()  # no supervisord was started
    assert ours.proc.poll() is None  # and the server that was there is left running
    assert_every_page_once(run.workspace, pdfs)


def test_internal_mode_with_nothing_to_do_starts_no_server(internal_run, tmp_path: Path) -> None:
    run = internal_run([], env={"OLMOCR_VLLM_BIN": str(STANDIN_SHIM)})
    assert run.wait(60) == 2, run.output()[-3000:]  # nothing queued there yet: a mistake, one line (#28)
    assert "nothing has been queued there yet" in run.output()
    assert not run.run_dir.exists() and run.seen == set()


@pytest.mark.slow
def test_internal_mode_server_that_cannot_start(internal_run, tmp_path: Path) -> None:
    broken = tmp_path / "broken-vllm"
    broken.write_text("#!/bin/sh\necho 'vllm: error: unrecognized arguments: --bogus' >&2\nexit 2\n")
    broken.chmod(0o755)
    run = internal_run(write_text_docs(tmp_path / "docs", 1, 1), env={"OLMOCR_VLLM_BIN": str(broken)})
    assert run.wait(90) == 1, run.output()[-3000:]
    last = run.output().strip().splitlines()
    assert any("the vLLM server did not start:" in line and str(run.run_dir / "logs") in line for line in last), last
    assert "server logs kept in" in run.output()
    assert "unrecognized arguments: --bogus" in (run.run_dir / "logs" / "vllm.log").read_text()
    run.assert_nothing_left(5)
    assert (run.workspace / "done_flags").exists() is False or not list((run.workspace / "done_flags").iterdir())


@pytest.mark.slow
def test_internal_mode_stops_when_the_server_is_given_up_on(internal_run, tmp_path: Path) -> None:
    # Every start crashes after 6 s (once RUNNING); after one restart in a row the listener gives up.
    run = internal_run(write_text_docs(tmp_path / "docs", 2, 1), control={"latency": 60, "crash_after": 6},
                       env={"OLMOCR_MAX_RESTART_ATTEMPTS": "1"})
    assert run.wait(120) == 1, run.output()[-3000:]
    assert "stopping the run: the server was left stopped after" in run.output()
    run.assert_nothing_left(5)
    assert not list((run.workspace / "worker_locks").glob("*.lock"))  # items handed back


@pytest.mark.slow
def test_internal_mode_serves_on_every_gpu_and_sends_work_to_all(internal_run, tmp_path: Path) -> None:
    from olmocr.pipeline.stats import SERVER_STATS_DIR, summarize_server_stats

    pdfs = write_text_docs(tmp_path / "docs", 4, 2)
    run = internal_run(pdfs, "--gpus", "0,1", port=free_port_run(2))
    assert run.wait(120) == 0, run.output()[-3000:]
    assert_every_page_once(run.workspace, pdfs)
    assert "started 2 vLLM servers (one per GPU)" in run.output()
    for i in range(2):
        started = next(line for line in (run.run_dir / "logs" / f"vllm-{i}.log").read_text().splitlines()
                       if "starting:" in line)
        assert f"--port {run.port + i}" in started
    totals = summarize_server_stats(p.read_bytes() for p in (run.workspace / SERVER_STATS_DIR).rglob("*")
                                    if p.is_file())
    assert set(totals) == {f"http://127.0.0.1:{run.port}", f"http://127.0.0.1:{run.port + 1}"}
    assert all(row["pages"] > 0 for row in totals.values()), totals
    run.assert_nothing_left(5)
