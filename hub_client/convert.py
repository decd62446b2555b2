"""Push an adapter folder in another folder format than it was saved in (``push(..., format="adapters")``).

A folder saved in peftkit's format is loaded onto its base model (the local folder its config
records, else ``base_model`` given to the push) and saved again in AdapterHub's format; only the
copy in the push's scratch folder is written. An AdapterHub folder is not converted the other way
(its config does not say which task model class to load): load it and push the live model. The base model is needed because the
formats key tensors by module paths and differ per model family. Torch is imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.core.adapterhub_format import is_adapterhub_config

from .errors import HubError

#: Values of push's ``format``: the folder formats ``save_adapter`` writes.
PUSH_FORMATS = ("peftkit", "adapters")


def folder_format(config: dict[str, Any]) -> str:
    return "adapters" if is_adapterhub_config(config) else "peftkit"


def converted(folder: Path, config: dict[str, Any], fmt: str, workdir: Path, base_model: str | None, name: str) -> Path:
    """``folder`` saved again in format ``fmt`` under ``workdir`` (``folder`` itself when it is in ``fmt``)."""
    if fmt not in PUSH_FORMATS:
        raise HubError(f"unknown folder format {fmt!r}; choose one of {', '.join(PUSH_FORMATS)}")
    if folder_format(config) == fmt:
        return folder
    if fmt == "peftkit":
        raise HubError(f"{folder} is in AdapterHub's format; to publish it in peftkit's, load it on its base model "
                       f"(peftkit.from_pretrained(model, folder)) and push the model")
    from peftkit.core.errors import PeftkitError
    from peftkit.core.model import AdaptedModel
    from peftkit.core.model_source import model_source_options

    from .compose import load_base_model

    recorded = config.get("base_model_name_or_path") or config.get("model_name")
    # A folder saved on a local copy records its path: load that, and publish base_model as the id.
    base = recorded if recorded and Path(recorded).expanduser().is_dir() else base_model or recorded
    if not base:
        raise HubError(f"{folder} records no base model, which converting it to the {fmt!r} format loads; pass "
                       f"base_model='org/name' (--base-model)")
    model = load_base_model(base, [config], **model_source_options(base, "the base model"))
    try:
        adapted = AdaptedModel(model)
        adapted.load_adapter(str(folder), name)
        out = workdir / "converted"
        adapted.save_adapter(str(out), name, format=fmt)
    except PeftkitError as exc:
        raise HubError(f"cannot push {folder} in the {fmt!r} format: {exc}") from None
    return out

