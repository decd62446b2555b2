"""Every module an adapter adds starts in the train/eval mode of what it wraps: a model in eval mode gets no
adapter dropout (or PVeRA sampling) from adding an adapter, a fusion, a task head copy or a hot-swap
preparation, until ``model.train()``. PEFT leaves new modules training (huggingface/peft#3753)."""

from __future__ import annotations

import pytest
import torch

import peftkit
from tests.method_helpers import output_of, randomize
from tests.tiny_models import build_tiny


def _modes(model: torch.nn.Module) -> dict[str, bool]:
    return {name or "<root>": module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("spec,random_in_training", [
    ("lora[dropout=0.5]", True), ("pvera[r=4]", True),
    ("prefix_tuning[num_virtual_tokens=4,prefix_projection=true]", False)])  # a model-level adapter
def test_an_adapter_added_to_a_model_in_eval_mode_is_in_eval_mode(spec, random_in_training):
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, std=1.0)
    model.set_active("default")
    assert not any(_modes(model).values()), [n for n, m in _modes(model).items() if m][:5]
    assert torch.equal(output_of(model, "llama"), output_of(model, "llama"))
    model.train()
    assert all(_modes(model).values())
    if random_in_training:  # dropout / sampling act now
        assert not torch.equal(output_of(model, "llama"), output_of(model, "llama"))


def test_each_new_module_takes_the_mode_of_its_host():
    model = peftkit.adapt(build_tiny("bert").train(), "lora[dropout=0.5]")  # a task model: its head is copied
    assert model.training and all(_modes(model).values())
    model.eval()
    model.add_adapter("b", "lora[dropout=0.5]")
    model.add_adapter("c", "seq_bn")
    model.add_fusion("fuse(b, c)")
    model.prepare_for_hotswap(target_rank=16, adapter_names="b")
    assert not any(_modes(model).values()), [n for n, m in _modes(model).items() if m][:5]
    model.train()
    model.add_adapter("d", "lora[dropout=0.5]")
    assert all(_modes(model).values()), [n for n, m in _modes(model).items() if not m][:5]


def test_a_model_in_training_mode_keeps_it_and_a_mixed_model_keeps_each_modules_mode():
    base = build_tiny("llama").train()
    base.model.layers[0].eval()  # a frozen block a user keeps in eval mode
    model = peftkit.adapt(base, "lora[dropout=0.5,target_modules=[q_proj]]")
    assert model.training
    assert model.base_model.model.layers[1].self_attn.q_proj.adapters["default"].training
    assert not model.base_model.model.layers[0].self_attn.q_proj.adapters["default"].training
