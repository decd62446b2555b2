"""Adapter names: the ``adapter_names`` argument, and distinct names for adapters loaded together.

``adapter_names`` is the argument of the methods that act on several adapters (merge, save, hot-swap).
PEFT types it as a list of names; AdapterHub's ``merge_adapter(name)`` takes one name. A plain string is
one name here, never the sequence of its letters (which would fail with "no adapter named 's'").
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Sequence, TypeVar

from .errors import AdapterError

Item = TypeVar("Item", bound=Hashable)


def adapter_name_list(adapter_names: str | Sequence[str] | None) -> list[str] | None:
    """``adapter_names`` as a list of names: one name for a string, None (the method's default) for None;
    AdapterError for anything else than names."""
    if adapter_names is None:
        return None
    if isinstance(adapter_names, str):
        return [adapter_names]
    names = list(adapter_names)
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise AdapterError(f"adapter_names takes adapter names (strings), not {wrong[0]!r}; pass a name or a "
                           f"list of names, e.g. ['sentiment', 'topic']")
    return names


def distinct_names(items: Iterable[Item], levels: Sequence[Callable[[Item], str]],
                   taken: Iterable[str] = ()) -> dict[Item, str]:
    """One name per distinct item, each different from the others and from ``taken``: the first of
    ``levels`` that gives the item a name no other pending item gets and nothing has yet (``sst2``, then
    ``alice__sst2``, ...); items that still clash after the last level get its name numbered (``_2``, ...)."""
    names: dict[Item, str] = {}
    used = set(taken)
    pending = list(dict.fromkeys(items))
    for level in levels:
        candidates = {item: level(item) for item in pending}
        counts: dict[str, int] = {}
        for candidate in candidates.values():
            counts[candidate] = counts.get(candidate, 0) + 1
        for item, candidate in candidates.items():
            if counts[candidate] == 1 and candidate not in used:
                names[item] = candidate
                used.add(candidate)
        pending = [item for item in pending if item not in names]
    for item in pending:
        stem, number = levels[-1](item), 2
        while f"{stem}_{number}" in used:
            number += 1
        names[item] = f"{stem}_{number}"
        used.add(names[item])
    return names
