"""VeRA's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, option, ConfigError


@dataclass
class VeraConfig(AdapterConfig):
    """VeRA: W x + lambda_b * B (lambda_d * A x) (arXiv 2310.11454).

    A (r, in) and B (out, r) are frozen random matrices shared by every layer of
    the adapter (slices of one pair sized for the largest layer); only the
    vectors lambda_d (r) and lambda_b (out) train at each layer. Field names and
    defaults are Hugging Face PEFT's ``VeraConfig``'s.

    r: the projections' inner size (larger than a LoRA rank: it costs only r
    parameters per layer). projection_prng_key: the seed the projections are
    drawn from, so an adapter saved without them is recreated the same.
    save_projection: save the projections in the weights file
    (``base_model.vera_A`` / ``base_model.vera_B``); without them the file is
    small but a load relies on torch's CPU generator drawing the same numbers.
    vera_dropout: dropout on the layer input of the update. d_initial: the
    starting value of every lambda_d entry (lambda_b starts at zero, so the
    adapter starts as the identity). init_weights: False starts lambda_b at one
    and lambda_d random (for tests).
    """

    method: ClassVar[str] = "vera"

    r: int = option(256, help='inner size of the shared random projections (costs only r parameters per layer)')
    projection_prng_key: int = option(0, help='seed the shared projections are drawn from')
    save_projection: bool = option(
        True, help='save the projections in the weights file (without them a load redraws them from the seed)')
    vera_dropout: float = option(0.0, help='dropout on the layer input of the update, in [0, 1)')
    d_initial: float = option(0.1, help='starting value of every lambda_d entry (lambda_b starts at zero)')
    init_weights: bool = option(
        True, help='true starts as the identity; false starts lambda_b at one and lambda_d random (for tests)')

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"vera config: r={self.r} must be a positive integer")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ConfigError(f"vera config: vera_dropout={self.vera_dropout} must be in [0, 1)")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"vera config: projection_prng_key={self.projection_prng_key!r} must be an integer "
                              f"(the seed of the shared random projections)")
