"""TIFF inputs: sniffed by content, one page per frame through Pillow, a broken frame costs only its page."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from olmocr.pipeline.errors import RenderError
from olmocr.pipeline.pages.output import document_pages
from olmocr.pipeline.pages.render import Renderer, _job_render
from olmocr.pipeline.workspace.inputs import count_pages, expand_inputs, sniff_kind
from tests.pipeline_helpers import docs_by_source, failures, run_pipeline

SHADES = ((255, 255, 255), (200, 230, 255), (255, 220, 200))


def _frames(count: int) -> list[Image.Image]:
    frames = []
    for i in range(count):
        img = Image.new("RGB", (300 + 40 * i, 200), SHADES[i % len(SHADES)])
        ImageDraw.Draw(img).text((10, 10), f"frame {i + 1}", fill="black")
        frames.append(img)
    return frames


def write_tiff(path: Path, count: int, broken: int | None = None) -> Path:
    """A TIFF of ``count`` frames (deflate); frame ``broken`` (1-based) has its compressed data spoiled."""
    buf = io.BytesIO()
    frames = _frames(count)
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    data = bytearray(buf.getvalue())
    if broken is not None:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.seek(broken - 1)
            offset, length = img.tag_v2[273][0], img.tag_v2[279][0]
        data[offset:offset + length] = b"\xab" * length
    path.write_bytes(bytes(data))
    return path


def _png(path: Path, page: int) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(_job_render(str(path), "tiff", page, 600, 0))))


def test_sniffed_by_content_not_name(tmp_path: Path) -> None:
    little = write_tiff(tmp_path / "scan.dat", 2)
    big = tmp_path / "scan-be.bin"
    Image.new("I;16B", (300, 200), 40000).save(big, format="TIFF")  # 16-bit big-endian: Pillow writes "MM"
    assert big.read_bytes()[:4] == b"MM\x00*"
    assert sniff_kind(little.read_bytes()) == sniff_kind(big.read_bytes()) == "tiff"
    assert sniff_kind(b"II*\x00" + b"\x00" * 8) == "tiff" and sniff_kind(b"II+\x00\x08\x00") == "tiff"  # BigTIFF
    assert sniff_kind(b"IIxx") is None
    paths, problems = expand_inputs([str(little), str(big)])
    assert paths == sorted([str(little), str(big)]) and problems == []
    assert count_pages(str(little)) == 2 and count_pages(str(big)) == 1
    assert _job_render(str(big), "tiff", 1, 600, 0)


def test_frames_render_as_their_own_pages(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "multi.tif", 3)
    pngs = [_png(path, n) for n in (1, 2, 3)]
    # Scaled to the longest side, each frame its own size and colour.
    assert [p.size for p in pngs] == [(600, 400), (600, 353), (600, 316)]
    assert [p.convert("RGB").getpixel((599, 0)) for p in pngs] == list(SHADES)
    with pytest.raises(RenderError, match="no page 4"):
        _png(path, 4)


def test_broken_frame_fails_only_its_page(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "broken.tif", 3, broken=2)
    renderer = Renderer(processes=1, timeout=30)
    try:
        info = asyncio.run(renderer.probe(str(path), "tiff"))
        assert info.page_count == 3
        assert asyncio.run(renderer.render(str(path), "tiff", 1, 600))
        with pytest.raises(RenderError, match="cannot decode TIFF frame 2"):
            asyncio.run(renderer.render(str(path), "tiff", 2, 600))
        assert asyncio.run(renderer.render(str(path), "tiff", 3, 600))
        assert asyncio.run(renderer.text(str(path), "tiff", 2)) == ""
    finally:
        renderer.close()


def _sha16(path: Path, page: int) -> str:
    return hashlib.sha1(base64.b64decode(_job_render(str(path), "tiff", page, 1288, 0))).hexdigest()[:16]


def test_pipeline_single_multi_and_broken(standin, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    single = write_tiff(folder / "single.tif", 1)
    multi = write_tiff(folder / "multi.tiff", 3)
    broken = write_tiff(folder / "broken.tif", 3, broken=2)
    chain = folder / "chain.tif"  # a frame chain pointing past the end: the document fails, with its reason
    data = bytearray(write_tiff(chain, 2).read_bytes())
    data[4:8] = (len(data) + 1000).to_bytes(4, "little")
    chain.write_bytes(bytes(data))
    shutil.copy(multi, folder / "multi-copy.dat")  # by content, whatever the name
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url, [folder / "*"], "--max_page_error_rate", "0.5", "--markdown",
                           log=tmp_path / "run.log")
    assert rc == 0, log
    docs = docs_by_source(ws)
    assert set(docs) == {str(single), str(multi), str(broken), str(folder / "multi-copy.dat")}
    for path, frames in ((single, 1), (multi, 3), (broken, 3)):
        doc = docs[str(path)]
        assert doc["metadata"]["pdf-total-pages"] == frames
        pages = document_pages(doc)
        assert [p.page for p in pages] == list(range(1, frames + 1))
        for page in pages:
            if path == broken and page.page == 2:
                assert page.text == "" and page.record["produced_by"] == "fallback"
                assert page.record["fallback_kind"] == "render"
                assert "cannot decode TIFF frame 2" in page.record["fallback_reason"]
            else:  # each page holds the stand-in's reading of its own frame
                assert page.text.startswith(f"Stand-in OCR of image {_sha16(path, page.page)}")
                assert page.record["produced_by"] == "model"
    assert docs[str(broken)]["metadata"]["total-fallback-pages"] == 1
    assert (ws / "markdown" / str(folder).lstrip("/") / "multi.tiff.md").read_text().count("<!-- page ") == 2
    [failed] = failures(ws)
    assert failed["source"] == str(chain) and "corrupt or unreadable TIFF" in failed["reason"]
    assert failed["retryable"] is False
