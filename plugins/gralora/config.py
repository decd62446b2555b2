"""GraLoRA's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option

@dataclass
class GraloraConfig(AdapterConfig):
    """GraLoRA: W x + alpha / (r + hybrid_r) * (G x + B_h A_h x), arXiv 2505.20355.

    The layer's (out, in) weight change G is cut into gralora_k x gralora_k blocks, block (j, n) mapping input
    block n to output block j with a low-rank pair of its own of rank r / gralora_k: as many parameters as a
    rank-r LoRA, a change of rank up to r * gralora_k. With hybrid_r > 0 a plain LoRA of rank hybrid_r
    (B_h A_h) is added. ``init_weights=true`` starts every B at zero (the adapted model equals the base); false
    draws them like A (for tests). Field names and defaults are Hugging Face PEFT's ``GraloraConfig``'s.
    """

    method: ClassVar[str] = "gralora"

    exclude_modules: Union[list[str], str, None] = option(
        None, help="not supported by gralora (PEFT's GraloraConfig has no such field, so PEFT would adapt those "
                   "layers): name the layers to adapt in target_modules")
    r: int = option(32, help="rank of each input block's A (a multiple of gralora_k); each of the k x k blocks "
                             "has rank r / gralora_k, the parameters are a rank-r LoRA's")
    hybrid_r: int = option(0, help="rank of a plain LoRA added to the block update (0: none); the scale is "
                                   "alpha / (r + hybrid_r)")
    alpha: float = option(64, help="scaling numerator: the update is scaled by alpha / (r + hybrid_r)")
    gralora_dropout: float = option(0.0, help="dropout on the update's input while training, in [0, 1)")
    gralora_k: int = option(2, help="the weight is cut into gralora_k x gralora_k blocks; it must divide r and "
                                    "every adapted layer's in and out features")
    init_weights: bool = option(True, help="true starts every B at zero (the adapted model equals the base); "
                                           "false draws them like A (kaiming uniform; for tests)")

    def check(self) -> None:
        _check_int("r", self.r, minimum=1, meaning="the rank of each input block's A")
        _check_int("gralora_k", self.gralora_k, minimum=1, meaning="the number of blocks per side")
        _check_int("hybrid_r", self.hybrid_r, minimum=0, meaning="the rank of the plain LoRA part; 0 for none")
        if self.r % self.gralora_k:
            raise ConfigError(f"gralora config: r={self.r} is not a multiple of gralora_k={self.gralora_k} (each of "
                              f"the k x k blocks has rank r / gralora_k); choose r as a multiple of gralora_k (e.g. "
                              f"r={self.r + self.gralora_k - self.r % self.gralora_k}) or a gralora_k dividing "
                              f"r={self.r}")
        if not 0.0 <= self.gralora_dropout < 1.0:
            raise ConfigError(f"gralora config: gralora_dropout={self.gralora_dropout!r} must be at least 0 and "
                              f"below 1 (a dropout probability)")
        if self.exclude_modules is not None:
            raise ConfigError(f"gralora config: exclude_modules={self.exclude_modules!r} is not supported (PEFT's "
                              f"GraloraConfig has no such field, so PEFT would adapt those layers too); name the "
                              f"layers to adapt in target_modules instead (a list, or a regex that leaves the "
                              f"others out)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(f"gralora config: layers_to_transform={self.layers_to_transform!r} cannot be used with "
                              f"target_modules given as one string ({self.target_modules!r}): PEFT ignores the layer "
                              f"indices then and would adapt every layer it matches; give target_modules as a list "
                              f"of names, or put the layer indices in a regex")


def _check_int(name: str, value: object, *, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "an integer of at least 0"
        raise ConfigError(f"gralora config: {name}={value!r} must be {kind} ({meaning})")
