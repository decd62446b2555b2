"""The ``peft_type`` values Hugging Face PEFT has, held twice because the import rules leave no one place both
readers may import: ``peftkit.core.peft_format`` (the core imports nothing outside itself) and
``peftkit.hub_rules.peft_types`` (the registry imports nothing but hub_rules). The two must say the same, and
both what the PEFT they name (0.21.2) has."""

from __future__ import annotations

import pytest

from peftkit.core import peft_format
from peftkit.hub_rules import peft_types

CONFIGS = [
    *({"peft_type": t} for t in sorted(peft_types.PEFT_TYPES | peft_format.PEFT_TYPES)),
    {"peft_type": "BITFIT"}, {"peft_type": "PROMPT_TUNING_EMBEDDING_OUTPUT"}, {"peft_type": "lora"},
    {"peft_type": ""}, {"peft_type": None}, {"peft_type": 1}, {"peft_type": ["LORA"]}, {},
]


def test_the_core_and_the_hub_rules_hold_the_same_peft_types() -> None:
    assert peft_types.PEFT_TYPES == peft_format.PEFT_TYPES
    assert [peft_types.file_in_peft_format(c) for c in CONFIGS] == [peft_format.file_in_peft_format(c)
                                                                     for c in CONFIGS]
    assert not peft_types.file_in_peft_format({"peft_type": "BITFIT"})
    assert peft_types.file_in_peft_format({"peft_type": "LORA"})


def test_the_peft_types_are_those_of_the_peft_they_name() -> None:
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip(f"the set names PEFT 0.21.2's types; peft {peft.__version__} is installed")
    assert {t.value for t in peft.PeftType} == peft_types.PEFT_TYPES
