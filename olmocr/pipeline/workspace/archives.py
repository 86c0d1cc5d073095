"""Tarball inputs (``.tar``, ``.tar.gz``, ``.tgz``): one work item each; their members are documents.

As upstream olmOCR 0.4.27: a member's documents are named ``ARCHIVE::MEMBER`` in the results
(``metadata.Source-File``). Beyond upstream: plain ``.tar`` too, images as well as PDFs (recognised by
content, as any input), and a damaged archive keeps the members read before the damage.
"""

from __future__ import annotations

import os
import tarfile

from olmocr.pipeline.workspace.inputs import SNIFF_BYTES, sniff_kind

#: Members by name that are documents even if their content says otherwise (they then fail with a reason).
DOCUMENT_SUFFIXES = (".pdf", ".png", ".jpg", ".jpeg")


def extract_members(archive: str, into: str) -> tuple[list[tuple[str, str]], str | None]:
    """Extract the document members of the local tarball ``archive`` into the folder ``into``.

    Returns ``[(member name, local path), ...]`` in archive order, and the problem that stopped the reading
    (a corrupt or truncated archive), if any. Members are documents by content (PDF, PNG, JPEG) or by name
    (``.pdf``, ``.png``, ``.jpg``); other members (a README, folders, links) are skipped."""
    found: list[tuple[str, str]] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for n, member in enumerate(tar):
                if not member.isfile():
                    continue
                source = tar.extractfile(member)
                if source is None:
                    continue
                data = source.read()
                if sniff_kind(data[:SNIFF_BYTES]) is None and not member.name.lower().endswith(DOCUMENT_SUFFIXES):
                    continue
                local = os.path.join(into, f"{n:06d}-{os.path.basename(member.name) or 'member'}")
                with open(local, "wb") as out:
                    out.write(data)
                found.append((member.name, local))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        kind = "truncated" if isinstance(exc, EOFError) or "unexpected end" in str(exc).lower() else "corrupt"
        read = f"; {len(found)} document{'s' if len(found) != 1 else ''} read before it" if found else ""
        return found, f"{kind} archive ({type(exc).__name__}: {exc}){read}"
    return found, None
