"""Top-level functions of the public API (``peftkit.adapt`` and friends)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.core.composition import Node, parse
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import ConfigError
from peftkit.core.plugins import get_registry

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.core.model import AdaptedModel


def adapt(model: "nn.Module", spec: str | AdapterConfig = "lora", adapter_name: str = "default",
          *, trainable: bool = True) -> "AdaptedModel":
    """Wrap ``model`` and add one adapter (PEFT's ``get_peft_model``).

    The adapter is active and, unless ``trainable=False``, the only trainable
    part of the model (with its ``modules_to_save``).
    """
    from peftkit.core.model import AdaptedModel

    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    adapted.add_adapter(adapter_name, spec)
    if trainable:
        adapted.train_adapter(adapter_name)
    else:
        adapted.set_active(adapter_name)
    return adapted


def from_pretrained(model: "nn.Module", path: str, adapter_name: str = "default",
                    trainable: bool = False, *, is_trainable: bool | None = None) -> "AdaptedModel":
    """Load a saved adapter folder onto ``model`` (PEFT's ``PeftModel.from_pretrained``; ``is_trainable`` is
    PEFT's name for ``trainable``)."""
    from peftkit.core.model import AdaptedModel

    _require_model_object(model, "from_pretrained", path)

    return AdaptedModel.from_pretrained(model, path, adapter_name, trainable=trainable, is_trainable=is_trainable)


def load_composition(model: "nn.Module", path: str, *, activate: bool = True) -> "AdaptedModel":
    """Load a folder written by ``save_composition()`` onto ``model`` (a base model, wrapped, or an
    AdaptedModel) and activate its composition: ``AdaptedModel.load_composition``."""
    from peftkit.core.model import AdaptedModel

    _require_model_object(model, "load_composition", path)

    return AdaptedModel.load_composition(model, path, activate=activate)


def _require_model_object(model: Any, call: str, path: str) -> None:
    """A model folder or hub id where a model object belongs is a clear error, not an
    AttributeError from deep inside (peftkit.load takes either, these two do not)."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        raise ConfigError(
            f"peftkit.{call}() takes a model object, not {str(model)!r}: load the base model first "
            f"(e.g. transformers' AutoModelForSequenceClassification.from_pretrained({str(model)!r})) and pass it, "
            f"or use peftkit.load({str(model)!r}, 'ns/repo') for adapters on a hub; {path!r} was not read")


def list_methods() -> list[dict[str, Any]]:
    """Installed tuning methods, as plain dicts (what ``peftkit methods --json`` prints)."""
    registry = get_registry()
    out = []
    for name in sorted(registry.methods):
        method = registry.methods[name]
        out.append({
            "name": name,
            "description": method.description,
            "plugin": method.plugin_name,
            "distribution": method.distribution,
            "version": method.distribution_version,
            "can_merge": method.can_merge,
            "peft_format": method.peft_type is not None,
            "blocks": sorted(method.supported_blocks),
            "options": method.config_class.field_names(),
        })
    return out


def describe_method(name: str) -> dict[str, Any]:
    """One installed method as ``list_methods()`` gives it, plus its aliases and each option's type and
    default (what ``peftkit methods NAME`` prints). An unknown name is a PluginError listing the methods."""
    method = get_registry().get_method(name)
    info = next(m for m in list_methods() if m["name"] == method.name)
    return {**info, "aliases": dict(method.aliases), "options": method.config_class.option_details()}


def parse_composition(text: str) -> Node:
    """Parse ``"stack(a, average(b, c))"`` into composition blocks."""
    return parse(text)
