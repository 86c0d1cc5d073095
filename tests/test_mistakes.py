"""Every mistake a user makes gets one clear line, the right exit status, no traceback -- and fast.

Table-driven: each row is a command line a user could type (docs/pipeline.md "Common mistakes"), run as a
real process; the row says the exit status and the words of the one line. Servers are real programs on
loopback: Python's own ``http.server`` (not vLLM), a TCP server that does not speak HTTP, the stand-in with
TLS and an API key; S3 is moto in server mode.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from olmocr.pipeline.cli import build_parser
from olmocr.pipeline.flags import normalize_spellings, spelling_aliases
from olmocr.pipeline.runner import LOG_CLAIMED, LOG_STOPPED
from olmocr.pipeline.servers.client import ready_wait_bound
from olmocr.pipeline.stopping import BURST_S, LOG_GRACEFUL, LOG_HARD_EXIT, LOG_SAME_STOP, is_same_stop
from olmocr.pipeline.workspace.check import workspace_problem
from tests.pipeline_helpers import SAMPLES, Standins, log_line, logged, running_pipeline, wait_for
from tests.s3_helpers import start_s3_server
from tests.sample_docs import write_text_docs
from tests.standin_helpers import (
    REPO_ROOT,
    clean_env,
    free_port,
    pids_in_group,
    stop_process_group,
    wait_http_ok,
)
from tests.tiers import require

pytestmark = pytest.mark.timeout(120)

#: A PDF whose name has a space and accents (the sweep: names users really have).
ACCENTED = "relevé de compte é.pdf"


def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60,
            cwd: Path | None = None, module: str = "olmocr.pipeline", user: int | None = None) -> tuple[int, str, float]:
    """Run ``python -m module args``; returns (exit status, stdout+stderr, seconds)."""
    full_env = clean_env(env)
    for var in ("OLMOCR_VLLM_URL", "OLMOCR_API_KEY", "OLMOCR_API_KEY_FILE"):
        full_env.pop(var, None)
    full_env.update(env or {})
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, *args], env=full_env, cwd=str(cwd or REPO_ROOT),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, user=user)
    return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace"), time.monotonic() - started


def assert_one_line(output: str, *words: str) -> str:
    """Exactly one line of ``output`` holds all ``words``; no traceback anywhere. Returns that line."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if all(w in line for w in words)]
    assert len(lines) == 1, f"want one line with {words}, got {len(lines)}:\n{output}"
    return lines[0]


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / ACCENTED
    shutil.copy(SAMPLES.small[0], path)
    return path


# ------------------------------------------------------------------------- servers that will not fix themselves


@pytest.fixture
def not_vllm(tmp_path: Path) -> Iterator[str]:
    """``python3 -m http.server``: a web server that answers /v1/models with 404."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/", timeout=20, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


@pytest.fixture
def not_http() -> Iterator[str]:
    """A TCP server that greets like SSH and closes (a wrong port)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        thread.join(5)
        server.close()


@pytest.fixture
def tls_standin(tmp_path: Path, standins: Standins) -> tuple[int, str]:
    """The stand-in over https with an API key; returns (port, key)."""
    from tests.test_fleet import _make_ca_and_cert

    _, cert, key = _make_ca_and_cert(tmp_path)
    secret = "k-right-0123456789"
    server = standins(VLLM_API_KEY=secret, extra_args=("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)),
                      ready=False)  # (its /health is https)
    deadline = time.monotonic() + 30
    while socket.socket().connect_ex(("127.0.0.1", server.port)) != 0:
        assert time.monotonic() < deadline and server.proc.poll() is None, server.log.read_text()
        time.sleep(0.1)
    return server.port, secret


@pytest.fixture
def keyed_standin(standins: Standins) -> str:
    return standins(VLLM_API_KEY="k-right-0123456789").url


def test_a_web_server_that_is_not_vllm_fails_in_seconds(tmp_path: Path, doc: Path, not_vllm: str) -> None:
    rc, out, took = run_cli([str(tmp_path / "ws"), "--vllm-url", not_vllm, "--pdfs", str(doc)])
    assert rc == 1, out
    assert_one_line(out, "HTTP 404 on /v1/models", "not an OpenAI-compatible vLLM server", "--vllm-url")
    assert "attempt" not in out and took < 15, (took, out)


def test_a_program_that_does_not_speak_http_fails_at_once(tmp_path: Path, doc: Path, not_http: str) -> None:
    rc, out, took = run_cli([str(tmp_path / "ws"), "--vllm-url", not_http, "--pdfs", str(doc)])
    assert rc == 1, out
    assert_one_line(out, "is not a vLLM server", "does not speak HTTP", "SSH-2.0")
    assert took < 15, (took, out)


@pytest.mark.slow
def test_https_to_a_plain_http_server_and_http_to_a_tls_server(tmp_path: Path, doc: Path, not_vllm: str,
                                                                tls_standin: tuple[int, str]) -> None:
    rc, out, took = run_cli([str(tmp_path / "ws"), "--vllm-url", not_vllm.replace("http:", "https:"),
                             "--pdfs", str(doc)])
    assert rc == 1, out
    assert_one_line(out, "TLS", "may not speak https", "http://")
    assert "--ca_bundle" not in out and took < 15
    port, _ = tls_standin
    rc, out, took = run_cli([str(tmp_path / "ws"), "--vllm-url", f"http://127.0.0.1:{port}", "--pdfs", str(doc)])
    assert rc == 1, out
    assert_one_line(out, "speaks", "https://", "--vllm-url")
    assert took < 15, (took, out)


@pytest.mark.slow
def test_a_rejected_api_key_fails_at_once_without_showing_the_key(tmp_path: Path, doc: Path,
                                                                  keyed_standin: str) -> None:
    rc, out, took = run_cli([str(tmp_path / "ws"), "--vllm-url", keyed_standin, "--pdfs", str(doc)],
                            env={"OLMOCR_API_KEY": "k-wrong-9999999999"})
    assert rc == 1, out
    assert_one_line(out, "rejected the API key", "OLMOCR_API_KEY")
    assert "k-wrong-9999999999" not in out and took < 15


def test_a_server_not_up_yet_is_waited_for_and_the_first_line_says_how_long(tmp_path: Path, doc: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    rc, out, took = run_cli([str(tmp_path / "ws"), "--vllm-url", url, "--pdfs", str(doc),
                             "--max_server_ready_timeout", "2"])
    assert rc == 1, out
    first = assert_one_line(out, "waiting for the vLLM server", "--max_server_ready_timeout")
    assert "over 2s" in first and "connection refused" in first, first
    assert_one_line(out, "Cannot reach the vLLM server")
    assert ready_wait_bound() == 1 + 2 + 4 + 8 + 16 + 32 + 60 + 60 + 60  # what the default line says


# ---------------------------------------------------------------------------------------------- workspaces


WORKSPACE_ROWS = [
    # (workspace, words of the one line, exit status)
    ("/proc/olmocr-ws", ("workspace /proc/olmocr-ws", "normal file system"), 2),
    ("/sys/olmocr-ws", ("workspace /sys/olmocr-ws", "no permission"), 2),
    ("{file}", ("is a file, not a directory",), 2),
    ("{file}/sub", ("is a file, not a directory",), 2),
]


@pytest.mark.parametrize("workspace,words,status", WORKSPACE_ROWS)
def test_a_workspace_that_cannot_be_used_is_one_line(tmp_path: Path, doc: Path, workspace: str,
                                                     words: tuple[str, ...], status: int) -> None:
    a_file = tmp_path / "a file é.txt"
    a_file.write_text("not a directory")
    ws = workspace.format(file=a_file)
    rc, out, took = run_cli([ws, "--vllm-url", "http://127.0.0.1:9", "--pdfs", str(doc)])
    assert rc == status, out
    assert_one_line(out, "ERROR", *words)
    assert took < 15


def _as_user_without(ws: Path, how: str) -> list[str]:
    """A command prefix that runs the pipeline where ``ws`` cannot be written: ``ro`` on a read-only bind mount
    of it (a private mount namespace: gone with the process), ``perm`` without root's power to ignore modes."""
    if how == "ro":
        # root: a private mount namespace; anyone else: also a user namespace (unshare -r) to mount in.
        unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
        works = shutil.which("unshare") is not None and subprocess.run(
            [*unshare, "true"], capture_output=True, timeout=10).returncode == 0
        require(works, f"a read-only bind mount needs {' '.join(unshare)} (util-linux; user namespaces enabled)")
        return [*unshare, "sh", "-c", f"mount --bind '{ws}' '{ws}' && mount -o remount,bind,ro '{ws}' && "
                'exec "$@"', "sh"]
    ws.chmod(0o555)
    if os.geteuid() != 0:
        return []
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to drop root's CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


@pytest.mark.parametrize("how,words", [("ro", ("read-only file system", "writable directory")),
                                       ("perm", ("no permission to write",))])
def test_a_read_only_workspace_is_one_line(tmp_path: Path, doc: Path, how: str, words: tuple[str, ...]) -> None:
    ws = tmp_path / "read only ws"
    ws.mkdir()
    prefix = _as_user_without(ws, how)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "olmocr.pipeline", str(ws), "--vllm-url",
                               "http://127.0.0.1:9", "--pdfs", str(doc)], env=clean_env(), capture_output=True,
                              timeout=60, cwd=str(REPO_ROOT))
    finally:
        ws.chmod(0o755)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 2, out
    assert_one_line(out, "ERROR", f"workspace {ws}", *words)
    assert list(ws.iterdir()) == []


@pytest.mark.parametrize("exc,words", [
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/ws"), ("read-only file system", "writable")),
    (OSError(errno.ENOSPC, "No space left on device", "/data"), ("no space left",)),
    (OSError(errno.EACCES, "Permission denied", "/data/ws"), ("no permission to write in /data/ws",)),
    (OSError(errno.ENOTDIR, "Not a directory", "/data/f"), ("is a file",)),
    (OSError(errno.ENOENT, "No such file or directory", "/proc/x"), ("cannot create /proc/x",)),
])
def test_workspace_errors_become_one_line(exc: OSError, words: tuple[str, ...]) -> None:
    line = workspace_problem("/data/ws", exc)
    assert line is not None and "\n" not in line and all(w in line for w in words), line


def test_a_bug_is_not_dressed_up_as_a_user_mistake() -> None:
    assert workspace_problem("/data/ws", KeyError("x")) is None


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    endpoint, stop = start_s3_server()
    try:
        yield endpoint
    finally:
        stop()


def _s3_env(endpoint: str, tmp_path: Path, credentials: bool) -> dict[str, str]:
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}
    if credentials:
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    return env


@pytest.mark.parametrize("credentials,words", [
    (False, ("no usable AWS credentials", "AWS_ACCESS_KEY_ID", "--workspace_profile")),
    (True, ("bucket does not exist", "aws s3 mb s3://no-such-bucket-x")),
])
def test_an_s3_workspace_without_credentials_or_bucket_is_one_line(tmp_path: Path, doc: Path, s3_endpoint: str,
                                                                   credentials: bool, words: tuple[str, ...],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    rc, out, took = run_cli(["s3://no-such-bucket-x/ws", "--vllm-url", "http://127.0.0.1:9", "--pdfs", str(doc)],
                            env=_s3_env(s3_endpoint, tmp_path, credentials))
    assert rc == 1, out
    assert_one_line(out, "ERROR", "workspace s3://no-such-bucket-x/ws", *words)
    assert took < 20


# ----------------------------------------------------------------------- no input: non-zero, nothing left behind


NO_INPUT_ROWS = [
    # (--pdfs values, words of the line about the input)
    (["{tmp}/missing é.pdf"], ("no such file", "missing é.pdf")),
    (["{tmp}/nothing here/*.pdf"], ("glob matched no files",)),
    (["{tmp}"], ("is a directory", "**/*.pdf")),
]


@pytest.mark.parametrize("pdfs,words", NO_INPUT_ROWS)
def test_no_input_exits_non_zero_and_leaves_no_empty_workspace(tmp_path: Path, pdfs: list[str],
                                                               words: tuple[str, ...]) -> None:
    ws = tmp_path / "new ws" / "inner"
    rc, out, _ = run_cli([str(ws), "--vllm-url", "http://127.0.0.1:9", "--pdfs",
                          *(p.format(tmp=tmp_path) for p in pdfs)])
    assert rc == 2, out
    assert_one_line(out, "ERROR", *words)
    assert_one_line(out, "ERROR", "nothing to do: no document could be queued from --pdfs")
    assert not (tmp_path / "new ws").exists(), "an empty workspace was left behind"


def test_s3_inputs_without_credentials_exit_non_zero(tmp_path: Path, s3_endpoint: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    ws = tmp_path / "ws"
    rc, out, _ = run_cli([str(ws), "--vllm-url", "http://127.0.0.1:9", "--pdfs", "s3://some-bucket/docs/*.pdf"],
                         env=_s3_env(s3_endpoint, tmp_path, credentials=False))
    assert rc == 2, out
    assert_one_line(out, "ERROR", "s3://some-bucket/docs/*.pdf", "credentials")
    assert_one_line(out, "nothing to do")
    assert not ws.exists()


def test_an_existing_workspace_is_kept_when_the_input_is_a_mistake(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    rc, out, _ = run_cli([str(ws), "--vllm-url", "http://127.0.0.1:9", "--pdfs", str(tmp_path / "none.pdf")])
    assert rc == 2 and ws.is_dir(), out


# ---------------------------------------------------------------------------------------------------- flags


FLAG_ROWS = [
    # (arguments after the workspace, words of argparse's one line)
    (["--pages_per_group", "0"], ("--pages_per_group", "must be 1 or more, not 0")),
    (["--pages-per-group", "0"], ("--pages_per_group", "must be 1 or more")),
    (["--workers", "-3"], ("--workers", "must be 1 or more")),
    (["--workers", "many"], ("--workers", "'many' is not a whole number")),
    (["--max_page_error_rate", "2"], ("--max_page_error_rate", "between 0 and 1")),
    (["--lease_seconds", "nan"], ("--lease_seconds", "1 or more")),
    (["--request_timeout", "0"], ("--request_timeout", "more than 0")),
    (["--render_timeout", "-1"], ("--render_timeout", "0 or more")),
    (["--stop_timeout", "-5"], ("--stop_timeout", "0 or more")),
    (["--max_page_retries", "0"], ("--max_page_retries", "1 or more")),
    (["--target_longest_image_dim", "10"], ("--target_longest_image_dim", "28 or more")),
    (["--render_processes", "0"], ("--render_processes", "1 or more")),
    (["--progress_interval", "0"], ("--progress_interval", "more than 0")),
    (["--metrics_port", "70000"], ("--metrics_port", "between 1 and 65535")),
    (["--metrics-port", "0"], ("--metrics_port", "between 1 and 65535")),
    (["--max_concurrent_requests", "0"], ("--max_concurrent_requests", "1 or more")),
    (["--max_server_ready_timeout", "-1"], ("--max_server_ready_timeout", "0 or more")),
    (["--gpu_memory_utilization", "1.5"], ("--gpu-memory-utilization", "between 0 and 1")),
    (["--port", "0"], ("--port", "between 1 and 65535")),
    (["--stop-exit-code", "300"], ("--stop_exit_code", "between 0 and 255")),
]


@pytest.mark.parametrize("extra,words", FLAG_ROWS, ids=[" ".join(r[0]) for r in FLAG_ROWS])
def test_every_numeric_flag_is_checked_on_one_line(tmp_path: Path, extra: list[str], words: tuple[str, ...]) -> None:
    rc, out, _ = run_cli([str(tmp_path / "ws"), "--vllm-url", "http://127.0.0.1:9", *extra])
    assert rc == 2, out
    assert out.count("\n") == 1, out  # argparse's one line, no usage dump
    assert_one_line(out, "error:", *words, "(see --help)")
    assert not (tmp_path / "ws").exists()


def test_both_spellings_of_every_flag_are_the_same_flag() -> None:
    parser = build_parser()
    aliases = spelling_aliases(parser)
    longs = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and ("_" in o or "-" in o[2:])]
    assert longs and all(any(alias_target == o for alias_target in aliases.values()) for o in longs), longs
    assert aliases["--vllm_url"] == "--vllm-url" and aliases["--metrics-port"] == "--metrics_port"
    assert normalize_spellings(parser, ["ws", "--pages-per-group=7", "--", "--x_y"]) == \
        ["ws", "--pages_per_group=7", "--", "--x_y"]
    help_text = parser.format_help()
    assert "--pages_per_group" in help_text and "--pages-per-group PAGES" not in help_text  # --help shows one
    for flag, value in (("--max-page-retries", "3"), ("--max_page_retries", "3")):
        args = parser.parse_args(normalize_spellings(parser, ["ws", flag, value]))
        assert args.max_page_retries == 3
    assert isinstance(parser, argparse.ArgumentParser)


def test_the_underscore_spelling_of_vllm_url_runs(tmp_path: Path, doc: Path, not_vllm: str) -> None:
    rc, out, _ = run_cli([str(tmp_path / "ws"), "--vllm_url", not_vllm, "--pdfs", str(doc)])
    assert rc == 1 and "unrecognized" not in out, out
    assert_one_line(out, "HTTP 404 on /v1/models")


def test_version_without_a_workspace(tmp_path: Path) -> None:
    from olmocr import __version__

    rc, out, _ = run_cli(["--version"])
    assert rc == 0 and out.strip() == f"olmocr-serve {__version__}", out


def test_stats_into_a_closed_pipe_is_quiet(tmp_path: Path, doc: Path) -> None:
    ws = tmp_path / "ws"
    rc, out, _ = run_cli([str(ws), "--stats", "--pdfs", str(doc)])
    assert rc == 0, out
    env = clean_env()
    for reader in ("head -1", "true"):  # `true` has gone before the first byte is written
        proc = subprocess.run(f"{sys.executable} -m olmocr.pipeline '{ws}' --stats | {reader}", shell=True,
                              env=env, cwd=str(REPO_ROOT), capture_output=True, timeout=60)
        assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr, proc.stderr
        assert proc.stdout.count(b"\n") == (1 if reader == "head -1" else 0)


# ------------------------------------------------------------------------------------------------- signals


def _children_ready(pgid: int, processes: int = 2) -> bool:
    """The render workers (and multiprocessing's resource tracker) are up and no longer die of SIGTERM:
    blocked (a worker, see render._ignore_group_sigterm) or ignored (the tracker), read from /proc."""
    children = [p for p in pids_in_group(pgid) if p != pgid]
    if len(children) < processes + 1:
        return False
    for pid in children:
        try:
            fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
        except OSError:
            return False
        bit = 1 << (signal.SIGTERM - 1)
        if not (int(fields["SigBlk"], 16) | int(fields["SigIgn"], 16)) & bit:
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_group_is_one_graceful_stop(tmp_path: Path, sig: signal.Signals, standins: Standins) -> None:
    """GNU ``timeout -s INT`` signals the pipeline, then its group (render workers included); systemd and
    Slurm signal the whole job: one stop, the items handed back at once, no worker dies of it."""
    docs = write_text_docs(tmp_path / "docs", 4, 2, name="doc {}.pdf")
    ws = tmp_path / "ws"
    temp = tmp_path / "tmp"
    temp.mkdir()
    standin = standins(OLMOCR_STANDIN_LATENCY="30")
    log = tmp_path / "run.log"
    with running_pipeline(ws, standin.url, docs, "--pages_per_group", "2", "--workers", "2",
                          "--stop_timeout", "1", env={"TMPDIR": str(temp)}, log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "two items claimed", count=2)
        wait_for(lambda: _children_ready(run.pid), 30, "render workers started")
        os.kill(run.pid, sig)  # what `timeout` does: the process, then the group
        time.sleep(0.1)  # (at once, the kernel would merge the two into one pending signal)
        os.killpg(run.pid, sig)
        rc = run.wait(timeout=60)
    text = log.read_text()
    assert rc == 0, text
    assert len(logged(text, LOG_GRACEFUL, sig.name)) == 1 and not logged(text, LOG_HARD_EXIT), text
    assert logged(text, LOG_SAME_STOP, sig.name, BURST_S), text
    assert logged(text, LOG_STOPPED, sig.name) and not list((ws / "worker_locks").glob("*.lock"))
    assert "Traceback" not in text and "render pool stopped" not in text and "died" not in text, text
    assert "{'" not in text, text  # no Python reprs in the log (e.g. the work item counts)
    assert list(temp.iterdir()) == [], list(temp.iterdir())


def test_a_second_signal_later_exits_at_once_and_removes_its_temp_dirs(tmp_path: Path, standins: Standins) -> None:
    docs = write_text_docs(tmp_path / "docs", 2, 2, name="doc {}.pdf")
    temp = tmp_path / "tmp"
    temp.mkdir()
    standin = standins(OLMOCR_STANDIN_LATENCY="30")
    log = tmp_path / "run.log"
    with running_pipeline(tmp_path / "ws", standin.url, docs, "--stop_timeout", "120",
                          env={"TMPDIR": str(temp)}, log=log) as run:
        run.wait_log(log_line(LOG_CLAIMED), 60, "an item claimed")
        wait_for(lambda: _children_ready(run.pid), 30, "render workers started")
        os.killpg(run.pid, signal.SIGINT)
        run.wait_log(log_line(LOG_GRACEFUL), 10, "the first signal noticed")
        time.sleep(BURST_S + 0.2)
        os.killpg(run.pid, signal.SIGINT)
        rc = run.wait(timeout=20)
    assert rc == 130, log.read_text()
    assert logged(log.read_text(), LOG_HARD_EXIT)
    wait_for(lambda: list(temp.iterdir()) == [], 5, "temp dirs removed")


@pytest.mark.parametrize("first,sig,later,same", [
    (None, signal.SIGINT, 0.0, False),
    ((signal.SIGINT, 10.0), signal.SIGINT, 10.001, True),
    ((signal.SIGINT, 10.0), signal.SIGINT, 10.0 + BURST_S + 0.1, False),
    ((signal.SIGINT, 10.0), signal.SIGTERM, 10.01, False),
])
def test_which_signals_are_the_same_stop(first: tuple[int, float] | None, sig: int, later: float,
                                         same: bool) -> None:
    assert is_same_stop(first, sig, later) is same


# ------------------------------------------------------------------------------------- the deployment's output


@pytest.mark.slow
def test_kill_9_is_named_and_the_health_log_says_healthy_again(deployments) -> None:  # noqa: ANN001
    dep = deployments()
    first = dep.wait_status(lambda s: s["healthy"], 60, "healthy")
    os.kill(first["pid"], signal.SIGKILL)
    after = dep.wait_status(lambda s: s["healthy"] and s["pid"] != first["pid"], 60, "healthy after kill -9")
    assert "SIGKILL" in after["last_failure_reason"], after
    assert "Bad exit code" not in after["last_failure_reason"]
    health = dep.log_text("vllm-health")
    wait_for(lambda: "vllm is healthy again" in dep.log_text("vllm-health"), 30, "the good news in the health log")
    health = dep.log_text("vllm-health")
    assert " - INFO - " in health and "{'" not in health, health[-2000:]  # one format, no Python reprs
    assert not list((dep.dir / "logs").glob("*supervisor-*.log")), list((dep.dir / "logs").iterdir())


def _listen(port: int) -> socket.socket:
    sock = socket.create_server(("127.0.0.1", port))
    sock.listen()
    return sock


def test_the_manager_names_a_taken_port_and_its_owner(tmp_path: Path) -> None:
    port = free_port()
    holder = _listen(port)
    try:
        rc, out, took = run_cli(["--port", str(port), "--run-dir", str(tmp_path / "run"),
                                 "--log-file", str(tmp_path / "manager.log")],
                                module="olmocr.vllm_server_manager",
                                env={"OLMOCR_VLLM_BIN": str(REPO_ROOT / "scripts" / "vllm-standin"),
                                     "OLMOCR_STATUS_PORT": str(free_port())})
    finally:
        holder.close()
    assert rc == 2, out
    line = assert_one_line(out, f"port {port}", "already in use", f"pid {os.getpid()}", "--port")
    assert "ERROR" in line and took < 20
    assert not (tmp_path / "run").exists()


def test_the_wrapper_names_a_taken_port_instead_of_starting_vllm(tmp_path: Path) -> None:
    from olmocr.server import wrapper

    port = free_port()
    holder = _listen(port)
    try:
        line = wrapper.wait_for_port("127.0.0.1", port, wait_s=0.5)
    finally:
        holder.close()
    assert line is not None and f"port {port}" in line and f"pid {os.getpid()}" in line, line
    assert wrapper.wait_for_port("127.0.0.1", port, wait_s=0.5) is None


@pytest.mark.parametrize("module", ["olmocr.vllm_server_manager", "olmocr.server.status",
                                    "olmocr.server.status_service", "olmocr.server.listener"])
def test_version_on_every_command(module: str) -> None:
    from olmocr import __version__

    rc, out, _ = run_cli(["--version"], module=module)
    assert rc == 0 and out.strip() == f"olmocr-serve {__version__}", out


def test_gitignore_covers_what_the_programs_create() -> None:
    ignored = (REPO_ROOT / ".gitignore").read_text().split()
    for entry in ("/olmocr-server-run/", "*.log", "demo-workspace/"):
        assert entry in ignored


# ------------------------------------------------------------------------------------ why nothing happens


def test_describe_lease_holders_names_host_pid_and_expiry() -> None:
    from olmocr.pipeline.workspace.queue import describe_lease_holders

    line = describe_lease_holders([("gpu-node-1-4242-abcd1234", 1250.0), ("gpu-node-1-4242-abcd1234", 1100.0),
                                   ("other-77-ffff0000", 1010.0)], now=1000.0)
    assert line.startswith("3 work items are leased by other pipelines"), line
    assert "gpu-node-1 pid 4242: 2, leases expiring within 4m10s" in line
    assert "other pid 77: 1, lease expiring within 0m10s" in line


@pytest.mark.slow
def test_a_second_pipeline_says_whose_items_it_waits_for(tmp_path: Path, standins: Standins) -> None:
    docs = write_text_docs(tmp_path / "docs", 2, 2, name="doc {}.pdf")
    ws = tmp_path / "ws"
    standin = standins(OLMOCR_STANDIN_LATENCY="60")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with running_pipeline(ws, standin.url, docs, "--pages_per_group", "1", "--workers", "2", log=first_log) as first:
        first.wait_log(log_line(LOG_CLAIMED), 60, "both items claimed", count=2)
        with running_pipeline(ws, standin.url, (), "--workers", "2", log=second_log) as second:
            second.wait_log("leased by other pipelines", 60, "the idle line")
    line = assert_one_line(second_log.read_text(), "leased by other pipelines")
    assert f"2 work items are leased by other pipelines ({socket.gethostname()} pid {first.pid}: 2" in line, line


@pytest.mark.slow
def test_the_listener_never_takes_a_stranger_on_its_port_for_its_server(deployments, tmp_path: Path,  # noqa: ANN001
                                                                        standins: Standins) -> None:
    """Another vLLM-like program holds the deployment's port: the wrapper says so in vllm.log instead of
    starting vLLM, and the listener does not report the stranger's health as the deployment's."""
    stranger = standins()
    port = stranger.port
    dep = deployments(env={"OLMOCR_PORT": str(port)})
    dep.port = port
    wait_for(lambda: "already in use" in dep.log_text("vllm"), 60, "the wrapper's line")
    # The listener probes while the wrapper waits for the port: the stranger answers, and is named.
    seen: list[str] = []

    def stranger_named() -> bool:
        reason = str((dep.proxy.olmocr.getProcessStats("vllm").get("health") or {}).get("reason"))
        seen.append(reason)
        return "is held by" in reason

    wait_for(stranger_named, 60, "the listener noticing the stranger")
    health = seen[-1]
    assert f"pid {stranger.proc.pid}" in health and "not by vllm" in health, health
    assert not dep.status()["healthy"]
    lines = [line for line in dep.log_text("vllm").splitlines() if "already in use" in line]
    assert lines and all(f"port {port}" in line and f"pid {stranger.proc.pid}" in line and "OLMOCR_PORT" in line
                         for line in lines), lines
    assert "Traceback" not in dep.log_text("vllm")


# ------------------------------------------------------------------------- the sweep: mistakes not in the issue


SWEEP_ROWS = [
    # (arguments; {tmp} is the test's directory, {doc} a PDF named with a space and accents), exit, words
    (["{tmp}/ws é", "--vllm-url", "http://", "--pdfs", "{doc}"], 2, ("--vllm-url http://", "no host name")),
    (["{tmp}/ws é", "--vllm-url", "127.0.0.1:notaport", "--pdfs", "{doc}"], 2, ("port is not a number",)),
    (["{tmp}/ws é", "--vllm-url", "http://127.0.0.1:99999", "--pdfs", "{doc}"], 2, ("port is not a number",)),
    (["{tmp}/ws é", "--vllm-url", "ftp://127.0.0.1:21", "--pdfs", "{doc}"], 2, ("is not an http:// or https:// URL",)),
    (["{tmp}/ws é", "--vllm-url", "http://127.0.0.1:9#weight=-1", "--pdfs", "{doc}"], 2, ("#weight=N",)),
    (["{tmp}/ws é", "--vllm-url", "http://127.0.0.1:9", "--api_key_file", "{tmp}/no key é", "--pdfs", "{doc}"], 2,
     ("cannot read the API key file", "no key é")),
    (["{tmp}/ws é", "--vllm-url", "http://127.0.0.1:9", "--ca_bundle", "{tmp}/no ca.pem", "--pdfs", "{doc}"], 2,
     ("--ca_bundle", "no such file")),
    (["{tmp}/ws é", "--vllm-url", "http://127.0.0.1:9", "--workspace_profile", "nosuch", "--pdfs", "{doc}"], 2,
     ("--workspace_profile nosuch", "no such profile")),
    (["{tmp}/ws é", "--vllm-url", "http://127.0.0.1:9", "--beaker"], 2, ("--beaker", "not supported")),
    (["{tmp}/ws é", "--vllm-url", "http://127.0.0.1:9", "--no-such-flag"], 2, ("unrecognized arguments",)),
    (["{tmp}/ws é", "--vllm-url", "http://127.0.0.1:9", "--pdfs", "{tmp}/naïve dir/*.pdf"], 2,
     ("glob matched no files", "naïve dir")),
    (["{tmp}/ws é", "--stats"], 2, ("workspace", "no such directory")),
]


@pytest.mark.parametrize("args,status,words", SWEEP_ROWS, ids=[" ".join(r[0][1:4]) for r in SWEEP_ROWS])
def test_the_sweep(tmp_path: Path, doc: Path, args: list[str], status: int, words: tuple[str, ...]) -> None:
    argv = [a.format(tmp=tmp_path, doc=doc) for a in args]
    rc, out, took = run_cli(argv)
    assert rc == status, out
    assert_one_line(out, *words)
    assert took < 20
    assert not (tmp_path / "ws é").exists(), "a mistake left an empty workspace behind"


def test_an_invalid_bucket_name_is_one_line(tmp_path: Path, doc: Path, s3_endpoint: str) -> None:
    rc, out, _ = run_cli(["s3://Not_A_Bucket/ws", "--vllm-url", "http://127.0.0.1:9", "--pdfs", str(doc)],
                         env=_s3_env(s3_endpoint, tmp_path, credentials=True))
    assert rc == 1, out
    assert_one_line(out, "ERROR", "workspace s3://Not_A_Bucket/ws")


def test_a_port_held_by_another_program_is_named_for_the_status_service() -> None:
    import asyncio

    from aiohttp import web

    from olmocr.endpoints import start_app
    from olmocr.server.errors import EndpointConfigError

    port = free_port()
    holder = _listen(port)
    try:
        with pytest.raises(EndpointConfigError) as err:
            asyncio.run(start_app(web.Application(), "127.0.0.1", port))
    finally:
        holder.close()
    assert f"held by pid {os.getpid()}" in str(err.value), err.value


def test_a_truncated_pdf_reason_has_no_doubled_percent(tmp_path: Path) -> None:
    from olmocr.pipeline.pages.render import classify_pdf_failure

    whole = SAMPLES.small[0].read_bytes()
    cut = tmp_path / "cut é.pdf"
    cut.write_bytes(whole[: len(whole) // 2])
    reason = classify_pdf_failure(str(cut), "Data format error")
    assert reason.startswith("truncated PDF") and "%%" not in reason and "\n" not in reason, reason
