"""BitFit's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, option


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit (Ben Zaken et al., arXiv 2106.10199): train only bias terms.

    Each adapter keeps its own bias *deltas* (the base biases stay frozen), so
    several BitFit adapters live on one model, switch, save (deltas only) and
    merge (delta added to the base bias).

    target_modules: None adapts every bias of the model, as the paper does:
      those of Linear and Conv1D layers, LayerNorms, Conv1d/2d/3d, GroupNorm
      and BatchNorm, but not the output head (train a head via
      modules_to_save). A list, a regex or "all-linear" adapts the biases of
      the matching modules only.
    add_missing: Linear/Conv1D layers without a bias (Llama, Mistral, ...)
      get a zero-initialized trainable one; merging then creates the bias
      parameter on the base layer (unmerge removes it again).
    init_weights: True starts every delta at zero (the adapted model equals
      the base); False draws them at random (for tests).
    """

    method: ClassVar[str] = "bitfit"

    add_missing: bool = option(
        False, help='give Linear/Conv1D layers without a bias a zero-initialized trainable one (merging then adds a bias to the base layer)')
    init_weights: bool = option(
        True, help='true starts every bias delta at zero (the model equals the base); false draws them at random (for tests)')
