"""peftkit's data folder on this machine (the embedded hub, the pull cache, saved tokens, a registry's data)."""

from __future__ import annotations

import os
from pathlib import Path


def peftkit_home() -> Path:
    """``$PEFTKIT_HOME``, else ``~/.cache/peftkit``."""
    home = os.environ.get("PEFTKIT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "peftkit"
