"""The fused LoRA, DoRA and LoKr layers under autocast (a float32 model trained with ``torch.autocast``,
what a Trainer with ``bf16=True`` runs): the fused node runs, computes in autocast's dtype as autocast
computes the unfused layer (every operand cast to that dtype), gives the factors float32 gradients,
and keeps the float32 weight for backward, not a half-precision copy of it. Checked on the CPU (its
autocast takes bfloat16 and float16) against the layer's formula in float64 on the rounded operands."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.plugin_api import fusable_linear

HALF = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


def _conv1d(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(out_f, in_f)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _model(kind: str, spec: str) -> nn.Module:
    """A float32 one-layer model (24 -> 20) with the adapter ``spec`` on it, factors random."""
    torch.manual_seed(1)
    layer = _conv1d(24, 20) if kind == "conv1d" else nn.Linear(24, 20, bias=kind == "linear_bias")
    model = nn.Sequential()
    model.add_module("proj", layer.requires_grad_(False))
    torch.manual_seed(2)
    return peftkit.adapt(model, spec.replace("]", ",init_weights=false,target_modules=proj]"))


SPECS = {"lora": "lora[r=4,alpha=8]", "dora": "lora[r=4,alpha=8,use_dora=true]", "lokr": "lokr[r=2,alpha=4]"}
FUSED_NODES = {"lora": "_LoraFnBackward", "dora": "_DoraFnBackward", "lokr": "_LokrFnBackward"}


def _node_under_view(out: torch.Tensor) -> str:
    node = out.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).double()


def _trained(method: str, adapter: nn.Module) -> list[torch.Tensor]:
    if method == "lokr":
        return [p for p in adapter.parameters() if p.requires_grad]
    return [adapter.lora_A, adapter.lora_B] + ([adapter.lora_magnitude_vector] if method == "dora" else [])


def _formula(method: str, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer's output in float64 on the operands autocast gives the products (rounded to ``dtype``):
    W x + b + update; DoRA rescales by m / ||W + s B A|| (the norm from the float32 tensors, detached, as
    the layer computes it), m / n rounded to ``dtype`` as the layer's output dtype."""
    base, adapter = layer.base_layer, layer.adapters["default"]
    weight = base.weight.t() if type(base).__name__ == "Conv1D" else base.weight
    w, xr = _rounded(weight, dtype), x.to(dtype).double()  # x rounded, its gradient flowing through
    bias = None if base.bias is None else _rounded(base.bias, dtype)
    if method == "lokr":
        w1 = adapter.lokr_w1 if adapter.shapes.full_w1 else adapter.lokr_w1_a @ adapter.lokr_w1_b
        w2 = adapter.lokr_w2_a.to(dtype).double() @ adapter.lokr_w2_b.to(dtype).double()
        update = xr @ torch.kron(w1.to(dtype).double(), w2).t() * adapter.scale
    else:
        a = adapter.lora_A.to(dtype).double()
        b = adapter.lora_B.to(dtype).double()
        update = (xr @ a.t()) @ b.t() * adapter.scale
    out = xr @ w.t() + update
    if method == "dora":
        norm = (weight.double() + adapter.scale * adapter.lora_B.double() @ adapter.lora_A.double()).norm(dim=1)
        out = out * (adapter.lora_magnitude_vector.double() / norm.detach()).to(dtype).double()
    return out if bias is None else out + bias


def _close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    assert (got.double() - expected).abs().max() <= 3e-2 * scale, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["lora", "dora", "lokr"])
@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d"])
def test_a_training_step_under_autocast_takes_the_fused_node_in_autocasts_dtype(method: str, kind: str,
                                                                               dtype: torch.dtype, device: str) -> None:
    """On the CPU and, where there is one, on a GPU (cuBLAS's half-precision products)."""
    model = _model(kind, SPECS[method]).to(device)
    model.train()
    layer = model.base_model.proj
    adapter = layer.adapters["default"]
    trained = _trained(method, adapter)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    seed = torch.randn(3, 5, 20, device=device)
    with torch.autocast(device, dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    assert _node_under_view(out) == FUSED_NODES[method]
    grads = torch.autograd.grad(out, [x, *trained], seed.to(dtype))
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)  # each its tensor's own dtype

    expected = _formula(method, layer, x, dtype)
    _close(out, expected, "output")
    expected_grads = torch.autograd.grad(expected, [x, *trained], seed.to(dtype).double(), allow_unused=True)
    for name, got, want in zip(["x", *range(len(trained))], grads, expected_grads):
        _close(got, want, f"gradient of {name}")


@pytest.mark.parametrize("method", ["lora", "dora", "lokr"])
def test_inference_under_autocast_matches_the_training_node(method: str) -> None:
    model = _model("linear_bias", SPECS[method])
    layer = model.base_model.proj
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = layer(x)
        with torch.no_grad():
            inferred = layer(x)
    assert inferred.grad_fn is None and inferred.dtype == torch.bfloat16
    torch.testing.assert_close(inferred, trained.detach(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("method", ["lora", "dora", "lokr"])
def test_backward_keeps_the_float32_weight_not_a_half_precision_copy(method: str) -> None:
    """Autocast's own linear keeps the bfloat16 copy of a frozen weight for backward (a copy of every adapted
    layer's weight alive until backward); the fused node keeps the float32 weight it already holds and
    casts it again in backward."""
    model = _model("linear_bias", SPECS[method])
    model.train()
    layer = model.base_model.proj
    weight = layer.base_layer.weight
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    x = torch.randn(8, 24, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert _node_under_view(out) == FUSED_NODES[method]
    assert any(t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for t in kept)
    assert not [t for t in kept if t.dtype == torch.bfloat16 and t.numel() >= weight.numel()]


def test_fusable_linear_under_autocast_takes_what_autocast_casts() -> None:
    layer = nn.Linear(6, 5).requires_grad_(False)
    factor = torch.zeros(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusable_linear(layer, torch.randn(3, 6), factor)
        assert fusable_linear(layer, torch.randn(3, 6, dtype=torch.bfloat16), factor)  # any dtype autocast casts
        assert not fusable_linear(layer, torch.randn(3, 6, dtype=torch.float64), factor)  # autocast leaves float64
        assert not fusable_linear(layer.double(), torch.randn(3, 6, dtype=torch.float64), factor.double())
        assert not fusable_linear(nn.Linear(6, 5), torch.randn(3, 6), factor)  # a trained weight
    assert not fusable_linear(nn.Linear(6, 5).requires_grad_(False), torch.randn(3, 6, dtype=torch.bfloat16),
                              factor)  # autocast off: the input's dtype must be the weight's


def test_a_float64_model_under_autocast_takes_the_unfused_path() -> None:
    """Autocast leaves float64 tensors as they are, and so does the layer: the unfused path runs."""
    model = _model("linear_bias", SPECS["lora"]).double()
    model.train()
    layer = model.base_model.proj
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float64 and _node_under_view(out) not in FUSED_NODES.values()
