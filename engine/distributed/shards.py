"""Contiguous shards of the pretraining examples: explicit ``[lo, hi)`` bounds, one per rank.

Rows are split as evenly as possible without padding: the first ``M % world_size`` ranks get
one row more, so M = 1,001 over 2 ranks is ``[0, 501)`` and ``[501, 1001)``.  No row is ever
duplicated to even out the sizes (a padded duplicate would be counted twice in every sum), and a
rank may hold an empty shard when there are fewer rows than ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Rows ``[lo, hi)`` of ``total`` rows."""

    lo: int
    hi: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi <= self.total:
            raise ValueError(f"a shard needs 0 <= lo <= hi <= total, got [{self.lo}, {self.hi}) "
                             f"of {self.total}")

    @property
    def size(self) -> int:
        """Number of rows in the shard."""
        return self.hi - self.lo

    @property
    def rows(self) -> slice:
        """The shard as a slice of the full rows."""
        return slice(self.lo, self.hi)

    @property
    def whole(self) -> bool:
        """Whether the shard is every row (a world of one)."""
        return self.lo == 0 and self.hi == self.total

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions, within the shard, of those global row indices ``idx`` that fall in it."""
        inside = (idx >= self.lo) & (idx < self.hi)
        return idx[inside] - self.lo


def shard_bounds(total: int, world_size: int) -> list[Shard]:
    """The shard of every rank, in rank order (contiguous, uneven by at most one row)."""
    if total < 0:
        raise ValueError(f"the number of rows must be >= 0, got {total}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    base, extra = divmod(total, world_size)
    out, lo = [], 0
    for rank in range(world_size):
        hi = lo + base + (1 if rank < extra else 0)
        out.append(Shard(lo, hi, total))
        lo = hi
    return out


def shard_of(total: int, rank: int, world_size: int) -> Shard:
    """The shard of ``rank`` (see :func:`shard_bounds`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return shard_bounds(total, world_size)[rank]
