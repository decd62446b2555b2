"""The default hot-swap plan of a layer adapter: check that another module's weights can replace
a loaded module's in place, and return the function that copies them.

:meth:`LayerAdapter.hotswap_plan <peftkit.core.layer.LayerAdapter.hotswap_plan>` and
:meth:`ModelAdapter.hotswap_plan <peftkit.core.layer.ModelAdapter.hotswap_plan>` use
:func:`swap_plan`; a method whose modules differ only by a scale on one tensor uses
:func:`scaled_swap_plan`. This module knows modules and tensors only: the model-wide
side of hot-swapping (reading the folder, comparing sites) is :mod:`peftkit.core.hotswap`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import AdapterLoadError

#: What to do when a folder does not fit the adapter it should replace.
LOAD_SEPARATELY = "load the folder as an adapter of its own instead: load_adapter(path, 'another_name')"


def swap_plan(slot: nn.Module, new: nn.Module) -> Callable[[], None]:
    """Check that ``new``'s weights can replace ``slot``'s in place; return the function that copies them.

    Low-rank modules on both sides take the factor path (lower rank zero-padded, scale folded into B);
    any other pair must be of one type with the same settings (:func:`settings_of`) and the same tensor
    keys and shapes. Raises AdapterLoadError naming the first difference, and how to proceed.
    """
    if type(slot) is not type(new):
        raise AdapterLoadError(f"the folder's module is a {type(new).__name__} and the loaded one a "
                               f"{type(slot).__name__}; {LOAD_SEPARATELY}")
    slot_factors, new_factors = low_rank_of(slot), low_rank_of(new)
    if slot_factors is not None and new_factors is not None:
        return _low_rank_plan(slot, new, slot_factors, new_factors)
    slot_tensors = slot.tensors()
    _check_live(slot, slot_tensors)  # first: a training form (prefix MLP) differs in settings too, less clearly
    _compare_settings(slot, new)
    return _tensor_plan(slot, new, slot_tensors, new.tensors())


def scaled_swap_plan(slot: nn.Module, new: nn.Module, scaled_key: str, scale_attr: str = "scale"
                     ) -> Callable[[], None]:
    """The plan for modules whose only difference may be a scale that multiplies one tensor alone (a LoRA's
    ``scale * B``, in DoRA and convolution forms too): the slot keeps its scale (a constant of compiled
    graphs) and receives ``tensors()[scaled_key] * (new scale / slot scale)``; everything else is compared and
    copied as in :func:`swap_plan`."""
    if type(slot) is not type(new):
        return swap_plan(slot, new)  # names the type difference
    s_slot, s_new = float(getattr(slot, scale_attr)), float(getattr(new, scale_attr))
    if s_slot == 0.0 and s_new != 0.0:
        raise AdapterLoadError(f"the loaded adapter's {scale_attr} is 0 (alpha=0), so no other {scale_attr} can be "
                               f"folded into its weights; {LOAD_SEPARATELY}")
    slot_tensors, new_tensors = slot.tensors(), new.tensors()
    _check_live(slot, slot_tensors)
    _compare_settings(slot, new, lambda ours, theirs: (ours, theirs) == (s_slot, s_new))
    copy_rest = _tensor_plan(slot, new, slot_tensors, new_tensors)
    ratio = s_new / s_slot if s_slot != 0.0 else 1.0
    target, source = slot_tensors[scaled_key], new_tensors[scaled_key]

    def copy() -> None:
        copy_rest()
        if ratio != 1.0:
            target.copy_(_wide(source) * ratio)
    return copy


def low_rank_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``module.low_rank()`` (its ``(A, B, scale)``), or None for a module without low-rank factors."""
    get = getattr(module, "low_rank", None)
    return get() if get is not None else None


def _low_rank_plan(slot: nn.Module, new: nn.Module, slot_factors: tuple, new_factors: tuple) -> Callable[[], None]:
    (a_slot, b_slot, s_slot), (a_new, b_new, s_new) = slot_factors, new_factors
    r_slot, r_new = a_slot.shape[0], a_new.shape[0]
    if a_slot.shape[1:] != a_new.shape[1:] or b_slot.shape[0] != b_new.shape[0]:
        raise AdapterLoadError(f"the folder's factors are {tuple(b_new.shape)} x {tuple(a_new.shape)} and the loaded "
                               f"ones {tuple(b_slot.shape)} x {tuple(a_slot.shape)}; {LOAD_SEPARATELY}")
    if r_new > r_slot:
        raise AdapterLoadError(f"the folder's adapter has rank {r_new} and the loaded one only {r_slot}; make room "
                               f"once, after loading the first adapter and before compiling: "
                               f"model.prepare_for_hotswap(target_rank={r_new}), or the highest rank you will swap in")
    if float(s_slot) == 0.0 and float(s_new) != 0.0:
        raise AdapterLoadError(f"the loaded adapter's scale is 0 (alpha=0), so no other scale can be folded into "
                               f"its weights; {LOAD_SEPARATELY}")

    def rank_or_scale(ours: Any, theirs: Any) -> bool:
        """A setting that differs only as the rank or the scale do (both are handled below)."""
        return (ours, theirs) == (r_slot, r_new) or (ours, theirs) == (s_slot, s_new)

    _compare_settings(slot, new, rank_or_scale)
    slot_tensors, new_tensors = slot.tensors(), new.tensors()
    key_a, key_b = _key_of(slot_tensors, a_slot, slot), _key_of(slot_tensors, b_slot, slot)
    if new_tensors.get(key_a) is not a_new or new_tensors.get(key_b) is not b_new:
        raise AdapterLoadError(f"{type(new).__name__}.low_rank() does not give the tensors {key_a} and {key_b} "
                               f"of its tensors(); its hotswap_plan() must be overridden")
    rest = _tensor_plan(slot, new, {k: t for k, t in slot_tensors.items() if k not in (key_a, key_b)},
                        {k: t for k, t in new_tensors.items() if k not in (key_a, key_b)})
    ratio = float(s_new) / float(s_slot) if float(s_slot) != 0.0 else 1.0
    _check_live(slot, {key_a: a_slot, key_b: b_slot})

    def copy() -> None:
        a_slot[:r_new].copy_(a_new)
        a_slot[r_new:].zero_()
        b_slot[:, :r_new].copy_(b_new if ratio == 1.0 else _wide(b_new) * ratio)
        b_slot[:, r_new:].zero_()
        rest()
    return copy


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is a half type, so that folding a scale into it rounds once."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _key_of(tensors: dict[str, torch.Tensor], tensor: torch.Tensor, module: nn.Module) -> str:
    for key, value in tensors.items():
        if value is tensor:
            return key
    raise AdapterLoadError(f"{type(module).__name__}.low_rank() gives a tensor that is not among its tensors(); "
                           f"its hotswap_plan() must be overridden")


def _tensor_plan(slot: nn.Module, new: nn.Module, ours: dict[str, torch.Tensor],
                 theirs: dict[str, torch.Tensor]) -> Callable[[], None]:
    for key in ours:
        if key not in theirs:
            raise AdapterLoadError(f"the loaded module has a tensor {key} and the folder's does not; {LOAD_SEPARATELY}")
    for key, value in theirs.items():
        if key not in ours:
            raise AdapterLoadError(f"the folder's module has a tensor {key} and the loaded one does not; "
                                   f"{LOAD_SEPARATELY}")
        if tuple(value.shape) != tuple(ours[key].shape):
            raise AdapterLoadError(f"{key} is {tuple(value.shape)} in the folder and {tuple(ours[key].shape)} in the "
                                   f"loaded adapter; {LOAD_SEPARATELY}")
    _check_live(slot, ours)

    def copy() -> None:
        for key, value in ours.items():
            value.copy_(theirs[key])
    return copy


def _check_live(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that are computed rather than held by ``module``: writing them would change nothing."""
    held = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    for key, value in tensors.items():
        if id(value) not in held:
            raise AdapterLoadError(f"its {key} is computed from other parameters rather than held, so it cannot be "
                                   f"overwritten in place (an adapter still in a training form, such as prefix "
                                   f"tuning's reparametrization MLP: call its eject() first)")


# -- settings ---------------------------------------------------------------------------------------


def settings_of(module: nn.Module) -> dict[str, Any]:
    """What decides a module's computation besides its tensors: the plain public attributes (numbers,
    strings, tuples, dataclasses) and the type of it and of each submodule. Dropout is left out: it acts
    in training only, and the loaded adapter keeps its own."""
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for prefix, sub in module.named_modules():
        if any(prefix.startswith(d + ".") for d in dropped):
            continue
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            dropped.append(prefix)
            continue
        if prefix:
            out[f"{prefix} (module)"] = type(sub).__name__
        for key, value in vars(sub).items():
            if not key.startswith("_") and key != "training" and _plain(value):
                out[f"{prefix}.{key}" if prefix else key] = value
    return out


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, enum.Enum)):
        return True
    if isinstance(value, (tuple, list, frozenset)):
        return all(_plain(v) for v in value)
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _compare_settings(slot: nn.Module, new: nn.Module, allowed: Callable[[Any, Any], bool] | None = None) -> None:
    ours, theirs = settings_of(slot), settings_of(new)
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        mine, other = ours.get(key), theirs.get(key)  # absent and None are alike (an unset optional module)
        if mine == other or (allowed is not None and allowed(mine, other)):
            continue
        raise AdapterLoadError(f"its setting {key} is {other!r} in the folder and {mine!r} in the loaded adapter, "
                               f"and weights alone cannot change it; {LOAD_SEPARATELY}")
