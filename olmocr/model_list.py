"""Is ``olmocr`` served? The one reading of an OpenAI-compatible ``/v1/models`` answer, for both halves.

The health probe, the pipeline's server check and internal mode (is the port ours? is our server up?) all
ask it through :func:`parse_models` / :func:`serves`.
"""

from __future__ import annotations

import json

from olmocr.envs import SERVED_MODEL_NAME


def parse_models(body: bytes | str) -> dict[str, int | None]:
    """``/v1/models`` -> {model id: max_model_len or None}; ValueError if it is not a model list."""
    try:
        data = json.loads(body)
        models: dict[str, int | None] = {}
        for entry in data.get("data", []):
            length = entry.get("max_model_len")
            models[str(entry.get("id"))] = int(length) if isinstance(length, int | float) and length > 0 else None
        return models
    except (ValueError, AttributeError, TypeError):
        raise ValueError("/v1/models answered something that is not a model list") from None


def serves(body: bytes | str, name: str = SERVED_MODEL_NAME) -> bool:
    """True when the ``/v1/models`` answer ``body`` lists ``name``; False for anything else."""
    try:
        return name in parse_models(body)
    except ValueError:
        return False
