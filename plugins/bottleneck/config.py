"""Configs of the bottleneck adapters (torch-free).

Three methods share one option set:

- ``seq_bn`` (Pfeiffer et al., arXiv 2005.00247): one adapter after each
  feed-forward output projection;
- ``double_seq_bn`` (Houlsby et al., arXiv 1902.00751): one after the
  self-attention output projection and one after the feed-forward output
  projection (optionally one after the decoder's cross-attention too);
- ``par_bn`` (He et al., arXiv 2110.04366): one parallel to each feed-forward
  block, reading the block's input and adding to its output.

Every one can make its projections parameterized hypercomplex multiplications
(``phm_layer``: Compacter, Karimi Mahabadi et al., arXiv 2106.04647) and add an
invertible adapter on the embedding output, inverted before the LM head
(``inv_adapter``: MAD-X, Pfeiffer et al., arXiv 2005.00052). ``compacter``,
``compacterpp``, ``seq_bn_inv`` and ``double_seq_bn_inv`` are presets of those
options (AdapterHub's CompacterConfig, CompacterPlusPlusConfig, SeqBnInvConfig,
DoubleSeqBnInvConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

from peftkit.plugin_api import AdapterConfig, option, ConfigError

#: Activation names accepted by ``non_linearity`` (``swish`` is ``silu``,
#: ``gelu_new`` is the tanh approximation GPT-2 uses).
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "sigmoid", "leaky_relu", "identity")

#: Values of ``original_ln_residual``: what the skip connection carries with original_ln_before.
ORIGINAL_LN_RESIDUALS = ("output", "sum", "normed")

#: Values of ``hypercomplex_nonlinearity``: how the PHM weight factors are drawn.
PHM_W_INITS = ("glorot-uniform", "glorot-normal", "normal", "phm")
#: Values of ``phm_c_init``: how the PHM rule matrices are drawn.
PHM_C_INITS = ("normal", "uniform")
#: Values of ``inv_adapter`` (None: no invertible adapter).
INV_ADAPTERS = ("nice",)

#: Key of the per-layer reduction map used for layers it does not list.
DEFAULT_KEY = "default"

ReductionFactor = Union[int, float, dict[Union[int, str], Union[int, float]]]


@dataclass
class BottleneckConfig(AdapterConfig):
    """Options shared by the three bottleneck methods.

    reduction_factor: hidden size / bottleneck size. A number, or a map from
      layer index to factor, e.g. ``{"0": 8, "default": 16}`` (layers it does
      not list use ``"default"``; without one, every adapted layer must be listed).
    non_linearity: activation between the down and up projections (see NON_LINEARITIES).
    scaling: factor on the adapter branch's output: a number, or ``"learned"``
      (one trainable scalar per adapter module, starting at 1).
    dropout: dropout on the adapter branch's output, in [0, 1).
    ln_before: a LayerNorm of the adapter's own on its input, before the down projection.
    leave_out: layer indices that get no adapter (layers_to_transform is the positive form).
    ln_after: a LayerNorm of the adapter's own on the branch's output (sequential
      adapters: see ln_after_includes_residual).
    init_weights: True zero-initializes the up projection, so the adapted model
      starts equal to the base model; False draws it at random (for tests).
    use_gating: UniPELT's gate: the branch's output is multiplied by the mean over the
      sequence of sigmoid(W x + b) on the adapter's input, one value per example.
    target_modules: None uses the architecture's insertion points; a list, a
      regex or "all-linear" puts an adapter on the output of each matching
      Linear/Conv1D layer instead (for models peftkit has no table for).
    """

    method: ClassVar[str] = ""

    reduction_factor: ReductionFactor = option(
        16, help='hidden size / bottleneck size: a number, or a map from layer index to factor with an optional "default"')
    non_linearity: str = option("relu", help='activation between the down and up projections')
    scaling: Union[float, Literal["learned"]] = option(
        1.0, help='factor on the adapter branch\'s output: a number, or "learned" (one trained scalar per module)')
    dropout: float = option(0.0, help="dropout on the adapter branch's output, in [0, 1)")
    ln_before: bool = option(False, help="a LayerNorm of the adapter's own on its input, before the down projection")
    leave_out: list[int] = option(default_factory=list, help='layer indices that get no adapter')
    init_weights: bool = option(
        True, help='true zero-initializes the up projection (starts equal to the base); false draws it at random (for tests)')
    ln_after: bool = option(False, help="a LayerNorm of the adapter's own on the adapter branch's output")
    phm_layer: bool = option(
        False, help="the down and up projections are parameterized hypercomplex multiplications (Compacter)")
    phm_dim: int = option(4, help="with phm_layer, the number n of Kronecker products summed (divides sizes)")
    shared_phm_rule: bool = option(True, help="with phm_layer, one set of rule matrices for every projection")
    factorized_phm_rule: bool = option(False, help="with phm_layer, each rule matrix is an outer product (rank 1)")
    learn_phm: bool = option(True, help="with phm_layer, the rule matrices train (false: frozen at their init)")
    shared_W_phm: bool = option(
        False, help="with phm_layer, one down and one up weight factor for every layer (needs one reduction factor)")
    factorized_phm_W: bool = option(True, help="with phm_layer, each weight factor is a product of rank phm_rank")
    phm_rank: int = option(1, help="with phm_layer and factorized_phm_W, the rank of each weight factor")
    phm_bias: bool = option(True, help="with phm_layer, the projections have a bias")
    hypercomplex_nonlinearity: str = option(
        "glorot-uniform", help='with phm_layer, how weight factors are drawn: glorot-uniform, glorot-normal, '
                               'normal (std phm_init_range) or phm')
    phm_c_init: str = option("normal", help='with phm_layer, how rule matrices are drawn: normal or uniform')
    phm_init_range: float = option(0.0001, help="with phm_layer, std of the normal draws")
    inv_adapter: Optional[str] = option(
        None, help='an invertible adapter on the embedding output, inverted before the LM head: "nice" (MAD-X)')
    inv_adapter_reduction_factor: float = option(
        2.0, help="with inv_adapter, half the hidden size / the coupling networks' bottleneck size")
    use_gating: bool = option(
        False, help="a learned gate (sequence mean of sigmoid(W x + b), per example) scales the branch's output "
                    "(AdapterHub's UniPELT)")

    def check(self) -> None:
        self.reduction_factor = _checked_reduction(self.method, self.reduction_factor)
        name = self.non_linearity.lower()
        if name not in NON_LINEARITIES:
            raise ConfigError(f"{self.method} config: non_linearity={self.non_linearity!r} is not supported; "
                              f"choose one of {', '.join(NON_LINEARITIES)}")
        self.non_linearity = name
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.method} config: dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.scaling, float) and self.scaling != self.scaling:
            raise ConfigError(f"{self.method} config: scaling must be a number or 'learned', not NaN")
        self.check_placement()
        self.check_phm()
        self.check_invertible()
        bad = [i for i in self.leave_out if i < 0]
        if bad:
            raise ConfigError(f"{self.method} config: leave_out={self.leave_out} lists negative layer "
                              f"indices {bad}; give 0-based layer indices")

    def check_placement(self) -> None:
        """Refuse placement options set where they have no effect."""

    def check_phm(self) -> None:
        if self.hypercomplex_nonlinearity not in PHM_W_INITS:
            raise ConfigError(f"{self.method} config: hypercomplex_nonlinearity={self.hypercomplex_nonlinearity!r} "
                              f"is not one of {', '.join(PHM_W_INITS)}")
        if self.phm_c_init not in PHM_C_INITS:
            raise ConfigError(f"{self.method} config: phm_c_init={self.phm_c_init!r} is not one of "
                              f"{', '.join(PHM_C_INITS)}")
        for name in ("phm_dim", "phm_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.method} config: {name}={value!r} must be a positive integer")
        if self.phm_init_range <= 0:
            raise ConfigError(f"{self.method} config: phm_init_range={self.phm_init_range} must be positive")
        if self.phm_layer and self.shared_W_phm and isinstance(self.reduction_factor, dict):
            raise ConfigError(f"{self.method} config: shared_W_phm=true shares one weight factor between all "
                              f"layers, so it needs one reduction_factor, not the per-layer map "
                              f"{self.reduction_factor}; give a number or set shared_W_phm=false")

    def check_invertible(self) -> None:
        if self.inv_adapter is not None and self.inv_adapter not in INV_ADAPTERS:
            hint = (" (AdapterHub's GLOW coupling block is not supported: in adapters 1.3 it splits and joins "
                    "a (batch, sequence, hidden) input along different axes)" if self.inv_adapter == "glow" else "")
            raise ConfigError(f"{self.method} config: inv_adapter={self.inv_adapter!r} is not supported; choose "
                              f"{' or '.join(repr(v) for v in INV_ADAPTERS)}, or null (none){hint}")
        if self.inv_adapter_reduction_factor <= 0:
            raise ConfigError(f"{self.method} config: inv_adapter_reduction_factor={self.inv_adapter_reduction_factor}"
                              f" must be a positive number")

    def reduction_for(self, layer: int | None, site: str) -> float:
        """The reduction factor of the layer holding ``site``."""
        factor = self.reduction_factor
        if not isinstance(factor, dict):
            return factor
        if layer is not None and layer in factor:
            return factor[layer]
        if DEFAULT_KEY in factor:
            return factor[DEFAULT_KEY]
        where = f"layer {layer}" if layer is not None else f"module {site!r} (no layer index)"
        raise ConfigError(f"{self.method} config: reduction_factor={self.reduction_factor} has no entry for "
                          f"{where}; add it or a {DEFAULT_KEY!r} entry")


@dataclass
class SequentialBottleneckConfig(BottleneckConfig):
    """Options of the sequential adapters (seq_bn, double_seq_bn).

    The adapter sits on a projection's output h (before the model's own
    residual connection and LayerNorm) and computes
    ``h + scaling * up(act(down(h)))``.

    residual: add the adapter's own skip connection (False: the adapter's
      branch replaces h; the model then no longer starts equal to the base).
    residual_before_ln: with ln_before, whether the skip connection carries h
      (True) or the adapter's LayerNorm of h (False; not identity at init).
    original_ln_before: the adapter reads ``LN(h + r)`` instead of h, where r is
      the block's residual input and LN the model's own LayerNorm after the
      projection (AdapterHub's Pfeiffer placement); the model then still adds r
      and applies LN to the adapter's output. Needs a post-LayerNorm model
      (BERT-like) and the architecture's insertion points.
    original_ln_residual: with original_ln_before, what the skip connection
      carries: ``"output"`` h, ``"sum"`` h + r, ``"normed"`` LN(h + r)
      (AdapterHub's residual_before_ln true, "post_add", false).
    ln_after_includes_residual: with ln_after, the LayerNorm normalizes the
      branch plus the skip connection (True) or the branch alone (False).
    """

    residual: bool = option(True, help="add the adapter's own skip connection (false: the branch replaces the output)")
    residual_before_ln: bool = option(
        True, help='with ln_before, the skip connection carries the input (true) or its LayerNorm (false)')
    original_ln_before: bool = option(
        False, help="the adapter reads LN(h + r): the block's output after the model's own residual and LayerNorm "
                    "(AdapterHub's Pfeiffer placement)")
    original_ln_residual: Literal["output", "sum", "normed"] = option(
        "output", help='with original_ln_before, the skip connection carries the projection\'s output h ("output"), '
                       'h + r ("sum") or LN(h + r) ("normed")')
    ln_after_includes_residual: bool = option(
        False, help="with ln_after, the LayerNorm normalizes the branch plus the skip connection (false: the branch alone)")

    def check_placement(self) -> None:
        if self.original_ln_residual not in ORIGINAL_LN_RESIDUALS:
            raise ConfigError(f"{self.method} config: original_ln_residual={self.original_ln_residual!r} is not "
                              f"one of {', '.join(ORIGINAL_LN_RESIDUALS)}")
        if self.original_ln_residual != "output" and not self.original_ln_before:
            raise ConfigError(f"{self.method} config: original_ln_residual={self.original_ln_residual!r} has no "
                              f"effect without original_ln_before=true; set both or neither")
        if self.ln_after_includes_residual and not self.ln_after:
            raise ConfigError(f"{self.method} config: ln_after_includes_residual=true has no effect without "
                              f"ln_after=true; set both or neither")
        if self.original_ln_before and self.target_modules is not None:
            raise ConfigError(f"{self.method} config: original_ln_before=true needs the architecture's insertion "
                              f"points (the block's residual and LayerNorm), not target_modules; drop one of them")


@dataclass
class SeqBnConfig(SequentialBottleneckConfig):
    """Pfeiffer adapter: after each feed-forward output projection."""

    method: ClassVar[str] = "seq_bn"


@dataclass
class DoubleSeqBnConfig(SequentialBottleneckConfig):
    """Houlsby adapter: after the self-attention and the feed-forward output projections.

    cross_attention: encoder-decoder models also get one after the decoder's
      cross-attention output projection (off by default, as in AdapterHub).
    """

    method: ClassVar[str] = "double_seq_bn"

    non_linearity: str = "swish"
    cross_attention: bool = option(
        False, help="encoder-decoder models also get an adapter after the decoder's cross-attention output")


@dataclass
class CompacterPlusPlusConfig(SeqBnConfig):
    """Compacter++: seq_bn with PHM projections, reduction factor 32 and GELU (arXiv 2106.04647)."""

    method: ClassVar[str] = "compacterpp"

    phm_layer: bool = True
    reduction_factor: ReductionFactor = 32
    non_linearity: str = "gelu"


@dataclass
class CompacterConfig(DoubleSeqBnConfig):
    """Compacter: double_seq_bn with PHM projections, reduction factor 32 and GELU (arXiv 2106.04647)."""

    method: ClassVar[str] = "compacter"

    phm_layer: bool = True
    reduction_factor: ReductionFactor = 32
    non_linearity: str = "gelu"


@dataclass
class SeqBnInvConfig(SeqBnConfig):
    """MAD-X language adapter: seq_bn plus a NICE invertible adapter on the embedding output."""

    method: ClassVar[str] = "seq_bn_inv"

    inv_adapter: Optional[str] = "nice"


@dataclass
class DoubleSeqBnInvConfig(DoubleSeqBnConfig):
    """double_seq_bn plus a NICE invertible adapter on the embedding output."""

    method: ClassVar[str] = "double_seq_bn_inv"

    inv_adapter: Optional[str] = "nice"


@dataclass
class ParBnConfig(BottleneckConfig):
    """Parallel adapter: ``ffn(x) + scaling * up(act(down(x)))`` with x the feed-forward block's input.

    read_residual: the adapter reads the feed-forward block's residual input r instead: on a
      pre-LayerNorm decoder (Llama, GPT-2) the residual stream before the block's LayerNorm, as
      AdapterHub's parallel adapter does there (on BERT-like models r is the block's input
      anyway). Needs the architecture's insertion points, not target_modules.
    """

    method: ClassVar[str] = "par_bn"

    reduction_factor: ReductionFactor = 2
    scaling: Union[float, Literal["learned"]] = 4.0
    read_residual: bool = option(
        False, help="read the feed-forward block's residual input (a pre-LN decoder's residual stream, before its "
                    "LayerNorm: AdapterHub's placement there) instead of the block's input")

    def check_placement(self) -> None:
        if self.read_residual and self.target_modules is not None:
            raise ConfigError(f"{self.method} config: read_residual=true needs the architecture's insertion points "
                              f"(the block's residual input), not target_modules; drop one of them")


def _checked_reduction(method: str, value: Any) -> Any:
    def positive(v: Any, where: str) -> None:
        if v <= 0:
            raise ConfigError(f"{method} config: reduction_factor{where}={v} must be a positive number "
                              f"(hidden size / bottleneck size)")

    if not isinstance(value, dict):
        positive(value, "")
        return value
    out: dict[Any, Any] = {}
    for key, factor in value.items():
        if isinstance(key, str) and key != DEFAULT_KEY:
            if not key.isdigit():
                raise ConfigError(f"{method} config: reduction_factor key {key!r} must be a layer index "
                                  f"or {DEFAULT_KEY!r}")
            key = int(key)
        if isinstance(key, int) and key < 0:
            raise ConfigError(f"{method} config: reduction_factor key {key} must be a 0-based layer index")
        positive(factor, f"[{key!r}]")
        out[key] = factor
    if not out:
        raise ConfigError(f"{method} config: reduction_factor={{}} is empty; give a number or a map with "
                          f"layer indices and/or {DEFAULT_KEY!r}")
    return out
