"""Input expansion: local paths, globs, ``**``, .txt lists, s3 globs, content sniffing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from olmocr.pipeline.workspace.inputs import count_pages, expand_inputs, read_input, sniff_kind
from tests.s3_helpers import S3Server
from tests.sample_docs import samples

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 32


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    shutil.copy(samples().letter, tmp_path / "docs" / "edgar.pdf")
    shutil.copy(samples().report, tmp_path / "docs" / "sub" / "olmo.pdf")
    shutil.copy(samples().ambiguous, tmp_path / "docs" / "renamed.dat")  # a PDF by content
    (tmp_path / "docs" / "fake.pdf").write_text("<html>not a pdf</html>")  # not a PDF by content
    (tmp_path / "docs" / "scan.png").write_bytes(PNG)
    (tmp_path / "docs" / "photo.jpg").write_bytes(JPEG)
    return tmp_path


def rel(paths: list[str]) -> list[str]:
    """Local paths relative to the current directory (they are stored absolute), s3:// kept."""
    return [p if p.startswith("s3://") else os.path.relpath(p) for p in paths]


def test_sniff_kind() -> None:
    assert sniff_kind(b"%PDF-1.7\n") == "pdf"
    assert sniff_kind(b"\r\n" * 100 + b"%PDF-1.4") == "pdf"  # junk before the header
    assert sniff_kind(b" " * 1100 + b"%PDF-1.4") is None
    assert sniff_kind(PNG) == "png" and sniff_kind(JPEG) == "jpeg"
    assert sniff_kind(b"") is None and sniff_kind(b"hello") is None


def test_plain_paths_and_missing(tree: Path) -> None:
    docs, problems = expand_inputs(["docs/edgar.pdf", "./docs/edgar.pdf", "docs/missing.pdf"])
    assert docs == [str(tree / "docs" / "edgar.pdf")]  # stored absolute: a retry run works from anywhere
    assert [p.reason for p in problems] == ["no such file: docs/missing.pdf"]
    assert problems[0].path is None


def test_globs_recursive_and_content_sniffing(tree: Path) -> None:
    docs, problems = expand_inputs(["docs/*"])
    assert rel(docs) == sorted(
        ["docs/edgar.pdf", "docs/fake.pdf", "docs/photo.jpg", "docs/renamed.dat", "docs/scan.png"]
    )
    (bad,) = problems
    assert rel([bad.path or ""]) == ["docs/fake.pdf"] and "not a PDF or image" in bad.reason
    docs, problems = expand_inputs(["docs/**/*.pdf"])
    assert rel(docs) == ["docs/edgar.pdf", "docs/fake.pdf", "docs/sub/olmo.pdf"]
    docs, problems = expand_inputs(["nowhere/*.pdf"])
    assert docs == [] and [p.reason for p in problems] == ["glob matched no files: nowhere/*.pdf"]


def test_directory_is_explained(tree: Path) -> None:
    docs, problems = expand_inputs(["docs"])
    assert docs == [] and "is a directory" in problems[0].reason
    assert "'docs/**/*'" in problems[0].reason  # PDFs and images: a pattern that matches them all


def test_folder_of_images_gets_a_pattern_that_matches_them(tree: Path) -> None:
    (tree / "images" / "more").mkdir(parents=True)
    for i in range(3):
        (tree / "images" / f"scan{i}.png").write_bytes(PNG)
    (tree / "images" / "more" / "scan9.png").write_bytes(PNG)
    (tree / "images" / "README").write_text("scans of the archive")
    _, problems = expand_inputs(["images/"])
    (problem,) = problems
    assert "'images/**/*.png'" in problem.reason, problem.reason
    suggested = problem.reason.split("'")[1]
    docs, problems = expand_inputs([suggested])
    assert len(docs) == 4 and problems == []  # the suggestion works as given


def test_relative_paths_are_stored_absolute(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs, _ = expand_inputs(["docs/edgar.pdf", "docs/sub/*.pdf"])
    monkeypatch.chdir("/")
    assert all(os.path.isabs(d) and os.path.exists(d) for d in docs)


def test_txt_list(tree: Path) -> None:
    (tree / "list.txt").write_text("# my documents\ndocs/edgar.pdf\n\ndocs/sub/*.pdf\ndocs/gone.pdf\n")
    docs, problems = expand_inputs(["list.txt", "docs/scan.png"])
    assert rel(docs) == ["docs/edgar.pdf", "docs/scan.png", "docs/sub/olmo.pdf"]
    assert [p.reason for p in problems] == ["no such file: docs/gone.pdf"]


def test_count_pages(tree: Path) -> None:
    assert count_pages("docs/edgar.pdf") >= 1
    assert count_pages("docs/scan.png") == 1
    assert count_pages("docs/fake.pdf") == 1
    assert count_pages("docs/does-not-exist.pdf") == 1


def test_s3_globs_and_lists(s3_server: S3Server, tree: Path) -> None:
    client = s3_server.client()
    bucket = s3_server.bucket
    pdf = (tree / "docs" / "edgar.pdf").read_bytes()
    for key, body in {
        "in/a.pdf": pdf,
        "in/nested/b.pdf": pdf,
        "in/renamed.bin": pdf,
        "in/notes.pdf": b"plain text",
        "other/c.pdf": pdf,
    }.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    base = f"s3://{bucket}"
    docs, problems = expand_inputs([f"{base}/in/*.pdf"])
    assert docs == [
        f"{base}/in/a.pdf",
        f"{base}/in/nested/b.pdf",
        f"{base}/in/notes.pdf",
    ]  # upstream: * crosses /
    assert problems == []  # queueing reads no S3 document: notes.pdf fails when a worker opens it
    docs, problems = expand_inputs([f"{base}/**/*.pdf"])
    assert f"{base}/other/c.pdf" in docs and len(docs) == 4
    docs, problems = expand_inputs([f"{base}/in/renamed.bin", f"{base}/in/missing.pdf", f"{base}/none/*.pdf"])
    assert docs == [f"{base}/in/renamed.bin"]
    assert [p.reason for p in problems] == [
        f"no such S3 object: {base}/in/missing.pdf",
        f"S3 glob matched no objects: {base}/none/*.pdf",
    ]
    client.put_object(Bucket=bucket, Key="lists/l.txt", Body=f"{base}/other/c.pdf\ndocs/edgar.pdf\n".encode())
    docs, problems = expand_inputs([f"{base}/lists/l.txt"])
    assert rel(docs) == ["docs/edgar.pdf", f"{base}/other/c.pdf"] and problems == []
    assert read_input(f"{base}/other/c.pdf") == pdf
    assert count_pages(f"{base}/other/c.pdf") == count_pages("docs/edgar.pdf")
    with pytest.raises(FileNotFoundError):
        read_input(f"{base}/nope.pdf")
