"""Translating a method's config to and from PEFT's ``adapter_config.json`` fields.

PEFT keeps adding options; a file from a newer PEFT carries fields peftkit
does not know. Reading follows one rule for every PEFT-format method: a known
field maps to ours, a field that must keep a fixed value is checked, and an
unknown field is accepted only while it is at its "off" value (None, False,
empty) — anything else is an error that names it, never a silent misread.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError

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
                raise ConfigError(f"PEFT setting {key}={value!r} is not supported by peftkit's {method} "
                                  f"(only {key}={fixed[key]!r})")
        elif key in ignored or key == "peft_type" or _is_off(value):
            continue
        else:
            raise ConfigError(f"PEFT setting {key}={value!r} is not supported by peftkit's {method}")
    return values


def write_peft_fields(peft_type: str, ours: Mapping[str, Any], fields: Mapping[str, str],
                      **extra: Any) -> dict[str, Any]:
    """PEFT's fields from our config values (``fields``: PEFT name -> our name)."""
    data: dict[str, Any] = {"peft_type": peft_type, **extra}
    for peft_key, our_key in fields.items():
        data[peft_key] = ours[our_key]
    return data
