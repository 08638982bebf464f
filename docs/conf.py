"""Sphinx configuration: the docs are Markdown (MyST), built with warnings as errors in CI."""

from __future__ import annotations

project = "connic"
author = "the connic developers"
copyright = "2026, the connic developers"  # noqa: A001

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
html_theme = "alabaster"
html_title = "connic"
suppress_warnings: list[str] = []
