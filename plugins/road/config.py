"""RoAd's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option, refuse_fields_peft_lacks

#: Trained numbers per output feature, per tensor (road_theta and road_alpha each), for each variant.
NUMBERS_PER_OUTPUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoadConfig(AdapterConfig):
    """RoAd: the layer's output rotated in 2D pairs and scaled, ``R (W x + b)`` (arXiv 2409.00119).

    The output features are cut into groups of ``group_size``; in each group, element i is paired with
    element i + group_size / 2, and each pair (a, b) becomes ``(f_a a - s_a b, s_b a + f_b b)`` with
    ``f = alpha cos(theta)`` and ``s = alpha sin(theta)``: a 2D rotation by the angle theta scaled by alpha.
    ``variant`` says how many (theta, alpha) the layer trains: road_1 one per pair (out / 2 of each), road_2
    one per element (out), road_4 separate ones for f and s (2 * out). ``group_size`` must be even and divide
    the output width of every adapted layer. ``init_weights=true`` starts at theta 0, alpha 1 (the base model);
    false draws theta ~ N(0, 0.5) and alpha ~ N(1, 0.5) (for tests). Merging multiplies the weight and the
    bias by the block-diagonal R. Field names and defaults are Hugging Face PEFT's ``RoadConfig``'s.
    """

    method: ClassVar[str] = "road"

    exclude_modules: Union[list[str], str, None] = option(
        None, help="not supported by road (PEFT's RoadConfig has no such field, so PEFT would adapt those layers): "
                   "name the layers to adapt in target_modules")
    layers_to_transform: Union[list[int], int, None] = option(
        None, help="not supported by road (PEFT's RoadConfig has no such field, so PEFT would adapt every layer): "
                   "name the layers to adapt in target_modules (a list, or a regex matching only their names)")
    variant: Literal["road_1", "road_2", "road_4"] = option(
        "road_1", help="road_1: one angle and scale per pair of output elements (out / 2 of each per layer); "
                       "road_2: one per element (out); road_4: two per element (2 * out)")
    group_size: int = option(
        64, help="output elements are paired within groups of this size (element i with i + group_size / 2): "
                 "even, and dividing the output width of every adapted layer")
    init_weights: bool = option(
        True, help="true starts at angle 0 and scale 1 (the adapted model equals the base); false draws angles "
                   "from N(0, 0.5) and scales from N(1, 0.5) (for tests)")

    def check(self) -> None:
        if isinstance(self.group_size, bool) or self.group_size <= 0 or self.group_size % 2:
            raise ConfigError(f"road config: group_size={self.group_size!r} must be a positive even integer (each "
                              f"group pairs its first half with its second half); e.g. group_size=64")
        refuse_fields_peft_lacks(self, "RoadConfig")
