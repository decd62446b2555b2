"""The forward pre-hooks a gated prefix (UniPELT's ``prefix_tuning[use_gating=true]``) puts on attention modules
leave with its adapter: ``delete_adapter`` and ``merge_and_unload`` take them off, another gated adapter keeps
its own, and a deep copy's hooks belong to the copy."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.plugin_api import ModelAdapter
from peftkit.plugins.prefix_tuning.gating import attention_modules
from peftkit.plugins.union.layer import UnionModelAdapter

from .method_helpers import output_of, randomize
from .tiny_models import build_tiny

GATED = "prefix_tuning[num_virtual_tokens=2,use_gating=true]"


def _hooked(model: torch.nn.Module) -> dict[str, int]:
    """Module name -> how many forward hooks and forward pre-hooks it holds, for every module that holds any."""
    counts = {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()}
    return {name: n for name, n in counts.items() if n}


def _gate_hooks(model: torch.nn.Module) -> list[int]:
    """Per attention module, how many forward pre-hooks it holds (the gate hooks: nothing else hooks there)."""
    return [len(module._forward_pre_hooks) for module in attention_modules(model)]


@pytest.mark.parametrize("arch, spec", [("bert", "unipelt"), ("llama", GATED)])
def test_deleting_a_gated_prefix_takes_its_hooks_off(arch, spec):
    base = build_tiny(arch).eval()
    expected = output_of(base, arch)
    assert _hooked(base) == {}
    model = peftkit.adapt(base, spec)
    randomize(model, seed=3, std=0.5)
    assert _gate_hooks(model.base_model) == [1] * 2
    assert not torch.equal(output_of(model, arch), expected)
    model.delete_adapter("default")
    assert _hooked(model.base_model) == {}
    assert torch.equal(output_of(model, arch), expected)


def test_merge_and_unload_takes_the_gate_hooks_off():
    base = build_tiny("llama").eval()
    expected = output_of(base, "llama")
    model = peftkit.adapt(base, GATED)
    randomize(model, seed=3, std=0.5)
    unloaded = model.merge_and_unload([])
    assert _hooked(unloaded) == {}
    assert torch.equal(output_of(unloaded, "llama"), expected)


def test_deleting_one_gated_prefix_keeps_the_others_gates():
    model = peftkit.adapt(build_tiny("llama"), GATED, adapter_name="a")
    model.add_adapter("b", GATED)
    randomize(model, "a", seed=1, std=0.5)
    randomize(model, "b", seed=2, std=0.5)
    model.eval()
    model.set_active("b")
    before = output_of(model, "llama")
    assert _gate_hooks(model.base_model) == [2] * 2
    model.delete_adapter("a")
    assert _gate_hooks(model.base_model) == [1] * 2
    assert torch.equal(output_of(model, "llama"), before)
    with torch.no_grad():  # b's gates still act: closing them changes the output
        for gate in model.model_adapter("b").prefix_gates:
            gate.bias.fill_(-1e4)
    assert not torch.allclose(output_of(model, "llama"), before, atol=1e-4)


def test_a_deep_copy_deletes_its_own_hooks():
    model = peftkit.adapt(build_tiny("llama"), GATED)
    randomize(model, seed=3, std=0.5)
    model.eval()
    before = output_of(model, "llama")
    copied = copy.deepcopy(model)
    assert torch.equal(output_of(copied, "llama"), before)
    copied.delete_adapter("default")
    assert _hooked(copied.base_model) == {}
    assert _gate_hooks(model.base_model) == [1] * 2
    assert torch.equal(output_of(model, "llama"), before)


def test_hotswap_leaves_one_gate_hook_per_attention_module(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), GATED)
    randomize(model, seed=3, std=0.5)
    model.save_pretrained(str(tmp_path))
    model.eval()
    expected = output_of(model, "llama")
    target = peftkit.adapt(build_tiny("llama"), GATED).eval()
    target.hotswap_adapter(str(tmp_path))
    assert _gate_hooks(target.base_model) == [1] * 2
    assert torch.equal(output_of(target, "llama"), expected)
    target.delete_adapter("default")
    assert _hooked(target.base_model) == {}


def test_a_union_passes_the_removal_on_to_each_model_level_part():
    """UnionModelAdapter.removed hands every part the model it leaves (a part may need it to undo its changes)."""
    class Recorder(ModelAdapter):
        def __init__(self) -> None:
            super().__init__()
            self.left: list[torch.nn.Module] = []

        def removed(self, model: torch.nn.Module) -> None:
            self.left.append(model)

    parts = {"first": Recorder(), "second": Recorder()}
    model = build_tiny("llama")
    UnionModelAdapter(parts).removed(model)
    assert [part.left for part in parts.values()] == [[model], [model]]
