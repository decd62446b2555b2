"""Headers that keep uploaded files inert in a browser (no stored XSS through ``/resolve/``).

Anyone with a write token can upload any file, and anyone may open a public
file's URL in a browser. So a file a browser would render as active content
(HTML, SVG, XML, JavaScript, CSS, ...) is served as ``text/plain`` and as an
attachment; every file carries ``X-Content-Type-Options: nosniff`` so the
browser does not guess otherwise; and every response from ``/resolve/``
carries a Content-Security-Policy that forbids scripts, styles, frames and
plug-ins even if something slipped through.
"""

from __future__ import annotations

import mimetypes

from .http_headers import attachment

#: Sent on every ``/resolve/`` response.
RESOLVE_CSP = "default-src 'none'; sandbox"

# Types a browser shows inertly (or only offers to save). Everything else that a
# browser could render (text/html, image/svg+xml, application/xhtml+xml,
# text/javascript, text/css, application/pdf, ...) goes out as plain text.
_INERT_TYPES = frozenset({
    "application/json", "application/octet-stream", "application/zip", "application/gzip",
    "application/x-tar", "application/x-bzip2", "application/x-xz", "application/x-yaml", "application/yaml",
    "text/plain", "text/markdown", "text/csv", "text/x-python",
    "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "audio/mpeg", "audio/wav", "video/mp4",
})


def file_headers(path: str) -> list[tuple[str, str]]:
    """``Content-Type`` (and ``Content-Disposition`` for active types) for serving repo file ``path``."""
    guessed = mimetypes.guess_type(path, strict=False)[0] or "application/octet-stream"
    if guessed in _INERT_TYPES:
        return [("Content-Type", guessed)]
    if guessed.startswith("text/"):
        return [("Content-Type", "text/plain; charset=utf-8"), ("Content-Disposition", attachment(path))]
    return [("Content-Type", "text/plain; charset=utf-8"), ("Content-Disposition", attachment(path))] if any(
        word in guessed for word in ("html", "xml", "script", "svg", "pdf", "flash", "css")
    ) else [("Content-Type", "application/octet-stream")]


def hardening_headers(resolve: bool) -> list[tuple[str, str]]:
    """Headers added to every response (and the CSP to every resolve response)."""
    headers = [("X-Content-Type-Options", "nosniff")]
    if resolve:
        headers.append(("Content-Security-Policy", RESOLVE_CSP))
    return headers
