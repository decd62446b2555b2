"""BEFT's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from peftkit.plugin_api import AdapterConfig, option, refuse_fields_peft_lacks


@dataclass
class BeftConfig(AdapterConfig):
    """BEFT: a trained vector b added to each adapted Linear layer's output, ``W x + b0 + b`` (the layer's own
    bias b0 stays frozen; PEFT's ``beft_bias``, one (1, out) vector per layer).

    ``init_weights=true`` starts at zero (the base model); false draws b from N(0, 1) (for tests). Merging adds
    b to the layer's bias; a layer without a bias cannot take it (PEFT refuses it too), so such a merge is
    refused by name. Field names and defaults are Hugging Face PEFT's ``BeftConfig``'s.
    """

    method: ClassVar[str] = "beft"

    exclude_modules: Union[list[str], str, None] = option(
        None, help="not supported by beft (PEFT's BeftConfig has no such field, so PEFT would adapt those layers): "
                   "name the layers to adapt in target_modules")
    layers_to_transform: Union[list[int], int, None] = option(
        None, help="not supported by beft (PEFT's BeftConfig has no such field, so PEFT would adapt every layer): "
                   "name the layers to adapt in target_modules (a list, or a regex matching only their names)")
    init_weights: bool = option(
        True, help="true starts every bias vector at zero (the adapted model equals the base); false draws them "
                   "from N(0, 1) (for tests)")

    def check(self) -> None:
        refuse_fields_peft_lacks(self, "BeftConfig")
