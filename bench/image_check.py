"""What olmocr-service's submit-time image check costs (``_image_pages`` in olmocr/service/intake.py), against
decoding the whole image: ``python -m bench.image_check``. A standalone measurement for that docstring, not a
section of ``bench/run``; its output is kept in bench/results/image_check.md.

Each figure is CPU time (``time.process_time``) of one check of a 2000x2000 page, the best and the median of
30, for a text page saved as JPEG (quality 90), PNG and TIFF, and a noisy page as JPEG (a photo's worst case
for entropy decoding).
"""

from __future__ import annotations

import io
import platform
import statistics
import time
from collections.abc import Callable

import PIL
from PIL import Image, ImageDraw

from olmocr.service.intake import Limits, inspect

SIDE = 2000
ROUNDS = 30


def text_page(fmt: str, **options: object) -> bytes:
    page = Image.new("RGB", (SIDE, SIDE), "white")
    draw = ImageDraw.Draw(page)
    for y in range(0, SIDE, 30):
        draw.text((20, y), f"The quick brown fox jumps over the lazy dog {y} " * 3, fill="black")
    out = io.BytesIO()
    page.save(out, format=fmt, **options)
    return out.getvalue()


def noisy_jpeg() -> bytes:
    bands = [Image.effect_noise((SIDE, SIDE), 40).point(lambda v: 150 + v // 3) for _ in range(3)]
    out = io.BytesIO()
    Image.merge("RGB", bands).save(out, format="JPEG", quality=90)
    return out.getvalue()


def cpu_ms(step: Callable[[], object]) -> tuple[float, float]:
    """(best, median) CPU milliseconds of ``step``."""
    times = []
    for _ in range(ROUNDS):
        start = time.process_time()
        step()
        times.append((time.process_time() - start) * 1000)
    return min(times), statistics.median(times)


def full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def main() -> None:
    pages = {"JPEG, text page": text_page("JPEG", quality=90), "JPEG, noisy page": noisy_jpeg(),
             "PNG, text page": text_page("PNG"), "TIFF, text page": text_page("TIFF")}
    print(f"Pillow {PIL.__version__}, Python {platform.python_version()}, {SIDE}x{SIDE}, CPU ms, best / median "
          f"of {ROUNDS}")
    print("| image | bytes | check | full decode |\n|---|---|---|---|")
    for name, data in pages.items():
        check = cpu_ms(lambda data=data, name=name: inspect(name, data, Limits()))
        full = cpu_ms(lambda data=data: full_decode(data))
        print(f"| {name} | {len(data):,} | {check[0]:.2f} / {check[1]:.2f} | {full[0]:.2f} / {full[1]:.2f} |")


if __name__ == "__main__":
    main()
