"""olmocr-service in the supervisord deployment: the checked-in supervisord.conf under the real supervisord,
the stand-in as vLLM. ``[program:olmocr-service]`` is off by default and, once started with its workspace
and servers in the environment, converts a document."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from olmocr.server.supervisor_config import INCLUDE_LAYOUT, render_program_sections
from tests.deployment_helpers import wait_for
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import REPO_ROOT, free_port

pytestmark = pytest.mark.timeout(180)


@pytest.mark.slow
def test_the_service_program_is_off_by_default_and_runs_when_started(deployments, tmp_path: Path) -> None:
    service_port, vllm_port = free_port(), free_port()
    ws = tmp_path / "ws"
    # supervisord passes its environment to every program: the service finds its workspace and servers there.
    dep = deployments(env={"OLMOCR_PORT": str(vllm_port), "OLMOCR_VLLM_URL": f"http://127.0.0.1:{vllm_port}",
                           "OLMOCR_SERVICE_WORKSPACE": str(ws), "OLMOCR_SERVICE_PORT": str(service_port),
                           "OLMOCR_SERVICE_WORKERS": "1"})
    dep.port = vllm_port
    dep.wait_status(lambda s: s.get("healthy"), 60, "the server healthy")
    info = dep.proxy.supervisor.getProcessInfo("olmocr-service")
    assert info["statename"] == "STOPPED", info  # autostart = false
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{service_port}/healthz", timeout=2)
    assert dep.proxy.supervisor.startProcess("olmocr-service") is True
    url = f"http://127.0.0.1:{service_port}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/readyz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(ready, 60, "olmocr-service /readyz")
    pdf = write_text_pdf(tmp_path / "one.pdf", ["Started by supervisord."])
    r = requests.post(f"{url}/v1/convert", files=[("file", ("one.pdf", pdf.read_bytes()))], timeout=120)
    assert r.status_code == 200, r.text + dep.log_text("olmocr-service.log")[-2000:]
    assert (ws / "service" / "jobs").is_dir()
    assert dep.proxy.supervisor.stopProcess("olmocr-service") is True
    assert dep.proxy.supervisor.getProcessInfo("olmocr-service")["exitstatus"] == 0
    assert "olmocr-service" in dep.log_text("olmocr-service.log")


def test_the_include_file_carries_the_service_off_too() -> None:
    sections = render_program_sections(INCLUDE_LAYOUT)
    block = sections[sections.index("[program:olmocr-service]"):]
    assert "command = /opt/olmocr-serve/.venv/bin/python -m olmocr.service\n" in block
    assert "\nautostart = false\n" in block
    assert "[program:olmocr-service]" in (REPO_ROOT / "supervisord.conf").read_text()
