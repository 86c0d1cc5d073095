"""``dns+http://NAME:PORT``: every address NAME resolves to is a server, re-resolved while the run lasts.

This is how a Kubernetes headless Service (one A/AAAA record per ready pod), Consul's DNS interface or a
plain ``/etc/hosts`` line with several addresses describe a fleet. This module resolves a name;
:class:`~olmocr.pipeline.servers.membership.Membership` does it at start-up and every ``OLMOCR_DNS_REFRESH_S``
seconds (default 10, at most 30) and acts on the answer: a new address is verified before it gets work, a
vanished one is drained, then retired.

A failed lookup (resolver unreachable, timeout) keeps the servers as they are: a DNS blip must not drain a
healthy fleet. Only an answer that the name has no address (``EAI_NONAME``/``EAI_NODATA``) empties it.

Resolution is the operating system's (``getaddrinfo``, as ``curl`` or a browser resolves: ``/etc/hosts``,
then DNS as ``/etc/nsswitch.conf`` says), so any name the machine can resolve works. ``OLMOCR_HOSTS_FILE``
replaces it with a hosts-format file read at every refresh. That exists for tests: they need several
loopback addresses behind one name, added and removed mid-run, and must not edit ``/etc/hosts`` or the
machine's resolver configuration. We chose it over a DNS server on loopback because the system resolver
cannot be pointed at such a server without editing ``/etc/resolv.conf``: the test would then exercise a
different resolver than users run, not the same one with another source. Everything after the lookup
(which servers are added, verified, drained) is the same code either way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence

from olmocr import envs
from olmocr.pipeline.errors import FleetConfigError, PipelineError
from olmocr.pipeline.servers.serverlist import DnsName

HOSTS_FILE_ENV = "OLMOCR_HOSTS_FILE"
REFRESH_ENV = "OLMOCR_DNS_REFRESH_S"
DEFAULT_REFRESH_S = float(envs.default(REFRESH_ENV))  # type: ignore[arg-type]
MAX_REFRESH_S = 30.0

#: ``await resolve(host)`` -> the addresses, in the resolver's order; raises LookupFailed to keep the
#: current servers.
Resolver = Callable[[str], Awaitable[list[str]]]


class LookupFailed(PipelineError):
    """The resolver could not answer (not: the name has no address)."""


def refresh_interval(env: Mapping[str, str] | None = None) -> float:
    """``OLMOCR_DNS_REFRESH_S`` from the registry (its one default and parser), within (0, MAX_REFRESH_S]."""
    try:
        value = float(envs.value(REFRESH_ENV, env))  # type: ignore[arg-type]
    except envs.SettingValueError as exc:
        raise FleetConfigError(str(exc)) from None
    if not 0 < value <= MAX_REFRESH_S:
        raise FleetConfigError(f"{REFRESH_ENV}={value:g}: DNS names are re-resolved every 0 < s <= {MAX_REFRESH_S:g} s")
    return value


def parse_hosts(text: str) -> dict[str, list[str]]:
    """``/etc/hosts`` format: ``ADDRESS NAME [ALIAS...]`` per line, ``#`` comments; a name on several lines
    has every address, in file order (pure)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            addresses = out.setdefault(name.lower(), [])
            if address not in addresses:
                addresses.append(address)
    return out


def hosts_file_resolver(path: str) -> Resolver:
    async def resolve(host: str) -> list[str]:
        try:
            text = await asyncio.to_thread(_read, path)
        except OSError as exc:
            raise LookupFailed(f"cannot read {HOSTS_FILE_ENV} {path}: {exc.strerror}") from None
        return parse_hosts(text).get(host.lower(), [])

    return resolve


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def name_has_no_address(exc: socket.gaierror) -> bool:
    """An authoritative "no such name / no address" (drain its servers), not a failed lookup (keep them)."""
    return exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))


async def system_resolve(host: str) -> list[str]:
    """Every A/AAAA address of ``host`` through the system resolver, in its order, without duplicates."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if name_has_no_address(exc):
            return []
        raise LookupFailed(f"cannot resolve {host}: {exc.strerror or exc}") from None
    out: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in out:
            out.append(address)
    return out


def default_resolver(env: Mapping[str, str] | None = None) -> Resolver:
    env = os.environ if env is None else env
    path = envs.text(HOSTS_FILE_ENV, env)
    return hosts_file_resolver(path) if path else system_resolve


def server_urls(name: DnsName, addresses: Sequence[str]) -> list[str]:
    """One URL per address and port (IPv6 in brackets), in resolver order (pure)."""
    out = []
    for address in addresses:
        host = f"[{address}]" if ":" in address else address
        out += [f"{name.scheme}://{host}:{port}{name.path}" for port in name.ports]
    return out

