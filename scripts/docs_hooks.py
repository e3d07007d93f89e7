"""MkDocs hooks: pages generated from the code, so they cannot drift from it.

A page asks for a generated part with a marker comment on a line of its own:
``<!-- callgate:configuration -->`` becomes the table of environment variables (config.VARIABLES).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _project():
    """The project's modules are importable while a page renders (MkDocs loads hooks by path)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def configuration_table() -> str:
    _project()
    import config

    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for var in config.VARIABLES:
        default = "—" if var.default in (None, "") else f"`{var.default}`"
        secret = " *(secret: never logged)*" if var.secret else ""
        rows.append(f"| `{var.name}` | {default} | {_cell(var.help)}{secret} |")
    return "\n".join(rows)


GENERATED = {
    "<!-- callgate:configuration -->": configuration_table,
}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' signature)
    for marker, render in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
