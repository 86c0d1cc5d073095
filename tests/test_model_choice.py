"""Which model (issue 28, item 16): upstream's current model, ``allenai/olmOCR-2-7B-1025-FP8``, goes through every
way of serving (supervisord, the foreground manager, the pipeline's internal mode) as the default does: served as
``olmocr``, and every page asked with the same v4 YAML prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from olmocr import envs
from olmocr.pipeline.pages.prompts import PROMPT_V4_YAML
from olmocr.server.command import build_vllm_command
from olmocr.server.manager import READY_MESSAGE
from olmocr.server.settings import ServerSettings
from tests.deployment_helpers import wait_for
from tests.fault_proxy import FaultProxy, _Handler, _Server
from tests.pipeline_helpers import assert_every_page_once, run_pipeline
from tests.sample_docs import write_text_pdf
from tests.test_internal_mode import InternalRun

OLMOCR_2 = "allenai/olmOCR-2-7B-1025-FP8"
MODELS = [envs.DEFAULT_MODEL, OLMOCR_2]


def test_the_command_line_differs_in_the_model_alone():
    default = build_vllm_command(ServerSettings(vllm_bin="/bin/vllm"), [], None)
    second = build_vllm_command(ServerSettings(vllm_bin="/bin/vllm", model=OLMOCR_2), [], None)
    assert default[2] == envs.DEFAULT_MODEL and second[2] == OLMOCR_2
    assert default[:2] == second[:2] and default[3:] == second[3:]
    assert default[3:5] == ["--served-model-name", "olmocr"]


class RecordingProxy(FaultProxy):
    """A pass-through proxy that keeps the JSON of every chat request (what the pipeline asks the model)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.chats: list[dict] = []

    def start(self) -> RecordingProxy:
        import threading

        proxy = self

        class Handler(_Handler):
            owner = proxy

            def _read_body(self) -> bytes:
                body = super()._read_body()
                if self.path == "/v1/chat/completions":
                    proxy.chats.append(json.loads(body))
                return body

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        daemon=True)
        self._thread.start()
        return self


def prompts(chats: list[dict]) -> set[tuple[str, str]]:
    return {(chat["model"], part["text"]) for chat in chats for message in chat["messages"]
            for part in message["content"] if part["type"] == "text"}


@pytest.mark.integration
@pytest.mark.parametrize("model", MODELS)
def test_supervisord_serves_either_model_and_the_pipeline_asks_the_same_prompt(model, deployments, tmp_path: Path):
    dep = deployments(env={"OLMOCR_MODEL": model})
    status = dep.wait_status(lambda s: s["healthy"], 60, "healthy")
    assert status["model"] == model
    info = dep.standin_info()
    assert (info["model"], info["served_model_name"]) == (model, "olmocr")
    pdf = write_text_pdf(tmp_path / "doc.pdf", 2)
    with RecordingProxy(dep.base_url) as proxy:
        rc, out = run_pipeline(tmp_path / "ws", proxy.url, [pdf], "--render_processes", "1",
                               log=tmp_path / "pipeline.log")
    assert rc == 0, out[-3000:]
    assert_every_page_once(tmp_path / "ws", [pdf])
    assert len(proxy.chats) >= 2 and prompts(proxy.chats) == {("olmocr", PROMPT_V4_YAML)}


@pytest.mark.integration
def test_the_manager_serves_olmocr_2(manager_run):
    run = manager_run(OLMOCR_2)
    wait_for(lambda: READY_MESSAGE in run.lines, 40, "ready message")
    info = requests.get(f"http://127.0.0.1:{run.port}/admin/info", timeout=5).json()
    assert (info["model"], info["served_model_name"]) == (OLMOCR_2, "olmocr")
    assert f"serving {OLMOCR_2} as 'olmocr'" in run.output()


@pytest.mark.integration
def test_internal_mode_serves_olmocr_2(tmp_path: Path):
    pdfs = [write_text_pdf(tmp_path / "doc.pdf", 2)]
    run = InternalRun(tmp_path, pdfs, "--model", OLMOCR_2)
    try:
        assert run.wait(90) == 0, run.output()[-3000:]
        assert_every_page_once(run.workspace, pdfs)
        started = next(line for line in (run.run_dir / "logs" / "vllm.log").read_text().splitlines()
                       if "starting:" in line)
        assert f"serve {OLMOCR_2} --served-model-name olmocr" in started
        run.assert_nothing_left(5)
    finally:
        run.close()
