"""Every type the pipeline accepts, through olmocr-service: PNG, JPEG and a multi-frame TIFF each converted
with its true page count; a TIFF over OLMOCR_SERVICE_MAX_PAGES refused; the type judged by content, not the
name; unknown content refused with every accepted type named; each page's image one a browser shows (a TIFF
frame as PNG). The list of types is the pipeline's own (``inputs.KINDS``, what ``sniff_kind`` returns).
A damaged PNG or JPEG, and an image of absurd size, is refused at submit, before anything is written."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import jsonschema
import pytest
from PIL import Image, ImageDraw

from olmocr.pipeline.workspace.inputs import KINDS, sniff_kind
from olmocr.pipeline.workspace.queue import PRIORITY_INDEX_KEY, decode_index
from olmocr.pipeline.workspace.storage import LocalStorage
from olmocr.service.intake import MEDIA, Limits, ServiceError, accepted_names, inspect
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


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_of_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one row of data (a decompression bomb's
    shape: a few bytes that would be gigabytes decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def damaged_images() -> dict[str, tuple[bytes, str]]:
    """Each damaged PNG or JPEG, by name, with what its refusal says; each still sniffs as its kind."""
    png, jpeg = image_bytes("PNG"), image_bytes("JPEG")
    idat = png.index(b"IDAT") + 4 + 40
    corrupt = png[:idat] + bytes(b ^ 0xFF for b in png[idat:idat + 16]) + png[idat + 16:]  # its CRC left stale
    images = {"cut.png": (png[:len(png) // 2], "cut.png cannot be opened as a PNG"),
              "cut.jpg": (jpeg[:len(jpeg) // 2], "cut.jpg cannot be opened as a JPEG"),
              "idat.png": (corrupt, "idat.png cannot be opened as a PNG"),
              "garbage.jpg": (jpeg[:400] + bytes(range(256)) * 40, "garbage.jpg cannot be opened as a JPEG")}
    for name, (data, _) in images.items():
        assert sniff_kind(data) == ("png" if name.endswith(".png") else "jpeg"), name
    return images


def test_damaged_png_and_jpeg_are_refused_at_submit_and_nothing_is_written(standin: StandIn, tmp_path: Path
                                                                            ) -> None:
    """Uploaded, named by a path, or sent to /v1/convert: a truncated PNG or JPEG, a PNG with a corrupt IDAT,
    garbage after a JPEG's header, each 422 ``bad_image`` naming the file; an image of 20000x20000 pixels 422
    ``image_too_large``. No upload, record or work item is written; a good job after them is converted."""
    ws, root = tmp_path / "ws", tmp_path / "root"
    root.mkdir()
    damaged = damaged_images()
    (root / "named-cut.jpg").write_bytes(damaged["cut.jpg"][0])
    storage = LocalStorage(ws)

    def written() -> tuple[list[str], list[str], list[str], list[str]]:
        lane = decode_index(storage.read(PRIORITY_INDEX_KEY) or b"")
        return (sorted(storage.list("service/jobs/")), sorted(storage.list("service/uploads/")),
                sorted(storage.list("service/inflight/")), sorted(lane))

    with running_service(ws, standin, tmp_path / "service.log", "--root", str(root)) as svc:
        for name, (data, words) in damaged.items():
            r = svc.post("/v1/jobs", files=[("file", (name, data, "application/octet-stream"))])
            assert "send an intact file" in refused(r, 422, "bad_image", words)["message"]
        # One damaged document refuses the whole job, the good one beside it included.
        mixed = [("file", ("good.png", image_bytes("PNG"), "image/png")),
                 ("file", ("cut.jpg", damaged["cut.jpg"][0], "image/jpeg"))]
        refused(svc.post("/v1/jobs", files=mixed), 422, "bad_image", "cut.jpg cannot be opened as a JPEG")
        refused(svc.post("/v1/jobs", json={"paths": ["named-cut.jpg"]}), 422, "bad_image",
                "named-cut.jpg cannot be opened as a JPEG")
        refused(svc.post("/v1/convert", files=[("file", ("idat.png", damaged["idat.png"][0], "image/png"))]), 422,
                "bad_image", "idat.png cannot be opened as a PNG")
        bomb = svc.post("/v1/jobs", files=[("file", ("bomb.png", png_of_size(20000, 20000), "image/png"))])
        refused(bomb, 422, "image_too_large", "bomb.png is too large an image to convert (Image size (400000000 "
                "pixels) exceeds limit of")
        assert written() == ([], [], [], []), written()

        good = svc.post("/v1/jobs", files=[("file", ("good.png", image_bytes("PNG"), "image/png")),
                                           ("file", ("good.jpg", image_bytes("JPEG"), "image/jpeg"))])
        assert good.status_code == 202, good.text
        done = svc.wait_state(good.json()["id"])
        assert [d["outcome"] for d in done["documents"]] == ["done", "done"], done
    records, uploads, _, lane = written()
    assert records == [f"service/jobs/{done['id']}.json"] and len(uploads) == 2 and len(lane) <= 1, written()


def test_more_pixels_than_the_renderer_takes_is_refused_even_without_pillows_guard(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The renderer's own limit (render.MAX_IMAGE_PIXELS, 20k x 20k) holds where Pillow's guard is off."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert inspect("wide.png", png_of_size(20000, 20000), Limits()) == ("png", 1)  # at the limit: taken
    with pytest.raises(ServiceError) as refusal:
        inspect("huge.png", png_of_size(20001, 20000), Limits())
    assert (refusal.value.status, refusal.value.code) == (422, "image_too_large")
    assert refusal.value.message.startswith("huge.png is too large an image to convert (20001x20000 pixels, more "
                                            "than the limit of 400,000,000;"), refusal.value.message
