"""The declared Python floor is the true one: setup.cfg's python_requires, ruff's target-version and the
README agree, and none is older than what the code uses (``asyncio.timeout``, ``asyncio.TaskGroup``:
Python 3.11). pip then refuses an older Python with its own message."""

from __future__ import annotations

import ast
import configparser
import re
import tomllib

from tests.standin_helpers import REPO_ROOT

#: Standard-library names the package uses and the Python that added them.
NEWER_STDLIB = {("asyncio", "timeout"): (3, 11), ("asyncio", "TaskGroup"): (3, 11), ("datetime", "UTC"): (3, 11)}


def declared_floor() -> tuple[int, int]:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    found = re.fullmatch(r">=\s*3\.(\d+)", config["options"]["python_requires"].strip())
    assert found, config["options"]["python_requires"]
    return 3, int(found.group(1))


def needed_floor() -> tuple[tuple[int, int], list[str]]:
    """The newest Python any olmocr/ module needs, and where."""
    need, where = (3, 0), []
    for path in sorted((REPO_ROOT / "olmocr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                version = NEWER_STDLIB.get((node.value.id, node.attr))
                if version:
                    where.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
                    need = max(need, version)
    return need, where


def test_the_declared_floor_covers_what_the_code_uses() -> None:
    need, where = needed_floor()
    assert where, "the scan finds nothing: it would pass vacuously"
    assert declared_floor() >= need, f"python_requires is below {need}, needed by {where}"


def test_ruff_and_the_readme_state_the_same_floor() -> None:
    major, minor = declared_floor()
    ruff = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    assert ruff == f"py{major}{minor}"
    assert re.findall(r"Python ≥ (3\.\d+)", (REPO_ROOT / "README.md").read_text()) == [f"{major}.{minor}"]
