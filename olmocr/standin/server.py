"""A stand-in for ``vllm serve`` (no GPU): same command line, same HTTP surface, controllable faults.

Launched exactly as vLLM is: ``olmocr-standin-vllm serve MODEL --served-model-name olmocr --port P ...``.
Stdlib only. Answers are canned filler text, or with ``answer: read`` what Tesseract reads on the page
image (:mod:`olmocr.standin.reading`: Tesseract, not olmOCR). See docs/standin.md.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from olmocr.server import vllm_versions
from olmocr.standin import answer as ans
from olmocr.standin import reading
from olmocr.standin.control import Control
from olmocr.standin.provider import Gate, api_path

VLLM_COMPAT_VERSION = "0.32.0"  # the default of the ``vllm_version`` control
#: The usage line vLLM's argparse prints before an error.
VLLM_SERVE_USAGE = ("usage: vllm [-h] [-v]\n"
                    "            {chat,complete,serve,launch,bench,collect-env,download-kernels,preload,run-batch,"
                    "snapshot}\n            ...\n")
DEFAULT_MAX_MODEL_LEN = 16384
#: Which request fields constrain output in the release played, and which flags it lacks: the release
#: table (olmocr/server/vllm_versions.py, checked against the releases' sources).
#: Flags of the table that take no value (``--flag`` alone), for vLLM's "unrecognized arguments" message.
_BOOLEAN_FLAGS = ("--disable-log-requests", "--enable-log-requests")
_REMOVED_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                          "guided_decoding_backend", "guided_whitespace_pattern")

# The "EngineCore" child: sleeps forever, ignores SIGINT, dies on SIGTERM/SIGKILL. It does NOT notice
# its parent's death (no setsid, no parent-death signal), like a vLLM engine orphaned holding GPU memory.
ENGINE_SRC = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(3600)\n"

_print_lock = threading.Lock()


def log(level: str, msg: str) -> None:
    stamp = time.strftime("%m-%d %H:%M:%S")
    with _print_lock:
        sys.stdout.write(f"{level} {stamp} [standin] {msg}\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------- args
# vLLM flags that take a value: declared so that their values are never mistaken for MODEL.
_VALUE_FLAGS = (
    "--tensor-parallel-size", "--data-parallel-size", "--pipeline-parallel-size", "--gpu-memory-utilization",
    "--limit-mm-per-prompt", "--max-num-seqs", "--max-num-batched-tokens", "--dtype", "--quantization",
    "--tokenizer", "--revision", "--download-dir", "--seed", "--chat-template", "--mm-processor-kwargs",
    "--kv-cache-dtype", "--swap-space", "--root-path", "--allowed-origins", "--config",
)


def build_parser(version: str = VLLM_COMPAT_VERSION) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="olmocr-standin-vllm",
        description="Stand-in for `vllm serve` (NOT vLLM: no model, no GPU). Unknown vLLM flags are ignored.",
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=played_version_text(version),
                   help="the vLLM version played (control vllm_version, env OLMOCR_STANDIN_VLLM_VERSION)")
    p.add_argument("command", choices=["serve"], help="only `serve` is supported")
    p.add_argument("model", nargs="?", default=None, help="model name or path (not loaded)")
    p.add_argument("--model", dest="model_flag", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    p.add_argument("--uvicorn-log-level", default="info")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="priority: waiting requests are served by their 'priority' field (lower first), as vLLM")
    p.add_argument("--shutdown-timeout", type=int, default=0,
                   help="on SIGTERM, finish in-flight requests for up to this many seconds (vLLM >= 0.18)")
    p.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM), as vLLM")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM), as vLLM")
    p.add_argument("--answer", default=None, metavar="MODE",
                   help="the `answer` control's value (beats OLMOCR_STANDIN_ANSWER): ok (canned text, the default), "
                        "read (OCR of the image by Tesseract, not olmOCR), garbage, length, mixed:K, abort:K")
    for flag in _VALUE_FLAGS:
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    return p


def played_version_text(version: str) -> str:
    """What ``--version`` prints and ``GET /version`` answers."""
    return f"{version}+standin"


def flags_the_release_lacks(argv: list[str], version: str) -> list[str]:
    """The arguments vLLM ``version`` would call unrecognized: the release table's flags it does not
    define, each with its value (the table: olmocr/server/vllm_versions.py)."""
    played = vllm_versions.parse_version(version)
    if played is None:
        return []
    missing = set(vllm_versions.flags_missing_in(played))
    rejected: list[str] = []
    i = 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in missing:
            takes_value = name not in _BOOLEAN_FLAGS and "=" not in argv[i]
            rejected += argv[i:i + 2] if takes_value else argv[i:i + 1]
            i += 2 if takes_value else 1
        else:
            i += 1
    return rejected


def parse_args(argv: list[str] | None, version: str = VLLM_COMPAT_VERSION) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(version)
    rejected = flags_the_release_lacks(argv, version)
    if rejected:  # as vLLM 0.32's argparse does: usage, then "vllm: error: unrecognized arguments: ...", exit 2
        sys.stderr.write(VLLM_SERVE_USAGE)
        parser.exit(2, f"vllm: error: unrecognized arguments: {' '.join(rejected)}\n")
    args, unknown = parser.parse_known_args(argv)
    if args.api_key is not None:
        parser.exit(2, "olmocr-standin-vllm: error: --api-key is not accepted (it would be visible in ps); "
                       "set the VLLM_API_KEY environment variable instead\n")
    args.model = args.model or args.model_flag
    if not args.model:
        parser.error("a MODEL is required: serve MODEL [options]")
    args.served_name = args.served_model_name[0] if args.served_model_name else args.model
    args.ignored = unknown
    return args


# -------------------------------------------------------------------------------------------- state
class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.inflight: set[Any] = set()  # handlers of completions not yet answered (a drain waits for them)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = {"stop": 0, "length": 0}
        self.requests_served = 0
        self.completions_seen = 0  # completions that reached the engine (for error_rate)
        self.queue: list[tuple[int, int, threading.Event]] = []  # waiting (priority, arrival, grant), a heap
        self.priorities: dict[str, int] = {}  # completions served, by their priority field
        self.image_requests_served = 0  # completions with an image (pages, not probes)
        self.arrivals = 0
        self.answers = 0  # answers produced (for answer=mixed:k)
        self.gate = Gate()  # a provider's quota and Retry-After promises


class StandIn:
    def __init__(self, args: argparse.Namespace, control: Control) -> None:
        self.args = args
        self.control = control
        self.stats = Stats()
        self.started = time.monotonic()
        self.api_key = os.environ.get("VLLM_API_KEY") or None
        self.engine: subprocess.Popen[bytes] | None = None
        self.shutdown = threading.Event()  # stop now: in-flight requests are aborted
        self.draining = threading.Event()  # SIGTERM under --shutdown-timeout: finish in-flight, refuse new
        self.exiting = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.port = args.port
        self.warned_guided = False
        self.reader: reading.Reader | None = None  # reading mode's Tesseract, found on first use
        self.reader_lock = threading.Lock()

    def read_image(self, data: bytes) -> reading.Reading:
        """Reading mode: Tesseract's reading of ``data`` (TesseractMissing when it is not installed)."""
        with self.reader_lock:
            if self.reader is None:
                self.reader = reading.Reader.find()
                log("INFO", f"reading mode: page images are read by {self.reader.label}")
        return self.reader.read(data)

    def version(self) -> str:
        return str(self.control.get("vllm_version") or VLLM_COMPAT_VERSION)

    def version_tuple(self) -> tuple[int, ...]:
        return vllm_versions.parse_version(self.version()) or vllm_versions.NEWEST_TESTED

    # names and logging
    def served_name(self) -> str:
        override = self.control.get("served_model_name")
        return str(override) if override else self.args.served_name

    def access_log_enabled(self) -> bool:
        return str(self.args.uvicorn_log_level).lower() in ("trace", "debug", "info")

    # engine
    def start_engine(self) -> None:
        self.engine = subprocess.Popen(
            [sys.executable, "-c", ENGINE_SRC, "olmocr-standin-engine"],
            stdin=subprocess.DEVNULL, close_fds=True,
        )
        log("INFO", f"EngineCore (stand-in) started, pid={self.engine.pid}")
        threading.Thread(target=self._watch_engine, name="engine-watch", daemon=True).start()

    def stop_engine(self) -> None:
        eng = self.engine
        if eng is None or eng.poll() is not None:
            return
        eng.terminate()
        try:
            eng.wait(timeout=5)
        except subprocess.TimeoutExpired:
            eng.kill()
            eng.wait(timeout=5)

    def _watch_engine(self) -> None:
        assert self.engine is not None
        rc = self.engine.wait()
        # A group-wide SIGTERM can reach the engine just before us: give our own handler a moment.
        if self.shutdown.wait(1.0) or self.exiting.locked():
            return
        code = int(self.control.get("crash_exit_code") or 0)
        log("ERROR", f"Engine core proc died unexpectedly (status {rc}), shutting down API server")
        self.exit_now(code)

    # exiting
    def exit_now(self, code: int) -> None:
        if not self.exiting.acquire(blocking=False):
            threading.Event().wait()  # another thread is already exiting the process
        try:
            self.stop_engine()
        finally:
            sys.stdout.flush()
            os._exit(code)

    def crash(self, reason: str) -> None:
        code = int(self.control.get("crash_exit_code") or 0)
        log("ERROR", f"{reason}: exiting with status {code}")
        self.exit_now(code)

    def ticker(self) -> None:
        last_refresh = 0.0
        while not self.shutdown.is_set() and not self.exiting.locked():
            now = time.monotonic()
            if now - last_refresh >= 0.5:
                self.control.refresh()
                last_refresh = now
            crash_after = self.control.get("crash_after")
            if crash_after is not None and now - self.started >= float(crash_after):
                self.crash(f"crash_after={crash_after}s reached")
            if self.control.get("crash_now"):
                self.crash("crash_now requested")
            time.sleep(0.1)

    # gate
    def acquire_slot(self, handler: Handler, priority: int = 0) -> bool:
        """Wait for one of ``concurrency`` slots. Waiting requests are served in arrival order, or by
        (priority, arrival) under ``--scheduling-policy priority`` as vLLM's scheduler does (a running
        request is never preempted here: the stand-in has no KV cache to run out of). A freed slot is handed
        to the head of the queue directly (one wake-up, not one per waiter)."""
        st = self.stats
        with st.lock:
            if not st.queue and self._has_room():
                st.running += 1
                return True
            st.arrivals += 1
            granted = threading.Event()
            rank = priority if self.args.scheduling_policy == "priority" else 0
            heapq.heappush(st.queue, (rank, st.arrivals, granted))
            st.waiting = len(st.queue)
        while not granted.wait(0.2):
            with st.lock:
                self._hand_over()  # the concurrency limit may have been raised meanwhile
            if handler.client_gone():
                with st.lock:
                    if not granted.is_set():
                        st.queue = [w for w in st.queue if w[2] is not granted]
                        heapq.heapify(st.queue)
                        st.waiting = len(st.queue)
                        return False
                self.release_slot()  # granted just as the client left
                return False
        return True

    def _has_room(self) -> bool:
        limit = self.control.get("concurrency")
        return not limit or self.stats.running < int(limit)

    def _hand_over(self) -> None:
        """Give free slots to the head of the queue (caller holds the lock)."""
        st = self.stats
        while st.queue and self._has_room():
            st.running += 1
            heapq.heappop(st.queue)[2].set()
        st.waiting = len(st.queue)

    def release_slot(self) -> None:
        with self.stats.lock:
            self.stats.running -= 1
            self._hand_over()


# ------------------------------------------------------------------------------------------ handler
def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    sys_version = ""
    disable_nagle_algorithm = True
    app: StandIn  # set on the subclass made in serve()
    constrained = False  # this request's output is constrained to the front matter
    image_data: bytes | None = None  # the request's first image (what reading mode reads)
    fingerprint: str | None = None  # reading mode: who wrote the answer (the completion's system_fingerprint)

    # -- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence default stderr log
        return

    def send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):  # TLS handshake in this thread, not in accept()
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()

    def client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                # The raw socket's recv: peeks at TCP bytes under TLS too (EOF = the client left).
                return socket.socket.recv(self.connection, 1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
        return False

    def read_body(self) -> None:
        """Read the whole body first, so an early error answer never desyncs a keep-alive connection."""
        length = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(length) if length > 0 else b""

    def read_json(self) -> Any:
        return json.loads(self._body or b"null")

    def authorized(self) -> bool:
        key = self.app.api_key
        if not key:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {key}"

    def dispatch(self, method: str) -> None:
        self._status = 0
        t0 = time.monotonic()
        path = self.path.split("?", 1)[0]
        try:
            self.route(method, path)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a stand-in must keep serving
            log("ERROR", f"{method} {path}: {type(exc).__name__}: {exc}")
            if not self._status:
                self.send_json(500, error_body("internal stand-in error", "InternalServerError", 500))
        ms = (time.monotonic() - t0) * 1000
        status = self._status
        if self.app.access_log_enabled() or status >= 500 or status == 0:
            level = "INFO" if status and status < 500 else "WARNING"
            log(level, f'{self.client_address[0]}:{self.client_address[1]} - "{method} {path}" '
                       f"{status or 'aborted'} {ms:.1f}ms")

    def do_GET(self) -> None:  # noqa: N802
        self.dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self.dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self.dispatch("POST")

    # -- routes
    def route(self, method: str, path: str) -> None:
        app = self.app
        app.control.refresh()
        self._body = b""
        self.image_data = None
        self.fingerprint = None
        if method == "POST":
            self.read_body()
        if not path.startswith("/admin"):
            prefix = app.control.get("path_prefix")
            mapped = api_path(path, prefix)
            if mapped is None:  # a provider: only its API path exists (no /health, /metrics, /v1)
                self.send_json(404, {"detail": "Not Found"})
                return
            path = mapped
        if path in ("/v1", "/admin") or path.startswith(("/v1/", "/admin/")):
            if not self.authorized():
                self.send_json(401, {"error": "Unauthorized"})
                return
        if method in ("GET", "HEAD"):
            if path == "/health":
                status = int(app.control.get("health_status") or 200)
                self.send_bytes(status, b"", "application/json")
            elif path == "/version":
                self.send_json(200, {"version": played_version_text(app.version())})
            elif path == "/metrics":
                self.send_bytes(200, self.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/v1/models":
                if app.control.get("models_missing"):
                    self.send_json(404, {"detail": "Not Found"})
                else:
                    self.send_json(200, self.models_body())
            elif path == "/admin/control":
                self.send_json(200, app.control.snapshot())
            elif path == "/admin/info":
                self.send_json(200, self.info_body())
            else:
                self.send_json(404, {"detail": "Not Found"})
        elif method == "POST":
            if path == "/v1/chat/completions":
                self.chat_completions()
            elif path == "/admin/control":
                self.admin_control()
            else:
                self.send_json(404, {"detail": "Not Found"})

    def models_body(self) -> dict[str, Any]:
        name = self.app.served_name()
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": self.app.args.model, "parent": None, "max_model_len": self.app.args.max_model_len,
            "permission": [],
        }]}

    def info_body(self) -> dict[str, Any]:
        app = self.app
        eng = app.engine
        return {
            "pid": os.getpid(), "engine_pid": eng.pid if eng else None, "served_model_name": app.served_name(),
            "model": app.args.model, "port": app.port, "host": app.args.host,
            "max_model_len": app.args.max_model_len, "control": app.control.snapshot(),
            "requests_served": app.stats.requests_served, "completions_seen": app.stats.completions_seen,
            "priorities": dict(app.stats.priorities),
            "image_requests_served": app.stats.image_requests_served,
            "scheduling_policy": app.args.scheduling_policy, "uptime_s": round(time.monotonic() - app.started, 3),
            "standin": True, "tmpdir": os.environ.get("TMPDIR"),
            "answers_by": (app.reader.label if app.reader and app.control.get("answer") == "read"
                           else "canned text (stand-in, not a model)"),
            # Where a deployment placed this server (one per GPU: olmocr/server/expansion.py).
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **app.stats.gate.info(),  # a provider's 429s and requests that came before their Retry-After
        }

    def metrics_text(self) -> str:
        st = self.app.stats
        labels = f'engine="0",model_name="{self.app.served_name()}"'
        with st.lock:
            running, waiting = st.running, st.waiting
            prompt, gen = st.prompt_tokens, st.generation_tokens
            success = dict(st.success)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(waiting)}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {float(prompt)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {float(gen)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason, n in sorted(success.items()):
            lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {float(n)}')
        return "\n".join(lines) + "\n"

    def admin_control(self) -> None:
        try:
            patch = self.read_json()
        except ValueError:
            self.send_json(400, error_body("body must be JSON", "BadRequestError", 400))
            return
        if not isinstance(patch, dict):
            self.send_json(400, error_body("body must be a JSON object", "BadRequestError", 400))
            return
        merged = self.app.control.update(patch)
        self.send_json(200, merged)
        if merged.get("crash_now"):
            self.wfile.flush()
            self.app.crash("crash_now requested")

    # -- completions
    def chat_completions(self) -> None:
        app = self.app
        if app.draining.is_set():  # vLLM during --shutdown-timeout: new requests fail at once
            self.send_json(500, error_body("The server is shutting down.", "InternalServerError", 500))
            return
        refused = app.stats.gate.check(app.control)
        if refused is not None:
            status, retry_after = refused
            body = json.dumps(error_body("Rate limit exceeded (stand-in quota)", "RateLimitError", status)).encode()
            self._status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Retry-After", retry_after)
            self.end_headers()
            self.wfile.write(body)
            return
        with app.stats.lock:
            app.stats.inflight.add(self)
        try:
            self._chat_completions()
        finally:
            with app.stats.lock:
                app.stats.inflight.discard(self)

    def _chat_completions(self) -> None:
        app = self.app
        try:
            req = self.read_json()
        except ValueError as exc:
            self.send_json(400, error_body(f"invalid JSON body: {exc}", "BadRequestError", 400))
            return
        if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
            self.send_json(400, error_body("`messages` is required", "BadRequestError", 400, "messages"))
            return
        served = app.served_name()
        model = req.get("model")
        if model is not None and model != served:
            self.send_json(404, error_body(f"The model `{model}` does not exist.", "NotFoundError", 404, "model"))
            return
        text_chars, images = self.parse_messages(req["messages"])
        prompt_tokens = ans.estimate_prompt_tokens(text_chars, images)
        max_len = app.args.max_model_len
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
        # vLLM 0.32's checks: max_tokens above the context, or a prompt that alone overflows it, is a 400;
        # otherwise max_tokens is silently lowered to what is left.
        if max_tokens is not None and int(max_tokens) > max_len:
            self.send_json(400, error_body(
                f"max_tokens={int(max_tokens)} cannot be greater than max_model_len={max_len}. "
                f"Please request fewer output tokens.", "BadRequestError", 400, "max_tokens"))
            return
        try:
            priority = int(req.get("priority") or 0)
        except (TypeError, ValueError):
            self.send_json(400, error_body("`priority` must be an integer", "BadRequestError", 400, "priority"))
            return
        if priority != 0 and app.args.scheduling_policy != "priority":
            self.send_json(400, error_body(f"Got priority {priority} but Priority scheduling is not enabled.",
                                           "BadRequestError", 400, "priority"))
            return
        if prompt_tokens > max_len:
            self.send_json(400, error_body(
                f"This model's maximum context length is {max_len} tokens. However, your prompt contains "
                f"{prompt_tokens} input tokens, which exceeds this limit even without any output tokens. "
                "Please reduce the length of the input prompt.", "BadRequestError", 400, "input_tokens"))
            return
        max_tokens = max_len - prompt_tokens if max_tokens is None else min(int(max_tokens), max_len - prompt_tokens)
        self.constrained = self.output_constrained(req)
        if not app.acquire_slot(self, priority):
            self.close_connection = True
            return
        try:
            self.complete(req, served, images, prompt_tokens, max_tokens, priority)
        finally:
            app.release_slot()

    def output_constrained(self, req: dict[str, Any]) -> bool:
        """True if the request asks for the front matter in a field this vLLM version honours."""
        version = self.app.version_tuple()
        structured = req.get("structured_outputs")
        if isinstance(structured, dict) and structured.get("regex") and vllm_versions.has("structured_outputs", version):
            return True
        present = sorted(f for f in _REMOVED_GUIDED_FIELDS if f in req)
        if present and not vllm_versions.has("guided_regex", version):
            if not self.app.warned_guided:  # vLLM: logger.warning_once
                self.app.warned_guided = True
                log("WARNING", f"Request contains the removed guided-decoding field(s) {present}, which are "
                               "ignored; output will NOT be constrained. Use `structured_outputs` (or "
                               "`response_format`) instead; see docs/features/structured_outputs.md.")
            return False
        return bool(req.get("guided_regex"))

    def wait_while_hung(self) -> bool:
        """Block while the stand-in is told to hang; False if the client left or we are shutting down."""
        app = self.app
        while app.control.get("hang"):
            if app.shutdown.is_set() or self.client_gone():
                self.close_connection = True
                return False
            select.select([self.connection], [], [], 0.25)
            app.control.refresh()
        return True

    def parse_messages(self, messages: list[Any]) -> tuple[int, list[ans.ImageInfo]]:
        text_chars = 0
        images: list[ans.ImageInfo] = []
        for msg in messages:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                text_chars += len(content)
                continue
            for part in content or []:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    text_chars += len(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    url = (part.get("image_url") or {}).get("url", "")
                    data = ans.decode_data_url(str(url))
                    if data is not None:
                        images.append(ans.inspect_image(data))
                        if self.image_data is None:
                            self.image_data = data
        return text_chars, images

    def complete(self, req: dict[str, Any], served: str, images: list[ans.ImageInfo],
                 prompt_tokens: int, max_tokens: int, priority: int = 0) -> None:
        app = self.app
        ctl = app.control
        st = app.stats
        with st.lock:
            n = st.completions_seen
            st.completions_seen += 1
        rate = float(ctl.get("error_rate") or 0.0)
        if rate > 0 and int((n + 1) * rate) > int(n * rate):
            status = int(ctl.get("error_status") or 500)
            self.send_json(status, error_body(f"stand-in injected error ({status})",
                                              _ERROR_TYPES.get(status, "InternalServerError"), status))
            return
        if not self.wait_while_hung():
            return
        latency = float(ctl.get("latency") or 0.0)
        if latency > 0:
            time.sleep(latency)
        # A hung engine also freezes the requests it was already generating: none of them may finish.
        if not self.wait_while_hung():
            return
        try:
            content, finish = self.answer_text(images[0] if images else None, max_tokens)
        except (reading.TesseractMissing, RuntimeError) as exc:
            log("ERROR", f"reading mode ({reading.LABEL}): {exc}")
            self.send_json(500, error_body(f"stand-in reading mode: {exc}", "InternalServerError", 500))
            return
        completion_tokens = min(max_tokens, ans.count_tokens(content)) if max_tokens > 0 else 0
        st.gate.spend(prompt_tokens + completion_tokens)
        with st.lock:
            st.prompt_tokens += prompt_tokens
            st.generation_tokens += completion_tokens
            st.success[finish] = st.success.get(finish, 0) + 1
            st.requests_served += 1
            st.priorities[str(priority)] = st.priorities.get(str(priority), 0) + 1
            st.image_requests_served += int(bool(images))
        self.send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": ctl.get("answer_model") or served, "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "tool_calls": []},
                         "logprobs": None, "finish_reason": finish, "stop_reason": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    def answer_text(self, image: ans.ImageInfo | None, max_tokens: int) -> tuple[str, str]:
        ctl = self.app.control
        st = self.app.stats
        output_tokens = int(ctl.get("output_tokens") or 0)
        mode = str(ctl.get("answer") or "ok")
        with st.lock:
            st.answers += 1
            k_th = st.answers
        if mode == "read" and image is not None and self.image_data is not None and reading.is_image(self.image_data):
            return self.read_answer(self.image_data, max_tokens)
        garbage = mode == "garbage"
        if mode.startswith(("mixed:", "abort:")):
            try:
                every = max(1, int(mode.split(":", 1)[1]))
            except ValueError:
                every = 2
            if mode.startswith("mixed:"):
                garbage = k_th % every == 0
            elif k_th % every == 0:  # vLLM stopping with this request running: cut short, finish "abort"
                return ans.front_matter()[:20], "abort"
        # Output under structured outputs / honoured guided_regex starts with the front matter.
        garbage = garbage and not self.constrained
        valid, correction = True, 0
        if image is not None and str(ctl.get("rotation")) == "landscape" and image.width > image.height:
            valid, correction = False, 90
        body = ans.page_text(image, output_tokens)
        if ctl.get("answer_model"):  # a silent switch: its text says so, so tests can tell it was never written
            body = f"Written by {ctl.get('answer_model')}. " + body
        content = body if garbage else ans.front_matter(rotation_valid=valid, rotation_correction=correction) + body
        finish = "length" if mode == "length" else "stop"
        return self.cut(content, finish, max_tokens)

    @staticmethod
    def cut(content: str, finish: str, max_tokens: int) -> tuple[str, str]:
        """An answer longer than ``max_tokens`` is cut there, with ``finish_reason: length`` (as vLLM)."""
        if ans.count_tokens(content) > max_tokens:
            return content[: max(0, max_tokens) * 4], "length"
        return content, finish

    def read_answer(self, data: bytes, max_tokens: int) -> tuple[str, str]:
        """Reading mode: Tesseract's reading of the page in olmOCR's format (Tesseract, not olmOCR)."""
        page = self.app.read_image(data)  # TesseractMissing / RuntimeError: a 500 naming the cause
        assert self.app.reader is not None
        self.fingerprint = self.app.reader.label
        return self.cut(page.answer(), "stop", max_tokens)


# --------------------------------------------------------------------------------------------- main
def make_server(app: StandIn) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})

    tls: ssl.SSLContext | None = None
    if app.args.ssl_certfile:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(app.args.ssl_certfile, app.args.ssl_keyfile)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024
        allow_reuse_address = True

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            if tls is not None:
                sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return sock, addr

        def handle_error(self, request: Any, client_address: Any) -> None:
            exc = sys.exc_info()[1]
            if isinstance(exc, (ssl.SSLError, OSError)):  # e.g. a client that does not trust our certificate
                log("WARNING", f"{client_address[0]}:{client_address[1]} - connection failed: {exc}")
                return
            super().handle_error(request, client_address)

    return Server((app.args.host, app.args.port), handler)


def serve(args: argparse.Namespace) -> int:
    control = Control(command_line={"answer": args.answer} if args.answer else None)
    app = StandIn(args, control)
    if control.get("answer") == "read":
        try:
            app.reader = reading.Reader.find()
        except reading.TesseractMissing as exc:
            log("ERROR", f"answer=read (Tesseract, not olmOCR) cannot run: {exc}")
            return 2

    def on_signal(signum: int, _frame: Any) -> None:
        if args.shutdown_timeout > 0 and app.httpd is not None and not app.draining.is_set():
            app.draining.set()  # the main thread drains, then sets shutdown
        else:
            app.shutdown.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log("INFO", f"vLLM STAND-IN (not vLLM, no GPU) API server version {played_version_text(app.version())}")
    log("INFO", f"model={args.model!r} served_model_name={args.served_name!r} max_model_len={args.max_model_len}"
                + (f" (ignored flags: {' '.join(args.ignored)})" if args.ignored else ""))
    if app.reader is not None:
        log("INFO", f"reading mode: page images are read by {app.reader.label}: a check of the plumbing, "
                    "not of OCR quality")
    threading.Thread(target=app.ticker, name="ticker", daemon=True).start()
    app.start_engine()
    # Loading weights: the port stays closed (connection refused) for load_delay seconds.
    while not app.shutdown.is_set():
        delay = float(control.get("load_delay") or 0.0)
        if time.monotonic() - app.started >= delay:
            break
        app.shutdown.wait(0.05)
    if app.shutdown.is_set():
        log("INFO", "Shutting down before startup completed")
        app.exit_now(0)
    try:
        httpd = make_server(app)
    except OSError as exc:
        log("ERROR", f"[Errno {exc.errno}] error while attempting to bind on address "
                     f"({args.host!r}, {args.port}): {exc.strerror}")
        app.exit_now(1)
        return 1
    app.httpd = httpd
    app.port = httpd.server_address[1]
    log("INFO", f"Started server process [{os.getpid()}]")
    log("INFO", "Waiting for application startup.")
    log("INFO", "Application startup complete.")
    scheme = "https" if args.ssl_certfile else "http"
    log("INFO", f"Uvicorn running on {scheme}://{args.host}:{app.port} (Press CTRL+C to quit)")
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True).start()
    while not app.shutdown.wait(0.1):
        if app.draining.is_set():
            drain(app, args.shutdown_timeout)
            break
    log("INFO", "Shutting down")
    app.exit_now(0)
    return 0


def drain(app: StandIn, timeout: float) -> None:
    """vLLM's ``--shutdown-timeout``: wait for in-flight requests (new ones already fail), then stop."""
    def waited_for() -> int:
        # A request whose client has left is aborted, as vLLM aborts it on disconnect: nothing to wait for.
        with app.stats.lock:
            handlers = list(app.stats.inflight)
        return sum(1 for handler in handlers if not handler.client_gone())

    log("INFO", f"Graceful shutdown: waiting up to {timeout:g} s for {waited_for()} in-flight request(s)")
    deadline = time.monotonic() + timeout
    while waited_for() > 0 and time.monotonic() < deadline and not app.shutdown.is_set():
        time.sleep(0.05)
    if waited_for() > 0:
        log("WARNING", f"Shutdown timeout reached: aborting {waited_for()} in-flight request(s)")
    app.shutdown.set()


def main(argv: list[str] | None = None) -> int:
    # The release played decides which flags the command line may have (control file or environment).
    version = str(Control().get("vllm_version") or VLLM_COMPAT_VERSION)
    return serve(parse_args(argv, version))


if __name__ == "__main__":
    sys.exit(main())
