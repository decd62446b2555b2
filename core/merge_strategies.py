"""Built-in weight-space merge strategies, registered as a plugin (entry point ``builtin_merges``).

Each strategy combines the weight changes ("task vectors") of k adapters at
one layer, as the papers define them::

    fn(deltas, weights, **options) -> merged delta

``deltas`` are dense tensors of one shape (one per adapter, each already
scaled, e.g. LoRA's s * B @ A), ``weights`` a list of floats. Options a
strategy does not use are ignored. Strategies:

- ``linear`` (task arithmetic, arXiv 2212.04089): sum_i w_i D_i.
- ``magnitude_prune``: sum_i w_i trim(D_i), where trim keeps the
  ``density`` fraction of entries with the largest magnitude.
- ``ties`` (arXiv 2306.01708): trim each D_i, elect a sign per entry
  (``majority_sign_method="total"``: the sign of sum_i trim(D_i);
  ``"frequency"``: the sign held by most), and average the weighted
  entries that agree with it: sum_{i agrees} w_i trim(D_i) / #agree.
- ``dare_linear`` (arXiv 2311.03099): drop each entry with probability
  1 - density, rescale the rest by 1/density, then ``linear``.
- ``dare_ties``: DARE's random drop and rescale, then TIES' sign election
  and disjoint mean.

The random draws use ``generator`` (a seeded ``torch.Generator`` that
``merge_adapters(seed=...)`` passes) and follow PEFT's order (layer by layer,
adapter by adapter), so the same seed gives PEFT's masks.

Nothing here imports torch at import time: this module is a plugin entry
point and ``peftkit plugins`` must stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from .hookspecs import PLUGIN_API_VERSION, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import torch

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION


def _weighted(tensors: Sequence["torch.Tensor"], weights: Sequence[float]) -> "torch.Tensor":
    out = None
    for tensor, weight in zip(tensors, weights):
        term = tensor * weight
        out = term if out is None else out + term
    assert out is not None
    return out


def trim_by_magnitude(tensor: "torch.Tensor", density: float) -> "torch.Tensor":
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the others."""
    import torch

    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    if keep <= 0:
        return torch.zeros_like(tensor)
    magnitude = tensor.abs().reshape(-1)
    threshold = kth_largest(magnitude, keep)
    return tensor * (magnitude >= threshold).view_as(tensor)


def kth_largest(values: "torch.Tensor", k: int, *, bins: int = 2048) -> "torch.Tensor":
    """The ``k``-th largest of a 1-D tensor of non-negative values, exactly (as ``kthvalue`` would give).

    ``torch.kthvalue`` over a whole weight matrix is the slowest step of a
    TIES merge. Bucketing the values by magnitude first (one multiply and a
    ``bincount``) finds the one bucket that holds the k-th largest; only that
    bucket (about numel / bins values) goes through ``kthvalue``. Buckets
    follow the order of the values (``floor(v * bins / max)`` never decreases
    as ``v`` grows), so the answer is exact, ties included.
    """
    import torch

    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and {n}, not {k}")
    if n < 16 * bins:
        return torch.kthvalue(values, n - k + 1).values
    top = values.max()
    if top <= 0:
        return top
    bucket = (values * (bins / top)).to(torch.int32).clamp_(max=bins - 1)
    counts = torch.bincount(bucket, minlength=bins)
    from_top = counts.flip(0).cumsum(0)  # from_top[j]: how many values lie in the top j + 1 buckets
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)).item())
    chosen = bins - 1 - j
    above = int(from_top[j]) - int(counts[chosen])
    candidates = values[bucket == chosen]
    return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values


def drop_at_random(tensor: "torch.Tensor", density: float, generator: Any = None) -> "torch.Tensor":
    """DARE: keep each entry with probability ``density`` and rescale it by 1/density."""
    import torch

    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def _disjoint_mean(trimmed: Sequence["torch.Tensor"], weights: Sequence[float], method: str) -> "torch.Tensor":
    import torch

    stacked = torch.stack(list(trimmed))
    signs = stacked.sign()
    if method == "total":
        elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    elif method == "frequency":
        elected = torch.where(signs.sum(dim=0) >= 0, 1.0, -1.0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', not {method!r}")
    agree = signs == elected
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    total = (stacked * w * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def linear(deltas: Sequence["torch.Tensor"], weights: Sequence[float], **_: Any) -> "torch.Tensor":
    return _weighted(deltas, weights)


def magnitude_prune(deltas: Sequence["torch.Tensor"], weights: Sequence[float], *, density: float,
                    **_: Any) -> "torch.Tensor":
    return _weighted([trim_by_magnitude(d, density) for d in deltas], weights)


def ties(deltas: Sequence["torch.Tensor"], weights: Sequence[float], *, density: float,
         majority_sign_method: str = "total", **_: Any) -> "torch.Tensor":
    return _disjoint_mean([trim_by_magnitude(d, density) for d in deltas], weights, majority_sign_method)


def dare_linear(deltas: Sequence["torch.Tensor"], weights: Sequence[float], *, density: float,
                generator: Any = None, **_: Any) -> "torch.Tensor":
    return _weighted([drop_at_random(d, density, generator) for d in deltas], weights)


def dare_ties(deltas: Sequence["torch.Tensor"], weights: Sequence[float], *, density: float,
              majority_sign_method: str = "total", generator: Any = None, **_: Any) -> "torch.Tensor":
    dropped = [drop_at_random(d, density, generator) for d in deltas]
    return _disjoint_mean(dropped, weights, majority_sign_method)


BUILTIN_STRATEGIES: dict[str, Callable[..., Any]] = {
    "linear": linear,
    "magnitude_prune": magnitude_prune,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}


@hookimpl
def peftkit_register_merge_strategies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    for name, fn in BUILTIN_STRATEGIES.items():
        register(name, fn)
