"""One page through the model: the attempt loop (temperature ladder, rotation retries, text-layer fallback)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

from olmocr.envs import SERVED_MODEL_NAME
from olmocr.pipeline import defaults
from olmocr.pipeline.errors import FrontMatterError, RenderError, RequestRejected
from olmocr.pipeline.job_cancel import check_page_start
from olmocr.pipeline.model_prompt import PROMPT_V4_YAML
from olmocr.pipeline.pages.output import FallbackKind, PageResult
from olmocr.pipeline.pages.prompts import GUIDED_REGEX, PageResponse, parse_page_response
from olmocr.pipeline.pages.render import Renderer, RenderTimeLimit
from olmocr.pipeline.progress import Progress
from olmocr.pipeline.servers.checks import DEFAULT_MAX_TOKENS, STRUCTURED_OUTPUTS, guided_fields
from olmocr.pipeline.servers.fleet import INTERACTIVE, Fleet

logger = logging.getLogger(__name__)

#: Temperature for attempt n (later attempts use the last value): higher temperatures break repetition loops.
TEMPERATURE_BY_ATTEMPT = (0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0)
MAX_TOKENS = DEFAULT_MAX_TOKENS
_IMAGE_MARK = "@@OLMOCR_IMAGE@@"
# --- service2 (#32): interactive before batch ---
#: Pages of a priority-lane item (an olmocr-service job) go this much sooner (vLLM: lower = sooner) than the
#: run's ``--priority``. Without ``--priority`` no priority is sent: the server may not schedule by it.
INTERACTIVE_PRIORITY_STEP = 10


def interactive_priority(priority: int | None) -> int | None:
    """The priority of an interactive item's pages for a run sending ``priority`` (None: none sent)."""
    return None if priority is None else priority - INTERACTIVE_PRIORITY_STEP


def admission_priority(priority: int | None) -> int | None:
    """The priority the fleet's admission probe sends: any value but 0 proves the server schedules by
    priority (vLLM refuses it otherwise), and then the interactive value is accepted too; 0 proves nothing,
    so the probe sends the interactive value."""
    return interactive_priority(priority) if priority == 0 else priority
# --- end service2 ---


@dataclass(frozen=True)
class PageSettings:
    target_longest_image_dim: int = defaults.LONGEST_IMAGE_DIM
    max_page_retries: int = 8
    max_model_len: int = defaults.MAX_MODEL_LEN
    guided_decoding: bool = False
    #: ``max_tokens`` of every request: MAX_TOKENS, or less where the server's context is smaller
    #: (:func:`olmocr.pipeline.servers.checks.plan_max_tokens`).
    max_tokens: int = MAX_TOKENS
    #: The request field that constrains output on this server (``structured_outputs`` or ``guided_regex``).
    guided_field: str = STRUCTURED_OUTPUTS
    priority: int | None = None  # vLLM's request priority (lower = sooner); None: the field is not sent


@dataclass(frozen=True)
class PageSource:
    """Where a page comes from: ``source`` is the user-facing path, ``local_path`` what the renderer opens."""

    source: str
    local_path: str
    kind: str
    page_num: int

    @property
    def label(self) -> str:
        return f"{self.source}-{self.page_num}"


def request_template(temperature: float, guided: bool, priority: int | None = None, *,
                     max_tokens: int = MAX_TOKENS, guided_field: str = STRUCTURED_OUTPUTS) -> tuple[bytes, bytes]:
    """Bytes before and after the base64 PNG in the request JSON (upstream's request, field for field,
    except that guided decoding uses the field the server understands)."""
    query: dict = {
        "model": SERVED_MODEL_NAME,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": PROMPT_V4_YAML},
                    {"type": "image_url", "image_url": {"url": _IMAGE_MARK}},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if guided:
        query.update(guided_fields(guided_field, GUIDED_REGEX))
    if priority is not None:
        query["priority"] = priority
    before, after = json.dumps(query).split(json.dumps(_IMAGE_MARK))
    return (before + '"data:image/png;base64,').encode(), ('"' + after).encode()


@dataclass(frozen=True)
class Attempt:
    """Outcome of one model call: ``response`` is None when the answer could not be used at all."""

    response: PageResponse | None
    input_tokens: int
    output_tokens: int
    valid: bool  # finish_reason == "stop" and total tokens within max_model_len
    problem: str | None = None  # why it cannot be used as it is (the reason a fallback page reports)


@dataclass
class _PageTally:
    """What one page's attempts cost, for its per-page record."""

    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    last_problem: str | None = None

    def add(self, attempt: Attempt) -> None:
        self.attempts += 1
        self.input_tokens += attempt.input_tokens
        self.output_tokens += attempt.output_tokens
        if attempt.problem is not None:
            self.last_problem = attempt.problem


class PageProcessor:
    """Runs pages through the model; shared by all workers."""

    def __init__(self, renderer: Renderer, fleet: Fleet, settings: PageSettings, progress: Progress) -> None:
        self.renderer = renderer
        self.fleet = fleet
        self.settings = settings
        self.progress = progress
        self._templates: dict[tuple[float, bool], tuple[bytes, bytes]] = {}
        #: Fallback pages of this run by FallbackKind.code (``/metrics``: olmocr_pipeline_pages_fallback_by_reason).
        self.fallback_by_reason: Counter[str] = Counter()

    def _template(self, temperature: float) -> tuple[bytes, bytes]:
        interactive = INTERACTIVE.get()
        found = self._templates.get((temperature, interactive))
        if found is None:
            priority = interactive_priority(self.settings.priority) if interactive else self.settings.priority
            found = self._templates[(temperature, interactive)] = request_template(
                temperature, self.settings.guided_decoding, priority,
                max_tokens=self.settings.max_tokens, guided_field=self.settings.guided_field)
        return found

    async def _try_once(self, page: PageSource, attempt: int, rotation: int) -> Attempt:
        """One attempt. RenderError propagates (deterministic), as does a refusal no resend can change."""
        temperature = TEMPERATURE_BY_ATTEMPT[min(attempt, len(TEMPERATURE_BY_ATTEMPT) - 1)]
        before, after = self._template(temperature)

        async def make_body() -> list[bytes]:
            check_page_start()  # svc-jobs (#32): a cancelled job's page not yet started goes no further
            image = await self.renderer.render(
                page.local_path, page.kind, page.page_num, self.settings.target_longest_image_dim, rotation
            )
            # Three pieces, not one joined copy: the HTTP client hands them to the socket in one write.
            return [before, image, after]

        try:
            data = await self.fleet.chat(make_body, page.label)
        except RequestRejected as exc:
            if not exc.retryable:
                raise  # the same request would be refused again: no attempts are spent on it
            logger.warning("%s attempt %d: %s", page.label, attempt, exc)
            return Attempt(None, 0, 0, False, f"the server refused the request ({exc})")
        input_tokens = output_tokens = 0
        try:
            usage = data.get("usage") or {}
            input_tokens = int(usage.get("prompt_tokens", 0) or 0)
            output_tokens = int(usage.get("completion_tokens", 0) or 0)
            total = int(usage.get("total_tokens", input_tokens + output_tokens) or 0)
            self.progress.add_tokens(input_tokens, output_tokens)
            choice = data["choices"][0]
            valid = choice.get("finish_reason") == "stop" and total <= self.settings.max_model_len
            response = parse_page_response(choice["message"]["content"] or "")
        except FrontMatterError as exc:
            logger.info("%s attempt %d: unusable answer (%s)", page.label, attempt, exc)
            return Attempt(None, input_tokens, output_tokens, False, f"unusable answer: {exc}")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("%s attempt %d: malformed completion (%s: %s)", page.label, attempt, type(exc).__name__, exc)
            return Attempt(None, input_tokens, output_tokens, False,
                           f"malformed completion ({type(exc).__name__}: {exc})")
        if not valid:
            logger.info("%s attempt %d: finish_reason=%s, %d tokens", page.label, attempt,
                        choice.get("finish_reason"), total)
            return Attempt(response, input_tokens, output_tokens, False,
                           f"finish_reason={choice.get('finish_reason')}, {total} tokens "
                           f"(--max_model_len {self.settings.max_model_len})")
        return Attempt(response, input_tokens, output_tokens, True)

    def _result(self, page: PageSource, attempt: Attempt, tally: _PageTally, rotation: int) -> PageResult:
        assert attempt.response is not None
        self.progress.page_done(fallback=False)
        return PageResult(page.source, page.page_num, attempt.response, attempt.input_tokens,
                          attempt.output_tokens, is_fallback=False, attempts=tally.attempts,
                          spent_input_tokens=tally.input_tokens, spent_output_tokens=tally.output_tokens,
                          rotation_applied=rotation)

    async def _fallback(self, page: PageSource, reason: str, kind: FallbackKind, tally: _PageTally) -> PageResult:
        text = await self.renderer.text(page.local_path, page.kind, page.page_num)
        # The server's verdicts count toward the early stop (progress.FailFast); a page that cannot be rendered
        # (or not in time) does not.
        rendering = kind in (FallbackKind.UNRENDERABLE, FallbackKind.RENDER_TIME_LIMIT)
        self.progress.page_done(fallback=True, failure=None if rendering else kind.value)
        self.fallback_by_reason[kind.code] += 1
        response = PageResponse(primary_language=None, is_rotation_valid=True, rotation_correction=0,
                                is_table=False, is_diagram=False, natural_text=text)
        return PageResult(page.source, page.page_num, response, 0, 0, is_fallback=True, fallback_reason=reason,
                          fallback_kind=kind, attempts=tally.attempts, spent_input_tokens=tally.input_tokens,
                          spent_output_tokens=tally.output_tokens)

    async def process(self, page: PageSource) -> PageResult:
        """The page's result: the model's answer, or after ``max_page_retries`` failed attempts its text layer.

        An answer saying the rotation is invalid makes the next attempts send the image rotated
        counter-clockwise by the cumulative ``rotation_correction``. If every attempt said "rotate" but at
        least the last answer was otherwise valid, that answer is used (as upstream does).
        """
        retries = max(1, self.settings.max_page_retries)
        rotation = 0
        tally = _PageTally()
        last: Attempt | None = None
        last_rotation = 0
        try:
            for attempt in range(retries):
                last, last_rotation = await self._try_once(page, attempt, rotation), rotation
                tally.add(last)
                if last.response is None:
                    self.progress.attempts_failed += 1
                    continue
                if last.valid and last.response.is_rotation_valid:
                    return self._result(page, last, tally, rotation)
                if not last.response.is_rotation_valid:
                    rotation = (rotation + last.response.rotation_correction) % 360
                    if last.valid:
                        tally.last_problem = f"the model kept asking to turn the page (last: {rotation} degrees)"
                    logger.info("%s: model says rotation is invalid; retrying rotated %d degrees", page.label, rotation)
        except RenderError as exc:
            kind = FallbackKind.RENDER_TIME_LIMIT if isinstance(exc, RenderTimeLimit) else FallbackKind.UNRENDERABLE
            logger.warning("%s: cannot render (%s); using the text layer", page.label, exc)
            return await self._fallback(page, f"page {page.page_num}: {exc}", kind, tally)
        except RequestRejected as exc:
            tally.attempts += 1
            logger.warning("%s: the server refuses this request (%s); no retry can change that, using the "
                           "text layer", page.label, exc)
            return await self._fallback(page, f"page {page.page_num}: {exc}", FallbackKind.REFUSED, tally)
        if last is not None and last.valid and last.response is not None:
            return self._result(page, last, tally, last_rotation)
        logger.warning("%s: no usable answer after %d attempts; using the text layer", page.label, retries)
        problem = f" (last: {tally.last_problem})" if tally.last_problem else ""
        return await self._fallback(page, f"page {page.page_num}: no usable model answer after {retries} attempts"
                                    f"{problem}", FallbackKind.NO_MODEL_ANSWER, tally)
