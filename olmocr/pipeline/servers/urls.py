"""Server URLs as the pipeline names them (pure): what is wrong with one as given, its normalised base URL,
where its OpenAI API lives, and how it is logged (without credentials). A module of its own so that the
pure server list (:mod:`olmocr.pipeline.servers.serverlist`) and the network client
(:mod:`olmocr.pipeline.servers.client`) share them without the first importing the second."""

from __future__ import annotations

from urllib.parse import urlsplit


def url_problem(url: str) -> str | None:
    """What is wrong with a server URL as given (no host, a port that is not a number 1-65535), or None."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else "http://" + text)
    if not parts.hostname:
        return "no host name (e.g. http://127.0.0.1:30024)"
    try:
        port = parts.port
    except ValueError:
        return f"the port is not a number 1-65535 ({parts.netloc.rpartition(':')[2]!r})"
    if port == 0:
        return "the port is not a number 1-65535 (0)"
    return None


def normalize_base_url(url: str) -> str:
    """The server's base URL as the fleet names it: no trailing ``/``, ``http://`` added to a bare
    ``host:port``, and a path of exactly ``/v1`` dropped (``http://h:p/v1`` is ``http://h:p``). Any other
    path is kept: ``https://host/v1/openai`` is a provider's API root (upstream's ``--server`` convention)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if slash and path == "v1":
        url = scheme + sep + host
    return url


def api_root(base_url: str) -> str:
    """Where the OpenAI API of a normalised base URL lives: its path, or ``/v1`` when it has none.

    ``http://h:30024`` -> ``/v1`` (``/v1/models``, ``/v1/chat/completions``); ``https://host/v1/openai`` ->
    ``/v1/openai`` (``/v1/openai/models``, ``/v1/openai/chat/completions``)."""
    rest = base_url.partition("://")[2]
    _, slash, path = rest.partition("/")
    return "/" + path.split("#", 1)[0] if slash and path else "/v1"


def display_url(url: str) -> str:
    """The URL as logged: without any ``user:password@`` part."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return scheme + sep + host.rpartition("@")[2] + slash + path
