"""Response header values: one line of ASCII, escaped the way a client reads that header.

Header values are built from request data and stored data (repo names, file
paths, revisions, messages), which may hold any character. A header line
holds printable ASCII only, and each kind of header has its own escaping:

* **URLs** (``Location``, ``Content-Location``, the ``<...>`` of ``Link``) are
  percent-encoded (UTF-8) down to URL characters. Never a ``\\xNN`` escape or a
  raw backslash: browsers read ``\\`` in a URL as ``/``, so ``/\\xe9.evil.example``
  would send them to the host ``xe9.evil.example``. Existing ``%XX`` escapes
  are kept.
* **File names** (``Content-Disposition``): :func:`attachment` writes an ASCII
  ``filename`` and the exact name as RFC 5987's ``filename*=UTF-8''...``
  (RFC 6266), never a backslash inside the quoted name.
* **Text** (``X-Error-Message`` and the rest): whitespace runs become one
  space, and control or non-ASCII characters ``\\xNN``-style escapes; the JSON
  body carries the exact text.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_plus

#: RFC 3986's reserved and unreserved characters, and '%' (existing escapes stay as they are).
URL_CHARACTERS = "/?#[]@!$&'()*+,;=:%~-._"
URL_HEADERS = frozenset({"location", "content-location"})
_LINK_TARGET = re.compile(r"<([^<>]*)>")


#: Query keys whose values are secrets by their name. The server reads no credential from a query string, but
#: clients put tokens there by habit (``?token=``, ``?access_token=``): the access log must not keep them.
SECRET_QUERY_KEYS = frozenset({"token", "access_token", "api_key", "apikey", "key", "password", "secret", "auth"})
_QUERY_PAIR = re.compile(r"(^|&)([^=&]*)=([^&]*)")
#: A registry token (``pkr_<id>_<secret>``) or a Hugging Face one (``hf_...``) anywhere in a query.
_TOKEN_LIKE = re.compile(r"(?<![A-Za-z0-9])(pkr|hf)_[A-Za-z0-9][A-Za-z0-9_\-]{5,}")


def redact_query(query: str) -> str:
    """A raw query string for the access log: the values of :data:`SECRET_QUERY_KEYS` and anything shaped like a
    token replaced by ``***``; the rest as sent."""
    def pair(match: re.Match[str]) -> str:
        if unquote_plus(match.group(2)).strip().lower() in SECRET_QUERY_KEYS:
            return f"{match.group(1)}{match.group(2)}=***"
        return match.group(0)

    return _TOKEN_LIKE.sub(lambda m: f"{m.group(1)}_***", _QUERY_PAIR.sub(pair, query))


def escape_log(text: str) -> str:
    """One printable line: control and non-ASCII characters become ``\\xNN``-style escapes."""
    if text.isascii() and text.isprintable():
        return text  # the common case, without a loop in Python
    return "".join(
        c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") if c != "\n" else "\\n" for c in text
    )


def url_value(url: str) -> str:
    """``url`` with every character that is not a URL character percent-encoded (UTF-8)."""
    return quote(url, safe=URL_CHARACTERS)


def text_value(text: str) -> str:
    """One printable ASCII line of ``text`` (see the module docstring)."""
    if text.isascii() and text.isprintable():
        return text
    return escape_log(" ".join(text.split()))


def header_value(name: str, value: object) -> bytes:
    """The bytes of header ``name``'s ``value`` on the wire, escaped as that header is read."""
    text = str(value)
    lowered = name.lower()
    if lowered in URL_HEADERS:
        text = url_value(text)
    elif lowered == "link":
        text = _LINK_TARGET.sub(lambda m: f"<{url_value(m.group(1))}>", text)
    return text_value(text).encode("ascii")


def attachment(path: str) -> str:
    """``Content-Disposition`` offering file ``path``'s name (its last part) as a download (RFC 6266)."""
    name = path.rsplit("/", 1)[-1]
    ascii_name = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name) or "download"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"
