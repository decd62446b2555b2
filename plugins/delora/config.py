"""DeLoRA's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, ConfigError, option


@dataclass
class DeloraConfig(AdapterConfig):
    """DeLoRA: W x + B diag(lambda / r / (|A_i| |B^i|)) A (w * x), arXiv 2503.18225.

    Each rank-one term of a LoRA-like update B A (A_i row i of A, B^i column i of B) is scaled to norm
    lambda / r, so the update's Frobenius norm is bounded by a trained lambda (one number per layer, starting
    at ``delora_lambda``) whatever A and B grow to; the input is scaled by the norms of the base
    weight's columns, taken when the adapter is created and saved with it (``delora_w_norm``).
    ``init_weights=true`` starts B at zero (the adapted model equals the base); false draws it like A. Field
    names and defaults are Hugging Face PEFT's ``DeloraConfig``'s.
    """

    method: ClassVar[str] = "delora"

    r: int = option(8, help="rank of the update (the number of normalized rank-one terms)")
    delora_lambda: float = option(
        15.0, help="initial value of each layer's trained lambda, the bound on the Frobenius norm of the update "
                   "(before the column-norm scaling of the input)")
    module_dropout: float = option(
        0.0, help="dropout on the update's input while training (PEFT's name; PEFT drops input elements, not "
                  "whole modules)")
    rank_pattern: dict[str, int] = option(
        default_factory=dict, help="per-module r overrides: regex keys matched at the end of module names")
    lambda_pattern: dict[str, float] = option(
        default_factory=dict, help="per-module delora_lambda overrides: regex keys matched at the end of module names")
    init_weights: bool = option(
        True, help="true starts B at zero, so the adapted model starts as the base; false draws B like A "
                   "(kaiming uniform), changing the model from the start")

    def check(self) -> None:
        _check_rank("r", self.r)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in {"delora_lambda": self.delora_lambda, **{f"lambda_pattern[{k!r}]": v for k, v in
                                                                   self.lambda_pattern.items()}}.items():
            if not math.isfinite(value):
                raise ConfigError(f"delora config: {key}={value!r} must be a finite number (the initial bound on "
                                  f"the update's norm; PEFT's default is 15)")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"delora config: module_dropout={self.module_dropout!r} must be at least 0 and below 1 "
                              f"(a dropout probability)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(f"delora config: layers_to_transform={self.layers_to_transform!r} cannot be used with "
                              f"target_modules given as one string ({self.target_modules!r}; PEFT's DeloraConfig "
                              f"refuses the pair): give target_modules as a list of names, or put the layer indices "
                              f"in the regex")


def _check_rank(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"delora config: {label}={value!r} must be a positive integer (the update's rank)")
