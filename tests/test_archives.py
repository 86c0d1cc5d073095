"""Tarball inputs (issue 29): a ``.tar``, ``.tar.gz`` or ``.tgz`` is one work item; its PDFs and images are
documents named ``ARCHIVE::MEMBER`` (as upstream olmOCR 0.4.27); a corrupt member or a truncated archive
is a failed document with its reason while the good members still come through. Local and S3 (moto)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from olmocr.pipeline.workspace.queue import load_index
from olmocr.pipeline.workspace.storage import open_storage
from tests.pdf_builders import text_pdf
from tests.pipeline_helpers import Standins, docs_by_source, failures, run_pipeline
from tests.s3_helpers import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _png() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (200, 80), "white")
    ImageDraw.Draw(image).text((10, 30), "a scanned page", fill="black")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _tar(members: dict[str, bytes], mode: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


MEMBERS = {
    "letters/one.pdf": text_pdf(["the first letter", "its second page"]),
    "letters/two.pdf": text_pdf(["the second letter"]),
    "scans/page.png": _png(),
    "README.txt": b"scans of the archive",  # not a document: skipped
    "letters/broken.pdf": b"%PDF-1.4\nthis is not a PDF body at all\n",  # a corrupt member
}


def test_local_tarballs_gzip_and_plain(tmp_path: Path, standins: Standins) -> None:
    gz = tmp_path / "batch.tar.gz"
    gz.write_bytes(_tar(MEMBERS, "w:gz"))
    plain = tmp_path / "more.tar"
    plain.write_bytes(_tar({"a.pdf": text_pdf(["plain tar member"])}, "w"))
    whole = _tar({"first.pdf": text_pdf(["before the cut"]), "big.pdf": text_pdf([f"page {i} " * 80 for i in range(40)]),
                  "after.pdf": text_pdf(["after the cut"])}, "w:gz")
    truncated = tmp_path / "cut.tgz"
    truncated.write_bytes(whole[: int(len(whole) * 0.6)])
    ws = tmp_path / "ws"
    standin = standins()
    rc, log = run_pipeline(ws, standin.url, [gz, plain, truncated], timeout=180, log=tmp_path / "run.log")
    assert rc == 0, log
    index = load_index(open_storage(str(ws)))
    assert sorted(index.values()) == sorted([(str(gz),), (str(plain),), (str(truncated),)])  # an item each
    docs = docs_by_source(ws)
    assert set(docs) == {f"{gz}::letters/one.pdf", f"{gz}::letters/two.pdf", f"{gz}::scans/page.png",
                         f"{plain}::a.pdf", f"{truncated}::first.pdf"}, sorted(docs)
    assert docs[f"{gz}::letters/one.pdf"]["metadata"]["pdf-total-pages"] == 2
    failed = {f["source"]: f for f in failures(ws)}
    assert set(failed) == {f"{gz}::letters/broken.pdf", str(truncated)}, failed
    assert failed[str(truncated)]["retryable"] is False
    assert "truncated archive" in failed[str(truncated)]["reason"] and "1 document read before it" in \
        failed[str(truncated)]["reason"]


def test_a_tarball_on_s3(tmp_path: Path, s3_server: S3Server, standins: Standins) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="in/batch.tgz", Body=_tar(MEMBERS, "w:gz"))
    listing = tmp_path / "inputs.txt"
    url = f"s3://{s3_server.bucket}/in/batch.tgz"
    listing.write_text(url + "\n")  # a list file naming the archive
    standin = standins()
    rc, log = run_pipeline(s3_server.url("ws"), standin.url, [listing], timeout=180, log=tmp_path / "run.log")
    assert rc == 0, log
    storage = open_storage(s3_server.url("ws"))
    assert list(load_index(storage).values()) == [(url,)]
    sources = sorted(json.loads(line)["metadata"]["Source-File"]
                     for key in storage.list("results/") for line in (storage.read(key) or b"").decode().splitlines())
    assert sources == [f"{url}::letters/one.pdf", f"{url}::letters/two.pdf", f"{url}::scans/page.png"]
