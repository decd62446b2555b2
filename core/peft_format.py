"""Translating a method's config to and from PEFT's ``adapter_config.json`` fields.

PEFT keeps adding options; a file from a newer PEFT carries fields peftkit
does not know. Reading follows one rule for every PEFT-format method: a known
field maps to ours, a field that must keep a fixed value is checked, and an
unknown field is accepted only while it is at its "off" value (None, False,
empty) — anything else is an error that names it, never a silent misread.

Which ``peft_type`` values PEFT has (``PEFT_TYPES``), so whether PEFT loads a folder (``file_in_peft_format``),
decides the model card, ``peftkit info`` and a push here, and the registry's index and pages there. That rule
lives once, in ``peftkit.hub_rules.peft_types``, a leaf importing nothing of peftkit that both the core and the
registry may import (docs/architecture.md); this module re-exports it for the core.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..hub_rules.peft_types import PEFT_TYPES, file_in_peft_format  # noqa: F401 - the core's callers import them here
from .errors import ConfigError


def method_reading(methods: Iterable[Any], peft_type: str) -> Any | None:
    """The first of ``methods`` (``Method`` instances) that reads a folder saying ``peft_type`` without peftkit's
    record: the one declaring it as its ``peft_type`` or listing it in its ``extra_file_types``; None if none."""
    return next((m for m in methods if peft_type in (m.peft_type, *m.extra_file_types)), None)


def refuse_fields_peft_lacks(config: Any, peft_class: str,
                             names: Iterable[str] = ("exclude_modules", "layers_to_transform")) -> None:
    """Raise ConfigError naming the first of ``names`` that ``config`` sets: fields choosing the layers to
    adapt that PEFT's ``peft_class`` does not have, so PEFT would drop them (with a warning) and adapt those
    layers too. For a method whose files must stay PEFT's; the message says to name the layers in
    target_modules instead."""
    for name in names:
        value = getattr(config, name)
        if value is not None:
            raise ConfigError(f"{config.method} config: {name}={value!r} is not supported (PEFT's {peft_class} has "
                              f"no {name} field, so PEFT would adapt those layers too); name the layers to adapt in "
                              f"target_modules instead (a list, or a regex that leaves the others out)")


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def read_peft_fields(data: Mapping[str, Any], method: str, fields: Mapping[str, str], *,
                     fixed: Mapping[str, Any] | None = None, ignored: frozenset[str] | set[str] = frozenset()
                     ) -> dict[str, Any]:
    """Our config values from PEFT's fields.

    fields: PEFT name -> our name. fixed: PEFT fields we accept only at this
    value (or off). ignored: PEFT fields with no meaning for peftkit.
    """
    fixed = fixed or {}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in fields:
            values[fields[key]] = value
        elif key in fixed:
            if value != fixed[key] and not (_is_off(value) and _is_off(fixed[key])):
                raise ConfigError(f"PEFT setting {key}={_shown(value)} is not supported by peftkit's {method} "
                                  f"(only {key}={fixed[key]!r})")
        elif key in ignored or key == "peft_type" or _is_off(value):
            continue
        else:
            raise ConfigError(f"PEFT setting {key}={_shown(value)} is not supported by peftkit's {method}")
    return values


#: How long a refused value is shown before it is cut.
SHOWN_VALUE_CHARS = 80


def _shown(value: Any) -> str:
    """A refused value as the message shows it: a table (a PEFT sub-config such as corda_config) by its
    entries that are on, and any value cut at ``SHOWN_VALUE_CHARS`` characters."""
    if isinstance(value, Mapping):
        value = {key: entry for key, entry in value.items() if not _is_off(entry)}
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS - 3] + "..."


def write_peft_fields(peft_type: str, ours: Mapping[str, Any], fields: Mapping[str, str],
                      **extra: Any) -> dict[str, Any]:
    """PEFT's fields from our config values (``fields``: PEFT name -> our name)."""
    data: dict[str, Any] = {"peft_type": peft_type, **extra}
    for peft_key, our_key in fields.items():
        data[peft_key] = ours[our_key]
    return data


def method_name_of_folder(config: Mapping[str, Any], own: Mapping[str, Any]) -> str | None:
    """The method of a saved folder, from its ``adapter_config.json`` (``config``) and peftkit's record (``own``,
    ``{}`` when there is none): the record's, else the installed method that reads its ``peft_type``, else that
    type lower-cased (a PEFT method no installed plugin provides); None when the folder names neither."""
    if own.get("method"):
        return str(own["method"])
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        return None
    from .plugins import get_registry

    method = method_reading(get_registry().methods.values(), peft_type)
    return method.name if method is not None else peft_type.lower()


def frozen_tensors_of_folder(config: Mapping[str, Any], own: Mapping[str, Any]) -> frozenset[str]:
    """The ``Method.frozen_tensors`` of the installed method a saved folder names (empty when none is installed)."""
    name = method_name_of_folder(config, own)
    if name is None:
        return frozenset()
    from .plugins import get_registry

    method = get_registry().methods.get(name)
    return frozenset(getattr(method, "frozen_tensors", frozenset()))
