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
