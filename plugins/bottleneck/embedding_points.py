"""Where the embedding output can be read, for invertible adapters (torch-free).

AdapterHub's invertible adapter transforms the output of the model's embedding block. peftkit
adapts a module's output, so the point names the last module of that block that is called with
the hidden states alone: BERT's embedding dropout (after its LayerNorm), GPT-2's dropout after the
token and position embeddings, Llama's token embedding. Registered as the architecture point
``embedding_output`` by this plugin.
"""

from __future__ import annotations

from peftkit.plugin_api import ArchitectureSpec

EMBEDDING_POINT = "embedding_output"

_PATTERNS = {
    **{t: r"(?:.*\.)?embeddings\.dropout" for t in ("bert", "roberta", "xlm-roberta", "electra")},
    "gpt2": r"(?:.*\.)?transformer\.drop|drop",
    "llama": r"(?:.*\.)?embed_tokens",
}


def embedding_point_specs() -> list[ArchitectureSpec]:
    """The families whose embedding output peftkit knows, as architecture specs adding that point."""
    return [ArchitectureSpec(model_type, points={EMBEDDING_POINT: pattern}) for model_type, pattern in _PATTERNS.items()]


def embedding_model_types() -> list[str]:
    return sorted(_PATTERNS)
