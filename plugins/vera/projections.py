"""VeRA's shared random projections, drawn from a seed (PEFT's layout and draws)."""

from __future__ import annotations

import math

import torch


def draw_projections(r: int, out_features: int, in_features: int, seed: int) -> dict[str, torch.Tensor]:
    """``vera_A`` (r, in_features) and ``vera_B`` (out_features, r), each uniform in +-sqrt(6 / fan_in)
    (Kaiming uniform, gain sqrt(2)), drawn in that order from a CPU generator seeded with ``seed``:
    the same numbers PEFT draws for ``projection_prng_key=seed``. torch's global generator is untouched."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in (("vera_A", (r, in_features)), ("vera_B", (out_features, r))):
        bound = math.sqrt(6.0 / shape[1])
        out[name] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return out
