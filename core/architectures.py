"""Model families: insertion points, and the default target modules methods add per family.

This module is itself a plugin (entry point ``builtin_architectures``): other
plugins add families, or extend one with defaults for their own method, via
``peftkit_register_architectures``. Names are module-name suffixes (as in
``target_modules``); insertion points are regexes matched in full against
module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .hookspecs import PLUGIN_API_VERSION, hookimpl

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION


@dataclass(frozen=True)
class ArchitectureSpec:
    """What peftkit knows about one transformers ``model_type``.

    Attributes:
      model_type: transformers' ``config.model_type`` ("llama", "bert", ...).
      defaults: method name -> default ``target_modules`` (suffix list). Each
        method's plugin registers its own (LoRA's and IA3's plugins do), so the
        core's table below holds only insertion points.
      points: insertion point name -> regex over module names. The built-in
        points are ``attention`` (self-attention modules), ``attention_output``
        (attention output projection), ``ffn_input`` (module whose input is
        the feed-forward block's input), ``ffn_output`` (feed-forward output
        projection), for encoder-decoder models ``cross_attention_output``
        (the decoder's cross-attention output projection), and for the BERT
        family ``embedding_output`` (the last module of the embedding block,
        whose output is the hidden states the first layer reads; see
        core/output_points.py).
      layer_pattern: regex whose group 1 is the transformer layer index.
    """

    model_type: str
    defaults: dict[str, tuple[str, ...]] = field(default_factory=dict)
    points: dict[str, str] = field(default_factory=dict)
    layer_pattern: str = r".*\.(?:layers|layer|h|block|blocks)\.(\d+)(?:\..*)?"

    def default_targets(self, method: str) -> tuple[str, ...] | None:
        return self.defaults.get(method)

    def extended_by(self, other: "ArchitectureSpec") -> "ArchitectureSpec":
        """A spec with ``other``'s entries added (``other`` wins on conflicts)."""
        return ArchitectureSpec(
            model_type=self.model_type,
            defaults={**self.defaults, **other.defaults},
            points={**self.points, **other.points},
            layer_pattern=other.layer_pattern if other.layer_pattern != ArchitectureSpec.layer_pattern
            else self.layer_pattern,
        )


def _decoder(model_type: str) -> ArchitectureSpec:
    return ArchitectureSpec(
        model_type,
        points={
            "attention": r".*\.layers\.\d+\.self_attn",
            "attention_output": r".*\.layers\.\d+\.self_attn\.o_proj",
            "ffn_input": r".*\.layers\.\d+\.mlp",
            "ffn_output": r".*\.layers\.\d+\.mlp\.down_proj",
        },
    )


def _bert_like(model_type: str) -> ArchitectureSpec:
    return ArchitectureSpec(
        model_type,
        points={
            "attention": r".*\.layer\.\d+\.attention\.self",
            "attention_output": r".*\.layer\.\d+\.attention\.output\.dense",
            "ffn_input": r".*\.layer\.\d+\.intermediate",
            "ffn_output": r".*\.layer\.\d+\.output\.dense",
            "embedding_output": r"(?:.*\.)?embeddings\.dropout",
        },
    )


BUILTIN_ARCHITECTURES: list[ArchitectureSpec] = [
    *(_decoder(t) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")),
    *(_bert_like(t) for t in ("bert", "roberta", "xlm-roberta", "electra")),
    ArchitectureSpec(
        "gpt2",
        points={
            "attention": r".*\.h\.\d+\.attn",
            "attention_output": r".*\.h\.\d+\.attn\.c_proj",
            "ffn_input": r".*\.h\.\d+\.mlp",
            "ffn_output": r".*\.h\.\d+\.mlp\.c_proj",
        },
    ),
    ArchitectureSpec(
        "t5",
        points={
            "attention": r".*\.block\.\d+\.layer\.0\.SelfAttention",
            "attention_output": r".*\.block\.\d+\.layer\.0\.SelfAttention\.o",
            "ffn_input": r".*\.block\.\d+\.layer\.\d+\.DenseReluDense",
            "ffn_output": r".*\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
            "cross_attention_output": r".*\.block\.\d+\.layer\.1\.EncDecAttention\.o",
        },
        # The block index, not the sub-layer index in "block.3.layer.1" (encoder and decoder alike).
        layer_pattern=r".*\.block\.(\d+)(?:\..*)?",
    ),
    ArchitectureSpec(
        "vit",
        points={
            "attention": r".*\.layer\.\d+\.attention\.attention",
            "attention_output": r".*\.layer\.\d+\.attention\.output\.dense",
            "ffn_input": r".*\.layer\.\d+\.intermediate",
            "ffn_output": r".*\.layer\.\d+\.output\.dense",
        },
    ),
]


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    for spec in BUILTIN_ARCHITECTURES:
        register(spec)
