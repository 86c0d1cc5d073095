"""``python -m olmocr.standin serve MODEL ...``: run the vLLM stand-in server."""

import sys

from olmocr.standin.server import main

sys.exit(main())
