"""MiSS's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option

#: The string values of ``init_weights``: MiSS's two other variants (True and False are the default one).
VARIANTS = ("bat", "mini")


@dataclass
class MissConfig(AdapterConfig):
    """MiSS, matrix shard sharing (PEFT's ``MissConfig``, arXiv 2409.15371; PEFT's former Bone).

    The layer's input features are cut into shards of ``r`` (the last one zero-padded); one trained block
    is shared by all shards. Field names and defaults are PEFT's.

    - ``init_weights=true`` (the default, MiSS "balance"): a block D (r, out); the update is
      ``(sum of the input's shards) @ D``, i.e. ``W[o, i] += D[i mod r, o]``. Starts at zero.
    - ``init_weights="mini"``: D (r, mini_r) repeated ``out / mini_r`` times along the outputs (fewer
      parameters; out_features must be a multiple of ``mini_r``).
    - ``init_weights="bat"``: one (r, r) block B per group of r output rows; each (r, r) block of the weight
      becomes ``W_blk (I + B) + B``, an update that reads the weight (in and out features multiples of r;
      no dropout, as in PEFT).
    - ``init_weights=false``: the default variant started at random (for tests).

    miss_dropout: dropout on the input of the update (not with "bat", as in PEFT).
    """

    method: ClassVar[str] = "miss"

    r: int = option(64, help="shard size: the input features are cut into shards of r that share one trained block")
    miss_dropout: float = option(0.0, help='dropout on the input of the update, in [0, 1) (unused by "bat")')
    mini_r: int = option(1, help='with init_weights="mini": the block\'s width, repeated out_features / mini_r times')
    init_weights: Union[bool, str] = option(
        True, help='true (MiSS "balance": starts at zero), "bat" (block-wise W (I + B) + B), "mini" (a narrow '
                   'block repeated over the outputs) or false (random; for tests)')

    def check(self) -> None:
        if isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"miss config: r={self.r} must be a positive integer (the shard size)")
        if not 0.0 <= self.miss_dropout < 1.0:
            raise ConfigError(f"miss config: miss_dropout={self.miss_dropout} must be in [0, 1)")
        if isinstance(self.mini_r, bool) or self.mini_r <= 0:
            raise ConfigError(f"miss config: mini_r={self.mini_r} must be a positive integer")
        if isinstance(self.init_weights, str) and self.init_weights not in VARIANTS:
            raise ConfigError(f"miss config: init_weights={self.init_weights!r} is not a MiSS variant; use true "
                              f"(the default), false, \"bat\" or \"mini\"")

    @property
    def variant(self) -> str:
        """ "balance" (init_weights true or false), "bat" or "mini"."""
        return self.init_weights if isinstance(self.init_weights, str) else "balance"
