"""--workspace_profile / --pdf_profile: the workspace and the inputs are reached with their own AWS profile.

Two S3 servers (moto, server mode) stand for two accounts; each profile of an AWS config file written for
the test names its own endpoint and keys, so where the data went proves which profile was used.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests.pipeline_helpers import pipeline_command
from tests.s3_helpers import start_s3_server
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import REPO_ROOT, clean_env, free_port, stop_process_group, wait_http_ok

pytestmark = pytest.mark.integration


@pytest.fixture
def two_accounts(tmp_path: Path):
    # Two S3 services with separate state: moto's backend is global to a process, so the inputs' one
    # runs in a process of its own (it is only read: no conditional writes to serialize).
    ws_endpoint, stop_ws = start_s3_server()
    port = free_port()
    pdf_server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pdf_endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(pdf_endpoint, timeout=30, proc=pdf_server)
        config = tmp_path / "aws-config"
        config.write_text(f"[profile ws]\nregion = us-east-1\nendpoint_url = {ws_endpoint}\n\n"
                          f"[profile pdfs]\nregion = us-east-1\nendpoint_url = {pdf_endpoint}\n")
        credentials = tmp_path / "aws-credentials"
        credentials.write_text("[ws]\naws_access_key_id = wskey\naws_secret_access_key = wssecret\n\n"
                               "[pdfs]\naws_access_key_id = pdfkey\naws_secret_access_key = pdfsecret\n")
        env = {k: v for k, v in clean_env().items() if not k.startswith("AWS_")}
        env.update({"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
                    "AWS_EC2_METADATA_DISABLED": "true"})
        yield env, {name: boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                                       aws_access_key_id="x", aws_secret_access_key="x")
                    for name, url in (("ws", ws_endpoint), ("pdfs", pdf_endpoint))}
    finally:
        stop_ws()
        stop_process_group(pdf_server)


def _keys(client, bucket: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.slow
def test_workspace_and_pdf_profiles(two_accounts, standin, tmp_path: Path) -> None:
    env, s3 = two_accounts
    s3["pdfs"].create_bucket(Bucket="inputs")
    s3["ws"].create_bucket(Bucket="work")
    for name in ("a", "b"):
        pdf = write_text_pdf(tmp_path / f"{name}.pdf", 1)
        s3["pdfs"].put_object(Bucket="inputs", Key=f"docs/{name}.pdf", Body=pdf.read_bytes())

    cmd = pipeline_command("s3://work/run1", standin.url, ["s3://inputs/docs/*.pdf"],
                           "--workspace_profile", "ws", "--pdf_profile", "pdfs")
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    keys = _keys(s3["ws"], "work")
    assert "run1/work_index_list.csv.zstd" in keys
    assert len([k for k in keys if k.startswith("run1/results/")]) == 1
    assert [b["Name"] for b in s3["pdfs"].list_buckets()["Buckets"]] == ["inputs"]  # nothing written there
    # (moto's in-process backend is shared with earlier tests' buckets: only ask about these two)
    assert "work" in [b["Name"] for b in s3["ws"].list_buckets()["Buckets"]]
    assert "inputs" not in [b["Name"] for b in s3["ws"].list_buckets()["Buckets"]]
    assert _keys(s3["pdfs"], "inputs") == ["docs/a.pdf", "docs/b.pdf"]

    stats = subprocess.run([sys.executable, "-m", "olmocr.pipeline", "s3://work/run1", "--stats",
                            "--workspace_profile", "ws"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert "Documents: 2 queued, 2 with results, 0 failed" in stats.stdout, stats.stderr[-2000:]

    missing = subprocess.run([sys.executable, "-m", "olmocr.pipeline", "s3://work/run1", "--stats",
                              "--workspace_profile", "nosuch"], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].endswith(
        "error: --workspace_profile nosuch: no such profile in the AWS config or credentials files "
        "(~/.aws/config, ~/.aws/credentials, or AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)")
