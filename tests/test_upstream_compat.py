"""Workspace compatibility with upstream olmOCR 0.4.27, both directions, every page exactly once.

Upstream runs from PyPI in its own virtual environment (``bench/setup_upstream.sh``): ``$UPSTREAM_VENV``,
else ``bench/.upstream-venv`` when ready, else a cache directory (``$XDG_CACHE_HOME/olmocr-serve``), made
on first use (about two minutes). Upstream renders with poppler's ``pdftoppm``. The tests are skipped,
with the reason, when either is missing and cannot be made.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.pipeline_helpers import (
    assert_every_page_once,
    docs_by_source,
    running_pipeline,
    wait_for,
)
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import REPO_ROOT, stop_process_group
from tests.tiers import missing

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("upstream_compat"), pytest.mark.slow]

UPSTREAM_VERSION = "0.4.27"
SETUP = REPO_ROOT / "bench" / "setup_upstream.sh"


def _ready(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import olmocr.pipeline, olmocr.version as v; print(v.VERSION)"],
                           cwd="/", capture_output=True, text=True, timeout=120)
    return check.returncode == 0 and check.stdout.strip() == UPSTREAM_VERSION


@pytest.fixture(scope="module")
def upstream_python() -> Path:
    if shutil.which("pdftoppm") is None:
        missing("upstream olmOCR needs poppler's pdftoppm to render pages (apt install poppler-utils)")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olmocr-serve"
    candidates = [Path(os.environ["UPSTREAM_VENV"])] if os.environ.get("UPSTREAM_VENV") else []
    candidates += [REPO_ROOT / "bench" / ".upstream-venv", cache / f"upstream-olmocr-{UPSTREAM_VERSION}"]
    for venv in candidates:
        if _ready(venv):
            return venv / "bin" / "python"
    venv = candidates[-1]
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        made = subprocess.run(["bash", str(SETUP)], env={**os.environ, "UPSTREAM_VENV": str(venv)},
                              capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        missing(f"upstream olmOCR {UPSTREAM_VERSION} venv could not be made in 15 min (bench/setup_upstream.sh)")
    if made.returncode != 0 or not _ready(venv):
        last = (made.stderr.strip().splitlines() or ["no output"])[-1]
        missing(f"upstream olmOCR {UPSTREAM_VERSION} venv could not be made (bench/setup_upstream.sh: {last})")
    return venv / "bin" / "python"


def _start_upstream(python: Path, workspace: Path, url: str, *extra: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("OLMOCR_")}
    # Upstream copies each PDF to a temp file it deletes only when done: a killed upstream leaves it behind.
    tmpdir = log.parent / "upstream-tmp"
    tmpdir.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmpdir)
    with open(log, "ab") as out:
        # From outside the checkout: its olmocr/ would shadow upstream's package.
        return subprocess.Popen([str(python), "-m", "olmocr.pipeline", str(workspace), "--server", f"{url}/v1",
                                 "--model", "olmocr", *extra], cwd=str(log.parent), env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _done_flags(workspace: Path) -> int:
    folder = workspace / "done_flags"
    return len(list(folder.glob("done_*.flag"))) if folder.is_dir() else 0


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        stop_process_group(proc)
    assert rc == 0, log.read_text()[-4000:]


def _docs(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "docs"
    folder.mkdir()
    return [write_text_pdf(folder / f"doc{i}.pdf", 2) for i in range(4)]


def _two_member_tarball(tmp_path: Path, pdfs: list[Path]) -> Path:
    """``batch.tar.gz`` holding the first two documents as ``inner/NAME``."""
    archive = tmp_path / "batch.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for pdf in pdfs[:2]:
            tar.add(pdf, arcname=f"inner/{pdf.name}")
    return archive


def _assert_every_page_once(workspace: Path, pdfs: list[Path]) -> set[str]:
    """Every page of every document exactly once; returns who produced the documents."""
    assert_every_page_once(workspace, pdfs)
    docs = docs_by_source(workspace).values()
    return {doc["metadata"].get("producer", "upstream " + doc["metadata"]["olmocr-version"]) for doc in docs}


def test_upstream_started_and_killed_ours_finishes(upstream_python: Path, standin, tmp_path: Path) -> None:
    pdfs = _docs(tmp_path)
    ws = tmp_path / "ws"
    standin.control(latency=1.0)  # upstream does one item at a time: there is time to kill it between items
    upstream = _start_upstream(upstream_python, ws, standin.url, "--pdfs", *map(str, pdfs), "--workers", "1",
                               "--pages_per_group", "2", log=tmp_path / "upstream.log")
    try:
        wait_for(lambda: _done_flags(ws) >= 1 or upstream.poll() is not None, 120, "upstream to finish an item")
        assert upstream.poll() is None, (tmp_path / "upstream.log").read_text()[-4000:]
        os.killpg(upstream.pid, signal.SIGKILL)
    finally:
        stop_process_group(upstream)
    assert _done_flags(ws) < len(pdfs)
    standin.control(latency=0)
    with running_pipeline(ws, standin.url, log=tmp_path / "ours.log") as ours:
        assert ours.wait(180) == 0, ours.output()[-4000:]
    assert _assert_every_page_once(ws, pdfs) == {f"upstream {UPSTREAM_VERSION}", "olmocr-serve"}


def test_ours_started_and_stopped_upstream_finishes(upstream_python: Path, standin, tmp_path: Path) -> None:
    pdfs = _docs(tmp_path)
    ws = tmp_path / "ws"
    standin.control(latency=1.0)
    with running_pipeline(ws, standin.url, pdfs, "--workers", "1", "--pages_per_group", "2",
                          log=tmp_path / "ours.log") as ours:
        wait_for(lambda: _done_flags(ws) >= 1 or ours.poll() is not None, 120, "our pipeline to finish an item")
        assert ours.poll() is None, ours.output()[-4000:]
        os.kill(ours.pid, signal.SIGTERM)  # an operator's stop: graceful, nothing left locked
        assert ours.wait(60) == 0
    assert _done_flags(ws) < len(pdfs)
    standin.control(latency=0)
    upstream = _start_upstream(upstream_python, ws, standin.url, "--workers", "2", log=tmp_path / "upstream.log")
    _finish(upstream, tmp_path / "upstream.log")
    assert _assert_every_page_once(ws, pdfs) == {f"upstream {UPSTREAM_VERSION}", "olmocr-serve"}


def test_flag_list_matches_upstream_help(upstream_python: Path, tmp_path: Path) -> None:
    from tests.test_upstream_flags import UPSTREAM_FLAGS, UPSTREAM_REJECTED

    shown = subprocess.run([str(upstream_python), "-m", "olmocr.pipeline", "--help"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    upstream = set(re.findall(r"(?:^|[\s,\[])(--?[a-z][-\w]*)", shown)) - {"-h", "--help"}
    assert upstream == set(UPSTREAM_FLAGS) | set(UPSTREAM_REJECTED)


def test_upstream_finishes_a_tarball_item_we_queued(upstream_python: Path, standin, tmp_path: Path) -> None:
    """Issue 29: a tarball is one item in our index, and upstream processes it as its own: the same
    ``ARCHIVE::MEMBER`` names our pipeline gives (tests/test_archives.py)."""
    from olmocr.pipeline.workspace.inputs import expand_inputs
    from olmocr.pipeline.workspace.queue import WorkQueue
    from olmocr.pipeline.workspace.storage import open_storage

    pdfs = _docs(tmp_path)
    archive = _two_member_tarball(tmp_path, pdfs)
    ws = tmp_path / "ws"
    paths, problems = expand_inputs([str(archive)])
    assert problems == [] and WorkQueue(open_storage(str(ws))).populate(paths) == 1  # what --pdfs does
    upstream = _start_upstream(upstream_python, ws, standin.url, "--workers", "1", log=tmp_path / "upstream.log")
    _finish(upstream, tmp_path / "upstream.log")
    assert set(docs_by_source(ws)) == {f"{archive}::inner/{pdf.name}" for pdf in pdfs[:2]}


def test_ours_finishes_a_tarball_item_upstream_queued(upstream_python: Path, standin, tmp_path: Path) -> None:
    """Issue 29: upstream queues a tarball as one item of its index; our pipeline takes that item and gives
    each member the ``ARCHIVE::MEMBER`` name upstream gives it."""
    from olmocr.pipeline.workspace.queue import load_index
    from olmocr.pipeline.workspace.storage import open_storage

    pdfs = _docs(tmp_path)
    archive = _two_member_tarball(tmp_path, pdfs)
    ws = tmp_path / "ws"
    locks = ws / "worker_locks"
    standin.control(latency=30.0)  # upstream queues, claims, then waits on its first page: killed before an answer
    upstream = _start_upstream(upstream_python, ws, standin.url, "--pdfs", str(archive), "--workers", "1",
                               log=tmp_path / "upstream.log")
    try:
        wait_for(lambda: (locks.is_dir() and any(locks.iterdir())) or upstream.poll() is not None, 120,
                 "upstream to queue and claim the tarball")
        assert upstream.poll() is None, (tmp_path / "upstream.log").read_text()[-4000:]
        os.killpg(upstream.pid, signal.SIGKILL)
    finally:
        stop_process_group(upstream)
    assert list(load_index(open_storage(str(ws))).values()) == [(str(archive),)]  # upstream's item: the tarball
    assert _done_flags(ws) == 0
    standin.control(latency=0)
    with running_pipeline(ws, standin.url, log=tmp_path / "ours.log") as ours:
        assert ours.wait(180) == 0, ours.output()[-4000:]
    docs = docs_by_source(ws)
    assert set(docs) == {f"{archive}::inner/{pdf.name}" for pdf in pdfs[:2]}
    assert {doc["metadata"].get("producer") for doc in docs.values()} == {"olmocr-serve"}
    assert [doc["metadata"]["pdf-total-pages"] for doc in docs.values()] == [2, 2]
    assert _done_flags(ws) == 1
