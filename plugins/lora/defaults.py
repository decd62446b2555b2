"""LoRA's default target modules per model family (PEFT's choice: the attention query and value
projections), registered through ``peftkit_register_architectures``. Torch-free."""

from __future__ import annotations

_DECODER = ("q_proj", "v_proj")
_BERT_LIKE = ("query", "value")

#: transformers ``model_type`` -> default ``target_modules``.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _DECODER),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "vit"), _BERT_LIKE),
    "gpt2": ("c_attn",),
    "t5": ("q", "v"),
}
