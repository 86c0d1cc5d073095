"""The repository is self-contained: nothing a user runs reads outside the checkout."""

from __future__ import annotations

import subprocess

from tests.standin_helpers import REPO_ROOT

OUTSIDE = "../" + "shared"  # split so this file does not match itself


def test_no_code_test_or_script_reads_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files", "olmocr", "tests", "scripts", "examples", "deploy", ".ci",
                              "supervisord.conf"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    offenders = [p for p in tracked if OUTSIDE in (REPO_ROOT / p).read_text(errors="replace")]
    assert offenders == [], f"these read {OUTSIDE}, which a user's clone does not have: {offenders}"


def test_readme_and_docs_name_only_paths_that_exist() -> None:
    import re

    for doc in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
