"""Hub tokens: where they come from, where ``peftkit hub login`` keeps them, and keeping them secret.

Which token a hub gets, first match wins:

1. the ``token=`` argument (``--token-file`` on the command line);
2. ``PEFTKIT_HUB_TOKEN``;
3. for the Hugging Face Hub: ``HF_TOKEN``, then a token saved by
   ``peftkit hub login --hub hf``, then the one ``huggingface-cli login`` saved;
   for a peftkit registry: a token saved by ``peftkit hub login --hub URL``,
   then ``HF_TOKEN`` (the variable ``huggingface_hub`` itself sends).

Tokens saved by ``login`` live in ``$PEFTKIT_HOME/hub_tokens.json`` (one per
hub, file mode 0600). A token is never printed or logged: every message built
from a server's answer goes through :func:`redact`.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from peftkit.hub_rules.home import peftkit_home

from .errors import HubAuthError

TOKEN_FILE_NAME = "hub_tokens.json"
#: Where :func:`resolve_token` says a token given to the call itself came from.
EXPLICIT_TOKEN_SOURCE = "the token argument"
_REDACTED = "***"
#: Tokens this process has used, so any message can be scrubbed of them.
_SEEN: set[str] = set()


def token_file() -> Path:
    return peftkit_home() / TOKEN_FILE_NAME


def _remember(token: str | None) -> str | None:
    if token:
        _SEEN.add(token)
    return token


def redact(text: str, *tokens: str | None) -> str:
    """``text`` with every known token (and the ones given) replaced by ``***``."""
    for token in sorted({t for t in (*tokens, *_SEEN) if t}, key=len, reverse=True):
        if len(token) >= 4:
            text = text.replace(token, _REDACTED)
    return text


def _read_store() -> dict[str, str]:
    path = token_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise HubAuthError(f"{path} is damaged (not JSON); delete it and run `peftkit hub login` again") from None
    if not isinstance(data, dict):
        raise HubAuthError(f"{path} is damaged (not a JSON object); delete it and run `peftkit hub login` again")
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}


def _write_store(data: dict[str, str]) -> None:
    """Write the token file with mode 0600 from its creation on (never world-readable, not even briefly)."""
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hub_tokens.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def checked_token(token: str) -> str:
    """``token`` without surrounding whitespace; HubAuthError where it is empty or has whitespace inside (checked
    before a hub is asked about it: huggingface_hub reads an empty token as "no token")."""
    token = token.strip()
    if not token:
        raise HubAuthError("the token is empty; paste the token your hub gave you")
    if any(c.isspace() for c in token):
        raise HubAuthError("the token contains whitespace; paste it exactly as your hub gave it")
    return token


def save_token(hub_key: str, token: str) -> Path:
    """Store ``token`` for the hub ``hub_key``; returns the token file."""
    token = checked_token(token)
    data = _read_store()
    data[hub_key] = token
    _write_store(data)
    _remember(token)
    return token_file()


def delete_token(hub_key: str) -> bool:
    """Forget the stored token of ``hub_key``; returns whether there was one."""
    data = _read_store()
    if hub_key not in data:
        return False
    del data[hub_key]
    _write_store(data)
    return True


def stored_token(hub_key: str) -> str | None:
    return _remember(_read_store().get(hub_key))


def read_token_file(path: str | os.PathLike) -> str:
    """A token from a file (``--token-file``), so it never shows up in a process list."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise HubAuthError(f"cannot read the token file {str(path)!r}: {exc.strerror or exc}") from None
    token = text.strip()
    if not token:
        raise HubAuthError(f"the token file {str(path)!r} is empty")
    return _remember(token) or token


def resolve_token(hub_key: str, *, explicit: str | None = None, huggingface: bool = False) -> tuple[str | None, str]:
    """The token for a hub and where it came from (for messages; never the token itself)."""
    if explicit:
        return _remember(explicit), EXPLICIT_TOKEN_SOURCE
    env = os.environ.get("PEFTKIT_HUB_TOKEN")
    if env and env.strip():
        return _remember(env.strip()), "PEFTKIT_HUB_TOKEN"
    hf_env = os.environ.get("HF_TOKEN")
    if huggingface:
        if hf_env and hf_env.strip():
            return _remember(hf_env.strip()), "HF_TOKEN"
        saved = stored_token(hub_key)
        if saved:
            return saved, f"`peftkit hub login` ({token_file()})"
        try:
            from huggingface_hub import get_token
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            return None, "none"
        hf_saved = get_token()
        if hf_saved:
            return _remember(hf_saved), "the token saved by `huggingface-cli login`"
        return None, "none"
    saved = stored_token(hub_key)
    if saved:
        return saved, f"`peftkit hub login` ({token_file()})"
    if hf_env and hf_env.strip():
        return _remember(hf_env.strip()), "HF_TOKEN"
    return None, "none"


def is_huggingface_address(address: str) -> bool:
    """Whether a hub address (``hf``, a URL) is the Hugging Face Hub's, whose tokens come from its web site."""
    return address == "hf" or (address.startswith("http") and "huggingface.co" in address)


def missing_token_message(address: str, action: str) -> str:
    if is_huggingface_address(address):
        return (f"{action} needs a token, and none is set for {address}: run `peftkit hub login --hub hf` "
                f"(a write token from https://huggingface.co/settings/tokens), or set HF_TOKEN or "
                f"PEFTKIT_HUB_TOKEN")
    return (f"{action} needs a token, and none is set for {address}: run `peftkit hub login --hub {address}`, "
            f"or set PEFTKIT_HUB_TOKEN (for a peftkit registry, {registry_token_command('USER')} makes one)")


def registry_token_command(user: str) -> str:
    """How a peftkit registry's administrator makes a write token for ``user``, in the server's data folder:
    a token made in another folder (the default one, when --data is left out) is unknown to the server."""
    return (f"`peftkit registry token create {user} --write --data DIR`, DIR being the data folder the server "
            f"was started with (and --database URL if it has one)")


def write_token_hint(address: str, user: str | None, *, huggingface: bool) -> str:
    """How ``user`` gets a token that may push to the hub at ``address`` (the Hugging Face Hub when
    ``huggingface``, else maybe a peftkit registry), and how to use it."""
    login = f"log in with it (`peftkit hub login --hub {address}`) or set PEFTKIT_HUB_TOKEN"
    if huggingface:
        return f"make a write token at https://huggingface.co/settings/tokens, then {login} or HF_TOKEN"
    return f"a peftkit registry makes one with {registry_token_command(user or 'USER')}; then {login}"


def refused_token_fix(address: str) -> str:
    """What to do when the hub at ``address`` refuses a token as invalid (HTTP 401).

    A peftkit registry knows only the tokens made in its own data folder (or database): one made by
    ``peftkit registry token create`` without the ``--data`` the server was started with lands in the
    default folder, and the server refuses it. Said only for a hub that may be a registry."""
    if is_huggingface_address(address):
        return ("log in with a valid token: `peftkit hub login --hub hf` (a token from "
                "https://huggingface.co/settings/tokens), or set HF_TOKEN or PEFTKIT_HUB_TOKEN")
    return (f"log in with a token this hub issued: `peftkit hub login --hub {address}`, or set "
            f"PEFTKIT_HUB_TOKEN. If the hub is a peftkit registry, the token may have been made in another data "
            f"folder than the server's: make one with {registry_token_command('USER')}; the server's "
            f"'peftkit registry serving ...' line names its folder")
