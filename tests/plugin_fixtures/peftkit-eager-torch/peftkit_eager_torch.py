"""Fixture: a working plugin whose entry module imports torch at module level (docs/plugins.md asks
plugins not to: every peftkit command then waits for torch)."""

import torch

import peftkit

PEFTKIT_PLUGIN_API = 1


@peftkit.hookimpl
def peftkit_register_merge_strategies(register):
    register("eager_torch_sum", lambda deltas, weights, **options: torch.stack(list(deltas)).sum(0))
