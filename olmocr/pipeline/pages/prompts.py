"""The olmOCR v4 YAML prompt and the parser for the model's front-matter answers.

Both are the model's training contract (upstream olmOCR 0.4.27 ``build_no_anchoring_v4_yaml_prompt`` and
``FrontMatterParser`` with ``PageResponse``); they must not drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from olmocr.pipeline.errors import FrontMatterError
from olmocr.pipeline.model_prompt import PROMPT_V4_YAML  # noqa: F401 - the prompt, in the model's contract

#: libyaml's loader where PyYAML was built with it (every PyPI wheel): the same YAML 1.1 safe schema as the
#: pure-Python ``SafeLoader`` (same resolver, same values), and several times faster on a page's front matter.
#: The measured figures: bench/results/micro.json, "front matter, CSafeLoader" (docs/benchmarks.md).
_YAML_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: The guided-decoding regex upstream sends with ``--guided_decoding``.
GUIDED_REGEX = (
    r"---\nprimary_language: (?:[a-z]{2}|null)\nis_rotation_valid: (?:True|False|true|false)\n"
    r"rotation_correction: (?:0|90|180|270)\nis_table: (?:True|False|true|false)\n"
    r"is_diagram: (?:True|False|true|false)\n(?:---|---\n[\s\S]+)"
)

FRONT_MATTER_FIELDS = ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram")
VALID_ROTATIONS = (0, 90, 180, 270)


@dataclass(frozen=True)
class PageResponse:
    """One page's parsed answer (upstream's ``PageResponse``)."""

    primary_language: str | None
    is_rotation_valid: bool
    rotation_correction: int
    is_table: bool
    is_diagram: bool
    natural_text: str | None


def split_front_matter(content: str) -> tuple[dict[str, Any], str]:
    """``(front_matter, text)``; ``({}, stripped content)`` if there is no parseable front matter."""
    if content.startswith("---\n"):
        end = content.find("\n---", 4)
        if end != -1:
            try:
                loaded = yaml.load(content[4:end], Loader=_YAML_LOADER) or {}  # noqa: S506 - a safe loader
            except yaml.YAMLError:
                loaded = None
            if isinstance(loaded, dict):
                return loaded, content[end + 4 :].strip()
            if loaded is not None:
                raise FrontMatterError(f"front matter is a {type(loaded).__name__}, not a mapping")
    return {}, content.strip()


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise FrontMatterError(f"{name} must be a boolean, got {value!r}")
    return value


def _as_language(value: Any) -> str | None:
    # YAML turns `no` (Norwegian!) and friends into booleans: upstream treats any boolean as "no language".
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value or None
    return None if not value else value


def parse_page_response(content: str) -> PageResponse:
    """Parse a model answer; raise :class:`FrontMatterError` unless it holds exactly the five fields."""
    front, text = split_front_matter(content)
    missing = [f for f in FRONT_MATTER_FIELDS if f not in front]
    if missing:
        raise FrontMatterError(f"missing required field '{missing[0]}' in front matter")
    extra = set(front) - set(FRONT_MATTER_FIELDS)
    if extra:
        raise FrontMatterError(f"unexpected fields in front matter: {sorted(map(str, extra))}")

    rotation = front["rotation_correction"]
    if isinstance(rotation, str):
        try:
            rotation = int(rotation)
        except ValueError:
            raise FrontMatterError(f"rotation_correction is not a number: {rotation!r}") from None
    if isinstance(rotation, bool) or not isinstance(rotation, int) or rotation not in VALID_ROTATIONS:
        raise FrontMatterError(f"rotation_correction must be one of {list(VALID_ROTATIONS)}, got {rotation!r}")

    language = _as_language(front["primary_language"])
    if language is not None and not isinstance(language, str):
        raise FrontMatterError(f"primary_language must be a string, got {language!r}")

    return PageResponse(
        primary_language=language,
        is_rotation_valid=_as_bool("is_rotation_valid", front["is_rotation_valid"]),
        rotation_correction=rotation,
        is_table=_as_bool("is_table", front["is_table"]),
        is_diagram=_as_bool("is_diagram", front["is_diagram"]),
        natural_text=text if text else None,
    )
