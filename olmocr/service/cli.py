"""``olmocr-service WORKSPACE --vllm-url URL``: the HTTP API and, by default, embedded pipeline workers
(``--follow``) on the same workspace."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from olmocr import __version__, envs
from olmocr.exit_codes import STATUS_INTERRUPTED, STATUS_USAGE
from olmocr.logformat import LOG_FORMAT
from olmocr.pipeline.cli import OneLineParser  # errors on one line, exit status 2
from olmocr.pipeline.flags import whole
from olmocr.pipeline.pages.page import INTERACTIVE_PRIORITY_STEP

logger = logging.getLogger("olmocr.service")

TOKEN_VAR, TOKEN_FILE_VAR = "OLMOCR_SERVICE_TOKEN", "OLMOCR_SERVICE_TOKEN_FILE"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="olmocr-service", description="Documents over HTTP: POST a PDF, get its Markdown. "
                      "Jobs live in the workspace's queue, so they survive restarts and any number of replicas "
                      "and --follow pipelines share them (docs/service.md).")
    p.add_argument("--version", action="version", version=f"olmocr-serve {__version__}")
    p.add_argument("workspace", nargs="?", default=None, help="local directory or s3://bucket/prefix (the "
                   "pipeline's workspace; default $OLMOCR_SERVICE_WORKSPACE)")
    p.add_argument("--vllm-url", "--server", dest="server", action="append", default=None, metavar="URL",
                   help="the servers the embedded workers use, as the pipeline's --vllm-url (default "
                        "$OLMOCR_VLLM_URL); not needed with --workers 0")
    p.add_argument("--host", default=None, help=f"address to bind (default $OLMOCR_SERVICE_HOST or "
                   f"{envs.default('OLMOCR_SERVICE_HOST')}); beyond loopback a token is required")
    p.add_argument("--port", type=int, default=None, help=f"port (default $OLMOCR_SERVICE_PORT or "
                   f"{envs.DEFAULT_SERVICE_PORT})")
    p.add_argument("--token-file", default=None, help=f"file holding the bearer token (or ${TOKEN_FILE_VAR}, "
                   f"or the token in ${TOKEN_VAR})")
    p.add_argument("--root", action="append", default=None, metavar="DIR_OR_S3_PREFIX",
                   help="a local directory or s3:// prefix whose files clients may name by path (repeat; "
                        "default $OLMOCR_SERVICE_ROOTS; none: uploads only)")
    p.add_argument("--workers", type=int, default=None, help="embedded pipeline workers (default "
                   "$OLMOCR_SERVICE_WORKERS or 4); 0: none (run 'python -m olmocr.pipeline WORKSPACE --follow' "
                   "elsewhere)")
    p.add_argument("--lease-seconds", type=float, default=300.0, help="the embedded workers' work-item lease "
                   "(default 300)")
    p.add_argument("--render-processes", type=int, default=None, help="the embedded workers' page-rendering "
                   "processes (default: CPU cores)")
    p.add_argument("--priority", type=whole(), default=None, help="the embedded workers' vLLM request priority "
                   "for batch items (lower = sooner); the service's jobs are sent "
                   f"{INTERACTIVE_PRIORITY_STEP} lower. The servers must run with --scheduling-policy priority "
                   "(default: no priority sent)")
    return p


def setup_logging() -> None:
    from olmocr.pipeline.cli import setup_logging as pipeline_logging

    pipeline_logging(None)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    from olmocr.endpoints import check_exposure, read_token
    from olmocr.server.errors import EndpointConfigError
    from olmocr.service.intake import Limits, Roots

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workspace is None:
        if not envs.is_set("OLMOCR_SERVICE_WORKSPACE"):
            parser.error("name the workspace (a local directory or s3://bucket/prefix), or set "
                         "OLMOCR_SERVICE_WORKSPACE")
        args.workspace = str(envs.text("OLMOCR_SERVICE_WORKSPACE"))
    setup_logging()
    try:
        host = args.host or str(envs.value("OLMOCR_SERVICE_HOST"))
        port = args.port if args.port is not None else int(envs.value("OLMOCR_SERVICE_PORT"))  # type: ignore[arg-type]
        workers = args.workers if args.workers is not None else int(envs.value("OLMOCR_SERVICE_WORKERS"))  # type: ignore[arg-type]
        roots = Roots.parse(args.root or list(envs.value("OLMOCR_SERVICE_ROOTS")))  # type: ignore[arg-type]
        limits = Limits(
            max_upload_bytes=int(float(envs.value("OLMOCR_SERVICE_MAX_UPLOAD_MB")) * 2**20),  # type: ignore[arg-type]
            max_pages=int(envs.value("OLMOCR_SERVICE_MAX_PAGES")),  # type: ignore[arg-type]
            max_documents=int(envs.value("OLMOCR_SERVICE_MAX_DOCUMENTS")),  # type: ignore[arg-type]
            max_jobs_in_flight=int(envs.value("OLMOCR_SERVICE_MAX_JOBS_IN_FLIGHT")),  # type: ignore[arg-type]
            convert_timeout_s=float(envs.value("OLMOCR_SERVICE_CONVERT_TIMEOUT")))  # type: ignore[arg-type]
        token = read_token(os.environ, TOKEN_VAR, TOKEN_FILE_VAR, args.token_file)
        check_exposure("olmocr-service", host, token, TOKEN_VAR, TOKEN_FILE_VAR)
    except (envs.SettingValueError, EndpointConfigError) as exc:
        parser.error(str(exc))
    if workers < 0:
        parser.error(f"--workers {workers}: give 0 or more")
    url_values = args.server or ([str(envs.text("OLMOCR_VLLM_URL"))] if envs.is_set("OLMOCR_VLLM_URL") else [])
    if workers and not url_values:
        parser.error("the embedded workers need --vllm-url (or $OLMOCR_VLLM_URL); or run with --workers 0 and "
                     "'python -m olmocr.pipeline WORKSPACE --follow' elsewhere")
    from olmocr.pipeline.errors import WorkspaceError
    from olmocr.pipeline.workspace.check import check_workspace

    try:
        check_workspace(args.workspace, None, writable=True)
    except WorkspaceError as exc:
        logger.error("%s", exc)
        return 1
    config = _pipeline_config(parser, args, url_values, workers) if workers else None
    try:
        return asyncio.run(serve(args.workspace, host, port, token, roots, limits, config))
    except EndpointConfigError as exc:
        logger.error("%s", exc)
        return STATUS_USAGE
    except KeyboardInterrupt:
        return STATUS_INTERRUPTED


def _pipeline_config(parser: argparse.ArgumentParser, args: argparse.Namespace, url_values: list[str],
                     workers: int):  # noqa: ANN202 - PipelineConfig, imported late
    from olmocr.pipeline.cli import resolve_api_key
    from olmocr.pipeline.errors import FleetConfigError
    from olmocr.pipeline.runner import PipelineConfig
    from olmocr.pipeline.servers.serverlist import dns_with_keys, parse_dns_names, parse_url_list, server_specs

    try:
        api_key = resolve_api_key(None, os.environ)
        key_file = envs.text("OLMOCR_API_KEYS_FILE")
        servers = server_specs(parse_url_list(url_values), api_key, key_file)
        dns = dns_with_keys(parse_dns_names(url_values), api_key, key_file)
    except FleetConfigError as exc:
        parser.error(str(exc))
    return PipelineConfig(workspace=args.workspace, servers=tuple(servers), dns=tuple(dns), workers=workers,
                          lease_seconds=args.lease_seconds, render_processes=args.render_processes,
                          progress_interval=60.0, follow=True, follow_wake=None, priority=args.priority)


async def serve(workspace: str, host: str, port: int, token: str | None, roots, limits,  # noqa: ANN001
                pipeline_config) -> int:  # noqa: ANN001
    import dataclasses

    from olmocr.endpoints import start_app
    from olmocr.pipeline.runner import run_pipeline
    from olmocr.pipeline.stopping import StopRequest
    from olmocr.pipeline.workspace.storage import open_storage
    from olmocr.service.app import Service, ServiceConfig
    from olmocr.service.lane import ServiceQueue

    stop = StopRequest()
    stop.install(asyncio.get_running_loop())
    storage = open_storage(workspace)
    config = ServiceConfig(limits=limits, roots=roots, token=token,
                           watch_all_s=float(envs.value("OLMOCR_SERVICE_SWEEP_INTERVAL")))  # type: ignore[arg-type]
    # One queue for the routes and the embedded workers: a submit is in the workers' view of the lane at once,
    # and a job's item completed here wakes its /v1/convert at once (olmocr/service/lane.py).
    queue = ServiceQueue(storage, **({"lease_seconds": pipeline_config.lease_seconds} if pipeline_config else {}))
    if pipeline_config is not None:
        config.wake = asyncio.Event()
        pipeline_config = dataclasses.replace(pipeline_config, follow_wake=config.wake)
        config.workers = asyncio.create_task(run_pipeline(pipeline_config, stop, queue=queue))
    service = Service(storage, queue, config)
    try:
        runner = await start_app(service.app(), host, port)
    except BaseException:
        stop.request("start-up failed")
        if config.workers is not None:
            await asyncio.gather(config.workers, return_exceptions=True)
        raise
    logger.info("olmocr-service %s listening on http://%s:%d (workspace %s, %s%s)", __version__, host, port,
                storage.url, f"{pipeline_config.workers} embedded workers" if pipeline_config else
                "no embedded workers", ", bearer token required" if token else "")
    try:
        await stop.event.wait()
        logger.info("stopping (%s)", stop.signal_name)
    finally:
        if config.workers is not None:
            results = await asyncio.gather(config.workers, return_exceptions=True)
            if isinstance(results[0], BaseException):
                logger.error("the embedded workers failed: %s", results[0])
        await runner.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
