"""Upstream olmOCR 0.4.27's pipeline flags that are not part of the core command line (see cli.py).

* Server flags for internal mode (no ``--vllm-url``): ``--gpu-memory-utilization``,
  ``--tensor-parallel-size/-tp``, ``--data-parallel-size/-dp``, ``--port`` (plus ``--model`` and
  ``--max_model_len``, which cli.py defines). As upstream, flags the pipeline does not know are passed to
  ``vllm serve`` in internal mode; with ``--vllm-url`` there is no vLLM to pass them to, so they are an error.
* ``--workspace_profile`` / ``--pdf_profile``: AWS profiles for the workspace and for the inputs.
* ``--apply_filter``: see olmocr.pipeline.pages.filters.
* Flags that mean nothing here (Beaker job submission) are rejected with a one-line explanation instead
  of argparse's generic "unrecognized arguments".

docs/upstream-flags.md lists every upstream flag and what it does here.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any, NoReturn

from olmocr.pipeline.flags import number, usage_exit, whole

BEAKER_EXPLANATION = (
    "submitting the job to AI2's Beaker cluster is not supported by olmocr-serve; run the pipeline on each "
    "machine instead, all with the same s3:// workspace (they share the work queue)"
)
#: Upstream flags rejected here, and why (one line each).
UNSUPPORTED: dict[str, str] = {
    "--beaker": BEAKER_EXPLANATION,
    "--beaker_workspace": BEAKER_EXPLANATION,
    "--beaker_cluster": BEAKER_EXPLANATION,
    "--beaker_gpus": BEAKER_EXPLANATION,
    "--beaker_priority": BEAKER_EXPLANATION,
}
#: Upstream flags that take no value (the others take one).
_UNSUPPORTED_SWITCHES = {"--beaker"}


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """``prog: error: message`` on one line (no usage dump: the message says what to do), exit status 2."""
    usage_exit(parser.prog, message)


class _Unsupported(argparse.Action):
    """Stops at once with ``prog: error: --flag: why`` (exit status 2, as argparse errors)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        fail(parser, f"{option_string}: {UNSUPPORTED[option_string or '']}")


def add_upstream_arguments(parser: argparse.ArgumentParser) -> None:
    internal = parser.add_argument_group(
        "internal server",
        "without --vllm-url the pipeline starts a supervised vLLM server for the run (the deployment's "
        "supervisord, wrapper and health listener) and stops it at the end; OLMOCR_* variables configure it "
        "as they do the deployment (OLMOCR_VLLM_BIN: the vLLM executable). Flags the pipeline does not know "
        "are passed to vllm serve, as upstream does",
    )
    internal.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=number(0, 1, low_open=True), default=None,
                          help="fraction of GPU memory vLLM may use (default: vLLM's own)")
    internal.add_argument("--tensor-parallel-size", "-tp", dest="tensor_parallel_size", type=whole(1), default=None,
                          help="GPUs per model replica (default 1)")
    internal.add_argument("--data-parallel-size", "-dp", dest="data_parallel_size", type=whole(1), default=None,
                          help="model replicas (default 1)")
    internal.add_argument("--gpus", default=None,
                          help="GPUs to start servers on, one per GPU (or per tensor-parallel run): 'all' (default: "
                               "every visible GPU; upstream uses one), a count N or a list 0,1,3 (env OLMOCR_GPUS)")
    internal.add_argument("--port", type=whole(1, 65535), default=None,
                          help="port of the (first) server (default 30024); if an olmocr server already answers there, "
                               "it is used instead of starting one")
    internal.add_argument("--server_run_dir", default=None,
                          help="directory for the server's supervisord files and logs (default: a new temporary "
                               "directory, removed after a clean run)")
    storage = parser.add_argument_group("storage")
    storage.add_argument("--workspace_profile", default=None,
                         help="AWS profile (config/credentials files) for an s3:// workspace")
    storage.add_argument("--pdf_profile", default=None, help="AWS profile for reading s3:// inputs")
    parser.add_argument("--apply_filter", action="store_true",
                        help="skip PDFs that are not in English, have form fields or look like SEO spam, as "
                             "upstream; each is recorded with its reason (see --stats). Needs the 'filter' extra")
    for flag in UNSUPPORTED:
        parser.add_argument(flag, action=_Unsupported, nargs=0 if flag in _UNSUPPORTED_SWITCHES else "?",
                            help=argparse.SUPPRESS)


def check_unknown(parser: argparse.ArgumentParser, unknown: Sequence[str], internal: bool) -> tuple[str, ...]:
    """The flags to pass to ``vllm serve`` (internal mode), or a one-line error for them (external mode)."""
    if unknown and not internal:
        fail(parser, f"unrecognized arguments: {' '.join(unknown)} (flags the pipeline does not know are passed "
                     "to vLLM only when it starts its own server, i.e. without --vllm-url)")
    return tuple(unknown)


def check_upstream_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Before any work: unknown AWS profiles and a missing filter extra are one-line errors (exit 2);
    internal-server flags given with ``--vllm-url`` are noted as ignored."""
    for flag, profile in (("--workspace_profile", args.workspace_profile), ("--pdf_profile", args.pdf_profile)):
        if (error := profile_error(flag, profile)) is not None:
            fail(parser, error)
    if args.apply_filter:
        from olmocr.pipeline.errors import FilterUnavailable
        from olmocr.pipeline.pages.filters import check_available

        try:
            check_available()
        except FilterUnavailable as exc:
            fail(parser, str(exc))
    if args.server and (ignored := ignored_with_server(args)):
        logging.getLogger(__name__).info(
            "%s only configure the server the pipeline starts itself; ignored with --vllm-url", ", ".join(ignored))


def ignored_with_server(args: argparse.Namespace) -> list[str]:
    """The internal-server flags given although ``--vllm-url`` names a server (upstream ignores them too)."""
    names = {"gpu_memory_utilization": "--gpu-memory-utilization", "tensor_parallel_size": "--tensor-parallel-size",
             "data_parallel_size": "--data-parallel-size", "port": "--port", "server_run_dir": "--server_run_dir"}
    return [flag for name, flag in names.items() if getattr(args, name, None) is not None]


def profile_error(flag: str, profile: str | None) -> str | None:
    """A one-line error when the AWS profile does not exist (checked before any work is claimed)."""
    if not profile:
        return None
    import boto3
    from botocore.exceptions import ProfileNotFound

    try:
        boto3.Session(profile_name=profile)
    except ProfileNotFound:
        return (f"{flag} {profile}: no such profile in the AWS config or credentials files "
                "(~/.aws/config, ~/.aws/credentials, or AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)")
    return None
