"""One log format for every program of olmocr-serve (pipeline, manager, wrapper, health listener, status
service): upstream olmOCR's ``time - logger - LEVEL - message``, so one grep or log shipper reads them all."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


def formatter() -> logging.Formatter:
    return logging.Formatter(LOG_FORMAT)


#: The loggers a pipeline process gives handlers to. Every logger is named after its module (``__name__``),
#: so these two cover every module a pipeline runs: its own, and in internal mode the server modules it runs
#: in-process (the manager, the GPU count, the vLLM version check), whose lines would otherwise reach only
#: Python's last-resort handler.
RUN_LOGGERS = ("olmocr.pipeline", "olmocr.server")
