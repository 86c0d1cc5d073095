"""``python -m bench [--quick] [--corpus DIR] [SECTION ...]``: run the benchmarks (sections: SECTIONS below).
``python -m bench report``: regenerate bench/RESULTS.md from the raw figures in bench/results/.

Each section's raw figures also go to ``bench/results/SECTION.json`` (committed; see bench/report.py).

Prints a table, writes ``bench/out/results.json`` (figures, details, machine) and
``bench/out/results.md`` (the table as Markdown, for bench/RESULTS.md). Each section is independent:
one that fails is reported in the JSON and the table, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import (
    OUT_DIR,
    Figure,
    format_table,
    load_corpus,
    log,
    machine_info,
    set_corpus_root,
    upstream_available,
)

SECTIONS = ["cpu", "render", "throughput", "memory", "recovery", "storm", "statusd", "fleet", "fleet16", "reading",
            "probes", "multigpu", "providers", "scale", "service", "micro"]
NO_CORPUS = {"statusd", "probes", "scale", "service"}  # sections that need no PDFs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # python -m bench report [OUT.md]: bench/RESULTS.md from bench/results/*.json
        from bench import report

        return report.main(argv[1:])
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    ap.add_argument("sections", nargs="*", metavar="SECTION",
                    help=f"any of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="a subset: small documents, fewer settings, fast health profile")
    ap.add_argument("--corpus", metavar="DIR", type=Path,
                    help="directory of PDFs to benchmark on, searched recursively (default: $OLMOCR_BENCH_CORPUS, "
                         "else ../shared/corpus beside the checkout if it exists)")
    ap.add_argument("--no-upstream", action="store_true", help="skip the upstream 0.4.27 runs")
    args = ap.parse_args(argv)
    sections = args.sections or SECTIONS
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; choose from {SECTIONS}")

    if args.corpus is not None:
        set_corpus_root(args.corpus)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(quick=args.quick) if set(sections) - NO_CORPUS else None
    corpus_text = corpus.describe() if corpus else "no corpus (not needed)"
    info = machine_info()
    log(f"corpus: {corpus_text}; sections: {', '.join(sections)}; quick={args.quick}")
    results_path = OUT_DIR / "results.json"
    # Re-running some sections keeps the other sections' last results (each section's figures are
    # ratios taken within that section's own run; each section records when and where it ran).
    by_section: dict = {}
    if results_path.exists() and set(sections) != set(SECTIONS):
        try:
            old = json.loads(results_path.read_text())
            if old.get("quick") == args.quick:
                by_section = {k: v for k, v in old.get("by_section", {}).items() if k not in sections}
        except (OSError, ValueError):
            by_section = {}
    results: dict = {"machine": info, "quick": args.quick, "corpus": corpus_text,
                     "upstream": "olmocr 0.4.27" if upstream_available() else None, "by_section": by_section}

    def all_figures() -> list[Figure]:
        return [Figure(**f) for name in SECTIONS for f in by_section.get(name, {}).get("figures", [])]

    def save() -> None:
        results["figures"] = [f.as_dict() for f in all_figures()]
        results["errors"] = {k: v["error"] for k, v in by_section.items() if v.get("error")}
        results_path.write_text(json.dumps(results, indent=2, default=str))

    failed = False
    for section in sections:
        t0 = time.monotonic()
        log(f"=== {section} ===")
        entry: dict = {"run_at": machine_info()["date"], "machine": info.get("host"), "error": None}
        load_before = [round(x, 2) for x in os.getloadavg()]
        try:
            if section == "render":
                from bench import render

                figs, detail = render.run(corpus, quick=args.quick)
            elif section == "throughput":
                from bench import throughput

                figs, detail = throughput.run(corpus, quick=args.quick, with_upstream=not args.no_upstream)
            elif section == "memory":
                from bench import memory

                figs, detail = memory.run_rss(quick=args.quick, with_upstream=not args.no_upstream)
            elif section == "storm":
                from bench import storm

                figs, detail = storm.run(corpus, quick=args.quick)
            elif section == "statusd":
                from bench import statusd

                figs, detail = statusd.run(quick=args.quick, log_dir=OUT_DIR / "logs" / "statusd")
            elif section == "probes":
                from bench import probes

                figs, detail = probes.run(quick=args.quick, log_dir=OUT_DIR / "logs" / "probes")
            elif section == "fleet":
                from bench import fleet

                figs, detail = fleet.run(corpus, quick=args.quick)
            elif section == "fleet16":
                from bench import fleet

                figs, detail = fleet.run_wide(corpus, quick=args.quick)
            elif section == "cpu":
                from bench import cpu

                figs, detail = cpu.run(corpus, quick=args.quick)
            elif section == "reading":
                from bench import reading

                figs, detail = reading.run(corpus, quick=args.quick)
            elif section == "providers":
                from bench import providers

                figs, detail = providers.run(corpus, quick=args.quick)
            elif section == "scale":
                from bench import scale

                figs, detail = scale.run(quick=args.quick)
            elif section == "service":
                from bench import service

                figs, detail = service.run(quick=args.quick)
            elif section == "micro":
                from bench import micro

                figs, detail = micro.run(corpus, quick=args.quick)
            elif section == "multigpu":
                from bench import multigpu

                figs, detail = multigpu.run(corpus, quick=args.quick)
            else:
                from bench import recovery

                figs, detail = recovery.run(corpus, quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            log(f"section {section} failed: {exc}")
            failed = True
            entry["error"] = traceback.format_exc()
            first = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            figs, detail = [Figure(section, "section failed", None, "", first, ok=False)], {}
        entry["duration_s"] = round(time.monotonic() - t0, 1)
        # Other work on a shared machine skews absolute figures: record how busy it was.
        entry["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        entry["figures"] = [f.as_dict() for f in figs]
        entry["detail"] = detail
        by_section[section] = entry
        save()
        from bench.report import save_section

        saved = save_section(section, entry, info, quick=args.quick, corpus=corpus_text, loadavg_before=load_before)
        log(f"raw figures: {saved}")

    figures = all_figures()
    print(format_table(figures))
    when = "; ".join(f"{k} {v['run_at']} (load after: {v['loadavg_after']})" for k, v in by_section.items())
    md = [f"Machine: {info.get('cpu_model', '?')}, {info.get('cpus_usable', info['cpus'])} cores, "
          f"{info.get('memory_gib', '?')} GiB, {info['platform']}; commit {info.get('git_commit', '?')}; "
          f"{'quick' if args.quick else 'full'} run over {corpus_text}.", "",
          f"Sections run at: {when}.", "", format_table(figures, width=None), ""]
    (OUT_DIR / "results.md").write_text("\n".join(md))
    log(f"wrote {results_path} and {OUT_DIR / 'results.md'}; `python -m bench report` regenerates "
        "bench/RESULTS.md from bench/results/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
