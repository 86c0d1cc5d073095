"""The page images the renderer sends are exactly the pixels pdfium rendered (its own PNG writer is lossless,
rotations included), and they decode as ordinary 8-bit RGB PNGs."""

from __future__ import annotations

import base64
import io

import pypdfium2 as pdfium
import pytest
from PIL import Image

from olmocr.pipeline.pages import render
from olmocr.pipeline.pages.render import _job_render, png_rgb
from tests.pipeline_helpers import SMALL_DOCS

DIM = 400


def _decode(b64: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG" and img.mode == "RGB"
    img.load()
    return img


def _pdfium_pixels(path: str, page_num: int) -> Image.Image:
    doc = pdfium.PdfDocument(path)
    try:
        page = doc[page_num - 1]
        width, height = page.get_size()
        bitmap = page.render(scale=DIM / max(width, height))
        img = bitmap.to_pil().convert("RGB")
        bitmap.close()
        page.close()
        return img
    finally:
        doc.close()


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_rendered_page_has_exactly_pdfiums_pixels(rotation: int) -> None:
    path = str(SMALL_DOCS[0])
    try:
        got = _decode(_job_render(path, "pdf", 1, DIM, rotation))
    finally:
        while render._docs:
            render._docs.popitem()[1].close()
    want = _pdfium_pixels(path, 1)
    if rotation:
        want = want.transpose(getattr(Image.Transpose, f"ROTATE_{rotation}"))
    assert got.size == want.size
    assert got.tobytes() == want.tobytes()


def test_png_writer_round_trips_any_rgb_image() -> None:
    img = Image.effect_noise((37, 23), 80).convert("RGB")  # noise: nothing for deflate to find
    back = Image.open(io.BytesIO(png_rgb(37, 23, img.tobytes())))
    back.load()
    assert (back.mode, back.size, back.tobytes()) == ("RGB", (37, 23), img.tobytes())
    with pytest.raises(ValueError):
        png_rgb(37, 22, img.tobytes())


def test_png_writer_skips_the_padding_of_padded_rows() -> None:
    img = Image.effect_noise((37, 23), 80).convert("RGB")
    data = img.tobytes()
    padded = b"".join(data[i : i + 111] + b"\xff" for i in range(0, len(data), 111))  # 112-byte rows, as pdfium's
    back = Image.open(io.BytesIO(png_rgb(37, 23, padded, stride=112)))
    back.load()
    assert back.tobytes() == data
    with pytest.raises(ValueError):
        png_rgb(37, 24, padded, stride=112)
