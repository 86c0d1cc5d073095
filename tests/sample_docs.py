"""Sample documents the tests build for themselves (the repository never reads outside itself).

``fpdf2`` writes real PDFs with a text layer (standard fonts), several pages, images; ``pypdf`` sets
``/Rotate`` and encrypts. The set mirrors what the tests need from real-world documents: portrait pages
with a text layer, a page with ``/Rotate 90``, a scan (image only, no text layer), multi-page documents,
a PDF with a misleading file name, and every kind of bad input the pipeline must reject with a reason.

Under pytest the files are built once per session into a temporary directory (``tests/conftest.py``)
and removed at the end; elsewhere they are built on first use into a temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

#: Paragraphs the generated pages are made of (varied lengths, a table-like block, digits).
PARAGRAPHS = [
    "Edgar Allan Poe was an American writer, poet, editor and literary critic, best known for his poetry "
    "and short stories, particularly his tales of mystery and the macabre.",
    "Quarterly results. Revenue rose 12 percent to 4.2 billion dollars, driven by strong demand in the "
    "cloud segment; operating margin improved by 180 basis points year over year.",
    "The guidebook explains how to program the calculator: define a function, store it in a variable, "
    "and call it from the home screen with the arguments in parentheses.",
    "Region      Q1     Q2     Q3     Q4\nNorth      120    135    150    161\nSouth       98    101    117    "
    "123\nWest       143    152    149    170",
    "Language models trained on open data make it possible to study how the data shapes the model. We "
    "release the weights, the code and the training data under permissive licences.",
    "Dear Sir or Madam, thank you for your letter of the 4th. We have reviewed the claim and enclose the "
    "signed forms; please return the copy marked B at your earliest convenience.",
]


def _page_text(doc_name: str, page: int) -> str:
    body = "\n\n".join(PARAGRAPHS[(page + i) % len(PARAGRAPHS)] for i in range(3))
    return f"{doc_name}, page {page}\n\n{body}"


def write_text_pdf(path: Path, pages: int | Sequence[str], *, size: tuple[float, float] = (612, 792),
                   rotate: int = 0) -> Path:
    """A PDF with a real text layer: ``pages`` is a page count (generated text) or the text of each page.

    ``size`` is in points (portrait letter by default); ``rotate`` sets ``/Rotate`` on every page.
    """
    from fpdf import FPDF

    texts = [_page_text(path.stem, n) for n in range(1, pages + 1)] if isinstance(pages, int) else list(pages)
    pdf = FPDF(unit="pt", format=size)
    pdf.set_auto_page_break(False)
    pdf.set_margins(54, 54)
    for text in texts:
        pdf.add_page()
        pdf.set_font("Helvetica", size=11)
        pdf.multi_cell(0, 15, text)
    data = bytes(pdf.output())
    if rotate:
        data = _rotated(data, rotate)
    path.write_bytes(data)
    return path


def write_text_docs(folder: Path, count: int, pages: int, *, name: str = "doc{}.pdf") -> list[Path]:
    """``count`` text PDFs of ``pages`` pages each in ``folder`` (made if missing), named ``name`` with the
    document's number (``doc0.pdf``, ...); every page has its own words (:func:`write_text_pdf`)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_text_pdf(folder / name.format(i), pages) for i in range(count)]


def write_scanned_pdf(path: Path, pages: int = 1) -> Path:
    """A 'scan': each page is one image of text, with no text layer (the text fallback finds nothing)."""
    from fpdf import FPDF
    from PIL import Image, ImageDraw

    pdf = FPDF(unit="pt", format=(612, 792))
    for n in range(1, pages + 1):
        image = Image.new("L", (850, 1100), 245)
        draw = ImageDraw.Draw(image)
        for i, line in enumerate(textwrap.wrap(_page_text(path.stem, n).replace("\n", " "), 70)):
            draw.text((60, 60 + 22 * i), line, fill=20)
        pdf.add_page()
        pdf.image(image, x=0, y=0, w=612, h=792)
    path.write_bytes(bytes(pdf.output()))
    return path


#: Words the fidelity tests print on pages, each page its own (tests/test_fidelity.py): common English
#: words that Tesseract reads reliably, none in :data:`MARKER_FILLER`, none a part of another.
MARKER_WORDS = (
    "walrus lantern orchid cobalt meadow tractor harbor pepper violin glacier saddle mango crimson "
    "falcon pebble ladder copper basket thunder velvet canyon pickle marble rocket oyster tunnel "
    "blanket cactus donkey fossil garlic helmet island jacket kettle lemon magnet napkin parrot "
    "quartz rabbit salmon tomato umbrella vulture wizard yogurt zipper anchor bridge candle dragon "
    "engine feather goblet hammer igloo jungle koala lobster mirror noodle"
).split()
#: The sentence under a page's words, the same on every page: enough text for Tesseract's orientation
#: detection (a few words alone are too few characters to orient).
MARKER_FILLER = ("This sample page was generated for the fidelity tests of the pipeline. Each page "
                 "shows its own words above, and these same sentences below them, so that there is "
                 "enough text on every page for the orientation of the page to be found with some "
                 "confidence, whichever way it was turned when it was drawn or rendered.")


def marker_pages(count: int, start: int = 0) -> list[tuple[str, ...]]:
    """``count`` pages of four marker words each, from word ``4 * start`` on (distinct across calls that
    use distinct ``start`` ranges)."""
    words = MARKER_WORDS
    if 4 * (start + count) > len(words):
        raise ValueError(f"only {len(words) // 4} pages of marker words")
    return [tuple(words[4 * (start + i): 4 * (start + i + 1)]) for i in range(count)]


def _marker_text(words: Sequence[str]) -> str:
    return "  ".join(w.capitalize() for w in words) + "\n\n" + MARKER_FILLER


def write_marked_pdf(path: Path, pages: Sequence[Sequence[str]], *, rotate: int = 0,
                     drawn_rotated: dict[int, int] | None = None) -> Path:
    """Letter pages with a text layer, page n showing ``pages[n-1]``'s words large (22 pt), then the filler.

    ``rotate`` sets ``/Rotate`` on every page; ``drawn_rotated`` maps a 1-based page number to an angle
    (counter-clockwise degrees) by which that page's content is *drawn* turned, with no ``/Rotate``.
    """
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(612, 792))
    pdf.set_auto_page_break(False)
    pdf.set_margins(56, 56)
    for number, words in enumerate(pages, start=1):
        pdf.add_page()
        pdf.set_font("Helvetica", size=22)
        angle = (drawn_rotated or {}).get(number, 0)
        if angle:
            # A block 480 pt wide centred on the page, turned about the page's centre.
            with pdf.rotation(angle, x=306, y=396):
                pdf.set_xy(66, 300)
                pdf.multi_cell(480, 30, _marker_text(words))
        else:
            pdf.multi_cell(0, 30, _marker_text(words))
    data = bytes(pdf.output())
    if rotate:
        data = _rotated(data, rotate)
    path.write_bytes(data)
    return path


def write_marked_scan(path: Path, pages: Sequence[Sequence[str]]) -> Path:
    """A scan of marked pages: each page one greyscale image of its words and the filler, no text layer."""
    from fpdf import FPDF
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=34)
    pdf = FPDF(unit="pt", format=(612, 792))
    for words in pages:
        image = Image.new("L", (850, 1100), 238)  # 100 dpi, a slightly grey "paper"
        draw = ImageDraw.Draw(image)
        lines = textwrap.wrap("  ".join(w.capitalize() for w in words), 36) + [""] + textwrap.wrap(MARKER_FILLER, 40)
        for i, line in enumerate(lines):
            draw.text((70, 80 + 46 * i), line, fill=25, font=font)
        pdf.add_page()
        pdf.image(image, x=0, y=0, w=612, h=792)
    path.write_bytes(bytes(pdf.output()))
    return path


def _rotated(data: bytes, degrees: int) -> bytes:
    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(data))
    writer = pypdf.PdfWriter()
    for page in reader.pages:
        writer.add_page(page).rotate(degrees)
    return _written(writer)


def _written(writer) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def blank_pdf_bytes(width: float, height: float, pages: int = 1, password: str | None = None) -> bytes:
    """Blank pages of any size (zero pages allowed), optionally encrypted with a user password."""
    import pypdf

    writer = pypdf.PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width, height)
    if password:
        writer.encrypt(password, algorithm="RC4-128")
    return _written(writer)


def bad_inputs(good_pdf: Path) -> dict[str, tuple[bytes, str]]:
    """Broken inputs by file name: (content, the words the pipeline's reason must contain)."""
    data = good_pdf.read_bytes()
    return {
        "corrupt.pdf": (b"%PDF-1.4\n" + bytes(range(256)) * 64 + b"\n%%EOF\n", "corrupt PDF"),
        "truncated.pdf": (data[: len(data) // 2], "truncated PDF"),
        "locked.pdf": (blank_pdf_bytes(612, 792, password="secret"), "password-protected"),
        "empty-pages.pdf": (blank_pdf_bytes(612, 792, pages=0), "zero pages"),
        "notes.pdf": (b"just some text, not a PDF at all\n" * 10, "not a PDF, PNG, JPEG or TIFF"),
        "huge.pdf": (blank_pdf_bytes(30000, 30000), "enormous page"),
    }


class Samples:
    """The sample set, built into ``root`` (see the module docstring for what each one is for)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.letter = root / "letter.pdf"  # 1 page, text layer mentions "Edgar", portrait
        self.letter_rotated = root / "letter-rotated90.pdf"  # the same page with /Rotate 90
        self.report = root / "report.pdf"  # 1 page
        self.guide = root / "guide.pdf"  # 3 pages
        self.scan = root / "scan.pdf"  # 2 pages, images only
        self.earnings = root / "earnings.pdf"  # 1 page, landscape-free table text
        self.manual = root / "manual.pdf"  # 6 pages
        self.paper = root / "paper.pdf"  # 5 pages
        self.minutes = root / "minutes.pdf"  # 4 pages
        self.ambiguous = root / "ambiguous.pdf"  # a PDF the tests copy under a non-PDF name

    @property
    def small(self) -> list[Path]:
        """Five documents, 1-3 pages each (8 pages): quick end-to-end runs."""
        return [self.letter, self.report, self.guide, self.scan, self.earnings]

    @property
    def resilience(self) -> list[Path]:
        """Eight documents, 23 pages: long enough to crash or hang the server in the middle of a run."""
        return [*self.small, self.manual, self.paper, self.minutes]

    def build(self) -> Samples:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_pdf(self.letter, [_page_text("Edgar", 1)])
        write_text_pdf(self.letter_rotated, [_page_text("Edgar", 1)], rotate=90)
        write_text_pdf(self.report, 1)
        write_text_pdf(self.guide, 3)
        write_scanned_pdf(self.scan, 2)
        write_text_pdf(self.earnings, [PARAGRAPHS[1] + "\n\n" + PARAGRAPHS[3]])
        write_text_pdf(self.manual, 6)
        write_text_pdf(self.paper, 5, size=(595, 842))  # A4
        write_text_pdf(self.minutes, 4)
        write_text_pdf(self.ambiguous, 1)
        return self


_samples: Samples | None = None


def use(root: Path) -> Samples:
    """Build the sample set into ``root`` and make it the one :func:`samples` returns."""
    global _samples
    _samples = Samples(root).build()
    return _samples


def samples() -> Samples:
    """The session's sample set (built on first use outside pytest, removed at exit)."""
    if _samples is None:
        root = Path(tempfile.mkdtemp(prefix="olmocr-sample-docs-"))
        atexit.register(shutil.rmtree, root, True)
        use(root)
    assert _samples is not None
    return _samples
