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

from .method_helpers import seen_at_site
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


def _site_run(base, spec: str):
    """(the site, its adapter, the input it reads (par_bn: the feed-forward block's input), the base layer's
    output h, the site's output) in one forward of ``base`` with the adapter active and its weights moved off
    their init (a learned scaling set to 0.7)."""
    model = peftkit.adapt(base, spec)
    randomize(model, "default", seed=7, scale=0.3)
    layer = model.base_model.get_submodule(SITE)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        if getattr(adapter, "adapter_scaling", None) is not None:
            adapter.adapter_scaling.fill_(0.7)
    seen = seen_at_site(model, SITE)
    return layer, adapter, seen["source"], seen["h"], seen["out"]


def _site_values(spec: str, base=None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the adapter's tensors, the input it reads, the base layer's output h, the site's output)
    in one forward of BERT (or ``base``): see _site_run."""
    _, adapter, source, h, out = _site_run(base if base is not None else build_tiny("bert"), spec)
    return {k: v.detach() for k, v in adapter.state_dict().items()}, source, h, out


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


@pytest.mark.parametrize("options", ["", "ln_before=true", "scaling=0.25", "ln_after=true"])
def test_parallel_bottleneck_reads_the_block_input_and_adds_to_its_output(options):
    spec = f"par_bn[reduction_factor=4,{options}]" if options else "par_bn[reduction_factor=4]"
    t, source, h, out = _site_values(spec)
    assert source.shape[-1] != h.shape[-1] or not torch.equal(source, h)  # really another module's input
    z = _layer_norm(source, t["adapter_norm.weight"], t["adapter_norm.bias"]) if "ln_before" in options else source
    branch = _branch(t, z, "relu", 0.25 if "scaling" in options else 4.0)  # par_bn's default scaling: 4
    if "ln_after" in options:
        branch = _layer_norm(branch, t["adapter_norm_after.weight"], t["adapter_norm_after.bias"])
    expected = h + branch
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
    ("ln_after=true,residual=false", "LNa(s*f(h))"),
    ("ln_after=true,ln_after_includes_residual=true,residual=false", "LNa(s*f(h))"),
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
    if "residual=false" in options:
        skip = torch.zeros_like(h)
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


def _adapter_at_site(spec: str, model=None):
    model = peftkit.adapt(model if model is not None else build_tiny("bert"), spec)
    return model, model.base_model.get_submodule(SITE).adapters["default"]


@pytest.mark.parametrize("init_weights", [True, False])
def test_initial_weights_are_drawn_as_adapterhub_draws_them(init_weights):
    """down: Kaiming-uniform with a = sqrt(5) (bound 1 / sqrt(in)), zero bias; up: zero (identity start) or
    N(0, 0.02) with init_weights=false, zero bias; a learned scaling starts at 1."""
    torch.manual_seed(0)
    spec = f"seq_bn[reduction_factor=2,scaling=\"learned\",init_weights={str(init_weights).lower()}]"
    _, adapter = _adapter_at_site(spec)
    down, up = adapter.adapter_down.weight.detach(), adapter.adapter_up.weight.detach()
    assert down.shape == (16, 32) and up.shape == (32, 16)
    bound = 1 / math.sqrt(32)
    assert down.abs().max() <= bound and down.abs().max() > 0.95 * bound  # a = sqrt(6) would give 0.926 * bound
    assert torch.count_nonzero(adapter.adapter_down.bias) == 0 and torch.count_nonzero(adapter.adapter_up.bias) == 0
    if init_weights:
        assert torch.count_nonzero(up) == 0
    else:
        assert 0.017 < float(up.std()) < 0.023 and abs(float(up.mean())) < 0.004
    assert torch.equal(adapter.adapter_scaling.detach(), torch.ones(1))


def test_dropout_drops_the_branch_in_training_with_inverted_scaling():
    """out = h + dropout(s * f(h)): each branch entry is 0 or scaled by 1 / (1 - p), p = 0.5."""
    model, adapter = _adapter_at_site("seq_bn[reduction_factor=4,dropout=0.5]")
    randomize(model, "default", seed=3, scale=0.5)
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    adapter.eval()
    branch = adapter(h, h, None) - h
    adapter.train()
    dropped = adapter(h, h, None) - h
    kept = dropped != 0
    assert 0.3 < float(kept.float().mean()) < 0.7
    torch.testing.assert_close(dropped[kept], 2 * branch[kept])


def test_a_float64_base_gets_a_float64_adapter_with_exact_values():
    spec = "seq_bn[reduction_factor=4,ln_before=true,init_weights=false]"
    _, adapter = _adapter_at_site(spec, build_tiny("bert").double())
    assert {p.dtype for p in adapter.parameters()} == {torch.float64} and adapter.compute_dtype == torch.float64
    t, _, h, out = _site_values(spec, build_tiny("bert").double())
    assert h.dtype == torch.float64
    ln = _layer_norm(h, t["adapter_norm.weight"], t["adapter_norm.bias"])
    torch.testing.assert_close(out, h + _branch(t, ln, "relu", 1.0), atol=1e-12, rtol=1e-12)


def test_the_repr_names_placement_sizes_activation_and_scaling():
    _, sequential = _adapter_at_site("seq_bn[reduction_factor=4,non_linearity=gelu,scaling=0.5]")
    assert sequential.extra_repr() == "sequential, in=32, bottleneck=8, out=32, act=gelu, scaling=0.5"
    _, parallel = _adapter_at_site("par_bn[reduction_factor=2,scaling=\"learned\"]")
    assert parallel.extra_repr() == "parallel, in=32, bottleneck=16, out=32, act=relu, scaling=learned"


@pytest.mark.parametrize("spec", ["seq_bn[reduction_factor=4,use_gating=true]",
                                  "seq_bn[reduction_factor=4,use_gating=true,original_ln_before=true]",
                                  "seq_bn[reduction_factor=4,use_gating=true,ln_before=true]",
                                  "par_bn[reduction_factor=4,use_gating=true,scaling=0.5]"])
def test_a_gate_scales_the_branch_by_the_gate_on_the_adapter_input(spec):
    """out = h + g(z) * s * f(LN?(z)), z the adapter's input (h, LNm(h + r), or the block input for par_bn), with
    g(z) = the sequence mean of sigmoid(z W^T + b) (UniPELT, as AdapterHub computes it)."""
    t, source, h, out = _site_values(spec)
    z = source if spec.startswith("par_bn") else h
    if "original_ln_before" in spec:  # the adapter's input is LNm(h + r), its skip connection h
        weight, bias, eps = _model_norm_of(SITE)
        z = _layer_norm(h + source, weight, bias, eps)
    normed = _layer_norm(z, t["adapter_norm.weight"], t["adapter_norm.bias"]) if ",ln_before" in spec else z
    gate = (1 / (1 + torch.exp(-(z @ t["gate.weight"].T + t["gate.bias"])))).mean(dim=1)
    assert (gate - 0.5).abs().max() > 1e-3
    expected = h + gate[:, :, None] * _branch(t, normed, "relu", 0.5 if "scaling" in spec else 1.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


NON_ADDITIVE = ["seq_bn[reduction_factor=4,original_ln_before=true,original_ln_residual=sum]",
                "seq_bn[reduction_factor=4,ln_after=true,ln_before=true]",
                "seq_bn[reduction_factor=4,residual=false]", "par_bn[reduction_factor=4,ln_after=true]"]


@pytest.mark.parametrize("spec", NON_ADDITIVE + ["seq_bn[reduction_factor=4]", "seq_bn[reduction_factor=4,ln_before=true]",
                                  "par_bn[reduction_factor=4]", "par_bn[reduction_factor=4,ln_before=true]"])
def test_an_adapter_called_alone_gives_the_site_output_and_its_change(spec):
    """Compositions call an adapter's forward (output) or delta (output - h) directly. It is additive (Average
    and routing may add its delta in place) exactly when its skip connection carries h itself."""
    layer, adapter, source, h, out = _site_run(build_tiny("bert"), spec)
    assert adapter.additive == (spec not in NON_ADDITIVE)
    with torch.no_grad():
        torch.testing.assert_close(adapter(source, h, layer.base_layer), out)
        torch.testing.assert_close(adapter.delta(source, h, layer.base_layer), out - h)
    assert adapter.tensors()["adapter_down.weight"] is adapter.adapter_down.weight  # the live tensors


@pytest.mark.parametrize("spec", ["seq_bn[reduction_factor=4,ln_before=true]", *NON_ADDITIVE])
def test_a_bfloat16_base_gets_a_float32_adapter_that_returns_bfloat16(spec):
    """The branch computes in the adapter's float32 from the bfloat16 input and hands back bfloat16: the same
    as the adapter on the input widened to float32, up to bfloat16's rounding of the result."""
    layer, adapter, source, h, out = _site_run(build_tiny("bert").to(torch.bfloat16), spec)
    assert h.dtype == out.dtype == torch.bfloat16 and adapter.compute_dtype == torch.float32
    with torch.no_grad():
        changed = adapter.delta(source, h, layer.base_layer)
        if adapter.model_norm is not None:
            adapter.model_norm.float()  # the reference reads the model's LayerNorm in float32 too
        wide = adapter(source.float(), h.float(), layer.base_layer)
    assert changed.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), wide, atol=2e-2, rtol=1e-2)
