"""A random secret in a file that every process and server sharing a folder reads alike."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def new_secret_hex() -> str:
    """32 random bytes as hex, the form a secret is kept in."""
    return secrets.token_hex(32)


def load_or_create_secret_file(path: Path) -> bytes:
    """The secret in ``path``, created (``0o600``, atomically, once whoever races to create it) when missing."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_secret_hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process won the race: then use theirs
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())
