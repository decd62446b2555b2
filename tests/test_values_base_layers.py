"""The dtype rule of the plugin API (core/base_layers.py): adapters keep float32 and float64, and train and
compute in float32 beside half-precision or quantized tensors, as PEFT does."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from peftkit.plugin_api import adapter_dtype, adapter_precision


@pytest.mark.parametrize("dtype, expected", [
    (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32), (torch.uint8, torch.float32), (torch.int8, torch.float32),
])
def test_adapter_precision_keeps_float32_and_float64_and_lifts_the_rest_to_float32(dtype, expected) -> None:
    assert adapter_precision(dtype) == expected


@pytest.mark.parametrize("dtype, expected", [
    (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
])
def test_adapter_dtype_follows_the_weight_and_is_float32_without_one(dtype, expected) -> None:
    assert adapter_dtype(nn.Linear(3, 2, dtype=dtype)) == expected
    assert adapter_dtype(nn.ReLU()) == torch.float32
    frozen_int = nn.Linear(3, 2)
    frozen_int.weight = nn.Parameter(torch.zeros(2, 3, dtype=torch.int8), requires_grad=False)
    assert adapter_dtype(frozen_int) == torch.float32


@pytest.mark.parametrize("arch, site, expected", [
    ("gpt2", "transformer.h.0.attn.c_attn", (32, 96)),  # Conv1D stores its weight (in, out)
    ("llama", "model.layers.0.self_attn.v_proj", (32, 16)),
])
def test_linear_features_of_an_adapted_site_are_those_of_the_layer_it_wraps(arch, site, expected) -> None:
    """A plugin's expected_parameter_count reads a site after injection, when it is peftkit's TunerLayer."""
    import peftkit
    from peftkit.plugin_api import base_of, linear_features
    from tests.tiny_models import build_tiny

    model = peftkit.adapt(build_tiny(arch), "lora")
    wrapped = model.base_model.get_submodule(site)
    assert wrapped is not base_of(wrapped)
    assert linear_features(wrapped) == linear_features(base_of(wrapped)) == expected
