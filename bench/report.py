"""``python -m bench report``: bench/RESULTS.md, generated from the raw figures in bench/results/*.json.

Every benchmark run (``bench/run SECTION``, ``python -m bench SECTION``) writes one small JSON per section
into ``bench/results/`` (:func:`save_section`): when and where it ran, the load average before and after,
the commit, and its figures. This module turns those files into the Markdown report, so every number in
bench/RESULTS.md can be traced to a file and re-derived by re-running its section. Figures from runs
older than this scheme were transcribed into the same format by hand; their files say so (``source``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, _fmt

RESULTS_DIR = BENCH_DIR / "results"
REPORT = BENCH_DIR / "RESULTS.md"
#: Detail larger than this stays in bench/out/results.json only (the committed files stay small).
MAX_DETAIL_BYTES = 8000

TITLES = {
    "cpu": "CPU seconds per page by process (issue 16)",
    "render": "Rendering",
    "throughput": "Throughput: ours vs the render limit and vs upstream 0.4.27",
    "memory": "Memory",
    "recovery": "Recovery of the supervised server",
    "storm": "Storm (issue 11): every fault at once",
    "statusd": "Status service",
    "fleet": "Fleet (issue 9): one pipeline across several servers",
    "fleet16": "Many servers from one process (issue 16): 16 stand-ins",
    "reading": "Reading stand-in (issue 23): Tesseract, not olmOCR",
    "probes": "Kubernetes probes (issue 21)",
    "multigpu": "One box, many GPUs (issue 17)",
    "providers": "Hosted providers (issue 31): a quota paced and not",
    "scale": "A million documents, a thousand workers (issue 29): the work queue on an in-process object store",
    "service": "Documents over HTTP (issue 32): olmocr-service against the stand-in",
    "micro": "Micro-benchmarks (issue 16): the choices inside a page's path",
}

HOW_TO_READ = """\
- Every figure is a **ratio taken in the same run** against the comparison named in *compared with*: the
  machine (2 cores) is shared with other work, so absolute pages/s and seconds are context, the ratio is the
  result. *value* is absolute (in *unit*); *ratio* = value / comparison; *target* is where an issue sets
  one, *ok* says whether it is met.
- **CPU seconds** (user + system, from the kernel: `/proc`, `wait4`) are what the machine's load affects
  least: prefer them to wall-time rates when the load average (given for every run) is high.
- Each section below comes from one file in `bench/results/` (named under its heading); re-run it with
  `bench/run SECTION` and regenerate this file with `python -m bench report`. How each figure is taken:
  [docs/benchmarks.md](../docs/benchmarks.md)."""


def _machine_line(m: dict[str, Any]) -> str:
    parts = [m.get("cpu_model") or "?", f"{m.get('cpus_usable', m.get('cpus', '?'))} cores"]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB")
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    return ", ".join(str(p) for p in parts)


def save_section(section: str, entry: dict[str, Any], machine: dict[str, Any], *, quick: bool, corpus: str,
                 loadavg_before: list[float], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results_dir/<section>.json``: this run's figures and how it ran (see the module docstring)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "section": section,
        "source": f"python -m bench{' --quick' if quick else ''} {section}",
        "run_at": entry.get("run_at"),
        "duration_s": entry.get("duration_s"),
        "commit": machine.get("git_commit"),
        "machine": {k: machine.get(k) for k in ("host", "cpu_model", "cpus", "cpus_usable", "memory_gib",
                                                 "platform", "python")},
        "loadavg_before": loadavg_before,
        "loadavg_after": entry.get("loadavg_after"),
        "quick": quick,
        "corpus": corpus,
        "error": (entry.get("error") or "").strip().splitlines()[-1:] or None,
        "figures": entry.get("figures", []),
    }
    detail = entry.get("detail")
    if detail:
        text = json.dumps(detail, default=str)
        record["detail"] = json.loads(text) if len(text) <= MAX_DETAIL_BYTES else "see bench/out/results.json"
    path = results_dir / f"{section}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else ("yes" if v else "NO")
    if isinstance(v, (int, float)):
        return _fmt(float(v))
    return str(v)


def figure_table(figures: list[dict[str, Any]]) -> str:
    headers = ["figure", "value", "unit", "ratio", "compared with", "target", "ok", "context"]
    rows = [[str(f.get("name", "")), _cell(f.get("value")), str(f.get("unit", "")), _cell(f.get("ratio")),
             str(f.get("compared_with", "")), str(f.get("target", "")), _cell(f.get("ok")),
             str(f.get("context", ""))] for f in figures]
    rows = [[c.replace("|", "/").replace("\n", " ") for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def load_records(path: Path) -> list[dict[str, Any]]:
    """The section records of one results file. Besides this module's one-section files, a copy of a whole
    ``bench/out/results.json`` (``by_section``) is read as one record per section it holds."""
    data = json.loads(path.read_text())
    if "by_section" not in data:
        return [data]
    machine = data.get("machine", {})
    return [{"section": name, "source": f"python -m bench {name} (bench/out/results.json kept as {path.name})",
             "run_at": entry.get("run_at"), "duration_s": entry.get("duration_s"),
             "commit": machine.get("git_commit"), "machine": machine,
             "loadavg_before": machine.get("loadavg_at_start"), "loadavg_after": entry.get("loadavg_after"),
             "quick": data.get("quick"), "corpus": data.get("corpus"), "figures": entry.get("figures", []),
             "error": (entry.get("error") or "").strip().splitlines()[-1:] or None}
            for name, entry in data["by_section"].items()]


def _order(item: tuple[Path, dict[str, Any]]) -> tuple[int, str]:
    from bench.__main__ import SECTIONS

    path, record = item
    section = record.get("section", path.stem)
    return (SECTIONS.index(section) if section in SECTIONS else len(SECTIONS), path.stem)


def section_markdown(path: Path, r: dict[str, Any]) -> str:
    section = r.get("section", path.stem)
    title = r.get("title") or TITLES.get(section, section)
    lines = [f"## {title}", ""]
    source = str(r.get("source", "?"))
    when = [f"**Run:** {r.get('run_at') or '?'}", f"`{source}`" if source.startswith("python -m bench") else source]
    if r.get("duration_s") is not None:
        when.append(f"{r['duration_s']:.0f} s")
    if r.get("commit"):
        when.append(f"commit {r['commit']}")
    lines.append("- " + "; ".join(when) + ".")
    if r.get("machine"):
        lines.append(f"- **Machine:** {_machine_line(r['machine'])}.")
    load = []
    if r.get("loadavg_before"):
        load.append(f"before {r['loadavg_before']}")
    if r.get("loadavg_after"):
        load.append(f"after {r['loadavg_after']}")
    if load:
        lines.append(f"- **Load average** (1, 5, 15 min): {', '.join(load)}.")
    if r.get("corpus"):
        lines.append(f"- **Pages:** {r['corpus']}{' (quick run)' if r.get('quick') else ''}.")
    if r.get("setup"):
        lines.append(f"- **Setup:** {r['setup']}")
    lines.append(f"- **Raw figures:** `bench/results/{path.name}`.")
    if r.get("error"):
        lines.append(f"- **The section failed:** {' '.join(r['error'])}")
    lines += ["", figure_table(r.get("figures", [])), ""]
    for note in r.get("notes", []):
        lines += [note, ""]
    sidecar = path.with_suffix(".notes.md")  # hand-written remarks beside a file kept as the run wrote it
    if sidecar.exists():
        lines += [sidecar.read_text().strip(), ""]
    return "\n".join(lines)


def generate(results_dir: Path = RESULTS_DIR) -> str:
    items = sorted(((f, r) for f in results_dir.glob("*.json") for r in load_records(f)), key=_order)
    parts = ["# Benchmark results", "",
             "<!-- Generated by `python -m bench report` from bench/results/*.json: edit those, not this. -->", "",
             "## How to read this", "", HOW_TO_READ, ""]
    failing = [(r.get("section", f.stem), fig.get("name"))
               for f, r in items for fig in r.get("figures", []) if fig.get("ok") is False]
    if failing:
        parts += ["**Targets not met:** " + "; ".join(f"{s}: {n}" for s, n in failing) + ".", ""]
    parts += [section_markdown(f, r) for f, r in items]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else REPORT
    out.write_text(generate())
    print(f"wrote {out} from {len(list(RESULTS_DIR.glob('*.json')))} files in {RESULTS_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
