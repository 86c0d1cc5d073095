"""Deterministic olmOCR-style answers: image size sniffing, token estimates, front-matter text."""

from __future__ import annotations

import binascii
import hashlib
import random
import struct
from dataclasses import dataclass

import pybase64

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more can "
    "said who about some what out up into them these time other than then only its over also new two "
    "document page table figure report section value total market revenue annual results data analysis"
).split()

PATCH_PIXELS = 28 * 28  # Qwen2.5-VL: one image token per 28x28 patch


@dataclass(frozen=True)
class ImageInfo:
    sha1_16: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG IHDR or a JPEG SOF marker; (0, 0) when unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return width, height
            i += 2 + seg_len
    return 0, 0


def decode_data_url(url: str) -> bytes | None:
    """Bytes of a ``data:...;base64,`` URL, or None when it is not one."""
    if not url.startswith("data:"):
        return None
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        return None
    try:
        # As vLLM decodes a data URL (vllm/multimodal/media/image.py): pybase64, validated.
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None


def inspect_image(data: bytes) -> ImageInfo:
    width, height = image_size(data)
    return ImageInfo(hashlib.sha1(data).hexdigest()[:16], width, height)


def estimate_prompt_tokens(text_chars: int, images: list[ImageInfo]) -> int:
    """~4 characters per text token, one token per 28x28 image patch, plus chat-template overhead."""
    return 20 + text_chars // 4 + sum(max(1, img.pixels // PATCH_PIXELS) for img in images)


def filler_text(seed: str, tokens: int) -> str:
    """About ``tokens`` tokens (~4 chars each) of deterministic filler words for ``seed``."""
    rng = random.Random(seed)
    target = max(0, tokens) * 4
    words: list[str] = []
    size = 0
    line = 0
    while size < target:
        word = rng.choice(_WORDS)
        line += 1
        sep = "\n" if line % 14 == 0 else " "
        words.append(word + sep)
        size += len(word) + 1
    return "".join(words).rstrip()


def front_matter(*, rotation_valid: bool = True, rotation_correction: int = 0) -> str:
    return (
        "---\n"
        "primary_language: en\n"
        f"is_rotation_valid: {rotation_valid}\n"
        f"rotation_correction: {rotation_correction}\n"
        "is_table: False\n"
        "is_diagram: False\n"
        "---\n"
    )


def page_text(image: ImageInfo | None, output_tokens: int) -> str:
    if image is None:
        first = "Stand-in OCR of a request without an image"
        seed = "no-image"
    else:
        first = f"Stand-in OCR of image {image.sha1_16} ({image.width}x{image.height})"
        seed = image.sha1_16
    remaining = max(0, output_tokens - len(first) // 4 - 1)
    body = filler_text(seed, remaining)
    return first + ("\n" + body if body else "")


def count_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)
