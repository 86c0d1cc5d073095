"""``--apply_filter``: upstream olmOCR 0.4.27's document filter (``olmocr/filter/filter.py``), same rules.

A PDF is skipped when it has form text fields, when the text of its first five pages is (confidently)
not English, or when it looks like download/SEO spam. Text too short (< 200 characters) or mostly not
letters (< 50 %) keeps the document, as upstream does: a scan may have no usable text layer. A language
the detector cannot name keeps it too (upstream keeps ``{English, None}``).

Differences from upstream, on purpose: the text comes from pdfium (the renderer's text layer) rather than
the ``pdftotext`` program, so no poppler install is needed; a PDF that pypdf cannot parse is *not*
filtered (upstream filters it): the renderer decides whether it is readable and records why if not.
Images (PNG/JPEG inputs) have no text layer and are never filtered.

Language detection uses lingua (``lingua-language-detector``, upstream's choice), an optional extra
because its models are ~100 MB: ``pip install 'olmocr-serve[filter]'``.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from typing import Any

from olmocr.pipeline.errors import FilterUnavailable

#: Pages whose text the language and spam checks read (upstream: ``pdftotext -f 1 -l 5``).
PAGES_TO_READ = 5
MIN_TEXT_CHARS = 200
MIN_ALPHA_SHARE = 0.5
SPAM_THRESHOLD = 0.004
SEO_WORDS = frozenset({"download", "pdf", "epub", "mobi", "free", "ebook", "file", "save", "casino", "viagra",
                       "cialis", "ciprofloxacin"})
KEEP_LANGUAGE = "ENGLISH"
MISSING_LINGUA = ("--apply_filter needs the language detector lingua: "
                  "pip install 'olmocr-serve[filter]' (or: pip install lingua-language-detector pypdf)")


def check_available() -> None:
    """Fail fast (before any work is claimed) when the filter cannot run."""
    try:
        import lingua  # noqa: F401
        import pypdf  # noqa: F401
    except ImportError:
        raise FilterUnavailable(MISSING_LINGUA) from None


def seo_spam_share(text: str) -> float:
    """Share of the words that are download/SEO-spam words (upstream's ``_is_download_spam`` score)."""
    words = re.sub(r"\W+", " ", text.strip().lower()).split()
    if not words:
        return 0.0
    counts = Counter(words)
    return sum(counts[w] for w in SEO_WORDS) / len(words)


def text_reason(text: str, language_of: Any) -> str | None:
    """Why a document with this text (its first pages) is filtered out, or None to keep it. Pure given
    ``language_of(text) -> language name or None``."""
    if len(text) < MIN_TEXT_CHARS:
        return None
    if sum(c.isalpha() for c in text) / len(text) < MIN_ALPHA_SHARE:
        return None
    language = language_of(text)
    if language is not None and language != KEEP_LANGUAGE:
        return f"filtered: language is {language.lower()}, not english"
    share = seo_spam_share(text)
    if share > SPAM_THRESHOLD:
        return f"filtered: looks like download/SEO spam ({share:.1%} spam words)"
    return None


def form_reason(path: str) -> str | None:
    """``filtered: ...`` when the PDF has form text fields (upstream: pypdf ``get_form_text_fields``)."""
    import pypdf

    try:
        fields = pypdf.PdfReader(path).get_form_text_fields()
    except Exception:  # noqa: BLE001 - unreadable by pypdf: the renderer decides (module docstring)
        return None
    if fields:
        return f"filtered: has form fields ({len(fields)} text fields)"
    return None


_detector: Any = None
_detector_lock = threading.Lock()


def language_of(text: str) -> str | None:
    """lingua's language name (e.g. ``"ENGLISH"``) for ``text``, None when it cannot tell."""
    global _detector
    with _detector_lock:
        if _detector is None:
            from lingua import LanguageDetectorBuilder

            # All languages, as upstream; models load lazily per script seen (upstream preloads them all).
            _detector = LanguageDetectorBuilder.from_all_languages().build()
        detector = _detector
    language = detector.detect_language_of(text)
    return None if language is None else language.name


def filter_reason(path: str, first_pages_text: str) -> str | None:
    """Why this PDF is skipped under ``--apply_filter`` (a ``filtered: ...`` line), or None to keep it."""
    return form_reason(path) or text_reason(first_pages_text, language_of)
