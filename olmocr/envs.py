"""Every ``OLMOCR_*`` environment variable, declared once: name, type, default and what it does.

vLLM's ``envs.py`` is the model. The settings classes (:class:`olmocr.server.settings.ServerSettings`,
:class:`olmocr.server.status_service.ServiceSettings`) take their variable names, types and defaults from
here, the pipeline reads its variables through :func:`value`, and the settings tables in
``docs/operations.md``, ``docs/observability.md`` and ``docs/pipeline.md`` are generated from it
(``python -m olmocr.envs --write-docs``; ``tests/test_envs.py`` fails when a table is stale, or when the
code names an ``OLMOCR_*`` variable that is not declared here).

Why not ``pydantic-settings``: the registry has to be read by processes that supervisord starts on every
restart (the wrapper, the listener) and it must render the docs tables; pydantic-settings brings pydantic
(import ~150 ms measured here vs ~1 ms for this module) and would still need the table generator and the
row-by-row parse errors ("OLMOCR_PORT='x' is not an integer; fix or unset it") written on top. A frozen
tuple of :class:`Setting` does both in one page.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from olmocr.errors import OlmocrError

#: The served model name every server is started with and every request asks for.
SERVED_MODEL_NAME = "olmocr"
DEFAULT_MODEL = "allenai/olmOCR-7B-0825-FP8"
DEFAULT_PORT = 30024
#: The status service's one port on every box, whatever its GPU count. Below ``DEFAULT_PORT``, so no server
#: range (``OLMOCR_PORT + i``, upwards) from the default port can reach it; not 30000 (SGLang's default, which
#: upstream olmOCR once used); below Linux's ephemeral range (32768+), so no outgoing connection takes it.
#: The Dockerfile, deploy/ and the docs name it; tests/test_status_port.py holds them to it.
DEFAULT_STATUS_PORT = 29999
#: olmocr-service (documents over HTTP): below the servers' block like the status port, so no server range
#: reaches it either.
DEFAULT_SERVICE_PORT = 29998
DEFAULT_MAX_MODEL_LEN = 16384
#: Seconds "connection refused" counts as "still loading" (vLLM opens its port only once the model is loaded).
DEFAULT_STARTUP_TIMEOUT_S = 600.0

#: Where a setting belongs; each gets its own table in the docs.
SERVER, STATUS, PIPELINE, STANDIN, SLURM = "server", "status", "pipeline", "standin", "slurm"
SERVICE = "service"


@dataclass(frozen=True)
class Setting:
    name: str
    type: type  # str, int, float; ``tuple`` = a shell-quoted list of words
    default: object
    doc: str
    component: str
    #: The attribute of the component's settings class that holds it (None: read where it is used).
    field: str | None = None
    #: Shown in the docs instead of the default (e.g. "(vLLM's)" for an omitted flag).
    shown_default: str | None = None
    #: A secret: never logged, never shown.
    secret: bool = False


def _s(name: str, type_: type, default: object, doc: str, component: str, field: str | None = None,
       **kwargs: object) -> Setting:
    return Setting(name, type_, default, doc, component, field, **kwargs)  # type: ignore[arg-type]


REGISTRY: tuple[Setting, ...] = (
    # ---- the server (wrapper, health listener, RPC extension, manager)
    _s("OLMOCR_MODEL", str, DEFAULT_MODEL, f"model path or Hugging Face id (served as `{SERVED_MODEL_NAME}`)",
       SERVER, "model"),
    _s("OLMOCR_GPUS", str, "all", "GPUs to serve on, one server each (or each run of tensor x data parallel size "
       "GPUs): `all` (every GPU `nvidia-smi -L` lists, or those `CUDA_VISIBLE_DEVICES` names; none: one server "
       "without GPU), a count `N`, or a list `0,1,3` (manager and internal mode: `--gpus`)", SERVER, "gpus"),
    _s("OLMOCR_PORT", int, DEFAULT_PORT, "port of the (first) server; server i of a box listens on "
       "`OLMOCR_PORT + i`", SERVER, "port"),
    _s("OLMOCR_HOST", str, "127.0.0.1", "bind address; any other than loopback needs an API key "
       "(`OLMOCR_API_KEY_FILE` or `VLLM_API_KEY`) or `OLMOCR_TRUSTED_NETWORK=1`", SERVER, "host"),
    _s("OLMOCR_TRUSTED_NETWORK", int, 0, "1: the network beyond loopback is firewalled, so vLLM may listen there "
       "without an API key (said in one line at every start); 0: such a server refuses to start", SERVER,
       "trusted_network"),
    _s("OLMOCR_TENSOR_PARALLEL_SIZE", int, 1, "vLLM `--tensor-parallel-size`", SERVER, "tensor_parallel_size"),
    _s("OLMOCR_DATA_PARALLEL_SIZE", int, 1, "vLLM `--data-parallel-size`", SERVER, "data_parallel_size"),
    _s("OLMOCR_GPU_MEMORY_UTILIZATION", float, None, "vLLM `--gpu-memory-utilization`; omitted unless set", SERVER,
       "gpu_memory_utilization", shown_default="(vLLM's)"),
    _s("OLMOCR_MAX_MODEL_LEN", int, DEFAULT_MAX_MODEL_LEN, "context length (`--max-model-len`)", SERVER,
       "max_model_len"),
    _s("OLMOCR_SCHEDULING_POLICY", str, "fcfs", "`fcfs` or `priority` (vLLM orders waiting requests by the "
       "pipeline's `--priority`)", SERVER, "scheduling_policy"),
    _s("OLMOCR_VLLM_BIN", str, "vllm", "the executable, invoked as `$BIN serve MODEL ...`", SERVER, "vllm_bin"),
    _s("OLMOCR_VLLM_ARGS", tuple, (), "extra vLLM flags, shell-quoted; they come last, so they override ours",
       SERVER, "extra_vllm_args", shown_default=""),
    _s("OLMOCR_API_KEY_FILE", str, None, "a file whose whole content is the API key for `/v1/*` (mode 0600; or "
       "`VLLM_API_KEY`); never on a command line. The pipeline reads it too, as the key for every server",
       SERVER, "api_key_file", shown_default=""),
    _s("OLMOCR_RESTART_DELAY", float, 10.0, "seconds between a crash and the next start (GPU memory release)",
       SERVER, "restart_delay"),
    _s("OLMOCR_MAX_RESTART_ATTEMPTS", int, 10, "restarts in a row before the server is left stopped", SERVER,
       "max_restart_attempts"),
    _s("OLMOCR_RESTART_RESET_AFTER", float, 600.0, "a run at least this long starts a new count (as Kubernetes' "
       "crash-loop back-off)", SERVER, "restart_reset_after"),
    _s("OLMOCR_HEALTH_INTERVAL", float, 10.0, "seconds between probe starts", SERVER, "health_interval"),
    _s("OLMOCR_HEALTH_TIMEOUT", float, 5.0, "timeout of `GET /health`, `/v1/models`, `/metrics`", SERVER,
       "health_timeout"),
    _s("OLMOCR_HEALTH_COMPLETION_TIMEOUT", float, 18.0, "timeout of the 1-token completion probe (a little under "
       "a multiple of 5 s: the listener reads results at supervisord's 5 s ticks, which run up to ~1 s late)",
       SERVER, "completion_timeout"),
    _s("OLMOCR_HEALTH_FAILURE_THRESHOLD", int, 3, "consecutive failed probes before the server is killed", SERVER,
       "failure_threshold"),
    _s("OLMOCR_HEALTH_SUCCESS_THRESHOLD", int, 1, "consecutive good probes to be healthy again", SERVER,
       "success_threshold"),
    _s("OLMOCR_HEALTH_STARTUP_TIMEOUT", float, DEFAULT_STARTUP_TIMEOUT_S, "how long \"connection refused\" means "
       "\"still loading\"", SERVER, "startup_timeout"),
    _s("OLMOCR_HEALTH_KILL_GRACE", float, 15.0, "SIGTERM → SIGKILL delay when the listener kills a server", SERVER,
       "kill_grace"),
    _s("OLMOCR_SHUTDOWN_TIMEOUT", int, 30, "seconds vLLM drains running requests on a planned stop "
       "(`--shutdown-timeout`; shortened to fit supervisord's `stopwaitsecs`)", SERVER, "shutdown_timeout"),
    _s("OLMOCR_VLLM_TMPDIR", str, None, "vLLM's `$TMPDIR` (ZeroMQ sockets, scratch files), emptied before each "
       "start; supervisord.conf sets `run/vllm-tmp`", SERVER, "vllm_tmpdir", shown_default="`$TMPDIR`"),
    _s("OLMOCR_VLLM_VERSION_CACHE", str, None, "where the wrapper keeps the version `OLMOCR_VLLM_BIN --version` "
       "answered, per executable path, mtime and size (vLLM's own console script is read from its package "
       "metadata instead); supervisord.conf sets `run/vllm-version.json`", SERVER,
       shown_default="`~/.cache/olmocr-serve/vllm-versions.json`"),
    _s("OLMOCR_SERVER_INDEX", str, None, "set by the deployment, not by operators: which server of the box "
       "a process is (olmocr/server/expansion.py)", SERVER, shown_default=""),
    _s("OLMOCR_PYTHON", str, None, "the Python that `scripts/` run (default: the checkout's `.venv`)", SERVER,
       shown_default="`.venv/bin/python`"),
    _s("OLMOCR_SUPERVISOR_URL", str, None, "`olmocr-server-status`: supervisord's `unix://` socket or `http://` "
       "address", SERVER, shown_default="`run/supervisor.sock`"),
    # ---- the status service
    _s("OLMOCR_STATUS_HOST", str, "127.0.0.1", "status service address; any other than loopback needs a token",
       STATUS, "host"),
    _s("OLMOCR_STATUS_PORT", int, DEFAULT_STATUS_PORT, "status service port, the same on every box however many "
       "servers it runs (below the servers' `OLMOCR_PORT + i`); a port inside the servers' range is refused",
       STATUS, "port"),
    _s("OLMOCR_STATUS_POLL_INTERVAL", float, 1.0, "seconds between readings of supervisord", STATUS,
       "poll_interval"),
    _s("OLMOCR_STATUS_PUSH_INTERVAL", float, 5.0, "WebSocket heartbeat: the state is pushed at least this often",
       STATUS, "push_interval"),
    _s("OLMOCR_STATUS_QUEUE_SIZE", int, 4, "messages waiting per WebSocket client before the oldest is dropped",
       STATUS, "queue_size"),
    _s("OLMOCR_STATUS_SEND_TIMEOUT", float, 10.0, "a WebSocket client that takes longer to accept one message is "
       "disconnected", STATUS, "send_timeout"),
    _s("OLMOCR_STATUS_TOKEN", str, None, "bearer token the status service requires (beyond loopback)", STATUS,
       secret=True, shown_default=""),
    _s("OLMOCR_STATUS_TOKEN_FILE", str, None, "a file holding that token", STATUS, shown_default=""),
    # ---- the pipeline
    _s("OLMOCR_VLLM_URL", str, None, "the servers, as `--vllm-url` takes them (comma-separated, `URL#weight=N`, "
       "`http://HOST:P-Q`, `dns+http://NAME:PORT`); "
       "set, it means external servers (no internal mode)", PIPELINE, shown_default=""),
    _s("OLMOCR_DNS_REFRESH_S", float, 10.0, "how often `dns+http://NAME:PORT` servers are re-resolved "
       "(0 < s <= 30; docs/fleet.md)", PIPELINE),
    _s("OLMOCR_READY_WAIT_SCALE", float, 1.0, "multiplies the start-up wait for servers (its pauses and "
       "`--max_server_ready_timeout`); for tests: 0.01 makes a 1200 s wait 12 s", PIPELINE),
    _s("OLMOCR_FAIL_FAST_PAGES", int, 50, "the run stops (exit 1) when, of the first this many pages with a "
       "verdict, `OLMOCR_FAIL_FAST_SHARE` or more failed every attempt for the same reason (a wrong model behind "
       "the name `olmocr`); 0 turns the check off", PIPELINE),
    _s("OLMOCR_FAIL_FAST_SHARE", float, 0.95, "the share of those pages (0 < share <= 1)", PIPELINE),
    _s("OLMOCR_HOSTS_FILE", str, None, "resolve `dns+` names from this hosts-format file instead of the system "
       "resolver (for tests: several 127.0.0.x behind one name without editing `/etc/hosts`)", PIPELINE,
       shown_default=""),
    _s("OLMOCR_API_KEY", str, None, "API key sent to every server (`Authorization: Bearer`)", PIPELINE,
       secret=True, shown_default=""),
    _s("OLMOCR_API_KEYS_FILE", str, None, "per-server keys: lines `KEY` (every server) or `URL KEY`", PIPELINE,
       shown_default=""),
    _s("OLMOCR_CA_BUNDLE", str, None, "CA certificates for `https://` servers", PIPELINE, shown_default=""),
    _s("OLMOCR_METRICS_TOKEN", str, None, "bearer token `--metrics_port` requires beyond loopback", PIPELINE,
       secret=True, shown_default=""),
    _s("OLMOCR_METRICS_TOKEN_FILE", str, None, "a file holding that token", PIPELINE, shown_default=""),
    # ---- olmocr-service (docs/service.md)
    _s("OLMOCR_SERVICE_WORKSPACE", str, None, "olmocr-service's workspace when the command names none (supervisord's "
       "`[program:olmocr-service]`)", SERVICE, shown_default=""),
    _s("OLMOCR_SERVICE_HOST", str, "127.0.0.1", "olmocr-service address (`--host`); any other than loopback "
       "needs a token", SERVICE),
    _s("OLMOCR_SERVICE_PORT", int, DEFAULT_SERVICE_PORT, "olmocr-service port (`--port`)", SERVICE),
    _s("OLMOCR_SERVICE_TOKEN", str, None, "bearer token olmocr-service requires (beyond loopback: always)",
       SERVICE, secret=True, shown_default=""),
    _s("OLMOCR_SERVICE_TOKEN_FILE", str, None, "a file holding that token (`--token-file`)", SERVICE,
       shown_default=""),
    _s("OLMOCR_SERVICE_ROOTS", tuple, (), "local directories and `s3://` prefixes whose files clients may "
       "name by path, shell words (`--root`, repeatable); none: uploads only", SERVICE, shown_default=""),
    _s("OLMOCR_SERVICE_WORKERS", int, 4, "embedded pipeline workers (`--workers`; 0: none, `--follow` "
       "pipelines elsewhere do the work)", SERVICE),
    _s("OLMOCR_SERVICE_MAX_UPLOAD_MB", float, 100.0, "largest request body (all of a job's documents), MiB; "
       "above it: 413", SERVICE),
    _s("OLMOCR_SERVICE_MAX_PAGES", int, 2000, "most pages per document; above it: 422", SERVICE),
    _s("OLMOCR_SERVICE_MAX_DOCUMENTS", int, 100, "most documents per job; above it: 422", SERVICE),
    _s("OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT", int, 20, "unfinished jobs per token; above it: 429 with "
       "`Retry-After`", SERVICE),
    _s("OLMOCR_SERVICE_CONVERT_TIMEOUT", float, 300.0, "longest wait of `POST /v1/convert`, seconds; then it "
       "answers 202 with the job to poll", SERVICE),
    _s("OLMOCR_SERVICE_JOB_TTL", float, 0.0, "seconds a finished job is kept (its record, uploads and "
       "results); then the sweep removes it and its id answers 404. 0: kept until deleted by hand", SERVICE),
    _s("OLMOCR_SERVICE_SWEEP_INTERVAL", float, 300.0, "seconds between two sweeps of the service's prefix "
       "(expired jobs, orphan uploads, the priority lane's done items), and between two readings of every job "
       "for `/metrics` (unfinished ones are read every 2 s)", SERVICE),
    # ---- the Slurm templates (deploy/slurm/*.sbatch; docs/slurm.md)
    _s("OLMOCR_PIPELINE_ARGS", tuple, (), "extra pipeline flags for every task, shell words (e.g. `--workers 40 "
       "--markdown`)", SLURM, shown_default=""),
    _s("OLMOCR_READY_TIMEOUT", float, 1200.0, "seconds a task waits for its servers to load the model", SLURM),
    _s("OLMOCR_QUEUE_WAIT", float, 1800.0, "with INPUTS, seconds the tasks other than the array's first wait for "
       "it to fill the queue (`--wait_for_queue`); then they exit 1", SLURM),
    _s("OLMOCR_REQUEUE_ON_TIMEOUT", int, 1, "1: after the time-limit warning (SIGUSR1) a task requeues itself when "
       "work is left; 0: never", SLURM),
    _s("OLMOCR_TASK_DIR", str, None, "node-local scratch of a task's servers (socket, vLLM's temp files); removed "
       "at the end", SLURM, shown_default="`$TMPDIR/olmocr-task-JOBID`"),
    _s("OLMOCR_LOG_DIR", str, None, "where a task's server, manager and pipeline logs are kept", SLURM,
       shown_default="`$SLURM_SUBMIT_DIR/olmocr-logs/ARRAYJOB_TASK`"),
    _s("OLMOCR_METRICS_PORT", int, None, "the task pipeline's `--metrics_port` (with `OLMOCR_PORT` and "
       "`OLMOCR_STATUS_PORT`: fixed ports instead of a free block chosen from the job id)", SLURM,
       shown_default="(a free block)"),
    _s("OLMOCR_FLEET_DIR", str, None, "a shared directory where each task lists its servers and reads the "
       "others' (a multi-node fleet; needs `OLMOCR_HOST=0.0.0.0` and an API key)", SLURM, shown_default=""),
    _s("OLMOCR_ADVERTISE_HOST", str, None, "the name other nodes reach this task's servers by", SLURM,
       shown_default="`hostname -f`"),
    _s("OLMOCR_MONITOR_INTERVAL", float, 300.0, "seconds between the monitor's `--stats` snapshots", SLURM),
    _s("OLMOCR_MONITOR_FILE", str, None, "the file the monitor replaces with each snapshot", SLURM,
       shown_default="`olmocr-stats-JOB.txt`"),
    _s("OLMOCR_WORKSPACE_PROFILE", str, None, "the finalizer's AWS profile for an `s3://` workspace", SLURM,
       shown_default=""),
    # ---- the stand-in (tests, demo, benchmarks)
    _s("OLMOCR_STANDIN_CONTROL", str, None, "the stand-in's fault-injection control file (docs/standin.md)",
       STANDIN, shown_default=""),
)

#: Names the code builds with a prefix, each declared as a family (the stand-in's per-fault settings).
PREFIX_FAMILIES: dict[str, str] = {
    "OLMOCR_STANDIN_": "the stand-in's behaviour settings (docs/standin.md)",
}
#: Variables only the test suite and benchmarks read; they are not operator settings (and every
#: ``OLMOCR_BENCH_*``: the benchmarks' own switches, docs/benchmarks.md).
TEST_ONLY_PREFIXES = ("OLMOCR_BENCH_",)
TEST_ONLY = frozenset({"OLMOCR_TEST_REAL_VLLM", "OLMOCR_REAL_VLLM_VENV", "OLMOCR_REAL_VLLM_PYTHON",
                       "OLMOCR_BENCH_CORPUS", "OLMOCR_BENCH_OUT", "OLMOCR_BENCH_PYTHON",
                       "OLMOCR_TEST_RENDER_FAULT"})

BY_NAME: dict[str, Setting] = {s.name: s for s in REGISTRY}


class SettingValueError(OlmocrError, ValueError):
    """A variable's value cannot be parsed; the message names it and says what to do."""


def get(name: str) -> Setting:
    return BY_NAME[name]


def default(name: str) -> object:
    return BY_NAME[name].default


def of(component: str) -> tuple[Setting, ...]:
    return tuple(s for s in REGISTRY if s.component == component)


def field_names(component: str) -> dict[str, str]:
    """``{field: variable}`` of the settings of ``component`` that live in its settings class."""
    return {s.field: s.name for s in of(component) if s.field}


def parse(setting: Setting, raw: str) -> object:
    """``raw`` as the setting's type; :class:`SettingValueError` with one line when it is not."""
    import shlex

    try:
        if setting.type is int:
            return int(raw)
        if setting.type is float:
            return float(raw)
    except ValueError:
        kind = "an integer" if setting.type is int else "a number"
        raise SettingValueError(f"{setting.name}={raw!r} is not {kind}; fix or unset it") from None
    if setting.type is tuple:
        try:
            return tuple(shlex.split(raw))
        except ValueError as exc:
            raise SettingValueError(f"{setting.name} is not shell-quoted words ({exc}); fix or unset it") from None
    return raw


def value(name: str, env: Mapping[str, str] | None = None) -> object:
    """The parsed value of ``name`` from ``env`` (default ``os.environ``); its default when unset or empty."""
    setting = BY_NAME[name]
    raw = (os.environ if env is None else env).get(name, "")
    return setting.default if raw == "" else parse(setting, raw)


def is_set(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``name`` is set to something (an empty value counts as unset, as in :func:`value`)."""
    BY_NAME[name]  # an undeclared name is a bug: KeyError
    return (os.environ if env is None else env).get(name, "") != ""


def text(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """A string setting's value (None when unset and without a default): paths, URLs, keys."""
    got = value(name, env)
    return None if got is None else str(got)


def __getattr__(name: str) -> object:
    """``envs.<NAME>`` is the parsed value of the declared setting NAME, read now (vLLM's ``envs.VLLM_*`` style)."""
    if name in BY_NAME:
        return value(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------- docs tables

_TITLES = {SERVER: "server", STATUS: "status service", PIPELINE: "pipeline", STANDIN: "stand-in",
           SLURM: "Slurm templates", SERVICE: "olmocr-service"}
#: Which guide holds which table.
DOC_TABLES: dict[str, tuple[str, ...]] = {
    "docs/operations.md": (SERVER,),
    "docs/observability.md": (STATUS,),
    "docs/pipeline.md": (PIPELINE,),
    "docs/standin.md": (STANDIN,),
    "docs/slurm.md": (SLURM,),
    "docs/service.md": (SERVICE,),
}


def _shown(setting: Setting) -> str:
    if setting.shown_default is not None:
        return setting.shown_default
    value = setting.default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" if isinstance(value, str) else str(value)


def markdown_table(component: str) -> str:
    rows = ["| variable | default | what |", "|---|---|---|"]
    rows += [f"| `{s.name}` | {_shown(s)} | {s.doc} |" for s in of(component)]
    return "\n".join(rows)


def _marker(component: str) -> tuple[str, str]:
    return (f"<!-- settings:{component} (generated by python -m olmocr.envs --write-docs) -->",
            f"<!-- /settings:{component} -->")


def render_doc(text: str, component: str) -> str:
    """``text`` with the table between the component's markers regenerated."""
    start, end = _marker(component)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise KeyError(f"no {start} ... {end} block")
    return pattern.sub(lambda _m: f"{start}\n{markdown_table(component)}\n{end}", text)


def write_docs(root: Path) -> list[str]:
    changed = []
    for rel, components in DOC_TABLES.items():
        path = root / rel
        text = path.read_text(encoding="utf-8")
        new = text
        for component in components:
            new = render_doc(new, component)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(rel)
    return changed


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m olmocr.envs", description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help="regenerate the settings tables in docs/")
    parser.add_argument("--component", choices=sorted(_TITLES), help="print one table")
    args = parser.parse_args(argv)
    if args.write_docs:
        changed = write_docs(Path(__file__).resolve().parent.parent)
        print("\n".join(changed) or "docs are up to date")
        return 0
    for component in [args.component] if args.component else _TITLES:
        print(f"## {_TITLES[component]}\n\n{markdown_table(component)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
