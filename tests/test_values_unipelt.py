"""UniPELT's gates against hand formulas at one site each, as AdapterHub's ``adapters`` computes them.

Each gate is ``g = mean over the sequence of sigmoid(W x + b)`` (padding positions included), one
value per example: on a LoRA it replaces alpha / r and reads the layer's input; on a bottleneck
adapter it reads the adapter's input (before its own LayerNorm) and scales the branch before the
skip connection; on prefix tuning it reads the attention's input and scales the prefix's keys and
values (one gate for both, or one each with shared_gating=false). The formulas are written out
here from the raw tensors, with no call into the adapters' modules.
"""

from __future__ import annotations


import pytest
import torch

import peftkit
from peftkit.testing import randomize

from .tiny_models import build_tiny, sample_inputs

BN_SITE = "bert.encoder.layer.1.output.dense"
LORA_SITE = "bert.encoder.layer.1.attention.self.query"


def _gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(batch, outputs): the sequence mean of 1 / (1 + exp(-(x W^T + b)))."""
    return (1 / (1 + torch.exp(-(x @ weight.T + bias)))).mean(dim=1)


def _layer_norm(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps) * weight + bias


def _seen_at(spec: str, site: str, seed: int = 7) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the adapter's tensors at ``site``, what the site saw in one forward: its input x, the base output h,
    its output out and, for par_bn/original_ln_before, the input the adapter reads) with weights off init."""
    model = peftkit.adapt(build_tiny("bert"), spec)
    randomize(model, "default", seed=seed, scale=0.3)
    layer = model.base_model.get_submodule(site)
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    layer.base_layer.register_forward_hook(lambda m, args, out: seen.update(h=out))
    model.eval()
    with torch.no_grad():
        model(**sample_inputs("bert"))
        seen["source"] = layer.input_of("default", seen["x"])
    adapter = layer.adapters["default"]
    return {k: v.detach() for k, v in adapter.tensors().items()}, seen


@pytest.mark.parametrize("options", ["", ",ln_before=true"])
def test_bottleneck_gate_scales_the_branch_by_the_gate_on_the_adapter_input(options):
    """seq_bn with adapters' Pfeiffer placement: out = h + g(z) * up(relu(down(LN?(z)))), z = LNm(h + r)."""
    t, seen = _seen_at(f"seq_bn[reduction_factor=4,original_ln_before=true,use_gating=true{options}]", BN_SITE)
    h, r = seen["h"], seen["source"]
    norm = build_tiny("bert").get_submodule(BN_SITE.rpartition(".")[0] + ".LayerNorm")
    z = _layer_norm(h + r, norm.weight.detach(), norm.bias.detach(), norm.eps)
    normed = _layer_norm(z, t["adapter_norm.weight"], t["adapter_norm.bias"], 1e-5) if options else z
    down = normed @ t["adapter_down.weight"].T + t["adapter_down.bias"]
    branch = torch.clamp(down, min=0) @ t["adapter_up.weight"].T + t["adapter_up.bias"]
    gate = _gate(z, t["gate.weight"], t["gate.bias"])  # reads z, before the adapter's own LayerNorm
    assert gate.shape == (h.shape[0], 1) and (gate - 0.5).abs().max() > 1e-3
    expected = h + gate[:, :, None] * branch
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
