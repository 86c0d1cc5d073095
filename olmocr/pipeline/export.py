"""``python -m olmocr.pipeline.export WORKSPACE``: markdown, per-page JSONL and plain text from a workspace's results.

No model and no server: it reads ``results/*.jsonl`` (written by this pipeline or by upstream olmOCR 0.4.27)
and writes, into the workspace or into ``--out`` (a local directory or ``s3://bucket/prefix``):

* ``markdown/<source path>.md``: one file per document, pages apart (``--page_separator``), named by
  :func:`olmocr.pipeline.pages.output.export_paths` (no two documents share a file);
* ``pages/pages_<hash>.jsonl``: one line per page of ``results/output_<hash>.jsonl``: ``{"document",
  "id", "page", "text", "record"}`` (the page's record: docs/workspace.md);
* ``text/<source path>.txt``: each document's Dolma text as it is (upstream's page joining).

Names depend only on the workspace's queued inputs, and every file is rewritten whole, so running it again
(after more documents finished, or after their pages were retried) brings the export up to date.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from olmocr.pipeline.errors import WorkspaceError
from olmocr.pipeline.pages.output import (
    DEFAULT_PAGE_SEPARATOR,
    PAGE_SEPARATORS,
    document_pages,
    export_paths,
    export_relpath,
    markdown_files,
    source_of,
)
from olmocr.pipeline.workspace.storage import Storage, open_storage

logger = logging.getLogger(__name__)

FORMATS = ("markdown", "pages", "text")
RESULTS_PREFIX, RESULTS_NAME = "results/output_", ".jsonl"
PAGES_DIR = "pages"
IO_THREADS = 16


def parse_results(data: bytes) -> tuple[list[dict], int]:
    """The documents of one results file, and how many lines were not JSON documents (skipped)."""
    docs, bad = [], 0
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(doc, dict):
            docs.append(doc)
        else:
            bad += 1
    return docs, bad


def page_lines(docs: list[dict]) -> bytes:
    """``pages/pages_<hash>.jsonl``: one JSON line per page of ``docs``."""
    lines = []
    for doc in docs:
        for page in document_pages(doc):
            lines.append(json.dumps({"document": source_of(doc), "id": doc.get("id"), "page": page.page,
                                     "text": page.text, "record": page.record}))
    return "".join(line + "\n" for line in lines).encode("utf-8")


@dataclass
class ExportSummary:
    results_files: int = 0
    documents: int = 0
    pages: int = 0
    files: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FORMATS})
    bad_lines: int = 0
    renamed: int = 0  # documents whose name carries a hash (another input maps to the same name)

    def line(self, workspace: str, out: str) -> str:
        written = ", ".join(f"{n} {f} files" for f, n in self.files.items() if n)
        where = "" if out == workspace else f" into {out}"
        text = (f"exported {self.documents} documents ({self.pages} pages) from {self.results_files} results files "
                f"of {workspace}{where}: {written or 'nothing written'}")
        if self.renamed:
            text += f"; {self.renamed} names carry a hash suffix (inputs that would share a name)"
        if self.bad_lines:
            text += f"; {self.bad_lines} lines of results were not JSON documents and were skipped"
        return text


def queued_sources(storage: Storage) -> set[str]:
    """Every input the workspace's queue names (names then stay the same as more documents finish)."""
    from olmocr.pipeline.pages.page_retry import is_ticket
    from olmocr.pipeline.workspace.queue import load_index

    return {path for paths in load_index(storage).values() for path in paths if not is_ticket(path)}


def export_workspace(storage: Storage, out: Storage, formats: tuple[str, ...] = FORMATS,
                     separator: str = DEFAULT_PAGE_SEPARATOR) -> ExportSummary:
    """Write the exports of every results file of ``storage`` into ``out`` (see the module docstring).

    Results files are read and exported one at a time (IO_THREADS at once): memory stays that of a few
    files whatever the workspace's size. Names come from the queued inputs, known before any file is read.
    """
    summary = ExportSummary()
    keys = [k for k in storage.list(RESULTS_PREFIX) if k.endswith(RESULTS_NAME)]
    summary.results_files = len(keys)
    sources = queued_sources(storage)
    md_names = export_paths(sources) if "markdown" in formats else {}
    text_names = export_paths(sources, "text", ".txt") if "text" in formats else {}
    summary.renamed = sum(1 for s, k in md_names.items() if k != export_relpath(s))

    def export_one(key: str) -> tuple[int, int, int, dict[str, int]]:
        docs, bad = parse_results(storage.read(key) or b"")
        written = dict.fromkeys(FORMATS, 0)
        unqueued = {source_of(d) for d in docs} - sources  # not in the index (hand-made workspaces)
        if "markdown" in formats:
            names = {**export_paths(unqueued), **md_names} if unqueued else md_names
            for name, data in markdown_files(docs, separator, names):
                out.write(name, data)
                written["markdown"] += 1
        if "text" in formats:
            names = {**export_paths(unqueued, "text", ".txt"), **text_names} if unqueued else text_names
            for doc in docs:
                out.write(names[source_of(doc)], str(doc.get("text") or "").encode("utf-8"))
                written["text"] += 1
        if "pages" in formats:
            out.write(f"{PAGES_DIR}/pages_{key[len(RESULTS_PREFIX):-len(RESULTS_NAME)]}.jsonl", page_lines(docs))
            written["pages"] += 1
        return len(docs), sum(len(document_pages(d)) for d in docs), bad, written

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        for documents, pages, bad, written in pool.map(export_one, keys):
            summary.documents += documents
            summary.pages += pages
            summary.bad_lines += bad
            for kind, n in written.items():
                summary.files[kind] += n
    return summary


def build_parser() -> argparse.ArgumentParser:
    from olmocr.pipeline.cli import OneLineParser

    p = OneLineParser(prog="python -m olmocr.pipeline.export",
                      description="Write markdown (one file per document), per-page JSONL and plain text from a "
                                  "workspace's results; needs no model or server. Run it again to bring the "
                                  "export up to date.")
    p.add_argument("workspace", help="local directory or s3://bucket/prefix a pipeline (this one or upstream "
                                     "olmOCR's) wrote results into")
    p.add_argument("--out", default=None, metavar="DEST",
                   help="where to write (local directory or s3://bucket/prefix); default: the workspace itself")
    p.add_argument("--formats", default=",".join(FORMATS), metavar="LIST",
                   help=f"comma-separated, of {', '.join(FORMATS)} (default: all)")
    p.add_argument("--page_separator", "--page-separator", choices=PAGE_SEPARATORS, default=DEFAULT_PAGE_SEPARATOR,
                   help="between two pages of a markdown file: 'comment' (<!-- page N -->, default), 'rule' "
                        "(---), 'none' (one newline: the Dolma text as it is)")
    p.add_argument("--workspace_profile", "--workspace-profile", default=None, metavar="PROFILE",
                   help="AWS profile for an s3:// workspace (and --out)")
    return p


def main(argv: list[str] | None = None) -> int:
    from olmocr.pipeline.workspace.check import check_workspace, workspace_problem

    parser = build_parser()
    args = parser.parse_args(argv)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        parser.error(f"--formats {args.formats!r}: choose from {', '.join(FORMATS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out_url = args.out or args.workspace
    try:
        check_workspace(args.workspace, args.workspace_profile, writable=False)
        if args.out:
            check_workspace(out_url, args.workspace_profile, writable=True)
    except WorkspaceError as exc:
        logger.error("%s", exc)
        return 1 if args.workspace.startswith("s3://") else 2
    try:
        storage = open_storage(args.workspace, profile=args.workspace_profile)
        out = open_storage(out_url, profile=args.workspace_profile) if args.out else storage
        summary = export_workspace(storage, out, formats, args.page_separator)
    except Exception as exc:
        problem = workspace_problem(args.workspace, exc)
        if problem is None:
            raise
        logger.error("%s", problem)
        return 1
    if not summary.results_files:
        logger.warning("nothing to export: %s has no results yet (results/output_*.jsonl)", args.workspace)
        return 0
    logger.info("%s", summary.line(storage.url, out.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
