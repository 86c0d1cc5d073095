"""Shared harness for the benchmarks: corpus, processes in their own groups, the stand-in server,
output page counting, an RSS sampler, and the results table.

Everything here uses only the standard library plus what the project itself depends on (requests,
psutil, pypdfium2); nothing needs the upstream virtual environment.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
OUT_DIR = Path(os.environ.get("OLMOCR_BENCH_OUT", BENCH_DIR / "out"))
UPSTREAM_VENV = Path(os.environ.get("UPSTREAM_VENV", BENCH_DIR / ".upstream-venv"))
UPSTREAM_PYTHON = UPSTREAM_VENV / "bin" / "python"


def _default_corpus() -> Path | None:
    env = os.environ.get("OLMOCR_BENCH_CORPUS")
    if env:
        return Path(env)
    for cand in (REPO.parent / "shared" / "corpus", REPO / "shared" / "corpus"):
        if cand.is_dir():
            return cand
    return None


_corpus_root: Path | None = _default_corpus()
NO_CORPUS = ("bench: no corpus of PDFs to benchmark on: pass --corpus DIR (any directory of PDFs, searched "
             "recursively; e.g. the upstream olmOCR test PDFs) or set OLMOCR_BENCH_CORPUS")


def set_corpus_root(root: Path) -> None:
    global _corpus_root
    _corpus_root = root


def corpus_root() -> Path:
    """The corpus directory (--corpus, else $OLMOCR_BENCH_CORPUS, else ../shared/corpus if present)."""
    if _corpus_root is None:
        raise SystemExit(NO_CORPUS)
    if not _corpus_root.is_dir():
        raise SystemExit(f"bench: corpus directory {_corpus_root} does not exist; pass --corpus DIR")
    return _corpus_root

# Quick mode works on the corpus's smaller documents only (about a quarter of the pages).
QUICK_MAX_PAGES_PER_PDF = 10


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Corpus


def page_count(path: str | os.PathLike) -> int:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(path))
    try:
        return len(pdf)
    finally:
        pdf.close()


@dataclass
class Corpus:
    pdfs: list[Path]
    pages: dict[Path, int]

    @property
    def total_pages(self) -> int:
        return sum(self.pages.values())

    def page_list(self) -> list[tuple[Path, int]]:
        """(pdf, 0-based page index) for every page, in a stable order."""
        return [(p, i) for p in self.pdfs for i in range(self.pages[p])]

    def describe(self) -> str:
        return f"{len(self.pdfs)} PDFs, {self.total_pages} pages"


def load_corpus(quick: bool = False, root: Path | None = None) -> Corpus:
    root = root or corpus_root()
    files = sorted(Path(p) for p in glob.glob(str(root / "**" / "*.pdf"), recursive=True))
    if not files:
        raise SystemExit(f"bench: no PDFs under {root}; pass --corpus DIR (a directory of PDFs)")
    pages: dict[Path, int] = {}
    for f in files:
        try:
            pages[f] = page_count(f)
        except Exception as exc:  # noqa: BLE001 - a PDF pdfium cannot open is not benchmark material
            log(f"skipping unreadable {f}: {exc}")
    pdfs = [f for f in files if f in pages]
    if quick:
        pdfs = [f for f in pdfs if pages[f] <= QUICK_MAX_PAGES_PER_PDF]
        pages = {f: pages[f] for f in pdfs}
    return Corpus(pdfs=pdfs, pages=pages)


# --------------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcGroup:
    """A subprocess started as the leader of its own process group (session); ``stop()`` signals the
    whole group, so nothing it spawned outlives the benchmark."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, name: str = "proc") -> None:
        self.argv = list(argv)
        self.name = name
        self.log_path = Path(log_path) if log_path else None
        self._log_fh = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, wait ``grace`` s, then SIGKILL it. Also reaps stragglers of the group
        after the leader exited."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        # The leader is gone; anything left in its group is killed too.
        self.signal_group(signal.SIGKILL)
        if self._log_fh is not subprocess.DEVNULL:
            self._log_fh.close()
            self._log_fh = subprocess.DEVNULL
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_get(url: str, timeout: float = 5.0):
    import requests

    return requests.get(url, timeout=timeout)


def wait_until(pred, timeout: float, interval: float = 0.1, what: str = "condition") -> float:
    """Poll ``pred`` until true; returns the monotonic time it became true. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return time.monotonic()
        except Exception:  # noqa: BLE001 - a failing probe is just "not yet"
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------
# The stand-in server


def standin_argv(port: int, model: str = "stand-in/olmocr", served_name: str = "olmocr") -> list[str]:
    """How the stand-in is started: exactly vLLM's command line, through ``python -m olmocr.standin``."""
    return [sys.executable, "-m", "olmocr.standin", "serve", model, "--served-model-name", served_name,
            "--port", str(port), "--host", "127.0.0.1"]


class StandIn(ProcGroup):
    """The stand-in server (``python -m olmocr.standin serve ...``) with a known capacity:
    each request is answered after ``latency`` s, at most ``concurrency`` in parallel."""

    def __init__(self, *, latency: float = 0.0, concurrency: int | None = None, output_tokens: int = 750,
                 log_dir: Path, extra_env: dict[str, str] | None = None, port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.latency = latency
        self.concurrency = concurrency
        env = dict(os.environ)
        env["OLMOCR_STANDIN_LATENCY"] = json.dumps(latency)
        if concurrency is not None:
            env["OLMOCR_STANDIN_CONCURRENCY"] = json.dumps(concurrency)
        env["OLMOCR_STANDIN_OUTPUT_TOKENS"] = json.dumps(output_tokens)
        env.update(extra_env or {})
        super().__init__([*standin_argv(self.port), *extra_args], env=env, cwd=str(REPO),
                         log_path=log_dir / f"standin-{self.port}.log", name="stand-in")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.poll() is not None:
                raise RuntimeError(f"stand-in exited ({self.poll()}):\n{self.log_tail()}")
            r = http_get(self.base_url + "/v1/models", timeout=2)
            return r.status_code == 200 and "olmocr" in r.text

        try:
            wait_until(ready, timeout, what="stand-in /v1/models")
        except RuntimeError:
            raise
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from exc

    def control(self, patch: dict[str, Any]) -> None:
        admin_control(self.base_url, patch)

    @property
    def ideal_pages_per_s(self) -> float | None:
        if self.latency <= 0 or not self.concurrency:
            return None
        return self.concurrency / self.latency


def admin_control(base_url: str, patch: dict[str, Any], timeout: float = 5.0) -> None:
    import requests

    r = requests.post(base_url + "/admin/control", json=patch, timeout=timeout)
    r.raise_for_status()


def completion_ok(base_url: str, timeout: float = 5.0) -> bool:
    """One tiny real request (max_tokens 1): the only proof a server makes progress."""
    import requests

    r = requests.post(base_url + "/v1/chat/completions", timeout=timeout, json={
        "model": "olmocr", "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]})
    return r.status_code == 200


# --------------------------------------------------------------------------------------------------
# Pipeline runs and their output


def our_pipeline_argv(workspace: Path, url: str, pdfs: Iterable[Path], extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "olmocr.pipeline", str(workspace), "--vllm-url", url,
            "--pdfs", *[str(p) for p in pdfs], *extra]


def upstream_pipeline_argv(workspace: Path, url: str, pdfs: Iterable[Path], extra: Sequence[str] = ()) -> list[str]:
    return [str(UPSTREAM_PYTHON), "-m", "olmocr.pipeline", str(workspace), "--server", url.rstrip("/") + "/v1",
            "--model", "olmocr", "--pdfs", *[str(p) for p in pdfs], *extra]


def upstream_available() -> bool:
    return UPSTREAM_PYTHON.exists()


def our_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def upstream_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return env


def _iter_jsonl(path: Path) -> Iterable[dict]:
    if path.name.endswith(".zst"):
        import io

        import zstandard

        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as zr:
            for line in io.TextIOWrapper(zr, encoding="utf-8"):
                if line.strip():
                    yield json.loads(line)
    else:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


@dataclass
class OutputCount:
    documents: int = 0
    pages: int = 0
    fallback_pages: int = 0
    duplicate_documents: int = 0
    duplicate_pages: int = 0
    missing_documents: int = 0
    lost_pages: int = 0
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["missing"] = d["missing"][:20]
        return d


def count_output(workspace: Path, expected: dict[Path, int] | None = None) -> OutputCount:
    """Count documents and pages in ``workspace/results/*.jsonl`` (Dolma documents as upstream writes
    them: ``metadata.Source-File`` and ``metadata.pdf-total-pages``) and compare with the expected
    {pdf: pages}. A document present twice is a duplicate; one absent is lost."""
    files = sorted(glob.glob(str(workspace / "results" / "*.jsonl"))) + \
        sorted(glob.glob(str(workspace / "results" / "*.jsonl.zst")))
    seen: Counter[str] = Counter()
    pages_by_source: dict[str, int] = {}
    c = OutputCount()
    for f in files:
        for doc in _iter_jsonl(Path(f)):
            md = doc.get("metadata", {})
            src = str(md.get("Source-File", ""))
            n = int(md.get("pdf-total-pages", 0) or 0)
            c.documents += 1
            c.pages += n
            c.fallback_pages += int(md.get("total-fallback-pages", 0) or 0)
            seen[src] += 1
            pages_by_source[src] = n
    for src, k in seen.items():
        if k > 1:
            c.duplicate_documents += k - 1
            c.duplicate_pages += (k - 1) * pages_by_source[src]
    if expected is not None:
        def norm(p: str) -> str:
            return os.path.realpath(p)

        got = {norm(s) for s in seen}
        for pdf, n in expected.items():
            if norm(str(pdf)) not in got:
                c.missing_documents += 1
                c.lost_pages += n
                c.missing.append(str(pdf))
    return c


# --------------------------------------------------------------------------------------------------
# Memory


class RssSampler:
    """Samples the summed RSS of a process and all its descendants every ``interval`` s (psutil).

    Also keeps, at the peak, each process's share (to see *which* process grows), a coarse timeline
    (one point per ``timeline_every`` s) and, once a second, the summed PSS (proportional set size:
    shared pages such as the pdfium library counted once across the processes)."""

    def __init__(self, pid: int, interval: float = 0.1, timeline_every: float = 5.0) -> None:
        self.pid = pid
        self.interval = interval
        self.timeline_every = timeline_every
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        self.peak_procs = 0
        self.peak_breakdown: list[tuple[str, int]] = []
        self.timeline: list[tuple[float, int]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _label(self, p) -> str:
        if p.pid == self.pid:
            return "main"
        try:
            cmd = p.cmdline()
        except Exception:  # noqa: BLE001
            return "?"
        text = " ".join(cmd)
        if "spawn_main" in text or "multiprocessing" in text:
            return "worker"
        if "olmocr.pipeline" in text:
            return "forked child"
        return os.path.basename(cmd[0]) if cmd else "?"

    def _sample(self, with_pss: bool) -> tuple[int, int, list] | None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total = pss = 0
        parts = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                total += rss
                parts.append((p, rss))
                if with_pss:
                    pss += getattr(p.memory_full_info(), "pss", 0)
        self.peak_procs = max(self.peak_procs, len(procs))
        return total, pss, parts

    def _run(self) -> None:
        t0 = time.monotonic()
        next_timeline = t0
        next_pss = t0
        while not self._stop.is_set():
            now = time.monotonic()
            with_pss = now >= next_pss
            got = self._sample(with_pss)
            if got is not None:
                total, pss, parts = got
                self.samples += 1
                if with_pss:
                    next_pss = now + 1.0
                    self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
                if total > self.peak_bytes:
                    self.peak_bytes = total
                    self.peak_breakdown = [(self._label(p), rss) for p, rss in parts]
                if now >= next_timeline:
                    self.timeline.append((round(now - t0, 1), total))
                    next_timeline = now + self.timeline_every
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_bytes

    def report(self) -> dict[str, Any]:
        mb = 2**20
        return {"peak_rss_mb": self.peak_bytes / mb, "peak_pss_mb": self.peak_pss_bytes / mb,
                "peak_processes": self.peak_procs, "samples": self.samples,
                "peak_breakdown_mb": [(name, round(b / mb, 1)) for name, b in self.peak_breakdown],
                "timeline_mb": [(t, round(b / mb, 1)) for t, b in self.timeline]}


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class Figure:
    """One row of the table: a ratio against a named comparison, with absolute values as context."""

    section: str
    name: str
    value: float | None
    unit: str
    compared_with: str
    ratio: float | None = None
    context: str = ""
    target: str = ""
    ok: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (v != v):  # NaN
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def format_table(figures: Sequence[Figure], width: int | None = 60) -> str:
    """A Markdown table of the figures; cells are cut at ``width`` characters (None: never)."""
    headers = ["section", "figure", "value", "unit", "ratio", "compared with", "target", "ok", "context"]
    rows = [[f.section, f.name, _fmt(f.value), f.unit, _fmt(f.ratio), f.compared_with, f.target,
             "" if f.ok is None else ("yes" if f.ok else "NO"), f.context] for f in figures]
    rows = [[c.replace("|", "/") for c in r] for r in rows]
    if width:
        rows = [[c if len(c) <= width else c[: width - 1] + "~" for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(Exception):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(Exception):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=5).stdout.strip()
    with contextlib.suppress(Exception):
        info["pdftoppm"] = subprocess.run(["pdftoppm", "-v"], capture_output=True, text=True,
                                          timeout=5).stderr.splitlines()[0]
    return info


def make_tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"olmocr-bench-{prefix}-"))


# --------------------------------------------------------------------------------------------------
# CPU time by process


def _proc_label(p: Any, root_pid: int) -> str:
    if p.pid == root_pid:
        return "main"
    try:
        text = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001
        return "other"
    if "resource_tracker" in text:
        return "other"
    if "spawn_main" in text or "multiprocessing" in text:
        return "renderer"
    return "other"


class CpuMeter:
    """CPU seconds (user + system, from /proc via psutil) of a process tree, by process role.

    Samples every ``interval`` s and keeps each process's last reading; children are idle at the end of a
    run, so their last reading is their total. The main process's total comes from the kernel when it is
    reaped (``wait4`` rusage, which also holds the children it reaped): main = that total minus the children
    seen. CPU time, unlike wall time, is barely affected by other work on a shared machine.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                # "other" is looked at again: a spawned worker has its parent's command line until it execs,
                # and a first sample in between once filed a renderer under "other" for the whole run.
                known = self.last.get(p.pid, ("other", 0.0))[0]
                label = known if known != "other" else _proc_label(p, self.pid)
                self.last[p.pid] = (label, t.user + t.system)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> CpuMeter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def by_role(self, reaped_total: float | None = None) -> dict[str, Any]:
        """{"main": s, "renderer": s, "other": s, "renderers": n}; ``reaped_total`` is the wait4 figure."""
        out: dict[str, Any] = {"main": 0.0, "renderer": 0.0, "other": 0.0, "renderers": 0}
        for label, cpu in self.last.values():
            out[label] += cpu
            out["renderers"] += label == "renderer"
        out["main_sampled"] = out["main"]
        if reaped_total is not None:
            children = out["renderer"] + out["other"]
            out["main"] = max(out["main"], reaped_total - children)
        return out


def wait_with_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float | None]:
    """Wait for ``proc`` (killed after ``timeout``); returns (exit status, CPU seconds of it and the
    children it reaped, from the kernel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    return None, None


def process_cpu_seconds(pid: int) -> float | None:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def rounds_wanted(quick: bool) -> int:
    """``OLMOCR_BENCH_ROUNDS`` (default 3, 1 with ``--quick``): the client-bound rounds of the cpu and throughput
    sections, each a limit and our pipeline back to back; their figure is the median round."""
    raw = os.environ.get("OLMOCR_BENCH_ROUNDS")
    return max(1, int(raw)) if raw else (1 if quick else 3)


def median_round(rounds: list[dict], key: str) -> dict:
    """The round whose ``key`` is the median (the lower middle one for an even count)."""
    ordered = sorted(rounds, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]
