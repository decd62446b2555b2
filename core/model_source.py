"""Before transformers loads a model or tokenizer by hub id: fail at once, and clearly, when it cannot.

Given an id that is not a local folder, transformers asks the Hugging Face
Hub, and huggingface_hub retries a refused connection or a failed name
lookup for about a minute before reporting "couldn't connect". Offline
mode fails faster, but in the same words. :func:`model_source_options`
checks first: a copy in the Hugging Face cache is used without asking the
hub; without one, an unreachable hub or offline mode is one error naming
the id and the fix (the probe is :func:`peftkit.core.reachability.unreachable`,
the hub client's too). A hub that is merely slow is left to transformers.
Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ModelSourceError
from .offline import offline_setting
from .reachability import unreachable

#: The variables that turn offline mode on for the Hugging Face libraries, or for peftkit as a whole.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PEFTKIT_OFFLINE")
#: Files of which one is in every cached model or tokenizer.
_CACHE_MARKERS = ("config.json", "tokenizer_config.json")


def looks_local(name: str | None) -> bool:
    """Whether a base model name is a local folder rather than a hub id (``org/name``)."""
    if not name:
        return False
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or Path(name).exists()


def model_source_options(name_or_path: str | os.PathLike, what: str = "the model", *,
                         cache_dir: str | None = None) -> dict[str, Any]:
    """Extra ``from_pretrained`` options for loading ``name_or_path``: ``{}`` normally,
    ``{"local_files_only": True}`` when the hub cannot be asked but a cached copy exists.

    Raises :class:`ModelSourceError` when ``name_or_path`` is a hub id (not a
    local folder), no copy is cached, and offline mode is on or the hub's
    address refuses connections or does not resolve.
    """
    name = os.fspath(name_or_path)
    if Path(name).expanduser().exists() or not _is_hub_id(name):
        return {}
    offline = offline_setting(OFFLINE_VARIABLES)
    problem = f"offline mode is on ({offline})" if offline else None
    endpoint = _endpoint()
    if problem is None:
        reason = unreachable(endpoint)
        problem = f"{endpoint} cannot be reached ({reason})" if reason else None
    if problem is None:
        return {}
    if _cached(name, cache_dir):
        return {"local_files_only": True}
    fix = (f"unset {offline.split('=')[0]} to download it" if offline else
           "go online (check the network connection, a proxy, and HF_ENDPOINT) and try again")
    raise ModelSourceError(
        f"cannot load {what} {name!r}: it is not a local folder, so it would come from the Hugging Face "
        f"Hub, but {problem} and the Hugging Face cache ({_cache_root(cache_dir)}) has no copy of it. Give the path "
        f"of a model folder instead, or {fix}")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")  # what transformers will ask: HF_ENDPOINT, read at import


def _cache_root(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _cached(name: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, marker, cache_dir=cache_dir), str)
               for marker in _CACHE_MARKERS)
