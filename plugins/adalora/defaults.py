"""AdaLoRA's default target modules per model family (PEFT's table for AdaLoRA, which differs from
LoRA's for RoBERTa and T5), registered through ``peftkit_register_architectures``. Families not
listed here take LoRA's defaults. Torch-free."""

from __future__ import annotations

_DECODER = ("q_proj", "v_proj")

#: transformers ``model_type`` -> default ``target_modules``.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "qwen2", "qwen3", "gemma", "gemma2"), _DECODER),
    "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"),
    "gpt2": ("c_attn",),
    "t5": ("q", "k", "v", "o", "wi", "wo"),
}
