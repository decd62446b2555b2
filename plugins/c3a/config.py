"""C3A's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option

#: The named initializations of the kernels (PEFT's); true starts them at zero, false is "xavier_uniform".
INITS = ("xavier_uniform", "kaiming_uniform", "gaussian")


@dataclass
class C3AConfig(AdapterConfig):
    """C3A: W x + (1 / in) * C x, C block-circulant (arXiv 2407.19342).

    The (out, in) weight change is cut into (block_size, block_size) blocks, each a circulant matrix given by
    one trained vector of block_size numbers (``c3a_kernel``, (out / block_size, in / block_size, block_size)
    per layer), so a layer trains out * in / block_size numbers. block_size must divide both the input and the
    output width of every adapted layer; block_size_pattern gives some layers another one (regex keys matched at
    the end of module names, PEFT's rule). init_weights: "xavier_uniform" (PEFT's default; false means the same)
    and "kaiming_uniform" draw the kernels from a uniform distribution, "gaussian" from a standard normal, so
    the model changes from the start; true starts them at zero (the adapted model equals the base). Field names
    and defaults are Hugging Face PEFT's ``C3AConfig``'s.
    """

    method: ClassVar[str] = "c3a"

    exclude_modules: Union[list[str], str, None] = option(
        None, help="not supported by c3a (PEFT's C3AConfig has no such field, so PEFT would adapt those layers): "
                   "name the layers to adapt in target_modules")
    block_size: int = option(
        256, help="size of the circulant blocks: must divide the input and output widths of every adapted layer "
                  "(larger trains fewer numbers: out * in / block_size per layer)")
    block_size_pattern: dict[str, int] = option(
        default_factory=dict, help="per-module block_size overrides: regex keys matched at the end of module names")
    init_weights: Union[bool, Literal["xavier_uniform", "kaiming_uniform", "gaussian"]] = option(
        "xavier_uniform", help='"xavier_uniform" (PEFT\'s default; false is the same), "kaiming_uniform" or '
                               '"gaussian" draw the kernels at random; true starts them at zero, so the adapted model '
                               'starts as the base')

    def check(self) -> None:
        _check_block_size("block_size", self.block_size)
        for key, value in self.block_size_pattern.items():
            _check_block_size(f"block_size_pattern[{key!r}]", value)
        if self.exclude_modules is not None:
            raise ConfigError(f"c3a config: exclude_modules={self.exclude_modules!r} is not supported (PEFT's C3A has "
                              f"no such field, so PEFT would adapt the excluded layers too); name the layers to adapt "
                              f"in target_modules instead (a list, or a regex that leaves the others out)")


def _check_block_size(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"c3a config: {label}={value!r} must be a positive integer (a divisor of the input and "
                          f"output widths of the layers it applies to)")
