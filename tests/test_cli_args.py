"""The pipeline's command line (issue #27, "The CLI"): one resolved-arguments object built once, one way to report
a usage error (``prog: error: ...`` on one line, exit status 2, whoever finds the mistake), and every exit status
from ``olmocr/exit_codes.py``."""

from __future__ import annotations

import ast
import dataclasses
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from olmocr.exit_codes import STATUS_USAGE
from olmocr.logformat import RUN_LOGGERS
from olmocr.pipeline import defaults
from olmocr.pipeline.cli import RunArgs, build_parser, resolve_args
from olmocr.pipeline.errors import UsageError
from tests.standin_helpers import REPO_ROOT, clean_env

PROG = "python -m olmocr.pipeline"


@pytest.fixture
def run_loggers() -> Iterator[None]:
    """resolve_args sets up the run's loggers: put them back as they were for the other tests of this process."""
    saved = [(logging.getLogger(n), logging.getLogger(n).handlers[:], logging.getLogger(n).propagate,
              logging.getLogger(n).level) for n in RUN_LOGGERS]
    yield
    for run_logger, handlers, propagate, level in saved:
        run_logger.handlers[:] = handlers
        run_logger.propagate = propagate
        run_logger.setLevel(level)


def test_the_command_line_is_resolved_once_into_a_frozen_object(tmp_path: Path, run_loggers: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k-every-server-123456\n")
    monkeypatch.setenv("OLMOCR_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("OLMOCR_CA_BUNDLE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("OLMOCR_API_KEY", "k-from-the-environment")
    monkeypatch.delenv("OLMOCR_VLLM_URL", raising=False)
    run = resolve_args(build_parser(), [str(tmp_path / "ws"), "--vllm_url", "http://127.0.0.1:9",
                                        "--pdfs", "a.pdf", "--wait-for-queue", "30"])
    assert isinstance(run, RunArgs) and not run.internal and run.vllm_args == ()
    assert (run.api_key, run.key_file, run.ca_bundle) == ("k-from-the-environment", str(keys),
                                                          str(tmp_path / "ca.pem"))
    assert run.pages_per_group == defaults.PAGES_PER_GROUP_WITH_KEY  # a key: the smaller default
    assert run.workspace == str(tmp_path / "ws") and not run.stats_only
    assert run.args.wait_for_queue == 30 and run.args.server == ["http://127.0.0.1:9"]
    assert "k-from-the-environment" not in repr(run)  # a key never reaches a log through the object
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.api_key = "other"  # type: ignore[misc]
    monkeypatch.delenv("OLMOCR_API_KEY")
    monkeypatch.delenv("OLMOCR_API_KEYS_FILE")
    plain = resolve_args(build_parser(), [str(tmp_path / "ws"), "--stats"])
    assert plain.stats_only and plain.api_key is None and plain.pages_per_group == defaults.PAGES_PER_GROUP


def test_a_bad_setting_is_a_usage_error_raised_not_an_exit(tmp_path: Path, run_loggers: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLMOCR_FAIL_FAST_SHARE", "2")
    with pytest.raises(UsageError, match="OLMOCR_FAIL_FAST_SHARE"):
        resolve_args(build_parser(), [str(tmp_path / "ws"), "--vllm-url", "http://127.0.0.1:9"])


#: A mistake found at each place the command line is checked: argparse (a numeric range), the upstream flags'
#: refusal, resolving the settings, the server list, a file named on the command line, the metrics exposure.
MISTAKES = [
    (["--workers", "0"], {}, "argument --workers: must be 1 or more, not 0 (see --help)"),
    (["--beaker"], {}, "--beaker: submitting the job to AI2's Beaker cluster is not supported"),
    ([], {"OLMOCR_FAIL_FAST_SHARE": "2"}, "OLMOCR_FAIL_FAST_SHARE"),
    ([], {"OLMOCR_API_KEY_FILE": "/no/such/key"}, "cannot read API key file /no/such/key"),
    (["--vllm-url", "http://127.0.0.1:9#weight=-1"], {}, "(see --help)"),
    (["--ca_bundle", "/no/such.pem"], {}, "--ca_bundle /no/such.pem: no such file (a PEM file of CA certificates) "
                                          "(see --help)"),
    (["--metrics_port", "9", "--metrics_host", "0.0.0.0"], {}, "without a token"),
    (["--retry_fallback_pages", "nosuchreason"], {}, "(see --help)"),
]


@pytest.mark.parametrize(("extra", "env", "words"), MISTAKES, ids=[m[2][:30] for m in MISTAKES])
def test_every_usage_error_is_one_line_and_exit_2(tmp_path: Path, extra: list[str], env: dict[str, str],
                                                  words: str) -> None:
    ws = tmp_path / "new ws"
    argv = [str(ws), *extra] if "--vllm-url" in extra else [str(ws), "--vllm-url", "http://127.0.0.1:9", *extra]
    proc = subprocess.run([sys.executable, "-m", "olmocr.pipeline", *argv], env={**clean_env(), **env},
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == STATUS_USAGE, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: ") and words in lines[0], proc.stderr
    assert proc.stdout == "" and not ws.exists()  # before any work: no empty workspace left behind


PIPELINE = REPO_ROOT / "olmocr" / "pipeline"
#: The modules of the pipeline's command line and of its exit statuses.
CLI_MODULES = [PIPELINE / name for name in ("cli.py", "flags.py", "upstream_flags.py", "stats.py")] + [
    PIPELINE / "workspace" / "queue_wait.py"]


#: The functions whose return value is the process's exit status.
STATUS_FUNCTIONS = {"main", "_main", "_run", "_run_with_signals", "print_stats"}


def _literal_statuses(path: Path) -> list[str]:
    """``return N`` (in a function that returns the exit status), ``exit(N)`` and ``SystemExit(N)`` with a
    number written out in ``path``."""
    tree = ast.parse(path.read_text())
    in_status_functions = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                           and f.name in STATUS_FUNCTIONS for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        value = None
        if isinstance(node, ast.Return) and id(node) in in_status_functions:
            value = node.value
        elif isinstance(node, ast.Call) and node.args and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "exit", "_exit", "SystemExit"):
            value = node.args[0]
        if isinstance(value, ast.Constant) and type(value.value) is int:
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_exit_statuses_come_from_exit_codes_and_usage_errors_have_one_writer() -> None:
    literal = [hit for path in CLI_MODULES for hit in _literal_statuses(path)]
    assert not literal, f"exit statuses written as numbers (use olmocr.exit_codes): {literal}"
    for path in PIPELINE.rglob("*.py"):
        text = path.read_text()
        assert "from olmocr.pipeline.cli import STATUS" not in text, path  # statuses come from exit_codes only
        if path.name != "flags.py":
            assert '}: error: ' not in text, f"{path}: writes a usage error itself (use flags.usage_exit)"
            assert ".exit(2" not in text and "parser.exit(" not in text, path
