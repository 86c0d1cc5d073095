"""Small PDFs written byte by byte for the reliability tests (no files from outside the repository).

* :func:`text_pdf` -- pages of Helvetica text (a real text layer, so fallbacks have something to read);
* :func:`slow_pdf` -- one page that pdfium takes minutes to load: Form XObjects nested ``depth`` levels
  deep, each drawing the one below ``fanout`` times, so a 3 KB file makes pdfium parse ``fanout**depth``
  rectangles (measured with pypdfium2 4.x: depth 6 ~2 s, depth 7 ~15 s, depth 8 minutes).
"""

from __future__ import annotations


def _assemble(objects: dict[int, bytes]) -> bytes:
    out = bytearray(b"%PDF-1.4\n")
    offsets: dict[int, int] = {}
    for num in sorted(objects):
        offsets[num] = len(out)
        out += b"%d 0 obj\n" % num + objects[num] + b"\nendobj\n"
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for num in range(1, size):
        out += b"%010d 00000 n \n" % offsets[num]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


def _stream(dictionary: bytes, data: bytes) -> bytes:
    return b"<< %s /Length %d >>\nstream\n%s\nendstream" % (dictionary, len(data), data)


def text_pdf(pages: list[str]) -> bytes:
    """A PDF with one page per string (ASCII), each drawn in Helvetica 24 pt."""
    objects: dict[int, bytes] = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
                                 3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    kids = []
    for i, text in enumerate(pages):
        page, content = 4 + 2 * i, 5 + 2 * i
        kids.append(b"%d 0 R" % page)
        safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("ascii", "replace")
        objects[page] = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                         b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % content)
        objects[content] = _stream(b"", b"BT /F1 24 Tf 72 700 Td (%s) Tj ET" % safe)
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(pages))
    return _assemble(objects)


def slow_pdf(depth: int = 8, fanout: int = 10) -> bytes:
    """One page whose content is ``fanout**depth`` rectangles through nested forms (see module docstring)."""
    first_form = 5
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /XObject << /F %d 0 R >> >> "
            b"/Contents 4 0 R >>" % (first_form + depth - 1)),
        4: _stream(b"", b"/F Do"),
    }
    for level in range(depth):
        num = first_form + level
        if level == 0:
            objects[num] = _stream(b"/Type /XObject /Subtype /Form /BBox [0 0 612 792]", b"0 0 1 1 re f")
        else:
            draws = b" ".join(b"q 1 0 0 1 %d %d cm /F Do Q" % (i % 7, i % 5) for i in range(fanout))
            objects[num] = _stream(b"/Type /XObject /Subtype /Form /BBox [0 0 612 792] "
                                   b"/Resources << /XObject << /F %d 0 R >> >>" % (num - 1), draws)
    return _assemble(objects)
