"""Every OLMOCR_* setting is read through olmocr/envs.py: no module reads one from the environment itself
(``os.environ.get("OLMOCR_...")``, ``env["OLMOCR_..."]``, ``os.getenv(...)``, a constant naming it, ...)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import olmocr
from olmocr import envs

PACKAGE = Path(olmocr.__file__).parent


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _names_a_setting(node: ast.expr, module: object) -> str | None:
    """The OLMOCR_* name ``node`` stands for: a string literal, or a constant of the module (or imported into it)."""
    value: object = None
    if isinstance(node, ast.Constant):
        value = node.value
    elif isinstance(node, ast.Name):
        value = getattr(module, node.id, None)
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        value = getattr(getattr(module, node.value.id, None), node.attr, None)
    # Test-only variables (envs.TEST_ONLY: fault injection, the test tiers) are not settings.
    return value if isinstance(value, str) and value.startswith("OLMOCR_") and value not in envs.TEST_ONLY else None


def _looks_like_environment(node: ast.expr) -> bool:
    """``os.environ``, ``environ``, ``env``, ``environ_``, ``self._env`` ...: a mapping of environment variables."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.lstrip("_").startswith("env")


def direct_reads() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "envs.py" and path.parent == PACKAGE:
            continue
        module = importlib.import_module(_module_name(path)) if path.name != "__main__.py" else None
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            key: ast.expr | None = None
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _looks_like_environment(node.value):
                key = node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                if node.func.attr in ("get", "pop", "setdefault") and _looks_like_environment(node.func.value):
                    key = node.args[0]
                elif node.func.attr == "getenv":
                    key = node.args[0]
            name = _names_a_setting(key, module) if key is not None else None
            if name:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} reads {name}")
    return found


def test_no_module_reads_an_olmocr_setting_from_the_environment_itself():
    reads = direct_reads()
    assert not reads, "read these through olmocr.envs (value / text / ...), not the environment:\n" + "\n".join(reads)
