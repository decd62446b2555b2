"""A composition setup as one folder: the blocks, the adapters they name, and fusion weights.

Layout::

    <folder>/composition.json        the composition (JSON form) and where each part lives
    <folder>/adapters/<name>/        one adapter folder each (PEFT's format where PEFT has the method)
    <folder>/fusions/<name>/         one fusion folder each (fusion_config.json + fusion_model.safetensors)

``composition.json``::

    {"peftkit_composition": {"format_version": 1, "peftkit_version": "..."},
     "composition": {"block": "stack", "children": [...]},
     "composition_string": "stack(lang_de, fuse(ner, pos, name=\\"ner_pos\\"))",
     "adapters": {"lang_de": "adapters/lang_de", ...},
     "fusions": {"ner_pos": "fusions/ner_pos"},
     "base_model_name_or_path": "...", "base_model": {...}}

Loading puts every adapter and fusion on the model under its saved name and
activates the composition; on any error the model is left as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import composition
from .composition import Node
from .errors import AdapterLoadError, CompositionError, PeftkitError
from .fileio import atomic_folder, read_folder_json, write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from .adapted_protocol import AdaptedModelProtocol

COMPOSITION_NAME = "composition.json"
COMPOSITION_FORMAT_VERSION = 1


def save_composition(model: "AdaptedModelProtocol", path: str | os.PathLike, node: Node | str | None = None,
                     **card: Any) -> None:
    """Write ``node`` (default: the active composition) with its adapters and fusions under ``path``."""
    from .fusion import save_fusion
    from .serialization import base_model_id, base_model_info, peftkit_version, write_adapter

    if node is None:
        node = model.active_composition
        if node is None:
            raise CompositionError("no composition is active; pass one, e.g. save_composition(path, "
                                   "'stack(a, b)'), or set_active() it first")
    node = composition.as_node(node)
    model.check_composition(node)
    fusion_names = list(dict.fromkeys(b.fusion_name for b in composition.fuse_blocks(node)))
    adapters = composition.adapter_leaves(node)
    data = {
        "peftkit_composition": {"format_version": COMPOSITION_FORMAT_VERSION, "peftkit_version": peftkit_version()},
        "composition": composition.to_json(node),
        "composition_string": str(node),
        "adapters": {name: f"adapters/{name}" for name in adapters},
        "fusions": {name: f"fusions/{name}" for name in fusion_names},
        "base_model_name_or_path": base_model_id(model),
        "base_model": base_model_info(model),
    }
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PeftkitError(f"cannot save a composition to {str(path)!r}: it is a file, not a folder")
    with atomic_folder(path) as tmp:
        for name in adapters:
            folder = tmp / "adapters" / name
            folder.mkdir(parents=True)
            write_adapter(model, name, folder, card)
        for name in fusion_names:
            save_fusion(model, name, tmp / "fusions" / name)
        write_text_atomic(tmp / COMPOSITION_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_composition(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``composition.json`` (no weights touched); ``data["node"]`` is the parsed composition."""
    path = Path(path)
    config = path / COMPOSITION_NAME
    data = read_folder_json(path, COMPOSITION_NAME, "composition")
    own = data.get("peftkit_composition") if isinstance(data, dict) else None
    if not isinstance(own, dict):
        raise AdapterLoadError(f"{config} is not a peftkit composition file (no 'peftkit_composition' key)")
    version = own.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterLoadError(f"{config}: format_version must be a whole number, got {version!r}; "
                               f"save the composition again")
    if version > COMPOSITION_FORMAT_VERSION:
        raise AdapterLoadError(f"{config} has composition format {own.get('format_version')}, newer than this "
                               f"peftkit reads ({COMPOSITION_FORMAT_VERSION}); upgrade peftkit")
    try:
        node = composition.from_json(data.get("composition"))
    except CompositionError as exc:
        raise AdapterLoadError(f"{config}: the composition is invalid: {exc}") from None
    for key in ("adapters", "fusions"):
        table = data.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise AdapterLoadError(f"{config}: {key!r} must map names to folders inside the composition folder")
    missing = [n for n in composition.adapter_leaves(node) if n not in data.get("adapters", {})]
    if missing:
        raise AdapterLoadError(f"{config}: the composition names {', '.join(map(repr, missing))}, which the file "
                               f"does not list under 'adapters'")
    data["node"] = node
    return data


def _inside(root: Path, relative: str, where: str) -> Path:
    target = (root / relative).resolve()
    if target != root.resolve() and root.resolve() not in target.parents:
        raise AdapterLoadError(f"{where}: {relative!r} points outside the composition folder")
    return target


def load_composition(adapted: "AdaptedModelProtocol", path: str | os.PathLike, *, activate: bool = True) -> None:
    """Put the composition folder's adapters and fusions on ``adapted`` under their saved names and
    activate its composition (``activate``). On any error ``adapted`` is left as it was.
    ``AdaptedModel.load_composition`` wraps a bare base model first."""
    path = Path(path)
    where = str(path / COMPOSITION_NAME)
    data = read_composition(path)
    node: Node = data["node"]
    adapters: dict[str, str] = data.get("adapters", {})
    fusions: dict[str, str] = data.get("fusions", {})
    taken = [n for n in adapters if n in adapted.adapters]
    if taken:
        raise AdapterLoadError(f"{where}: the model already has adapters named {', '.join(map(repr, taken))}; "
                               f"delete them first or load the composition onto a fresh model")
    taken = [n for n in fusions if n in adapted.fusions]
    if taken:
        raise AdapterLoadError(f"{where}: the model already has fusions named {', '.join(map(repr, taken))}")
    loaded_adapters: list[str] = []
    loaded_fusions: list[str] = []
    state = adapted.adapter_state
    previous = (state.active, state.active_names)
    try:
        for name, folder in adapters.items():
            adapted.load_adapter(str(_inside(path, folder, where)), name, activate=False)
            loaded_adapters.append(name)
        for name, folder in fusions.items():
            adapted.load_fusion(_inside(path, folder, where), name)
            loaded_fusions.append(name)
        if activate:
            adapted.set_active(node)
    except BaseException:
        state.active, state.active_names = previous
        for name in reversed(loaded_fusions):
            adapted.delete_fusion(name)
        for name in reversed(loaded_adapters):
            adapted.delete_adapter(name)
        raise
