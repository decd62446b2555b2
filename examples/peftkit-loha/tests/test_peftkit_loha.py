"""peftkit-loha's own tests, as a plugin author writes them.

Run from this folder after `pip install -e ".[test]"`: `pytest tests`.
peftkit's conformance suite (peftkit.testing) checks what every method must
guarantee; the tests below it check what is LoHa's own.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.testing import build_tiny, make_conformance_class, output_tensor, sample_inputs
from peftkit_loha import LohaConfig

# One test per check (inject, identity, deterministic, train_step, save_load, merge, config,
# parameter_count, and each composition block) on tiny llama, gpt2, bert and t5.
TestLohaConformance = make_conformance_class("loha[r=4]")


def test_the_entry_point_registers_loha():
    method = peftkit.get_method("loha")
    assert method.distribution == "peftkit-loha"
    assert method.config_class is LohaConfig
    assert method.peft_type == "LOHA" and method.can_merge


def test_the_update_is_the_hadamard_product_of_two_low_rank_products():
    model = peftkit.adapt(build_tiny("llama"), "loha[r=2,alpha=6,init_weights=false,target_modules=['q_proj']]")
    layer = model.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    loha = layer.adapters["default"]
    expected = (loha.hada_w1_a @ loha.hada_w1_b) * (loha.hada_w2_a @ loha.hada_w2_b) * 3.0  # alpha / r
    assert torch.equal(loha.delta_weight(layer.base_layer), expected)
    assert torch.linalg.matrix_rank(expected) > 2  # more than a rank-r update


def test_dropouts_act_in_training_only():
    model = peftkit.adapt(build_tiny("llama"), "loha[r=2,init_weights=false,rank_dropout=0.5,module_dropout=0.5]")
    inputs = sample_inputs("llama")
    model.eval()
    with torch.no_grad():
        first, second = output_tensor(model(**inputs)), output_tensor(model(**inputs))
    assert torch.equal(first, second)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = [output_tensor(model(**inputs)) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_config_checks():
    with pytest.raises(peftkit.ConfigError, match="r=0 must be a positive integer"):
        LohaConfig(r=0)
    with pytest.raises(peftkit.ConfigError, match="rank_dropout=1.5 must be in"):
        peftkit.adapt(build_tiny("llama"), "loha[rank_dropout=1.5]")
    with pytest.raises(peftkit.ConfigError, match="loha: target 'model.embed_tokens' is an Embedding; "
                                                  "LoHa adapts Linear and Conv1D layers"):
        peftkit.adapt(build_tiny("llama"), "loha[target_modules=['embed_tokens']]")
