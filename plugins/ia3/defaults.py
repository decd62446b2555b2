"""IA3's default target modules and feed-forward modules per model family (PEFT's choice: keys,
values and the feed-forward output), registered through ``peftkit_register_architectures``.
Torch-free."""

from __future__ import annotations

#: The ArchitectureSpec.defaults key of IA3's feed-forward modules (scaled on their input).
FEEDFORWARD_KEY = "ia3_feedforward"

_DECODER = (("k_proj", "v_proj", "down_proj"), ("down_proj",))
_BERT_LIKE = (("key", "value", "intermediate.dense"), ("intermediate.dense",))

#: transformers ``model_type`` -> (default ``target_modules``, default ``feedforward_modules``).
DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _DECODER),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT_LIKE),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    "vit": (("key", "value", "output.dense"), ("output.dense",)),
}
