"""One log format for every program of olmocr-serve (pipeline, manager, wrapper, health listener, status
service): upstream olmOCR's ``time - logger - LEVEL - message``, so one grep or log shipper reads them all."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


def formatter() -> logging.Formatter:
    return logging.Formatter(LOG_FORMAT)
