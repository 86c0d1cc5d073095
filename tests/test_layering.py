"""The pipeline's import graph points one way: ``pages/`` uses ``servers/``, never the reverse; ``workspace/``
never uses ``servers/``; the pure server list does not pull in the network client. Read from the source
(every import statement, those inside functions and under ``TYPE_CHECKING`` included), so a lazy import
cannot slip past."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import olmocr

PACKAGE = Path(olmocr.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``). The package
    uses absolute imports only; a relative one is reported as such, so this test cannot overlook it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            assert not node.level, f"{path}:{node.lineno}: a relative import; write it absolute"
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _path_of(module: str) -> Path | None:
    relative = Path(*module.split("."))
    for candidate in (PACKAGE.parent / relative.with_suffix(".py"), PACKAGE.parent / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def reachable(module: str) -> set[str]:
    """The package's modules ``module`` imports, directly or through others (the package's own only)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        path = _path_of(todo.pop())
        if path is None:
            continue
        for name in imports_of(path):
            if name.startswith("olmocr") and name not in seen and _path_of(name) is not None:
                seen.add(name)
                todo.append(name)
    return seen


@pytest.mark.parametrize("package, below", [
    ("servers", "pages"),  # pages/ sends requests through servers/, never the reverse
    ("workspace", "servers"),  # storage and the queue know nothing of the servers
])
def test_a_package_does_not_import_the_one_above(package: str, below: str) -> None:
    modules = sorted((PACKAGE / "pipeline" / package).rglob("*.py"))
    assert len(modules) > 5, f"too few modules found under {package}/ to mean anything"
    above = f"olmocr.pipeline.{below}"
    upward = {f"{p.relative_to(PACKAGE.parent)}: {name}" for p in modules for name in imports_of(p)
              if name == above or name.startswith(above + ".")}
    assert not upward, (f"{package}/ sits below {below}/: pass what it needs in, or move it below both "
                        f"(as olmocr/pipeline/model_prompt.py): {sorted(upward)}")


def test_the_pipeline_never_imports_the_service() -> None:
    """olmocr-service is built on the pipeline (its workers are the pipeline's runner), never the reverse:
    what a --follow worker needs of a job (its cancel record) lives in olmocr/pipeline/job_cancel.py."""
    modules = sorted((PACKAGE / "pipeline").rglob("*.py"))
    upward = {f"{p.relative_to(PACKAGE.parent)}: {name}" for p in modules for name in imports_of(p)
              if name == "olmocr.service" or name.startswith("olmocr.service.")}
    assert not upward, f"olmocr/pipeline/ sits below olmocr/service/: {sorted(upward)}"


@pytest.mark.parametrize("module, forbidden", [
    ("olmocr.pipeline.servers.serverlist", "olmocr.pipeline.servers.client"),  # pure: the URL helpers are urls.py
    ("olmocr.pipeline.servers.serverlist", "olmocr.pipeline.servers.http"),
    ("olmocr.pipeline.servers.urls", "olmocr.pipeline.servers.client"),
    ("olmocr.pipeline.servers.membership", "olmocr.pipeline.servers.fleet"),  # the fleet uses it, not the reverse
])
def test_a_module_does_not_reach_another(module: str, forbidden: str) -> None:
    assert _path_of(module) is not None, f"{module} is gone: update this test"
    assert forbidden not in reachable(module), f"{module} imports {forbidden} (directly or through another module)"


def test_the_graph_reader_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from olmocr.a import b\n"
                      "def f():\n    import olmocr.c\n")
    assert {"olmocr.a", "olmocr.a.b", "olmocr.c"} <= imports_of(source)
