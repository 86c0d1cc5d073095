"""The text prompt of every page request: upstream olmOCR's v4 YAML prompt (0.4.27
``build_no_anchoring_v4_yaml_prompt``), the model's training contract; it must not drift.

It sits below the two packages that need it, so that neither imports the other for it: ``pages/``
sends it (:mod:`olmocr.pipeline.pages.page`; :mod:`olmocr.pipeline.pages.prompts` holds the rest of the
contract), ``servers/`` bounds a page request's tokens with it (:mod:`olmocr.pipeline.servers.checks`).
"""

from __future__ import annotations

PROMPT_V4_YAML = (
    "Attached is one page of a document that you must process. "
    "Just return the plain text representation of this document as if you were reading it naturally. "
    "Convert equations to LateX and tables to HTML.\n"
    "If there are any figures or charts, label them with the following markdown syntax "
    "![Alt text describing the contents of the figure](page_startx_starty_width_height.png)\n"
    "Return your output as markdown, with a front matter section on top specifying values for the "
    "primary_language, is_rotation_valid, rotation_correction, is_table, and is_diagram parameters."
)
