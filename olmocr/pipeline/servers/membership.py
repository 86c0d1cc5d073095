"""Which servers the run's ``dns+http://NAME:PORT`` names stand for, while the run lasts.

Every name is resolved at start-up and every ``OLMOCR_DNS_REFRESH_S`` seconds
(:mod:`olmocr.pipeline.servers.discovery` resolves; this module acts on the answer):

* a new address is a new server, verified (the start-up checks every server passes) before it gets work;
* an address that vanished is drained (no new requests; its in-flight ones may finish for up to
  ``DRAIN_GRACE_S`` or the request timeout, then are resent) and then retired;
* an address back before its server finished draining is the same server, verified again;
* a failed lookup keeps the name's servers as they are.

The decisions are pure functions (:func:`plan_change`, :func:`join_verdict`, :func:`drain_grace_s`);
:class:`Membership` does the I/O. The rotation itself (balancing, ejection, probes) is the fleet's
(:class:`~olmocr.pipeline.servers.fleet.Fleet`): membership reaches it only through :class:`Rotation`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from olmocr.pipeline import defaults
from olmocr.pipeline.errors import ServerNotReady
from olmocr.pipeline.servers.balance import Server, ServerState
from olmocr.pipeline.servers.discovery import DEFAULT_REFRESH_S, LookupFailed, Resolver, default_resolver, server_urls
from olmocr.pipeline.servers.serverlist import DnsName, Options

logger = logging.getLogger(__name__)

#: How long a drained server's in-flight requests may take before they are resent to the others.
DRAIN_GRACE_S = 120.0

# Log lines operators read (and tests match with tests.pipeline_helpers.logged): one home here.
LOG_VERIFYING = "%s: new server %s; verifying it before it gets work"
LOG_JOINED = "vLLM server %s joined the rotation (%d in rotation)"
LOG_DRAINING = "vLLM server %s: %s; draining it (no new requests, %d in flight finish or are resent)"
LOG_RETIRED = "vLLM server %s left the fleet (%d pages answered)"
LOG_LOOKUP_FAILED = "%s: %s; keeping its %d server(s) as they are"


# ---------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Change:
    """What one answer for a name changes; URLs in the resolver's order."""

    join: tuple[str, ...] = ()  # new addresses: a new server each, verified before it gets work
    recheck: tuple[str, ...] = ()  # back while their server still drains: that server, verified again
    leave: tuple[str, ...] = ()  # vanished: drained, then retired


def plan_change(members: Sequence[str], draining: Collection[str], resolved: Sequence[str]) -> Change:
    """Going from the name's ``members`` to the URLs it ``resolved`` to, given the URLs whose servers still
    drain (pure). A URL the resolver gives twice counts once."""
    before, now = set(members), set(resolved)
    arriving = [url for url in dict.fromkeys(resolved) if url not in before]
    return Change(join=tuple(url for url in arriving if url not in draining),
                  recheck=tuple(url for url in arriving if url in draining),
                  leave=tuple(url for url in members if url not in now))


def join_verdict(max_tokens: int, planned_max_tokens: int | None) -> str | None:
    """Why a server that passed its start-up checks mid-run is still left out, or None (pure). Once the run
    has fixed every page request's ``max_tokens``, a server whose context allows fewer would refuse them all."""
    if planned_max_tokens is not None and max_tokens < planned_max_tokens:
        return f"its context allows max_tokens {max_tokens}, less than this run's {planned_max_tokens}"
    return None


def drain_grace_s(request_timeout: float) -> float:
    """How long a drained server's in-flight requests may still finish before they are resent (pure)."""
    return min(DRAIN_GRACE_S, request_timeout)


# ---------------------------------------------------------------------------------------------- the I/O


class Rotation(Protocol):
    """What membership asks of the fleet."""

    servers: list[Server]
    planned_max_tokens: int | None  # None until the run fixes it

    def add_server(self, url: str, api_key: str | None, weight: float | None, options: Options) -> Server:
        """A new server in the fleet, not yet in rotation."""

    async def verify(self, server: Server, max_wait_s: float) -> int:
        """The start-up checks; the ``max_tokens`` its context allows. Raises :class:`ServerNotReady`."""

    def admit_verified(self, server: Server, max_tokens: int, why: str) -> None:
        """Into rotation."""

    def leave_out(self, server: Server, reason: str) -> None:
        """Out for the run, with a logged reason."""

    def stop_probing(self, server: Server) -> None:
        """No more background probes (it was out of rotation)."""

    def retire(self, server: Server) -> None:
        """Out of the fleet; kept for the run's per-server stats."""


class Membership:
    """The servers behind the run's ``dns+`` names, kept in step with what the names resolve to."""

    def __init__(self, rotation: Rotation, names: Sequence[DnsName], *, resolver: Resolver | None = None,
                 refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self.rotation = rotation
        self.names = tuple(names)
        self.resolver = resolver or default_resolver()
        self.refresh_s = refresh_s
        self._members: dict[str, dict[str, Server]] = {n.label: {} for n in self.names}  # name -> url -> server
        self._joining: dict[Server, asyncio.Task[None]] = {}
        self._draining: dict[Server, asyncio.Task[None]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._max_wait_s = defaults.SERVER_READY_TIMEOUT_S

    async def start(self, max_wait_s: float) -> None:
        """Resolve every name once (the fleet's start-up verifies what they give, with its other servers), then
        every ``refresh_s``. Raises :class:`ServerNotReady` when the fleet has no server at all."""
        self._max_wait_s = max_wait_s
        await self.refresh(initial=True)
        self._refresher = asyncio.create_task(self._refresh_forever())
        if not self.rotation.servers:
            raise ServerNotReady("no vLLM server: " + "; ".join(f"{n.label} has no address" for n in self.names))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # never let discovery die: the next refresh tries again
                logger.exception("DNS discovery failed; trying again in %g s", self.refresh_s)

    async def refresh(self, *, initial: bool = False) -> None:
        """Resolve every name once and act on the answer (:func:`plan_change`)."""
        for name in self.names:
            members = self._members[name.label]
            try:
                addresses = await self.resolver(name.host)
            except LookupFailed as exc:
                logger.warning(LOG_LOOKUP_FAILED, name.label, exc, len(members))
                continue
            change = plan_change(list(members), {s.url for s in self._draining}, server_urls(name, addresses))
            for url in change.leave:
                self._drain(members.pop(url), f"its address left {name.label}")
            for url in change.recheck:
                server = members[url] = next(s for s in self._draining if s.url == url)
                self._draining.pop(server).cancel()
            for url in change.join:
                members[url] = self.rotation.add_server(url, name.api_key, name.weight, name.options)
            if not initial:  # at start-up the fleet verifies them with the others
                for server in (members[url] for url in (*change.recheck, *change.join)):
                    server.state, server.reason = ServerState.STARTING, f"new address of {name.label}, being verified"
                    logger.info(LOG_VERIFYING, name.label, server.url)
                    self._joining[server] = asyncio.create_task(self._join(server))

    async def _join(self, server: Server) -> None:
        try:
            max_tokens = await self.rotation.verify(server, self._max_wait_s)
        except ServerNotReady as exc:
            self.rotation.leave_out(server, str(exc))
            return
        finally:
            self._joining.pop(server, None)
        reason = join_verdict(max_tokens, self.rotation.planned_max_tokens)
        if reason is not None:
            self.rotation.leave_out(server, reason)
            return
        self.rotation.admit_verified(server, max_tokens, "verified")
        logger.info(LOG_JOINED, server.url, sum(1 for s in self.rotation.servers if s.state == ServerState.UP))

    def _drain(self, server: Server, reason: str) -> None:
        joining = self._joining.pop(server, None)
        if joining is not None:
            joining.cancel()
        self.rotation.stop_probing(server)
        server.state, server.reason = ServerState.DRAINING, reason
        logger.warning(LOG_DRAINING, server.url, reason, server.in_flight)
        self._draining[server] = asyncio.create_task(self._retire_when_idle(server))

    async def _retire_when_idle(self, server: Server) -> None:
        grace = drain_grace_s(server.client.request_timeout)
        deadline = time.monotonic() + grace
        while server.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if server.in_flight > 0:
            logger.warning("vLLM server %s: %d requests still in flight after draining %.0f s; resending them",
                           server.url, server.in_flight, grace)
            server.abandon_all()
            while server.in_flight > 0:
                await asyncio.sleep(0.05)
        self._draining.pop(server, None)
        self.rotation.retire(server)
        logger.info(LOG_RETIRED, server.url, server.pages)

    async def close(self) -> None:
        tasks = [*self._joining.values(), *self._draining.values()]
        if self._refresher is not None:
            tasks.append(self._refresher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
