"""A Hugging Face PEFT config object (``peft.LoraConfig(...)``) used where peftkit takes a spec.

A PEFT user's ``get_peft_model(model, LoraConfig(r=8, ...))`` becomes ``peftkit.adapt(model,
LoraConfig(r=8, ...))`` with the very same object: it is read as the ``adapter_config.json`` PEFT would save
for it (its ``to_dict()``), by the method that reads that ``peft_type``, with the same checks as a saved
folder (an option peftkit does not have is refused by name, never dropped).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings
from typing import Any

from .errors import AdapterLoadError, ConfigError
from .serialization import config_from_data, method_for


def is_peft_config(value: Any) -> bool:
    """Whether ``value`` is a config object of the ``peft`` package (it is not imported here)."""
    return type(value).__module__.split(".")[0] == "peft" and callable(getattr(value, "to_dict", None)) \
        and hasattr(value, "peft_type")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def method_and_config(peft_config: Any) -> tuple[Any, Any]:
    """(method, config) of a PEFT config object, read as the folder PEFT would save for it."""
    where = f"peft.{type(peft_config).__name__}"
    try:
        data = json.loads(json.dumps(peft_config.to_dict(), default=_plain))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} cannot be read as PEFT's adapter_config.json ({exc}); write the method as a "
                          f"spec instead, e.g. 'lora[r=8]'") from None
    unsaved = _settings_outside_the_file(peft_config, data)
    if unsaved:
        raise ConfigError(f"{where} has {', '.join(unsaved)} set on the object, which is not part of the "
                          f"adapter_config.json PEFT saves for it (a function, such as SHiRA's custom mask_fn), so "
                          f"peftkit cannot read it; build the adapter with PEFT (get_peft_model), save it and load the "
                          f"folder with peftkit.from_pretrained, or leave {unsaved[0]} at its default")
    try:
        method = method_for(data, where)
        return method, config_from_data(method, data, where)
    except AdapterLoadError as exc:
        raise ConfigError(str(exc).replace("adapter_config.json does not describe", "does not describe")) from None


def _settings_outside_the_file(peft_config: Any, data: dict[str, Any]) -> list[str]:
    """The public attributes of ``peft_config`` that its ``to_dict()`` leaves out and that differ from what a
    config made from the same fields has (a custom ``mask_fn`` set on a ``peft.ShiraConfig``): read as a folder,
    they would be dropped in silence."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(peft_config)(**{field.name: getattr(peft_config, field.name)
                                         for field in dataclasses.fields(peft_config) if field.init})
    except Exception:  # not a dataclass, or one that cannot be made again: nothing to compare with
        return []
    changed = []
    for name, value in vars(peft_config).items():
        if name in data or name.startswith("_"):
            continue
        other = getattr(fresh, name, None)
        try:
            same = value is other or bool(value == other)
        except Exception:
            same = False
        if not same:
            changed.append(name)
    return changed
