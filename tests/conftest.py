"""Session set-up: the sample documents every test reads are built here, never read from outside the repo;
the ``deployments`` fixture (supervised stand-in deployments)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests import sample_docs
from tests.deployment_helpers import Deployment

_root: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _root
    _root = Path(tempfile.mkdtemp(prefix="olmocr-sample-docs-"))
    sample_docs.use(_root)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)


@pytest.fixture
def deployments():
    """Start supervised stand-in deployments (``deployments(**Deployment kwargs)``); all cleaned up after."""
    created: list[Deployment] = []

    def make(**kwargs) -> Deployment:
        dep = Deployment(**kwargs)
        created.append(dep)
        return dep.start()

    yield make
    for dep in created:
        dep.cleanup()
