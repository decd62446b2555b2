"""What peftkit needs to know of a layer it wraps: its shape and layout, and whether its weights are
quantized (bitsandbytes' 4-bit and 8-bit layers, or any layer whose weight is not a float tensor).

Adapters on a quantized layer read only its output (and input), never its weight: LoRA adds
``s B A x`` to what the quantized layer computes (QLoRA), in float32 parameters. Whatever needs
the weight itself (merging into it, DoRA's row norms) is refused on such layers with the reason.
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: Friendly names of the quantized layer classes met most often.
_KNOWN = {"Linear4bit": "4-bit (bitsandbytes)", "Linear8bitLt": "8-bit (bitsandbytes)"}


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer storing its weight as (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer, quantized ones included (whose packed
    weight has another shape), or of the layer a wrapper holds as ``base_layer`` (an adapted site)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    if is_conv1d(module):
        weight = module.weight
        return int(weight.shape[0]), int(weight.shape[1])
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    weight = module.weight
    return int(weight.shape[1]), int(weight.shape[0])


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The float weight as (out, in), whatever layout the layer stores (callers check quantization)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly ``x W^T + b`` with frozen float tensors: a torch Linear or
    transformers Conv1D itself (not a subclass: quantized layers subclass Linear) whose weight and bias
    take no gradient. An adapter alone at such a layer may compute its output itself or add to it
    in place (``LayerAdapter.forward_alone``)."""
    if type(module) is not nn.Linear and not is_conv1d(module):
        return False
    weight, bias = module.weight, getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.requires_grad:
        return False
    return bias is None or not bias.requires_grad


#: The dtypes autocast casts to its lower precision for a matrix product (it leaves float64 as it is).
AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def fusable_linear(base: nn.Module, x: torch.Tensor, factor: torch.Tensor) -> bool:
    """Whether an adapter with parameter ``factor`` alone at ``base`` may compute the layer's whole output on
    ``x`` itself (``LayerAdapter.forward_alone``, one fused operation) and get what the unfused layer gets:
    ``base`` is a :func:`plain_linear` layer on ``x``'s device and ``x`` has at least 2 dimensions, and

    - with autocast off on ``x``'s device: ``x`` has the weight's dtype and ``factor`` has it too or is
      :func:`adapter_precision` of it (float32 factors on a half-precision layer: their products then run
      in float32, as the unfused layer runs them);
    - under autocast: ``x``, the weight and ``factor`` are tensors autocast casts (float32, float16,
      bfloat16); the fused operation then computes in autocast's dtype
      (``torch.get_autocast_dtype``), as autocast runs the unfused layer's products.
    """
    if not plain_linear(base):
        return False
    weight = base.weight
    if x.dim() < 2 or x.device != weight.device:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return all(t.dtype in AUTOCAST_CASTS for t in (x, weight, factor))
    return x.dtype == weight.dtype and factor.dtype in (weight.dtype, adapter_precision(weight.dtype))


def accumulating_gemm_is_fast(tensor: torch.Tensor) -> bool:
    """Whether a matrix product of ``tensor``'s dtype and device that adds onto an existing output (``addmm``
    with beta = 1 into it) costs about what a product writing a new output costs, so a fused path may let
    the base product accumulate onto the update's: true in float32/float64 and on GPUs; false for bfloat16
    and float16 on the CPU, where such a product runs 5-10% slower than ``mm`` (2 threads, 512 tokens,
    512-1376 wide layers; measured against computing the base product first and adding a low-rank update
    into it in place, which is then the faster order)."""
    return tensor.element_size() >= 4 or tensor.device.type != "cpu"


def quantization_of(module: nn.Module) -> str | None:
    """How ``module``'s weight is quantized ("4-bit (bitsandbytes)", ...), or None for a float weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype.is_floating_point:
        return None
    name = type(module).__name__
    return _KNOWN.get(name, f"{name} with {str(weight.dtype).replace('torch.', '')} weights")


def quantized_kind(module: nn.Module) -> str | None:
    """:func:`quantization_of`, also for a bitsandbytes layer that still holds a float weight it quantizes later
    (transformers leaves a new head so on the CPU: it is quantized only when it goes through ``.to(device)``)."""
    kind = quantization_of(module)
    if kind is None and type(module).__module__.startswith("bitsandbytes."):
        kind = f"bitsandbytes {type(module).__name__}"
    return kind


def quantized_part(module: nn.Module, prefix: str = "") -> tuple[str, str] | None:
    """The first layer inside ``module`` (itself included) that :func:`quantized_kind` finds quantized, as
    (its name under ``prefix``, how), or None."""
    return next(((name, kind) for name, part in module.named_modules(prefix=prefix)
                 if (kind := quantized_kind(part)) is not None), None)


def adapter_precision(dtype: torch.dtype) -> torch.dtype:
    """The dtype adapters train and compute in beside tensors of ``dtype``: float32 and float64 stay,
    anything else (half precision, quantized storage) becomes float32, as PEFT does."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of an adapter's parameters on ``module``: :func:`adapter_precision` of its weight's
    (float32 for a module without a weight)."""
    weight = getattr(module, "weight", None)
    return adapter_precision(weight.dtype) if isinstance(weight, torch.Tensor) else torch.float32


def packed_for_cpu_inference(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes 4-bit layers of ``model`` whose weight bitsandbytes has repacked for its CPU
    inference kernel (see :func:`unpack_for_training`)."""
    seen: set[int] = set()
    layers = []
    for module in model.modules():
        weight = module._parameters.get("weight")  # its own weight (a wrapper's .weight property is its base's)
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False) and id(weight) not in seen:
            seen.add(id(weight))
            layers.append(module)
    return layers


def unpack_for_training(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference packing of 4-bit weights; returns how many layers it changed.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight for a bfloat16 kernel the
    first time the layer runs in eval mode, and keeps that layout after ``model.train()``. That kernel
    has no backward, so gradients through the layer (to every adapter before it) come out wrong after
    any evaluation. peftkit calls this when an AdaptedModel is put in training mode.
    """
    layers = packed_for_cpu_inference(model)
    if not layers:
        return 0
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in layers:
        weight = module.weight
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        state = weight.quant_state
        if not getattr(state, "original_nested", True) and state.absmax.dim() == 2:
            # bitsandbytes 0.50 restores the scales' layout for double-quantized weights only: without double
            # quantization (transformers' default) they stayed (blocks, out) in bfloat16 and were read as if
            # flat, so every weight was dequantized with another block's scale
            state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = state
    return len(layers)


def to_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype``: itself when it has that dtype already (a no-op ``.to()`` still costs a
    dispatch, about 1 us, which a decoding step pays per layer), None for None (an absent bias)."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def kept_scaled_transpose(owner: nn.Module, factor: torch.Tensor, scale: float) -> torch.Tensor:
    """``factor.t() * scale`` for a forward without gradients, kept on ``owner`` between calls until
    ``factor`` (its values or its storage) or ``scale`` changes.

    Decoding token by token calls each adapted layer once a token on one row, where scaling a small factor
    (a kernel and an allocation) is a sixth of a layer's time. The result has the layout the forward with
    gradients computes (a transposed view of a contiguous tensor), so both give the same numbers. ``.to()``
    and ``.data =`` give a factor new storage without moving its version counter, so the storage's address
    is part of the key, and the kept entry holds the storage it was made from: it cannot be freed and its
    address handed to the factor's new storage. Under torch.compile the product is part of the graph
    (reading the storage's address would break the graph at every layer)."""
    if torch.compiler.is_compiling():
        return factor.t() * scale
    key = (factor._version, factor.data_ptr(), scale)
    kept = owner.__dict__.setdefault("_kept_scaled_transposes", {})
    entry = kept.get(id(factor))
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, factor.t() * scale, factor.untyped_storage())
        kept[id(factor)] = entry
    return entry[1]
