"""What the pipeline learns from a vLLM server before it claims any work (pure functions + one probe).

:func:`read_server_info` reads ``/v1/models`` (is ``olmocr`` served, with what ``max_model_len``) and
``/version`` (which request field constrains the output), and :func:`plan_max_tokens` decides the
``max_tokens`` every page request may ask for so that the server never has to refuse one (HTTP 400).
Callable once per server: the result is a small immutable :class:`ServerInfo`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from olmocr import envs
from olmocr.envs import SERVED_MODEL_NAME
from olmocr.model_list import parse_models  # noqa: F401 - part of this module's API
from olmocr.pipeline.errors import ServerMismatch, ServerNotReady
from olmocr.pipeline.model_prompt import PROMPT_V4_YAML
from olmocr.server import vllm_versions

MODEL_NAME = SERVED_MODEL_NAME
logger = logging.getLogger(__name__)

#: The request fields that constrain output. Which one a server honours is in the vLLM release table
#: (olmocr/server/vllm_versions.py, checked against the releases' sources): ``structured_outputs`` since
#: 0.11.0, ``guided_regex`` until 0.11.x (0.12 removed it; 0.32 logs "Request contains the removed
#: guided-decoding field(s)" and ignores it).
STRUCTURED_OUTPUTS = "structured_outputs"
GUIDED_REGEX_FIELD = "guided_regex"

#: What upstream olmOCR asks for; a page answer is rarely longer.
DEFAULT_MAX_TOKENS = 8000
#: Fewer answer tokens than this and most pages would be cut short and fall back to the text layer.
MIN_USEFUL_MAX_TOKENS = 512
#: Qwen2-VL turns each 28x28 pixel patch into one token (14 px patches, merged 2x2).
IMAGE_PATCH_PX = 28
#: The chat template around the prompt: role headers, the system line, vision start/end, generation prompt.
TEMPLATE_TOKENS = 64


#: The start-up wait for a server (the original server-manager design): 10 attempts, each pause twice the
#: last, at most 60 s apart -- 1+2+4+8+16+32+60+60+60 = 243 s in all. ``--max_server_ready_timeout`` cuts it
#: short or, larger, extends it with attempts 60 s apart.
READY_ATTEMPTS = 10
READY_FIRST_DELAY_S = 1.0
READY_MAX_DELAY_S = 60.0

# What the checks say, kept in one place (the tests match these, tests.pipeline_helpers.log_line).
#: A context too small for a page: its --max-model-len, --target_longest_image_dim, the prompt bound, the
#: least answer, and the --max-model-len to restart with (twice).
LOG_CONTEXT_TOO_SMALL = (
    "the vLLM server was started with --max-model-len %d, too small for pages rendered at "
    "--target_longest_image_dim %d (prompt up to %d tokens + at least %d for the answer): restart it with "
    "--max-model-len %d (olmocr-serve: OLMOCR_MAX_MODEL_LEN=%d) or lower --target_longest_image_dim")
#: The server lacks 'olmocr' (the name, what it serves, the name again).
LOG_NO_OLMOCR_MODEL = (
    "External vLLM server is running but doesn't have the '%s' model (it serves: %s). Start vLLM with "
    "`--served-model-name %s` (the olmocr-serve server does this), point --vllm-url at the olmOCR server, or "
    "name the model it serves with --model NAME (or URL#model=NAME).")
#: The server lacks the model named with --model (the model, what it serves, " ..." when the list is cut).
LOG_MODEL_NOT_SERVED = "the server does not serve the model '%s' (it serves: %s%s); check --model / URL#model=NAME"
#: No /v1/models, a model named: the server, why, the model.
LOG_NO_MODEL_LIST = ("%s: %s; going on because the model %r was named explicitly (every answer's model field "
                     "is checked)")
#: An empty /v1/models, a model named: the server, the model.
LOG_EMPTY_MODEL_LIST = ("%s: the model list is empty; going on because the model %r was named explicitly "
                        "(every answer's model field is checked)")
#: --model names the weights an olmocr-serve server serves as 'olmocr': the server, the model, 'olmocr'.
LOG_SERVED_AS = "%s serves %r as '%s'; requests use that name"


def ready_delays(max_wait_s: float | None = None, *, attempts: int = READY_ATTEMPTS,
                 first_delay_s: float = READY_FIRST_DELAY_S, max_delay_s: float = READY_MAX_DELAY_S) -> list[float]:
    """The pauses between start-up attempts (one fewer than the attempts), adding up to the whole wait.

    ``max_wait_s`` None: the default schedule (``attempts`` attempts). Smaller than its sum: the schedule cut
    so the pauses add up to ``max_wait_s``. Larger: extended with pauses ``max_delay_s`` apart until they do.
    """
    delays: list[float] = []
    total, delay = 0.0, first_delay_s
    while len(delays) < attempts - 1 or (max_wait_s is not None and total < max_wait_s):
        if max_wait_s is not None and total + delay > max_wait_s:
            delay = max_wait_s - total  # the last pause ends where the wait asked for ends
            if delay <= 1e-9:
                break
        delays.append(delay)
        total += delay
        delay = min(delay * 2, max_delay_s)
    return delays


#: The default wait, in seconds (243).
DEFAULT_READY_WAIT_S = sum(ready_delays())


def start_up_delays(max_wait_s: float | None) -> list[float]:
    """:func:`ready_delays` in real seconds: times ``OLMOCR_READY_WAIT_SCALE`` (1; tests make it small)."""
    scale = float(envs.value("OLMOCR_READY_WAIT_SCALE"))  # type: ignore[arg-type]
    if not scale > 0:
        raise envs.SettingValueError(f"OLMOCR_READY_WAIT_SCALE={scale:g} must be above 0; fix or unset it")
    return [d * scale for d in ready_delays(max_wait_s)]


@dataclass(frozen=True)
class ServerInfo:
    """One server as the pipeline sees it after verification."""

    base_url: str
    served_model: str
    max_model_len: int | None  # None: the server did not say (not vLLM, or an old one)
    version: str | None  # None: no /version
    guided_field: str  # STRUCTURED_OUTPUTS or GUIDED_REGEX_FIELD


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """``"0.32.0+cpu"`` -> ``(0, 32, 0)``; None when there is no leading dotted number."""
    return vllm_versions.parse_version(text)


def guided_field_for(version: str | None) -> str:
    """The request field that constrains output on a server of this version (the release table decides).

    Unknown versions get ``structured_outputs``: every vLLM of the last year understands it, and the
    only servers without ``/version`` we know of are not vLLM at all.
    """
    return vllm_versions.guided_field_for(parse_version(version))


def guided_fields(field: str, regex: str) -> dict[str, Any]:
    """The request's extra fields that ask for output matching ``regex``."""
    if field == GUIDED_REGEX_FIELD:
        return {GUIDED_REGEX_FIELD: regex}
    return {STRUCTURED_OUTPUTS: {"regex": regex}}


def parse_version_body(status: int, body: bytes) -> str | None:
    if status != 200:
        return None
    try:
        version = json.loads(body).get("version")
    except (ValueError, AttributeError):
        return None
    return str(version) if version else None


def image_tokens_bound(longest_dim: int) -> int:
    """At most how many tokens one page image costs: a square page (the worst case for a given longest
    side), each side rounded up to the next patch, plus the vision start/end tokens."""
    per_side = longest_dim // IMAGE_PATCH_PX + 1
    return per_side * per_side + 2


def prompt_tokens_bound(longest_dim: int) -> int:
    """A bound on a page request's prompt tokens: a byte-level BPE token covers at least one byte."""
    return image_tokens_bound(longest_dim) + len(PROMPT_V4_YAML.encode("utf-8")) + TEMPLATE_TOKENS


def plan_max_tokens(server_max_model_len: int | None, longest_dim: int,
                    wanted: int = DEFAULT_MAX_TOKENS) -> int:
    """``max_tokens`` for page requests: ``wanted``, capped so prompt + answer fit the server's context.

    Raises :class:`ServerMismatch` when less than :data:`MIN_USEFUL_MAX_TOKENS` would be left.
    """
    if server_max_model_len is None:
        return wanted
    room = server_max_model_len - prompt_tokens_bound(longest_dim)
    if room < MIN_USEFUL_MAX_TOKENS:
        need = prompt_tokens_bound(longest_dim) + wanted
        suggestion = 1 << (need - 1).bit_length()  # next power of two: 16384 for the defaults
        raise ServerMismatch(LOG_CONTEXT_TOO_SMALL % (server_max_model_len, longest_dim,
                                                      prompt_tokens_bound(longest_dim), MIN_USEFUL_MAX_TOKENS,
                                                      suggestion, suggestion))
    return min(wanted, room)


async def read_server_info(client: Any) -> ServerInfo:
    """Reads ``/v1/models`` and ``/version`` through ``client`` (a :class:`ServerClient`).

    Raises the client's ``ServerNotReady`` when its model (``client.model``, default ``olmocr``) is not
    served, and its ``TransportError`` when the server does not answer. A model named explicitly
    (``client.model_explicit``) is accepted, with a warning, where ``/v1/models`` is missing or lists
    nothing (some gateways): every answer's ``model`` field is checked anyway.
    """
    from olmocr.pipeline.servers.client import ModelListMissing

    model = getattr(client, "model", MODEL_NAME)
    try:
        models = await client.model_lengths()
    except ModelListMissing as exc:
        logger.warning(LOG_NO_MODEL_LIST, client.name, exc, model)
        models = {model: None}
        client.model_unlisted = True
    if not models and getattr(client, "model_explicit", False):
        logger.warning(LOG_EMPTY_MODEL_LIST, client.name, model)
        models = {model: None}
        client.model_unlisted = True
    if model not in models and MODEL_NAME in models and client.model_cards.get(MODEL_NAME, {}).get("root") == model:
        # ``--model allenai/olmOCR-...`` against an olmocr-serve server: the weights it serves as 'olmocr'.
        logger.info(LOG_SERVED_AS, client.name, model, MODEL_NAME)
        client.use_model(model := MODEL_NAME)
    if model not in models:
        if model == MODEL_NAME:
            raise ServerNotReady(LOG_NO_OLMOCR_MODEL % (MODEL_NAME, ", ".join(models) or "nothing", MODEL_NAME))
        raise ServerNotReady(LOG_MODEL_NOT_SERVED % (model, ", ".join(sorted(models)[:10]) or "nothing",
                                                     " ..." if len(models) > 10 else ""))
    version = await client.server_version()
    return ServerInfo(client.base_url, model, models[model], version, guided_field_for(version))
