"""Exit statuses of every olmocr command (the pipeline, --stats, the finalizer, the service), in one place.

| status | meaning |
|---|---|
| 0 | done, or nothing left to do |
| 1 | the run failed (a server, the storage, every page failing the same way, nothing written) |
| 2 | a mistake in the command line or its inputs (argparse's own status) |
| 3 | stopped by the cost budget (``--max_cost``): the rest of the work stays queued for a later run |
| 130 | stopped at once by a second signal (as a shell reports SIGINT) |
| 141 | the reader of the output went away (as a program killed by SIGPIPE: ``seq 9 \\| head -1``) |
"""

from __future__ import annotations

STATUS_OK = 0
STATUS_FAILED = 1
STATUS_USAGE = 2
STATUS_BUDGET = 3
STATUS_INTERRUPTED = 130
STATUS_BROKEN_PIPE = 141
