"""PEFT config fields to peftkit's and back (core/peft_format.py), rule by rule: known fields map,
fixed fields are checked (off equals off), unknown fields pass only while off, and each refusal
names the field, its value and what is supported. Written for `make mutate` (docs/mutation.md)."""

from __future__ import annotations

import pytest

from peftkit.core.errors import ConfigError
from peftkit.core.peft_format import read_peft_fields, write_peft_fields

FIELDS = {"r": "rank", "lora_alpha": "alpha"}


def test_known_fields_map_and_peft_type_ignored_and_off_unknowns_pass():
    data = {"peft_type": "LOKR", "r": 8, "lora_alpha": 16, "new_option": None, "flag": False, "names": [],
            "table": {}, "text": "", "old": 3}
    assert read_peft_fields(data, "lokr", FIELDS, ignored={"old"}) == {"rank": 8, "alpha": 16}


@pytest.mark.parametrize("value", [True, 0.5, "x", [1], {"a": 1}, 0, 1])
def test_an_unknown_field_that_is_on_is_refused_by_name(value):
    with pytest.raises(ConfigError) as refused:
        read_peft_fields({"r": 4, "unknown": value}, "lokr", FIELDS)
    assert str(refused.value) == f"PEFT setting unknown={value!r} is not supported by peftkit's lokr"


def test_fixed_fields_accept_their_value_or_off_when_off_is_the_value():
    fixed = {"bias": "none", "fan_in_fan_out": False, "modules": None}
    ok = {"bias": "none", "fan_in_fan_out": False, "modules": None}
    assert read_peft_fields(ok, "lokr", FIELDS, fixed=fixed) == {}
    assert read_peft_fields({"fan_in_fan_out": None, "modules": []}, "lokr", FIELDS, fixed=fixed) == {}
    for key, value in (("bias", "all"), ("bias", None), ("fan_in_fan_out", True), ("modules", ["x"])):
        with pytest.raises(ConfigError) as refused:
            read_peft_fields({key: value}, "lokr", FIELDS, fixed=fixed)
        assert str(refused.value) == (f"PEFT setting {key}={value!r} is not supported by peftkit's lokr "
                                      f"(only {key}={fixed[key]!r})")


def test_a_refused_table_shows_its_entries_that_are_on_and_a_long_value_is_cut():
    corda = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
             "use_float16_for_covariance": False, "prune_temporary_fields": True}
    with pytest.raises(ConfigError) as refused:
        read_peft_fields({"corda_config": corda}, "lora", FIELDS)
    assert str(refused.value) == ("PEFT setting corda_config={'corda_method': 'ipm', 'prune_temporary_fields': True} "
                                  "is not supported by peftkit's lora")
    with pytest.raises(ConfigError) as refused:
        read_peft_fields({"modules": ["m" * 100]}, "lora", FIELDS, fixed={"modules": None})
    assert str(refused.value) == f"PEFT setting modules=['{'m' * 75}... is not supported by peftkit's lora " \
                                 f"(only modules=None)"


def test_a_mapped_field_wins_over_fixed_and_ignored():
    assert read_peft_fields({"r": None}, "lokr", FIELDS, fixed={"r": 4}, ignored={"r"}) == {"rank": None}


def test_write_puts_the_type_the_extras_and_every_mapped_field():
    data = write_peft_fields("LOKR", {"rank": 8, "alpha": 16, "other": 1}, FIELDS, layers_pattern=None, bias="none")
    assert data == {"peft_type": "LOKR", "layers_pattern": None, "bias": "none", "r": 8, "lora_alpha": 16}
    assert list(data)[0] == "peft_type"
    with pytest.raises(KeyError):
        write_peft_fields("LOKR", {"rank": 8}, FIELDS)
