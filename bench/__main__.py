"""``python -m bench [--quick] [render] [throughput] [recovery] [memory]``: run the benchmark suite.

Prints a table, writes ``bench/out/results.json`` (figures, details, machine) and
``bench/out/results.md`` (the table as Markdown, for bench/RESULTS.md). Each section is independent:
one that fails is reported in the JSON and the table, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from bench.common import OUT_DIR, Figure, format_table, load_corpus, log, machine_info, upstream_available

SECTIONS = ["render", "throughput", "memory", "recovery"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    ap.add_argument("sections", nargs="*", metavar="SECTION",
                    help=f"any of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="a subset: small documents, fewer settings, fast health profile")
    ap.add_argument("--no-upstream", action="store_true", help="skip the upstream 0.4.27 runs")
    args = ap.parse_args(argv)
    sections = args.sections or SECTIONS
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; choose from {SECTIONS}")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(quick=args.quick)
    info = machine_info()
    log(f"corpus: {corpus.describe()}; sections: {', '.join(sections)}; quick={args.quick}")
    results: dict = {"machine": info, "quick": args.quick, "sections": sections, "corpus": corpus.describe(),
                     "upstream": "olmocr 0.4.27" if upstream_available() else None,
                     "figures": [], "details": {}, "errors": {}, "durations_s": {}}
    figures: list[Figure] = []

    def save() -> None:
        results["figures"] = [f.as_dict() for f in figures]
        (OUT_DIR / "results.json").write_text(json.dumps(results, indent=2, default=str))

    client_limit = None
    for section in sections:
        t0 = time.monotonic()
        log(f"=== {section} ===")
        try:
            if section == "render":
                from bench import render

                figs, detail = render.run(corpus, quick=args.quick)
                if not args.quick:  # same pages as the throughput runs
                    client_limit = detail["two_processes"]["ours_pages_per_s"]
            elif section == "throughput":
                from bench import throughput

                figs, detail = throughput.run(corpus, quick=args.quick, client_limit=client_limit,
                                              with_upstream=not args.no_upstream)
            elif section == "memory":
                from bench import memory

                figs, detail = memory.run_rss(quick=args.quick, with_upstream=not args.no_upstream)
            else:
                from bench import recovery

                figs, detail = recovery.run(corpus, quick=args.quick)
            figures.extend(figs)
            results["details"][section] = detail
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            log(f"section {section} failed: {exc}")
            results["errors"][section] = traceback.format_exc()
            figures.append(Figure(section, "section failed", None, "", str(exc).splitlines()[0][:60] if str(exc) else
                                  type(exc).__name__, ok=False))
        results["durations_s"][section] = round(time.monotonic() - t0, 1)
        save()

    table = format_table(figures)
    print(table)
    md = [f"Run {info['date']} on {info.get('cpu_model', '?')} ({info.get('cpus_usable', info['cpus'])} cores, "
          f"{info.get('memory_gib', '?')} GiB), commit {info.get('git_commit', '?')}, "
          f"{'quick' if args.quick else 'full'} run over {corpus.describe()}.", "", table, ""]
    (OUT_DIR / "results.md").write_text("\n".join(md))
    log(f"wrote {OUT_DIR / 'results.json'} and {OUT_DIR / 'results.md'}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
