"""One errors tree with one root: every public exception class the package defines descends from OlmocrError
and is drawn in a tree docstring (olmocr/errors.py, or its half's errors module)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import olmocr
from olmocr import errors
from olmocr.errors import OlmocrError
from olmocr.pipeline import errors as pipeline_errors
from olmocr.server import errors as server_errors

TREES = (errors.__doc__ or "") + (pipeline_errors.__doc__ or "") + (server_errors.__doc__ or "")


def _package_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(olmocr.__path__, "olmocr."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            # A private class (``_Stopped``) is control flow inside its module, never raised to a caller.
            if issubclass(obj, BaseException) and obj.__module__ == info.name and not name.startswith("_"):
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_the_package_defines_has_the_one_root():
    exceptions = _package_exceptions()
    assert len(exceptions) > 20, "the walk found too few exception classes to mean anything"
    outside = sorted(name for name, cls in exceptions.items() if not issubclass(cls, OlmocrError))
    assert not outside, f"exceptions outside the OlmocrError tree: {outside}"


def test_every_exception_is_drawn_in_a_tree():
    missing = sorted(name for name, cls in _package_exceptions().items()
                     if cls is not OlmocrError and f"{cls.__name__} " not in TREES)
    assert not missing, f"exceptions not drawn in any errors-tree docstring: {missing}"


def test_a_bad_front_matter_is_a_model_answer_not_a_configuration_error():
    assert issubclass(pipeline_errors.FrontMatterError, pipeline_errors.ModelAnswerError)
    assert not issubclass(pipeline_errors.FrontMatterError, pipeline_errors.ConfigError)
