"""OFT and BOFT merge and unmerge in the base weight's precision when it is float64: merging a float64 model
keeps its output to float64 rounding (about 1e-15 here), where a float32 merge would be off by about 1e-7.
Half-precision bases still merge in float32 (the adapter's own precision)."""

from __future__ import annotations

import pytest
import torch

import peftkit

from .method_helpers import output_of, randomize
from .tiny_models import build_tiny

SPECS = ["oft[oft_block_size=8,init_weights=false]", "oft[oft_block_size=8,use_cayley_neumann=false]",
         "boft[boft_block_size=4,boft_n_butterfly_factor=2,init_weights=false]"]
#: Float64 rounding over a tiny model's forward is about 1e-15; a float32 merge leaves about 1e-7.
FLOAT64_TOLERANCE = 1e-12


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", SPECS)
def test_a_float64_model_merges_and_unmerges_in_float64(spec, arch):
    base = build_tiny(arch).double()
    weights = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = peftkit.adapt(base, spec)
    randomize(model, seed=4, std=0.2)
    model.eval()
    unmerged = output_of(model, arch)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, arch), unmerged, atol=FLOAT64_TOLERANCE, rtol=0)
    model.unmerge_adapter()
    restored = model.merge_and_unload([])
    for name, p in restored.named_parameters():
        torch.testing.assert_close(p, weights[name], atol=FLOAT64_TOLERANCE, rtol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_a_half_precision_model_merges_through_float32(spec):
    """A bfloat16 model's merged weights are the float32 merge (its adapter is float32) rounded once to
    bfloat16: exactly what merging the same adapter into the float32 twin of the model gives, rounded."""
    merged = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = peftkit.adapt(build_tiny("llama").to(torch.bfloat16).to(dtype), spec)
        randomize(model, seed=4, std=0.2)
        assert {p.dtype for p in model.adapter_parameters("default")} == {torch.float32}
        merged[dtype] = model.merge_and_unload().state_dict()
    for name, weight in merged[torch.bfloat16].items():
        assert torch.equal(weight, merged[torch.float32][name].to(torch.bfloat16)), name


def test_an_oft_adapter_cast_to_bfloat16_unmerges_through_float32():
    """A model cast to bfloat16 after adapting (its OFT adapter too) merges and unmerges: the inverse rotation is
    taken in float32 (torch has no bfloat16 inverse on the CPU), and unmerging gives the weights back to within
    bfloat16 rounding."""
    model = peftkit.adapt(build_tiny("llama"), SPECS[0])
    randomize(model, seed=4, std=0.2)
    model.to(torch.bfloat16)
    before = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    model.merge_adapter()
    merged = dict(model.base_model.named_parameters())
    assert any(not torch.equal(merged[name], before[name]) for name in before)
    model.unmerge_adapter()
    for name, p in model.base_model.named_parameters():
        torch.testing.assert_close(p, before[name], atol=2 ** -10, rtol=2 ** -7)
