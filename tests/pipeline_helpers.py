"""Helpers for the pipeline tests: a stand-in fixture, running the pipeline CLI, reading a workspace."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.sample_docs import samples
from tests.standin_helpers import (
    REPO_ROOT,
    clean_env,
    free_port,
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        self.proc = start_standin(self.port, env=self.env, log_path=self.log)
        wait_http_ok(f"{self.url}/health", timeout=30, proc=self.proc)

    def stop(self) -> None:
        stop_process_group(self.proc)


def launch_standin(tmp_path: Path, env: Mapping[str, str] | None = None, **kwargs: object) -> StandIn:
    port = free_port()
    log = tmp_path / f"standin-{port}.log"
    full_env = dict(env or {})
    proc = start_standin(port, env=full_env, log_path=log, **kwargs)  # type: ignore[arg-type]
    started = StandIn(port, proc, full_env, log)
    try:
        wait_http_ok(f"{started.url}/health", timeout=30, proc=proc)
    except BaseException:
        started.stop()
        raise
    return started


def pipeline_command(workspace: str | Path, url: str, pdfs: Sequence[str | Path] = (), *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "olmocr.pipeline", str(workspace), "--vllm-url", url,
           "--progress_interval", "2", "--render_processes", "2"]
    if pdfs:
        cmd += ["--pdfs", *map(str, pdfs)]
    return cmd + list(extra)


def start_pipeline(workspace: str | Path, url: str, pdfs: Sequence[str | Path] = (), *extra: str,
                   env: Mapping[str, str] | None = None, log: Path) -> subprocess.Popen[bytes]:
    """Start the pipeline in its own session; output goes to ``log``. Stop it with stop_process_group."""
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
                     env: Mapping[str, str] | None = None, log: Path,
                     stop: Iterable[Stoppable] = ()) -> Iterator[RunningPipeline]:
    """Start the pipeline (its own process group), yield it, and always stop it and then everything in
    ``stop`` (its stand-ins), whatever the test did: the one harness of the tests that run pipelines."""
    others = list(stop)
    try:
        proc = start_pipeline(workspace, url, pdfs, *extra, env=env, log=log)
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


_LOG_FIELD = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdfr]")
_FIELD_ANY = {"d": r"(-?\d+)", "f": r"(-?[\d.]+)"}


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
from tests.conftest import _close_cached_render_docs, standin  # noqa: E402, F401
