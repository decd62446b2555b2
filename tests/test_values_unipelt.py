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

from .method_helpers import seen_at_site
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
    seen = seen_at_site(model, site)
    adapter = model.base_model.get_submodule(site).adapters["default"]
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


def test_lora_gate_replaces_the_scale_by_the_gate_on_the_layer_input():
    """lora[use_gating=true]: out = W0 x + b0 + g(x) * (x A^T B^T), with no alpha / r (adapters' rule)."""
    t, seen = _seen_at("lora[r=4,alpha=64,use_gating=true,target_modules=[\"query\"]]", LORA_SITE)
    x, h = seen["x"], seen["h"]
    gate = _gate(x, t["gate.weight"], t["gate.bias"])
    assert gate.shape == (x.shape[0], 1) and (gate - 0.5).abs().max() > 1e-3
    expected = h + gate[:, :, None] * (x @ t["lora_A.weight"].T @ t["lora_B.weight"].T)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_prefix_gate_scales_the_prefix_keys_and_values_in_attention(shared):
    """prefix_tuning[use_gating=true] at BERT's layer 1: attention over [g_k * Pk; K] and [g_v * Pv; V], with
    g read from the attention's input (one gate for both, or g_k and g_v with shared_gating=false)."""
    model = peftkit.adapt(build_tiny("bert"), f"prefix_tuning[num_virtual_tokens=3,use_gating=true,"
                                              f"shared_gating={str(shared).lower()}]")
    randomize(model, "default", seed=5, scale=0.5)
    attention = model.base_model.get_submodule("bert.encoder.layer.1.attention.self")
    seen: dict[str, torch.Tensor] = {}
    attention.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0] if args else
                                    kwargs["hidden_states"], out=out[0]), with_kwargs=True)
    inputs = sample_inputs("bert")
    inputs["attention_mask"][1, -2:] = 0  # padding: masked for attention, still in the gate's mean
    model.eval()
    with torch.no_grad():
        model(**inputs)
    t = {k: v.detach() for k, v in model.model_adapter("default").tensors().items()}
    x, heads = seen["x"], 4
    batch, length, hidden = x.shape
    head_dim = hidden // heads
    prefix = t["prompt_embeddings"].view(3, 2 * 2, heads, head_dim)  # (P, layers * 2, heads, head_dim)
    gate = _gate(x, t["prefix_gates.1.weight"], t["prefix_gates.1.bias"])
    assert gate.shape == (batch, 1 if shared else 2) and (gate - 0.5).abs().max() > 1e-3
    pk = prefix[:, 2].permute(1, 0, 2)[None] * gate[:, 0, None, None, None]   # layer 1's key block
    pv = prefix[:, 3].permute(1, 0, 2)[None] * gate[:, -1, None, None, None]  # and value block

    def heads_of(name: str) -> torch.Tensor:
        linear = attention.get_submodule(name)
        return (x @ linear.weight.detach().T + linear.bias.detach()).view(batch, length, heads, head_dim).transpose(1, 2)

    keys, values = torch.cat([pk, heads_of("key")], 2), torch.cat([pv, heads_of("value")], 2)
    scores = heads_of("query") @ keys.transpose(-1, -2) / head_dim ** 0.5
    attended = torch.cat([torch.ones(batch, 3), inputs["attention_mask"].float()], 1)
    scores = scores + (1 - attended)[:, None, None, :] * -1e9
    expected = (torch.softmax(scores, -1) @ values).transpose(1, 2).reshape(batch, length, hidden)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
