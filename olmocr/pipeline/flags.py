"""How the pipeline's command line is read beyond argparse: both spellings of every flag, and numeric flags
that say what range they accept.

* ``--flag_name`` and ``--flag-name`` are the same flag (upstream olmOCR spells its flags with ``_``, vLLM and
  most tools with ``-``; users mix them). :func:`normalize_spellings` rewrites the other spelling to the one
  ``--help`` shows before argparse sees the command line. Flags the pipeline does not know are left alone
  (in internal mode they go to ``vllm serve``, which accepts both spellings itself).
* :func:`whole` and :func:`number` are argparse ``type=`` functions with a range: a value out of range is
  argparse's one-line error (``argument --workers: ...``), exit status 2.
* :func:`usage_exit` is the one way a command-line mistake is reported: ``prog: error: what`` on one line,
  exit status 2 (:data:`olmocr.exit_codes.STATUS_USAGE`). argparse's errors, :class:`UsageError` and the
  upstream flags' refusals all end there.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from olmocr.exit_codes import STATUS_USAGE
from olmocr.pipeline.errors import UsageError


def usage_exit(prog: str, error: str | UsageError) -> NoReturn:
    """``prog: error: message`` on stderr, one line (``(see --help)`` added for a :class:`UsageError` that
    asks for it), then exit with the usage status, 2."""
    message = str(error)
    if isinstance(error, UsageError) and error.see_help:
        message += " (see --help)"
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(STATUS_USAGE)


def spelling_aliases(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{other spelling: the spelling ``--help`` shows} for every long flag of ``parser``."""
    known = {opt for action in parser._actions for opt in action.option_strings}
    aliases: dict[str, str] = {}
    for opt in sorted(known):
        if not opt.startswith("--"):
            continue
        body = opt[2:]
        for other in (body.replace("_", "-"), body.replace("-", "_")):
            alias = "--" + other
            if alias != opt and alias not in known:
                aliases.setdefault(alias, opt)
    return aliases


def normalize_spellings(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with every known flag in the spelling ``--help`` shows (``--vllm_url`` -> ``--vllm-url``,
    ``--pages-per-group=5`` -> ``--pages_per_group=5``); nothing after a bare ``--`` is touched."""
    aliases = spelling_aliases(parser)
    out: list[str] = []
    rest = False
    for arg in argv:
        if rest or not arg.startswith("--"):
            out.append(arg)
            continue
        if arg == "--":
            rest = True
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        out.append(aliases.get(name, name) + eq + value)
    return out


def _range_text(low: float | None, high: float | None, low_open: bool) -> str:
    if low is not None and high is not None:
        return f"between {low:g} and {high:g}"
    if low is not None:
        return f"more than {low:g}" if low_open else f"{low:g} or more"
    return f"at most {high:g}"


def whole(low: int | None = None, high: int | None = None, note: str = "") -> Callable[[str], int]:
    """argparse type: a whole number in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high, False)}{note}, not {value}")
        return value
    parse.__name__ = "whole number"
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           note: str = "") -> Callable[[str], float]:
    """argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high, low_open)}{note}, not {text.strip()}")
        return value
    parse.__name__ = "number"
    return parse
