"""Offline mode as the environment sets it: one reader for the core and the hub client. Torch-free."""

from __future__ import annotations

import os
from collections.abc import Sequence

#: Values that turn an offline variable on (case-insensitive).
TRUE_VALUES = ("1", "true", "yes", "on")


def offline_setting(variables: Sequence[str]) -> str | None:
    """The first of ``variables`` set to a true value, as set (``"PEFTKIT_OFFLINE=1"``); ``None`` when none is."""
    for variable in variables:
        value = os.environ.get(variable, "").strip()
        if value.lower() in TRUE_VALUES:
            return f"{variable}={value}"
    return None
