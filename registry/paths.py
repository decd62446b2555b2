"""Where the registry keeps its data by default."""

from __future__ import annotations

from pathlib import Path

from peftkit.hub_rules.home import peftkit_home


def default_data_dir() -> Path:
    """Data folder of ``peftkit registry serve``: ``$PEFTKIT_HOME/registry`` or ``~/.cache/peftkit/registry``."""
    return peftkit_home() / "registry"
