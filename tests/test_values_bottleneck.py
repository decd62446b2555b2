"""Bottleneck adapters, every option variant, against a hand computation at one site.

Each variant (skip connection before or after the adapter's LayerNorm, no skip
connection, a number or a learned scaling, each non-linearity, parallel) is
computed from the adapter's raw tensors with plain tensor arithmetic written
out here (no call into the adapter's modules), and must equal what the site
gives inside a real forward of the model.
"""

from __future__ import annotations

import math

import pytest
import torch

import peftkit
from peftkit.testing import randomize

from .tiny_models import build_tiny, sample_inputs

SITE = "bert.encoder.layer.1.output.dense"

HAND_ACTIVATIONS = {
    "relu": lambda t: torch.where(t > 0, t, torch.zeros_like(t)),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
    "gelu_new": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3))),
    "silu": lambda t: t / (1 + torch.exp(-t)),
    "swish": lambda t: t / (1 + torch.exp(-t)),
    "tanh": lambda t: (torch.exp(t) - torch.exp(-t)) / (torch.exp(t) + torch.exp(-t)),
    "sigmoid": lambda t: 1 / (1 + torch.exp(-t)),
    "leaky_relu": lambda t: torch.where(t > 0, t, 0.01 * t),
    "identity": lambda t: t,
}


def _layer_norm(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps) * weight + bias


def _site_values(spec: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the adapter's tensors, the site's own input, the base layer's output h, the site's output)
    in one forward of BERT with the adapter active and its weights moved off their init."""
    model = peftkit.adapt(build_tiny("bert"), spec)
    randomize(model, "default", seed=7, scale=0.3)
    layer = model.base_model.get_submodule(SITE)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        if getattr(adapter, "adapter_scaling", None) is not None:
            adapter.adapter_scaling.fill_(0.7)
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    layer.base_layer.register_forward_hook(lambda m, args, out: seen.update(h=out))
    model.eval()
    with torch.no_grad():
        model(**sample_inputs("bert"))
        source = layer.input_of("default", seen["x"])  # par_bn: the feed-forward block's input
    tensors = {k: v.detach() for k, v in adapter.state_dict().items()}
    return tensors, source, seen["h"], seen["out"]


def _branch(t: dict[str, torch.Tensor], z: torch.Tensor, act: str, scale: float) -> torch.Tensor:
    down = z @ t["adapter_down.weight"].T + t["adapter_down.bias"]
    up = HAND_ACTIVATIONS[act](down) @ t["adapter_up.weight"].T + t["adapter_up.bias"]
    return scale * up


@pytest.mark.parametrize("options, formula", [
    ("", "h + s*f(h)"),
    ("ln_before=true", "h + s*f(LN(h))"),
    ("ln_before=true,residual_before_ln=false", "LN(h) + s*f(LN(h))"),
    ("residual=false", "s*f(h)"),
    ("residual=false,ln_before=true", "s*f(LN(h))"),
    ("scaling=2.5", "h + 2.5*f(h)"),
    ("scaling=\"learned\",ln_before=true", "h + 0.7*f(LN(h))"),
    ("dropout=0.3", "h + s*f(h) (dropout off in eval)"),
])
def test_sequential_bottleneck_variants_equal_their_formula(options, formula):
    spec = f"seq_bn[reduction_factor=4,{options}]" if options else "seq_bn[reduction_factor=4]"
    t, _, h, out = _site_values(spec)
    scale = 0.7 if "learned" in options else 2.5 if "scaling=2.5" in options else 1.0
    ln = _layer_norm(h, t["adapter_norm.weight"], t["adapter_norm.bias"]) if "ln_before=true" in options else h
    expected = _branch(t, ln, "relu", scale)
    if "residual=false" not in options:
        expected = expected + (ln if "residual_before_ln=false" in options else h)
    assert (expected - h).abs().max() > 1e-3, "the adapter must change the site for the comparison to mean anything"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"{spec}: not {formula}")


@pytest.mark.parametrize("act", sorted(HAND_ACTIVATIONS))
def test_each_non_linearity_equals_its_hand_formula(act):
    t, _, h, out = _site_values(f"seq_bn[reduction_factor=4,non_linearity={act}]")
    torch.testing.assert_close(out, h + _branch(t, h, act, 1.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", ["", "ln_before=true", "scaling=0.25"])
def test_parallel_bottleneck_reads_the_block_input_and_adds_to_its_output(options):
    spec = f"par_bn[reduction_factor=4,{options}]" if options else "par_bn[reduction_factor=4]"
    t, source, h, out = _site_values(spec)
    assert source.shape[-1] != h.shape[-1] or not torch.equal(source, h)  # really another module's input
    z = _layer_norm(source, t["adapter_norm.weight"], t["adapter_norm.bias"]) if "ln_before" in options else source
    expected = h + _branch(t, z, "relu", 0.25 if "scaling" in options else 4.0)  # par_bn's default scaling: 4
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
