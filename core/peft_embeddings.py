"""The base embedding weights PEFT puts in an adapter file.

PEFT's ``save_pretrained`` (``save_embedding_layers="auto"``, its default)
also writes the *base* weights of the model's input and output embeddings
when the adapter's ``target_modules`` names ``embed_tokens`` or ``lm_head``,
keyed ``base_model.model.<module>.base_layer.weight`` (a vocabulary may have
been resized or new tokens trained). Loading such a file puts those weights
into the model, replacing its own. peftkit writes them under the same
condition and loads them the same way.

PEFT also writes them, for any method, when the model's vocabulary differs
from the one in its base model's ``config.json`` (found locally or on the
Hub): then an embedding that carries no adapter is keyed
``<module>.weight``, and the embedding of a LoRA that trains token rows
(``trainable_token_indices``) ``<module>.token_adapter.base_layer.weight``.
peftkit loads those as well; it does not write them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn as nn

from .errors import AdapterLoadError, PeftkitError
from .inspect_folder import BASE_WEIGHT_INFIX
from .layer import TunerLayer

if TYPE_CHECKING:  # pragma: no cover
    from .adapted_protocol import AdaptedModelProtocol

#: The module names PEFT's "auto" rule looks for in target_modules.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
#: Where PEFT keys an embedding's base weights when a LoRA trains rows of it (trainable_token_indices).
PEFT_TOKEN_ROWS_BASE_INFIX = ".token_adapter.base_layer."


def targets_embeddings(target_modules: Any, model: nn.Module) -> bool:
    """PEFT's test: a list naming ``embed_tokens`` or ``lm_head``, or a regex matching such a module."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return False
        suffix = re.compile(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$")
        return any(suffix.match(key) and re.fullmatch(target_modules, key) for key, _ in model.named_modules())
    return bool(target_modules) and any(name in target_modules for name in EMBEDDING_LAYER_NAMES)


def _embedding_modules(base_model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(module path, module)`` of the model's input and output embeddings, once each (a tied pair is two
    modules sharing one weight)."""
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(base_model, getter)() if hasattr(base_model, getter) else None
        except (AttributeError, NotImplementedError):
            layer = None
        if layer is not None:
            wanted.append(layer)
    for path, module in base_model.named_modules():
        if any(module is layer for layer in wanted):
            yield path, module


def _wrapped_embeddings(base_model: nn.Module) -> Iterator[tuple[str, TunerLayer]]:
    """``(module path, layer)`` of the input and output embeddings that carry adapters."""
    for path, module in _embedding_modules(base_model):
        if isinstance(module, TunerLayer) and isinstance(module.base_layer, (nn.Linear, nn.Embedding)):
            yield path, module


def _embedding_weight_holders(base_model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Each file-key prefix (after ``base_model.model.``) under which PEFT may save an embedding's base weights
    -> (the embedding's module path, the module holding those weights). An embedding copied whole by an
    adapter (``modules_to_save``) has none: its ``<module>.weight`` is that adapter's."""
    holders: dict[str, tuple[str, nn.Module]] = {}
    for path, module in _embedding_modules(base_model):
        if isinstance(module, TunerLayer) and isinstance(module.base_layer, (nn.Linear, nn.Embedding)):
            for infix in (BASE_WEIGHT_INFIX, PEFT_TOKEN_ROWS_BASE_INFIX):
                holders[f"{path}{infix}"] = (path, module.base_layer)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            holders[f"{path}."] = (path, module)
    return holders


def embedding_base_tensors(model: "AdaptedModelProtocol", target_modules: Any, key_prefix: str) -> dict[str,
                           torch.Tensor]:
    """The base embedding tensors PEFT would save beside an adapter with ``target_modules``."""
    if not targets_embeddings(target_modules, model.base_model):
        return {}
    out: dict[str, torch.Tensor] = {}
    for path, layer in _wrapped_embeddings(model.base_model):
        if layer.merged:
            raise PeftkitError(f"{path} has {', '.join(layer.merged)} merged into its weight, which the adapter "
                               f"file would carry as the base embedding (as PEFT saves it); unmerge first "
                               f"(model.unmerge_adapter()) and save again")
        for key, tensor in layer.base_layer.state_dict().items():
            out[f"{key_prefix}{path}{BASE_WEIGHT_INFIX}{key}"] = tensor
    return out


def take_embedding_base_tensors(model: "AdaptedModelProtocol", tensors: dict[str, torch.Tensor], key_prefix: str,
                                where: str) -> dict[tuple[str, str], torch.Tensor]:
    """Remove from ``tensors`` the base embedding weights a PEFT file may carry and return them as
    ``{(module path, tensor name): tensor}``, checked against the model's; the model is not changed."""
    holders = _embedding_weight_holders(model.base_model)
    taken: dict[tuple[str, str], torch.Tensor] = {}
    for file_key in [k for k in tensors if k.startswith(key_prefix)]:
        prefix, _, key = file_key[len(key_prefix):].rpartition(".")
        if f"{prefix}." not in holders:
            continue  # not an embedding's base weight: the adapter's own, or left for the unexpected-key check
        path, holder = holders[f"{prefix}."]
        own = holder.state_dict().get(key)
        if own is None:
            continue
        if tuple(own.shape) != tuple(tensors[file_key].shape):
            raise AdapterLoadError(
                f"{where}: the file carries the base weights of {path} with shape {tuple(tensors[file_key].shape)}, "
                f"but the model's are {tuple(own.shape)}; the vocabulary was resized when the adapter was trained: "
                f"resize the model's embeddings (model.resize_token_embeddings({tensors[file_key].shape[0]})) first")
        layer = model.base_model.get_submodule(path)
        if isinstance(layer, TunerLayer) and layer.merged:
            raise AdapterLoadError(f"{where}: the file replaces the base weights of {path}, which has "
                                   f"{', '.join(layer.merged)} merged in; unmerge first")
        taken[(path, key)] = tensors.pop(file_key)
    return taken


def load_embedding_base_tensors(model: "AdaptedModelProtocol", taken: dict[tuple[str, str], torch.Tensor]) -> None:
    """Copy the weights from :func:`take_embedding_base_tensors` into the model's embeddings, as PEFT does."""
    with torch.no_grad():
        for (path, key), tensor in taken.items():
            layer = model.base_model.get_submodule(path)
            wrapped = isinstance(layer, TunerLayer)
            target = (layer.base_layer if wrapped else layer).state_dict(keep_vars=True)[key]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            for adapter in (layer.adapters.values() if wrapped else ()):
                adapter.base_changed()  # e.g. DoRA's cached weight norms
