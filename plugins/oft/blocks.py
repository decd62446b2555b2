"""How OFT cuts a layer's input features into rotation blocks (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass


def nearest_divisor(dimension: int, wanted: int) -> int:
    """The divisor of ``dimension`` closest to ``wanted`` (the smaller one on a tie; ``dimension`` itself
    when ``wanted`` exceeds it): PEFT's correction of a block size or count that does not divide the layer."""
    if wanted >= dimension:
        return dimension
    below = next(d for d in range(wanted, 0, -1) if dimension % d == 0)
    above = next(d for d in range(wanted, dimension + 1) if dimension % d == 0)
    return below if wanted - below <= above - wanted else above


@dataclass(frozen=True)
class OftBlocks:
    """``count`` rotation blocks of ``size`` features each over the layer's ``in_features``.

    ``stored`` is how many rotations are trained (1 with block_share); each is
    stored as the ``size * (size - 1) / 2`` entries above the diagonal of a
    skew-symmetric matrix, PEFT's ``oft_R.weight`` of shape (stored, entries).
    """

    in_features: int
    count: int
    size: int
    shared: bool

    @classmethod
    def plan(cls, in_features: int, r: int, oft_block_size: int, block_share: bool) -> "OftBlocks":
        if r == 0:
            size = oft_block_size
            if in_features % size or size > in_features:
                size = nearest_divisor(in_features, size)
            return cls(in_features, in_features // size, size, block_share)
        count = r if in_features % r == 0 and r <= in_features else nearest_divisor(in_features, r)
        return cls(in_features, count, in_features // count, block_share)

    @property
    def stored(self) -> int:
        return 1 if self.shared else self.count

    @property
    def entries(self) -> int:
        return self.size * (self.size - 1) // 2

    def parameter_count(self) -> int:
        return self.stored * self.entries
