"""The page images the renderer sends are exactly the pixels pdfium rendered (its own PNG writer is lossless,
rotations included), and they decode as ordinary 8-bit RGB PNGs. The pages are coloured (red, green and
blue squares on white): on a grey page, red and blue swapped (pdfium's BGR sent as RGB) look the same."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from PIL import Image

from olmocr.pipeline.pages import render
from olmocr.pipeline.pages.render import _job_render, png_rgb
from tests.pipeline_helpers import SMALL_DOCS

DIM = 400
#: The squares of :func:`colour_pdf`: (left, top) in points on a 400 x 400 pt page, 100 pt a side, and colour.
SQUARES = (((40, 40), (255, 0, 0)), ((150, 150), (0, 255, 0)), ((260, 260), (0, 0, 255)))


@pytest.fixture(scope="module")
def colour_pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 400 x 400 pt page (so 1 pt = 1 px at ``DIM``): pure red, green and blue squares on white."""
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(400, 400))
    pdf.add_page()
    for (x, y), rgb in SQUARES:
        pdf.set_fill_color(*rgb)
        pdf.rect(x, y, 100, 100, style="F")
    path = tmp_path_factory.mktemp("colour") / "colour.pdf"
    path.write_bytes(bytes(pdf.output()))
    return path


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


def _render(path: str, rotation: int) -> Image.Image:
    try:
        return _decode(_job_render(path, "pdf", 1, DIM, rotation))
    finally:
        while render._docs:
            render._docs.popitem()[1].close()


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_rendered_page_has_exactly_pdfiums_pixels(rotation: int, colour_pdf: Path) -> None:
    for path in (str(SMALL_DOCS[0]), str(colour_pdf)):  # text in grey, and colours
        got = _render(path, rotation)
        want = _pdfium_pixels(path, 1)
        if rotation:
            want = want.transpose(getattr(Image.Transpose, f"ROTATE_{rotation}"))
        assert got.size == want.size
        assert got.tobytes() == want.tobytes(), path


@pytest.mark.parametrize("rotation", [0, 180])  # the fast path (pdfium's buffer as it is), and PIL's
def test_colours_come_out_as_drawn(rotation: int, colour_pdf: Path) -> None:
    """Each square's centre has its own colour (pdfium's own pixels, above, share its byte order)."""
    img = _render(str(colour_pdf), rotation)
    assert img.size == (DIM, DIM)
    for (x, y), rgb in SQUARES:
        centre = (x + 50, y + 50) if rotation == 0 else (DIM - 1 - (x + 50), DIM - 1 - (y + 50))
        assert img.getpixel(centre) == rgb, (rotation, centre, rgb, img.getpixel(centre))
    assert img.getpixel((5, 5)) == (255, 255, 255)


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
