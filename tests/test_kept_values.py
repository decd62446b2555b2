"""kept_while_unchanged (peftkit/core/kept_values.py, the plugin API) on OFT's rotations and BOFT's blocks: kept
between forwards without gradients, built again when the trained entries change, and dropped by a training
forward (VB-LoRA's, FourierFT's, C3A's and DeLoRA's kept values have their own tests in their method files); an
adapter that stops being active frees what its layers keep."""

from __future__ import annotations

import pytest
import torch

import peftkit
from tests.method_helpers import adapter_modules
from tests.tiny_models import build_tiny

CASES = [("oft[oft_block_size=8,init_weights=false]", "_kept_rotations", "weight", "rotations"),
         ("boft[boft_block_size=4,boft_n_butterfly_factor=2,init_weights=false]", "_kept_blocks", "boft_R", "blocks")]


@pytest.mark.parametrize("spec,name,entries,build", CASES, ids=["oft", "boft"])
def test_kept_between_inference_forwards_until_the_entries_change_and_dropped_in_training(spec, name, entries, build):
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), spec).eval()
    layer = next(iter(adapter_modules(model).values()))
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        first = model(input_ids=ids).logits
        kept = layer.__dict__[name][1]
        assert torch.equal(model(input_ids=ids).logits, first)
        assert layer.__dict__[name][1] is kept  # not built again
        tensor = getattr(layer, entries)  # an optimizer step's in-place write (not symmetric: BOFT keeps R's skew part)
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))
        changed = model(input_ids=ids).logits
    assert layer.__dict__[name][1] is not kept and not torch.equal(changed, first)
    torch.testing.assert_close(layer.__dict__[name][1], getattr(layer, build)().detach(), rtol=0, atol=0)
    model.train()
    model(input_ids=ids).logits.sum().backward()  # training builds anew, with gradients, and keeps nothing
    assert name not in layer.__dict__ and getattr(layer, entries).grad is not None


def test_an_adapter_switched_away_frees_what_its_layers_keep():
    """The dense weights some methods keep for inference (here C3A's weight change) stay only for the active
    adapters: set_active() to another adapter, or to none, frees the old one's; it is built again when used."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "c3a[block_size=8,init_weights=false]").eval()
    model.add_adapter("other", "c3a[block_size=8,init_weights=false]")
    first, other = adapter_modules(model, "default"), adapter_modules(model, "other")
    ids = torch.tensor([[3, 14, 15, 92, 65]] * 8)  # 40 tokens: C3A's one product with W + dW, from its kept dW
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert all("_kept_change" in layer.__dict__ for layer in first.values())
        model.set_active("other")
        assert not any("_kept_change" in layer.__dict__ for layer in first.values())
        model(input_ids=ids)
        assert all("_kept_change" in layer.__dict__ for layer in other.values())
        model.set_active("default")
        assert not any("_kept_change" in layer.__dict__ for layer in other.values())
        assert torch.equal(model(input_ids=ids).logits, expected)  # built again, the same numbers
        model.set_active(None)
        assert not any("_kept_change" in layer.__dict__ for layer in first.values())
