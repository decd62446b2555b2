"""The configs of VeRA and PVeRA (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from peftkit.plugin_api import AdapterConfig, option, ConfigError


@dataclass
class SharedProjectionConfig(AdapterConfig):
    """The options VeRA and PVeRA share: frozen random projections A and B drawn once per adapter from a
    seed, and two trained vectors per layer (lambda_d on A's side, lambda_b on the output)."""

    #: the name of the method's dropout option (PEFT names it after the method)
    dropout_option: ClassVar[str] = ""

    r: int = option(256, help='inner size of the shared random projections (costs only r parameters per layer)')
    projection_prng_key: int = option(0, help='seed the shared projections are drawn from')
    save_projection: bool = option(
        True, help='save the projections in the weights file (without them a load redraws them from the seed)')
    d_initial: float = option(0.1, help='starting value of every lambda_d entry (lambda_b starts at zero)')
    init_weights: bool = option(
        True, help='true starts as the identity; false starts lambda_b at one and lambda_d random (for tests)')

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"{self.method} config: r={self.r} must be a positive integer")
        dropout = getattr(self, self.dropout_option)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{self.method} config: {self.dropout_option}={dropout} must be in [0, 1)")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"{self.method} config: projection_prng_key={self.projection_prng_key!r} must be an "
                              f"integer (the seed of the shared random projections)")


@dataclass
class VeraConfig(SharedProjectionConfig):
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
    dropout_option: ClassVar[str] = "vera_dropout"

    vera_dropout: float = option(0.0, help='dropout on the layer input of the update, in [0, 1)')


@dataclass
class PveraConfig(SharedProjectionConfig):
    """PVeRA, probabilistic VeRA (arXiv 2512.07703): VeRA whose down-projection gives a mean and a
    log-variance, W x + lambda_b * B z with z ~ N(mu, exp(logvar)), (mu, logvar) = lambda_d * A x.

    A is (2r, in): its first r rows give the mean, the last r the log-variance;
    B is (out, r). In training z is sampled (the reparametrization trick, so the
    vectors get gradients through the noise); in eval z is the mean, unless
    sample_at_inference. A merge folds in the mean. Field names and defaults
    are Hugging Face PEFT's ``PveraConfig``'s (PEFT's projection layout and
    draws, so files go both ways).

    pvera_dropout: dropout on the layer input of the update. sample_at_inference:
    sample z in eval mode too (outputs then vary from call to call).
    generator_seed: seed of each layer's own CPU generator for the noise (as
    PEFT seeds it: the same draws as PEFT's for the same seed); null draws from
    torch's global generator on the layer's device.
    """

    method: ClassVar[str] = "pvera"
    dropout_option: ClassVar[str] = "pvera_dropout"

    pvera_dropout: float = option(0.0, help='dropout on the layer input of the update, in [0, 1)')
    sample_at_inference: bool = option(
        False, help='sample from the learned distribution in eval mode too (false: use its mean)')
    generator_seed: Optional[int] = option(
        None, help="seed of each layer's CPU generator for the noise (null: torch's global generator)")

    def check(self) -> None:
        super().check()
        seed = self.generator_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ConfigError(f"pvera config: generator_seed={seed!r} must be an integer or null (the seed of the "
                              f"noise each layer draws)")
