"""Jinja2 templates of the pages (package data next to this module), autoescaped, with small formatting filters."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

HERE = Path(__file__).parent
STYLESHEET = HERE / "static" / "style.css"
MAX_SUMMARY_CHARS = 200
# The tab icon, a "p" on the link colour. Every page names it, or browsers ask for /favicon.ico, a 404
# (an error in the console, and an account lookup on the server) on every page.
FAVICON_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" '
    b'fill="#0b57b8"/><path d="M9 8h8a6 6 0 0 1 0 12h-4v5H9zm4 4v4h4a2 2 0 0 0 0-4z" fill="#fff"/></svg>'
)


def human_size(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_count(number: int | None) -> str:
    if number is None:
        return "?"
    for limit, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if number >= limit:
            return f"{number / limit:.1f}{suffix}".replace(".0", "")
    return str(number)


def downloads(number: int | None) -> str:
    """``1 download``, ``12 downloads``, ``1.2k downloads``."""
    return f"{human_count(number)} download" + ("" if number == 1 else "s")


def summary(message: str, limit: int = MAX_SUMMARY_CHARS) -> str:
    """A commit message's first line, at most ``limit`` characters: the page lists 20, and the API takes
    messages of any length."""
    line = message.strip().split("\n", 1)[0].strip()
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


class Templates:
    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every template is HTML
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(size=human_size, count=human_count, downloads=downloads, when=when,
                                summary=summary, seg=lambda v: quote(str(v), safe=""),
                                path=lambda v: quote(str(v)))
        self.stylesheet = STYLESHEET.read_bytes()
        self.stylesheet_version = _version(self.stylesheet)
        #: What /static/ serves: name -> (content type, bytes, version for the ETag), hashed once here.
        self.static_files = {
            "style.css": ("text/css; charset=utf-8", self.stylesheet, self.stylesheet_version),
            "favicon.svg": ("image/svg+xml", FAVICON_SVG, _version(FAVICON_SVG)),
        }

    def render(self, name: str, **context: Any) -> bytes:
        return self.env.get_template(name).render(**context).encode("utf-8")


def _version(content: bytes) -> str:
    """A short content hash: the stylesheet's URL and the static files' ETags change with their content."""
    return hashlib.sha256(content).hexdigest()[:12]
