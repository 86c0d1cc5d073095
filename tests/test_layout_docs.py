"""The layout in the docs is the layout in git: contributing.md's map names every module of olmocr/, and
the README's Layout names every package and deploy/ folder (issue #27: the layout tables were stale)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tracked(pattern: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def layers_block() -> str:
    text = (ROOT / "docs" / "contributing.md").read_text()
    match = re.search(r"## Layers\s+```\n(.*?)```", text, re.S)
    assert match, "docs/contributing.md has no ## Layers code block"
    return match.group(1)


def test_the_architecture_map_names_every_module():
    block = layers_block()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))
    missing = []
    for path in tracked("olmocr"):
        p = Path(path)
        if p.suffix != ".py" or p.stem in {"__init__", "__main__"}:
            continue
        if p.stem not in words:
            missing.append(path)
    packages = {str(Path(p).parent.relative_to("olmocr")) for p in tracked("olmocr") if p.endswith(".py")} - {"."}
    for package in sorted(packages):
        if f"{Path(package).name}/" not in block:
            missing.append(f"olmocr/{package}/")
    assert not missing, "docs/contributing.md's Layers map does not name: " + ", ".join(sorted(missing))


def test_the_readme_layout_names_every_package_and_deploy_folder():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"## Layout\n(.*?)(\n## |\Z)", readme, re.S)
    assert match, "README.md has no ## Layout section"
    layout = match.group(1)
    wanted = {f"olmocr/{Path(p).parts[1]}/" for p in tracked("olmocr") if len(Path(p).parts) > 2}
    wanted |= {f"deploy/{Path(p).parts[1]}" for p in tracked("deploy") if len(Path(p).parts) > 2}
    missing = sorted(w for w in wanted if w not in layout)
    assert not missing, "README.md's Layout does not name: " + ", ".join(missing)
