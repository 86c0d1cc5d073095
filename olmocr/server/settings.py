"""Deployment settings shared by the wrapper, the health listener, the RPC extension and the manager.

Everything is read from ``OLMOCR_*`` environment variables (declared in :mod:`olmocr.envs`) so that ``supervisord -c supervisord.conf``
can be configured without editing the file: supervisord passes its own environment to every program
and to the RPC extension it loads, so one exported variable reaches all parts.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields

from olmocr import envs
from olmocr.secret_files import SecretFileError, read_secret_file
from olmocr.server.errors import SettingsError
from olmocr.server.gpus import ServerSlot, detect_gpus, parse_gpus, plan_servers

DEFAULT_MODEL = envs.DEFAULT_MODEL
SERVED_MODEL_NAME = envs.SERVED_MODEL_NAME
PROGRAM_NAME = "vllm"
#: supervisord's program name of the status service (supervisor_config.py).
STATUS_PROGRAM = "olmocr-status"


def _d(name: str) -> object:
    return envs.default(name)


@dataclass(frozen=True)
class ServerSettings:
    """The server's settings; each field is one ``OLMOCR_*`` variable declared in :mod:`olmocr.envs`."""

    model: str = _d("OLMOCR_MODEL")
    port: int = _d("OLMOCR_PORT")
    host: str = _d("OLMOCR_HOST")
    tensor_parallel_size: int = _d("OLMOCR_TENSOR_PARALLEL_SIZE")
    data_parallel_size: int = _d("OLMOCR_DATA_PARALLEL_SIZE")
    gpu_memory_utilization: float | None = _d("OLMOCR_GPU_MEMORY_UTILIZATION")
    max_model_len: int = _d("OLMOCR_MAX_MODEL_LEN")
    # "priority": vLLM schedules waiting requests by their ``priority`` field (pipeline --priority).
    scheduling_policy: str = _d("OLMOCR_SCHEDULING_POLICY")
    vllm_bin: str = _d("OLMOCR_VLLM_BIN")
    extra_vllm_args: tuple[str, ...] = _d("OLMOCR_VLLM_ARGS")
    api_key_file: str | None = _d("OLMOCR_API_KEY_FILE")
    restart_delay: float = _d("OLMOCR_RESTART_DELAY")
    max_restart_attempts: int = _d("OLMOCR_MAX_RESTART_ATTEMPTS")
    # A run that lasted this long resets the consecutive-restart count (as Kubernetes resets its
    # crash-loop back-off after 10 minutes of running).
    restart_reset_after: float = _d("OLMOCR_RESTART_RESET_AFTER")
    # Health probing (Kubernetes-style): see docs/operations.md, "Health checks".
    health_interval: float = _d("OLMOCR_HEALTH_INTERVAL")
    health_timeout: float = _d("OLMOCR_HEALTH_TIMEOUT")
    completion_timeout: float = _d("OLMOCR_HEALTH_COMPLETION_TIMEOUT")
    failure_threshold: int = _d("OLMOCR_HEALTH_FAILURE_THRESHOLD")
    success_threshold: int = _d("OLMOCR_HEALTH_SUCCESS_THRESHOLD")
    startup_timeout: float = _d("OLMOCR_HEALTH_STARTUP_TIMEOUT")
    kill_grace: float = _d("OLMOCR_HEALTH_KILL_GRACE")
    # Planned stops: vLLM drains requests for this long before aborting them (olmocr/server/drain.py).
    shutdown_timeout: int = _d("OLMOCR_SHUTDOWN_TIMEOUT")
    # vLLM writes its ZeroMQ sockets and other scratch files into $TMPDIR and leaves them behind: the
    # deployment points it at a directory it owns (supervisord.conf sets <run>/vllm-tmp). Unset: $TMPDIR.
    vllm_tmpdir: str | None = _d("OLMOCR_VLLM_TMPDIR")
    # Which GPUs the box serves on: "all", a count or a list (olmocr/server/gpus.py); one server per
    # tensor_parallel_size x data_parallel_size of them, on consecutive ports from ``port``.
    gpus: str = _d("OLMOCR_GPUS")
    # 1: vLLM may listen beyond loopback without an API key (a firewalled network; olmocr/endpoints.py).
    trusted_network: int = _d("OLMOCR_TRUSTED_NETWORK")

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
        if self.trusted_network not in (0, 1):
            raise SettingsError(f"OLMOCR_TRUSTED_NETWORK={self.trusted_network} must be 0 or 1")
        if self.max_restart_attempts < 0 or self.restart_delay < 0:
            raise SettingsError("max restart attempts and restart delay must not be negative")


#: ``{field: OLMOCR_* variable}``, from the registry.
ENV_NAMES: dict[str, str] = envs.field_names(envs.SERVER)


def _parse(field_name: str, env_name: str, raw: str) -> object:
    try:
        return envs.parse(envs.get(env_name), raw)
    except envs.SettingValueError as exc:
        raise SettingsError(str(exc)) from None


def exposure_note(settings: ServerSettings, api_key: str | None) -> str | None:
    """The exposure policy (olmocr/endpoints.py) for this server and key: :class:`SettingsError` when it
    would listen beyond loopback without a key, the one line to log on a trusted network, else None."""
    from olmocr.endpoints import check_vllm_exposure

    return check_vllm_exposure(settings.host, bool(api_key), bool(settings.trusted_network))


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
            return read_secret_file(settings.api_key_file, "API key", "OLMOCR_API_KEY_FILE")
        except SecretFileError as exc:
            raise SettingsError(str(exc)) from None
    return None
