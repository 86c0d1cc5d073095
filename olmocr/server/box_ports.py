"""The box's ports: server i on ``OLMOCR_PORT + i``, the status service on ``OLMOCR_STATUS_PORT``.

The status service has one fixed default port (``envs.DEFAULT_STATUS_PORT``, below the servers' range), the
same on a box with one GPU or eight, so the Dockerfile's health check, Prometheus' status job, the Kubernetes
manifests and the docs name one port that is always the status service. A status port inside the servers'
range is refused in one line; a taken one is named with its owner. The manager and supervisord (through the
RPC extension, before it starts any program) both check it here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from olmocr import envs
from olmocr.port_owner import port_problem
from olmocr.server.errors import SettingsError
from olmocr.server.gpus import ServerSlot

STATUS_PORT_FIX = "stop that program or choose another port with OLMOCR_STATUS_PORT"


def status_address(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(host, port) the status service listens on; SettingsError for a value that is not a number."""
    try:
        return str(envs.value("OLMOCR_STATUS_HOST", env)), int(envs.value("OLMOCR_STATUS_PORT", env))
    except envs.SettingValueError as exc:
        raise SettingsError(str(exc)) from None


def status_url(env: Mapping[str, str] | None = None) -> str:
    """The status service's address as a client on this machine reaches it."""
    host, port = status_address(env)
    client = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{client}:{port}"


def check_status_port(port: int, slots: Sequence[ServerSlot]) -> None:
    """SettingsError (one line) when the status port is one of the servers' ports."""
    ports = [slot.port for slot in slots]
    if port in ports:
        span = f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else str(ports[0])
        raise SettingsError(f"OLMOCR_STATUS_PORT={port} is a vLLM server's port (the servers use {span}): unset it "
                            f"(default {envs.DEFAULT_STATUS_PORT}) or choose a port outside the servers' range")


def status_port_problem(slots: Sequence[ServerSlot], env: Mapping[str, str] | None = None) -> str | None:
    """One line when the status service cannot have its port (inside the servers' range, or taken, with its
    owner); None when it can."""
    host, port = status_address(env)
    check_status_port(port, slots)
    return port_problem(host, port, "the status service", STATUS_PORT_FIX)
