"""LN tuning's default target modules per model family: the normalization layers (PEFT's table where it has
one; the BERT family, which PEFT leaves to the user, by its ``LayerNorm`` modules). Torch-free."""

from __future__ import annotations

_DECODER = ("input_layernorm", "post_attention_layernorm", "norm")

#: transformers ``model_type`` -> default ``target_modules``.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "gemma"), _DECODER),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"),
    **dict.fromkeys(("qwen2", "qwen3"), ("post_attention_layernorm",)),
    "phi3": _DECODER,
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "t5": ("layer_norm", "final_layer_norm"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ("LayerNorm",)),
}
