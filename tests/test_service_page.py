"""The upload page at ``/`` in a real browser (Debian's headless Chromium over the DevTools protocol): asks
for the token, uploads a document, shows its progress live, then each page's image beside its Markdown;
a refused file shows the service's one-line reason; a multi-frame TIFF shows each frame."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import requests

from tests.browser import Browser, chromium_path
from tests.pipeline_helpers import SAMPLES, StandIn
from tests.test_service import running_service
from tests.test_service_types import image_bytes
from tests.tiers import require

TOKEN = "page-token-8841"


def js_file(path: Path, data: bytes | None = None) -> str:
    """A JavaScript ``File`` holding the bytes of ``path`` (as a drop or the file chooser gives the page)."""
    b64 = base64.b64encode(path.read_bytes() if data is None else data).decode()
    return (f"new File([Uint8Array.from(atob({json.dumps(b64)}), c => c.charCodeAt(0))], {json.dumps(path.name)}, "
            "{type: 'application/pdf'})")


def test_upload_page_converts_a_document_and_shows_pages_beside_markdown(standin: StandIn, tmp_path: Path) -> None:
    require(chromium_path() is not None, "chromium not installed (Debian package 'chromium': apt-get install chromium)")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with running_service(tmp_path / "ws", standin, tmp_path / "service.log", "--token-file", str(token_file),
                         token=TOKEN) as svc:
        browser = Browser(tmp_path / "chromium-profile")
        try:
            browser.goto(svc.url + "/")
            browser.wait_for("typeof uploadFiles === 'function'", 20, "the page's script")
            # Without the token: the service says 401 and the page asks for it.
            browser.evaluate(f"void uploadFiles([{js_file(SAMPLES.guide)}])")
            browser.wait_for("document.getElementById('token-box').classList.contains('shown')", 20, "the token box")
            browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}; "
                             "document.getElementById('token-save').click()")
            # A file that is not a document: the service's reason, on the page.
            browser.evaluate(f"void uploadFiles([{js_file(tmp_path / 'notes.pdf', b'plain text, not a PDF')}])")
            refused = browser.wait_for("document.getElementById('message').innerText", 20, "the refusal")
            assert "notes.pdf is not a PDF, PNG, JPEG or TIFF" in refused
            browser.evaluate(f"void uploadFiles([{js_file(SAMPLES.guide)}])")
            browser.wait_for("!!document.querySelector('.job[data-finished=yes]')", 60, "the job finished on the page")
            assert browser.text(".job .state") == "done"
            assert browser.text(".job .pages").startswith("3 / 3 pages")
            browser.wait_for("[...document.querySelectorAll('.page img')].every(i => i.complete && i.naturalWidth > 0)"
                             " && document.querySelectorAll('.page img').length === 3", 20, "three page images")
            shown = browser.evaluate("[...document.querySelectorAll('.page pre')].map(p => p.textContent)")
            job_id = browser.evaluate("document.querySelector('.job').dataset.id")
            result = requests.get(f"{svc.url}/v1/jobs/{job_id}/result?format=pages", headers=svc.headers(),
                                  timeout=30).json()
            assert shown == [p["text"] for p in result["documents"][0]["pages"]]
            sizes = browser.evaluate("[...document.querySelectorAll('.page img')].map(i => [i.naturalWidth, "
                                     "i.naturalHeight])")
            assert all(max(size) == 1000 for size in sizes), sizes  # rendered pages, longest side 1000 px
            browser.screenshot(tmp_path / "service-page.png")
            # A two-frame TIFF: two pages, each shown (a browser decodes no TIFF: the service sends PNGs).
            browser.evaluate(f"void uploadFiles([{js_file(tmp_path / 'scan.tif', image_bytes('TIFF', 2))}])")
            browser.wait_for("document.querySelectorAll('.job[data-finished=yes]').length === 2", 60, "the TIFF job")
            assert browser.text(".job .pages").startswith("2 / 2 pages")  # the newest card comes first
            browser.wait_for("[...document.querySelectorAll('.job')[0].querySelectorAll('.page img')].every("
                             "i => i.complete && i.naturalWidth > 0) && "
                             "document.querySelectorAll('.job')[0].querySelectorAll('.page img').length === 2",
                             20, "two TIFF page images the browser shows")
        finally:
            browser.close()
