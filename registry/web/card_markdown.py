"""A model card's Markdown as inert HTML.

Cards are written by anyone with a write token, and read by everyone, so:

* raw HTML in the Markdown is shown as text, never rendered (markdown-it-py
  with ``html`` off);
* links keep only ``http``, ``https``, ``mailto`` and relative targets (no
  ``javascript:``, ``data:``, ``vbscript:``...); a refused link is shown as
  its text; every link gets ``rel="nofollow noopener"``;
* relative links and images point at the repo's files at the shown commit
  (``/ns/name/resolve/<sha>/<path>``); images from other sites are shown as
  links (the pages' CSP loads images from this site only, and readers are not
  tracked by a card's remote images);
* headings move one level down (the page's ``<h1>`` is the repo's name);
* a card is rendered from at most :data:`MAX_CARD_BYTES` and
  :data:`MAX_CARD_MARKS` Markdown marks (the rest is cut with a note: the parser
  is pure Python, and 256 KiB of ``[`` took ~6 s on a 2-core machine, 0.1 s for
  256 KiB of real documentation). Even so each card is rendered
  once per content: the cache is keyed by the README's hash alone (links point
  at a placeholder that each page fills with its commit's file URL, so a repo's
  commits share one render), concurrent requests for one card wait for a single
  render, and the cache is bounded in characters (:data:`MAX_CACHE_CHARS`) as
  well as entries, since a card's HTML can be ten times its Markdown.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml

MAX_CARD_BYTES = 256 * 1024
# Markdown's marks and line ends, which cost the parser its time: 256 KiB of this project's docs hold ~27,000
# and render in 0.12 s; 256 KiB of '[' took ~6 s. A card is rendered up to this many: ~1 s at worst (measured
# on a 2-core machine with lines such as '1. [', '[ ', '![').
MAX_CARD_MARKS = 40_000
_MARKS = "[]()*_`<>!|&\\#~-\n"
_MARKS_CHUNK = 4096
_CACHE_ENTRIES = 256
MAX_CACHE_CHARS = 32 * 1024 * 1024  # rendered HTML kept, over all cached cards
_RENDER_GATES = 64  # locks, by card, that make concurrent requests for one card wait for a single render
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_ALLOWED_SCHEMES = frozenset({"http", "https", "mailto"})
_REL = "nofollow noopener"


def marks_cut(body: str, limit: int = MAX_CARD_MARKS) -> int | None:
    """Where to cut ``body`` so that it holds at most about ``limit`` Markdown marks (None: it does already);
    counted in chunks, at the speed of ``str.count``."""
    seen = 0
    for start in range(0, len(body), _MARKS_CHUNK):
        chunk = body[start:start + _MARKS_CHUNK]
        seen += sum(chunk.count(mark) for mark in _MARKS)
        if seen > limit:
            cut = body.rfind("\n", max(0, start - _MARKS_CHUNK), start)  # at a line's end when one is near
            return cut if cut > 0 else start
    return None


def link_allowed(url: str) -> bool:
    """Only http(s), mailto and scheme-less (relative) URLs; checked on markdown-it's normalized URL."""
    match = _SCHEME_RE.match(url.strip())
    return match is None or match.group(1).lower() in _ALLOWED_SCHEMES


def _repo_file_url(url: str, files_base: str) -> str:
    """A relative URL (``plots/loss.png``, ``./README.md#usage``) as a link to that file of the repo."""
    if not url or url.startswith(("#", "/", "?")) or _SCHEME_RE.match(url):
        return url
    path, hash_, fragment = url.partition("#")
    path = path.split("?", 1)[0]
    normal = posixpath.normpath(path)
    if normal.startswith("..") or normal in (".", ""):
        return "#"
    return f"{files_base}/{quote(normal)}" + (hash_ + fragment if hash_ else "")


def _build() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.validateLink = link_allowed  # type: ignore[method-assign]

    def link_open(renderer: Any, tokens: list[Any], idx: int, options: Any, env: dict[str, Any]) -> str:
        token = tokens[idx]
        token.attrSet("href", _repo_file_url(str(token.attrGet("href") or ""), env["files_base"]))
        token.attrSet("rel", _REL)
        return renderer.renderToken(tokens, idx, options, env)

    def image(renderer: Any, tokens: list[Any], idx: int, options: Any, env: dict[str, Any]) -> str:
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        alt = renderer.renderInlineAsText(token.children or [], options, env)
        if _SCHEME_RE.match(src) or src.startswith("//"):  # another site: a link, not a request
            return f'<a href="{escapeHtml(src)}" rel="{_REL}">{escapeHtml(alt or src)}</a>'
        url = _repo_file_url(src, env["files_base"])
        if not url or url.startswith(("#", "?")):  # outside the repo ('../x'), or this page ('#top', '?a'): no image
            return escapeHtml(alt)
        return f'<img src="{escapeHtml(url)}" alt="{escapeHtml(alt)}" loading="lazy">'

    def heading(renderer: Any, tokens: list[Any], idx: int, options: Any, env: dict[str, Any]) -> str:
        token = tokens[idx]  # one level down: the page's own <h1> is the repo name
        token.tag = f"h{min(6, int(token.tag[1]) + 1)}"
        return renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("heading_open", heading)
    md.add_render_rule("heading_close", heading)
    md.add_render_rule("link_open", link_open)
    md.add_render_rule("image", image)
    return md


class CardRenderer:
    """Renders card bodies, caching by content (see the module docstring)."""

    def __init__(self, *, cache_chars: int = MAX_CACHE_CHARS) -> None:
        self._md = _build()
        self._cache_chars = cache_chars
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._gates = [threading.Lock() for _ in range(_RENDER_GATES)]
        # Stands for the repo's file URL in cached HTML; random, so no card can write it by design.
        self._files_base = f"/peftkit-card-files-{secrets.token_hex(12)}"
        self.renders = 0  # cards rendered (not served from the cache) since start
        self.cached_chars = 0

    def render(self, body: str, *, files_base: str, cache_key: str | None = None) -> str:
        """``body`` (Markdown) as safe HTML; relative links resolve under ``files_base``.

        ``cache_key`` (the README's content hash) names ``body``: one render serves every commit and page."""
        if cache_key is None:
            return self._render(body, files_base)
        html = self._cached(cache_key)
        if html is None:
            with self._gates[hash(cache_key) % _RENDER_GATES]:
                html = self._cached(cache_key)
                if html is None:
                    html = self._render(body, self._files_base)
                    self._keep(cache_key, html)
        return html.replace(self._files_base, escapeHtml(files_base))

    def cached(self, cache_key: str, files_base: str) -> str | None:
        """The card rendered before under ``cache_key``, with its links under ``files_base``; None if not kept."""
        html = self._cached(cache_key)
        return html.replace(self._files_base, escapeHtml(files_base)) if html is not None else None

    def _render(self, body: str, files_base: str) -> str:
        with self._lock:
            self.renders += 1
        return self._md.render(body, {"files_base": files_base})

    def _cached(self, key: str) -> str | None:
        with self._lock:
            html = self._cache.get(key)
            if html is not None:
                self._cache.move_to_end(key)
            return html

    def _keep(self, key: str, html: str) -> None:
        if len(html) > self._cache_chars:
            return
        with self._lock:
            self._cache[key] = html
            self.cached_chars += len(html)
            while len(self._cache) > _CACHE_ENTRIES or self.cached_chars > self._cache_chars:
                self.cached_chars -= len(self._cache.popitem(last=False)[1])
