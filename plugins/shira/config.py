"""SHiRA's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option

#: The one mask peftkit draws: PEFT's random mask (a seeded random permutation of the weight's positions).
RANDOM_MASK = "random"

#: How to use a mask PEFT computes with a Python function (for error messages and the docs).
CUSTOM_MASK_FIX = ("build the adapter with PEFT (ShiraConfig(mask_type=...), config.mask_fn = your function, "
                   "get_peft_model), save it with save_pretrained and load that folder in peftkit: the folder "
                   "holds the mask's positions (shira_indices), which peftkit reads whatever mask_type says")


@dataclass
class ShiraConfig(AdapterConfig):
    """SHiRA: W x + S x, S a sparse (out, in) matrix trained at r * (in + out) fixed positions (arXiv 2406.13175).

    Each adapted layer trains ``shira_weight``, one number per position of its mask, as many as a rank-r LoRA
    (r * (in + out); the change is not of rank r). The positions (``shira_indices``, (2, count): rows, then
    columns) are PEFT's random mask: a random permutation of the out * in positions drawn by a torch generator
    seeded with random_seed (an unseeded generator when null: the same positions every time), of which the first
    r * (in + out) are kept. init_weights true starts the values at zero (the adapted model equals the base);
    false draws them from a standard normal (for tests). Field names and defaults are Hugging Face PEFT's
    ``ShiraConfig``'s; PEFT's custom ``mask_fn`` (a Python function) has no peftkit equivalent: see
    docs/methods/shira.md.
    """

    method: ClassVar[str] = "shira"

    exclude_modules: Union[list[str], str, None] = option(
        None, help="not supported by shira (PEFT's ShiraConfig has no such field, so PEFT would adapt those "
                   "layers): name the layers to adapt in target_modules")
    layers_to_transform: Union[list[int], int, None] = option(
        None, help="not supported by shira (PEFT's ShiraConfig has no such field, so PEFT would adapt every "
                   "layer): name the layers to adapt in target_modules (a regex)")
    r: int = option(32, help="sets the number of trained values per layer, r * (in + out) as a rank-r LoRA "
                             "(the change itself is not of rank r)")
    mask_type: str = option(RANDOM_MASK, help='"random": PEFT\'s random sparse mask; any other value only loads '
                                              "a folder that holds its mask (PEFT's custom mask_fn)")
    random_seed: Optional[int] = option(None, help="seed of the torch generator drawing the random mask (null: "
                                                   "an unseeded generator, which draws the same mask every time)")
    init_weights: bool = option(True, help="true starts the values at zero (the adapted model equals the base); "
                                           "false draws them from a standard normal (for tests)")

    def check(self) -> None:
        if isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"shira config: r={self.r!r} must be a positive integer (each layer trains "
                              f"r * (in + out) values)")
        for name in ("exclude_modules", "layers_to_transform"):
            if getattr(self, name) is not None:
                raise ConfigError(f"shira config: {name}={getattr(self, name)!r} is not supported (PEFT's "
                                  f"ShiraConfig has no such field, so PEFT would adapt those layers too); name "
                                  f"the layers to adapt in target_modules instead (a list, or a regex that leaves "
                                  f"the others out)")

    @property
    def mask_fn(self) -> None:
        """PEFT's ``config.mask_fn``: peftkit has none (a Python function cannot be saved with the adapter)."""
        return None

    @mask_fn.setter
    def mask_fn(self, value: Any) -> None:
        raise ConfigError(f"shira config: mask_fn={value!r} cannot be set: peftkit draws only PEFT's random mask "
                          f"(mask_type='random', seeded by random_seed). For a mask of your own, {CUSTOM_MASK_FIX}")
