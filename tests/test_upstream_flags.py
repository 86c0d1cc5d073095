"""Every flag of upstream olmOCR 0.4.27's pipeline is known here: accepted, or rejected with its reason."""

from __future__ import annotations

import re

import pytest

from olmocr.pipeline.cli import build_parser, main
from tests.standin_helpers import REPO_ROOT

#: ``python -m olmocr.pipeline --help`` of olmocr 0.4.27 from PyPI: each option with a sample value.
UPSTREAM_FLAGS: dict[str, list[str]] = {
    "--pdfs": ["a.pdf"], "--model": ["allenai/olmOCR-2-7B-1025-FP8"], "--workspace_profile": ["p"],
    "--pdf_profile": ["p"], "--pages_per_group": ["10"], "--max_page_retries": ["3"],
    "--max_page_error_rate": ["0.01"], "--workers": ["4"], "--max_concurrent_requests": ["64"],
    "--max_server_ready_timeout": ["60"], "--apply_filter": [], "--stats": [], "--markdown": [],
    "--target_longest_image_dim": ["1024"], "--target_anchor_text_len": ["-1"], "--guided_decoding": [],
    "--disk_logging": ["x.log"], "--server": ["http://127.0.0.1:1/v1"], "--api_key": ["k"],
    "--gpu-memory-utilization": ["0.8"], "--max_model_len": ["8192"], "--tensor-parallel-size": ["2"],
    "-tp": ["2"], "--data-parallel-size": ["2"], "-dp": ["2"], "--port": ["30030"],
}
UPSTREAM_REJECTED = ["--beaker", "--beaker_workspace", "--beaker_cluster", "--beaker_gpus", "--beaker_priority"]


@pytest.mark.parametrize("flag", sorted(UPSTREAM_FLAGS))
def test_upstream_flag_is_accepted(flag: str) -> None:
    args, unknown = build_parser().parse_known_args(["ws", flag, *UPSTREAM_FLAGS[flag]])
    assert unknown == []


@pytest.mark.parametrize("flag", UPSTREAM_REJECTED)
def test_beaker_flags_are_rejected_with_a_reason(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ws", flag] if flag == "--beaker" else ["ws", flag, "value"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage dump
    assert err.startswith(f"python -m olmocr.pipeline: error: {flag}: submitting the job to AI2's Beaker cluster "
                          "is not supported by olmocr-serve; run the pipeline on each machine instead")


def test_unknown_flags_with_a_server_url_are_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ws", "--server", "http://127.0.0.1:1", "--enforce-eager"])
    assert exited.value.code == 2
    assert ("error: unrecognized arguments: --enforce-eager (flags the pipeline does not know are passed to vLLM "
            "only when it starts its own server, i.e. without --vllm-url)") in capsys.readouterr().err


def test_docs_table_lists_every_upstream_flag() -> None:
    table = (REPO_ROOT / "docs" / "upstream-flags.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = {flag for row in rows for flag in re.findall(r"`(-[-\w]+)", row.split("|")[1])}
    assert set(UPSTREAM_FLAGS) | set(UPSTREAM_REJECTED) <= listed


def test_internal_mode_without_vllm_says_what_to_do(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setenv("OLMOCR_VLLM_BIN", "no-such-vllm-here")
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "ws"), "--pdfs", str(tmp_path / "a.pdf")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "python -m olmocr.pipeline: error: no vLLM executable 'no-such-vllm-here' to start a server with: install "
        "the gpu extra (pip install 'olmocr-serve[gpu]') or set OLMOCR_VLLM_BIN, or give a running server with "
        "--vllm-url\n")
    assert not (tmp_path / "ws").exists()  # nothing claimed, nothing written


def test_a_server_in_olmocr_vllm_url_is_external_mode(monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setenv("OLMOCR_VLLM_URL", "http://127.0.0.1:1")
    with pytest.raises(SystemExit) as exited:
        main(["ws", "--enforce-eager"])  # vLLM flags only mean something when the pipeline starts the server
    assert exited.value.code == 2
    assert "unrecognized arguments: --enforce-eager" in capsys.readouterr().err
