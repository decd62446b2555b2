"""LoRA's ``trainable_token_indices`` (PEFT's): chosen rows of the input embedding (or of the embeddings a table
names) are trained with the LoRA, in the same adapter.

The rows are the trainable_tokens method's work, so LoRA asks the registry for that method and uses its sites,
its shared state (the new rows once per embedding, which a tied output layer reads too) and its modules, each
wrapped here as ``token_adapter`` so that the file keys are PEFT's for a LoRA:
``<embedding>.token_adapter.trainable_tokens_delta``. A tied output layer (``tie_word_embeddings``) reads the
input embedding's rows and saves nothing of its own, as PEFT's LoRA saves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from peftkit.plugin_api import AdapterLoadError, ConfigError, get_method, LayerAdapter, Site

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from .config import LoraConfig

#: The method whose modules train the rows.
TOKENS_METHOD = "trainable_tokens"
#: The submodule name PEFT gives the rows' module inside a LoRA (the prefix of its file keys).
TOKEN_ADAPTER = "token_adapter"


@dataclass(frozen=True)
class TokenPartSite(Site):
    """An embedding (or output layer) whose rows the LoRA trains: ``part`` is the trainable_tokens method's
    site there."""

    part: Any = None


def token_sites(model: "nn.Module", config: "LoraConfig", arch: Any, lora_sites: list[Site]) -> list[Site]:
    """The sites of ``config.trainable_token_indices``; refused where a LoRA layer or modules_to_save already
    takes the module (PEFT refuses the latter too)."""
    _check_ids_fit(model, config)
    try:
        parts = get_method(TOKENS_METHOD).sites(model, config.tokens_config(), arch)
    except ConfigError as exc:  # name LoRA's option, not the method doing the work
        raise ConfigError(f"lora: trainable_token_indices: {exc}") from None
    adapted = {site.name for site in lora_sites}
    for part in parts:
        if part.name in adapted:
            raise ConfigError(f"lora: {part.name} is both a LoRA target and a module whose rows "
                              f"trainable_token_indices trains; leave it out of target_modules (exclude_modules) "
                              f"or out of trainable_token_indices")
        saved = config.modules_to_save or []
        if any(part.name == name or part.name.endswith("." + name) for name in saved):
            raise ConfigError(f"lora: {part.name} is in modules_to_save (trained whole) and in "
                              f"trainable_token_indices (some rows trained); name it in one of them, as in PEFT")
    return [TokenPartSite(part.name, input_from=part.input_from, role=part.role, part=part) for part in parts]


def _check_ids_fit(model: "nn.Module", config: "LoraConfig") -> None:
    """Refuse ids (a list: the input embedding's) past the embedding's rows, saying how to resize it: the usual
    cause is a base model loaded without the tokens the adapter was trained with."""
    from peftkit.plugin_api import base_of

    ids = config.trainable_token_indices
    get_input = getattr(model, "get_input_embeddings", None)
    if not isinstance(ids, list) or not ids or not callable(get_input) or get_input() is None:
        return
    rows = base_of(get_input()).weight.shape[0]
    if max(ids) >= rows:
        raise ConfigError(f"lora: trainable_token_indices {sorted(i for i in ids if i >= rows)} are past the input "
                          f"embedding's {rows} rows (tokens added to a tokenizer need rows in the model): resize it "
                          f"first, model.resize_token_embeddings(len(tokenizer)) with the tokenizer the adapter is "
                          f"trained or was trained with (at least {max(ids) + 1} rows); to load a saved adapter, "
                          f"pass the resized model object (to peftkit.load too, in place of a model path)")


def parts_of(sites: list[Site]) -> list[Site]:
    """The trainable_tokens method's sites among ``sites``."""
    return [site.part for site in sites if isinstance(site, TokenPartSite)]


def token_shared_state(model: "nn.Module", config: "LoraConfig", sites: list[Site]) -> "dict[str, torch.Tensor]":
    """The rows (and the original rows) of every embedding the LoRA trains rows of; empty without any."""
    parts = parts_of(sites)
    return get_method(TOKENS_METHOD).create_shared_state(model, config.tokens_config(), parts) if parts else {}


def token_parameter_count(model: "nn.Module", config: "LoraConfig", sites: list[Site]) -> int:
    parts = parts_of(sites)
    return get_method(TOKENS_METHOD).expected_parameter_count(model, config.tokens_config(), parts) if parts else 0


def token_layer(site: TokenPartSite, base_layer: "nn.Module", config: "LoraConfig",
                model: "nn.Module") -> "LoraTokenRows":
    rows = get_method(TOKENS_METHOD).create_layer_adapter(site.part, base_layer, config.tokens_config(), model)
    return LoraTokenRows(rows, tied=bool(getattr(site.part, "tied", False)))


class LoraTokenRows(LayerAdapter):
    """The trainable_tokens module at one site of a LoRA, as ``token_adapter``: it runs, merges and hot-swaps as
    that module does; its tensors carry PEFT's ``token_adapter.`` prefix, and none at a tied output layer."""

    additive = False
    merges_tied_weight = True  # the rows are written, not added: a tied partner writes the same values

    def __init__(self, rows: LayerAdapter, tied: bool) -> None:
        super().__init__()
        self.token_adapter = rows
        self.tied = tied

    def bind_shared(self, shared: "nn.Module | None") -> None:
        super().bind_shared(shared)
        self.token_adapter.bind_shared(shared)

    def forward(self, x: "torch.Tensor", h: "torch.Tensor", base: "nn.Module") -> "torch.Tensor":
        return self.token_adapter(x, h, base)

    def delta(self, x: "torch.Tensor", h: "torch.Tensor", base: "nn.Module") -> "torch.Tensor":
        return self.token_adapter.delta(x, h, base)

    def merge(self, base: "nn.Module") -> None:
        self.token_adapter.merge(base)

    def unmerge(self, base: "nn.Module") -> None:
        self.token_adapter.unmerge(base)

    def tensors(self) -> "dict[str, torch.Tensor]":
        if self.tied:
            return {}
        return {f"{TOKEN_ADAPTER}.{key}": value for key, value in self.token_adapter.tensors().items()}

    def tensors_from_file(self, saved: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """At a tied output layer, PEFT's file holds the input embedding's rows again when it also saved the
        embeddings (``save_embedding_layers``: a resized vocabulary): a copy of what the embedding loads,
        dropped here."""
        if not self.tied:
            return saved
        return {key: value for key, value in saved.items() if not key.startswith(f"{TOKEN_ADAPTER}.")}

    def hotswap_plan(self, new: LayerAdapter) -> Callable[[], None]:
        if not isinstance(new, LoraTokenRows):
            raise AdapterLoadError(f"the folder's module here is a {type(new).__name__}, the loaded adapter trains "
                                   f"token rows here; load the folder as an adapter of its own instead: "
                                   f"load_adapter(path, 'another_name')")
        return self.token_adapter.hotswap_plan(new.token_adapter)

    def extra_repr(self) -> str:
        return "tied" if self.tied else ""
