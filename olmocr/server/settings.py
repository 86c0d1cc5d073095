"""Deployment settings shared by the wrapper, the health listener, the RPC extension and the manager.

Everything is read from ``OLMOCR_*`` environment variables so that ``supervisord -c supervisord.conf``
can be configured without editing the file: supervisord passes its own environment to every program
and to the RPC extension it loads, so one exported variable reaches all parts.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields

from olmocr.server.drain import DEFAULT_SHUTDOWN_TIMEOUT
from olmocr.server.errors import SettingsError
from olmocr.server.gpus import DEFAULT_GPUS, ServerSlot, detect_gpus, parse_gpus, plan_servers

DEFAULT_MODEL = "allenai/olmOCR-7B-0825-FP8"
SERVED_MODEL_NAME = "olmocr"
PROGRAM_NAME = "vllm"


@dataclass(frozen=True)
class ServerSettings:
    model: str = DEFAULT_MODEL
    port: int = 30024
    host: str = "127.0.0.1"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int = 16384
    # "priority": vLLM schedules waiting requests by their ``priority`` field (pipeline --priority).
    scheduling_policy: str = "fcfs"
    vllm_bin: str = "vllm"
    extra_vllm_args: tuple[str, ...] = ()
    api_key_file: str | None = None
    restart_delay: float = 10.0
    max_restart_attempts: int = 10
    # A run that lasted this long resets the consecutive-restart count (as Kubernetes resets its
    # crash-loop back-off after 10 minutes of running).
    restart_reset_after: float = 600.0
    # Health probing (Kubernetes-style): see docs/operations.md, "Health checks".
    health_interval: float = 10.0
    health_timeout: float = 5.0
    completion_timeout: float = 18.0
    failure_threshold: int = 3
    success_threshold: int = 1
    startup_timeout: float = 600.0
    kill_grace: float = 15.0
    # Planned stops: vLLM drains requests for this long before aborting them (olmocr/server/drain.py).
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT
    # vLLM writes its ZeroMQ sockets and other scratch files into $TMPDIR and leaves them behind: the
    # deployment points it at a directory it owns (supervisord.conf sets <run>/vllm-tmp). Unset: $TMPDIR.
    vllm_tmpdir: str | None = None
    # Which GPUs the box serves on: "all", a count or a list (olmocr/server/gpus.py); one server per
    # tensor_parallel_size x data_parallel_size of them, on consecutive ports from ``port``.
    gpus: str = DEFAULT_GPUS

    @property
    def client_host(self) -> str:
        """The address a client on this machine uses to reach the server."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def base_url(self) -> str:
        return f"http://{self.client_host}:{self.port}"

    def server_slots(self, env: Mapping[str, str] | None = None) -> list[ServerSlot]:
        """The box's servers: OLMOCR_GPUS resolved on this machine (may run nvidia-smi)."""
        env = os.environ if env is None else env
        gpus = detect_gpus(parse_gpus(self.gpus), env)
        return plan_servers(gpus, self.tensor_parallel_size * self.data_parallel_size, self.port)

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in another process."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "extra_vllm_args":
                value = shlex.join(value)
            env[ENV_NAMES[f.name]] = str(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ServerSettings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_NAMES[f.name]
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if not (0 < self.port < 65536):
            raise SettingsError(f"port {self.port} is out of range: use 1-65535 (OLMOCR_PORT / --port)")
        if self.gpu_memory_utilization is not None and not (0 < self.gpu_memory_utilization <= 1):
            raise SettingsError(
                f"gpu memory utilization {self.gpu_memory_utilization} must be in (0, 1]"
            )
        for name in ("tensor_parallel_size", "data_parallel_size", "max_model_len",
                     "failure_threshold", "success_threshold"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("health_interval", "health_timeout", "completion_timeout", "startup_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise SettingsError(f"OLMOCR_SHUTDOWN_TIMEOUT must not be negative, got {self.shutdown_timeout}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise SettingsError(f"scheduling policy {self.scheduling_policy!r} is not fcfs or priority "
                                "(OLMOCR_SCHEDULING_POLICY / --scheduling-policy)")
        parse_gpus(self.gpus)
        if self.max_restart_attempts < 0 or self.restart_delay < 0:
            raise SettingsError("max restart attempts and restart delay must not be negative")


ENV_NAMES: dict[str, str] = {
    "model": "OLMOCR_MODEL",
    "port": "OLMOCR_PORT",
    "host": "OLMOCR_HOST",
    "tensor_parallel_size": "OLMOCR_TENSOR_PARALLEL_SIZE",
    "data_parallel_size": "OLMOCR_DATA_PARALLEL_SIZE",
    "gpu_memory_utilization": "OLMOCR_GPU_MEMORY_UTILIZATION",
    "max_model_len": "OLMOCR_MAX_MODEL_LEN",
    "scheduling_policy": "OLMOCR_SCHEDULING_POLICY",
    "vllm_bin": "OLMOCR_VLLM_BIN",
    "extra_vllm_args": "OLMOCR_VLLM_ARGS",
    "api_key_file": "OLMOCR_API_KEY_FILE",
    "restart_delay": "OLMOCR_RESTART_DELAY",
    "max_restart_attempts": "OLMOCR_MAX_RESTART_ATTEMPTS",
    "restart_reset_after": "OLMOCR_RESTART_RESET_AFTER",
    "health_interval": "OLMOCR_HEALTH_INTERVAL",
    "health_timeout": "OLMOCR_HEALTH_TIMEOUT",
    "completion_timeout": "OLMOCR_HEALTH_COMPLETION_TIMEOUT",
    "failure_threshold": "OLMOCR_HEALTH_FAILURE_THRESHOLD",
    "success_threshold": "OLMOCR_HEALTH_SUCCESS_THRESHOLD",
    "startup_timeout": "OLMOCR_HEALTH_STARTUP_TIMEOUT",
    "kill_grace": "OLMOCR_HEALTH_KILL_GRACE",
    "shutdown_timeout": "OLMOCR_SHUTDOWN_TIMEOUT",
    "vllm_tmpdir": "OLMOCR_VLLM_TMPDIR",
    "gpus": "OLMOCR_GPUS",
}

_INT_FIELDS = {"port", "tensor_parallel_size", "data_parallel_size", "max_model_len",
               "max_restart_attempts", "failure_threshold", "success_threshold", "shutdown_timeout"}
_FLOAT_FIELDS = {"gpu_memory_utilization", "restart_delay", "restart_reset_after", "health_interval", "health_timeout",
                 "completion_timeout", "startup_timeout", "kill_grace"}


def _parse(field_name: str, env_name: str, raw: str) -> object:
    try:
        if field_name in _INT_FIELDS:
            return int(raw)
        if field_name in _FLOAT_FIELDS:
            return float(raw)
    except ValueError:
        kind = "an integer" if field_name in _INT_FIELDS else "a number"
        raise SettingsError(f"{env_name}={raw!r} is not {kind}; fix or unset it") from None
    if field_name == "extra_vllm_args":
        return tuple(shlex.split(raw))
    return raw


def read_api_key(settings: ServerSettings, env: Mapping[str, str] | None = None) -> str | None:
    """The API key from ``VLLM_API_KEY`` or from the file named by ``OLMOCR_API_KEY_FILE``.

    Never from a command line: arguments are visible to every user in ``ps``.
    """
    env = os.environ if env is None else env
    key = env.get("VLLM_API_KEY")
    if key:
        return key.strip()
    if settings.api_key_file:
        try:
            with open(settings.api_key_file, encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError as exc:
            raise SettingsError(
                f"cannot read API key file {settings.api_key_file}: {exc.strerror}; "
                "fix OLMOCR_API_KEY_FILE or its permissions"
            ) from None
    return None
