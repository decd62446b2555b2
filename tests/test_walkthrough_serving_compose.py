"""A serving engineer composing adapters with other target modules (docs/composition.md, Fuse):
a new fusion averages the members acting at each site, so it equals average() only where all act."""

from __future__ import annotations

import torch

import peftkit
from peftkit import Average, Fuse, Stack
from tests.method_helpers import output_of, randomize
from tests.tiny_models import build_tiny


def _model_with(specs: dict[str, str]) -> peftkit.AdaptedModel:
    model = None
    for seed, (name, spec) in enumerate(specs.items()):
        if model is None:
            model = peftkit.adapt(build_tiny("llama"), spec, name)
        else:
            model.add_adapter(name, spec)
        randomize(model, name, seed=seed + 1)
    return model.eval()


def _output(model: peftkit.AdaptedModel, node) -> torch.Tensor:
    model.set_active(node)
    return output_of(model, "llama")


def test_a_new_fusion_of_members_on_the_same_sites_is_their_average() -> None:
    model = _model_with({"a": "lora[r=4]", "b": "lora[r=2]"})
    model.add_fusion(Fuse("a", "b"))
    torch.testing.assert_close(_output(model, Fuse("a", "b")), _output(model, Average("a", "b")),
                               atol=1e-5, rtol=1e-5)


def test_a_new_fusion_of_members_on_disjoint_sites_is_their_stack() -> None:
    model = _model_with({"a": "lora[r=4,target_modules=[q_proj]]", "d": "lora[r=4,target_modules=[v_proj]]"})
    model.add_fusion(Fuse("a", "d"))
    fused = _output(model, Fuse("a", "d"))
    torch.testing.assert_close(fused, _output(model, Stack("a", "d")), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused, _output(model, Average("a", "d")), atol=1e-4)
