"""HiRA's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option


@dataclass
class HiraConfig(AdapterConfig):
    """HiRA: W0 x + (W0 ⊙ B A) x, the frozen weight multiplied elementwise by a rank-r product (ICLR 2025).

    A is (r, in) and B (out, r), as LoRA's, but their product scales each element of the base weight W0 rather
    than adding to it, so the update W0 ⊙ B A can have a rank far above r. There is no alpha: the update is not
    scaled. ``init_weights=true`` draws A as torch's Linear weights (kaiming uniform) and starts B at zero (the
    adapted model equals the base); ``"gaussian"`` draws A from N(0, 1/r) instead; false leaves both at N(0, 1)
    (for tests). Embedding layers start A at zero and draw B from N(0, 1) for true and "gaussian" alike, as PEFT.
    Field names and defaults are Hugging Face PEFT's ``HiraConfig``'s.
    """

    method: ClassVar[str] = "hira"

    r: int = option(32, help="rank of A and B, whose product scales the base weight elementwise")
    hira_dropout: float = option(
        0.0, help="dropout on the update's input while training (Linear and Conv1D layers), in [0, 1)")
    fan_in_fan_out: bool = option(
        False, help="kept for PEFT's file: each layer's layout is read from its type (GPT-2's Conv1D stores "
                    "(in, out)), as PEFT does whatever this says")
    init_weights: Union[bool, Literal["gaussian"]] = option(
        True, help='true: A kaiming uniform, B = 0 (starts equal to the base); "gaussian": A from N(0, 1/r), B = 0; '
                   "false: A and B from N(0, 1) (for tests)")
    rank_pattern: dict[str, int] = option(
        default_factory=dict, help="must stay empty: PEFT's HiRA (0.21) creates every layer at r whatever this "
                                   "says, so it could not load a folder made with it")

    def check(self) -> None:
        _check_rank("r", self.r)
        if self.rank_pattern:
            raise ConfigError(f"hira config: rank_pattern={self.rank_pattern!r} is not supported: PEFT's HiRA "
                              f"(0.21) creates every layer at r whatever rank_pattern says, so PEFT could not load "
                              f"the folder; give every layer one r, or add a second hira adapter (another r) for "
                              f"the layers that need another rank")
        if not 0.0 <= self.hira_dropout < 1.0:
            raise ConfigError(f"hira config: hira_dropout={self.hira_dropout!r} must be at least 0 and below 1 "
                              f"(a dropout probability)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(f"hira config: layers_to_transform={self.layers_to_transform!r} cannot be used with "
                              f"target_modules given as one string ({self.target_modules!r}; PEFT's HiraConfig "
                              f"refuses the pair): give target_modules as a list of names, or put the layer indices "
                              f"in the regex")


def _check_rank(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"hira config: {label}={value!r} must be a positive integer (the rank of A and B)")
