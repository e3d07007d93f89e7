"""MkDocs hooks: pages generated from the code, so they cannot drift from it.

A page asks for a generated part with a marker comment on a line of its own:
``<!-- callgate:configuration -->`` becomes the table of environment variables (config.VARIABLES);
from protocol.py, ``<!-- callgate:routes -->`` the HTTP routes, ``<!-- callgate:messages-in -->``
and ``<!-- callgate:messages-out -->`` each /logs message (a heading whose id is the message's
type, so other pages link ``protocol.md#call.start``, and its JSON Schema),
``<!-- callgate:error-codes -->``, ``<!-- callgate:end-reasons -->``,
``<!-- callgate:limit-reasons -->`` and ``<!-- callgate:refused -->`` the tables of codes,
reasons and the messages refused on purpose.
"""

from __future__ import annotations

import json
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


def _protocol():
    _project()
    import protocol

    return protocol


def routes_table() -> str:
    rows = ["| Method | Path | Auth | Returns |", "|---|---|---|---|"]
    for route in _protocol().ROUTES:
        method = "any" if route.method == "*" else route.method
        # (protocol.py's texts keep "|" and "<" inside code spans, where a table leaves them be)
        rows.append(f"| {method} | `{route.path}` | {route.auth} | {route.returns} |")
    return "\n".join(rows)


def _kind(prop: dict) -> str:
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    kinds = prop.get("type", "any")
    return " or ".join(kinds) if isinstance(kinds, list) else kinds


def _fields(schema: dict) -> str:
    rows = ["| Field | Type | Required | Meaning |", "|---|---|---|---|"]
    for name, prop in schema["properties"].items():
        required = "yes" if name in schema.get("required", ()) else "no"
        rows.append(f"| `{name}` | {_kind(prop)} | {required} | {_cell(prop.get('description', ''))} |")
    return "\n".join(rows)


def _message(message) -> str:
    protocol = _protocol()
    lines = [f"### `{message.type}` {{ #{message.type} }}", "", message.summary]
    if message.compat:
        lines += ["", "*phone-screen's webapp speaks it as it is.*"]
    if message.answer:
        lines += ["", f"**Answer:** {message.answer}."]
    shapes = message.schema.get("oneOf", [message.schema])
    for i, shape in enumerate(shapes):
        if len(shapes) > 1:
            lines += ["", "Either:" if i == 0 else "Or:"]
        lines += ["", _fields(shape)]
    document = json.dumps(protocol.schema(message), indent=2, ensure_ascii=False)
    lines += ["", '??? note "JSON Schema"', "", "    ```json", *("    " + line for line in document.splitlines()),
              "    ```", ""]
    return "\n".join(lines)


def messages(direction: str) -> str:
    return "\n".join(_message(m) for m in _protocol().MESSAGES if m.direction == direction)


def _codes(table: dict[str, str], heading: str) -> str:
    rows = [f"| {heading} | When |", "|---|---|"]
    rows += [f"| `{code}` | {_cell(why)} |" for code, why in table.items()]
    return "\n".join(rows)


GENERATED = {
    "<!-- callgate:configuration -->": configuration_table,
    "<!-- callgate:routes -->": routes_table,
    "<!-- callgate:messages-in -->": lambda: messages(_protocol().IN),
    "<!-- callgate:messages-out -->": lambda: messages(_protocol().OUT),
    "<!-- callgate:error-codes -->": lambda: _codes(_protocol().ERROR_CODES, "`code`"),
    "<!-- callgate:end-reasons -->": lambda: _codes(_protocol().END_REASONS, "`reason`"),
    "<!-- callgate:limit-reasons -->": lambda: _codes({**_protocol().LIMIT_REASONS, **_protocol().NUMBER_REASONS},
                                                      "`reason`"),
    "<!-- callgate:refused -->": lambda: _codes(_protocol().REFUSED, "`type`"),
}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' signature)
    for marker, render in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
