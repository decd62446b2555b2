"""peftkit's own record of a saved adapter: method, plugin and versions, base model, the full config.

Where it lives depends on who else reads the folder:

* a method in PEFT's format keeps ``adapter_config.json`` exactly as PEFT
  writes it (PEFT warns about any key it does not know), and the record goes
  to ``peftkit.json`` beside it, a file PEFT never opens;
* a method PEFT does not have keeps it under the ``peftkit`` key of
  ``adapter_config.json``, so its folder stays one self-describing config.

Folders saved by earlier peftkit versions have the key for every method;
the key wins when both are present. Torch-free (the hub client reads it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .errors import AdapterLoadError, DAMAGED_FILE_FIX

OWN_METADATA_NAME = "peftkit.json"
OWN_KEY = "peftkit"


def parse_own_metadata(raw: bytes | str, where: str) -> dict[str, Any]:
    """The record in a ``peftkit.json``'s content, or an AdapterLoadError naming ``where``."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{where} is not valid JSON ({exc}): {DAMAGED_FILE_FIX}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{where} must hold a JSON object, not {type(data).__name__}: {DAMAGED_FILE_FIX}")
    return data


def read_own_metadata(folder: str | Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """The record of the adapter in ``folder`` whose ``adapter_config.json`` holds ``config``
    (``{}`` when it has none, e.g. a folder PEFT saved)."""
    own = config.get(OWN_KEY)
    if isinstance(own, dict):
        return own
    path = Path(folder) / OWN_METADATA_NAME
    if not path.is_file():
        return {}
    return parse_own_metadata(path.read_bytes(), str(path))


def with_own_metadata(folder: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the record under the ``peftkit`` key wherever it was saved: one dict to read."""
    own = read_own_metadata(folder, config)
    return {**config, OWN_KEY: own} if own and OWN_KEY not in config else config


def split_own_metadata(config: dict[str, Any], peft_format: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(adapter_config.json's content, peftkit.json's content or None)`` for a config holding the
    record under the ``peftkit`` key: moved out for a method in PEFT's format, kept in otherwise."""
    if not peft_format or OWN_KEY not in config:
        return config, None
    rest = {k: v for k, v in config.items() if k != OWN_KEY}
    return rest, config[OWN_KEY]
