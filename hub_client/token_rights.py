"""What a hub token may do, read from the hub's whoami answer, and whether that rules out a push.

A long job that ends in a push (``peftkit train --push``) asks the hub once,
before it starts, rather than finding out at the end. Both a peftkit registry
and the Hugging Face Hub answer ``GET /api/whoami-v2`` with the token's user,
the organizations the user belongs to and the token's role
(``auth.accessToken.role``: ``read``, ``write``, ``admin`` on the Hugging Face
Hub, or ``fineGrained`` for a token with per-repo permissions).

Only a certain refusal counts: a ``read`` role, or a namespace that is neither
the user's nor one of their organizations. Whatever the answer leaves open (a
fine-grained token, an account that is not a user, a role inside an
organization) is left to the push itself, so that no push that would work is
refused here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The role of a token that may not write (both hubs spell it so).
READ_ONLY_ROLE = "read"


@dataclass(frozen=True)
class TokenRights:
    """Who a token acts as and what it may do, as far as the hub's whoami answer says."""

    user: str | None
    #: ``"user"`` for a person's token; anything else (an app, an organization token) is not judged.
    kind: str | None
    orgs: frozenset[str]
    #: ``read``, ``write``, ``admin``, ``fineGrained``, or None when the answer does not say.
    role: str | None

    @classmethod
    def from_whoami(cls, data: Any) -> TokenRights:
        """Read a ``/api/whoami-v2`` answer; missing or odd fields become None (nothing is judged on them)."""
        if not isinstance(data, dict):
            return cls(None, None, frozenset(), None)
        orgs = frozenset(str(org["name"]) for org in data.get("orgs") or []
                         if isinstance(org, dict) and isinstance(org.get("name"), str))
        auth = data.get("auth")
        access = auth.get("accessToken") if isinstance(auth, dict) else None
        role = access.get("role") if isinstance(access, dict) else None
        name, kind = data.get("name"), data.get("type")
        return cls(name if isinstance(name, str) else None, kind if isinstance(kind, str) else None, orgs,
                   role if isinstance(role, str) else None)

    @property
    def read_only(self) -> bool:
        return self.role == READ_ONLY_ROLE

    def may_write_to(self, namespace: str) -> bool | None:
        """Whether ``namespace`` is the user's or one of their organizations'; None when the answer cannot
        tell (no user name, or a token that is not a person's)."""
        if self.user is None or self.kind != "user":
            return None
        return namespace.lower() in {self.user.lower(), *(org.lower() for org in self.orgs)}


def push_refusal(rights: TokenRights, repo_id: str, address: str, *, new_token_hint: str) -> str | None:
    """Why a push of ``repo_id`` with this token is certain to be refused, or None when it may go through.

    ``new_token_hint`` says where a write token comes from on this hub."""
    token = f"pushing {repo_id} to {address}: the token" + (f" of user '{rights.user}'" if rights.user else "")
    if rights.read_only:
        return f"{token} is read-only, and a push needs write access; {new_token_hint}"
    namespace, name = repo_id.split("/", 1)
    if rights.may_write_to(namespace) is False:
        orgs = f" and to their organizations ({', '.join(sorted(rights.orgs))})" if rights.orgs else ""
        return (f"{token} may not write to the namespace '{namespace}', only to '{rights.user}'{orgs}; "
                f"push to one of those (e.g. {rights.user}/{name}), "
                f"use a token of a user who may write to '{namespace}', or, if '{namespace}' is an organization, "
                f"have its administrator make '{rights.user}' a member")
    return None
