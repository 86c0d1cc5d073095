"""Membership of the servers behind a ``dns+http://NAME:PORT`` name: the pure decisions row by row (which
addresses join, are verified again, leave; when a joiner is still left out; how long a drain waits), then
the class against real stand-ins on loopback addresses, resolved through a hosts-format file of the test's
own (the OLMOCR_HOSTS_FILE resolver: /etc/hosts is never touched)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from olmocr.pipeline.servers.balance import ServerState
from olmocr.pipeline.servers.discovery import hosts_file_resolver
from olmocr.pipeline.servers.fleet import Fleet
from olmocr.pipeline.servers.membership import (
    DRAIN_GRACE_S,
    Change,
    drain_grace_s,
    join_verdict,
    plan_change,
)
from olmocr.pipeline.servers.serverlist import DnsName
from tests.pipeline_helpers import Standins
from tests.standin_helpers import VLLM_FLAGS, free_port, loopback_alias_works

# ------------------------------------------------------------------------------------------ pure


@pytest.mark.parametrize("members, draining, resolved, change", [
    (["a", "b"], set(), ["b", "a"], Change()),  # the same addresses in another order: nothing moves
    ([], set(), ["c", "a", "b"], Change(join=("c", "a", "b"))),  # the first answer, in the resolver's order
    (["a"], set(), ["a", "b"], Change(join=("b",))),
    (["a", "b"], set(), ["b"], Change(leave=("a",))),
    (["a", "b"], set(), ["b", "c"], Change(join=("c",), leave=("a",))),
    (["a", "b"], set(), [], Change(leave=("a", "b"))),  # the name has no address left: every server drains
    (["b"], {"a"}, ["a", "b"], Change(recheck=("a",))),  # back before its server finished draining
    (["b"], {"a"}, ["b"], Change()),  # still gone: it goes on draining
    (["b"], {"a"}, ["a", "c"], Change(join=("c",), recheck=("a",), leave=("b",))),
    ([], set(), ["a", "a", "b"], Change(join=("a", "b"))),  # a resolver that repeats an address: one server
])
def test_which_addresses_join_are_checked_again_or_leave(members: list[str], draining: set[str],
                                                          resolved: list[str], change: Change) -> None:
    assert plan_change(members, draining, resolved) == change


@pytest.mark.parametrize("max_tokens, planned, left_out", [
    (8000, None, False),  # the run has not fixed max_tokens yet (start-up): any room is enough
    (600, None, False),
    (8000, 8000, False),
    (9000, 8000, False),
    (7999, 8000, True),  # every page request would be refused (400)
])
def test_a_verified_joiner_is_left_out_when_its_context_is_smaller_than_the_run_s(
        max_tokens: int, planned: int | None, left_out: bool) -> None:
    reason = join_verdict(max_tokens, planned)
    assert (reason is not None) is left_out
    if reason is not None:
        assert f"max_tokens {max_tokens}" in reason and f"this run's {planned}" in reason


@pytest.mark.parametrize("request_timeout, grace", [(600.0, DRAIN_GRACE_S), (30.0, 30.0), (DRAIN_GRACE_S, DRAIN_GRACE_S)])
def test_a_drain_waits_for_the_shorter_of_its_grace_and_the_request_timeout(request_timeout: float,
                                                                            grace: float) -> None:
    assert drain_grace_s(request_timeout) == grace


# ------------------------------------------------------------------------------------------ real servers


@pytest.mark.integration
def test_a_name_s_servers_join_verified_leave_drained_and_come_back(tmp_path: Path, standins: Standins) -> None:
    assert loopback_alias_works(), "127.0.0.2 is not usable here (Linux routes all of 127.0.0.0/8 to lo)"
    port = free_port()
    models = {"127.0.0.2": "olmocr", "127.0.0.3": "some-other-model", "127.0.0.4": "olmocr"}
    # .4's context (9000) allows fewer answer tokens than the run fixed at start-up with .2 (8000).
    contexts = {"127.0.0.4": ("--max-model-len", "9000")}
    url = {address: standins(host=address, port=port, served_model_name=model,
                             extra_args=(*VLLM_FLAGS, *contexts.get(address, ()))).url
           for address, model in models.items()}
    hosts = tmp_path / "hosts"

    def publish(*addresses: str) -> None:
        tmp = hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{a} olmocr-vllm.test\n" for a in addresses))
        os.replace(tmp, hosts)

    asyncio.run(_membership_run(hosts, port, url, publish))


async def _membership_run(hosts: Path, port: int, url: dict[str, str], publish) -> None:  # noqa: ANN001
    publish("127.0.0.2")
    fleet = Fleet([], dns=[DnsName("http", "olmocr-vllm.test", (port,))], resolver=hosts_file_resolver(str(hosts)),
                  dns_refresh_s=30)  # the test refreshes by hand
    membership = fleet.membership
    assert membership is not None
    joined = []
    fleet.on_new_server = joined.append
    try:
        await fleet.start(max_wait_s=10)
        fleet.request_plan()
        by_url = {s.url: s for s in fleet.servers}
        assert by_url[url["127.0.0.2"]].state == ServerState.UP
        assert joined == [by_url[url["127.0.0.2"]]]  # the metrics hook sees every server a name brings

        async def settled() -> None:  # the joiners' verification is done
            for _ in range(200):
                if not any(s.state == ServerState.STARTING for s in fleet.servers):
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"still verifying: {[(s.url, s.state, s.reason) for s in fleet.servers]}")

        # A new address that serves another model: verified, and left out before it gets any work.
        publish("127.0.0.2", "127.0.0.3")
        await membership.refresh()
        wrong = next(s for s in fleet.servers if s.url == url["127.0.0.3"])
        assert joined[1:] == [wrong]
        await settled()
        assert wrong.state == ServerState.EXCLUDED, (wrong.state, wrong.reason)
        assert "some-other-model" in wrong.reason

        # A new address of the right model whose context is too small for this run's max_tokens: left out too.
        publish("127.0.0.2", "127.0.0.3", "127.0.0.4")
        await membership.refresh()
        await settled()
        small = next(s for s in fleet.servers if s.url == url["127.0.0.4"])
        assert small.state == ServerState.EXCLUDED and "less than this run's 8000" in small.reason, small.reason
        assert small not in fleet.max_tokens

        # The right server's address leaves the name: drained (nothing in flight), retired, out of the fleet.
        first = by_url[url["127.0.0.2"]]
        publish("127.0.0.3", "127.0.0.4")
        await membership.refresh()
        for _ in range(100):
            if first in fleet.retired:
                break
            await asyncio.sleep(0.05)
        assert first in fleet.retired and first not in fleet.servers and first.state == ServerState.DRAINING

        # It comes back: a new server, verified again, then in rotation.
        publish("127.0.0.2", "127.0.0.3", "127.0.0.4")
        await membership.refresh()
        back = next(s for s in fleet.servers if s.url == url["127.0.0.2"])
        assert back is not first and back.state == ServerState.STARTING
        await settled()
        assert back.state == ServerState.UP and back in fleet.max_tokens
    finally:
        await fleet.close()
