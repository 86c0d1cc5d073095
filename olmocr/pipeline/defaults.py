"""The pipeline's defaults, each written once: ``PipelineConfig``, the command line's flags and their help,
and the lower layers' keyword defaults (fleet, client, page settings) all take them from here."""

from __future__ import annotations

from olmocr import envs

WORKERS = 20
PAGES_PER_GROUP = 500
#: With an API key (a hosted or shared server) work items are smaller, as upstream does.
PAGES_PER_GROUP_WITH_KEY = 50
MAX_PAGE_RETRIES = 8
MAX_PAGE_ERROR_RATE = 0.004
MAX_CONCURRENT_REQUESTS = 1600
#: Longest side of a rendered page image, pixels (upstream's --target_longest_image_dim).
LONGEST_IMAGE_DIM = 1288
MAX_MODEL_LEN = envs.DEFAULT_MAX_MODEL_LEN
REQUEST_TIMEOUT_S = 600.0
SERVER_READY_TIMEOUT_S = 600.0
LEASE_SECONDS = 300.0
PROGRESS_INTERVAL_S = 10.0
METRICS_HOST = "127.0.0.1"
