"""The ``peft_type`` values Hugging Face PEFT has: one set and one rule (``peftkit.hub_rules.peft_types``), which the
core re-exports (``peftkit.core.peft_format``) and the registry reads; the set is what the PEFT it names (0.21.2)
has."""

from __future__ import annotations

import pytest

from peftkit.core import peft_format
from peftkit.hub_rules import peft_types


def test_the_core_reads_the_hub_rules_own_set_and_rule() -> None:
    assert peft_format.PEFT_TYPES is peft_types.PEFT_TYPES
    assert peft_format.file_in_peft_format is peft_types.file_in_peft_format


@pytest.mark.parametrize("config, loads", [
    ({"peft_type": "LORA"}, True), ({"peft_type": "PROMPT_TUNING"}, True),
    ({"peft_type": "BITFIT"}, False), ({"peft_type": "PROMPT_TUNING_EMBEDDING_OUTPUT"}, False),
    ({"peft_type": "lora"}, False), ({"peft_type": ""}, False), ({"peft_type": None}, False),
    ({"peft_type": 1}, False), ({"peft_type": ["LORA"]}, False), ({}, False),
])
def test_a_folder_is_in_peft_format_when_peft_has_its_type(config, loads) -> None:
    assert peft_types.file_in_peft_format(config) is loads


def test_the_peft_types_are_those_of_the_peft_they_name() -> None:
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip(f"the set names PEFT 0.21.2's types; peft {peft.__version__} is installed")
    assert {t.value for t in peft.PeftType} == peft_types.PEFT_TYPES
