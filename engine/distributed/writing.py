"""Writing one run from many ranks: rank 0 stages and seals it, every rank writes its scores.

The protocol (every step after the first is reached by every rank, see
:mod:`engine.distributed.failures`):

1. rank 0 checks the destination and creates the staging directory; its path is broadcast;
2. rank 0 creates the three score files (float32 ``.npy`` opened as memory maps);
3. every rank writes the score columns of its own pretraining examples, ``[lo, hi)``;
4. (barrier: every rank finished) rank 0 alone writes the tables, the map, the trained
   parameters and the manifest (which records the world size and backend), hashes every file,
   and swaps the run into place.

A rank that fails in steps 2-4 fails the run on every rank (:class:`RankFailedError`), and rank
0 then removes the staging directory instead of swapping it in, so no partial run is left.  All
ranks must see the same file system at ``--out`` (one node, or a shared file system).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine import artifacts
from engine.atomic_dir import Staging
from engine.distributed.failures import guarded
from engine.distributed.group import DistContext
from engine.distributed.reduce import broadcast_object
from engine.distributed.shards import Shard


class RankStaging:
    """A non-zero rank's view of rank 0's staging directory: the paths only; rank 0 owns the
    directory, its lock and its removal."""

    def __init__(self, dest: Path, path: Path) -> None:
        self.dest, self.path = dest, path

    def close(self) -> None:
        """Nothing to release: rank 0 removes or swaps the directory."""

    def __enter__(self) -> RankStaging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_staging(world: DistContext, out_dir: str | os.PathLike, overwrite: bool,
                 echo: Callable[[str], None] | None = None) -> Staging | RankStaging:
    """:func:`engine.artifacts.open_destination` on rank 0, shared with every rank (step 1).

    A refusal (existing ``--out`` without ``--overwrite``, unwritable location) fails every
    rank with rank 0's message.
    """
    if not world.distributed:
        return artifacts.open_destination(out_dir, overwrite, echo)
    staging: Staging | None = None
    with guarded(world, "opening the run directory"):
        if world.is_main:
            staging = artifacts.open_destination(out_dir, overwrite, echo)
    path = broadcast_object(str(staging.path) if staging is not None else None, world)
    if staging is not None:
        return staging
    return RankStaging(Path(out_dir).absolute(), Path(path))


def write_scores_by_rank(world: DistContext, staging: Staging | RankStaging, shard: Shard,
                         n_test: int, blocks: dict[str, np.ndarray]) -> None:
    """Steps 2-3: rank 0 creates the score files, then every rank writes its columns
    ``blocks[name]`` (``(n_test, shard.size)``) at ``shard.lo``.  Returns once every rank has
    written (the barrier before rank 0 seals the run)."""
    with guarded(world, "creating the score files"):
        if world.is_main:
            artifacts.create_score_files(staging.path, n_test, shard.total)
    with guarded(world, f"writing the scores of pretraining examples [{shard.lo}, {shard.hi})"):
        artifacts.write_score_columns(staging.path, shard.lo, blocks)


def seal_on_main(world: DistContext, staging: Staging | RankStaging,
                 seal: Callable[[], Path]) -> Path:
    """Step 4: rank 0 runs ``seal`` (write the rest, the manifest, swap into place); every rank
    returns the run's path once it is in place, or raises if rank 0 failed."""
    with guarded(world, "writing the manifest and swapping the run into place"):
        if world.is_main:
            seal()
    return staging.dest
