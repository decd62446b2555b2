"""FourierFT's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, ConfigError, option


@dataclass
class FourierFTConfig(AdapterConfig):
    """FourierFT: W x + s * Re(IDFT2(S)) x (arXiv 2405.03003).

    S is an (out, in) spectrum that is zero except at ``n_frequency`` entries, whose values are
    the trained parameters (``fourierft_spectrum``); the entries' positions are drawn once from
    ``random_loc_seed`` (the same positions for every layer of one shape, as in PEFT), so a file
    holds only the values. Field names and defaults are Hugging Face PEFT's ``FourierFTConfig``'s.

    n_frequency: trained coefficients per layer (at most out * in of the layer). scaling: s, the
    factor on the inverse transform (PEFT's guidance: 100-150 for RoBERTa, 300 for Llama and ViT).
    random_loc_seed: the seed of the spectral positions. init_weights: False (PEFT's default) draws
    the coefficients from a standard normal, so the model changes from the start; True starts them
    at zero (the adapted model equals the base). n_frequency_pattern: per-module overrides (regex
    keys matched at the end of module names, PEFT's rule).
    """

    method: ClassVar[str] = "fourierft"

    n_frequency: int = option(
        1000, help="trained spectral coefficients per layer (at most out * in of each adapted layer)")
    scaling: float = option(150.0, help="factor on the inverse Fourier transform of the spectrum (like lora_alpha)")
    random_loc_seed: int = option(777, help="seed the positions of the spectral coefficients are drawn from")
    init_weights: bool = option(
        False, help="false draws the coefficients from a standard normal (PEFT's default); true starts them at "
                    "zero, so the adapted model starts as the base")
    n_frequency_pattern: dict[str, int] = option(
        default_factory=dict, help="per-module n_frequency overrides: regex keys matched at the end of module names")

    def check(self) -> None:
        if self.n_frequency <= 0:
            raise ConfigError(f"fourierft config: n_frequency={self.n_frequency} must be a positive integer")
        for key, value in self.n_frequency_pattern.items():
            if value <= 0:
                raise ConfigError(f"fourierft config: n_frequency_pattern[{key!r}]={value} must be a positive integer")
        if not -2 ** 63 <= self.random_loc_seed < 2 ** 64:
            raise ConfigError(f"fourierft config: random_loc_seed={self.random_loc_seed} must be an integer in "
                              f"[-2**63, 2**64) (a seed of torch's generator, which draws the spectral positions)")
