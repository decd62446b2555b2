"""GLoRA's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option, refuse_fields_peft_lacks


@dataclass
class GloraConfig(AdapterConfig):
    """GLoRA (generalized LoRA, arXiv 2306.07967): ``W' = W + W * A + B`` and ``b' = b + b * D + E + W C`` at
    each adapted Linear layer (``*`` element-wise), each of A to E shaped by its option.

    config_A_B: A and B as "lora" (a rank-r product, (out, r) @ (r, in)), "vector" (one value per output,
    (out, 1)), "constant" (one number) or "none". config_C: C (in, 1) as "lora" (rank r), "vector" or "none".
    config_D_E: D and E as "vector" (out), "constant" or "none". C, D and E act on the layer's bias: a layer
    without one gets none of them. ``init_weights=true`` starts as the base model (the "lora" paths' second
    factors and every other path at zero); false draws every path (for tests). Field names and defaults are
    Hugging Face PEFT's ``GloraConfig``'s.
    """

    method: ClassVar[str] = "glora"

    exclude_modules: Union[list[str], str, None] = option(
        None, help="not supported by glora (PEFT's GloraConfig has no such field, so PEFT would adapt those "
                   "layers): name the layers to adapt in target_modules")
    layers_to_transform: Union[list[int], int, None] = option(
        None, help="not supported by glora (PEFT's GloraConfig has no such field, so PEFT would adapt every "
                   "layer): name the layers to adapt in target_modules (a list, or a regex matching only their names)")
    r: int = option(8, help='rank of the paths set to "lora"')
    config_A_B: Literal["lora", "vector", "constant", "none"] = option(
        "lora", help="A (scales W element-wise) and B (added to W): lora (rank r), vector (out), constant or none")
    config_C: Literal["lora", "vector", "none"] = option(
        "lora", help="C (in, 1), adding W C to the bias: lora (rank r), vector or none")
    config_D_E: Literal["vector", "constant", "none"] = option(
        "constant", help="D (scales the bias) and E (added to it): vector (out), constant or none")
    init_weights: bool = option(
        True, help="true starts as the base model; false draws every path (for tests)")

    def check(self) -> None:
        if isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"glora config: r={self.r!r} must be a positive integer (the rank of the lora paths)")
        refuse_fields_peft_lacks(self, "GloraConfig")
