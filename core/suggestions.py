"""Names users bring from Hugging Face PEFT and AdapterHub, mapped to peftkit's, for error messages.

A spec such as ``LoRA``, ``DoRA`` or ``lora[rank=8]`` is what a reader of
PEFT's or AdapterHub's documentation types first. Method names differing
only in case are accepted (:func:`method_by_any_case`); the other names here
are never accepted silently, only suggested, so a spec keeps one spelling.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Collection, Mapping

#: Option names of other libraries -> peftkit's candidates (the first the method has is suggested), or a
#: sentence when peftkit has no such option.
FOREIGN_OPTIONS: dict[str, tuple[str, ...] | str] = {
    "rank": ("r",),
    "lora_r": ("r",),
    "lora_rank": ("r",),
    "lora_alpha": ("alpha", "delora_lambda"),
    "alpha": ("delora_lambda",),
    "lambda": ("delora_lambda",),
    "lambda_": ("delora_lambda",),
    "lora_dropout": ("dropout",),
    "init_lora_weights": ("init_weights",),
    "reduction": ("reduction_factor",),
    "adapter_reduction_factor": ("reduction_factor",),
    "prefix_length": ("num_virtual_tokens",),
    "prompt_length": ("num_virtual_tokens",),
    "n_tokens": ("num_virtual_tokens",),
    "virtual_tokens": ("num_virtual_tokens",),
    "attn_matrices": ("target_modules",),
    "target_module": ("target_modules",),
    "targets": ("target_modules",),
    "modules": ("target_modules",),
    "target_layers": ("layers_to_transform",),
    "layers": ("layers_to_transform",),
    "activation": ("non_linearity",),
    "activation_function": ("non_linearity",),
    "hidden_act": ("non_linearity",),
    "adapter_residual_before_ln": ("residual_before_ln",),
    "task_type": "peftkit takes the task from the model (its class and head); leave task_type out",
    "bias": "peftkit trains biases with a method of its own: add bitfit to the spec, e.g. 'lora[r=8]|bitfit'",
    "fan_in_fan_out": "peftkit reads each layer's weight layout from its type (GPT-2's Conv1D too); leave "
                      "fan_in_fan_out out",
    "inference_mode": "leave inference_mode out: call model.eval(), or load the adapter with peftkit.load",
    "base_model_name_or_path": "the base model is recorded from the model when the adapter is saved; leave it out",
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def method_by_any_case(name: str, known: Collection[str]) -> str | None:
    """The installed method ``name`` names when case (and ``-`` for ``_``) is ignored: ``LoRA`` -> ``lora``.
    None when no method, or more than one, matches that way."""
    wanted = name.lower().replace("-", "_")
    found = [k for k in known if k.lower() == wanted]
    return found[0] if len(found) == 1 else None


def _swaps_two_neighbours(typed: str, name: str) -> bool:
    """Whether ``typed`` is ``name`` with two neighbouring characters swapped (``lroa`` for ``lora``)."""
    if len(typed) != len(name) or typed == name:
        return False
    differ = [i for i, (a, b) in enumerate(zip(typed, name)) if a != b]
    return len(differ) == 2 and differ[1] == differ[0] + 1 and typed[differ[0]] == name[differ[1]] \
        and typed[differ[1]] == name[differ[0]]


def closest_name(typed: str, names: Collection[str]) -> str | None:
    """The name ``typed`` most likely misspells: one with two neighbouring characters swapped first (the commonest
    slip, which difflib's similarity can rank below another name: ``lroa`` is as close to ``road`` there), else
    difflib's closest, else None."""
    swapped = sorted(name for name in names if _swaps_two_neighbours(typed, name))
    if swapped:
        return swapped[0]
    close = difflib.get_close_matches(typed, list(names), n=1)
    return close[0] if close else None


def method_suggestion(name: str, methods: Mapping[str, Any]) -> str | None:
    """What to write instead of the unknown method ``name``: a sentence, or None when nothing is close.

    ``methods`` maps the installed method names to their Method objects. Tries the names other libraries
    use, which each method declares in its ``known_as`` (``DoRA``, ``Pfeiffer``), class-like spellings
    (``LoraConfig``, ``PrefixTuning``), then close spellings (``lroa``)."""
    known = list(methods)
    foreign = {_squash(alias): text for method in methods.values()
               for alias, text in (getattr(method, "known_as", None) or {}).items()}
    squashed = _squash(name)
    for candidate in (squashed, squashed.removesuffix("config")):
        if candidate in foreign:
            return foreign[candidate] + "."
        same = [k for k in known if _squash(k) == candidate]
        if len(same) == 1:
            return f"Did you mean {same[0]!r}?"
    close = closest_name(name.lower(), known)
    return f"Did you mean {close!r}?" if close else None


def option_suggestion(key: str, allowed: Collection[str]) -> str | None:
    """What to write instead of the unknown option ``key`` of a method whose options are ``allowed``."""
    foreign = FOREIGN_OPTIONS.get(key.lower())
    if isinstance(foreign, str):
        return foreign
    if foreign is not None:
        named = next((name for name in foreign if name in allowed), None)
        if named is not None:
            return f"write {named!r} (peftkit's name for it)"
    by_case = [name for name in allowed if name.lower() == key.lower()]
    close = by_case[0] if by_case else closest_name(key, allowed)
    return f"did you mean {close!r}?" if close else None
