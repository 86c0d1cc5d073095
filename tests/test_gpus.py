"""OLMOCR_GPUS: parsing, visible GPUs, and the split into servers (pure functions, row by row)."""

from __future__ import annotations

import os
import stat

import pytest

from olmocr.server.errors import SettingsError
from olmocr.server.gpus import (
    GpuRequest,
    choose_gpus,
    detect_gpus,
    parse_gpus,
    plan_servers,
    port_range_url,
    visible_gpus,
)
from olmocr.server.settings import ServerSettings

SMI_4 = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)
GPU 3: NVIDIA H100 80GB HBM3 (UUID: GPU-dddd)
"""


@pytest.mark.parametrize("raw, expected", [
    (None, GpuRequest(all=True)),
    ("", GpuRequest(all=True)),
    ("all", GpuRequest(all=True)),
    ("ALL", GpuRequest(all=True)),
    ("2", GpuRequest(count=2)),
    ("0,1,3", GpuRequest(devices=("0", "1", "3"))),
    (" 3 , 1 ", GpuRequest(devices=("3", "1"))),
    ("GPU-aaaa,GPU-bbbb", GpuRequest(devices=("GPU-aaaa", "GPU-bbbb"))),
])
def test_parse_gpus(raw: str | None, expected: GpuRequest) -> None:
    assert parse_gpus(raw) == expected


@pytest.mark.parametrize("raw, message", [
    ("0", "at least 1"),
    ("0,,1", "not 'all', a count or a list"),
    ("some", None),  # a single word is a device id (a UUID-like name), not an error
    ("0,1,0", "lists GPU 0 twice"),
    ("0;1", "not 'all', a count or a list"),
])
def test_parse_gpus_mistakes(raw: str, message: str | None) -> None:
    if message is None:
        assert parse_gpus(raw) == GpuRequest(devices=(raw,))
        return
    with pytest.raises(SettingsError, match=message):
        parse_gpus(raw)


@pytest.mark.parametrize("smi, cvd, expected", [
    (SMI_4, None, ("0", "1", "2", "3")),
    (SMI_4, "2,3", ("2", "3")),  # CUDA_VISIBLE_DEVICES wins (Slurm, Kubernetes set it)
    (SMI_4, "GPU-cccc", ("GPU-cccc",)),
    (SMI_4, "", ()),  # set but empty: CUDA sees no GPU
    (SMI_4, "1,-1,2", ("1",)),  # CUDA stops at the first invalid entry
    (None, None, ()),  # no nvidia-smi
    ("No devices were found\n", None, ()),
])
def test_visible_gpus(smi: str | None, cvd: str | None, expected: tuple[str, ...]) -> None:
    assert visible_gpus(smi, cvd) == expected


@pytest.mark.parametrize("request_, visible, expected", [
    (GpuRequest(all=True), ("0", "1", "2", "3"), ("0", "1", "2", "3")),
    (GpuRequest(all=True), (), ()),
    (GpuRequest(count=2), ("0", "1", "2", "3"), ("0", "1")),
    (GpuRequest(count=2), ("5", "7"), ("5", "7")),
    (GpuRequest(devices=("0", "1", "3")), (), ("0", "1", "3")),
])
def test_choose_gpus(request_: GpuRequest, visible: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert choose_gpus(request_, visible) == expected


def test_a_count_above_the_visible_gpus_is_one_clear_error() -> None:
    with pytest.raises(SettingsError, match=r"OLMOCR_GPUS=3 but only 2 GPU\(s\) are visible \(0, 1\)"):
        choose_gpus(GpuRequest(count=3), ("0", "1"))


@pytest.mark.parametrize("gpus, per_server, expected", [
    ((), 1, [("vllm", "vllm", 30024, ())]),  # no GPU: one server as today
    (("0",), 1, [("vllm", "vllm", 30024, ("0",))]),  # one GPU keeps the name vllm
    (("0", "1", "3"), 1, [("vllm-0", "vllm:vllm-0", 30024, ("0",)), ("vllm-1", "vllm:vllm-1", 30025, ("1",)),
                          ("vllm-2", "vllm:vllm-2", 30026, ("3",))]),
    (("0", "1", "2", "3"), 2, [("vllm-0", "vllm:vllm-0", 30024, ("0", "1")),
                               ("vllm-1", "vllm:vllm-1", 30025, ("2", "3"))]),
    (("0", "1", "2", "3"), 4, [("vllm", "vllm", 30024, ("0", "1", "2", "3"))]),
])
def test_plan_servers(gpus: tuple[str, ...], per_server: int, expected: list) -> None:
    slots = plan_servers(gpus, per_server, 30024)
    assert [(s.name, s.rpc_name, s.port, s.gpus) for s in slots] == expected
    assert [s.index for s in slots] == list(range(len(expected)))


def test_gpus_that_do_not_split_into_tensor_parallel_runs_are_refused() -> None:
    with pytest.raises(SettingsError, match=r"3 GPU\(s\) \(0,1,2\) do not split into servers of 2"):
        plan_servers(("0", "1", "2"), 2, 30024)


def test_port_range_url() -> None:
    assert port_range_url("gpu-a", plan_servers(("0", "1", "2"), 1, 30024)) == "http://gpu-a:30024-30026"
    assert port_range_url("gpu-a", plan_servers((), 1, 30024)) == "http://gpu-a:30024"


def test_settings_read_olmocr_gpus_and_tensor_parallel() -> None:
    settings = ServerSettings.from_env({"OLMOCR_GPUS": "0,1,2,3", "OLMOCR_TENSOR_PARALLEL_SIZE": "2",
                                        "OLMOCR_PORT": "31000"})
    assert [(s.port, s.cuda_visible_devices) for s in settings.server_slots({})] == [(31000, "0,1"),
                                                                                     (31001, "2,3")]
    with pytest.raises(SettingsError, match="OLMOCR_GPUS='x,' is not"):
        ServerSettings.from_env({"OLMOCR_GPUS": "x,"})


def _fake_nvidia_smi(directory: str, output: str) -> None:
    path = os.path.join(directory, "nvidia-smi")
    with open(path, "w") as fh:
        fh.write("#!/bin/sh\n[ \"$1\" = -L ] || exit 9\ncat <<'OUT'\n" + output + "OUT\n")
    os.chmod(path, stat.S_IRWXU)


def test_all_and_a_count_ask_nvidia_smi_on_path(tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(str(tmp_path), SMI_4)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpus(parse_gpus("all"), {}) == ("0", "1", "2", "3")
    assert detect_gpus(parse_gpus("3"), {}) == ("0", "1", "2")
    assert detect_gpus(parse_gpus("all"), {"CUDA_VISIBLE_DEVICES": "1,3"}) == ("1", "3")


def test_no_nvidia_smi_means_one_server_without_gpus(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvidia-smi
    settings = ServerSettings.from_env({})
    assert [(s.name, s.gpus) for s in settings.server_slots({})] == [("vllm", ())]
