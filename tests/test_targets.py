"""Target matching: lists, regexes, all-linear, architecture defaults, errors."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.core.errors import TargetError
from peftkit.core.layer import TunerLayer
from tests.tiny_models import build_tiny


def _adapted_sites(model: peftkit.AdaptedModel) -> list[str]:
    return sorted(n for n, m in model.base_model.named_modules() if isinstance(m, TunerLayer))


@pytest.mark.parametrize("arch, leaf", [("llama", {"q_proj", "v_proj"}), ("mistral", {"q_proj", "v_proj"}),
                                        ("qwen2", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}),
                                        ("bert", {"query", "value"}), ("roberta", {"query", "value"}),
                                        ("t5", {"q", "v"})])
def test_architecture_defaults(arch, leaf):
    model = peftkit.adapt(build_tiny(arch), "lora[r=2]")
    sites = _adapted_sites(model)
    assert sites and {s.rsplit(".", 1)[-1] for s in sites} == leaf
    assert set(model.adapters["default"].target_modules) == leaf  # saved explicitly


def test_list_matches_exact_and_dotted_suffix_only():
    model = peftkit.adapt(build_tiny("llama"), 'lora[r=2,target_modules=["self_attn.q_proj","down_proj"]]')
    assert _adapted_sites(model) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                     "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(TargetError):
        peftkit.adapt(build_tiny("llama"), 'lora[target_modules=["_proj"]]')  # not a dotted suffix


def test_regex_is_a_full_match():
    model = peftkit.adapt(build_tiny("llama"), r'lora[target_modules=".*layers\\.1\\.self_attn\\.(k|o)_proj"]')
    assert _adapted_sites(model) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize("arch, head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("bert", "classifier")])
def test_all_linear_skips_the_output_head(arch, head):
    model = peftkit.adapt(build_tiny(arch), "lora[r=2,target_modules=all-linear]")
    sites = _adapted_sites(model)
    assert head not in sites
    assert len(sites) >= 8
    if arch == "gpt2":  # Conv1D layers count as linear
        assert "transformer.h.0.mlp.c_fc" in sites


def test_layers_to_transform_and_exclude():
    model = peftkit.adapt(build_tiny("llama"),
                          'lora[target_modules=all-linear,layers_to_transform=[1],exclude_modules=["o_proj"]]')
    sites = _adapted_sites(model)
    assert all(".layers.1." in s for s in sites)
    assert not any(s.endswith("o_proj") for s in sites)


def test_nothing_matched_lists_candidates_and_suggests():
    with pytest.raises(TargetError) as err:
        peftkit.adapt(build_tiny("llama"), 'lora[target_modules=["q_prj"]]')
    message = str(err.value)
    assert "matched no module" in message and "Candidate modules" in message
    assert "q_proj" in message  # the did-you-mean hint


@pytest.mark.parametrize("spec, fix", [
    ("lora[target_modules=q_proj]",
     r"pass a list: target_modules=\['q_proj'\] \(in a spec, target_modules=\[q_proj\]\)"),
    (peftkit.LoraConfig(target_modules="q_proj,v_proj"), r"pass a list: target_modules=\['q_proj', 'v_proj'\]"),
])
def test_a_string_of_module_names_is_told_to_be_a_list(spec, fix):
    """PEFT too reads a string target_modules as a regex over the full name, so 'q_proj' matches nothing."""
    with pytest.raises(TargetError, match=r"A string is a regular expression over the full module name .*" + fix):
        peftkit.adapt(build_tiny("llama"), spec)


def test_a_list_without_brackets_in_a_spec_is_shown_with_them():
    with pytest.raises(peftkit.ConfigError, match=r"'v_proj' is not key=value; to give target_modules a list, "
                                                  r"write it in brackets: target_modules=\[q_proj,v_proj,k_proj\]$"):
        peftkit.adapt(build_tiny("llama"), "lora[target_modules=q_proj,v_proj,k_proj,r=4]")
    with pytest.raises(peftkit.ConfigError, match=r"'zzz' is not key=value$"):
        peftkit.adapt(build_tiny("llama"), "lora[r=8,zzz]")


def test_unknown_architecture_without_targets_says_what_to_pass():
    import torch.nn as nn

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetError, match="pass target_modules"):
        peftkit.adapt(net, "lora")
    model = peftkit.adapt(net, 'lora[r=2,target_modules=["0"]]')
    assert _adapted_sites(model) == ["0"]
