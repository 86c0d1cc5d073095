"""``python -m olmocr.pipeline.finalize WORKSPACE``: the verdict on a workspace once its runs are over.

For the job that runs after a whole batch (Slurm's ``--dependency=afterany:JOB``, a Kubernetes Job's last
step, a script): it prints the ``--stats`` summary, then one verdict line, and exits

- 0 when every work item is done and no document failed for a reason a rerun could fix (documents that failed
  for good, e.g. a corrupt PDF, are listed but do not fail the verdict: rerunning will not change them);
- 1 when work is left: items pending or still leased (a task was cancelled, timed out or crashed), or
  documents whose failure a rerun retries (``retryable`` in the failure records), or nothing was ever queued;
- 2 when the workspace cannot be read (one line says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from olmocr import __version__

FINISHED = 0
UNFINISHED = 1
UNREADABLE = 2


@dataclass(frozen=True)
class Verdict:
    exit_code: int
    line: str


def verdict(stats: Mapping[str, Any]) -> Verdict:
    """The verdict on :func:`olmocr.pipeline.workspace.queue.workspace_stats` (pure)."""
    items = stats["items"]
    failed = stats.get("failed_documents") or []
    retryable = sum(1 for f in failed if f.get("retryable"))
    final = len(failed) - retryable
    if not items.get("total"):
        return Verdict(UNFINISHED, "UNFINISHED: no work items: nothing was ever added to this workspace "
                                   "(give the documents as INPUTS / --pdfs)")
    problems = []
    if items.get("pending"):
        problems.append(f"{items['pending']} work items never done")
    if items.get("leased"):
        problems.append(f"{items['leased']} work items still leased (a task stopped without handing them back; "
                        "free once the lease expires)")
    if retryable:
        problems.append(f"{retryable} documents failed for a reason a rerun retries")
    if problems:
        return Verdict(UNFINISHED, "UNFINISHED: " + "; ".join(problems) +
                       ": submit the array again (same WORKSPACE) to finish them")
    tail = f"; {final} documents failed for good (listed above)" if final else ""
    return Verdict(FINISHED, f"FINISHED: all {items['total']} work items done, {stats.get('documents', 0)} "
                             f"documents, {stats.get('pages', 0)} pages{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olmocr.pipeline.finalize",
                                     description="Report a workspace's final state; exit 0 only when all work "
                                                 "is done and nothing failed that a rerun could fix.")
    parser.add_argument("--version", action="version", version=f"olmocr-serve {__version__}")
    parser.add_argument("workspace", help="local directory or s3://bucket/prefix")
    parser.add_argument("--workspace_profile", default=None, help="AWS profile for an s3:// workspace")
    parser.add_argument("--json", action="store_true", help="print the stats as JSON instead of the summary")
    args = parser.parse_args(argv)
    from olmocr.pipeline.workspace.queue import format_stats, workspace_stats
    from olmocr.pipeline.workspace.storage import open_storage

    if not args.workspace.startswith("s3://") and not os.path.isdir(args.workspace):
        print(f"olmocr finalize: no workspace at {args.workspace} (a directory a run wrote to)", file=sys.stderr)
        return UNREADABLE
    try:
        storage = open_storage(args.workspace, profile=args.workspace_profile)
        stats = workspace_stats(storage)
    except Exception as exc:  # noqa: BLE001 - any storage error: one line, not a traceback
        print(f"olmocr finalize: cannot read workspace {args.workspace}: {exc}", file=sys.stderr)
        return UNREADABLE
    result = verdict(stats)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    print(result.line, flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
