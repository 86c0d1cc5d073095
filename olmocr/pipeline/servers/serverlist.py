"""The server list of a pipeline: ``--vllm-url`` values (repeated or comma-separated, optional weights) and
the API key of each server (environment or key file; never a command line shown in ``ps``). Pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from olmocr.pipeline.errors import FleetConfigError
from olmocr.pipeline.servers.client import display_url, normalize_base_url
from olmocr.secret_files import SecretFileError, read_secret_lines

#: Environment variable holding the server list when no ``--vllm-url`` is given.
URL_ENV = "OLMOCR_VLLM_URL"


@dataclass(frozen=True)
class ServerSpec:
    """One server as configured: normalised URL, optional fixed weight, its API key (never printed)."""

    url: str
    weight: float | None = None
    api_key: str | None = field(default=None, repr=False)


def parse_url_list(values: Iterable[str]) -> list[tuple[str, float | None]]:
    """``--vllm-url`` values (each may be a comma-separated list) as ``(normalised URL, weight)``.

    A weight is written as a URL fragment, ``http://gpu1:30024#weight=2`` (fragments are never sent).
    """
    out: list[tuple[str, float | None]] = []
    seen: set[str] = set()
    for value in values:
        for raw in value.split(","):
            raw = raw.strip()
            if not raw:
                continue
            url, _, fragment = raw.partition("#")
            weight: float | None = None
            if fragment:
                key, _, num = fragment.partition("=")
                try:
                    weight = float(num)
                except ValueError:
                    weight = None
                if key != "weight" or weight is None or not weight > 0:
                    raise FleetConfigError(f"{display_url(raw)}: the only URL fragment understood is "
                                           "'#weight=N' with N > 0")
            url = normalize_base_url(url)
            if not url.startswith(("http://", "https://")):
                raise FleetConfigError(f"{display_url(url)} is not an http:// or https:// URL")
            if url in seen:
                raise FleetConfigError(f"{display_url(url)} is listed twice in --vllm-url")
            seen.add(url)
            out.append((url, weight))
    return out


def read_key_file(path: str) -> tuple[str | None, dict[str, str]]:
    """An API key file: a line ``KEY`` (every server) and/or lines ``URL KEY`` (that server).

    Blank lines and lines starting with ``#`` are ignored. Returns (default key, {normalised URL: key}).
    """
    try:
        lines = read_secret_lines(path, "the API key", "--api_key_file / OLMOCR_API_KEYS_FILE")
    except SecretFileError as exc:
        raise FleetConfigError(str(exc)) from None
    default: str | None = None
    per_server: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            default = parts[0]
        elif len(parts) == 2 and "://" in parts[0]:
            per_server[normalize_base_url(parts[0])] = parts[1]
        else:  # never echo the line: it holds a key
            raise FleetConfigError(f"{path} line {number}: expected 'KEY' or 'URL KEY'")
    return default, per_server


def server_specs(urls: Sequence[tuple[str, float | None]], default_key: str | None = None,
                 key_file: str | None = None) -> list[ServerSpec]:
    """Attach API keys: a key file's per-server line, else its default line, else ``default_key``."""
    file_default, per_server = read_key_file(key_file) if key_file else (None, {})
    listed = {u for u, _ in urls}
    unknown = [u for u in per_server if u not in listed]
    if unknown:
        raise FleetConfigError(f"the API key file names servers not in --vllm-url: "
                               f"{', '.join(display_url(u) for u in unknown)}")
    return [ServerSpec(url, weight, per_server.get(url) or file_default or default_key) for url, weight in urls]
