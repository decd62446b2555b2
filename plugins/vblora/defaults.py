"""VB-LoRA's default target modules where PEFT's table differs from LoRA's (every other family takes
LoRA's defaults, as in PEFT). Torch-free."""

from __future__ import annotations

_ENCODER_DECODER = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

#: transformers ``model_type`` -> default ``target_modules``.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": _ENCODER_DECODER,
    "opt": _ENCODER_DECODER,
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
}
