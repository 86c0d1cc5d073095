"""Exports from a workspace with no model and no server (olmocr/pipeline/export.py), and ``--markdown``.

Real runs: the pipeline against the stand-in writes the workspace (local, or S3 through moto in server
mode; upstream olmOCR 0.4.27 for the upstream-written one); the export runs as a user runs it,
``python -m olmocr.pipeline.export``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from olmocr.pipeline.pages.output import (
    PageResult,
    build_dolma_document,
    document_pages,
    export_paths,
    markdown_text,
)
from olmocr.pipeline.pages.prompts import PageResponse
from tests.pipeline_helpers import docs_by_source, run_pipeline
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import REPO_ROOT, clean_env
from tests.test_upstream_compat import upstream_python  # noqa: F401 - the fixture (upstream 0.4.27's venv)


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "olmocr.pipeline.export", *args], cwd=str(REPO_ROOT),
                          env=clean_env(), capture_output=True, text=True, timeout=120)


def _image(path: Path, label: str) -> Path:
    img = Image.new("RGB", (400, 300), "white")
    ImageDraw.Draw(img).text((20, 20), label, fill="black")
    img.save(path)
    return path


def _same_stem_inputs(folder: Path) -> list[Path]:
    folder.mkdir()
    return [write_text_pdf(folder / "edgar.pdf", 3), _image(folder / "edgar.png", "png"),
            _image(folder / "edgar.jpg", "jpeg")]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- pure: pages, separators, names


def _page(num: int, text: str | None, fallback: bool = False) -> PageResult:
    return PageResult("doc.pdf", num, PageResponse("en", True, 0, False, False, text), 10, 5, fallback)


def test_pages_read_back_exactly_and_separators() -> None:
    # A text-layer fallback may end with a newline of its own; a page may have no text at all.
    texts = ["| a | b |\n| 1 | 2 |", None, "layer text\n", "# Heading"]
    doc = build_dolma_document("doc.pdf", [_page(i + 1, t, fallback=i == 2) for i, t in enumerate(texts)])
    assert doc is not None
    assert [p.text for p in document_pages(doc)] == [t or "" for t in texts]
    assert [p.page for p in document_pages(doc)] == [1, 2, 3, 4]
    assert [p.record["produced_by"] for p in document_pages(doc)] == ["model", "blank", "fallback", "model"]
    # The Dolma text keeps upstream's joining, byte for byte; the markdown keeps the page breaks.
    assert doc["text"] == "| a | b |\n| 1 | 2 |\nlayer text\n\n# Heading"
    assert markdown_text(doc, "none") == doc["text"]
    assert markdown_text(doc) == ("| a | b |\n| 1 | 2 |\n\n<!-- page 2 -->\n\n\n\n<!-- page 3 -->\n\nlayer text\n"
                                  "\n\n<!-- page 4 -->\n\n# Heading")
    assert markdown_text(doc, "rule").split("\n\n---\n\n") == [t or "" for t in texts]


def test_names_never_shared() -> None:
    names = export_paths(["/in/edgar.pdf", "/in/edgar.png", "/in/edgar.jpg", "/in/a", "/in/a.pdf",
                          "../in/b.pdf", "/in/b.pdf", "s3://one/k/c.pdf", "s3://two/k/c.pdf"])
    assert len(set(names.values())) == len(names)
    assert names["/in/edgar.pdf"] == "markdown/in/edgar.md"
    assert names["/in/edgar.png"] == "markdown/in/edgar.png.md"
    assert names["/in/edgar.jpg"] == "markdown/in/edgar.jpg.md"
    tag = hashlib.sha1(b"/in/a").hexdigest()[:8]
    assert names["/in/a"] == f"markdown/in/a~{tag}.md"  # both of a pair get a hash, whatever the order
    assert names["/in/a.pdf"].startswith("markdown/in/a~")
    assert names["../in/b.pdf"].startswith("markdown/in/b~")
    assert names["/in/b.pdf"].startswith("markdown/in/b~")
    assert names == export_paths(reversed(list(names)))


# --------------------------------------------------------------------------- runs


def test_same_stem_markdown_run_and_export_agree(standin, tmp_path: Path) -> None:
    inputs = _same_stem_inputs(tmp_path / "in")
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url, inputs, "--markdown", log=tmp_path / "run.log")
    assert rc == 0, log
    docs = docs_by_source(ws)
    assert set(docs) == {str(p) for p in inputs}
    during_run = _files(ws / "markdown")
    folder = str(inputs[0].parent).lstrip("/")
    assert set(during_run) == {f"{folder}/edgar.md", f"{folder}/edgar.png.md", f"{folder}/edgar.jpg.md"}
    for path in inputs:
        md = during_run[f"{folder}/{path.name.removesuffix('.pdf')}.md" if path.suffix == ".pdf"
                        else f"{folder}/{path.name}.md"].decode()
        assert md == markdown_text(docs[str(path)])
    assert "<!-- page 2 -->" in during_run[f"{folder}/edgar.md"].decode()
    assert during_run[f"{folder}/edgar.png.md"] != during_run[f"{folder}/edgar.jpg.md"]

    shutil.rmtree(ws / "markdown")
    for _ in range(2):  # a second run rewrites the same files with the same bytes
        done = export(str(ws))
        assert done.returncode == 0, done.stderr
        assert "exported 3 documents (5 pages)" in done.stderr
        assert _files(ws / "markdown") == during_run
    text_tree = _files(ws / "text")
    assert {k: v.decode() for k, v in text_tree.items()} == {
        f"{folder}/{'edgar.txt' if p.suffix == '.pdf' else p.name + '.txt'}": docs[str(p)]["text"] for p in inputs}
    lines = [json.loads(line) for f in sorted((ws / "pages").glob("pages_*.jsonl")) for line in f.read_text().splitlines()]
    assert sorted((line["document"], line["page"]) for line in lines) == sorted(
        [(str(inputs[0]), n) for n in (1, 2, 3)] + [(str(inputs[1]), 1), (str(inputs[2]), 1)])
    for line in lines:
        doc = docs[line["document"]]
        start, end, _ = doc["attributes"]["pdf_page_numbers"][line["page"] - 1]
        assert doc["text"][start:end].rstrip("\n") == line["text"]
        assert line["record"]["page"] == line["page"] and line["record"]["produced_by"] == "model"
        assert line["id"] == doc["id"]

    rule = export(str(ws), "--out", str(tmp_path / "out"), "--formats", "markdown", "--page_separator", "rule")
    assert rule.returncode == 0, rule.stderr
    assert set(_files(tmp_path / "out")) == {f"markdown/{k}" for k in during_run}
    pdf_md = (tmp_path / "out" / "markdown" / folder / "edgar.md").read_text()
    assert pdf_md.count("\n\n---\n\n") == 2


def test_s3_workspace_exports_in_place_and_to_a_local_folder(s3_server, standin, tmp_path: Path) -> None:
    inputs = _same_stem_inputs(tmp_path / "in")
    ws = s3_server.url("ws")
    rc, log = run_pipeline(ws, standin.url, inputs, log=tmp_path / "run.log")
    assert rc == 0, log
    done = export(ws)
    assert done.returncode == 0, done.stderr
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix="ws/").get("Contents", [])}
    folder = str(inputs[0].parent).lstrip("/")
    assert {f"ws/markdown/{folder}/{n}" for n in ("edgar.md", "edgar.png.md", "edgar.jpg.md")} <= keys
    assert {f"ws/text/{folder}/{n}" for n in ("edgar.txt", "edgar.png.txt", "edgar.jpg.txt")} <= keys
    assert any(k.startswith("ws/pages/pages_") for k in keys)
    local = export(ws, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    in_s3 = {k[len("ws/"):]: client.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read()
             for k in keys if k.startswith(("ws/markdown/", "ws/text/", "ws/pages/"))}
    assert _files(tmp_path / "local") == in_s3


def test_bad_workspace_one_line_and_nothing_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = export(str(missing))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no such directory" in done.stderr, done.stderr
    assert not missing.exists()
    bad = export(str(tmp_path), "--formats", "markdown,html")
    assert bad.returncode == 2 and "html" in bad.stderr and "Traceback" not in bad.stderr


def test_empty_workspace_says_so(tmp_path: Path) -> None:
    done = export(str(tmp_path))
    assert done.returncode == 0 and "nothing to export" in done.stderr


def test_upstream_written_workspace(upstream_python: Path,  # noqa: F811
                                     standin, tmp_path: Path) -> None:
    from tests.test_upstream_compat import _finish, _start_upstream

    folder = tmp_path / "in"
    folder.mkdir()
    pdfs = [write_text_pdf(folder / f"up{i}.pdf", 2) for i in range(2)]
    ws = tmp_path / "ws"
    upstream = _start_upstream(upstream_python, ws, standin.url, "--pdfs", *map(str, pdfs), "--markdown",
                               log=tmp_path / "upstream.log")
    _finish(upstream, tmp_path / "upstream.log")
    docs = docs_by_source(ws)
    assert set(docs) == {str(p) for p in pdfs} and all("producer" not in d["metadata"] for d in docs.values())
    done = export(str(ws), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    for path in pdfs:
        doc = docs[str(path)]
        rel = str(path.parent).lstrip("/") + "/" + path.stem
        md = (tmp_path / "out" / "markdown" / f"{rel}.md").read_text()
        # Upstream's own markdown is its Dolma text; ours keeps the page break and nothing else differs.
        assert (ws / "markdown" / f"{rel}.md").read_text() == doc["text"]
        assert md.replace("\n\n<!-- page 2 -->\n\n", "\n") == doc["text"] and "<!-- page 2 -->" in md
        assert (tmp_path / "out" / "text" / f"{rel}.txt").read_text() == doc["text"]
    lines = [json.loads(line) for f in (tmp_path / "out" / "pages").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:  # upstream records no per-page record: what its attributes say, the rest unknown
        assert line["record"]["produced_by"] is None and line["record"]["primary_language"] == "en"
