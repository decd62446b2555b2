"""RandLoRA's shared random bases, drawn from a seed in PEFT's layout, order and precision."""

from __future__ import annotations

import math

import torch

#: The names of the bases in the adapter's shared state (and PEFT's attribute names).
BASIS_A, BASIS_B = "randlora_A", "randlora_B"


def num_bases(min_dim: int, r: int) -> int:
    """How many rank-r bases reach rank ``min_dim``: ceil(min_dim / r)."""
    return -(-min_dim // r)


def draw_bases(r: int, largest: tuple[int, int], seed: int, *, sparse: bool = False,
               very_sparse: bool = False) -> dict[str, torch.Tensor]:
    """``randlora_A`` (r, 1, min_dim) and ``randlora_B`` (max_dim, ceil(min_dim / r), r), where ``largest`` is the
    (out, in) of the adapted layers, each the largest among them, and min_dim / max_dim its smaller / larger one.

    Drawn as PEFT draws them for ``projection_prng_key=seed`` (a CPU generator, torch's global one untouched), then
    divided by their standard deviation: Kaiming-uniform in half precision (PEFT's choice of bfloat16, or float16
    where CUDA lacks bfloat16), A first and then B one basis at a time; or, sparse, ternary from uniform draws of A
    then B. Returned in float32 (the half-precision values exactly)."""
    min_dim, max_dim = min(largest), max(largest)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if very_sparse:
        a, b = _ternary_bases(r, min_dim, max_dim, generator, math.sqrt(min_dim))
    elif sparse:
        a, b = _ternary_bases(r, min_dim, max_dim, generator, 3)
    else:
        a, b = _kaiming_bases(r, min_dim, max_dim, generator)
    return {BASIS_A: (a / a.std()).float(), BASIS_B: (b / b.std()).float()}


def _kaiming_bases(r: int, min_dim: int, max_dim: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    a = _kaiming((r, 1, min_dim), generator)
    b = torch.cat([_kaiming((max_dim, 1, r), generator) for _ in range(num_bases(min_dim, r))], dim=1)
    return a, b


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=_draw_dtype())
    with torch.no_grad():
        return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _draw_dtype() -> torch.dtype:
    """PEFT draws the dense bases in bfloat16 unless CUDA is there without it (then float16)."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _ternary_bases(r: int, min_dim: int, max_dim: int, generator: torch.Generator, sparsity: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-1 where a uniform draw is below 1 / (2 sparsity), 1 where above 1 - 1 / (2 sparsity), else 0."""
    uniform_a = torch.rand((r, 1, min_dim), generator=generator)
    uniform_b = torch.rand((max_dim, num_bases(min_dim, r), r), generator=generator)
    return _ternary(uniform_a, sparsity), _ternary(uniform_b, sparsity)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out
