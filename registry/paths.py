"""Where the registry keeps its data by default."""

from __future__ import annotations

import os
from pathlib import Path


def peftkit_home() -> Path:
    """``$PEFTKIT_HOME``, else ``~/.cache/peftkit``."""
    home = os.environ.get("PEFTKIT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "peftkit"


def default_data_dir() -> Path:
    """Data folder of ``peftkit registry serve``: ``$PEFTKIT_HOME/registry`` or ``~/.cache/peftkit/registry``."""
    return peftkit_home() / "registry"
