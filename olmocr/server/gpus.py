"""Which GPUs a box serves on, and how they split into servers: ``OLMOCR_GPUS`` (manager ``--gpus``).

One vLLM server per GPU (or per run of ``tensor_parallel_size x data_parallel_size`` consecutive GPUs),
not one server with ``--data-parallel-size``: a hung engine then costs one GPU, not the box, and each API
server preprocesses its own images (docs/operations.md, "One box, many GPUs").

``OLMOCR_GPUS`` takes:

- ``all`` (the default): every GPU ``nvidia-smi -L`` lists, or exactly the devices ``CUDA_VISIBLE_DEVICES``
  names when it is set (Slurm, Kubernetes and ``docker --gpus`` set it; its entries are what a child
  process is given, so indices and ``GPU-<uuid>``/``MIG-<uuid>`` names both pass through). No GPU found:
  one server without ``CUDA_VISIBLE_DEVICES``, as on a CPU box;
- a count ``N``: the first N of those GPUs (an error if fewer are visible);
- a list ``0,1,3``: these device ids, as ``CUDA_VISIBLE_DEVICES`` takes them.

Server i listens on ``OLMOCR_PORT + i``. With one server the supervisord process keeps the name ``vllm``
(``supervisorctl status vllm`` as before); with several they are ``vllm:vllm-0``, ``vllm:vllm-1``, ...

The decisions are pure functions (tested row by row in tests/test_gpus.py); ``detect_gpus`` is the only
I/O (it runs ``nvidia-smi``).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from olmocr.server.errors import SettingsError

log = logging.getLogger(__name__)

GPUS_ENV = "OLMOCR_GPUS"
DEFAULT_GPUS = "all"
_NVIDIA_SMI_LINE = re.compile(r"^GPU (\d+):")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_/-]*$")


@dataclass(frozen=True)
class GpuRequest:
    """A parsed ``OLMOCR_GPUS``: exactly one of ``all``, ``count`` or ``devices``."""

    all: bool = False
    count: int | None = None
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerSlot:
    """One vLLM server of the box: its supervisord process name, port and GPUs."""

    index: int
    name: str  # supervisord process name: "vllm" alone, else "vllm-<index>"
    group: str  # supervisord group name ("vllm")
    port: int
    gpus: tuple[str, ...]  # () = no GPU found: CUDA_VISIBLE_DEVICES is left as inherited

    @property
    def rpc_name(self) -> str:
        """The name supervisord's XML-RPC takes: ``vllm`` alone, else ``vllm:vllm-<index>``."""
        return self.name if self.name == self.group else f"{self.group}:{self.name}"

    @property
    def cuda_visible_devices(self) -> str | None:
        return ",".join(self.gpus) if self.gpus else None

    def url(self, host: str) -> str:
        return f"http://{host}:{self.port}"


def parse_gpus(raw: str | None) -> GpuRequest:
    """``all`` | ``N`` | ``id,id,...``; one line naming the mistake otherwise."""
    value = (raw or DEFAULT_GPUS).strip()
    if value.lower() == "all":
        return GpuRequest(all=True)
    if value.isdigit():
        count = int(value)
        if count < 1:
            raise SettingsError(f"{GPUS_ENV}={raw!r}: a GPU count must be at least 1 (or 'all')")
        return GpuRequest(count=count)
    devices = tuple(part.strip() for part in value.split(","))
    if any(not part or not _DEVICE_ID.match(part) for part in devices):
        raise SettingsError(f"{GPUS_ENV}={raw!r} is not 'all', a count or a list of GPU ids like 0,1,3")
    duplicates = sorted({d for d in devices if devices.count(d) > 1})
    if duplicates:
        raise SettingsError(f"{GPUS_ENV}={raw!r} lists GPU {', '.join(duplicates)} twice")
    return GpuRequest(devices=devices)


def visible_gpus(nvidia_smi_output: str | None, cuda_visible_devices: str | None) -> tuple[str, ...]:
    """The GPUs a process may use: ``CUDA_VISIBLE_DEVICES`` when set (as CUDA reads it: up to the first
    empty or ``-1`` entry), else the indices ``nvidia-smi -L`` lists (None: no nvidia-smi)."""
    if cuda_visible_devices is not None:
        out: list[str] = []
        for part in cuda_visible_devices.split(","):
            part = part.strip()
            if not part or part.startswith("-"):
                break  # CUDA ignores this entry and everything after it
            out.append(part)
        return tuple(out)
    if not nvidia_smi_output:
        return ()
    return tuple(m.group(1) for line in nvidia_smi_output.splitlines()
                 if (m := _NVIDIA_SMI_LINE.match(line.strip())))


def choose_gpus(request: GpuRequest, visible: Sequence[str]) -> tuple[str, ...]:
    if request.all:
        return tuple(visible)
    if request.count is not None:
        if request.count > len(visible):
            raise SettingsError(f"{GPUS_ENV}={request.count} but only {len(visible)} GPU(s) are visible "
                                f"({', '.join(visible) or 'none'}): lower it or use 'all'")
        return tuple(visible[:request.count])
    return request.devices


def plan_servers(gpus: Sequence[str], gpus_per_server: int, base_port: int,
                 group: str = "vllm") -> list[ServerSlot]:
    """Runs of ``gpus_per_server`` consecutive GPUs, one server each, on consecutive ports from
    ``base_port``. No GPU: one server as on a CPU box."""
    if gpus_per_server < 1:
        raise SettingsError(f"GPUs per server must be at least 1, got {gpus_per_server}")
    if not gpus:
        return [ServerSlot(0, group, group, base_port, ())]
    if len(gpus) % gpus_per_server:
        raise SettingsError(f"{len(gpus)} GPU(s) ({','.join(gpus)}) do not split into servers of "
                            f"{gpus_per_server} (tensor x data parallel size): list a multiple of it in {GPUS_ENV}")
    count = len(gpus) // gpus_per_server
    if base_port + count - 1 > 65535:
        raise SettingsError(f"{count} servers from port {base_port} run past 65535: lower OLMOCR_PORT")
    return [ServerSlot(i, group if count == 1 else f"{group}-{i}", group, base_port + i,
                       tuple(gpus[i * gpus_per_server:(i + 1) * gpus_per_server]))
            for i in range(count)]


def run_nvidia_smi(timeout: float = 20.0) -> str | None:
    """``nvidia-smi -L`` output, or None when there is no nvidia-smi or it fails (no driver)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "-L"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi -L failed (%s): serving as if no GPU were present", exc)
        return None
    if done.returncode != 0:
        log.warning("nvidia-smi -L exited %d (%s): serving as if no GPU were present", done.returncode,
                    done.stderr.strip().splitlines()[-1:] or "")
        return None
    return done.stdout


def detect_gpus(request: GpuRequest, env: Mapping[str, str]) -> tuple[str, ...]:
    """The GPUs ``request`` names on this machine (runs nvidia-smi only when it has to)."""
    if request.devices:
        return request.devices
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    return choose_gpus(request, visible_gpus(None if cvd is not None else run_nvidia_smi(), cvd))


def port_range_url(host: str, slots: Sequence[ServerSlot]) -> str:
    """The single ``--vllm-url`` value that reaches every server: ``http://host:P`` or ``http://host:P-Q``."""
    first, last = slots[0].port, slots[-1].port
    return f"http://{host}:{first}" if first == last else f"http://{host}:{first}-{last}"
