"""Whether Hugging Face PEFT loads a folder, by its ``adapter_config.json``'s ``peft_type``: the rule hubs index by.

PEFT loads a folder whose ``peft_type`` is one of its own (``PeftType``) and refuses any other (``KeyError``).
peftkit writes a type PEFT does not have for a method PEFT lacks (``BITFIT``) and for a config PEFT's type cannot
express (``PROMPT_TUNING_EMBEDDING_OUTPUT``), so that PEFT refuses such a folder instead of loading another adapter.
The registry's index (``library_name`` ``peft`` or ``peftkit``) and its pages (PEFT's loading snippet) decide by
:func:`file_in_peft_format`, as peftkit's model card and ``peftkit info`` do.

Imports nothing of peftkit, as the whole of :mod:`peftkit.hub_rules`, so the core imports it as well
(``peftkit.core.peft_format`` re-exports it): one copy of the rule for the card and ``peftkit info`` on one side
and the registry's index and pages on the other (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any, Mapping

#: The ``peft_type`` values Hugging Face PEFT has (its ``PeftType``, peft 0.21.2). PEFT loads a folder whose
#: ``adapter_config.json`` names one of them as its own method and refuses any other (``KeyError``), so a type not
#: in this set says: not PEFT's format. Kept here, not read from ``peft``: reading a folder imports no torch.
PEFT_TYPES = frozenset({
    "ADALORA", "ADAMSS", "ADAPTION_PROMPT", "BEFT", "BOFT", "C3A", "CARTRIDGE", "CPT", "DEFT", "DELORA", "FOURIERFT",
    "FROD", "GLORA", "GRALORA", "HIRA", "HRA", "IA3", "LILY", "LN_TUNING", "LOHA", "LOKR", "LORA", "MISS",
    "MULTITASK_PROMPT_TUNING", "OFT", "OSF", "PEANUT", "POLY", "PREFIX_TUNING", "PROMPT_TUNING", "PSOFT", "PVERA",
    "P_TUNING", "RANDLORA", "ROAD", "SHADOW", "SHIRA", "SUPERTUNING", "TINYLORA", "TRAINABLE_TOKENS", "UNILORA",
    "VBLORA", "VERA", "WAVEFT", "XLORA",
})


def file_in_peft_format(config: Mapping[str, Any]) -> bool:
    """Whether PEFT loads the folder whose ``adapter_config.json`` holds ``config``: its ``peft_type`` is one PEFT
    has."""
    peft_type = config.get("peft_type")
    return isinstance(peft_type, str) and peft_type in PEFT_TYPES
