"""UniPELT: the ``unipelt`` preset (gated prefix tuning, seq_bn and LoRA as one adapter) and ``use_gating``.

The gates' values are checked against hand formulas in tests/test_values_unipelt.py, the preset's
generic behaviour in the conformance suite (tests/test_conformance.py); AdapterHub's folders both
ways in tests/test_adapterhub_unipelt.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import ConfigError, UniPeltConfig
from tests.method_helpers import output_of, randomize, save_and_reload
from tests.tiny_models import build_tiny, sample_inputs


def test_the_preset_has_adapterhubs_unipelt_defaults():
    config = UniPeltConfig()
    assert config.to_shorthand() == "unipelt"
    prefix, bottleneck, lora = (dict(part) for part in config.parts)
    assert (prefix["method"], prefix["num_virtual_tokens"], prefix["prefix_projection"],
            prefix["encoder_hidden_size"], prefix["token_positions"]) == ("prefix_tuning", 10, True, 512, "from_zero")
    assert (bottleneck["method"], bottleneck["reduction_factor"], bottleneck["original_ln_before"]) == \
        ("seq_bn", 16, True)
    assert (lora["method"], lora["r"], lora["alpha"]) == ("lora", 8, 2)
    assert prefix["use_gating"] and prefix["shared_gating"] and bottleneck["use_gating"] and lora["use_gating"]
    small = peftkit.adapt(build_tiny("bert"), 'unipelt[parts=["prefix_tuning[num_virtual_tokens=2,use_gating=true]",'
                                              '"lora[r=2,use_gating=true]"]]')
    assert [p["num_virtual_tokens" if p["method"] == "prefix_tuning" else "r"]
            for p in small.adapter_record("default").config.parts] == [2, 2]


def test_training_moves_every_gate():
    """The LoRA and bottleneck gates multiply updates that start at zero, so their first gradient is zero (in
    adapters too); after a few steps of training on labels every gate gets a gradient and has moved (its weight
    or its bias), and only adapter "a" changed."""
    model = peftkit.adapt(build_tiny("bert"), "unipelt", adapter_name="a")
    model.add_adapter("b", "unipelt")
    model.train_adapter("a")
    model.train()
    params = dict(model.named_parameters())
    gates = {n for n in params if "gate" in n and ".a." in n.replace("_adapters.a.", ".a.")}
    assert len(gates) == 2 * 2 + 2 * 2 + 2 * 2 * 2  # prefix and seq_bn per layer, LoRA at query and value
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = sample_inputs("bert")
    labels = torch.tensor([0, 1])
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    # (the query gates' steps are tiny in this tiny model: moving at all is what is asked of every gate)
    assert all(params[n].grad.abs().sum() > 0 for n in gates), "every gate gets a gradient"
    assert {n.rpartition("gate")[0] for n in gates} <= {n.rpartition("gate")[0] for n in changed}
    assert all(".a." in n.replace("_adapters.a.", ".a.") for n in changed), "only adapter 'a' trains"


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_save_and_load_keeps_the_gates(tmp_path: Path, arch: str):
    _, loaded, tensors = save_and_reload(arch, "unipelt", tmp_path)
    keys = set(tensors)
    attention, ffn = ("self_attn.q_proj", "mlp.down_proj") if arch == "llama" else ("attention.self.query",
                                                                                     "output.dense")
    gates = {key for key in keys if "gate" in key}
    assert {"prefix_tuning.prefix_gates.0.weight", "prefix_tuning.prefix_gates.1.bias"} <= gates
    assert any(key.endswith(f"{attention}.lora.gate.weight") for key in gates)
    assert any(key.endswith(f"{ffn}.seq_bn.gate.bias") for key in gates)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "UNIPELT" and all(part["use_gating"] for part in config["parts"])


def test_gated_prefix_reads_each_generation_steps_input():
    """With the KV cache, each generation step gates the prefix on that step's input (the new token alone), as
    adapters does (so cached and uncached decoding differ once the gates have trained); generate() and beam
    search run, and the cache keeps the prefix's positions."""
    model = peftkit.adapt(build_tiny("llama"), "prefix_tuning[num_virtual_tokens=3,use_gating=true,"
                                              "shared_gating=false]")
    randomize(model, seed=2, std=0.5)
    model.eval()
    lengths: list[int] = []
    model.model_adapter("default").prefix_gates[0].register_forward_hook(
        lambda m, args, out: lengths.append(args[0].shape[1]))
    inputs = sample_inputs("llama", seq=5)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (inputs["input_ids"].shape[0], 9)
    assert lengths == [5, 1, 1, 1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, pad_token_id=0)
    assert beams.shape[0] == 2 * inputs["input_ids"].shape[0]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.past_key_values.get_seq_length() == 3 + 5


def test_stacked_gated_prefixes_gate_their_own_positions():
    """Two gated prefixes in one cache: each gates its own positions (the second starts after the first)."""
    spec = "prefix_tuning[num_virtual_tokens=2,use_gating=true]"
    model = peftkit.adapt(build_tiny("llama"), spec, adapter_name="a")
    model.add_adapter("b", spec)
    randomize(model, "a", seed=1, std=0.5)
    randomize(model, "b", seed=2, std=0.5)
    model.eval()
    model.set_active(peftkit.Stack("a", "b"))
    stacked = output_of(model, "llama")
    with torch.no_grad():  # a gate of b closed: the stack is "a" alone with b's prefix fully masked out
        model.model_adapter("b").prefix_gates[0].bias.fill_(-1e4)
        model.model_adapter("b").prefix_gates[1].bias.fill_(-1e4)
    closed = output_of(model, "llama")
    model.set_active("a")
    alone = output_of(model, "llama")
    assert not torch.allclose(stacked, closed, atol=1e-4)
    # a zero key scores 0 against every query, so a closed prefix still takes part of the softmax: compare
    # with a's prefix alone only the order of the effect, a closed gate keeps a's contribution.
    assert (closed - alone).abs().max() < (stacked - alone).abs().max()


def test_a_gated_lora_refuses_to_merge_and_options_it_cannot_have():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2,use_gating=true]")
    with pytest.raises(peftkit.MergeError, match="gated LoRA"):
        model.merge_adapter()
    assert torch.equal(output_of(model, "llama"), output_of(model, "llama"))  # nothing half-merged
    with pytest.raises(ConfigError, match="use_gating=true cannot be combined with use_dora"):
        peftkit.adapt(build_tiny("llama"), "lora[use_gating=true,use_dora=true]")
    with pytest.raises(ConfigError, match="linear layers only.*embed_tokens"):
        peftkit.adapt(build_tiny("llama"), 'lora[use_gating=true,target_modules=["embed_tokens"]]')
