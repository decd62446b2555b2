"""LoRA's site for parameters (torch-free, so that loading the method imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.plugin_api import Site


@dataclass(frozen=True)
class ParameterSite(Site):
    """A module whose parameters ``parameters`` (names on the module, in its order) LoRA adapts
    (``target_parameters``; see parameters.py)."""

    parameters: tuple[str, ...] = ()
