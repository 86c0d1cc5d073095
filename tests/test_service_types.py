"""Every type the pipeline accepts, through olmocr-service: PNG, JPEG and a multi-frame TIFF each converted
with its true page count; a TIFF over OLMOCR_SERVICE_MAX_PAGES refused; the type judged by content, not the
name; unknown content refused with every accepted type named; each page's image one a browser shows (a TIFF
frame as PNG). The list of types is the pipeline's own (``inputs.KINDS``, what ``sniff_kind`` returns)."""

from __future__ import annotations

import io
from pathlib import Path

import jsonschema
from PIL import Image, ImageDraw

from olmocr.pipeline.workspace.inputs import KINDS, sniff_kind
from olmocr.service.intake import MEDIA, accepted_names
from tests.pipeline_helpers import SAMPLES, StandIn
from tests.test_service import running_service
from tests.test_service_limits import refused


def image_bytes(fmt: str, frames: int = 1, size: tuple[int, int] = (600, 800)) -> bytes:
    """An image file of ``fmt`` (Pillow's name) with ``frames`` pages, each with its number drawn on it."""
    pages = []
    for n in range(frames):
        page = Image.new("RGB", size, "white")
        ImageDraw.Draw(page).text((40, 40 + 20 * n), f"Page {n + 1} of {frames}", fill="black")
        pages.append(page)
    out = io.BytesIO()
    pages[0].save(out, format=fmt, save_all=frames > 1, append_images=pages[1:])
    return out.getvalue()


def test_the_pipeline_kinds_are_the_service_kinds() -> None:
    """One list: each kind the service names is one ``sniff_kind`` returns for such a file, and back."""
    samples = {"pdf": SAMPLES.letter.read_bytes(), "png": image_bytes("PNG"), "jpeg": image_bytes("JPEG"),
               "tiff": image_bytes("TIFF", 2)}
    assert {sniff_kind(data) for data in samples.values()} == set(KINDS) == set(MEDIA)
    assert accepted_names() == "PDF, PNG, JPEG or TIFF"


def test_png_jpeg_and_multi_frame_tiff_are_converted_with_their_page_counts(standin: StandIn, tmp_path: Path
                                                                           ) -> None:
    env = {"OLMOCR_SERVICE_MAX_PAGES": "3"}
    with running_service(tmp_path / "ws", standin, tmp_path / "service.log", env=env) as svc:
        files = [("file", ("photo.png", image_bytes("PNG"), "image/png")),
                 ("file", ("photo.jpg", image_bytes("JPEG"), "image/jpeg")),
                 ("file", ("scan.tif", image_bytes("TIFF", 3), "image/tiff")),
                 # The name and Content-Type say PDF; the content is a PNG: it is a PNG.
                 ("file", ("disguised.pdf", image_bytes("PNG"), "application/pdf"))]
        r = svc.post("/v1/jobs", files=files)
        assert r.status_code == 202, r.text
        job = r.json()
        assert [(d["kind"], d["pages"]) for d in job["documents"]] == [("png", 1), ("jpeg", 1), ("tiff", 3),
                                                                      ("png", 1)]
        assert job["pages_total"] == 6
        openapi = svc.get("/openapi.json").json()  # the route's own schema accepts every kind
        jsonschema.validate(job, {"$ref": "#/components/schemas/Job", "components": openapi["components"]})
        done = svc.wait_state(job["id"])
        assert [d["outcome"] for d in done["documents"]] == ["done"] * 4
        assert done["pages_done"] == 6
        pages = svc.get(f"/v1/jobs/{job['id']}/result?format=pages").json()["documents"]
        assert [[p["page"] for p in d["pages"]] for d in pages] == [[1], [1], [1, 2, 3], [1]]

        # Each page's image is one a browser shows: PNG and JPEG as uploaded, each TIFF frame as a PNG.
        for doc, page, ctype in ((0, 1, "image/png"), (1, 1, "image/jpeg"), (2, 1, "image/png"),
                                 (2, 3, "image/png"), (3, 1, "image/png")):
            image = svc.get(f"/v1/jobs/{job['id']}/documents/{doc}/pages/{page}/image")
            assert image.status_code == 200 and image.headers["Content-Type"] == ctype, (doc, page, image.headers)
            decoded = Image.open(io.BytesIO(image.content))
            assert decoded.format == ctype.split("/")[1].upper() and max(decoded.size) <= 1000
        frame = Image.open(io.BytesIO(svc.get(f"/v1/jobs/{job['id']}/documents/2/pages/2/image").content))
        expected = Image.open(io.BytesIO(image_bytes("TIFF", 3)))
        expected.seek(1)  # the second frame, not the first
        assert frame.convert("RGB").tobytes() == expected.convert("RGB").tobytes()
        refused(svc.get(f"/v1/jobs/{job['id']}/documents/2/pages/4/image"), 404, "not_found", "3 frames")

        # A TIFF over the page limit, and content of no accepted type: each its own answer.
        four = svc.post("/v1/jobs", files=[("file", ("long.tiff", image_bytes("TIFF", 4), "image/tiff"))])
        refused(four, 422, "too_many_pages", "long.tiff has 4 pages, more than the limit of 3")
        gif = svc.post("/v1/jobs", files=[("file", ("anim.png", image_bytes("GIF"), "image/png"))])
        message = refused(gif, 415, "unsupported_type", "anim.png is not a ")["message"]
        assert all(kind.upper() in message for kind in KINDS), message
        broken = svc.post("/v1/jobs", files=[("file", ("bad.tif", b"II*\x00" + b"\x00" * 64, "image/tiff"))])
        refused(broken, 422, "bad_image", "bad.tif cannot be opened as a TIFF")
