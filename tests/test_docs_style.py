"""The guides are read by new users: their sentences stay short. For each guide (and the README) the 90th
percentile of its prose sentences' lengths in words stays at or under ``P90_MAX_WORDS``, and no sentence is
longer than ``LONGEST_MAX_WORDS``. Code blocks, tables, headings and HTML comments are not prose and are
left out; a list item is prose. ``python -m tests.test_docs_style`` prints every guide's figures."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.standin_helpers import REPO_ROOT

#: The 90th percentile of a guide's sentence lengths, in words, may not exceed this.
P90_MAX_WORDS = 33
#: No single sentence may be longer than this.
LONGEST_MAX_WORDS = 40

GUIDES = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])

def prose(text: str) -> str:
    """The guide's prose: code blocks, tables, headings and HTML comments dropped, one paragraph per block."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        if fenced or stripped.startswith(("|", "#")):
            out.append("")
            continue
        if re.match(r"\s*([-*+]|\d+\.)\s", line):  # a list item starts a sentence of its own
            out.append("")
            line = re.sub(r"^\s*([-*+]|\d+\.)\s+", "", line)
        out.append(stripped if out and out[-1] else line.strip())
    paragraphs = "\n".join(out).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


_CODE_SPAN = re.compile(r"`[^`]*`")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
#: A sentence ends at . ! ? followed by a space and a capital, a digit, a backtick, a bracket or a bold mark, or at a
#: colon before a capital or a bold mark. A semicolon does not end one: a reader still holds both halves.
_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9`*(\[])|(?<=:)\s+(?=[A-Z*])")


def sentences(text: str) -> list[str]:
    out = []
    for para in prose(text).split("\n\n"):
        # Code spans and link targets may hold dots and spaces: count each code span as one word.
        flat = _LINK.sub(r"\1", _CODE_SPAN.sub("CODE", para))
        for s in _END.split(flat):
            s = re.sub(r"\be\.g\. |\bi\.e\. |\betc\. ", "", s).strip()
            if len(words(s)) >= 1:
                out.append(s)
    return out


def words(sentence: str) -> list[str]:
    return [w for w in sentence.split() if re.search(r"\w", w)]


def p90(lengths: list[int]) -> int:
    ordered = sorted(lengths)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] if ordered else 0


def figures(path: Path) -> tuple[int, int, list[str]]:
    """(90th percentile, longest, the sentences above P90_MAX_WORDS) of one guide."""
    found = sentences(path.read_text())
    lengths = [len(words(s)) for s in found]
    return p90(lengths), max(lengths, default=0), [s for s in found if len(words(s)) > P90_MAX_WORDS]


def test_every_guide_has_short_sentences() -> None:
    problems = []
    for path in GUIDES:
        name = str(path.relative_to(REPO_ROOT))
        pct, longest, long_ones = figures(path)
        if pct > P90_MAX_WORDS or longest > LONGEST_MAX_WORDS:
            listed = "\n".join(f"    ({len(words(s))} words) {s}" for s in long_ones)
            problems.append(f"{name}: 90th percentile {pct} words (at most {P90_MAX_WORDS}), longest {longest} "
                            f"(at most {LONGEST_MAX_WORDS}); sentences over {P90_MAX_WORDS} words:\n{listed}")
    assert not problems, "\n".join(problems)


def test_the_sentence_counter_sees_a_long_sentence() -> None:
    """The measure itself: a long sentence is one sentence, code and tables are not prose."""
    long = "Word " + " ".join(["word"] * 49) + "."
    text = f"# Title\n\nShort one. {long}\n\n```\n{long}\n```\n\n| a | {long} |\n\n- A list item. Another.\n"
    found = sentences(text)
    assert [len(words(s)) for s in found] == [2, 50, 3, 1]


def main() -> int:
    for path in GUIDES:
        pct, longest, long_ones = figures(path)
        print(f"{path.relative_to(REPO_ROOT)}: p90 {pct}, longest {longest}, over {P90_MAX_WORDS}: {len(long_ones)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
