"""LoRA's config (torch-free)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar, Union

from peftkit.plugin_api import AdapterConfig, option, ConfigError

#: init_weights values that rewrite the base weight (PEFT's names); N is the number of subspace iterations.
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


#: init_weights values that set the factors of a linear layer only, leaving the base weight as it is (PEFT's names):
#: "orthogonal" (A and B from the halves of one random orthogonal matrix, so B A = 0), "mica" (B the left singular
#: vectors of the weight's r smallest singular values and frozen, A = 0).
LINEAR_ONLY_INITS = ("orthogonal", "mica")


def is_residual_init(init: object) -> bool:
    """Whether LoRA's ``init`` (PiSSA, fast PiSSA, OLoRA) moves part of the base weight into the factors."""
    return init in ("pissa", "olora") or (isinstance(init, str) and _PISSA_NITER.fullmatch(init) is not None)


def is_linear_only_init(init: object) -> bool:
    """Whether LoRA's ``init`` is computed for a linear layer's weight (the residual inits and
    ``LINEAR_ONLY_INITS``): other layers are refused for it."""
    return is_residual_init(init) or init in LINEAR_ONLY_INITS


def is_known_init(init: object) -> bool:
    """Whether peftkit implements LoRA's ``init`` (True, False, "gaussian", "eva" or a linear-only init)."""
    return init in (True, False, "gaussian", "eva") or is_linear_only_init(init)


def pissa_iterations(init: str) -> int | None:
    """N of "pissa_niter_N" (the randomized SVD), None for another init."""
    match = _PISSA_NITER.fullmatch(init)
    return int(match.group(1)) if match else None


@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank adaptation: W x + (alpha / r) * B A x (arXiv 2106.09685).

    r: rank. alpha: scaling numerator (PEFT: lora_alpha). dropout: on the
    LoRA input. use_rslora: scale by alpha / sqrt(r) (arXiv 2312.03732).
    use_dora: weight-decomposed LoRA (arXiv 2402.09353). init_weights: True
    (B = 0, so the model starts equal to the base), "gaussian", or False
    (B random too; for tests); "pissa", "pissa_niter_N" (fast randomized SVD, N iterations) or "olora"
    start the factors at the principal part of each base weight and leave the rest in the base weight
    (PEFT's init_lora_weights; linear layers only; save_as_lora() saves the result for the original
    base). "orthogonal" (even r) draws A and B from the two halves of one random orthogonal matrix (B A = 0);
    "mica" sets B to the left singular vectors of the weight's r smallest singular values, frozen, and A = 0
    (MiCA, arXiv 2604.01694); both linear layers only, as in PEFT.
    "eva" starts A at the top right singular vectors of each layer's inputs over a few
    batches (peftkit.initialize_eva; ``peftkit train`` takes them from the training data), eva_*:
    PEFT's EvaConfig. rank_pattern / alpha_pattern: per-module
    overrides, keys are regexes matched against the end of module names (parameter names for
    target_parameters). target_parameters: nn.Parameters to adapt (MoE expert stacks), see parameters.py.
    use_gating: UniPELT's gate (AdapterHub's LoRAConfig.use_gating): the update B A x is scaled by the
      mean over the sequence of sigmoid(W x + b), one value per example, instead of alpha / r.
    lora_bias: a trained bias on B, so the update is scale * (B A x + b) (PEFT's lora_bias).
    trainable_token_indices: chosen embedding rows trained with the adapter (PEFT's), see tokens.py.
    """

    method: ClassVar[str] = "lora"

    r: int = option(8, help='rank of the update B A')
    alpha: float = option(8, help='scaling numerator: the update is scaled by alpha / r (PEFT: lora_alpha)')
    dropout: float = option(0.0, help="dropout on the LoRA branch's input, in [0, 1)")
    use_rslora: bool = option(False, help='scale by alpha / sqrt(r) instead of alpha / r (rank-stabilized LoRA)')
    use_dora: bool = option(False, help='weight-decomposed LoRA: a trained magnitude per output row (DoRA)')
    init_weights: Union[bool, str] = option(
        True, help='true (B = 0: starts equal to the base), "gaussian", false (random; for tests), "pissa", '
                   '"pissa_niter_N", "olora", "orthogonal" (even r), "mica" (B frozen) or "eva" (A from the SVD '
                   'of layer inputs: peftkit.initialize_eva)')
    rank_pattern: dict[str, int] = option(
        default_factory=dict, help='per-module rank overrides: regex keys matched at the end of module names')
    alpha_pattern: dict[str, float] = option(
        default_factory=dict, help='per-module alpha overrides: regex keys matched at the end of module names')
    eva_rho: float = option(2.0, help='EVA: a layer may take up to r * eva_rho ranks when the budget is redistributed (>= 1; 1: no redistribution)')
    eva_tau: float = option(0.99, help='EVA: the SVD stops when its components move less than this (cosine similarity of consecutive batches, in [0, 1])')
    eva_use_label_mask: bool = option(True, help='EVA: leave out positions whose label is eva_label_mask_value')
    eva_label_mask_value: int = option(-100, help='EVA: the label value of positions left out')
    eva_whiten: bool = option(False, help="EVA: divide A's rows by the square roots of their singular values")
    eva_adjust_scaling_factors: bool = option(
        True, help='EVA: scale alpha with a layer\'s new rank, so every layer keeps the scale alpha / r')
    use_gating: bool = option(
        False, help="a learned gate (sequence mean of sigmoid(W x + b) on the layer's input, per example) replaces "
                    "alpha / r (AdapterHub's UniPELT); linear layers only, not mergeable")
    target_parameters: Union[list[str], None] = option(
        None, help='nn.Parameters to adapt, e.g. MoE experts: ["experts.gate_up_proj", "experts.down_proj"] '
                   '(full names or dotted suffixes; PEFT\'s target_parameters)')
    lora_bias: bool = option(
        False, help="a trained bias on B (PEFT's lora_bias): the update is scale * (B A x + b); for LoRA extracted "
                    "from a full fine-tune whose biases changed. Linear and convolution layers, not with DoRA; "
                    "merging needs a base layer with a bias")
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = option(
        None, help="token ids (embedding rows) trained beside the LoRA (PEFT's trainable_token_indices): a list for "
                   "the input embedding (and its tied output layer), or a table module name -> ids")
    layers_pattern: Union[list[str], str, None] = option(
        None, help='PEFT\'s layers_pattern: with layers_to_transform, a module\'s layer index is the first number '
                   'after ".<pattern>." in its name (e.g. "layers", "h"); null: the architecture\'s layer numbering')

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora config: r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora config: dropout={self.dropout} must be in [0, 1)")
        self._check_init()
        if self.eva_rho < 1.0:
            raise ConfigError(f"lora config: eva_rho={self.eva_rho} must be >= 1 (1: every layer keeps rank r)")
        if not 0.0 <= self.eva_tau <= 1.0:
            raise ConfigError(f"lora config: eva_tau={self.eva_tau} must be in [0, 1]")
        if self.use_gating:
            clash = [name for name, on in (("use_dora", self.use_dora), ("init_weights", is_linear_only_init(
                self.init_weights) or self.init_weights == "eva"), ("target_parameters", bool(self.target_parameters)))
                if on]
            if clash:
                raise ConfigError(f"lora config: use_gating=true cannot be combined with {clash[0]}="
                                  f"{getattr(self, clash[0])!r}; a gated LoRA is a plain LoRA on linear layers")
        if self.target_parameters is not None and not all(self.target_parameters):
            raise ConfigError(f"lora config: target_parameters={self.target_parameters!r} holds an empty name; "
                              f"name parameters, e.g. [\"experts.gate_up_proj\", \"experts.down_proj\"]")
        self._check_layers_pattern()
        self._check_lora_bias()
        if self.trainable_token_indices is not None:
            self.tokens_config()
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"lora config: rank_pattern[{key!r}]={rank} must be positive")
        for field_name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in patterns:
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ConfigError(f"lora config: {field_name} key {key!r} is not a valid regular expression "
                                      f"({exc}); keys are module names or regexes matched at the end of module "
                                      f"names, e.g. {{\"q_proj\": 16}}") from None

    def _check_init(self) -> None:
        init = self.init_weights
        if isinstance(init, str) and not is_known_init(init):
            raise ConfigError(f"lora config: init_weights={init!r} is not known; use true, false, "
                              f"\"gaussian\", \"pissa\", \"pissa_niter_N\" (N a whole number, e.g. "
                              f"pissa_niter_4), \"olora\", \"orthogonal\", \"mica\" or \"eva\"")
        if (is_residual_init(init) or init == "mica") and self.use_dora:
            why = " (MiCA trains A alone, on a frozen B)" if init == "mica" else ""
            raise ConfigError(f"lora config: init_weights={init!r} cannot be combined with use_dora=true{why}; use "
                              f"one of them")
        if init == "orthogonal":
            odd = [f"r={self.r}"] * (self.r % 2) + [f"rank_pattern[{key!r}]={rank}"
                                                    for key, rank in self.rank_pattern.items() if rank % 2]
            if odd:
                raise ConfigError(f"lora config: init_weights=\"orthogonal\" splits one orthogonal matrix between "
                                  f"A and B and needs even ranks, not {', '.join(odd)}; choose even ranks")

    def tokens_config(self) -> AdapterConfig:
        """The trainable_tokens method's config for ``trainable_token_indices`` (its rows are trained by that
        method's modules, found through the registry); ConfigError naming the option if the ids are wrong."""
        from peftkit.plugin_api import get_method

        table = self.trainable_token_indices
        targets = list(table) if isinstance(table, dict) else None
        try:
            return get_method("trainable_tokens").make_config(token_indices=table, target_modules=targets)
        except ConfigError as exc:
            raise ConfigError(f"lora config: trainable_token_indices: {exc}") from None

    def _check_lora_bias(self) -> None:
        """PEFT's rules for lora_bias (its LoraConfig refuses the same), plus the layers that have no B to carry
        a bias: gated LoRA and parameter targets."""
        if not self.lora_bias:
            return
        clash = next(((name, value) for name, value, on in (
            ("use_dora", self.use_dora, self.use_dora),
            ("init_weights", self.init_weights, self.init_weights not in (True, False)),
            ("use_gating", self.use_gating, self.use_gating),
            ("target_parameters", self.target_parameters, bool(self.target_parameters))) if on), None)
        if clash is not None:
            name, value = clash
            raise ConfigError(f"lora config: lora_bias=true cannot be combined with {name}={json.dumps(value)} (PEFT "
                              f"allows lora_bias with plain LoRA on layers, initialised with init_weights true or "
                              f"false); set lora_bias=false or leave {name} at its default")

    def _check_layers_pattern(self) -> None:
        if not self.layers_pattern:  # None, [] or "": the architecture's layer numbering (PEFT: any pattern)
            return
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
        if not all(patterns):
            raise ConfigError(f"lora config: layers_pattern={self.layers_pattern!r} holds an empty name; give "
                              f"the names of the model's lists of layers, e.g. [\"layers\"], or leave it null")
        if self.layers_to_transform is None:
            raise ConfigError(f"lora config: layers_pattern={self.layers_pattern!r} says where layer indices "
                              f"are, and layers_to_transform which to adapt: set layers_to_transform too (as in "
                              f"PEFT), or leave layers_pattern null")
