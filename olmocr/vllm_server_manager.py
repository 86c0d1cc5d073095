"""``python -m olmocr.vllm_server_manager [MODEL] [options]``: see olmocr.server.manager."""

import sys

from olmocr.server.manager import main

if __name__ == "__main__":
    sys.exit(main())
