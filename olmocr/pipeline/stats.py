"""``--stats``: what a workspace says about its runs, in one place.

The queue counts its own items (:func:`olmocr.pipeline.workspace.queue.workspace_stats`, which reads the
queue's layout); each run leaves its servers' counters in ``server_stats/`` (:func:`server_stats_record`),
summed here over all runs; :func:`print_stats` is the command.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from olmocr.pipeline.servers.fleet import Fleet

SERVER_STATS_DIR = "server_stats"
#: What a run records of each server's model and usage (#31): the model name asked for, its /v1/models
#: entry (root: which weights; max_model_len), tokens, 429s, and cost where the server has prices. No key.
PROVIDER_FIELDS = ("model", "model_card", "input_tokens", "output_tokens", "throttled", "cost")


def run_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"


def server_stats_record(fleet: Fleet) -> bytes:
    """This run's per-server counters, stored in the workspace for ``--stats``."""
    return json.dumps({"time": time.time(), "servers": [
        {k: v for k, v in s.as_dict().items() if k in ("url", "pages", "errors", "timeouts", "rejected",
                                                          "ejections", "state", *PROVIDER_FIELDS)}
        for s in [*fleet.servers, *fleet.retired]]}).encode()


def summarize_server_stats(records: Iterable[bytes]) -> dict[str, dict[str, int]]:
    """Sum the runs' per-server counters by URL (pages, errors, timeouts, rejected, ejections)."""
    totals: dict[str, dict[str, int]] = {}
    for raw in records:
        try:
            record = json.loads(raw)
            servers = record["servers"]
        except (ValueError, KeyError, TypeError):
            continue
        for s in servers:
            row = totals.setdefault(str(s.get("url")), {"runs": 0, "pages": 0, "errors": 0, "timeouts": 0,
                                                        "rejected": 0, "ejections": 0})
            row["runs"] += 1
            for key in ("pages", "errors", "timeouts", "rejected", "ejections", "input_tokens", "output_tokens"):
                row[key] = row.get(key, 0) + int(s.get(key) or 0)
            if s.get("cost") is not None:
                row["cost"] = row.get("cost", 0) + float(s["cost"])
    return totals


def format_server_stats(totals: Mapping[str, Mapping[str, int]]) -> str:
    if not totals:
        return ""
    lines = ["Servers (all runs):"]
    for url, row in sorted(totals.items()):
        lines.append(f"  {url}: {row['pages']} pages, {row['errors']} errors ({row['timeouts']} timeouts), "
                     f"{row['rejected']} rejected, taken out of rotation {row['ejections']} times, "
                     f"in {row['runs']} runs"
                     + (f", tokens {row['input_tokens']} in / {row['output_tokens']} out"
                        if row.get("input_tokens") or row.get("output_tokens") else "")
                     + (f", cost ${row['cost']:.4f} (${row['cost'] / row['pages'] * 1e6:,.0f} per million pages)"
                        if "cost" in row and row["pages"] else ""))
    return "\n".join(lines)


def print_stats(workspace: str, profile: str | None = None) -> int:
    """``--stats``: the workspace's summary and every server's counters over all runs (exit status)."""
    from olmocr.pipeline.cli import STATUS_BROKEN_PIPE
    from olmocr.pipeline.workspace.queue import format_stats, workspace_stats
    from olmocr.pipeline.workspace.storage import open_storage

    storage = open_storage(workspace, profile=profile)
    text = format_stats(workspace_stats(storage))
    per_server = format_server_stats(summarize_server_stats(
        storage.read(key) or b"" for key in storage.list(f"{SERVER_STATS_DIR}/")))
    try:
        print(text + ("\n" + per_server if per_server else ""), flush=True)
    except BrokenPipeError:  # `--stats | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exit's flush of stdout must not fail again
        return STATUS_BROKEN_PIPE
    return 0
