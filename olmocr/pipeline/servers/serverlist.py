"""The server list of a pipeline: ``--vllm-url`` values (repeated or comma-separated, optional weights) and
the API key of each server (environment or key file; never a command line shown in ``ps``). Pure functions.

Besides plain URLs a value may name many servers at once:

- a port range, ``http://gpu-a:30024-30031``: one server per port (a box with one server per GPU);
- a DNS name, ``dns+http://olmocr-vllm.ns.svc:30024``: every A/AAAA record of the name is a server (a
  Kubernetes headless Service, Consul, ``/etc/hosts``), re-resolved while the pipeline runs
  (olmocr/pipeline/servers/discovery.py). It may carry a port range too.

All forms mix, and a URL may carry a path: ``https://host/v1/openai`` is a provider's API root
(``/v1/openai/models``, ``/v1/openai/chat/completions``); no path or ``/v1`` means ``/v1``.

The fragment (never sent) holds per-server settings, ``&``-separated, applying to every server a value names:
``#weight=2``, ``#model=NAME`` (the name the server serves the model under; default ``--model``, then
``olmocr``), ``#price_in=0.09&price_out=0.19`` (dollars per million input/output tokens), ``#rpm=60`` and
``#tpm=200000`` (requests and tokens per minute the server allows: the pipeline paces itself under them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from olmocr.pipeline.errors import FleetConfigError
from olmocr.pipeline.servers.urls import display_url, normalize_base_url, url_problem
from olmocr.secret_files import SecretFileError, read_secret_lines

#: Environment variable holding the server list when no ``--vllm-url`` is given.
URL_ENV = "OLMOCR_VLLM_URL"


@dataclass(frozen=True)
class Options:
    """Per-server settings from a URL's fragment (and the run's flags for what a fragment leaves out)."""

    model: str | None = None  # None: the run's --model, else 'olmocr'
    price_in: float | None = None  # dollars per million input (prompt) tokens
    price_out: float | None = None  # dollars per million output (completion) tokens
    rpm: float | None = None  # requests per minute the server allows
    tpm: float | None = None  # tokens per minute the server allows

    def over(self, defaults: Options) -> Options:
        """These options, with ``defaults`` for what they leave out."""
        return Options(*(mine if mine is not None else theirs for mine, theirs in
                         zip(self.astuple(), defaults.astuple(), strict=True)))

    def astuple(self) -> tuple[Any, ...]:
        return (self.model, self.price_in, self.price_out, self.rpm, self.tpm)


@dataclass(frozen=True)
class ServerSpec:
    """One server as configured: normalised URL, optional fixed weight, its API key (never printed)."""

    url: str
    weight: float | None = None
    api_key: str | None = field(default=None, repr=False)
    options: Options = Options()


DNS_PREFIX = "dns+"
#: The most servers one port range may name (a typo like 30024-40024 is refused, not 10 000 servers).
MAX_PORT_RANGE = 256
_PORT_RANGE = re.compile(r"^(?P<scheme>https?)://(?P<host>\[[^\]]+\]|[^/:\[\]]+):(?P<first>\d+)-(?P<last>\d+)"
                         r"(?P<path>/[^#]*)?$")


@dataclass(frozen=True)
class DnsName:
    """``dns+http://name:port``: every address the name resolves to is a server on ``ports``."""

    scheme: str
    host: str
    ports: tuple[int, ...]
    weight: float | None = None
    api_key: str | None = field(default=None, repr=False)
    path: str = ""  # the API root's path, e.g. /v1/openai ("" is /v1)
    options: Options = Options()

    @property
    def label(self) -> str:
        ports = str(self.ports[0]) if len(self.ports) == 1 else f"{self.ports[0]}-{self.ports[-1]}"
        return f"{DNS_PREFIX}{self.scheme}://{self.host}:{ports}{self.path}"


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
    return [f"{match['scheme']}://{match['host']}:{port}{match['path'] or ''}" for port in range(first, last + 1)]


#: Fragment keys that take a positive number, and what each means (for the error message).
_NUMBER_KEYS = {"weight": "a share", "price_in": "dollars per million input tokens",
                "price_out": "dollars per million output tokens", "rpm": "requests per minute",
                "tpm": "tokens per minute"}
FRAGMENT_HELP = "'#weight=N', '#model=NAME', '#price_in=D', '#price_out=D', '#rpm=N', '#tpm=N' (joined by '&')"


def parse_fragment(raw: str, fragment: str) -> tuple[float | None, Options]:
    """``weight=2&model=NAME&price_in=0.09`` -> (weight, Options); FleetConfigError naming what is wrong."""
    values: dict[str, Any] = {}
    for part in filter(None, fragment.split("&")):
        key, sep, value = part.partition("=")
        if key == "model":
            if not value:
                raise FleetConfigError(f"{display_url(raw)}: '#model=NAME' needs the name the server serves the "
                                       "model under")
            values["model"] = value
            continue
        try:
            number: float | None = float(value)
        except ValueError:
            number = None
        if key not in _NUMBER_KEYS or not sep:
            raise FleetConfigError(f"{display_url(raw)}: {part.split('=')[0]!r} is not understood in a URL "
                                   f"fragment; write {FRAGMENT_HELP}")
        if number is None or not number > 0 or number != number or number == float("inf"):
            raise FleetConfigError(f"{display_url(raw)}: '#{key}=N' needs a number N > 0 ({_NUMBER_KEYS[key]})")
        values[key] = number
    weight = values.pop("weight", None)
    return weight, Options(**values)


def _parse_weight(raw: str, fragment: str) -> float | None:
    return parse_fragment(raw, fragment)[0]


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
        weight, options = parse_fragment(raw, fragment)
        url = normalize_base_url(url)
        if not url.startswith(("http://", "https://")):
            raise FleetConfigError(f"{display_url(raw)}: write dns+http://NAME:PORT or dns+https://NAME:PORT")
        scheme, _, rest = url.partition("://")
        rest, slash, path = rest.partition("/")
        path = "/" + path if slash else ""
        host, sep, port = rest.rpartition(":")
        if not sep or "/" in rest or not host or "@" in host:
            raise FleetConfigError(f"{display_url(raw)}: write dns+http://NAME:PORT (the port is required: "
                                   "every address of NAME is a server on it)")
        ports = [int(u.rpartition(":")[2]) for u in expand_port_range(f"{scheme}://{host}:{port}")
                 if u.rpartition(":")[2].isdigit()]
        if not ports:
            raise FleetConfigError(f"{display_url(raw)}: {port!r} is not a port or a port range")
        name = DnsName(scheme, host.strip("[]"), tuple(ports), weight, path=path, options=options)
        if any(d.label == name.label for d in out):
            raise FleetConfigError(f"{name.label} is listed twice in --vllm-url")
        out.append(name)
    return out


def parse_url_list(values: Iterable[str]) -> list[tuple[str, float | None]]:
    """``(normalised URL, weight)`` of each server the values name (see :func:`parse_servers`)."""
    return [(url, weight) for url, weight, _ in parse_servers(values)]


def parse_url_options(values: Iterable[str]) -> dict[str, Options]:
    """{normalised URL: its fragment's options} for each server the values name."""
    return {url: options for url, _, options in parse_servers(values)}


def parse_servers(values: Iterable[str]) -> list[tuple[str, float | None, Options]]:
    """``--vllm-url`` values (each may be a comma-separated list) as ``(normalised URL, weight)``; port
    ranges give one URL per port, ``dns+`` names are left to :func:`parse_dns_names`.

    A weight is written as a URL fragment, ``http://gpu1:30024#weight=2`` (fragments are never sent).
    """
    out: list[tuple[str, float | None, Options]] = []
    seen: set[str] = set()
    for raw in _raw_values(values):
        if raw.startswith(DNS_PREFIX):
            continue
        base, _, fragment = raw.partition("#")
        weight, options = parse_fragment(raw, fragment)
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
            out.append((url, weight, options))
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
                 key_file: str | None = None, *, options: Mapping[str, Options] | None = None,
                 defaults: Options = Options()) -> list[ServerSpec]:
    """Attach API keys (a key file's per-server line, else its default line, else ``default_key``) and
    options (a URL's fragment, else ``defaults``: the run's flags)."""
    options = options or {}
    file_default, per_server = read_key_file(key_file) if key_file else (None, {})
    listed = {u for u, _ in urls}
    unknown = [u for u in per_server if u not in listed]
    if unknown:
        raise FleetConfigError(f"the API key file names servers not in --vllm-url: "
                               f"{', '.join(display_url(u) for u in unknown)}")
    return [ServerSpec(url, weight, per_server.get(url) or file_default or default_key,
                       options.get(url, Options()).over(defaults)) for url, weight in urls]


def dns_with_keys(names: Sequence[DnsName], default_key: str | None = None,
                  key_file: str | None = None, defaults: Options = Options()) -> list[DnsName]:
    """A DNS name's servers use the key file's default line, else ``default_key`` (addresses are not
    known in advance, so per-server lines cannot name them)."""
    file_default, _ = read_key_file(key_file) if key_file else (None, {})
    return [DnsName(n.scheme, n.host, n.ports, n.weight, file_default or default_key, n.path, n.options.over(defaults))
            for n in names]


def add_provider_arguments(group: Any) -> None:
    """The per-run defaults of the per-server options (a URL's fragment wins): hosted providers."""
    from olmocr.pipeline.flags import number

    group.add_argument("--price_in", type=number(0, low_open=True), default=None, metavar="DOLLARS",
                       help="price per million input tokens of every server without '#price_in=' (default: none); "
                            "the cost so far is in the progress line, the final line, --stats and /metrics")
    group.add_argument("--price_out", type=number(0, low_open=True), default=None, metavar="DOLLARS",
                       help="price per million output tokens of every server without '#price_out=' (default: none)")
    group.add_argument("--rpm", type=number(0, low_open=True), default=None, metavar="N",
                       help="requests per minute each server without '#rpm=' allows: requests are paced under it "
                            "(default: no pacing)")
    group.add_argument("--tpm", type=number(0, low_open=True), default=None, metavar="N",
                       help="tokens per minute each server without '#tpm=' allows: requests are paced under it "
                            "(default: no pacing)")
    group.add_argument("--max_cost", type=number(0, low_open=True), default=None, metavar="DOLLARS",
                       help="stop gracefully before the run's cost would exceed this (needs prices): work in "
                            "progress finishes, the rest stays queued, exit status 3")


def run_options(args: Any, internal: bool) -> Options:
    """The run's flags as the default options of every server: ``--model`` names the model of servers
    given with ``--vllm-url`` (in internal mode it is the model to serve, under the name ``olmocr``)."""
    return Options(model=None if internal else (args.model or None), price_in=args.price_in,
                   price_out=args.price_out, rpm=args.rpm, tpm=args.tpm)


def check_budget(max_cost: float | None, specs: Sequence[ServerSpec], dns: Sequence[DnsName]) -> None:
    """``--max_cost`` needs a price on some server: without one the cost stays 0 and the budget means nothing."""
    if max_cost is None:
        return
    options = [s.options for s in specs] + [n.options for n in dns]
    if not any(o.price_in or o.price_out for o in options):
        raise FleetConfigError("--max_cost needs prices: give --price_in/--price_out, or URL#price_in=D&price_out=D "
                               "for the servers that cost money")
