"""AdaLoRA's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from peftkit.plugin_api import AdapterConfig, ConfigError, option

#: ``total_step`` written to PEFT's file for an adapter whose schedule is not known (total_step null: never
#: trained, or trained by a loop that ran no rank allocation). PEFT refuses null; it reads total_step only in
#: ``update_and_allocate`` (training), never at inference, so any value it accepts leaves its outputs as they
#: are. This one is no real schedule (2**31 - 1 steps), and peftkit reads it back as null.
UNKNOWN_TOTAL_STEP = 2**31 - 1


@dataclass
class AdaloraConfig(AdapterConfig):
    """Adaptive LoRA: W x + s * P diag(E) Q x with a rank budget moved between layers while training
    (arXiv 2303.10512).

    Field names and defaults are Hugging Face PEFT's ``AdaLoraConfig``'s (``alpha`` and
    ``dropout`` are PEFT's ``lora_alpha`` and ``lora_dropout``). Each adapted layer starts with
    ``init_r`` triplets (a row of Q = ``lora_A``, a singular value in ``lora_E``, a column of
    P = ``lora_B``); the scale is ``alpha / init_r`` for the adapter's whole life (PEFT's
    ``ranknum``), so dropping triplets never rescales the rest.

    Training (``peftkit train``, ``AdapterTrainer``, or ``transformers.Trainer`` with
    ``peftkit.training_callbacks(model)``) scores every triplet after each optimizer step:
    sensitivity |p * grad| smoothed by an EMA (beta1) times its uncertainty (EMA beta2). The
    total budget stays at init_r per layer for ``tinit`` steps, falls on a cubic curve to
    ``target_r`` per layer until step ``total_step - tfinal`` (re-allocated every ``deltaT``
    steps by zeroing the least important singular values), then stays fixed; the triplets
    kept at the end are saved as ``rank_pattern`` (module -> one flag per initial triplet) and
    the layers shrink to them. ``orth_reg_weight`` weighs the regularizer
    mean(||Q Q^T - I||, ||P^T P - I||) added to the training loss.
    """

    method: ClassVar[str] = "adalora"

    target_r: int = option(8, help='the average rank per layer that the budget falls to')
    init_r: int = option(12, help='the rank every adapted layer starts with')
    tinit: int = option(0, help='optimizer steps before the budget starts to fall (warm-up at init_r)')
    tfinal: int = option(0, help='last optimizer steps that train the final ranks without re-allocating')
    deltaT: int = option(1, help='re-allocate the budget every deltaT steps while it falls')
    beta1: float = option(0.85, help='EMA factor of the importance (sensitivity) scores, in (0, 1)')
    beta2: float = option(0.85, help='EMA factor of the uncertainty of the importance scores, in (0, 1)')
    orth_reg_weight: float = option(0.5, help='weight of the orthogonality regularizer added to the training loss')
    total_step: Optional[int] = option(
        None, help="total optimizer steps of the training run (null: the run's max steps, set when training starts)")
    alpha: float = option(8, help='scaling numerator: the update is scaled by alpha / init_r (PEFT: lora_alpha)')
    dropout: float = option(0.0, help="dropout on the adapter branch's input, in [0, 1) (PEFT: lora_dropout)")
    init_weights: bool = option(
        True, help='true: E = 0 (starts equal to the base), P and Q normal(0, 0.02); false: all random (tests)')
    rank_pattern: Optional[dict[str, list[bool]]] = option(
        None, help='triplets kept per layer after budget allocation ("<module>.lora_E" -> flags); written by training')

    def check(self) -> None:
        for key in ("target_r", "init_r"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"adalora config: {key}={getattr(self, key)} must be a positive integer")
        if self.deltaT <= 0:
            raise ConfigError(f"adalora config: deltaT={self.deltaT} must be a positive integer")
        for key in ("tinit", "tfinal"):
            if getattr(self, key) < 0:
                raise ConfigError(f"adalora config: {key}={getattr(self, key)} must be 0 or more")
        for key in ("beta1", "beta2"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"adalora config: {key}={getattr(self, key)} must be in (0, 1)")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"adalora config: orth_reg_weight={self.orth_reg_weight} must be 0 or more")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adalora config: dropout={self.dropout} must be in [0, 1)")
        if self.total_step is not None:
            check_schedule(self, self.total_step)
            if self.total_step >= UNKNOWN_TOTAL_STEP:
                raise ConfigError(f"adalora config: total_step={self.total_step} is not a schedule peftkit can save "
                                  f"(from {UNKNOWN_TOTAL_STEP} on, a file's total_step means 'not known'); "
                                  f"leave total_step null for that")
        if self.tinit + self.tfinal >= UNKNOWN_TOTAL_STEP:
            raise ConfigError(f"adalora config: tinit={self.tinit} and tfinal={self.tfinal} add up to "
                              f"{UNKNOWN_TOTAL_STEP} steps or more; lower them")
        for key, flags in (self.rank_pattern or {}).items():
            if len(flags) != self.init_r:
                raise ConfigError(f"adalora config: rank_pattern[{key!r}] has {len(flags)} flags but init_r="
                                  f"{self.init_r}; it needs one flag per initial triplet")


def check_schedule(config: AdaloraConfig, total_step: int) -> None:
    """Refuse a schedule without a budget-falling phase (PEFT's rule), naming the fix."""
    if total_step <= 0:
        raise ConfigError(f"adalora config: total_step={total_step} must be a positive number of optimizer steps")
    if config.tinit >= total_step - config.tfinal:
        raise ConfigError(f"adalora config: tinit={config.tinit} and tfinal={config.tfinal} leave no steps of "
                          f"total_step={total_step} for the budget to fall; lower tinit or tfinal, or train longer")
