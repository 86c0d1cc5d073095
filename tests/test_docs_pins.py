"""Claims in the guides that code can check, pinned: the vLLM command line the wrapper execs, and the
pipeline's options table against its own ``--help`` (every flag documented, every documented flag real,
every documented plain default the parser's)."""

from __future__ import annotations

import argparse
import re
import shlex

from olmocr.pipeline.cli import build_parser
from olmocr.server.command import build_vllm_command
from olmocr.server.settings import ServerSettings
from tests.standin_helpers import REPO_ROOT

DOCS = REPO_ROOT / "docs"


def _code_block_after(text: str, marker: str) -> str:
    start = text.index(marker)
    block = text[text.index("```", start):]
    return block.split("\n", 1)[1].split("```", 1)[0]


def test_the_documented_vllm_command_line_is_what_the_wrapper_builds_by_default():
    ops = (DOCS / "operations.md").read_text()
    block = _code_block_after(ops, "The command line the wrapper execs")
    documented = shlex.split(block.replace("\\\n", " "))
    assert documented == build_vllm_command(ServerSettings()), (
        "docs/operations.md's vLLM command line differs from build_vllm_command(ServerSettings())")


def _options() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if a.option_strings and a.help != argparse.SUPPRESS
            and "--help" not in a.option_strings]


def test_every_pipeline_flag_is_documented_in_a_guide():
    guides = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    undocumented = [a.option_strings[0] for a in _options()
                    if not any(re.search(rf"`{re.escape(s)}[` =\[]", guides) for s in a.option_strings)]
    assert not undocumented, f"flags missing from docs/: {undocumented}"


def _options_table() -> list[tuple[list[str], str]]:
    text = (DOCS / "pipeline.md").read_text()
    section = text[text.index("## Options"):]
    section = section[:section.index("\n## ", 3)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `-"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((re.findall(r"`(-[-\w]+)", cells[0]), cells[1]))
    return rows


def test_every_flag_in_the_options_table_exists_with_the_documented_default():
    by_flag = {s: a for a in _options() for s in a.option_strings}
    rows = _options_table()
    assert len(rows) > 20
    for flags, default in rows:
        for flag in flags:
            assert flag in by_flag, f"docs/pipeline.md documents {flag}, which the pipeline does not have"
        action = by_flag[flags[0]]
        if re.fullmatch(r"[0-9.]+", default):
            assert float(default) == float(action.default), f"{flags[0]}: documented {default}, is {action.default}"
        if default == "off":
            assert action.default in (False, None), f"{flags[0]}: documented off, is {action.default}"


def test_the_command_line_defaults_are_the_configs():
    """One home per default: each flag that fills a PipelineConfig field defaults to that field's default."""
    import dataclasses

    from olmocr.pipeline.runner import PipelineConfig

    config_defaults = {f.name: f.default for f in dataclasses.fields(PipelineConfig)
                       if f.default is not dataclasses.MISSING}
    parser_defaults = {a.dest: a.default for a in _options() if a.dest in config_defaults and a.default is not None}
    assert len(parser_defaults) >= 10
    assert {k: config_defaults[k] for k in parser_defaults} == parser_defaults


def _section_list(text: str, marker: str) -> list[str]:
    """The comma-separated section names after ``marker``, across continued comment lines."""
    start = text.index(marker) + len(marker)
    lines = text[start:].splitlines()
    names = lines[0]
    for line in lines[1:]:
        more = re.match(r"#?\s+#\s+(.*)", line)  # a continuation: nothing but blanks before its comment
        if not more:
            break
        names += "," + more.group(1)
    return [n.strip() for n in names.split(",") if n.strip()]


def test_the_documented_bench_sections_are_the_ones_that_run():
    from bench.__main__ import SECTIONS

    guide = (DOCS / "benchmarks.md").read_text()
    script = (REPO_ROOT / "bench" / "run").read_text()
    assert _section_list(guide, "# one or more sections:") == SECTIONS, (
        "docs/benchmarks.md's list of sections differs from bench/__main__.py's SECTIONS")
    assert _section_list(script, "# chosen sections:") == SECTIONS, (
        "bench/run's list of sections differs from bench/__main__.py's SECTIONS")
