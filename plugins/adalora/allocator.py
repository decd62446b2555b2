"""AdaLoRA's rank allocation (arXiv 2303.10512, section 3), with Hugging Face PEFT's schedule and rules.

After each optimizer step, every entry p of Q, E and P gets the importance |p * grad|, smoothed by
an EMA (beta1), and its uncertainty |importance - smoothed|, smoothed by an EMA (beta2); the
entry's score is their product. A triplet's score is its E entry's plus the mean over its row of
Q plus the mean over its column of P. The total budget (triplets kept over all layers) stays at
its initial value for ``tinit`` steps, then falls on a cubic curve to ``target_r`` per layer at
step ``total_step - tfinal``; every ``deltaT`` steps meanwhile the singular values of the
lowest-scoring triplets beyond the budget are set to zero. At step ``total_step - tfinal`` the
final allocation is made; afterwards the same triplets stay masked while the rest fine-tunes.
"""

from __future__ import annotations

import torch

from .config import AdaloraConfig
from .layer import AdaloraLayer

_FACTORS = ("lora_A", "lora_E", "lora_B")


class RankAllocator:
    """The allocation state of one adapter's layers (site name -> module) under ``config``."""

    def __init__(self, layers: dict[str, AdaloraLayer], config: AdaloraConfig, total_step: int) -> None:
        self.layers, self.config, self.total_step = layers, config, total_step
        self.init_budget = sum(layer.r for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        #: Site -> triplets kept by the latest allocation (None before the first one).
        self.kept: dict[str, torch.Tensor] | None = None
        self.reset_scores()

    def reset_scores(self) -> None:
        self.importance: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets kept in total at ``step``, whether to re-allocate at ``step``)."""
        tinit, tfinal = self.config.tinit, self.config.tfinal
        if step <= tinit:
            return self.init_budget, False
        if step > self.total_step - tfinal:
            return self.target_budget, True
        left = 1 - (step - tinit) / (self.total_step - tfinal - tinit)
        budget = int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget)
        return budget, step % self.config.deltaT == 0

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold the current gradients into the smoothed importance and uncertainty of every entry
        (a parameter without a gradient counts as having a zero one)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for site, layer in self.layers.items():
            for key in _FACTORS:
                param = getattr(layer, key)
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                now = (param * grad).abs()
                importance = self.importance.get((site, key), torch.zeros_like(param))
                uncertainty = self.uncertainty.get((site, key), torch.zeros_like(param))
                importance = beta1 * importance + (1 - beta1) * now
                self.importance[(site, key)] = importance
                self.uncertainty[(site, key)] = beta2 * uncertainty + (1 - beta2) * (now - importance).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Site -> one score per triplet (E's entry + mean over Q's row + mean over P's column)."""
        scores: dict[str, torch.Tensor] = {}
        for site, layer in self.layers.items():
            entry = {key: self._entry_score(site, key, getattr(layer, key)) for key in _FACTORS}
            scores[site] = (entry["lora_E"].reshape(-1) + entry["lora_A"].mean(dim=1)
                            + entry["lora_B"].mean(dim=0))
        return scores

    def _entry_score(self, site: str, key: str, param: torch.Tensor) -> torch.Tensor:
        if (site, key) not in self.importance:
            return torch.zeros_like(param)
        return self.importance[(site, key)] * self.uncertainty[(site, key)]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero the singular values of the lowest-scoring triplets so that about ``budget`` stay
        (triplets tied with the last one dropped go too, as in PEFT); site -> kept flags."""
        scores = self.triplet_scores()
        drop = self.init_budget - budget
        if drop <= 0:  # nothing to drop yet (PEFT would fail here, asking torch for the 0th smallest)
            kept = {site: torch.ones_like(score, dtype=torch.bool) for site, score in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat([s.reshape(-1) for s in scores.values()]), k=drop)[0].item()
            kept = {site: score > threshold for site, score in scores.items()}
        self.apply(kept)
        return kept

    @torch.no_grad()
    def apply(self, kept: dict[str, torch.Tensor]) -> None:
        """Zero the singular values of the triplets not in ``kept``."""
        for site, flags in kept.items():
            layer = self.layers[site]
            layer.lora_E.masked_fill_(~flags.reshape(-1, 1).to(layer.lora_E.device), 0.0)

    def step(self, global_step: int) -> None:
        """Called after the optimizer step that ends step ``global_step`` (0-based), before the
        gradients are cleared; PEFT's ``update_and_allocate``."""
        final = self.total_step - self.config.tfinal
        if global_step < final:
            self.update_scores()
            budget, now = self.budget(global_step)
            if now:
                self.kept = self.mask_to_budget(budget)
        elif global_step == final:
            self.kept = self.mask_to_budget(self.budget(global_step)[0])
            self.reset_scores()
        elif self.kept is not None:
            self.apply(self.kept)
