"""bench/RESULTS.md is what ``python -m bench report`` makes of bench/results/*.json (never edited by hand),
and every committed results file says when, where and under what load its figures were taken."""

from __future__ import annotations

from bench.report import REPORT, RESULTS_DIR, generate, load_records


def test_results_md_is_generated_from_the_raw_figures() -> None:
    assert REPORT.read_text() == generate(), (
        "bench/RESULTS.md differs from what bench/results/*.json give: run `python -m bench report` "
        "(and edit the JSON files, not RESULTS.md)")


def test_every_results_file_says_when_and_where_it_ran() -> None:
    files = sorted(RESULTS_DIR.glob("*.json"))
    assert files
    for path, record in ((f, r) for f in files for r in load_records(f)):
        assert record.get("run_at"), f"{path.name}: no run_at"
        assert record.get("source"), f"{path.name}: no source"
        assert record.get("machine"), f"{path.name}: no machine"
        assert record.get("loadavg_before") or record.get("loadavg_after"), f"{path.name}: no load average"
        assert record.get("figures"), f"{path.name}: no figures"
        for fig in record["figures"]:
            assert fig.get("name") and "value" in fig, f"{path.name}: a figure without name or value"
