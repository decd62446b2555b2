"""How the CLI prints: JSON for ``--json`` and aligned plain-text tables (shared by every command module)."""

from __future__ import annotations

import json
from typing import Any

import click


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (values JSON does not know, such as dates, as strings)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def format_table(rows: list[list[str]], headers: list[str]) -> str:
    """Rows under headers, each column padded to its widest cell, trailing spaces dropped."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
