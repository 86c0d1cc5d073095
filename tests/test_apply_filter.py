"""--apply_filter: upstream's document filter, with every skipped document recorded and counted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from olmocr.pipeline.pages.filters import MISSING_LINGUA, language_of, seo_spam_share, text_reason
from tests.pipeline_helpers import docs_by_source, failures, run_pipeline
from tests.sample_docs import PARAGRAPHS, write_text_pdf
from tests.standin_helpers import REPO_ROOT, clean_env

GERMAN = (
    "Der Quartalsbericht beschreibt, wie der Umsatz im Cloud-Geschäft gewachsen ist und warum sich die "
    "Margen im Laufe des Jahres verbessert haben. Die Geschäftsführung erwartet für das kommende Jahr ein "
    "weiteres Wachstum, vor allem in Europa, und wird die Investitionen in Forschung und Entwicklung erhöhen."
)
SPAM = ("Free download pdf ebook epub mobi. Download the free ebook now and save the file. " * 6)

def _with_text_field(source: Path, target: Path) -> Path:
    """``source`` with an AcroForm text field on its first page (what a fillable form has)."""
    import pypdf
    from pypdf.generic import ArrayObject, DictionaryObject, FloatObject, NameObject, TextStringObject

    writer = pypdf.PdfWriter(clone_from=str(source))
    field = DictionaryObject({
        NameObject("/Type"): NameObject("/Annot"), NameObject("/Subtype"): NameObject("/Widget"),
        NameObject("/FT"): NameObject("/Tx"), NameObject("/T"): TextStringObject("applicant_name"),
        NameObject("/V"): TextStringObject(""),
        NameObject("/Rect"): ArrayObject([FloatObject(v) for v in (72, 600, 300, 620)]),
    })
    ref = writer._add_object(field)
    writer.pages[0][NameObject("/Annots")] = ArrayObject([ref])
    writer._root_object[NameObject("/AcroForm")] = DictionaryObject({NameObject("/Fields"): ArrayObject([ref])})
    with open(target, "wb") as fh:
        writer.write(fh)
    return target

def test_text_rules_as_upstream() -> None:
    english = " ".join(PARAGRAPHS[:3])
    assert language_of(english) == "ENGLISH" and language_of(GERMAN) == "GERMAN"
    assert text_reason(english, language_of) is None
    assert text_reason(GERMAN, language_of) == "filtered: language is german, not english"
    assert text_reason(SPAM, language_of).startswith("filtered: looks like download/SEO spam")
    assert text_reason("Kurz.", language_of) is None  # too little text to judge: kept
    assert text_reason("1234 5678 9012 " * 30, language_of) is None  # mostly not letters: kept
    assert seo_spam_share("") == 0.0

@pytest.mark.slow
def test_apply_filter_records_skipped_documents(standin, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    english = write_text_pdf(docs / "english.pdf", [" ".join(PARAGRAPHS[:3]), " ".join(PARAGRAPHS[3:])])
    german = write_text_pdf(docs / "german.pdf", [GERMAN, GERMAN])
    form = _with_text_field(write_text_pdf(docs / "plain.pdf", [" ".join(PARAGRAPHS[:3])]), docs / "form.pdf")
    spam = write_text_pdf(docs / "spam.pdf", [SPAM])
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url, [english, german, form, spam], "--apply_filter",
                           log=tmp_path / "run.log")
    assert rc == 0, log
    assert "1 documents written, 0 failed, skipped by filter 3" in log
    assert set(docs_by_source(ws)) == {str(english)}
    records = {Path(r["source"]).name: r for r in failures(ws)}
    assert set(records) == {"german.pdf", "form.pdf", "spam.pdf"}
    assert records["german.pdf"]["reason"] == "filtered: language is german, not english"
    assert records["form.pdf"]["reason"] == "filtered: has form fields (1 text fields)"
    assert records["spam.pdf"]["reason"].startswith("filtered: looks like download/SEO spam")
    assert all(r["filtered"] and not r["retryable"] for r in records.values())

    stats = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--stats"], cwd=REPO_ROOT,
                           env=clean_env(), capture_output=True, text=True, timeout=60)
    assert "0 failed (0 will be retried by the next run), 3 skipped by --apply_filter" in stats.stdout
    assert f"  {german}: filtered: language is german, not english" in stats.stdout

    # Final: a second run finds nothing to retry.
    rc, log = run_pipeline(ws, standin.url, (), "--apply_filter", log=tmp_path / "again.log")
    assert rc == 0 and "no work to do" in log, log
    assert set(docs_by_source(ws)) == {str(english)}

def test_apply_filter_without_lingua_says_what_to_install(tmp_path: Path) -> None:
    # A 'lingua' that cannot be imported, as when the filter extra is not installed.
    shadow = tmp_path / "shadow"
    (shadow / "lingua").mkdir(parents=True)
    (shadow / "lingua" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = clean_env()
    env["PYTHONPATH"] = f"{shadow}:{env['PYTHONPATH']}"
    done = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(tmp_path / "ws"), "--vllm-url",
                           "http://127.0.0.1:9", "--apply_filter"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(MISSING_LINGUA)
    assert not (tmp_path / "ws").exists()

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
