"""LoKr's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from peftkit.plugin_api import AdapterConfig, option, ConfigError


@dataclass
class LokrConfig(AdapterConfig):
    """Low-rank Kronecker product: W x + s * kron(w1, w2) x, s = alpha / r (LyCORIS; arXiv 2309.14859).

    Field names and defaults are Hugging Face PEFT's ``LoKrConfig``'s.

    r: rank of the factors that are decomposed (a factor is kept as a full
    matrix when r is at least half its larger side). alpha: scaling numerator.
    rank_dropout: during training, drop output rows of the update with this
    probability; rank_dropout_scale: rescale the kept rows by 1 / (kept share).
    module_dropout: during training, skip the layer's update with this
    probability. use_effective_conv2d: on convolutions with a kernel larger
    than 1, decompose w2 as a Tucker (CP) product with a small (r, r, *kernel)
    core. decompose_both: decompose w1 into two rank-r factors too.
    decompose_factor: split each of the layer's dimensions into a factor near
    this number and the rest (-1: near the square root). init_weights: True
    (w1 starts at zero), "lycoris" (w2 starts at zero), False (everything
    random; for tests). rank_pattern / alpha_pattern: per-module overrides,
    keys are regexes matched against the end of module names (PEFT's rule).
    """

    method: ClassVar[str] = "lokr"

    r: int = option(
        8, help='rank of the decomposed factors (a factor stays full when r is at least half its larger side)')
    alpha: float = option(8, help='scaling numerator: the update is scaled by alpha / r')
    rank_dropout: float = option(0.0, help='during training, drop output rows of the update with this probability')
    module_dropout: float = option(0.0, help="during training, skip a layer's whole update with this probability")
    use_effective_conv2d: bool = option(
        False, help='on convolutions with a kernel larger than 1, decompose w2 as a Tucker (CP) product with an (r, r, *kernel) core')
    decompose_both: bool = option(False, help='decompose w1 into two rank-r factors too')
    decompose_factor: int = option(
        -1, help='split each layer dimension into a factor near this number and the rest (-1: near the square root)')
    rank_dropout_scale: bool = option(False, help='with rank_dropout, rescale the kept rows by 1 / (kept share)')
    init_weights: Union[bool, Literal["lycoris"]] = option(
        True, help='true starts w1 at zero, "lycoris" starts w2 at zero, false draws everything at random (for tests)')
    rank_pattern: dict[str, int] = option(
        default_factory=dict, help='per-module rank overrides: regex keys matched at the end of module names')
    alpha_pattern: dict[str, float] = option(
        default_factory=dict, help='per-module alpha overrides: regex keys matched at the end of module names')

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lokr config: r={self.r} must be a positive integer")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"lokr config: {key}={value} must be in [0, 1)")
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise ConfigError(f"lokr config: decompose_factor={self.decompose_factor} must be -1 (split each "
                              f"dimension near its square root) or a positive integer")
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"lokr config: rank_pattern[{key!r}]={rank} must be a positive integer")
