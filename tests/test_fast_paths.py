"""The fast paths of the built-in methods against the plain formula: values and gradients.

Each case builds a real layer adapter on a real base layer, runs the path a
model takes (``TunerLayer``, which asks ``forward_alone`` when the adapter is
alone) and compares it with the method's formula written out with plain torch
operations on the same tensors: outputs and the gradients of the input and of
every trained tensor, in float32 and bfloat16, dropout on and off, merged and
unmerged. A test also checks that the fast path is the one that ran.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from tests.tiny_models import build_tiny, sample_inputs

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
#: A bfloat16 model adapted as it is: the factors stay float32 (adapter_precision), PEFT's default too.
MIXED = "bfloat16 layer, float32 factors"


def _conv1d(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(out_f, in_f)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _base(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1)
    if kind == "conv1d":
        layer = _conv1d(24, 20)
    else:
        layer = nn.Linear(24, 20, bias=kind == "linear_bias")
    return layer.to(dtype).requires_grad_(False)


def _wrapped(kind: str, dtype: torch.dtype | str, dora: bool, dropout: float) -> nn.Module:
    """A one-layer model with a LoRA (DoRA) adapter on the layer, factors random (init_weights=false);
    for ``MIXED`` a bfloat16 layer with the float32 factors adapting it gives."""
    model = nn.Sequential()
    model.add_module("proj", _base(kind, torch.bfloat16 if dtype == MIXED else dtype))
    spec = f"lora[r=4,alpha=8,dropout={dropout},init_weights=false,use_dora={str(dora).lower()},target_modules=proj]"
    torch.manual_seed(2)
    if dtype == MIXED:
        return peftkit.adapt(model, spec)
    return peftkit.adapt(model, spec).to(dtype)  # bfloat16 factors too (else they train in float32)


def _lora_formula(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The LoRA/DoRA output written out: W x + b + s B A (x * mask), DoRA rescaling the rows of
    W + s B A by m / ||W + s B A|| (norm detached) before the bias; DoRA with a dropout mask as PEFT:
    W x + b + (m/n - 1) W (x * mask) + (m/n) s B A (x * mask)."""
    base = layer.base_layer
    adapter = layer.adapters["default"]
    weight = base.weight.t() if type(base).__name__ == "Conv1D" else base.weight
    bias = base.bias
    if weight.dtype != adapter.lora_A.dtype:  # float32 factors on a bfloat16 layer: all in float32
        weight, x = weight.float(), x.float()
        bias = None if bias is None else bias.float()
        mask = None if mask is None else mask.float()
    lora_in = x if mask is None else x * mask
    update = (lora_in @ adapter.lora_A.t()) @ adapter.lora_B.t() * adapter.scale
    if not adapter.use_dora:
        out = x @ weight.t() + update
        return out if bias is None else out + bias
    dense = weight + adapter.scale * adapter.lora_B @ adapter.lora_A
    norm = dense.norm(dim=1).detach()
    mag_scale = adapter.lora_magnitude_vector / norm
    if mask is not None:  # PEFT's rule: the dropped-out input goes through W too
        out = x @ weight.t() + (mag_scale - 1) * (lora_in @ weight.t()) + mag_scale * update
        return out if bias is None else out + bias
    out = mag_scale * (x @ weight.t() + update)
    return out if bias is None else out + bias


def _node_under_view(out: torch.Tensor) -> str:
    node = out.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], seed_grad: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, seed_grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, MIXED])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_fused_matches_formula(kind: str, dora: bool, dtype: torch.dtype | str, dropout: float) -> None:
    model = _wrapped(kind, dtype, dora, dropout)
    model.train()
    layer = model.base_model.proj
    adapter = layer.adapters["default"]
    trained = [adapter.lora_A, adapter.lora_B] + ([adapter.lora_magnitude_vector] if dora else [])
    dtype = torch.bfloat16 if dtype == MIXED else dtype  # the input's and output's
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    seed_grad = torch.randn(3, 5, 20, dtype=dtype)

    torch.manual_seed(7)
    out = layer(x)
    fused = _node_under_view(out) in ("_LoraFnBackward", "_DoraFnBackward")
    assert fused != (dora and dropout > 0)  # the fused path ran, except for DoRA with dropout (plain path)
    got = [out.detach()] + _grads(out, [x] + trained, seed_grad)

    mask = None
    if dropout:  # the same draw as the adapter's dropout, from the same seed
        torch.manual_seed(7)
        mask = F.dropout(torch.ones_like(x), dropout, training=True)
    expected_out = _lora_formula(layer, x, mask)
    expected = [expected_out.detach()] + _grads(expected_out, [x] + trained, seed_grad)
    for name, a, b in zip(["output", "x", "lora_A", "lora_B", "magnitude"], got, expected):
        scale = b.abs().max().float().clamp_min(1.0)
        assert (a.float() - b.float()).abs().max() <= TOLERANCE[dtype] * scale * 10, name


@pytest.mark.parametrize("dora", [False, True])
def test_lora_fused_inference_and_merged(dora: bool) -> None:
    model = _wrapped("linear_bias", torch.float32, dora, 0.1)
    model.eval()
    layer = model.base_model.proj
    x = torch.randn(2, 7, 24)
    with torch.inference_mode():
        fused = layer(x)
        expected = _lora_formula(layer, x, None)
        model.merge_adapter()
        merged = layer(x)
    assert torch.allclose(fused, expected, atol=1e-5)
    assert torch.allclose(merged, expected, atol=1e-5)


def test_lora_unfused_when_base_has_hook_or_trains() -> None:
    """A forward hook on the base layer still runs, and a trained base weight gets its gradient."""
    model = _wrapped("linear", torch.float32, False, 0.0)
    layer = model.base_model.proj
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    layer(torch.randn(2, 24))
    handle.remove()
    assert calls == [1]
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 3, 24)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None
    expected = _lora_formula(layer, x, None)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_lora_model_step_equals_unfused() -> None:
    """A training step of a whole model: the same loss and adapter gradients with the fused path as
    with the fused path switched off (a no-op forward hook on every base layer)."""
    base = build_tiny("llama")
    inputs = sample_inputs("llama")
    losses, grads = [], []
    for hooked in (False, True):
        torch.manual_seed(5)
        model = peftkit.adapt(copy.deepcopy(base), "lora[r=4,alpha=8,init_weights=false,use_dora=true]")
        model.train()
        if hooked:
            for module in model.modules():
                if hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Linear):
                    module.base_layer.register_forward_hook(lambda *a: None)
        torch.manual_seed(0)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.adapter_parameters("default")])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, MIXED])
@pytest.mark.parametrize("shape, r", [((24, 20), 8), ((64, 16), 8), ((24, 20), 2), ((256, 96), 2)])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_lokr_fused_sum_matches_formula(shape: tuple[int, int], r: int, dtype: torch.dtype | str, training: bool,
                                        conv1d: bool) -> None:
    """LoKr on a linear layer applies its factors to the input and adds the base output in its last
    product: the same values and gradients as x (W + s kron(w1, w2))^T + b, for a full and a
    rank-r w2 (r=8 makes w2 full on these small layers: both product orders; r=2 keeps it low-rank)."""
    in_f, out_f = shape
    model = nn.Sequential()
    torch.manual_seed(1)
    model.add_module("proj", _conv1d(in_f, out_f) if conv1d else nn.Linear(in_f, out_f))
    torch.manual_seed(2)
    spec = f"lokr[r={r},alpha=4,init_weights=false,target_modules=proj]"
    mixed = dtype == MIXED
    if mixed:  # a bfloat16 layer adapted as it is: float32 factors
        adapted, dtype = peftkit.adapt(model.to(torch.bfloat16), spec), torch.bfloat16
        assert all(p.dtype == torch.float32 for p in adapted.base_model.proj.adapters["default"].parameters())
    else:
        adapted = peftkit.adapt(model, spec).to(dtype)
    adapted.train(training)
    layer = adapted.base_model.proj
    adapter = layer.adapters["default"]
    x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
    out = layer(x)
    if not (mixed and adapter.shapes.full_w2):  # a full w2 with float32 factors adds its update to h
        assert type(out.grad_fn).__name__ == "ViewBackward0"  # a fused path ran (h + delta ends in AddBackward0)
    if not adapter.shapes.full_w2:  # rank-r w2: the whole layer is one node
        assert _node_under_view(out) == "_LokrFnBackward"
    trained = [p for p in adapter.parameters()]
    seed_grad = torch.randn_like(out)
    got = [out.detach()] + _grads(out, [x] + trained, seed_grad)
    base = layer.base_layer
    weight = base.weight.t() if conv1d else base.weight
    delta = adapter.delta_out_in()
    if delta.dtype != weight.dtype:  # float32 factors: the formula in float32
        expected_out = x.float() @ (weight.float() + delta).t() + base.bias.float()
    else:
        expected_out = x @ (weight + delta).t() + base.bias
    expected = [expected_out.detach()] + _grads(expected_out, [x] + trained, seed_grad)
    for a, b in zip(got, expected):
        scale = b.abs().max().float().clamp_min(1.0)
        assert (a.float() - b.float()).abs().max() <= TOLERANCE[dtype] * scale * 10
    if dtype == torch.float32:
        with torch.no_grad():
            adapted.merge_adapter()
            assert torch.allclose(layer(x), expected_out, atol=1e-5)


@pytest.mark.parametrize("tokens", [(3, 5), (4, 50)])
@pytest.mark.parametrize("conv1d, bias", [(False, False), (False, True), (True, True)])
def test_lokr_fused_inference_matches_training_path(conv1d: bool, bias: bool, tokens: tuple[int, int]) -> None:
    """With gradients off, the fused LoKr layer (rank-r w2) runs without an autograd node: on 15 tokens its
    products, the same values as the training path bit for bit; on 200 (more memory than a pass over the
    weight) the update added to a copy of W and one product. Both equal x (W + s kron(w1, w2))^T + b."""
    from peftkit.plugins.lokr.fused import dense_is_cheaper

    model = nn.Sequential()
    torch.manual_seed(1)
    model.add_module("proj", _conv1d(96, 256) if conv1d else nn.Linear(96, 256, bias=bias))
    torch.manual_seed(2)
    adapted = peftkit.adapt(model, "lokr[r=2,alpha=4,init_weights=false,target_modules=proj]")
    adapted.eval()
    layer = adapted.base_model.proj
    adapter = layer.adapters["default"]
    s = adapter.shapes
    assert not s.full_w2
    dense = dense_is_cheaper(tokens[0] * tokens[1], s.out_l, s.out_k, s.in_m, s.in_n, s.r)
    assert dense == (tokens == (4, 50))
    x = torch.randn(*tokens, 96)
    with_grad = layer(x)
    assert _node_under_view(with_grad) == "_LokrFnBackward"
    with torch.no_grad():
        without = layer(x)
        weight = layer.base_layer.weight.t() if conv1d else layer.base_layer.weight
        expected = x @ (weight + adapter.delta_out_in()).t()
        if layer.base_layer.bias is not None:
            expected = expected + layer.base_layer.bias
    with torch.inference_mode():
        inferred = layer(x)
    assert without.grad_fn is None and without.shape == (*tokens, 256)
    if dense:
        torch.testing.assert_close(without, with_grad.detach(), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(without, with_grad.detach())
    assert torch.equal(inferred, without)
    assert torch.allclose(without, expected, atol=1e-5)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_alone_matches_formula(feedforward: bool, dtype: torch.dtype) -> None:
    """IA3 alone at its layer (a feed-forward vector runs the layer once on x * l): the same values and
    gradients as (W x + b) * l or W (x * l) + b, unmerged and merged."""
    model = nn.Sequential()
    torch.manual_seed(1)
    model.add_module("proj", nn.Linear(24, 20))
    feedforward_modules = "[proj]" if feedforward else "[]"
    torch.manual_seed(2)
    adapted = peftkit.adapt(model, f"ia3[init_weights=false,target_modules=[proj],"
                                   f"feedforward_modules={feedforward_modules}]").to(dtype)
    adapted.train()
    layer = adapted.base_model.proj
    vector = layer.adapters["default"].ia3_l
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    out = layer(x)
    seed_grad = torch.randn_like(out)
    got = [out.detach()] + _grads(out, [x, vector], seed_grad)
    base = layer.base_layer
    if feedforward:
        expected_out = (x * vector.flatten()) @ base.weight.t() + base.bias
    else:
        expected_out = (x @ base.weight.t() + base.bias) * vector.flatten()
    expected = [expected_out.detach()] + _grads(expected_out, [x, vector], seed_grad)
    for a, b in zip(got, expected):
        scale = b.abs().max().float().clamp_min(1.0)
        assert (a.float() - b.float()).abs().max() <= TOLERANCE[dtype] * scale * 10
    if feedforward and dtype == torch.float32:
        with torch.no_grad():
            adapted.merge_adapter()
            assert torch.allclose(layer(x), expected_out, atol=1e-5)


#: Methods whose update has LoRA's form with factors built each call, run through the public ``fused_lora``.
LORA_FORM_SPECS = {
    "adalora": "adalora[init_r=4,target_r=2,total_step=10,alpha=8,dropout={dropout},init_weights=false,"
               "target_modules=proj]",
    "vblora": "vblora[r=4,num_vectors=16,vector_length=4,topk=2,vblora_dropout={dropout},init_logits_std=1.0,"
              "target_modules=proj]",
}


@pytest.mark.parametrize("method", sorted(LORA_FORM_SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, MIXED])
@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_form_methods_take_the_fused_node_with_the_unfused_values(method: str, dtype: torch.dtype | str,
                                                                       kind: str, dropout: float) -> None:
    """AdaLoRA (A * E) and VB-LoRA (A and B mixed from the bank) run the fused LoRA node in training: the same
    output, input gradient and gradients of every trained tensor (E, the logits, the bank) as the unfused path
    (the base layer hooked), with the same dropout draws for one seed."""
    results = []
    for hooked in (False, True):
        model = nn.Sequential()
        model.add_module("proj", _base(kind, torch.bfloat16 if dtype == MIXED else dtype))
        torch.manual_seed(2)
        model = peftkit.adapt(model, LORA_FORM_SPECS[method].format(dropout=dropout))
        model.train()
        layer = model.base_model.proj
        if hooked:
            layer.base_layer.register_forward_hook(lambda *a: None)
        torch.manual_seed(3)
        x = torch.randn(3, 5, 24, dtype=torch.bfloat16 if dtype == MIXED else dtype, requires_grad=True)
        seed_grad = torch.randn(3, 5, 20, dtype=x.dtype)
        torch.manual_seed(7)
        out = layer(x)
        assert (_node_under_view(out) == "_LoraFnBackward") != hooked
        trained = [x, *model.adapter_parameters("default")]
        results.append([out.detach(), *_grads(out, trained, seed_grad)])
    tolerance = TOLERANCE[torch.bfloat16 if dtype == MIXED else dtype]
    for index, (a, b) in enumerate(zip(*results)):
        scale = b.abs().max().float().clamp_min(1.0)
        assert (a.float() - b.float()).abs().max() <= tolerance * scale * 10, index


@pytest.mark.parametrize("method", sorted(LORA_FORM_SPECS))
def test_lora_form_methods_fused_inference_equals_merged(method: str) -> None:
    model = nn.Sequential()
    model.add_module("proj", _base("linear_bias", torch.float32))
    torch.manual_seed(2)
    model = peftkit.adapt(model, LORA_FORM_SPECS[method].format(dropout=0.1)).eval()
    x = torch.randn(2, 7, 24)
    with torch.inference_mode():
        fused = model.base_model.proj(x)
        model.merge_adapter()
        merged = model.base_model.proj(x)
    assert torch.allclose(fused, merged, atol=1e-5)
