"""VB-LoRA's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, ConfigError, option


@dataclass
class VBLoRAConfig(AdapterConfig):
    """VB-LoRA: W x + B A x, A and B mixed from a shared vector bank (arXiv 2405.15179).

    One bank of ``num_vectors`` vectors of ``vector_length`` entries trains for the whole adapter.
    Each adapted layer trains logits: A (r x in) is cut into r * in / vector_length pieces and B
    (out x r) into out / vector_length * r pieces, each piece the softmax-weighted sum of the
    ``topk`` bank vectors with the largest logits. Field names and defaults are Hugging Face
    PEFT's ``VBLoRAConfig``'s.

    vector_length must divide every adapted layer's input and output size. The bank starts
    uniform in +-init_vector_bank_bound and the logits normal with init_logits_std, both random,
    so the adapted model differs from the base from the start (as in PEFT).
    save_only_topk_weights: save only each piece's top-k indices and weights (a much smaller
    file); such a folder serves inference and merging, not further training.
    """

    method: ClassVar[str] = "vblora"

    r: int = option(4, help="rank of the low-rank factors A (r x in) and B (out x r)")
    num_vectors: int = option(256, help="vectors in the adapter's shared bank (more for larger models)")
    vector_length: int = option(
        256, help="entries per bank vector; must divide the input and output size of every adapted layer")
    topk: int = option(2, help="bank vectors mixed into each piece of A and B (those with the largest logits)")
    save_only_topk_weights: bool = option(
        False, help="save only the top-k indices and weights of the logits (smaller; such a folder cannot be "
                    "trained further)")
    vblora_dropout: float = option(0.0, help="dropout on the layer input of the update, in [0, 1)")
    init_vector_bank_bound: float = option(
        0.02, help="the bank starts uniform in [-bound, bound] (avoid 0: the gradients would be zero)")
    init_logits_std: float = option(0.1, help="standard deviation of the logits' normal initialization")

    def check(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"vblora config: {name}={getattr(self, name)} must be a positive integer")
        if self.topk > self.num_vectors:
            raise ConfigError(f"vblora config: topk={self.topk} is more than num_vectors={self.num_vectors}; "
                              f"each piece mixes topk of the bank's vectors: lower topk or raise num_vectors")
        if not 0.0 <= self.vblora_dropout < 1.0:
            raise ConfigError(f"vblora config: vblora_dropout={self.vblora_dropout} must be in [0, 1)")
        if self.init_vector_bank_bound < 0:
            raise ConfigError(f"vblora config: init_vector_bank_bound={self.init_vector_bank_bound} must be "
                              f"non-negative (the bank starts uniform in [-bound, bound])")
        if self.init_logits_std < 0:
            raise ConfigError(f"vblora config: init_logits_std={self.init_logits_std} must be non-negative "
                              f"(a standard deviation)")
