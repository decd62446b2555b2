"""BEFT's default target modules per model family: the attention's value projection, as Hugging Face PEFT
chooses them for its BEFT. Torch-free."""

from __future__ import annotations

_VALUE_PROJ = ("v_proj",)

#: transformers ``model_type`` -> default ``target_modules``.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("t5", "mt5"), ("v",)),
    **dict.fromkeys(("bert", "roberta"), ("value",)),
    **dict.fromkeys(("opt", "gptj", "gpt_neo", "bart", "llama", "llama4", "mistral", "mixtral", "phi", "gemma",
                     "gemma2", "gemma3_text", "qwen2", "qwen3"), _VALUE_PROJ),
    "deberta-v2": ("value_proj",),
}
