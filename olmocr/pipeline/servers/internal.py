"""Internal mode: without ``--vllm-url`` the pipeline runs its own supervised vLLM server for the run.

The server is the manager's (:class:`olmocr.server.manager.Manager`): supervisord in a run directory, the
wrapper that ``exec``s vLLM, the health listener that restarts a crashed server and kills a hung one. The
pipeline starts it, waits until ``/v1/models`` lists ``olmocr``, runs, and stops it and its whole process
tree at the end, on Ctrl+C or SIGTERM; supervisord gets SIGTERM from the kernel if the pipeline dies
(``PR_SET_PDEATHSIG``), so vLLM never outlives the run. It uses every visible GPU by default, one server
each (``--gpus`` / ``OLMOCR_GPUS``; upstream uses one GPU), and the pipeline sends work to all of them. If a server already answers on the port and
serves ``olmocr``, the pipeline uses it instead of failing on the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from olmocr import envs
from olmocr.model_list import parse_models, serves
from olmocr.pipeline.errors import InternalServerError
from olmocr.pipeline.stopping import StopRequest
from olmocr.server.command import plan_vllm_flags, refuse_secrets_in_argv
from olmocr.server.errors import SettingsError
from olmocr.server.server_args import resolve_executable, settings_from_args, vllm_version_or_refuse
from olmocr.server.settings import SERVED_MODEL_NAME, ServerSettings

logger = logging.getLogger(__name__)

#: supervisord's ``startsecs`` for the run's server, as the manager's default.
STARTSECS = 5
#: Seconds between checks that the server has not been given up on during the run.
WATCH_INTERVAL_S = 2.0


def internal_settings(args: Any, vllm_args: Sequence[str] = ()) -> ServerSettings:
    """Deployment settings from upstream's server flags over ``OLMOCR_*`` (flags the pipeline does not know
    are passed to vLLM, after ``OLMOCR_VLLM_ARGS``); the vLLM executable is found as the manager finds it.

    Raises SettingsError (a ValueError) with a one-line message.
    """
    settings = settings_from_args(args)
    extra = settings.extra_vllm_args + tuple(vllm_args)
    refuse_secrets_in_argv(extra)
    try:
        vllm_bin = resolve_executable(settings.vllm_bin)
    except SettingsError:
        raise SettingsError(
            f"no vLLM executable {settings.vllm_bin!r} to start a server with: install the gpu extra "
            "(pip install 'olmocr-serve[gpu]') or set OLMOCR_VLLM_BIN, or give a running server with --vllm-url"
        ) from None
    return dataclasses.replace(settings, extra_vllm_args=extra, vllm_bin=vllm_bin)


def existing_server(base_url: str, api_key: str | None, port: int) -> str | None:
    """What answers on the port: None (nothing), ``"olmocr"`` (a server serving olmocr), or a description."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        if probe.connect_ex(("127.0.0.1", port)) != 0:
            return None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = requests.get(f"{base_url}/v1/models", headers=headers, timeout=10)
        models = list(parse_models(response.content)) if response.ok else []
    except (requests.RequestException, ValueError):
        return "a program that is not an OpenAI-compatible server"
    if SERVED_MODEL_NAME in models:
        return SERVED_MODEL_NAME
    if response.status_code in (401, 403):
        return "a server that rejects the API key"
    return f"a server that does not serve '{SERVED_MODEL_NAME}' (models: {models or 'none'})"


#: Run by a detached process on a hard exit: wait (at most 10 min) for supervisord's pid to go, then remove the
#: run directory.
REMOVE_WHEN_GONE = """
import os, shutil, sys, time
pid, path = int(sys.argv[1]), sys.argv[2]
deadline = time.monotonic() + 600
while pid and time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    except PermissionError:
        pass
    time.sleep(0.5)
shutil.rmtree(path, ignore_errors=True)
"""


class InternalServer:
    """One supervised server for one pipeline run (see the module docstring)."""

    def __init__(self, settings: ServerSettings, run_dir: str | None) -> None:
        from olmocr.server.manager import Manager

        self.settings = settings
        self.slots = settings.server_slots()
        self.keep_run_dir = run_dir is not None
        self.run_dir = Path(run_dir).resolve() if run_dir else Path(tempfile.mkdtemp(prefix="olmocr-pipeline-server-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # The deployment's status service (/status, /metrics) listens after the servers: --port + number of
        # servers unless OLMOCR_STATUS_PORT says otherwise, so that runs on other ports do not collide.
        self.status_port = (int(envs.value("OLMOCR_STATUS_PORT")) if envs.is_set("OLMOCR_STATUS_PORT")  # type: ignore[arg-type]
                            else self.slots[-1].port + 1)
        self.manager = Manager(settings, self.run_dir, status_interval=float("inf"), startsecs=STARTSECS,
                               extra_env={"OLMOCR_STATUS_PORT": str(self.status_port)}, slots=self.slots)
        self.failed = False

    @property
    def log_path(self) -> Path:
        """The (first) server's log: vllm.log, or vllm-0.log with one server per GPU."""
        first = self.slots[0]
        return self.run_dir / "logs" / f"{first.group if first.name == first.group else first.name}.log"

    def start(self) -> None:
        self.manager.start()
        logger.info("started %s for this run: model %s on %s (tensor-parallel %d, data-parallel %d); "
                    "server log: %s; server status: http://127.0.0.1:%d/status",
                    "a vLLM server" if len(self.slots) == 1 else f"{len(self.slots)} vLLM servers (one per GPU)",
                    self.settings.model, self.manager.vllm_url, self.settings.tensor_parallel_size,
                    self.settings.data_parallel_size, self.log_path, self.status_port)

    @property
    def urls(self) -> list[str]:
        return [slot.url(self.settings.client_host) for slot in self.slots]

    def gone_reason(self) -> str | None:
        """Why the server will not come back by itself (supervisord dead, or the listener gave up), else None."""
        process = self.manager.supervisord
        if process is not None and process.poll() is not None:
            return f"supervisord exited (status {process.returncode}); see {self.run_dir / 'logs' / 'supervisord.log'}"
        status = self.manager.poll_status()
        if status and (status.get("gave_up") or status.get("state") == "FATAL"):
            reason = status.get("last_failure_reason") or "it failed to start"
            return f"the server was left stopped after {status.get('restart_count', 0)} restarts ({reason}); see {self.log_path}"
        return None

    def _answers(self) -> bool:
        """Every server of the run lists olmocr (the pipeline starts once all have loaded the model)."""
        for url in self.urls:
            try:
                response = requests.get(f"{url}/v1/models", timeout=5, headers=self._auth_headers())
            except requests.RequestException:
                return False
            if not (response.ok and serves(response.content)):
                return False
        return True

    def _auth_headers(self) -> dict[str, str]:
        from olmocr.server.settings import read_api_key

        key = read_api_key(self.settings)
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def wait_ready(self, timeout: float) -> None:
        """Until ``/v1/models`` lists ``olmocr``; InternalServerError if given up on or after ``timeout``."""
        started = time.monotonic()
        next_note = started + 30.0
        while not await asyncio.to_thread(self._answers):
            reason = await asyncio.to_thread(self.gone_reason)
            if reason is not None:
                raise InternalServerError(f"the vLLM server did not start: {reason}")
            if time.monotonic() - started > timeout:
                raise InternalServerError(
                    f"the vLLM server was not ready after {timeout:g} s (--max_server_ready_timeout); "
                    f"see {self.log_path}")
            if time.monotonic() >= next_note:
                logger.info("waiting for the vLLM server to load the model (%.0f s so far; log: %s)",
                            time.monotonic() - started, self.log_path)
                next_note += 30.0
            await asyncio.sleep(1.0)
        logger.info("vLLM server ready after %.1f s", time.monotonic() - started)

    async def watch(self) -> str:
        """Returns (only) when the server is gone for good, with the reason; crashes and hangs are the
        listener's and supervisord's to repair, and the pipeline's client rides them out."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            reason = await asyncio.to_thread(self.gone_reason)
            if reason is not None:
                return reason

    def signal_stop(self) -> None:
        """Tell supervisord to stop vLLM and exit, without waiting (the process is about to exit at once).
        The temporary run directory is removed by a small detached process once supervisord has exited
        (it needs the directory while it stops vLLM; we do not wait)."""
        process = self.manager.supervisord
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        if not self.keep_run_dir:
            pid = process.pid if process is not None else 0
            subprocess.Popen(  # noqa: S603 - our own interpreter and code
                [sys.executable, "-c", REMOVE_WHEN_GONE, str(pid), str(self.run_dir)], start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        """Stop supervisord, vLLM's process group and anything left of the tree; tidy the run directory."""
        logger.info("stopping the vLLM server of this run")
        self.manager.shutdown()
        if self.keep_run_dir or self.failed:
            logger.info("server logs kept in %s", self.run_dir / "logs")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


async def run_with_internal_server(run: Callable[[], Awaitable[int]], stop: StopRequest, *,
                                   settings: ServerSettings, run_dir: str | None, ready_timeout: float,
                                   api_key: str | None) -> int:
    """``await run()`` against a server started for it at ``settings.base_url`` (or an olmocr server already
    answering there).

    A stop request (first Ctrl+C / SIGTERM) while the model loads stops at once (exit 0); during the run the
    pipeline stops gracefully and the server is stopped after it. A second signal exits the process at once:
    supervisord is told to stop vLLM first (and gets SIGTERM from the kernel anyway when we are gone).
    """
    found = await asyncio.to_thread(existing_server, settings.base_url, api_key, settings.port)
    if found == SERVED_MODEL_NAME:
        logger.info("a server is already answering on %s and serves '%s': using it (not starting one)",
                    settings.base_url, SERVED_MODEL_NAME)
        return await run()
    if found is not None:
        from olmocr.port_owner import port_owner

        owner = port_owner(settings.port)
        logger.error("port %d is taken by %s%s; stop it or choose another port with --port", settings.port, found,
                     f" ({owner})" if owner else "")
        return 2
    server = InternalServer(settings, run_dir)
    try:
        # A vLLM that cannot serve olmOCR stops the run here, in one line, before supervisord would retry
        # it; the answer is cached where the wrapper looks (<run>/run/vllm-version.json).
        version = await asyncio.to_thread(vllm_version_or_refuse, settings.vllm_bin,
                                          server.run_dir / "run" / "vllm-version.json", warn=False)
        plan_vllm_flags(settings, version)
    except SettingsError as exc:
        logger.error("%s", exc)
        if not server.keep_run_dir:
            shutil.rmtree(server.run_dir, ignore_errors=True)
        return 2
    server.start()
    stop.on_hard_exit(server.signal_stop)
    pipeline: asyncio.Task[int] | None = None
    try:
        ready = asyncio.create_task(server.wait_ready(ready_timeout))
        stopped = asyncio.create_task(stop.event.wait())
        try:
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not ready.done():
                ready.cancel()
        if not ready.done() or ready.cancelled():
            logger.warning("stopped on request (%s) while the server was starting; no work was claimed",
                           stop.signal_name)
            return 0
        try:
            ready.result()
        except InternalServerError as exc:
            server.failed = True
            logger.error("%s", exc)
            return 1
        pipeline = asyncio.create_task(run())
        watcher = asyncio.create_task(server.watch())
        try:
            await asyncio.wait({pipeline, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if pipeline.done():
            return pipeline.result()
        server.failed = True
        logger.error("stopping the run: %s", watcher.result())
        return 1
    finally:
        if pipeline is not None and not pipeline.done():
            # Stop the workers first: they hand their work items back while the workspace is reachable.
            pipeline.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pipeline
        await asyncio.to_thread(server.stop)
