"""Configs: type checks, JSON round trip, the string shorthand."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.core.errors import ConfigError, PluginError
from peftkit.core.plugins import parse_spec
from peftkit.core.shorthand import parse_shorthand
from peftkit.plugins.lora.config import LoraConfig
from tests.tiny_models import build_tiny


def test_shorthand_parses_values_of_every_kind():
    name, values = parse_shorthand('lora[r=8,alpha=16,target_modules=["q_proj","v_proj"],use_dora=true,'
                                   "dropout=0.1,init_weights=False]")
    assert name == "lora"
    assert values == {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": True,
                      "dropout": 0.1, "init_weights": False}


def test_shorthand_bare_words_and_regex_are_strings():
    _, values = parse_shorthand(r"lora[target_modules=all-linear]")
    assert values == {"target_modules": "all-linear"}
    _, values = parse_shorthand(r'lora[target_modules=".*\\.(q|v)_proj"]')
    assert values["target_modules"] == r".*\.(q|v)_proj"
    # a double-quoted regex with single backslashes is not JSON: its quotes still go, as single quotes do
    _, values = parse_shorthand(r'lora[target_modules="resnet\.encoder.*convolution"]')
    assert values["target_modules"] == r"resnet\.encoder.*convolution"


def test_shorthand_list_of_bare_words_is_a_list_of_strings():
    _, values = parse_shorthand("lora[target_modules=[q_proj, v_proj],layers_to_transform=[0,1]]")
    assert values == {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1]}
    with pytest.raises(ConfigError, match=r'write lists and mappings as JSON, e\.g\.'):
        parse_shorthand("lora[rank_pattern={q_proj:4}]")


def test_an_invalid_regex_is_a_config_error_naming_the_option():
    with pytest.raises(ConfigError, match=r"target_modules='\(q\|v' is not a valid regular expression"):
        parse_spec('lora[target_modules="(q|v"]')
    with pytest.raises(ConfigError, match="exclude_modules='\\[' is not a valid regular expression"):
        LoraConfig(exclude_modules="[")
    with pytest.raises(ConfigError, match=r"rank_pattern key 'q\[' is not a valid regular expression"):
        LoraConfig(rank_pattern={"q[": 4})


def test_spec_builds_config_with_aliases():
    method, config = parse_spec("lora[r=4,lora_alpha=32]")
    assert method.name == "lora"
    assert isinstance(config, LoraConfig)
    assert (config.r, config.alpha) == (4, 32.0)


def test_unknown_key_names_the_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_spec("lora[rank=8]")
    message = str(err.value)
    assert "'rank'" in message and "allowed keys" in message and "alpha" in message
    with pytest.raises(ConfigError, match=r"unknown key 'rr' for method 'lora' \(did you mean 'r'\?\)"):
        parse_spec("lora[rr=8]")


def test_ill_typed_value_names_the_key_and_type():
    with pytest.raises(ConfigError) as err:
        parse_spec('lora[r="eight"]')
    assert "r='eight'" in str(err.value) and "int" in str(err.value)
    with pytest.raises(ConfigError, match="positive"):
        LoraConfig(r=0)


def test_unknown_method_names_the_installed_ones():
    with pytest.raises(PluginError) as err:
        parse_spec("loha_typo[r=2]")
    assert "lora" in str(err.value) and "install" in str(err.value)
    with pytest.raises(PluginError, match=r"Did you mean 'lora'\?"):
        parse_spec("lroa[r=2]")


def test_two_swapped_neighbours_are_the_first_suggestion():
    """``lroa`` is as similar to ``road`` as to ``lora`` by difflib's measure: the swapped pair wins."""
    from peftkit.core.suggestions import closest_name, option_suggestion

    assert closest_name("lroa", ["road", "lora", "loha"]) == "lora"
    assert closest_name("lroa", ["road"]) == "road"  # difflib's closest when no name is one swap away
    assert closest_name("xyz", ["lora"]) is None
    assert option_suggestion("aplha", ["alpha", "apha_x"]) == "did you mean 'alpha'?"


def test_a_lora_scale_on_delora_points_to_delora_lambda():
    """DeLoRA's scale is delora_lambda; ``delora[alpha=4]`` named no option and ``lambda_`` got lambda_pattern."""
    for key in ("alpha", "lora_alpha", "lambda", "lambda_"):
        with pytest.raises(ConfigError, match=r"write 'delora_lambda' \(peftkit's name for it\)"):
            parse_spec(f"delora[{key}=4]")
    assert parse_spec("lora[alpha=4]")[1].alpha == 4



def test_method_names_match_in_any_case():
    for spec, name in (("LoRA[r=4]", "lora"), ("IA3", "ia3"), ("LoKr", "lokr"), ("Seq-BN", "seq_bn")):
        method, config = parse_spec(spec)
        assert method.name == name and config.method == name


@pytest.mark.parametrize("spec, hint", [
    ("DoRA", "DoRA is LoRA with weight decomposition: lora[use_dora=true]."),
    ("QLoRA", "peftkit train --quantize 4bit"),
    ("pfeiffer", "AdapterHub's Pfeiffer adapter is seq_bn."),
    ("houlsby[reduction_factor=8]", "AdapterHub's Houlsby adapter is double_seq_bn."),
    ("LoraConfig", "Did you mean 'lora'?"),
    ("PrefixTuning", "Did you mean 'prefix_tuning'?"),
])
def test_method_names_of_peft_and_adapterhub_suggest_peftkits(spec, hint):
    with pytest.raises(PluginError) as err:
        parse_spec(spec)
    assert hint in str(err.value)


@pytest.mark.parametrize("spec, hint", [
    ("lora[rank=8]", "(write 'r' (peftkit's name for it))"),
    ("lora[lora_r=8]", "(write 'r' (peftkit's name for it))"),
    ("lokr[lora_alpha=16]", "(write 'alpha' (peftkit's name for it))"),
    ("seq_bn[reduction=16]", "(write 'reduction_factor' (peftkit's name for it))"),
    ("prefix_tuning[prefix_length=10]", "(write 'num_virtual_tokens' (peftkit's name for it))"),
    ("prompt_tuning[prompt_length=10]", "(write 'num_virtual_tokens' (peftkit's name for it))"),
    ("lora[attn_matrices=[q,v]]", "(write 'target_modules' (peftkit's name for it))"),
    ('lora[bias="none"]', "add bitfit to the spec, e.g. 'lora[r=8]|bitfit'"),
    ("lora[R=8]", "(did you mean 'r'?)"),
])
def test_option_names_of_peft_and_adapterhub_suggest_peftkits(spec, hint):
    with pytest.raises(ConfigError) as err:
        parse_spec(spec)
    assert hint in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_spec('lora[rank=8,task_type="SEQ_CLS"]')
    assert ("('rank': write 'r' (peftkit's name for it); 'task_type': peftkit takes the task from the model"
            in str(err.value))


def test_json_round_trip_and_shorthand_round_trip():
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj"], rank_pattern={"v_proj": 2}, use_dora=True)
    again = LoraConfig.from_json(config.to_json())
    assert again == config
    method, from_short = parse_spec(config.to_shorthand())
    assert from_short == config


def test_malformed_spec_and_json():
    with pytest.raises(ConfigError):
        parse_shorthand("lora[r=8")
    with pytest.raises(ConfigError):
        parse_shorthand("lora[r]")
    with pytest.raises(ConfigError, match="twice"):
        parse_shorthand("lora[r=1,r=2]")
    with pytest.raises(ConfigError, match="malformed"):
        LoraConfig.from_json("{not json")


@pytest.mark.parametrize("options, hint", [
    ({"lora_alpha": 16}, r"unknown key 'lora_alpha' for method 'lora' \(write 'alpha' \(peftkit's name for it\)\)"),
    ({"task_type": "CAUSAL_LM"}, r"unknown key 'task_type' .*peftkit takes the task from the model"),
    ({"alpah": 16}, r"unknown key 'alpah' .*did you mean 'alpha'"),
])
def test_a_config_built_with_another_librarys_names_says_peftkits(options, hint):
    """peftkit.LoraConfig(lora_alpha=16), as a PEFT user writes it: a ConfigError with the fix, not a TypeError."""
    import peftkit

    with pytest.raises(ConfigError, match=hint):
        peftkit.LoraConfig(r=8, **options)
    assert peftkit.LoraConfig(r=8, alpha=16).alpha == 16


def test_options_a_method_refuses_are_not_offered():
    """A virtual-token method (and ReFT) refuses target_modules and the like: `peftkit methods NAME` and the
    docs' option tables leave them out, and setting one is still refused by name."""
    from peftkit.api import describe_method

    for name in ("prefix_tuning", "prompt_tuning", "p_tuning", "reft"):
        offered = {o["name"] for o in describe_method(name)["options"]}
        assert not offered & {"target_modules", "exclude_modules", "layers_to_transform"}, name
    assert "target_modules" in {o["name"] for o in describe_method("lora")["options"]}
    with pytest.raises(ConfigError, match="target_modules is not used"):
        peftkit.adapt(build_tiny("llama"), "prefix_tuning[target_modules=[q_proj]]")
