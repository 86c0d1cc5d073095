"""Loggers are named after their modules, and a pipeline process gives every one of them a handler: in internal
mode the server modules it runs in-process (GPU count, vLLM version, manager) log through the run's handlers,
not Python's last-resort handler."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import olmocr
from olmocr.logformat import RUN_LOGGERS
from olmocr.pipeline.cli import setup_logging

PACKAGE = Path(olmocr.__file__).parent


def module_loggers() -> dict[str, str]:
    """``{module path: the name its module-level logger is given}`` (``__name__`` shown as such)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and ast.unparse(node.value.func) == "logging.getLogger" and node.value.args):
                arg = node.value.args[0]
                found[str(path.relative_to(PACKAGE.parent))] = (
                    "__name__" if isinstance(arg, ast.Name) and arg.id == "__name__" else ast.unparse(arg))
    return found


def test_every_module_logger_is_named_after_its_module():
    loggers = module_loggers()
    assert len(loggers) > 20
    # The service's modules share one logger, "olmocr.service", which its own setup gives a handler.
    odd = {path: name for path, name in loggers.items() if name != "__name__" and not path.startswith("olmocr/service/")}
    assert not odd, f"name these loggers after their modules (logging.getLogger(__name__)): {odd}"


def test_a_pipeline_process_handles_the_server_modules_it_runs(monkeypatch):
    for name in RUN_LOGGERS:  # leave the process's loggers as they were
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [])
        monkeypatch.setattr(logger, "propagate", logger.propagate)
        monkeypatch.setattr(logger, "level", logger.level)
    setup_logging(None)
    for module in ("olmocr.server.gpus", "olmocr.server.vllm_executable", "olmocr.server.manager",
                   "olmocr.pipeline.runner", "olmocr.pipeline.workspace.queue"):
        logger = logging.getLogger(module)
        assert logger.hasHandlers() and logger.getEffectiveLevel() <= logging.INFO, module
        handled_by = logger
        while not handled_by.handlers:
            handled_by = handled_by.parent
        assert handled_by.name in RUN_LOGGERS, (module, handled_by.name)
