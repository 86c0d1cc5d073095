"""The project's own HTTP endpoints (status service, pipeline metrics): bind policy, bearer token, serving.

Policy (the same for every endpoint, vLLM's included): bind 127.0.0.1 unless the operator chooses another
address; an address beyond loopback requires a bearer token, read from the environment or a file (never a
command line: arguments are visible to every user in ``ps``), and every request must carry it as
``Authorization: Bearer <token>``. Without a token such an endpoint refuses to start. vLLM alone has an
explicit opt-out for a firewalled network (``OLMOCR_TRUSTED_NETWORK=1``), said in one line at every start
(:func:`check_vllm_exposure`).
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from olmocr.secret_files import SecretFileError, read_secret_file
from olmocr.server.errors import EndpointConfigError

if TYPE_CHECKING:  # aiohttp and prometheus_client are imported where they are used: the wrapper, which
    # supervisord runs at every start, needs only the policy
    from aiohttp import web
    from prometheus_client import CollectorRegistry

DEFAULT_HOST = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for 0.0.0.0, '' (all interfaces) and names."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so it counts as exposed


def read_token(env: Mapping[str, str], token_var: str, file_var: str, file_path: str | None = None) -> str | None:
    """The token from ``$token_var``, else from the file ``file_path`` or ``$file_var`` (stripped)."""
    token = (env.get(token_var) or "").strip()
    if token:
        return token
    path = file_path or env.get(file_var) or None
    if not path:
        return None
    try:
        return read_secret_file(path, "the token", file_var)
    except SecretFileError as exc:
        raise EndpointConfigError(str(exc)) from None


def check_exposure(what: str, host: str, token: str | None, token_var: str, file_var: str) -> None:
    """Refuse to serve beyond loopback without a token (raises :class:`EndpointConfigError`)."""
    if not is_loopback(host) and not token:
        raise EndpointConfigError(
            f"{what} would listen on {host or 'all interfaces'} without a token: set {token_var} or "
            f"{file_var} (a file holding the token) so clients must send 'Authorization: Bearer <token>', "
            f"or bind 127.0.0.1")


TRUSTED_NETWORK_VAR = "OLMOCR_TRUSTED_NETWORK"


def check_vllm_exposure(host: str, has_key: bool, trusted_network: bool) -> str | None:
    """vLLM under the same policy: beyond loopback without an API key it refuses to start
    (:class:`EndpointConfigError`), unless ``OLMOCR_TRUSTED_NETWORK=1`` says the network is firewalled; then
    the one line to log is returned. None: nothing to say (loopback, or a key)."""
    if is_loopback(host) or has_key:
        return None
    where = host or "all interfaces"
    if not trusted_network:
        raise EndpointConfigError(
            f"vLLM would listen on {where} without an API key: set OLMOCR_API_KEY_FILE (a file holding the key) "
            f"or VLLM_API_KEY so clients must send 'Authorization: Bearer <key>', bind 127.0.0.1, or set "
            f"{TRUSTED_NETWORK_VAR}=1 if only a firewalled network can reach {where}")
    return (f"vLLM listens on {where} without an API key: {TRUSTED_NETWORK_VAR}=1 says only a firewalled "
            "network reaches it")


def bearer_middleware(token: str | None, open_paths: frozenset[str] = frozenset()
                      ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware: 401 for any request without ``Authorization: Bearer <token>`` (if a token is set),
    except for ``open_paths`` (exact paths: health probes that answer one line, for the kubelet)."""
    from aiohttp import web

    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if expected is not None and request.path not in open_paths:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """The registry in Prometheus text format (prometheus_client writes it; we never hand-format)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_app(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on host:port in the running event loop; stop with ``await runner.cleanup()``.

    Raises :class:`EndpointConfigError` when the address cannot be bound (port in use, no such address).
    """
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        from olmocr.port_owner import port_owner

        owner = port_owner(port) if exc.errno == errno.EADDRINUSE else None
        raise EndpointConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                                  + (f" (held by {owner})" if owner else "")
                                  + "; choose another port or stop what uses it") from None
    return runner
