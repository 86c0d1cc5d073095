"""The server list of a pipeline: ``--vllm-url`` values (repeated or comma-separated, optional weights) and
the API key of each server (environment or key file; never a command line shown in ``ps``). Pure functions.

Besides plain URLs a value may name many servers at once:

- a port range, ``http://gpu-a:30024-30031``: one server per port (a box with one server per GPU);
- a DNS name, ``dns+http://olmocr-vllm.ns.svc:30024``: every A/AAAA record of the name is a server (a
  Kubernetes headless Service, Consul, ``/etc/hosts``), re-resolved while the pipeline runs
  (olmocr/pipeline/servers/discovery.py). It may carry a port range too.

All forms mix, and ``#weight=N`` applies to every server a value names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from olmocr.pipeline.errors import FleetConfigError
from olmocr.pipeline.servers.client import display_url, normalize_base_url, url_problem
from olmocr.secret_files import SecretFileError, read_secret_lines

#: Environment variable holding the server list when no ``--vllm-url`` is given.
URL_ENV = "OLMOCR_VLLM_URL"


@dataclass(frozen=True)
class ServerSpec:
    """One server as configured: normalised URL, optional fixed weight, its API key (never printed)."""

    url: str
    weight: float | None = None
    api_key: str | None = field(default=None, repr=False)


DNS_PREFIX = "dns+"
#: The most servers one port range may name (a typo like 30024-40024 is refused, not 10 000 servers).
MAX_PORT_RANGE = 256
_PORT_RANGE = re.compile(r"^(?P<scheme>https?)://(?P<host>\[[^\]]+\]|[^/:\[\]]+):(?P<first>\d+)-(?P<last>\d+)$")


@dataclass(frozen=True)
class DnsName:
    """``dns+http://name:port``: every address the name resolves to is a server on ``ports``."""

    scheme: str
    host: str
    ports: tuple[int, ...]
    weight: float | None = None
    api_key: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        ports = str(self.ports[0]) if len(self.ports) == 1 else f"{self.ports[0]}-{self.ports[-1]}"
        return f"{DNS_PREFIX}{self.scheme}://{self.host}:{ports}"


def expand_port_range(url: str) -> list[str]:
    """``http://h:P-Q`` -> ``[http://h:P, ..., http://h:Q]``; any other URL -> ``[url]``."""
    match = _PORT_RANGE.match(url)
    if match is None:
        return [url]
    first, last = int(match["first"]), int(match["last"])
    if not 0 < first <= last < 65536:
        raise FleetConfigError(f"{display_url(url)}: a port range is FIRST-LAST with 1 <= FIRST <= LAST <= 65535")
    if last - first + 1 > MAX_PORT_RANGE:
        raise FleetConfigError(f"{display_url(url)}: {last - first + 1} ports; a range names at most "
                               f"{MAX_PORT_RANGE} servers")
    return [f"{match['scheme']}://{match['host']}:{port}" for port in range(first, last + 1)]


def _parse_weight(raw: str, fragment: str) -> float | None:
    if not fragment:
        return None
    key, _, num = fragment.partition("=")
    try:
        weight: float | None = float(num)
    except ValueError:
        weight = None
    if key != "weight" or weight is None or not weight > 0:
        raise FleetConfigError(f"{display_url(raw)}: the only URL fragment understood is "
                               "'#weight=N' with N > 0")
    return weight


def _raw_values(values: Iterable[str]) -> Iterable[str]:
    for value in values:
        for raw in value.split(","):
            raw = raw.strip()
            if raw:
                yield raw


def parse_dns_names(values: Iterable[str]) -> list[DnsName]:
    """The ``dns+http(s)://name:port[-port][#weight=N]`` values of ``--vllm-url``."""
    out: list[DnsName] = []
    for raw in _raw_values(values):
        if not raw.startswith(DNS_PREFIX):
            continue
        url, _, fragment = raw[len(DNS_PREFIX):].partition("#")
        weight = _parse_weight(raw, fragment)
        url = normalize_base_url(url)
        if not url.startswith(("http://", "https://")):
            raise FleetConfigError(f"{display_url(raw)}: write dns+http://NAME:PORT or dns+https://NAME:PORT")
        scheme, _, rest = url.partition("://")
        host, sep, port = rest.rpartition(":")
        if not sep or "/" in rest or not host or "@" in host:
            raise FleetConfigError(f"{display_url(raw)}: write dns+http://NAME:PORT (the port is required: "
                                   "every address of NAME is a server on it)")
        ports = [int(u.rpartition(":")[2]) for u in expand_port_range(f"{scheme}://{host}:{port}")
                 if u.rpartition(":")[2].isdigit()]
        if not ports:
            raise FleetConfigError(f"{display_url(raw)}: {port!r} is not a port or a port range")
        name = DnsName(scheme, host.strip("[]"), tuple(ports), weight)
        if any(d.label == name.label for d in out):
            raise FleetConfigError(f"{name.label} is listed twice in --vllm-url")
        out.append(name)
    return out


def parse_url_list(values: Iterable[str]) -> list[tuple[str, float | None]]:
    """``--vllm-url`` values (each may be a comma-separated list) as ``(normalised URL, weight)``; port
    ranges give one URL per port, ``dns+`` names are left to :func:`parse_dns_names`.

    A weight is written as a URL fragment, ``http://gpu1:30024#weight=2`` (fragments are never sent).
    """
    out: list[tuple[str, float | None]] = []
    seen: set[str] = set()
    for raw in _raw_values(values):
        if raw.startswith(DNS_PREFIX):
            continue
        base, _, fragment = raw.partition("#")
        weight = _parse_weight(raw, fragment)
        urls = expand_port_range(normalize_base_url(base))
        # A port range is checked by its expansion; anything else as the user wrote it (before "http://"
        # is added to a bare "host:port", an empty "http://" would become the host "http").
        if len(urls) == 1 and (problem := url_problem(base)) is not None:
            raise FleetConfigError(f"--vllm-url {display_url(base.strip())}: {problem}")
        for url in urls:
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


def dns_with_keys(names: Sequence[DnsName], default_key: str | None = None,
                  key_file: str | None = None) -> list[DnsName]:
    """A DNS name's servers use the key file's default line, else ``default_key`` (addresses are not
    known in advance, so per-server lines cannot name them)."""
    file_default, _ = read_key_file(key_file) if key_file else (None, {})
    return [DnsName(n.scheme, n.host, n.ports, n.weight, file_default or default_key) for n in names]
