"""Helpers for the pipeline tests: a stand-in fixture, running the pipeline CLI, reading a workspace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
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
    standin = StandIn(port, proc, full_env, log)
    try:
        wait_http_ok(f"{standin.url}/health", timeout=30, proc=proc)
    except BaseException:
        standin.stop()
        raise
    return standin


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandIn]:
    s = launch_standin(tmp_path)
    try:
        yield s
    finally:
        s.stop()


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


def run_pipeline(workspace: str | Path, url: str, pdfs: Sequence[str | Path] = (), *extra: str,
                 env: Mapping[str, str] | None = None, timeout: float = 120, log: Path) -> tuple[int, str]:
    """Run the pipeline to completion (killed after ``timeout``); returns (exit status, its output)."""
    proc = start_pipeline(workspace, url, pdfs, *extra, env=env, log=log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        raise AssertionError(f"pipeline did not finish in {timeout}s:\n{log.read_text()[-4000:]}") from None
    finally:
        stop_process_group(proc)
    return rc, log.read_text()


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


@pytest.fixture(autouse=True)
def _close_cached_render_docs() -> Iterator[None]:
    """Tests that call the render jobs in-process leave pypdfium2 documents cached: close them."""
    yield
    from olmocr.pipeline.pages import render

    while render._docs:
        render._docs.popitem()[1].close()


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
