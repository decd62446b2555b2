"""Module attributes that import their defining module on first use (PEP 562).

``import peftkit`` and ``import peftkit.plugin_api`` stay free of torch this way:
each public name is imported from where it is defined when it is first read.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(module_name: str, table: dict[str, str], names: list[str],
                    hint: str = "") -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of module ``module_name``: a name of ``table`` (name -> module
    defining it) is imported on first use and then kept as an ordinary attribute; ``hint`` ends the
    message for an unknown name."""

    def __getattr__(name: str) -> Any:
        source = table.get(name)
        if source is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}{hint}")
        value = getattr(importlib.import_module(source), name)
        setattr(sys.modules[module_name], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
