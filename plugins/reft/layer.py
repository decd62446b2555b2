"""ReFT's layer adapter: interventions on a transformer layer's output at the chosen positions.

The module wraps a whole transformer layer (``model.layers.3``, ``encoder.layer.3``): ``h`` is the
hidden state the layer outputs. Positions come from the model's current forward
(:mod:`.batch`). Both the prefix and the suffix intervention read ``h``; their results replace
``h`` at their positions (the suffix's last, where they overlap), as in ``adapters``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peftkit.plugin_api import ConfigError, LayerAdapter

from .batch import ForwardBatch
from .units import BASE_KEY, ORIGINAL_KEY, ROWS_KEY, ReftUnit, frame_for_rows

#: Unit index -> which positions it acts on when weights are not tied (``adapters``' numbering).
PREFIX, SUFFIX = 0, 1


class ReftIntervention(LayerAdapter):
    """File keys ``units.<i>.learned_source.{weight,bias}`` and ``units.<i>.projection...`` (``adapters``' names)."""

    #: The change is not a function of the layer's input: it depends on the output h and on the positions
    #: of the current batch (compositions then take it as forward(x, h) - h).
    additive = False

    def __init__(self, batch: ForwardBatch, width: int, *, r: int, prefix_positions: int, suffix_positions: int,
                 unit_indices: tuple[int, ...], orthogonal: bool, subtract_projection: bool,
                 activation: str | None, dropout: float, dtype: torch.dtype, seed: int | None = None) -> None:
        super().__init__()
        self.prefix_positions, self.suffix_positions = prefix_positions, suffix_positions
        # one unit serves the suffix too (tied_weights; prefix_positions may be 0: then it is the suffix's)
        self.tied = unit_indices == (0,) and suffix_positions > 0
        units = {}
        for index in unit_indices:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            units[str(index)] = ReftUnit(width, r, orthogonal=orthogonal, subtract_projection=subtract_projection,
                                         activation=activation, dropout=dropout, dtype=dtype, generator=generator,
                                         frame_seed=seed if seed is not None else 0)
        self.units = nn.ModuleDict(units)
        self.out_features = width  # the site's output width (a fusion placed here reads it)
        self.__dict__["batch"] = batch  # shared by every intervention on the model; not a submodule
        batch.attach(self)

    def unit_for(self, kind: int) -> ReftUnit:
        return self.units["0" if self.tied else str(kind)]

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        index = self.batch.positions(h, self.prefix_positions, self.suffix_positions)
        if index is None:
            return h
        rows, _, width = h.shape
        slot = torch.cat([h, h.new_zeros(rows, 1, width)], dim=1)  # skipped positions point past the end
        parts = []
        for kind, positions in ((PREFIX, index[0]), (SUFFIX, index[1])):
            if positions.shape[1] == 0:
                continue
            where = positions[:, :, None].expand(-1, -1, width)
            unit = self.unit_for(kind)
            states = slot.gather(1, where)
            dtype = unit.learned_source.weight.dtype
            parts.append((where, unit(states.to(dtype)).to(h.dtype)))
        for where, new in parts:  # both read h; the suffix's result is written last
            slot = slot.scatter(1, where, new)
        return slot[:, :-1]

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.forward(x, h, base) - h

    # -- peftkit's own files: R itself in place of its orthogonal frame ----------------------------

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """``tensors()``, but an orthonormal R is saved as its rows ``units.<i>.projection.weight`` (r x hidden)
        instead of the frame ``adapters`` keeps (``...original`` and the hidden x hidden ``...0.base``, which
        is not trained): what R is, in a file a small fraction of the size."""
        out = {}
        for key, tensor in self.tensors().items():
            unit, _, rest = key.partition(".")[2].partition(".")
            if rest == BASE_KEY:
                continue
            if rest == ORIGINAL_KEY:
                key, tensor = f"units.{unit}.{ROWS_KEY}", self.units[unit].projection.weight.detach()
            out[key] = tensor
        return out

    def tensors_from_file(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An orthonormal unit's saved rows R become the frame that gives exactly R (:func:`frame_for_rows`);
        a file with the frame itself (saved by peftkit before 2026-12, or by ``adapters``) passes unchanged."""
        out = dict(saved)
        for index, unit in self.units.items():
            key = f"units.{index}.{ROWS_KEY}"
            if not unit.orthogonal or key not in out:
                continue
            rows = out.pop(key)
            expected = tuple(unit.projection.parametrizations.weight.original.shape)
            if tuple(rows.shape) != expected:
                raise ConfigError(f"{key} is {tuple(rows.shape)} in the file and {expected} (r x hidden) in this "
                                  f"adapter; the file was saved for another r or model")
            try:
                original, frame = frame_for_rows(rows)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            out[f"units.{index}.{ORIGINAL_KEY}"], out[f"units.{index}.{BASE_KEY}"] = original, frame
        return out

    def removed(self, base: nn.Module) -> None:
        self.batch.detach(self)

    def extra_repr(self) -> str:
        return (f"prefix_positions={self.prefix_positions}, suffix_positions={self.suffix_positions}, "
                f"units={list(self.units)}, tied={self.tied}")
