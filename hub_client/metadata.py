"""Reading adapter metadata out of a hub's tags and card data.

The conventions are the Hub's (and so the registry's, see
``peftkit.hub_rules.cards``): ``base_model`` in the card, tags
``base_model:adapter:<id>`` and the method name, ``pipeline_tag`` for the task.
"""

from __future__ import annotations

from typing import Any, Iterable

from peftkit.hub_rules.cards import ADAPTER_OF_TAG_PREFIX, as_list

#: PEFT's method tags, known even when no peftkit plugin provides them.
PEFT_METHODS = ("lora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning", "adalora", "loha", "lokr", "oft",
                "boft", "vera", "fourierft", "ln_tuning", "poly", "hra", "bone", "xlora")


def known_methods() -> set[str]:
    """Method names a tag may name: installed peftkit methods, their PEFT types, and PEFT's own."""
    from peftkit.core.plugins import get_registry

    names = set(PEFT_METHODS)
    for name, method in get_registry().methods.items():
        names.add(name.lower())
        if method.peft_type:
            names.add(str(method.peft_type).lower())
    return names


def method_from_tags(tags: Iterable[str]) -> str | None:
    known = known_methods()
    return next((t for t in tags if t.lower() in known), None)


def base_model_from(card: dict[str, Any], tags: Iterable[str]) -> str | None:
    bases = as_list(card.get("base_model"))
    if bases:
        return bases[0]
    prefix = ADAPTER_OF_TAG_PREFIX
    return next((t[len(prefix):] for t in tags if t.startswith(prefix)), None)
