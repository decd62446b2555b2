"""Progress bars of peftkit's own long loops (a weight search's evaluations, a mixture's training steps).

A bar draws only on a terminal: written to a log or a pipe, tqdm's redraws would be hundreds of carriage-return
updates on one line, so there the bar is off even when progress is asked for (tqdm's ``disable=None``).
"""

from __future__ import annotations

from typing import Any


def step_bar(total: int, *, progress: bool, desc: str, unit: str) -> Any:
    """A tqdm bar over ``total`` steps that disappears when done; drawn only where ``progress`` and stderr is a
    terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=None if progress else True, desc=desc, unit=unit, leave=False)
