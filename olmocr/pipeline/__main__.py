"""``python -m olmocr.pipeline WORKSPACE --vllm-url URL --pdfs ...``"""

from olmocr.pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
