"""``--version`` on every command (issue 28, item 18: the finalizer had none)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from olmocr import __version__


@pytest.mark.parametrize("module", ["olmocr.vllm_server_manager", "olmocr.pipeline", "olmocr.pipeline.finalize",
                                    "olmocr.server.status", "olmocr.server.status_service",
                                    "olmocr.server.listener"])
def test_version(module):
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, f"olmocr-serve {__version__}", "")
