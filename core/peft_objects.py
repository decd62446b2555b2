"""A Hugging Face PEFT config object (``peft.LoraConfig(...)``) used where peftkit takes a spec.

A PEFT user's ``get_peft_model(model, LoraConfig(r=8, ...))`` becomes ``peftkit.adapt(model,
LoraConfig(r=8, ...))`` with the very same object: it is read as the ``adapter_config.json`` PEFT would save
for it (its ``to_dict()``), by the method that reads that ``peft_type``, with the same checks as a saved
folder (an option peftkit does not have is refused by name, never dropped).
"""

from __future__ import annotations

import enum
import json
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
    try:
        method = method_for(data, where)
        return method, config_from_data(method, data, where)
    except AdapterLoadError as exc:
        raise ConfigError(str(exc).replace("adapter_config.json does not describe", "does not describe")) from None
