"""IA3's config (torch-free), with PEFT's field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from peftkit.plugin_api import AdapterConfig, option, ConfigError


@dataclass
class IA3Config(AdapterConfig):
    """(IA)^3 (Liu et al., arXiv 2205.05638): learned vectors that rescale activations.

    A target layer's output is multiplied by a vector l (``ia3_l``, shape
    (out, 1)); a feed-forward target's *input* is multiplied instead (shape
    (1, in)). The vectors start at one, so the model starts equal to the base.

    target_modules: None takes the architecture's default (e.g. k_proj,
      v_proj, down_proj for Llama).
    feedforward_modules: the targets whose input is scaled: a list (a name
      matches when it ends with an entry, PEFT's rule) or a regex. It must be
      a subset of target_modules when both are lists. None takes the
      architecture's default (e.g. down_proj), or none for an unknown model.
    fan_in_fan_out: written for PEFT's sake; peftkit reads the layout from the
      layer (GPT-2's Conv1D stores (in, out)) and sets it when saving.
    init_ia3_weights: True starts at ones; False draws the vectors from a
      standard normal (as PEFT does; for tests).
    """

    method: ClassVar[str] = "ia3"

    feedforward_modules: Union[list[str], str, None] = option(
        None, help="targets whose input (not output) is scaled: names (matched at the end) or a regex, a subset of target_modules; null takes the architecture's default")
    fan_in_fan_out: bool = option(
        False, help="written for PEFT's sake; peftkit reads the weight layout from the layer and sets it when saving")
    init_ia3_weights: bool = option(True, help="true starts the vectors at one (the model equals the base); false draws them from a standard normal (for tests)")

    def check(self) -> None:
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list):
            extra = sorted(set(ff) - set(targets))
            if extra:
                raise ConfigError(f"ia3 config: feedforward_modules lists {extra}, which target_modules "
                                  f"({targets}) does not; feedforward modules must be targets too")
