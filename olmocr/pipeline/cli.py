"""Command line of the pipeline (upstream olmOCR 0.4.27 flag names and meanings where they exist)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Mapping
from typing import NoReturn

from olmocr import __version__, envs
from olmocr.envs import SettingValueError
from olmocr.exit_codes import STATUS_FAILED, STATUS_INTERRUPTED, STATUS_OK, STATUS_USAGE
from olmocr.logformat import LOG_FORMAT, RUN_LOGGERS
from olmocr.pipeline import defaults, stats
from olmocr.pipeline.errors import FleetConfigError, NoInput, UsageError, WorkspaceError
from olmocr.pipeline.flags import normalize_spellings, number, usage_exit, whole
from olmocr.pipeline.pages.render import DEFAULT_RENDER_TIMEOUT_S
from olmocr.pipeline.progress import FailFast
from olmocr.pipeline.runner import PipelineConfig, run_pipeline
from olmocr.pipeline.servers.checks import DEFAULT_READY_WAIT_S, start_up_delays
from olmocr.pipeline.servers.discovery import refresh_interval
from olmocr.pipeline.servers.serverlist import (  # providers (#31)
    URL_ENV,
    add_provider_arguments,
    check_budget,
    dns_with_keys,
    parse_dns_names,
    parse_url_list,
    parse_url_options,
    run_options,
    server_specs,
)
from olmocr.pipeline.stopping import DEFAULT_STOP_TIMEOUT_S, StopRequest
from olmocr.pipeline.upstream_flags import add_upstream_arguments, check_unknown, check_upstream_flags
from olmocr.server.errors import SettingsError
from olmocr.server.settings import ServerSettings, read_api_key

logger = logging.getLogger(__name__)

class OneLineParser(argparse.ArgumentParser):
    """argparse with errors on one line: ``prog: error: what (see --help)``, exit status 2 (no usage dump of
    thirty flags above the one line that matters)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        usage_exit(self.prog, UsageError(message, see_help=True))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m olmocr.pipeline",
        description="Turn PDFs (and PNG/JPEG images) into text with olmOCR, on a vLLM server at --vllm-url or "
                    "on one the pipeline starts for the run. Every flag may be spelled with '_' or '-' "
                    "(--pages_per_group or --pages-per-group).",
    )
    p.add_argument("--version", action="version", version=f"olmocr-serve {__version__}")
    p.add_argument("workspace", help="local directory or s3://bucket/prefix holding the work queue and results")
    p.add_argument("--pdfs", nargs="*", default=None,
                   help="documents to add: paths, globs (also s3://bucket/prefix/*.pdf), or .txt files listing paths")
    server = p.add_argument_group("server")
    server.add_argument("--vllm-url", "--server", dest="server", action="append", default=None, metavar="URL",
                        help="URL of a vLLM server, e.g. http://127.0.0.1:30024 (a trailing /v1 is accepted); "
                             "repeat it or give a comma-separated list for several servers; http://HOST:P-Q is one server per "
                             "port (a box with one server per GPU); dns+http://NAME:PORT is every address NAME "
                             "resolves to, re-resolved while running; URL#weight=N fixes a "
                             "server's share (default: learned); default $OLMOCR_VLLM_URL; without any, the "
                             "pipeline starts its own server (see 'internal server')")
    server.add_argument("--api_key", default=None,
                        help="API key sent as 'Authorization: Bearer' (visible in ps: prefer $OLMOCR_API_KEY, "
                             "$VLLM_API_KEY or --api_key_file)")
    server.add_argument("--api_key_file", default=None, metavar="FILE",
                        help="file with a line KEY (every server) and/or lines 'URL KEY' (per server); "
                             "default $OLMOCR_API_KEYS_FILE ($OLMOCR_API_KEY_FILE, as for the server, is a file "
                             "holding one key for every server)")
    server.add_argument("--ca_bundle", default=None, metavar="PEM",
                        help="CA certificates trusted for https:// servers instead of the system's; "
                             "default $OLMOCR_CA_BUNDLE")
    server.add_argument("--priority", type=whole(), default=None,
                        help="vLLM request priority sent with every request (lower = sooner); the servers must "
                             "run with --scheduling-policy priority")
    server.add_argument("--model", default=None,
                        help="internal mode: the model to serve (default $OLMOCR_MODEL, then the deployment's); "
                             "with --vllm-url the name the servers serve the model under (default 'olmocr'; "
                             "URL#model=NAME for one server), used in requests and checked on every answer")
    add_provider_arguments(server)  # providers (#31): --price_in/--price_out/--rpm/--tpm/--max_cost
    server.add_argument("--max_concurrent_requests", type=whole(1), default=defaults.MAX_CONCURRENT_REQUESTS,
                        help=f"cap on requests in flight to the server (default {defaults.MAX_CONCURRENT_REQUESTS})")
    server.add_argument("--request_timeout", type=number(0, low_open=True), default=defaults.REQUEST_TIMEOUT_S,
                        help="a request is abandoned and resent when the server has finished no request for this "
                             f"many seconds (a hung engine), or after 3x this in any case (default {defaults.REQUEST_TIMEOUT_S:g})")
    server.add_argument("--max_server_ready_timeout", type=number(0), default=None,
                        help="longest total wait for the servers at start-up, in seconds (default: 10 attempts at "
                             f"most 60 s apart, {DEFAULT_READY_WAIT_S:g} s; a larger value adds attempts 60 s apart; "
                             f"internal mode: {defaults.SERVER_READY_TIMEOUT_S:g} s for its server to load)")
    work = p.add_argument_group("work")
    work.add_argument("--workers", type=whole(1), default=defaults.WORKERS,
                      help=f"work items processed at a time (default {defaults.WORKERS})")
    work.add_argument("--pages_per_group", type=whole(1), default=None,
                      help=f"aim for this many pages per work item (default {defaults.PAGES_PER_GROUP}, or "
                           f"{defaults.PAGES_PER_GROUP_WITH_KEY} with an API key)")
    work.add_argument("--max_page_retries", type=whole(1), default=defaults.MAX_PAGE_RETRIES,
                      help=f"model attempts per page (default {defaults.MAX_PAGE_RETRIES})")
    work.add_argument("--max_page_error_rate", type=number(0, 1), default=defaults.MAX_PAGE_ERROR_RATE,
                      help="largest fraction of a document's pages that may fall back to the text layer "
                           "(default 0.004 = 1/250); above it the document is recorded as failed and retried")
    work.add_argument("--target_longest_image_dim", type=whole(28, note=" pixels (one image patch)"), default=defaults.LONGEST_IMAGE_DIM,
                      help=f"longest side of rendered page images in pixels (default {defaults.LONGEST_IMAGE_DIM})")
    work.add_argument("--target_anchor_text_len", type=int, default=-1, help=argparse.SUPPRESS)
    work.add_argument("--max_model_len", type=whole(1), default=defaults.MAX_MODEL_LEN,
                      help="answers whose total tokens exceed this are rejected; in internal mode also the "
                           f"server's context length (default {defaults.MAX_MODEL_LEN})")
    work.add_argument("--guided_decoding", action="store_true", help="ask vLLM to constrain the front matter")
    work.add_argument("--lease_seconds", type=number(1), default=defaults.LEASE_SECONDS,
                      help="work-item lease; renewed every third of it; a dead worker's item is free "
                           f"after it (default {defaults.LEASE_SECONDS:g})")
    work.add_argument("--stop_timeout", type=number(0), default=DEFAULT_STOP_TIMEOUT_S,
                      help="on SIGTERM/Ctrl+C, seconds to let work items in progress finish before handing "
                           f"them back to the queue (default {DEFAULT_STOP_TIMEOUT_S:g}); a second signal exits "
                           "at once")
    work.add_argument("--stop_exit_code", type=whole(0, 255), default=0, metavar="N",
                      help="exit status after a graceful stop by SIGTERM/Ctrl+C (default 0); a Kubernetes Job "
                           "sets 143 so that a drained or preempted pod's index is run again instead of "
                           "counted as completed (docs/kubernetes.md)")
    work.add_argument("--follow", action="store_true",  # --follow (olmocr.service)
                      help="keep running when the queue is empty and take new work items as they arrive "
                           "(e.g. from olmocr-service); idle, it polls the queue every few seconds")
    work.add_argument("--wait_for_queue", type=number(0), default=0.0, metavar="SECONDS",
                      help="on a workspace with no queue yet, wait up to this long for another process to fill it "
                           "(one HEAD request every few seconds), then work as usual; after it, exit 1 "
                           "(default 0: exit 2 at once). Slurm's and Kubernetes' other tasks use it while the "
                           "first one adds the inputs")
    work.add_argument("--render_processes", type=whole(1), default=None,
                      help="page-rendering processes (default: number of CPU cores)")
    work.add_argument("--render_timeout", type=number(0, note=" (0 = no limit)"), default=DEFAULT_RENDER_TIMEOUT_S,
                      help="time limit in seconds for rendering one page (or reading its text layer); a page "
                           "over it fails, its render process is killed and replaced (default "
                           f"{DEFAULT_RENDER_TIMEOUT_S:g}; 0 = no limit)")
    # --- --retry_fallback_pages (issue #30; olmocr/pipeline/pages/page_retry.py)
    work.add_argument("--retry_fallback_pages", nargs="?", const="all", default=None, metavar="REASONS",
                      help="first queue the fallback pages of written documents for another try (their documents "
                           "are rewritten in place when the model answers); REASONS: comma-separated of model, "
                           "refused, render, time_limit (default all)")
    # --- end --retry_fallback_pages
    out = p.add_argument_group("output")
    out.add_argument("--markdown", action="store_true",
                     help="also write markdown/<source path>.md for each document into the workspace")
    out.add_argument("--stats", action="store_true", help="print a summary of the workspace and exit")
    out.add_argument("--progress_interval", type=number(0, low_open=True), default=defaults.PROGRESS_INTERVAL_S,
                     help=f"seconds between progress lines (default {defaults.PROGRESS_INTERVAL_S:g})")
    out.add_argument("--metrics_port", type=whole(1, 65535), default=None,
                     help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics while running (a different "
                          "port for each pipeline on a machine; docs/observability.md)")
    out.add_argument("--metrics_host", default=defaults.METRICS_HOST,
                     help="address for --metrics_port (default 127.0.0.1); any other needs a bearer token in "
                          "$OLMOCR_METRICS_TOKEN or a file given by --metrics_token_file / $OLMOCR_METRICS_TOKEN_FILE")
    out.add_argument("--metrics_token_file", default=None, help="file holding the bearer token for /metrics")
    out.add_argument("--disk_logging", nargs="?", const="olmocr-pipeline-debug.log", default=None,
                     help="also log to this file (default name olmocr-pipeline-debug.log)")
    add_upstream_arguments(p)
    return p




def setup_logging(disk_log: str | None) -> None:
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    handlers: list[logging.Handler] = [console]
    if disk_log:
        handler = logging.FileHandler(disk_log, mode="a")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(handler)
    for name in RUN_LOGGERS:
        run_logger = logging.getLogger(name)
        run_logger.setLevel(logging.DEBUG)
        run_logger.propagate = False
        if not run_logger.handlers:
            for handler in handlers:
                run_logger.addHandler(handler)


def resolve_api_key(flag: str | None, env: Mapping[str, str]) -> str | None:
    """The key for every server: ``--api_key``, ``$OLMOCR_API_KEY``, ``$VLLM_API_KEY``, or the whole content
    of ``$OLMOCR_API_KEY_FILE`` (the server's variable, meaning the same here). Per-server keys come from
    ``--api_key_file`` / ``$OLMOCR_API_KEYS_FILE`` on top (:func:`server_specs`)."""
    key = flag or envs.text("OLMOCR_API_KEY", env) or env.get("VLLM_API_KEY")
    if key:
        return key
    key_file = envs.text("OLMOCR_API_KEY_FILE", env)
    if key_file:
        try:
            return read_api_key(ServerSettings(api_key_file=key_file), env={})
        except SettingsError as exc:
            raise FleetConfigError(str(exc)) from None
    return None


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """The command line, resolved once (argparse's values plus what the settings add) and passed on: nothing
    after :func:`resolve_args` reads ``os.environ`` or the parser again for these."""

    args: argparse.Namespace  # argparse's values, as given (the flags that need no resolving are read here)
    internal: bool  # no server named: the pipeline starts its own (olmocr.pipeline.servers.internal)
    vllm_args: tuple[str, ...]  # internal mode: the flags passed on to vllm serve
    api_key: str | None = dataclasses.field(repr=False)
    key_file: str | None  # --api_key_file / $OLMOCR_API_KEYS_FILE
    ca_bundle: str | None
    pages_per_group: int
    metrics_token: str | None = dataclasses.field(repr=False)

    @property
    def workspace(self) -> str:
        return self.args.workspace

    @property
    def stats_only(self) -> bool:
        """``--stats`` without ``--pdfs``: read the workspace, write nothing."""
        return self.args.stats and not self.args.pdfs


def resolve_args(parser: argparse.ArgumentParser, argv: list[str]) -> RunArgs:
    """Parse ``argv`` and resolve it with the settings (keys, CA bundle, metrics token, run settings read now:
    a bad value is one line before anything starts). A mistake raises :class:`UsageError`; argparse's own
    errors exit through :func:`usage_exit` as well. Sets up logging."""
    args, unknown = parser.parse_known_args(normalize_spellings(parser, argv))
    internal = not args.server and not envs.is_set(URL_ENV) and not args.stats
    vllm_args = check_unknown(parser, unknown, internal)
    setup_logging(args.disk_logging)
    try:
        api_key = resolve_api_key(args.api_key, os.environ)
    except FleetConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.api_key:
        logger.warning("--api_key on the command line is visible to every user in ps; prefer OLMOCR_API_KEY or "
                       "--api_key_file")
    key_file = args.api_key_file or envs.text("OLMOCR_API_KEYS_FILE")
    pages_per_group = args.pages_per_group
    if pages_per_group is None:
        pages_per_group = defaults.PAGES_PER_GROUP_WITH_KEY if api_key or key_file else defaults.PAGES_PER_GROUP
    check_upstream_flags(parser, args)
    try:
        FailFast.from_env()
        start_up_delays(args.max_server_ready_timeout)
    except SettingValueError as exc:
        raise UsageError(str(exc)) from None
    return RunArgs(args=args, internal=internal, vllm_args=vllm_args, api_key=api_key, key_file=key_file,
                   ca_bundle=args.ca_bundle or envs.text("OLMOCR_CA_BUNDLE"), pages_per_group=pages_per_group,
                   metrics_token=_metrics_token(args))


def _metrics_token(args: argparse.Namespace) -> str | None:
    """``--metrics_port``'s bearer token; a public ``--metrics_host`` without one is a :class:`UsageError`."""
    if args.metrics_port is None:
        return None
    from olmocr.endpoints import check_exposure, read_token
    from olmocr.pipeline.metrics import TOKEN_FILE_VAR, TOKEN_VAR
    from olmocr.server.errors import EndpointConfigError

    try:
        token = read_token(os.environ, TOKEN_VAR, TOKEN_FILE_VAR, args.metrics_token_file)
        check_exposure("--metrics_port", args.metrics_host, token, TOKEN_VAR, "--metrics_token_file")
    except EndpointConfigError as exc:
        raise UsageError(str(exc), see_help=True) from None
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # *_created series only add noise
    return token


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        return _main(resolve_args(parser, sys.argv[1:] if argv is None else argv))
    except UsageError as exc:  # the one way a command-line mistake is reported
        usage_exit(parser.prog, exc)


def _main(run: RunArgs) -> int:
    """Check the workspace, then run; a mistake must not leave an empty workspace behind."""
    from olmocr.pipeline.workspace.check import check_workspace, missing_parents, remove_if_empty

    created = missing_parents(run.workspace)  # removed again if the run finds nothing to put in it
    try:
        check_workspace(run.workspace, run.args.workspace_profile, writable=not run.stats_only)
    except WorkspaceError as exc:
        remove_if_empty(created)
        logger.error("%s", exc)
        return STATUS_FAILED if run.workspace.startswith("s3://") else STATUS_USAGE
    status = STATUS_FAILED
    try:
        status = _run(run)
    except NoInput as exc:
        logger.error("%s", exc)
        status = STATUS_USAGE
    except WorkspaceError as exc:
        logger.error("%s", exc)
    except UsageError:
        raise
    except Exception as exc:
        from olmocr.pipeline.workspace.check import workspace_problem

        problem = workspace_problem(run.workspace, exc)
        if problem is None:
            raise
        logger.error("%s", problem)
    finally:
        if status != STATUS_OK:
            remove_if_empty(created)
    return status


def _run(run: RunArgs) -> int:
    args = run.args
    if run.stats_only:
        return stats.print_stats(run.workspace, args.workspace_profile)
    url_values = args.server or ([str(envs.text(URL_ENV))] if envs.is_set(URL_ENV) else [])
    try:
        run_defaults = run_options(args, run.internal)  # providers (#31)
        servers = server_specs(parse_url_list(url_values), run.api_key, run.key_file,
                               options=parse_url_options(url_values), defaults=run_defaults)
        dns = dns_with_keys(parse_dns_names(url_values), run.api_key, run.key_file, run_defaults)
        check_budget(args.max_cost, servers, dns)
        refresh_interval(os.environ)  # a bad OLMOCR_DNS_REFRESH_S fails now, with one line
    except FleetConfigError as exc:
        raise UsageError(str(exc), see_help=True) from None
    server_settings = None
    if run.internal:  # no server given: start one for the run (olmocr.pipeline.servers.internal)
        from olmocr.pipeline.servers.internal import internal_settings
        from olmocr.pipeline.servers.serverlist import ServerSpec
        from olmocr.server.settings import read_api_key

        try:
            server_settings = internal_settings(args, run.vllm_args)
            key = run.api_key or read_api_key(server_settings)  # the key the server is started with
            slots = server_settings.server_slots()  # one server per GPU (olmocr/server/gpus.py)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        gpus = [gpu for slot in slots for gpu in slot.gpus]
        if gpus:  # resolved once (nvidia-smi): the servers started are the servers the pipeline uses
            server_settings = dataclasses.replace(server_settings, gpus=",".join(gpus))
        servers = [ServerSpec(slot.url(server_settings.client_host), None, key) for slot in slots]
    if run.ca_bundle and not os.path.isfile(run.ca_bundle):
        raise UsageError(f"--ca_bundle {run.ca_bundle}: no such file (a PEM file of CA certificates)", see_help=True)

    config = PipelineConfig(
        workspace=args.workspace,
        servers=tuple(servers),
        dns=tuple(dns) if not run.internal else (),
        ca_bundle=run.ca_bundle,
        max_cost=args.max_cost,
        priority=args.priority,
        pdfs=tuple(args.pdfs or ()),
        workers=args.workers,
        pages_per_group=run.pages_per_group,
        max_page_retries=args.max_page_retries,
        max_page_error_rate=args.max_page_error_rate,
        max_concurrent_requests=args.max_concurrent_requests,
        target_longest_image_dim=args.target_longest_image_dim,
        max_model_len=args.max_model_len,
        markdown=args.markdown,
        guided_decoding=args.guided_decoding,
        request_timeout=args.request_timeout,
        max_server_ready_timeout=args.max_server_ready_timeout,
        lease_seconds=args.lease_seconds,
        progress_interval=args.progress_interval,
        render_processes=args.render_processes,
        render_timeout=args.render_timeout,
        stop_timeout=args.stop_timeout,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        metrics_token=run.metrics_token,
        apply_filter=args.apply_filter,
        workspace_profile=args.workspace_profile,
        pdf_profile=args.pdf_profile,
        follow=args.follow,
        wait_for_queue=args.wait_for_queue,
    )
    if args.retry_fallback_pages is not None:  # --- issue #30
        _queue_fallback_pages(args)
    try:
        if args.stats:
            asyncio.run(_populate_only(config))
            return stats.print_stats(args.workspace, args.workspace_profile)
        return asyncio.run(_run_with_signals(config, server_settings, args.server_run_dir, args.stop_exit_code))
    except KeyboardInterrupt:
        logger.warning("interrupted; unfinished work items are released (or free once their lease expires)")
        return STATUS_INTERRUPTED


async def _run_with_signals(config: PipelineConfig, server_settings=None, server_run_dir=None,  # noqa: ANN001
                            stop_exit_code: int = 0) -> int:
    """Run the pipeline (on its own server when ``server_settings`` is given: internal mode); the first
    SIGTERM/SIGINT stops it gracefully (exit ``stop_exit_code``, default 0), a second exits at once."""
    from olmocr.server.errors import EndpointConfigError

    stop = StopRequest()
    stop.install(asyncio.get_running_loop())
    server = None
    if server_settings is not None:
        from olmocr.pipeline.servers.internal import run_with_internal_server

        server = functools.partial(run_with_internal_server, settings=server_settings, run_dir=server_run_dir,
                                   ready_timeout=(defaults.SERVER_READY_TIMEOUT_S
                                                  if config.max_server_ready_timeout is None
                                                  else config.max_server_ready_timeout),
                                   api_key=config.servers[0].api_key)
    try:
        status = await run_pipeline(config, stop, server)
    except EndpointConfigError as exc:  # --metrics_port cannot be served (port in use): before any claim
        logger.error("%s", exc)
        return STATUS_USAGE
    return stop_exit_code if status == 0 and stop.requested else status


def _queue_fallback_pages(args: argparse.Namespace) -> None:
    """``--retry_fallback_pages``: queue the pages (olmocr/pipeline/pages/page_retry.py) before the run."""
    from olmocr.pipeline.pages.page_retry import parse_reasons, queue_fallback_pages
    from olmocr.pipeline.workspace.storage import open_storage

    try:
        reasons = parse_reasons(args.retry_fallback_pages)
    except ValueError as exc:
        raise UsageError(str(exc), see_help=True) from None
    documents, pages = queue_fallback_pages(open_storage(args.workspace, profile=args.workspace_profile), reasons)
    logger.info("--retry_fallback_pages %s: %d pages of %d documents queued for another try",
                ",".join(reasons), pages, documents)


async def _populate_only(config: PipelineConfig) -> None:
    from olmocr.pipeline.runner import populate
    from olmocr.pipeline.workspace.inputs import set_input_profile
    from olmocr.pipeline.workspace.queue import WorkQueue
    from olmocr.pipeline.workspace.storage import open_storage

    set_input_profile(config.pdf_profile)
    storage = open_storage(config.workspace, profile=config.workspace_profile)
    queue = WorkQueue(storage, lease_seconds=config.lease_seconds)
    await asyncio.to_thread(populate, queue, config.pdfs, config.pages_per_group)


if __name__ == "__main__":
    raise SystemExit(main())
