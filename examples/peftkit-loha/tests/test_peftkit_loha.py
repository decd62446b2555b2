"""peftkit-loha's own tests, as a plugin author writes them.

Run from this folder after `pip install -e ".[test]"`: `pytest tests`.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit_loha import LohaConfig


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def logits(model):
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_entry_point_registers_loha():
    method = peftkit.get_method("loha")
    assert method.distribution == "peftkit-loha"
    assert method.config_class is LohaConfig


def test_identity_at_init_and_a_real_update():
    base = logits(tiny_llama())
    model = peftkit.adapt(tiny_llama(), "loha[r=4]")
    assert torch.equal(logits(model), base)
    # Parameters: two (out, r) + (r, in) pairs per site; q_proj is 32x32, v_proj 16x32 (two layers).
    assert model.trainable_parameters()[0] == 2 * (2 * 4 * (32 + 32) + 2 * 4 * (16 + 32))
    random = peftkit.adapt(tiny_llama(), "loha[r=4,init_weights=false]")
    assert not torch.allclose(logits(random), base)


def test_merge_equals_unmerged_and_save_load_round_trip(tmp_path):
    model = peftkit.adapt(tiny_llama(), "loha[r=4,alpha=16,init_weights=false]", trainable=False)
    expected = logits(model)
    model.save_adapter(tmp_path / "adapter")
    merged = model.merge_and_unload()
    assert torch.allclose(logits(merged), expected, atol=1e-5)
    loaded = peftkit.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert torch.allclose(logits(loaded), expected, atol=1e-6)


def test_config_checks():
    with pytest.raises(peftkit.ConfigError, match="r=0 must be a positive integer"):
        LohaConfig(r=0)
    with pytest.raises(peftkit.ConfigError, match="rank_dropout=1.5 must be in"):
        peftkit.adapt(tiny_llama(), "loha[rank_dropout=1.5]")
