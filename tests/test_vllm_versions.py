"""The vLLM release table (olmocr/server/vllm_versions.py): its decisions row by row, the version probe and
its cache, and every entry checked against the real release sources.

The sources are checked in: a small zip per release of the files that define the command line, the request
body and the model registry, in ``tests/data/vllm-sources/`` (tests/vllm_sources.py). Nothing is downloaded
here; a release the table needs and the repo lacks fails the test, naming the command that adds it.
"""

from __future__ import annotations

import ast
import os
import stat
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from olmocr.server.errors import SettingsError
from olmocr.server.vllm_executable import learn_vllm_version
from olmocr.server.vllm_versions import (
    ARCHITECTURE,
    FEATURES,
    FLAG,
    JSON_VALUE,
    NEWEST_TESTED,
    OLDEST_SERVABLE,
    OLDEST_TESTED,
    REQUEST_FIELD,
    Version,
    guided_field_for,
    judge_version,
    parse_version,
    plan_server_flags,
    show,
)
from tests.vllm_sources import SOURCES_DIR, extract_path

# ------------------------------------------------------------------------------------------ decisions

PLAN_DEFAULTS = dict(host="127.0.0.1", port=30024, served_model_name="olmocr", tensor_parallel_size=1,
                     data_parallel_size=1, max_model_len=16384, gpu_memory_utilization=0.9, shutdown_timeout=30,
                     scheduling_policy="priority")


def plan(version: str | None, **overrides):
    return plan_server_flags(parse_version(version) if version else None, **{**PLAN_DEFAULTS, **overrides})


@pytest.mark.parametrize("version,passed,left_out", [
    # upstream olmOCR's pin: everything but the graceful drain
    ("0.11.2", ["--scheduling-policy", "--gpu-memory-utilization", "--data-parallel-size"],
     ["--shutdown-timeout", "--disable-log-requests"]),
    ("0.17.1", [], ["--shutdown-timeout", "--disable-log-requests"]),
    ("0.18.0", ["--shutdown-timeout"], ["--disable-log-requests"]),
    ("0.33.0", ["--shutdown-timeout", "--scheduling-policy"], ["--disable-log-requests", "--enable-log-requests"]),
    ("0.34.0", ["--shutdown-timeout"], ["--disable-log-requests"]),  # newer than tested: as the newest
    (None, ["--shutdown-timeout"], ["--disable-log-requests"]),  # unknown: as the newest tested
    # before --enable-log-requests, request logging is turned off the old way
    ("0.10.0", ["--disable-log-requests"], ["--shutdown-timeout", "--enable-log-requests"]),
])
def test_only_flags_the_release_accepts_are_passed(version, passed, left_out) -> None:
    args = plan(version).args
    for flag in passed:
        assert flag in args, (version, args)
    for flag in left_out:
        assert flag not in args, (version, args)


def test_every_flag_left_out_is_explained_once_with_its_consequence() -> None:
    notes = plan("0.11.2").notes
    assert notes == ["vLLM 0.11.2 has no --shutdown-timeout: in-flight requests are aborted on stop; "
                     "upgrade to >= 0.18 for a graceful drain"]
    assert plan("0.33.0").notes == []
    assert plan("0.11.2", shutdown_timeout=0).notes == []  # nothing asked for, nothing lost


def test_older_releases_get_the_forms_they_understand() -> None:
    old = plan("0.8.4")
    assert old.args[old.args.index("--limit-mm-per-prompt") + 1] == "video=0"
    assert any("KEY=VALUE" in note for note in old.notes)
    new = plan("0.8.5")
    assert new.args[new.args.index("--limit-mm-per-prompt") + 1] == '{"video": 0}'
    before_dp = plan("0.8.2")
    assert "--data-parallel-size" not in before_dp.args
    assert any("--data-parallel-size" in note for note in before_dp.notes)
    with pytest.raises(SettingsError, match="OLMOCR_DATA_PARALLEL_SIZE=2 needs vLLM >= 0.8.3"):
        plan("0.8.2", data_parallel_size=2)


@pytest.mark.parametrize("version,refused,warned", [
    ("0.6.6", True, False), ("0.7.1", True, False),  # no Qwen2.5-VL: cannot serve olmOCR
    ("0.7.2", False, True), ("0.10.1.1", False, True),  # servable, older than tested
    ("0.11.2", False, False), ("0.32.0+cpu", False, False), ("0.33.0", False, False),
    ("0.34.0", False, True), (None, False, True),
])
def test_the_declared_range(version, refused, warned) -> None:
    verdict = judge_version(parse_version(version) if version else None)
    assert bool(verdict.refuse) == refused and bool(verdict.warning) == warned
    if refused:
        assert "\n" not in verdict.refuse and "cannot serve olmOCR" in verdict.refuse
        assert "0.11.2-0.33.0" in verdict.refuse


def test_the_gpu_extra_declares_the_tested_range() -> None:
    setup_cfg = (Path(__file__).resolve().parent.parent / "setup.cfg").read_text()
    assert f"vllm>={show(OLDEST_TESTED)},<={show(NEWEST_TESTED)}" in setup_cfg


@pytest.mark.parametrize("version,field", [
    ("0.10.2", "guided_regex"), ("0.11.0", "structured_outputs"), ("0.11.2", "structured_outputs"),
    ("0.33.0", "structured_outputs"), (None, "structured_outputs"),
])
def test_guided_decoding_field_comes_from_the_table(version, field) -> None:
    assert guided_field_for(parse_version(version) if version else None) == field


# ------------------------------------------------------------------------------------------ probe


def _fake_vllm(path: Path, version: str, calls: Path) -> None:
    """A shell-script 'vLLM' that answers --version and counts how often it was asked."""
    path.write_text(f"#!/bin/sh\necho asked >> {calls}\necho 'INFO some log line'\necho {version}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_version_is_asked_once_per_executable_and_mtime(tmp_path: Path) -> None:
    exe, calls, cache = tmp_path / "vllm", tmp_path / "calls", tmp_path / "run" / "vllm-version.json"
    _fake_vllm(exe, "0.11.2", calls)
    assert learn_vllm_version(str(exe), cache) == "0.11.2"
    assert learn_vllm_version(str(exe), cache) == "0.11.2"
    assert calls.read_text().count("asked") == 1  # the second answer came from the cache
    _fake_vllm(exe, "0.33.0", calls)  # an upgrade rewrites the executable
    os.utime(exe, ns=(exe.stat().st_atime_ns, exe.stat().st_mtime_ns + 10**9))
    assert learn_vllm_version(str(exe), cache) == "0.33.0"
    assert calls.read_text().count("asked") == 2
    assert learn_vllm_version(str(exe), cache, use_cache=False) == "0.33.0"
    assert calls.read_text().count("asked") == 3


def test_vllms_console_script_is_read_from_package_metadata(tmp_path: Path) -> None:
    """vLLM's own entry point: the version comes from its environment's metadata, without running vLLM."""
    site = tmp_path / "site"
    dist = site / "vllm-0.11.2.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.11.2\n")
    python = tmp_path / "python"  # another environment's interpreter that sees that distribution
    python.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    exe = tmp_path / "vllm"
    exe.write_text(f"#!{python}\nimport sys\nfrom vllm.entrypoints.cli.main import main\nsys.exit(main())\n")
    exe.chmod(0o755)  # running it would fail: there is no vllm package, only its metadata
    assert learn_vllm_version(str(exe), tmp_path / "cache.json") == "0.11.2"
    assert not (tmp_path / "cache.json").exists()  # metadata is cheap: nothing cached


# ------------------------------------------------------------------------------------------ the sources

#: The PyPI release just before each boundary of the table (vLLM's release list).
RELEASE_BEFORE: dict[Version, str] = {
    (0, 7, 2): "0.7.1", (0, 8, 3): "0.8.2", (0, 8, 5): "0.8.4", (0, 10, 1): "0.10.0", (0, 11, 0): "0.10.2",
    (0, 12, 0): "0.11.2", (0, 17, 0): "0.16.0", (0, 18, 0): "0.17.1",
}
class Release:
    """What one release defines, read statically from its sources (importing vLLM needs torch)."""

    def __init__(self, sources: Path) -> None:
        with zipfile.ZipFile(sources) as z:
            self.files = {name: z.read(name).decode() for name in z.namelist()}
        self.flags: set[str] = set()
        self.request_fields: set[str] = set()
        self.limit_mm_types: set[str] = set()
        for name, text in self.files.items():
            with warnings.catch_warnings():  # old releases have invalid escapes in docstrings
                warnings.simplefilter("ignore")
                tree = ast.parse(text)
            if name.endswith("protocol.py"):
                self._read_request(tree)
            else:
                self._read_flags(tree)

    def _read_flags(self, tree: ast.Module) -> None:
        classes = {c.name: c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                self.flags.update(n for n in names if n.startswith("--"))
                if "--limit-mm-per-prompt" in names:
                    self.limit_mm_types |= {ast.unparse(k.value) for k in node.keywords if k.arg == "type"}
        # Newer releases turn the fields of an argument dataclass (FrontendArgs) into flags:
        # add_cli_args registers f"--{key.replace('_', '-')}" for every field.
        auto = {c.name for c in classes.values() for f in c.body
                if isinstance(f, ast.FunctionDef) and f.name == "add_cli_args"
                and any(isinstance(x, ast.JoinedStr) for x in ast.walk(f)) and "replace" in ast.unparse(f)}

        def fields(name: str) -> set[str]:
            cls = classes.get(name)
            if cls is None:
                return set()
            found = set().union(*(fields(b.id) for b in cls.bases if isinstance(b, ast.Name)))
            return found | {"--" + s.target.id.replace("_", "-") for s in cls.body
                            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}

        for cls in classes.values():
            if cls.name in auto or {b.id for b in cls.bases if isinstance(b, ast.Name)} & auto:
                self.flags |= fields(cls.name)

    def _read_request(self, tree: ast.Module) -> None:
        for cls in ast.walk(tree):
            if isinstance(cls, ast.ClassDef) and cls.name == "ChatCompletionRequest":
                self.request_fields |= {s.target.id for s in cls.body
                                        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}

    def has(self, feature_name: str) -> bool:
        feature = FEATURES[feature_name]
        if feature.kind == FLAG:
            return feature.name in self.flags
        if feature.kind == REQUEST_FIELD:
            return feature.name in self.request_fields
        if feature.kind == ARCHITECTURE:
            return any(f'"{feature.name}"' in text for name, text in self.files.items() if name.endswith("registry.py"))
        if feature.kind == JSON_VALUE:  # before 0.8.5 the value went through nullable_kvs (KEY=VALUE only)
            return "--limit-mm-per-prompt" in self.flags and "nullable_kvs" not in self.limit_mm_types
        raise AssertionError(f"no check for kind {feature.kind!r}")


def expectations() -> list[tuple[str, str, bool]]:
    """(release, feature, defined there?) for every boundary of the table, and the newest tested release."""
    rows: list[tuple[str, str, bool]] = []
    for name, feature in FEATURES.items():
        start = feature.since or OLDEST_SERVABLE
        rows.append((show(start), name, True))
        if feature.since is not None:
            rows.append((RELEASE_BEFORE[feature.since], name, False))
        if feature.until is not None:
            rows.append((RELEASE_BEFORE[feature.until], name, True))
            rows.append((show(feature.until), name, False))
        else:
            rows.append((show(NEWEST_TESTED), name, True))
    return rows


def needed_releases() -> list[str]:
    return sorted({release for release, _, _ in expectations()}, key=parse_version)


@pytest.fixture(scope="module")
def releases() -> dict[str, Release]:
    absent = [v for v in needed_releases() if not extract_path(v).exists()]
    assert not absent, (f"no sources of vLLM {', '.join(absent)} in {SOURCES_DIR}: add them with "
                        f"`.venv/bin/python -m tests.vllm_sources` and commit them")
    return {version: Release(extract_path(version)) for version in needed_releases()}


def test_every_checked_in_release_is_needed() -> None:
    """A release dropped from the table leaves no extract behind."""
    extra = sorted({p.name for p in SOURCES_DIR.glob("vllm-*.zip")} - {extract_path(v).name for v in needed_releases()})
    assert extra == [], f"not needed by the table any more: {extra} (git rm them)"


@pytest.mark.slow
def test_every_table_entry_matches_the_release_sources(releases: dict[str, Release]) -> None:
    wrong = [f"{name}: table says {'defined' if expected else 'absent'} in {release}, the sources disagree"
             for release, name, expected in expectations() if releases[release].has(name) != expected]
    assert wrong == [], "\n".join(wrong)


@pytest.mark.slow
def test_the_sources_are_read_for_real(releases: dict[str, Release]) -> None:
    """The static reading finds vLLM's full option set, not a handful (a reader that finds nothing would
    make the table test above pass vacuously for the 'absent' rows)."""
    for version, release in releases.items():
        assert len(release.flags) > 100, (version, sorted(release.flags)[:10])
        assert {"--model", "--max-model-len", "--port"} <= release.flags, version
        assert "messages" in release.request_fields, version
