"""How the CLI prints: JSON for ``--json``, aligned plain-text tables, and text made safe for a terminal.

Text a hub sends (repo ids, card facts, commit messages, server error
messages) may hold terminal control sequences; :func:`terminal_safe` shows
them as escapes instead of letting them act on the user's terminal. JSON
needs nothing: ``json.dumps`` already escapes every control character.
"""

from __future__ import annotations

import json
import re
from typing import Any

import click


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (values JSON does not know, such as dates, as strings)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


#: C0 controls, DEL, C1 controls, the bidi marks (U+061C, U+200E, U+200F), the line and paragraph separators
#: (U+2028, U+2029: some terminals and pagers break the line there), and the bidi embeddings, overrides and
#: isolates (U+202A-202E, U+2066-2069).
_TERMINAL_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _visible_escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_safe(text: str, *, multiline: bool = False) -> str:
    """``text`` with each character that could drive a terminal written as a visible escape.

    ESC becomes the four characters ``\\x1b``, U+202E becomes ``\\u202e``, and
    likewise CR, BEL, DEL, C1 controls (``\\x9b``), bidi marks, overrides and
    isolates, and the Unicode line separators, so a hub cannot move the cursor,
    retitle the window, reorder what a line shows or fake a line of output.
    ``multiline`` keeps newline and tab (for messages that span lines);
    otherwise they are escaped too. Other Unicode (accents, CJK, emoji) is
    left as it is.
    """
    keep = "\n\t" if multiline else ""
    return _TERMINAL_UNSAFE.sub(lambda m: m.group() if m.group() in keep else _visible_escape(m.group()), text)


def echo_safe(text: str, *, err: bool = False, multiline: bool = False) -> None:
    """Print ``text`` (which holds a hub's words) through :func:`terminal_safe`."""
    click.echo(terminal_safe(text, multiline=multiline), err=err)


def format_table(rows: list[list[str]], headers: list[str]) -> str:
    """Rows under headers, each column padded to its widest cell, trailing spaces dropped.

    Cells pass through :func:`terminal_safe` (one line each), since they often hold a hub's words.
    """
    headers = [terminal_safe(str(h)) for h in headers]
    rows = [[terminal_safe(str(c)) for c in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
