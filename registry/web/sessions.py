"""Browser sign-in for the web pages: session cookies, CSRF tokens and the server secret behind them.

* A session is a random secret in an ``HttpOnly`` cookie (``SameSite=Lax``,
  ``Secure`` when the registry's URL is https). The database keeps only its
  sha256, the id of the token the user signed in with and an expiry; signing
  out deletes the row, and revoking the token ends every session made with it.
  A token has at most :data:`MAX_SESSIONS_PER_TOKEN` sessions: the oldest
  ends when one more browser signs in with it.
  A session only lets the pages (and browser downloads from ``/resolve/``)
  show what that user may read; it never authorizes a write.
* Every state-changing form (sign-in and sign-out) carries a CSRF token: an
  HMAC, with a server secret, of a random per-browser cookie. A POST whose
  cookie and token do not match, or whose ``Origin`` names another site, is
  refused before anything else is looked at.
* The server secret is 32 random bytes named ``web_secret`` beside the blobs (in the data
  folder, the ``--blobs`` folder when one is given, or the ``--blobs s3://`` prefix), which
  every server and worker of the registry shares: ``BlobStorage.shared_secret``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from ..accounts import Accounts, Principal
from ..db import Database

SESSION_COOKIE = "peftkit_session"
CSRF_COOKIE = "peftkit_csrf"
SECRET_FILE = "web_secret"
MAX_COOKIE_HEADER = 8 * 1024  # longer Cookie headers are ignored (bounded parsing)
MAX_SESSIONS_PER_TOKEN = 20  # browsers signed in with one token at a time; a new sign-in ends the oldest


def parse_cookies(header: str | None) -> dict[str, str]:
    """The request's cookies; a missing, oversized or malformed header gives none."""
    if not header or len(header) > MAX_COOKIE_HEADER:
        return {}
    jar = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CookieSettings:
    """Attributes of the cookies the pages set."""

    secure: bool  # the registry is reached over https
    path: str = "/"  # the public URL's path when served under a prefix

    def set(self, name: str, value: str, max_age: int | None) -> str:
        parts = [f"{name}={value}", f"Path={self.path}", "HttpOnly", "SameSite=Lax"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)

    def clear(self, name: str) -> str:
        return self.set(name, "", 0)


class WebSessions:
    """Sessions in the registry database, and the CSRF tokens of the forms."""

    def __init__(self, db: Database, accounts: Accounts, secret: bytes, *, ttl_s: float = 7 * 86400) -> None:
        self.db = db
        self.accounts = accounts
        self.secret = secret
        self.ttl_s = ttl_s

    # -- sessions -------------------------------------------------------------
    def start(self, principal: Principal) -> str:
        """A new session for the user of ``principal`` (signed in with its token); returns the cookie value."""
        value = secrets.token_urlsafe(32)
        now = time.time()
        with self.db.write() as conn:
            conn.execute("DELETE FROM web_sessions WHERE expires_at < ?", (now,))
            conn.execute(  # a token's oldest sessions end, so signing in again and again cannot fill the database
                "DELETE FROM web_sessions WHERE token_id = ? AND secret_hash NOT IN (SELECT secret_hash FROM "
                "web_sessions WHERE token_id = ? ORDER BY created_at DESC LIMIT ?)",
                (principal.token_id, principal.token_id, MAX_SESSIONS_PER_TOKEN - 1),
            )
            conn.execute(
                "INSERT INTO web_sessions(secret_hash, token_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (_digest(value), principal.token_id, now, now + self.ttl_s),
            )
        return value

    def principal(self, value: str | None) -> Principal | None:
        """Who the session cookie ``value`` belongs to (read-only), or None: unknown, expired, token revoked."""
        if not value or len(value) > 100:
            return None
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT token_id FROM web_sessions WHERE secret_hash = ? AND expires_at > ?",
                (_digest(value), time.time()),
            ).fetchone()
        if row is None:
            return None
        principal = self.accounts.principal_of_token(row["token_id"])
        if principal is None:
            return None
        # The pages only read: a session never carries write access, whatever the token had.
        return Principal(principal.user, False, principal.orgs, principal.token_id, principal.token_name)

    def end(self, value: str | None) -> None:
        if value:
            with self.db.write() as conn:
                conn.execute("DELETE FROM web_sessions WHERE secret_hash = ?", (_digest(value),))

    # -- CSRF -----------------------------------------------------------------
    def csrf_token(self, browser: str) -> str:
        """The token a form carries for the browser whose CSRF cookie is ``browser``."""
        return hmac.new(self.secret, b"csrf:" + browser.encode("utf-8"), hashlib.sha256).hexdigest()

    def csrf_ok(self, browser: str | None, token: str | None) -> bool:
        if not browser or not token or len(browser) > 100 or len(token) > 100:
            return False
        return hmac.compare_digest(self.csrf_token(browser), token)


def new_browser_id() -> str:
    return secrets.token_urlsafe(24)


def same_origin(origin: str | None, host: str | None, public_url: str | None) -> bool:
    """Whether a POST's ``Origin`` header (when the browser sent one) names this site: the ``Host`` the
    browser connected to, or the public URL's host. A missing Origin is left to the CSRF token."""
    if origin is None:
        return True
    try:
        parts = urlsplit(origin.strip())
        netloc = parts.netloc.lower()
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not netloc:
        return False
    allowed = {h.lower() for h in (host,) if h}
    if public_url:
        allowed.add(urlsplit(public_url).netloc.lower())
    return netloc in allowed
