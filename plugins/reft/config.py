"""ReFT's configs (torch-free): the ``reft`` method and its presets ``loreft``, ``noreft``, ``direft``.

The options are those of AdapterHub's ``adapters`` (ReftConfig and its LoReftConfig, NoReftConfig,
DiReftConfig), with the same names and meanings, so a folder converts both ways without loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, LAYER_SELECTION_FIELDS, option, refuse_layer_selection

#: Activation names ``non_linearity`` accepts (transformers' names, as ``adapters`` reads them;
#: ``leakyrelu`` is torch's leaky_relu with slope 0.01). None: no activation.
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "sigmoid", "leakyrelu")


@dataclass
class ReftConfig(AdapterConfig):
    """Interventions on the hidden states a transformer layer outputs, at chosen token positions.

    At each chosen position, a layer's output h becomes ``h + R^T (act(W h + b) - R h)`` (Wu et al.,
    arXiv 2404.03592): R (r x hidden) projects onto an r-dimensional subspace, W and b are learned.
    ``orthogonality`` keeps R's rows orthonormal (LoReFT); without ``subtract_projection`` the term
    ``- R h`` is left out (DiReFT). The positions are the first ``prefix_positions`` and the last
    ``suffix_positions`` real (attention-mask) tokens of each row; see docs/methods/reft.md.
    """

    method: ClassVar[str] = "reft"
    refused_options: ClassVar[tuple[str, ...]] = LAYER_SELECTION_FIELDS

    layers: Union[Literal["all"], list[int]] = option(
        "all", help='the transformer layers whose output is intervened on: "all" or a list of layer indices')
    prefix_positions: int = option(3, help="intervene on the first this many real tokens of each row")
    suffix_positions: int = option(0, help="intervene on the last this many real tokens of each row")
    r: int = option(1, help="rank: the dimension of the subspace the intervention edits")
    orthogonality: bool = option(
        True, help="keep the projection's rows orthonormal (an orthogonal parametrization, as adapters)")
    tied_weights: bool = option(False, help="one intervention for prefix and suffix positions (else one each)")
    subtract_projection: bool = option(
        True, help="subtract the projection R h of the input (LoReFT, NoReFT); false is DiReFT")
    dropout: float = option(
        0.05, help="during training, dropout on the intervened positions' new hidden states (adapters' default)")
    non_linearity: Optional[str] = option(
        None, help=f"activation on W h + b: null (none) or one of {', '.join(NON_LINEARITIES)}")
    init_weights_seed: Optional[int] = option(
        None, help="draw every intervention's initial weights from this seed (all layers then start equal)")

    def check(self) -> None:
        refuse_layer_selection(self, "ReFT intervenes on whole layers' outputs; choose them with layers=[...]")
        name = self.method
        if self.r <= 0:
            raise ConfigError(f"{name} config: r={self.r} must be a positive integer")
        if self.prefix_positions < 0 or self.suffix_positions < 0:
            raise ConfigError(f"{name} config: prefix_positions={self.prefix_positions} and suffix_positions="
                              f"{self.suffix_positions} must be 0 or more")
        if self.prefix_positions == 0 and self.suffix_positions == 0:
            raise ConfigError(f"{name} config: prefix_positions and suffix_positions are both 0, so it would "
                              f"intervene nowhere; set at least one to a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{name} config: dropout={self.dropout} must be in [0, 1)")
        if self.non_linearity is not None and self.non_linearity.lower() not in NON_LINEARITIES:
            raise ConfigError(f"{name} config: non_linearity={self.non_linearity!r} is not one of "
                              f"{', '.join(NON_LINEARITIES)} (or null for none)")
        if isinstance(self.layers, list):
            if not self.layers:
                raise ConfigError(f'{name} config: layers=[] names no layer; give indices or "all"')
            if any(index < 0 for index in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"{name} config: layers={self.layers} must be distinct indices, 0 or more")

    @property
    def unit_indices(self) -> tuple[int, ...]:
        """The interventions each chosen layer holds (see :func:`unit_indices`)."""
        return unit_indices(self.tied_weights, self.prefix_positions, self.suffix_positions)


def unit_indices(tied_weights: bool, prefix_positions: int, suffix_positions: int) -> tuple[int, ...]:
    """The interventions of one layer, numbered as ``adapters`` numbers them: 0 for the prefix (or for
    both, tied), 1 for the suffix. Only those with positions to act on are made (``adapters`` makes
    both unless tied, and leaves one unused when prefix or suffix positions are 0)."""
    if tied_weights:
        return (0,)
    return tuple(i for i, count in ((0, prefix_positions), (1, suffix_positions)) if count > 0)


@dataclass
class LoReftConfig(ReftConfig):
    """LoReFT: low-rank linear subspace ReFT, R with orthonormal rows (adapters' LoReftConfig)."""

    method: ClassVar[str] = "loreft"


@dataclass
class NoReftConfig(ReftConfig):
    """NoReFT: LoReFT without the orthogonality of R (adapters' NoReftConfig)."""

    method: ClassVar[str] = "noreft"

    orthogonality: bool = False


@dataclass
class DiReftConfig(ReftConfig):
    """DiReFT: NoReFT without subtracting the projection R h (adapters' DiReftConfig)."""

    method: ClassVar[str] = "direft"

    orthogonality: bool = False
    subtract_projection: bool = False
