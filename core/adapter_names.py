"""The ``adapter_names`` argument of the methods that act on several adapters (merge, save, hot-swap).

PEFT types it as a list of names; AdapterHub's ``merge_adapter(name)`` takes one name. A plain string is
one name here, never the sequence of its letters (which would fail with "no adapter named 's'").
"""

from __future__ import annotations

from typing import Sequence

from .errors import AdapterError


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
