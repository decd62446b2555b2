"""Users, organizations and bearer tokens.

A token is ``pkr_<id>_<secret>``: the id is public (``token list`` shows it,
``token revoke`` takes it), the secret is random and only its sha256 is stored,
so a stolen database does not hand out working tokens. A token belongs to a
user and is read-only or read-write. A user may write to their own namespace
and to every organization they are a member of.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from .db import Database
from .errors import AccountExists, BadRequest, Forbidden, NotFound, Unauthorized
from .names import RESERVED_ACCOUNT_NAMES, validate_account_name, validate_name

TOKEN_PREFIX = "pkr_"
_LAST_USED_RESOLUTION_S = 60.0


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    user: str
    write: bool
    orgs: frozenset[str]
    token_id: str = ""
    token_name: str = ""

    @property
    def namespaces(self) -> frozenset[str]:
        """Namespaces whose private repos this principal may see (lower-cased)."""
        return frozenset({self.user.lower(), *(o.lower() for o in self.orgs)})

    def can_read(self, namespace: str) -> bool:
        return namespace.lower() in self.namespaces

    def check_write(self, namespace: str, kind_of: Callable[[str], str | None] | None = None) -> None:
        """Raise Forbidden unless this principal may write to ``namespace``; ``kind_of`` (name -> "user",
        "org" or None) lets the message give the fix that applies."""
        if namespace.lower() not in self.namespaces:
            kind = kind_of(namespace) if kind_of is not None else None
            if kind == "org":
                fix = (f"an administrator adds them with `peftkit registry org add {namespace} --member "
                       f"{self.user}`, or push to '{self.user}/...'")
            else:
                fix = f"push to '{self.user}/...' or to an organization they are a member of"
            if kind is None and namespace.lower() in RESERVED_ACCOUNT_NAMES:
                raise Forbidden(f"'{namespace}' is a name the registry reserves for its URLs, no namespace anyone "
                                f"may write to: {fix}")
            if kind is None and kind_of is not None:
                raise Forbidden(f"user '{self.user}' may not write to '{namespace}': no user or organization of "
                                f"that name exists on this registry; {fix} (an administrator creates an "
                                f"organization with `peftkit registry org add {namespace} --member {self.user}`)")
            owner = {"user": "another user's", "org": "an organization's"}.get(kind or "", "a")
            raise Forbidden(f"user '{self.user}' may not write to '{namespace}', {owner} namespace: {fix}")
        if not self.write:
            raise Forbidden(
                f"token '{self.token_name or self.token_id}' is read-only; create one with write access: "
                f"`peftkit registry token create {self.user} --write`"
            )


@dataclass(frozen=True)
class TokenInfo:
    id: str
    user: str
    name: str
    write: bool
    created_at: datetime
    last_used: datetime | None
    revoked: bool

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "user": self.user,
            "name": self.name,
            "scope": "write" if self.write else "read",
            "created_at": self.created_at.isoformat(),
            "last_used": self.last_used.isoformat() if self.last_used else None,
            "revoked": self.revoked,
        }


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc) if ts is not None else None


class Accounts:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- users and orgs ---------------------------------------------------
    def kind(self, name: str) -> str | None:
        """"user", "org", or None when no account has that name."""
        with self.db.read() as conn:
            return self._kind(conn, name)

    def _kind(self, conn, name: str) -> str | None:
        row = conn.execute("SELECT kind FROM accounts WHERE name = ?", (name,)).fetchone()
        return row["kind"] if row else None

    def add_user(self, name: str) -> None:
        validate_account_name(name, "user name")
        with self.db.write() as conn:
            kind = self._kind(conn, name)
            if kind is not None:
                raise AccountExists(f"an account named '{name}' already exists (a {kind})")
            conn.execute("INSERT INTO accounts(name, kind, created_at) VALUES (?, 'user', ?)", (name, time.time()))

    def add_org(self, name: str, members: list[str] | tuple[str, ...] = ()) -> None:
        """Create the organization if needed and add ``members`` (existing users) to it."""
        validate_name(name, "organization name")
        with self.db.write() as conn:
            kind = self._kind(conn, name)
            if kind is None:  # a new organization: reserved names are refused (existing ones keep working)
                validate_account_name(name, "organization name")
            if kind == "user":
                raise AccountExists(f"'{name}' is a user; organizations and users share one namespace")
            canonical = []  # as the accounts spell them: membership is matched exactly
            for member in members:
                row = conn.execute("SELECT name, kind FROM accounts WHERE name = ?", (member,)).fetchone()
                if row is None or row["kind"] != "user":
                    raise NotFound(
                        f"no user named '{member}'; create it first with `peftkit registry user add {member}`, "
                        "then add it to the organization"
                    )
                canonical.append(row["name"])
            if kind is None:
                conn.execute("INSERT INTO accounts(name, kind, created_at) VALUES (?, 'org', ?)", (name, time.time()))
            else:
                name = conn.execute("SELECT name FROM accounts WHERE name = ?", (name,)).fetchone()["name"]
            for member in canonical:
                conn.execute("INSERT INTO org_members(org, \"user\") VALUES (?, ?) ON CONFLICT DO NOTHING", (name, member))

    def remove_member(self, org: str, user: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM org_members WHERE org = ? AND \"user\" = ?", (org, user))

    def list_accounts(self) -> list[dict]:
        with self.db.read() as conn:
            rows = conn.execute("SELECT name, kind, created_at FROM accounts ORDER BY kind DESC, name").fetchall()
            members = conn.execute("SELECT org, \"user\" FROM org_members ORDER BY \"user\"").fetchall()
        by_org: dict[str, list[str]] = {}
        for m in members:
            by_org.setdefault(m["org"].lower(), []).append(m["user"])
        return [
            {
                "name": r["name"],
                "kind": r["kind"],
                "created_at": _dt(r["created_at"]).isoformat(),
                **({"members": by_org.get(r["name"].lower(), [])} if r["kind"] == "org" else {}),
            }
            for r in rows
        ]

    def orgs_of(self, user: str) -> frozenset[str]:
        with self.db.connection() as conn:
            rows = conn.execute("SELECT org FROM org_members WHERE \"user\" = ?", (user,)).fetchall()
        return frozenset(r["org"] for r in rows)

    # -- tokens -------------------------------------------------------------
    def create_token(self, user: str, *, write: bool, name: str = "") -> tuple[TokenInfo, str]:
        """Create a token; returns its info and the secret (shown once, never stored)."""
        token_id = secrets.token_hex(4)
        secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        with self.db.write() as conn:
            if self._kind(conn, user) != "user":
                raise NotFound(f"no user named '{user}'; create it first with `peftkit registry user add {user}`")
            row = conn.execute("SELECT name FROM accounts WHERE name = ?", (user,)).fetchone()
            user = row["name"]
            conn.execute(
                "INSERT INTO tokens(id, \"user\", name, write, secret_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, user, name, int(write), _hash(secret), now),
            )
        return TokenInfo(token_id, user, name, write, _dt(now), None, False), secret

    def list_tokens(self, user: str | None = None, *, include_revoked: bool = False) -> list[TokenInfo]:
        sql = "SELECT * FROM tokens"
        where, params = [], []
        if user is not None:
            where.append('"user" = ?')
            params.append(user)
        if not include_revoked:
            where.append("revoked_at IS NULL")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at"
        with self.db.read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            TokenInfo(
                r["id"], r["user"], r["name"], bool(r["write"]), _dt(r["created_at"]), _dt(r["last_used"]),
                r["revoked_at"] is not None,
            )
            for r in rows
        ]

    def revoke_token(self, token_id: str) -> None:
        with self.db.write() as conn:
            row = conn.execute("SELECT revoked_at FROM tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"no token with id '{token_id}'; see `peftkit registry token list`")
            if row["revoked_at"] is None:
                conn.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", (time.time(), token_id))

    def authenticate(self, secret: str) -> Principal:
        """Resolve a bearer secret to a principal, or raise :class:`Unauthorized`."""
        if not secret.startswith(TOKEN_PREFIX):
            raise Unauthorized("Invalid credentials in Authorization header")
        digest = _hash(secret)
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT id, \"user\", name, write, secret_hash, last_used, revoked_at FROM tokens WHERE secret_hash = ?",
                (digest,),
            ).fetchone()
        if row is None or row["revoked_at"] is not None or not hmac.compare_digest(row["secret_hash"], digest):
            raise Unauthorized("Invalid credentials in Authorization header")
        now = time.time()
        if row["last_used"] is None or now - row["last_used"] > _LAST_USED_RESOLUTION_S:
            with self.db.write() as conn:
                conn.execute("UPDATE tokens SET last_used = ? WHERE id = ?", (now, row["id"]))
        return self._principal(row)

    def principal_of_token(self, token_id: str) -> Principal | None:
        """The principal of a token by its id, or None when it does not exist or is revoked
        (a web session keeps the id of the token its user signed in with)."""
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT id, \"user\", name, write FROM tokens WHERE id = ? AND revoked_at IS NULL", (token_id,)
            ).fetchone()
        return self._principal(row) if row is not None else None

    def _principal(self, row) -> Principal:
        return Principal(
            user=row["user"], write=bool(row["write"]), orgs=self.orgs_of(row["user"]),
            token_id=row["id"], token_name=row["name"],
        )

    def members_of(self, org: str) -> list[str]:
        """The members of organization ``org`` (empty for a user or an unknown name)."""
        with self.db.connection() as conn:
            rows = conn.execute("SELECT \"user\" FROM org_members WHERE org = ? ORDER BY \"user\"", (org,)).fetchall()
        return [r["user"] for r in rows]


def parse_bearer(header: str | None) -> str | None:
    """The secret in an ``Authorization: Bearer <secret>`` header, or None when absent."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise BadRequest("Authorization header must be 'Bearer <token>'")
    return value.strip()


def not_bearer_reason(header: str) -> str:
    """Why ``header`` (an Authorization value :func:`parse_bearer` refused) is no bearer token, naming its
    scheme but never its credentials (the reason travels back in a 401)."""
    parts = header.split(None, 1)
    if len(parts) == 1 and parts[0].lower() == "bearer":
        return "the Authorization header is 'Bearer' without a token"
    if len(parts) == 2 and parts[0].isascii() and parts[0].isalpha() and len(parts[0]) <= 20:
        return f"the Authorization header is '{parts[0]} ...', not 'Bearer <token>'"
    return "the Authorization header is not 'Bearer <token>'"
