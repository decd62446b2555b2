"""The model types adaption prompts support (PEFT's table: Llama, Mistral, GPT-2), and for each the attribute
name of the attention module in a decoder layer and how that attention computes its queries. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionKind:
    """How one model type's attention is adapted.

    module: the attention module's attribute name in each layer (PEFT's default ``target_modules``).
    fused: whether one projection (``c_attn``) gives queries, keys and values together (GPT-2), rather than
      ``q_proj``/``k_proj``/``v_proj`` with rotary position embeddings and an output projection (Llama).
    """

    module: str
    fused: bool


#: transformers ``model_type`` -> its attention, for the model types PEFT's adaption prompts support.
MODEL_TYPES: dict[str, AttentionKind] = {
    "llama": AttentionKind("self_attn", fused=False),
    "mistral": AttentionKind("self_attn", fused=False),
    "gpt2": AttentionKind("attn", fused=True),
}
