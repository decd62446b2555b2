"""The shared random projections of VeRA and PVeRA, drawn from a seed (PEFT's layout and draws)."""

from __future__ import annotations

import math

import torch


def draw_projections(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """One tensor per entry of ``shapes`` (A's name and shape, then B's), each uniform in +-sqrt(6 / fan_in)
    (Kaiming uniform, gain sqrt(2)), drawn in that order from a CPU generator seeded with ``seed``: the same
    numbers PEFT draws for ``projection_prng_key=seed``. torch's global generator is untouched."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        bound = math.sqrt(6.0 / shape[1])
        out[name] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return out
