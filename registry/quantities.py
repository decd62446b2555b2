"""Quantities an administrator types on the command line: a number and a unit (``1.5GiB``, ``30m``).

Sizes and durations share this one reader; each names its units and the wording of its error."""

from __future__ import annotations

import re
from decimal import Decimal

_QUANTITY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")

#: Bytes per size unit: KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024; none: bytes.
SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
#: Seconds per duration unit (none: seconds).
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_quantity(text: str, units: dict[str, int], refusal: str) -> Decimal:
    """The number in ``text`` times its unit's value in ``units`` (a unit is matched case-insensitively),
    exactly (a decimal). Raises ValueError with ``refusal`` (what is accepted) after the text read."""
    match = _QUANTITY.fullmatch(text or "")
    unit = units.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"cannot read {text!r} as {refusal}")
    return Decimal(match.group(1)) * unit


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number and an optional unit, such as ``500MB``, ``2GB``, ``1.5GiB`` or ``0``
    (:data:`SIZE_UNITS`). Raises ValueError naming what is accepted."""
    return int(parse_quantity(text, SIZE_UNITS, "a size: write a number and a unit, such as 500MB, 2GB or "
                                                "1.5GiB (KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB "
                                                "powers of 1024; no unit: bytes)"))


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds, or a number and one of s, m, h, d, w (``30m``, ``2h``,
    ``1.5d``). Raises ValueError naming what is accepted."""
    return float(parse_quantity(text, DURATION_UNITS, "a duration: write seconds (600) or a number and a unit: "
                                                      "s, m, h, d or w (30m, 2h, 1d)"))
