"""Incremental PCA over batches of rows (Ross et al. 2008, the algorithm scikit-learn's IncrementalPCA
uses), in torch: EVA's SVD of a layer's inputs, fed one batch at a time, keeping ``n_components``.

Each step takes the SVD of [previous singular values x components; the centred batch; a row
correcting for the mean's shift], so the result is the PCA of every row seen so far up to the
truncation. Signs follow the largest entry of each component (positive), as PEFT's does, so that
consecutive steps can be compared by cosine similarity.
"""

from __future__ import annotations

import torch


class IncrementalPCA:
    """Top ``n_components`` principal directions of all rows given to :meth:`partial_fit`."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.components: torch.Tensor | None = None  # (n_components, features)
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None  # float64
        self.var: torch.Tensor | None = None  # float64
        self.seen = 0

    def partial_fit(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float32).clone()
        count = rows.shape[0]
        total = self.seen + count
        batch_sum = rows.sum(dim=0, dtype=torch.float64)
        batch_mean = batch_sum / count
        centred = rows - batch_mean
        batch_unnormalized_var = centred.square().sum(dim=0, dtype=torch.float64) \
            - centred.sum(dim=0, dtype=torch.float64).square() / count
        if self.mean is None or self.var is None or self.components is None or self.singular_values is None:
            mean = batch_sum / total
            var = batch_unnormalized_var / total
            stacked = rows - mean.to(rows.dtype)
        else:
            old_sum = self.mean * self.seen
            mean = (old_sum + batch_sum) / total
            ratio = self.seen / count
            var = (self.var * self.seen + batch_unnormalized_var
                   + ratio / total * (old_sum / ratio - batch_sum).square()) / total
            correction = (self.seen / total * count) ** 0.5 * (self.mean - rows.mean(dim=0))
            # float64 from the second batch on (the mean correction is float64), as PEFT's steps run
            stacked = torch.vstack((self.singular_values[:, None] * self.components, rows - rows.mean(dim=0),
                                    correction[None, :]))
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        signs = torch.sign(vh[torch.arange(vh.shape[0]), vh.abs().argmax(dim=1)])
        vh = vh * signs[:, None]
        keep = self.n_components
        self.components, self.singular_values = vh[:keep], s[:keep]
        self.explained_variance_ratio = (s.square() / torch.sum(var * total))[:keep]
        self.mean, self.var, self.seen = mean, var, total
