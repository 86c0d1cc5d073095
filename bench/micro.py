"""The micro-benchmarks behind the pipeline's choices (issue 16): ``bench/run micro``.

Each figure is a per-operation CPU time (``time.process_time``: this process, all its threads) of two ways
to do one step, measured back to back in one run, as a ratio of the two:

1. **front matter**: the YAML front matter of a model answer (five fields) parsed with PyYAML's pure-Python
   ``SafeLoader`` and with libyaml's ``CSafeLoader`` (olmocr/pipeline/pages/prompts.py uses the latter);
2. **PNG**: pages spread over the corpus rendered by pdfium at 1288 px, then encoded by Pillow (which always
   runs PNG's adaptive row filter; deflate level 1) and by ``png_rgb`` (rows unfiltered, level 1:
   olmocr/pipeline/pages/render.py); the render alone is the comparison for Pillow's share;
3. **base64** of 350 KB of page PNG: the standard library's encoder and decoder against pybase64's (the
   codec vLLM decodes data URLs with), both decoders validating as vLLM's does;
4. **handing an image over**: a pebble pool of one process (as the render pool) runs jobs that return
   nothing, jobs that return 350 KB through pebble's pipe, and jobs that write 350 KB to a file (tmpfs when
   /dev/shm exists) and return its path, which the main process reads and removes: the main process's CPU
   per job, the three ways in turn, in rounds (4,000 jobs each way in 8 rounds; the median round);
5. **JSON**: a 3 KB chat-completion answer parsed with ``json`` and with ``orjson`` (when installed).

:func:`derive` turns the raw timings (the section's detail) into the figures, and :func:`quotes` into the
words docs/benchmarks.md quotes: tests/test_bench_report.py checks both against bench/results/micro.json.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

from bench.common import Corpus, Figure, log

SECTION = "micro"
TARGET_DIM = 1288
PAYLOAD_BYTES = 350_000
FRONT_MATTER = ("primary_language: en\nis_rotation_valid: True\nrotation_correction: 0\nis_table: False\n"
                "is_diagram: False\n")

#: name -> (unit, compared with); the values and ratios come from :func:`derive`.
FIGURES: dict[str, tuple[str, str]] = {
    "front matter, CSafeLoader": ("us", "pure-Python SafeLoader, same text"),
    "PNG encode, Pillow (adaptive filter)": ("ms", "the page's render plus Pillow's encode"),
    "PNG encode, png_rgb (unfiltered rows)": ("ms", "Pillow's encode of the same pages"),
    "base64 encode 350 KB, pybase64": ("ms", "the standard library's b64encode"),
    "base64 decode 350 KB, pybase64": ("ms", "the standard library's b64decode"),
    "350 KB through pebble's pipe: main-process CPU per job": ("ms", "a job with an empty result"),
    "350 KB in a file instead: main-process CPU per job": ("ms", "the same 350 KB through pebble's pipe"),
    "3 KB chat answer, orjson.loads": ("us", "json.loads"),
}


def _per_call(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """The median over ``repeats`` of the CPU seconds one call of ``fn`` takes (``calls`` in a row)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - t0) / calls)
    return statistics.median(times)


def _front_matter(repeats: int) -> dict[str, Any]:
    import yaml

    return {"fields": FRONT_MATTER.count("\n"),
            "safe_loader_s": _per_call(lambda: yaml.load(FRONT_MATTER, Loader=yaml.SafeLoader), 200, repeats),
            "c_safe_loader_s": _per_call(lambda: yaml.load(FRONT_MATTER, Loader=yaml.CSafeLoader), 200, repeats)}


def _pages(corpus: Corpus, count: int) -> tuple[dict[str, Any], bytes]:
    """Render, Pillow PNG and png_rgb CPU time per page over ``count`` corpus pages; and 350 KB of page PNG."""
    import pypdfium2
    from PIL import Image

    from olmocr.pipeline.pages.render import png_rgb

    render_s = pillow_s = ours_s = 0.0
    pillow_bytes = ours_bytes = 0
    pngs: list[bytes] = []
    every = corpus.page_list()
    pages = every[:: max(1, len(every) // count)][:count]  # spread over the corpus, in corpus order
    for path, index in pages:
        doc = pypdfium2.PdfDocument(str(path))
        try:
            page = doc[index]
            t0 = time.process_time()
            bitmap = page.render(scale=TARGET_DIM / max(page.get_size()), rev_byteorder=True)
            t1 = time.process_time()
            img = Image.frombuffer("RGB", (bitmap.width, bitmap.height), bitmap.buffer, "raw", "RGB",
                                   bitmap.stride, 1)
            buf = io.BytesIO()
            img.save(buf, "PNG", compress_level=1)
            t2 = time.process_time()
            ours = png_rgb(bitmap.width, bitmap.height, bitmap.buffer, bitmap.stride)
            t3 = time.process_time()
            render_s, pillow_s, ours_s = render_s + t1 - t0, pillow_s + t2 - t1, ours_s + t3 - t2
            pillow_bytes, ours_bytes = pillow_bytes + buf.tell(), ours_bytes + len(ours)
            pngs.append(ours)
            bitmap.close()
            page.close()
        finally:
            doc.close()
    n = len(pages)
    return ({"pages": n, "target_dim": TARGET_DIM, "render_s": render_s / n, "pillow_s": pillow_s / n,
             "png_rgb_s": ours_s / n, "pillow_kb": pillow_bytes / n / 1000, "png_rgb_kb": ours_bytes / n / 1000},
            (b"".join(pngs) * (1 + PAYLOAD_BYTES // max(1, sum(map(len, pngs)))))[:PAYLOAD_BYTES])


def _base64(payload: bytes, repeats: int) -> dict[str, Any]:
    import pybase64

    encoded = base64.b64encode(payload)
    assert pybase64.b64encode(payload) == encoded and pybase64.b64decode(encoded) == payload
    return {"bytes": len(payload),
            "stdlib_encode_s": _per_call(lambda: base64.b64encode(payload), 20, repeats),
            "stdlib_decode_s": _per_call(lambda: base64.b64decode(encoded, validate=True), 20, repeats),
            "pybase64_encode_s": _per_call(lambda: pybase64.b64encode(payload), 200, repeats),
            # validate=True: what the stand-in and vLLM do (and pybase64's fast path)
            "pybase64_decode_s": _per_call(lambda: pybase64.b64decode(encoded, validate=True), 200, repeats)}


_PAYLOAD = b""


def _job_empty() -> bytes:
    return b""


def _job_payload(size: int) -> bytes:
    global _PAYLOAD
    if len(_PAYLOAD) != size:
        _PAYLOAD = os.urandom(size)
    return _PAYLOAD


def _job_file(size: int, directory: str) -> str:
    fd, path = tempfile.mkstemp(dir=directory, prefix="olmocr-bench-micro-")
    with os.fdopen(fd, "wb") as f:
        f.write(_job_payload(size))
    return path


def _handover(jobs: int, rounds: int) -> dict[str, Any]:
    """Main-process CPU per job, each way in turn, ``rounds`` times (``jobs`` in all for each way)."""
    from pebble import ProcessPool

    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()

    def read_and_remove(path: str) -> None:
        with open(path, "rb") as f:
            assert len(f.read()) == PAYLOAD_BYTES
        os.unlink(path)

    ways: dict[str, tuple[Callable[[ProcessPool], Any], Callable[[Any], None]]] = {
        "empty_s": (lambda p: p.schedule(_job_empty), lambda r: None),
        "pipe_s": (lambda p: p.schedule(_job_payload, args=(PAYLOAD_BYTES,)), lambda r: None),
        "file_s": (lambda p: p.schedule(_job_file, args=(PAYLOAD_BYTES, shm)), read_and_remove)}
    out: dict[str, Any] = {"jobs": jobs, "rounds": rounds, "bytes": PAYLOAD_BYTES, "file_dir": shm,
                           **{k: [] for k in ways}}
    per_round = jobs // rounds
    with ProcessPool(max_workers=1) as pool:
        pool.schedule(_job_payload, args=(PAYLOAD_BYTES,)).result()  # the worker is up before the clock starts
        for _ in range(rounds):
            for key, (submit, take) in ways.items():
                t0 = time.process_time()
                pending: set = set()
                for _ in range(per_round):
                    pending.add(submit(pool))
                    if len(pending) >= 4:  # a bounded window, as the pipeline's render-ahead
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            take(fut.result())
                for fut in pending:
                    take(fut.result())
                out[key].append((time.process_time() - t0) / per_round)
    return out


def _chat_answer() -> str:
    text = " ".join(f"word{i}" for i in range(420))
    body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "olmocr",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"---\n{FRONT_MATTER}---\n{text}"}}],
            "usage": {"prompt_tokens": 1700, "completion_tokens": 750, "total_tokens": 2450}}
    return json.dumps(body)


def _json(repeats: int) -> dict[str, Any]:
    answer = _chat_answer()
    out: dict[str, Any] = {"bytes": len(answer), "json_s": _per_call(lambda: json.loads(answer), 500, repeats)}
    try:
        import orjson
    except ImportError:
        out["orjson_s"] = None
        out["orjson"] = "not installed (pip install orjson)"
    else:
        assert orjson.loads(answer) == json.loads(answer)
        out["orjson_s"] = _per_call(lambda: orjson.loads(answer), 500, repeats)
    return out


def handover(detail: dict[str, Any]) -> dict[str, Any]:
    """The handover timings with each way's rounds reduced to their median."""
    hand = dict(detail["handover"])
    for key in ("empty_s", "pipe_s", "file_s"):
        hand[key] = statistics.median(hand[key])
    return hand


def derive(detail: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """The figures (name -> value, ratio) from the raw timings."""
    fm, png, b64, js = (detail[k] for k in ("front_matter", "png", "base64", "json"))
    hand = handover(detail)
    orjson_s = js.get("orjson_s")
    return {
        "front matter, CSafeLoader": (fm["c_safe_loader_s"] * 1e6, fm["c_safe_loader_s"] / fm["safe_loader_s"]),
        "PNG encode, Pillow (adaptive filter)": (png["pillow_s"] * 1e3,
                                                 png["pillow_s"] / (png["render_s"] + png["pillow_s"])),
        "PNG encode, png_rgb (unfiltered rows)": (png["png_rgb_s"] * 1e3, png["png_rgb_s"] / png["pillow_s"]),
        "base64 encode 350 KB, pybase64": (b64["pybase64_encode_s"] * 1e3,
                                           b64["pybase64_encode_s"] / b64["stdlib_encode_s"]),
        "base64 decode 350 KB, pybase64": (b64["pybase64_decode_s"] * 1e3,
                                           b64["pybase64_decode_s"] / b64["stdlib_decode_s"]),
        "350 KB through pebble's pipe: main-process CPU per job": (hand["pipe_s"] * 1e3,
                                                                   hand["pipe_s"] / hand["empty_s"]),
        "350 KB in a file instead: main-process CPU per job": (hand["file_s"] * 1e3, hand["file_s"] / hand["pipe_s"]),
        "3 KB chat answer, orjson.loads": (None if orjson_s is None else orjson_s * 1e6,
                                           None if orjson_s is None else orjson_s / js["json_s"]),
    }


def _context(detail: dict[str, Any]) -> dict[str, str]:
    fm, png, b64, js = (detail[k] for k in ("front_matter", "png", "base64", "json"))
    hand = handover(detail)
    return {
        "front matter, CSafeLoader": f"SafeLoader {fm['safe_loader_s'] * 1e6:.0f} us; {fm['fields']} fields",
        "PNG encode, Pillow (adaptive filter)": (f"render {png['render_s'] * 1e3:.1f} ms; {png['pages']} pages at "
                                                 f"{png['target_dim']} px; {png['pillow_kb']:.0f} KB a page"),
        "PNG encode, png_rgb (unfiltered rows)": f"{png['png_rgb_kb']:.0f} KB a page; same pixels",
        "base64 encode 350 KB, pybase64": f"stdlib {b64['stdlib_encode_s'] * 1e3:.2f} ms",
        "base64 decode 350 KB, pybase64": f"stdlib {b64['stdlib_decode_s'] * 1e3:.2f} ms",
        "350 KB through pebble's pipe: main-process CPU per job": (f"empty result {hand['empty_s'] * 1e3:.2f} ms; "
                                                                   f"{hand['jobs']} jobs each, median of {hand['rounds']} rounds"),
        "350 KB in a file instead: main-process CPU per job": f"files in {hand['file_dir']}; read and removed",
        "3 KB chat answer, orjson.loads": (js.get("orjson") or "") + f" json.loads {js['json_s'] * 1e6:.1f} us",
    }


def quotes(detail: dict[str, Any]) -> list[str]:
    """The words docs/benchmarks.md uses for these figures (tests/test_bench_report.py looks for each)."""
    fm, png, b64, js = (detail[k] for k in ("front_matter", "png", "base64", "json"))
    hand = handover(detail)
    out = [f"takes {fm['safe_loader_s'] * 1e6:.0f} µs a page with the pure-Python loader and "
           f"{fm['c_safe_loader_s'] * 1e6:.0f} µs with libyaml's `CSafeLoader`",
           f"Pillow's PNG encoder takes {png['pillow_s'] * 1e3:.1f} ms of a {(png['render_s'] + png['pillow_s']) * 1e3:.1f} ms "
           f"page at {png['target_dim']} px",
           f"`png_rgb` takes {png['png_rgb_s'] * 1e3:.1f} ms",
           f"{png['png_rgb_kb']:.0f} KB a page against {png['pillow_kb']:.0f} KB",
           f"the standard library takes {b64['stdlib_encode_s'] * 1e3:.2f} ms to encode 350 KB and "
           f"{b64['stdlib_decode_s'] * 1e3:.2f} ms to decode it",
           f"pybase64 takes {b64['pybase64_encode_s'] * 1e3:.3f} and {b64['pybase64_decode_s'] * 1e3:.3f} ms",
           f"{hand['empty_s'] * 1e3:.2f} ms a job with an empty result and {hand['pipe_s'] * 1e3:.2f} ms with 350 KB",
           f"a file instead of the pipe takes {hand['file_s'] * 1e3:.2f} ms"]
    if js.get("orjson_s") is not None:
        out.append(f"{js['json_s'] * 1e6:.0f} µs with `json` and {js['orjson_s'] * 1e6:.0f} µs with `orjson`")
    return out


def run(corpus: Corpus, *, quick: bool = False) -> tuple[list[Figure], dict[str, Any]]:
    repeats = 3 if quick else 7
    log("micro: front matter")
    detail: dict[str, Any] = {"front_matter": _front_matter(repeats)}
    log("micro: PNG")
    detail["png"], payload = _pages(corpus, 8 if quick else 32)
    log("micro: base64")
    detail["base64"] = _base64(payload, repeats)
    log("micro: handing images over")
    detail["handover"] = _handover(400 if quick else 4000, 2 if quick else 8)
    log("micro: JSON")
    detail["json"] = _json(repeats)
    context = _context(detail)
    figs = [Figure(SECTION, name, value, FIGURES[name][0], FIGURES[name][1], ratio=ratio, context=context[name])
            for name, (value, ratio) in derive(detail).items()]
    return figs, detail
