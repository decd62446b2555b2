"""The registry's accounts and tokens, value by value, on a real store: who a token acts as, which
namespaces it reads and writes (case-insensitively), the fix each refusal names, the token's form
and stored hash, last-used bookkeeping, revocation, listing filters and the Bearer header parser.
Written to kill the mutants `make mutate` found alive in registry/accounts.py (docs/mutation.md)."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from peftkit.registry import Forbidden, RegistryStore
from peftkit.registry.accounts import TOKEN_PREFIX, Principal, TokenInfo, parse_bearer
from peftkit.registry.errors import AccountExists, BadRequest, NotFound, Unauthorized


@pytest.fixture
def accounts(tmp_path: Path):
    store = RegistryStore(tmp_path / "reg", fsync=False)
    acc = store.accounts
    acc.add_user("Alice")
    acc.add_user("bob")
    acc.add_org("Acme", ["Alice"])
    yield acc
    store.close()


def _last_used(acc, token_id: str):
    (info,) = [t for t in acc.list_tokens(include_revoked=True) if t.id == token_id]
    return info.last_used


def test_principal_namespaces_are_lower_cased_and_reads_follow_them():
    p = Principal(user="Alice", write=True, orgs=frozenset({"Acme", "Beta"}))
    assert p.namespaces == frozenset({"alice", "acme", "beta"})
    assert p.can_read("ALICE") and p.can_read("acme") and p.can_read("Beta")
    assert not p.can_read("bob")


def test_check_write_names_the_fix_for_each_kind_of_namespace():
    p = Principal(user="alice", write=True, orgs=frozenset({"acme"}), token_id="t1", token_name="laptop")
    p.check_write("ALICE")
    p.check_write("Acme")
    kinds = {"bob": "user", "beta": "org"}
    with pytest.raises(Forbidden) as refused:
        p.check_write("beta", kinds.get)
    assert str(refused.value) == (
        "user 'alice' may not write to 'beta', an organization's namespace: an administrator adds them with "
        "`peftkit registry org add beta --member alice`, or push to 'alice/...'")
    with pytest.raises(Forbidden) as refused:
        p.check_write("bob", kinds.get)
    assert str(refused.value) == ("user 'alice' may not write to 'bob', another user's namespace: push to "
                                  "'alice/...' or to an organization they are a member of")
    with pytest.raises(Forbidden) as refused:  # no lookup: the registry cannot tell what 'ghost' is
        p.check_write("ghost")
    assert str(refused.value) == ("user 'alice' may not write to 'ghost', a namespace: push to 'alice/...' "
                                  "or to an organization they are a member of")
    with pytest.raises(Forbidden) as refused:  # a name no account has
        p.check_write("ghost", kinds.get)
    assert str(refused.value) == (
        "user 'alice' may not write to 'ghost': no user or organization of that name exists on this registry; "
        "push to 'alice/...' or to an organization they are a member of (an administrator creates an organization "
        "with `peftkit registry org add ghost --member alice`)")
    with pytest.raises(Forbidden) as refused:  # a name the registry's URLs use
        p.check_write("api", kinds.get)
    assert str(refused.value) == ("'api' is a name the registry reserves for its URLs, no namespace anyone may "
                                  "write to: push to 'alice/...' or to an organization they are a member of")


def test_a_read_only_token_is_refused_by_name_or_id():
    named = Principal(user="alice", write=False, orgs=frozenset(), token_id="t1", token_name="ci")
    with pytest.raises(Forbidden) as refused:
        named.check_write("alice")
    assert str(refused.value) == ("token 'ci' is read-only; create one with write access: "
                                  "`peftkit registry token create alice --write`")
    with pytest.raises(Forbidden, match="^token 't1' is read-only"):
        Principal(user="alice", write=False, orgs=frozenset(), token_id="t1").check_write("alice")


def test_token_form_stored_hash_and_principal(accounts):
    info, secret = accounts.create_token("alice", write=True, name="laptop")  # the account's own spelling kept
    assert re.fullmatch(rf"{TOKEN_PREFIX}{info.id}_[A-Za-z0-9_-]{{43}}", secret)
    assert re.fullmatch(r"[0-9a-f]{8}", info.id)
    assert (info.user, info.name, info.write, info.revoked, info.last_used) == ("Alice", "laptop", True, False, None)
    assert abs(info.created_at.timestamp() - time.time()) < 3600 and info.created_at.tzinfo == timezone.utc
    with accounts.db.read() as conn:
        row = conn.execute("SELECT secret_hash, write FROM tokens WHERE id = ?", (info.id,)).fetchone()
    assert row["secret_hash"] == hashlib.sha256(secret.encode("utf-8")).hexdigest() and row["write"] == 1
    p = accounts.authenticate(secret)
    assert p == Principal(user="Alice", write=True, orgs=frozenset({"Acme"}), token_id=info.id, token_name="laptop")
    assert accounts.principal_of_token(info.id) == p
    read_info, read_secret = accounts.create_token("bob", write=False)
    assert accounts.authenticate(read_secret) == Principal("bob", False, frozenset(), read_info.id, "")


def test_authenticate_refuses_everything_but_a_live_secret(accounts):
    info, secret = accounts.create_token("bob", write=True)
    for wrong in ("", secret[len(TOKEN_PREFIX):], secret + "x", secret[:-1], f"{TOKEN_PREFIX}{info.id}_guess",
                  secret.upper()):
        with pytest.raises(Unauthorized, match="^Invalid credentials in Authorization header$"):
            accounts.authenticate(wrong)
    accounts.revoke_token(info.id)
    accounts.revoke_token(info.id)  # twice: still revoked, no error
    with pytest.raises(Unauthorized):
        accounts.authenticate(secret)
    assert accounts.principal_of_token(info.id) is None
    assert accounts.principal_of_token("00000000") is None
    with pytest.raises(NotFound, match="^no token with id 'nope'; see `peftkit registry token list`$"):
        accounts.revoke_token("nope")


def test_last_used_is_written_once_a_minute_at_most(accounts):
    info, secret = accounts.create_token("bob", write=True)
    accounts.authenticate(secret)
    first = _last_used(accounts, info.id)
    assert first is not None
    recent, old = time.time() - 30, time.time() - 120
    for stored, updated in ((recent, False), (old, True)):
        with accounts.db.write() as conn:
            conn.execute("UPDATE tokens SET last_used = ? WHERE id = ?", (stored, info.id))
        accounts.authenticate(secret)
        seen = _last_used(accounts, info.id).timestamp()
        assert (abs(seen - stored) > 1) == updated, (stored, seen)


def test_listing_tokens_filters_by_user_and_revocation_in_creation_order(accounts):
    a1, _ = accounts.create_token("alice", write=True, name="one")
    b1, _ = accounts.create_token("bob", write=False, name="two")
    a2, _ = accounts.create_token("alice", write=False, name="three")
    accounts.revoke_token(a1.id)
    assert [t.id for t in accounts.list_tokens()] == [b1.id, a2.id]
    assert [t.id for t in accounts.list_tokens("Alice")] == [a2.id]
    assert [(t.id, t.revoked) for t in accounts.list_tokens("Alice", include_revoked=True)] == [(a1.id, True),
                                                                                                (a2.id, False)]
    assert [t.id for t in accounts.list_tokens(include_revoked=True)] == [a1.id, b1.id, a2.id]
    (listed,) = accounts.list_tokens("bob")
    assert (listed.name, listed.write, listed.user) == ("two", False, "bob")


def test_token_info_json():
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    info = TokenInfo("ab12cd34", "alice", "ci", False, created, None, True)
    assert info.to_json() == {"id": "ab12cd34", "user": "alice", "name": "ci", "scope": "read",
                              "created_at": "2026-01-02T03:04:05+00:00", "last_used": None, "revoked": True}
    used = TokenInfo("ab12cd34", "alice", "ci", True, created, created, False).to_json()
    assert (used["scope"], used["last_used"], used["revoked"]) == ("write", "2026-01-02T03:04:05+00:00", False)


def test_accounts_orgs_and_members(accounts):
    assert accounts.kind("Alice") == "user" and accounts.kind("Acme") == "org" and accounts.kind("nobody") is None
    with pytest.raises(AccountExists, match="^an account named 'alice' already exists \\(a user\\)$"):
        accounts.add_user("alice")
    with pytest.raises(AccountExists, match="^'bob' is a user; organizations and users share one namespace$"):
        accounts.add_org("bob")
    with pytest.raises(NotFound, match="^no user named 'Acme'; create it first"):
        accounts.add_org("beta", ["Acme"])  # an organization is no member
    with pytest.raises(NotFound, match="^no user named 'carol'; create it first with "
                                       "`peftkit registry user add carol`$"):
        accounts.create_token("carol", write=True)
    with pytest.raises(NotFound):
        accounts.create_token("Acme", write=True)
    accounts.add_org("acme", ["bob", "bob"])  # the existing org, any case; adding twice is one membership
    assert accounts.members_of("Acme") == ["Alice", "bob"]
    assert accounts.orgs_of("bob") == frozenset({"Acme"})
    listed = accounts.list_accounts()  # users first, then organizations, each by name
    assert [(a["name"], a["kind"], a.get("members")) for a in listed] == [
        ("Alice", "user", None), ("bob", "user", None), ("Acme", "org", ["Alice", "bob"])]
    assert all(abs(datetime.fromisoformat(a["created_at"]).timestamp() - time.time()) < 3600 for a in listed)
    accounts.remove_member("Acme", "Alice")
    assert accounts.members_of("Acme") == ["bob"] and accounts.orgs_of("Alice") == frozenset()
    assert accounts.members_of("bob") == []


@pytest.mark.parametrize("header, secret", [
    (None, None), ("", None), ("Bearer abc", "abc"), ("bearer   abc  ", "abc"), ("  BEARER abc", "abc"),
])
def test_parse_bearer(header, secret):
    assert parse_bearer(header) == secret


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer    ", "Token abc", "abc"])
def test_parse_bearer_refuses_other_forms(header):
    with pytest.raises(BadRequest, match="^Authorization header must be 'Bearer <token>'$"):
        parse_bearer(header)


def test_account_name_refusals_say_what_kind_of_name(accounts):
    with pytest.raises(Exception, match="^invalid user name 'bad name!'"):
        accounts.add_user("bad name!")
    with pytest.raises(Exception, match="^invalid organization name 'bad name!'"):
        accounts.add_org("bad name!")
    with pytest.raises(Exception, match="^user name 'api' is reserved"):
        accounts.add_user("api")
    with pytest.raises(Exception, match="^organization name 'api' is reserved"):
        accounts.add_org("api")
    with pytest.raises(NotFound) as refused:
        accounts.add_org("beta", ["carol"])
    assert str(refused.value) == ("no user named 'carol'; create it first with `peftkit registry user add carol`, "
                                  "then add it to the organization")


def test_listed_tokens_and_accounts_carry_their_values(accounts):
    info, _ = accounts.create_token("alice", write=True, name="w")
    (listed,) = accounts.list_tokens("Alice")
    assert listed == info  # id, user, name, write, created_at, last_used, revoked
    accounts.add_org("Empty")
    assert {a["name"]: a.get("members") for a in accounts.list_accounts()}["Empty"] == []
