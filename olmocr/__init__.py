"""olmocr-serve: a supervised vLLM server for olmOCR and a resilient PDF pipeline."""

__version__ = "0.1.0"
