"""Helpers for the pipeline tests: a stand-in fixture, running the pipeline CLI, reading a workspace."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import requests

from tests.sample_docs import samples
from tests.standin_helpers import (
    REPO_ROOT,
    VLLM_FLAGS,
    clean_env,
    free_port,
    pid_alive,
    pids_in_group,
    start_standin,
    stop_process_group,
    wait_http_ok,
)
from tests.waiting import wait_for  # noqa: F401 - re-exported for the tests

#: The generated sample documents (tests/sample_docs.py), built once per test session.
SAMPLES = samples()
#: Five documents, 1-3 pages each, to keep the tests fast.
SMALL_DOCS = SAMPLES.small
#: 23 pages in 8 documents: long enough to crash or hang the server in the middle of a run.
RESILIENCE_DOCS = SAMPLES.resilience


@dataclass
class StandIn:
    port: int
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path
    #: The loopback address it listens on, and how it was launched (``restart()`` launches it the same way).
    host: str = "127.0.0.1"
    launch: dict[str, object] = dataclass_field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def control(self, **patch: object) -> None:
        r = requests.post(f"{self.url}/admin/control", json=patch, timeout=10)
        r.raise_for_status()

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash), and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop_process_group(self.proc)

    def restart(self) -> None:
        self.proc = start_standin(self.port, env=self.env, log_path=self.log, **self.launch)  # type: ignore[arg-type]
        wait_http_ok(f"{self.url}/health", timeout=30, proc=self.proc)

    def stop(self) -> None:
        stop_process_group(self.proc)


def launch_standin(tmp_path: Path, env: Mapping[str, str] | None = None, *, port: int | None = None,
                   ready: bool = True, host: str = "127.0.0.1", **kwargs: object) -> StandIn:
    """Start a stand-in (on ``host``:``port``, or a free port) and, with ``ready``, wait for its /health; the
    caller stops it. Tests use the ``standins`` fixture (:class:`Standins`), which stops it for them."""
    port = port or free_port()
    if host != "127.0.0.1":
        extra = kwargs.get("extra_args", VLLM_FLAGS)
        kwargs["extra_args"] = (*extra, "--host", host)  # type: ignore[misc]
    log = tmp_path / (f"standin-{port}.log" if host == "127.0.0.1" else f"standin-{host}-{port}.log")
    full_env = dict(env or {})
    proc = start_standin(port, env=full_env, log_path=log, **kwargs)  # type: ignore[arg-type]
    started = StandIn(port, proc, full_env, log, host, dict(kwargs))
    if ready:
        try:
            wait_http_ok(f"{started.url}/health", timeout=30, proc=proc)
        except BaseException:
            started.stop()
            raise
    return started


class Standins:
    """The ``standins`` fixture (tests/conftest.py): start stand-in vLLM servers, launched the way vLLM is
    (``python -m olmocr.standin serve MODEL --served-model-name olmocr --port P`` plus the wrapper's flags,
    in a session of its own), and stop them all when the test ends.

    ``standins(**env)`` -> :class:`StandIn`, ready (its /health answers). Keyword names in upper case are
    environment variables of the server (``OLMOCR_STANDIN_LATENCY=0.4``, ``VLLM_API_KEY="k"``; numbers are
    turned into text). The lower-case ones are knobs:

    * ``served_model_name`` (default ``"olmocr"``);
    * ``extra_args``: the vLLM flags after the port (default ``standin_helpers.VLLM_FLAGS``);
    * ``port``: a given port (default: a free one);
    * ``host``: the loopback address to listen on (default ``127.0.0.1``; ``127.0.0.2`` etc. put several
      stand-ins on one port, as the servers behind a DNS name); its log is then ``standin-<host>-<port>.log``;
    * ``ready=False``: return at once, without waiting for /health (a server still loading its model);
    * ``env``: a mapping of more variables.

    The server's output goes to ``<dir>/standin-<port>.log`` (``.log``); ``.url``, ``.port``,
    ``.control(...)``, ``.kill()``, ``.restart()`` and ``.stop()`` work as on any :class:`StandIn`, and a
    stand-in the test stopped itself (or ``running_pipeline(stop=...)`` did) is fine.

    Clean-up, whatever the test did: every stand-in's process group gets SIGTERM, then SIGKILL, and no pid
    of it may be left; each runs with a ``TMPDIR`` of its own (``<dir>/standin-*-tmp``, unless the test
    gives one), which must be empty at the end. The class is a context manager for fixtures of a wider
    scope::

        with Standins(tmp_path_factory.mktemp("reader")) as start:
            yield start(OLMOCR_STANDIN_ANSWER="read")
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[tuple[StandIn, Path | None]] = []

    def __call__(self, *, served_model_name: str = "olmocr", extra_args: Sequence[str] | None = None,
                 port: int | None = None, ready: bool = True, host: str = "127.0.0.1",
                 env: Mapping[str, object] | None = None, **variables: object) -> StandIn:
        lower = sorted(name for name in variables if not name.isupper())
        assert not lower, f"standins(): unknown knob(s) {lower}; environment variables are in upper case"
        full_env = {key: str(value) for key, value in {**(env or {}), **variables}.items()}
        temp = None
        if "TMPDIR" not in full_env:
            temp = Path(tempfile.mkdtemp(prefix="standin-", suffix="-tmp", dir=self.directory))
            full_env["TMPDIR"] = str(temp)
        knobs: dict[str, object] = {"served_model_name": served_model_name}
        if extra_args is not None:
            knobs["extra_args"] = tuple(extra_args)
        started = launch_standin(self.directory, full_env, port=port, ready=ready, host=host, **knobs)
        self.started.append((started, temp))
        return started

    def stop_all(self) -> None:
        """Stop every stand-in (its process group); then check that none left a process or a temp file."""
        errors: list[BaseException] = []
        for started, _ in self.started:
            try:
                started.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others, then report it
                errors.append(exc)
        if errors:
            raise errors[0]
        for started, temp in self.started:
            left = [pid for pid in pids_in_group(started.proc.pid) if pid_alive(pid)]
            assert not left, f"stand-in on port {started.port} left processes {left}"
            if temp is not None:
                junk = sorted(p.name for p in temp.iterdir())
                assert not junk, f"stand-in on port {started.port} left {junk} in its TMPDIR"
                temp.rmdir()

    def __enter__(self) -> Standins:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def pipeline_command(workspace: str | Path, url: str, pdfs: Sequence[str | Path] = (), *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "olmocr.pipeline", str(workspace), "--vllm-url", url,
           "--progress_interval", "2", "--render_processes", "2"]
    if pdfs:
        cmd += ["--pdfs", *map(str, pdfs)]
    return cmd + list(extra)


def start_pipeline(workspace: str | Path, url: str, pdfs: Sequence[str | Path] = (), *extra: str,
                   env: Mapping[str, str] | None = None, log: Path,
                   terminal: int | None = None) -> subprocess.Popen[bytes]:
    """Start the pipeline in its own session; output goes to ``log``, or to ``terminal`` (the file descriptor
    of a pty's other end) when given. Stop it with stop_process_group."""
    if terminal is not None:
        return subprocess.Popen(pipeline_command(workspace, url, pdfs, *extra), env=_env(env), cwd=str(REPO_ROOT),
                                stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, start_new_session=True)
    with open(log, "ab") as out:
        return subprocess.Popen(pipeline_command(workspace, url, pdfs, *extra), env=_env(env), cwd=str(REPO_ROOT),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = clean_env(env)
    for key in ("OLMOCR_API_KEY",):
        out.pop(key, None)
    out.update(env or {})
    return out


@dataclass
class RunningPipeline:
    """A pipeline started by :func:`running_pipeline`: its process and its log."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """Its exit status; an AssertionError with the end of its log if it runs past ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pipeline did not finish in {timeout}s:\n{self.output()[-4000:]}") from None

    def wait_log(self, text: str | re.Pattern[str], timeout: float, what: str | None = None, count: int = 1) -> None:
        """Wait until ``text`` (a string, or a pattern from :func:`log_line`) is in the log ``count`` times
        (an AssertionError if the pipeline exits first)."""
        def seen() -> bool:
            out = self.output()
            if (out.count(text) if isinstance(text, str) else len(text.findall(out))) >= count:
                return True
            assert self.proc.poll() is None, f"pipeline exited ({self.proc.returncode}) before {what or text!r}"
            return False

        try:
            wait_for(seen, timeout, what or repr(text))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output()[-4000:]}") from None


#: What a test hands to :func:`running_pipeline` to be stopped with the pipeline: a stand-in (``.stop()``),
#: a process started in its own session, or any callable.
Stoppable = StandIn | subprocess.Popen[bytes] | Callable[[], object]


def _stop(thing: Stoppable) -> None:
    if isinstance(thing, subprocess.Popen):
        stop_process_group(thing)
    elif isinstance(thing, StandIn):
        thing.stop()
    else:
        thing()


@contextmanager
def running_pipeline(workspace: str | Path, url: str, pdfs: Sequence[str | Path] = (), *extra: str,
                     env: Mapping[str, str] | None = None, log: Path, stop: Iterable[Stoppable] = (),
                     terminal: int | None = None) -> Iterator[RunningPipeline]:
    """Start the pipeline (its own process group), yield it, and always stop it and then everything in
    ``stop`` (its stand-ins), whatever the test did: the one harness of the tests that run pipelines.
    ``terminal``: see :func:`start_pipeline`."""
    others = list(stop)
    try:
        proc = start_pipeline(workspace, url, pdfs, *extra, env=env, log=log, terminal=terminal)
    except BaseException:
        for thing in others:
            _stop(thing)
        raise
    try:
        yield RunningPipeline(proc, log)
    finally:
        try:
            stop_process_group(proc)
        finally:
            for thing in others:
                _stop(thing)


def run_pipeline(workspace: str | Path, url: str, pdfs: Sequence[str | Path] = (), *extra: str,
                 env: Mapping[str, str] | None = None, timeout: float = 120, log: Path) -> tuple[int, str]:
    """Run the pipeline to completion (killed after ``timeout``); returns (exit status, its output)."""
    with running_pipeline(workspace, url, pdfs, *extra, env=env, log=log) as run:
        rc = run.wait(timeout)
    return rc, log.read_text()


_LOG_FIELD = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdfgr]")
_FIELD_ANY = {"d": r"(-?\d+)", "f": r"(-?[\d.]+)", "g": r"(-?[\d.e+-]+)"}


def log_line(fmt: str, *known: object) -> re.Pattern[str]:
    """A pattern for a line logged with ``fmt`` (the ``LOG_*`` constants of olmocr.pipeline.servers.fleet:
    the log text operators read is kept in one place): its first ``len(known)`` fields are these values,
    formatted as the code formats them; each other field matches any value and is a group."""
    fields = _LOG_FIELD.findall(fmt)
    literals = _LOG_FIELD.split(fmt)
    assert len(known) <= len(fields), f"{fmt!r} has {len(fields)} fields"
    out = re.escape(literals[0])
    for i, (field, literal) in enumerate(zip(fields, literals[1:], strict=True)):
        anything = r"(.*)" if i == len(fields) - 1 else r"(.*?)"  # the last one takes the rest of the line
        out += re.escape(field % known[i]) if i < len(known) else _FIELD_ANY.get(field[-1], anything)
        out += re.escape(literal)
    return re.compile(out)


def logged(text: str, fmt: str, *known: object) -> list[re.Match[str]]:
    """The lines of ``text`` logged with ``fmt`` whose first fields are ``known`` (see :func:`log_line`)."""
    pattern = log_line(fmt, *known)
    return [m for m in map(pattern.search, text.splitlines()) if m]


def read_jsonl_dir(directory: Path) -> list[dict]:
    records: list[dict] = []
    if directory.is_dir():
        for path in sorted(directory.glob("*.jsonl")):
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def results(workspace: Path) -> list[dict]:
    return read_jsonl_dir(workspace / "results")


def failures(workspace: Path) -> list[dict]:
    return read_jsonl_dir(workspace / "failed")


def docs_by_source(workspace: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for doc in results(workspace):
        source = doc["metadata"]["Source-File"]
        assert source not in out, f"duplicate document for {source}"
        out[source] = doc
    return out


def page_count(path: Path) -> int:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(str(path))
    try:
        return len(doc)
    finally:
        doc.close()


def assert_every_page_once(ws: Path, docs: Sequence[Path]) -> None:
    """Every document exactly once (docs_by_source asserts no duplicates), every page from the model, no
    failure records: what a run must leave behind whatever the servers did."""
    found = docs_by_source(ws)
    assert set(found) == {str(p) for p in docs}
    for path in docs:
        meta = found[str(path)]["metadata"]
        assert meta["pdf-total-pages"] == page_count(path)
        assert meta["total-fallback-pages"] == 0
    assert failures(ws) == []


# The fixtures live in tests/conftest.py; these names stay importable for test modules that import them.
from tests.conftest import _close_cached_render_docs, standin, standins  # noqa: E402, F401
