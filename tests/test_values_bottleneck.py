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


def _model_norm_of(site: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    model = build_tiny("bert")
    norm = model.get_submodule(site.rpartition(".")[0] + ".LayerNorm")
    return norm.weight.detach(), norm.bias.detach(), norm.eps


@pytest.mark.parametrize("options, formula", [
    ("original_ln_before=true", "h + s*f(LNm(h + r))"),
    ("original_ln_before=true,original_ln_residual=sum", "h + r + s*f(LNm(h + r))"),
    ("original_ln_before=true,original_ln_residual=normed", "LNm(h + r) + s*f(LNm(h + r))"),
    ("original_ln_before=true,ln_before=true", "h + s*f(LN(LNm(h + r)))"),
    ("ln_after=true", "h + LNa(s*f(h))"),
    ("ln_after=true,ln_after_includes_residual=true", "LNa(h + s*f(h))"),
    ("original_ln_before=true,ln_after=true,ln_after_includes_residual=true", "LNa(h + s*f(LNm(h + r)))"),
])
def test_layernorm_placements_equal_their_formula(options, formula):
    """AdapterHub's placements around the model's own LayerNorm (LNm, after the site, with the block's
    residual input r) and the adapter's LayerNorm after the branch (LNa)."""
    t, r, h, out = _site_values(f"seq_bn[reduction_factor=4,{options}]")
    if "original_ln_before" in options:
        assert r.shape == h.shape and not torch.equal(r, h)  # r: the feed-forward block's input
    weight, bias, eps = _model_norm_of(SITE)  # the base weights are not trained: as built
    z = skip = h
    if "original_ln_before" in options:
        z = _layer_norm(h + r, weight, bias, eps)
        skip = {"sum": h + r, "normed": z}.get(options.rpartition("original_ln_residual=")[2].split(",")[0], h)
    if ",ln_before=true" in "," + options:
        z = _layer_norm(z, t["adapter_norm.weight"], t["adapter_norm.bias"])
    branch = _branch(t, z, "relu", 1.0)
    if "ln_after=true" not in options:
        expected = skip + branch
    elif "includes_residual" in options:
        expected = _layer_norm(skip + branch, t["adapter_norm_after.weight"], t["adapter_norm_after.bias"])
    else:
        expected = skip + _layer_norm(branch, t["adapter_norm_after.weight"], t["adapter_norm_after.bias"])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"{options}: not {formula}")


def test_layernorm_placement_options_are_refused_where_they_do_nothing():
    for spec, words in [("seq_bn[original_ln_residual=sum]", "without original_ln_before"),
                        ("seq_bn[ln_after_includes_residual=true]", "without ln_after=true"),
                        ("seq_bn[original_ln_residual=both]", "original_ln_residual='both'"),
                        ("seq_bn[original_ln_before=true,target_modules=[dense]]", "not target_modules")]:
        with pytest.raises(peftkit.ConfigError, match=words):
            peftkit.adapt(build_tiny("bert"), spec)
    with pytest.raises(peftkit.ConfigError, match="needs the block's residual input at 'ffn_output'.*'mistral'"):
        peftkit.adapt(build_tiny("mistral"), "seq_bn[original_ln_before=true]")


@pytest.mark.parametrize("residual", ["output", "sum", "normed"])
def test_original_ln_before_on_a_pre_layernorm_decoder_reads_h_plus_the_residual(residual):
    """GPT-2's block has no LayerNorm after the projection: the adapter reads h + r, r the residual stream
    (the input of ln_2), and the model adds r to what it returns."""
    site = "transformer.h.1.mlp.c_proj"
    spec = f"seq_bn[reduction_factor=4,original_ln_before=true,original_ln_residual={residual}]"
    model = peftkit.adapt(build_tiny("gpt2"), spec)
    randomize(model, "default", seed=7, scale=0.3)
    layer = model.base_model.get_submodule(site)
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(out=out))
    layer.base_layer.register_forward_hook(lambda m, args, out: seen.update(h=out))
    model.base_model.get_submodule("transformer.h.1.ln_2").register_forward_pre_hook(
        lambda m, args: seen.update(r=args[0]))
    model.eval()
    with torch.no_grad():
        model(**sample_inputs("gpt2"))
    t = {k: v.detach() for k, v in layer.adapters["default"].state_dict().items()}
    h, r = seen["h"], seen["r"]
    skip = {"output": h, "sum": h + r, "normed": h + r}[residual]
    expected = skip + _branch(t, h + r, "relu", 1.0)
    assert (expected - h).abs().max() > 1e-3
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
