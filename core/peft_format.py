"""Translating a method's config to and from PEFT's ``adapter_config.json`` fields.

PEFT keeps adding options; a file from a newer PEFT carries fields peftkit
does not know. Reading follows one rule for every PEFT-format method: a known
field maps to ours, a field that must keep a fixed value is checked, and an
unknown field is accepted only while it is at its "off" value (None, False,
empty) — anything else is an error that names it, never a silent misread.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .errors import ConfigError

#: The ``peft_type`` values Hugging Face PEFT has (its ``PeftType``, peft 0.21.2). PEFT loads a folder whose
#: ``adapter_config.json`` names one of them as its own method and refuses any other (``KeyError``), so a type not
#: in this set says: not PEFT's format. Kept here, not read from ``peft``: reading a folder imports no torch.
#: The registry, which may not import the core, reads the same set and rule from ``peftkit.hub_rules.peft_types``,
#: which the core may not import (docs/architecture.md): tests/test_peft_types.py holds the two equal.
PEFT_TYPES = frozenset({
    "ADALORA", "ADAMSS", "ADAPTION_PROMPT", "BEFT", "BOFT", "C3A", "CARTRIDGE", "CPT", "DEFT", "DELORA", "FOURIERFT",
    "FROD", "GLORA", "GRALORA", "HIRA", "HRA", "IA3", "LILY", "LN_TUNING", "LOHA", "LOKR", "LORA", "MISS",
    "MULTITASK_PROMPT_TUNING", "OFT", "OSF", "PEANUT", "POLY", "PREFIX_TUNING", "PROMPT_TUNING", "PSOFT", "PVERA",
    "P_TUNING", "RANDLORA", "ROAD", "SHADOW", "SHIRA", "SUPERTUNING", "TINYLORA", "TRAINABLE_TOKENS", "UNILORA",
    "VBLORA", "VERA", "WAVEFT", "XLORA",
})


def file_in_peft_format(config: Mapping[str, Any]) -> bool:
    """Whether PEFT loads the folder whose ``adapter_config.json`` holds ``config``: its ``peft_type`` is one PEFT
    has. peftkit writes a type PEFT does not have for a method PEFT lacks (``BITFIT``) and for a config PEFT's type
    cannot express (``PROMPT_TUNING_EMBEDDING_OUTPUT``), so that PEFT refuses the folder instead of loading
    another adapter; the model card, ``peftkit info`` and a push decide by this, per folder."""
    peft_type = config.get("peft_type")
    return isinstance(peft_type, str) and peft_type in PEFT_TYPES


def method_reading(methods: Iterable[Any], peft_type: str) -> Any | None:
    """The first of ``methods`` (``Method`` instances) that reads a folder saying ``peft_type`` without peftkit's
    record: the one declaring it as its ``peft_type`` or listing it in its ``extra_file_types``; None if none."""
    return next((m for m in methods if peft_type in (m.peft_type, *m.extra_file_types)), None)

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
