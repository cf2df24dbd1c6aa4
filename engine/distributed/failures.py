"""A failure on one rank fails the whole run, with a message that names the rank.

Phases that make no collective call (the scoring pass over a rank's own examples, writing its
score block, rank 0's map and manifest) run inside :func:`guarded`: an exception there is caught,
the rank goes on to the phase's end, and there every rank learns which ranks failed and why (one
all-reduce of a flag per rank, then the messages), and raises :class:`RankFailedError` naming
them.  The ranks therefore stay in step, and rank 0 never swaps a run into place that another
rank did not finish.

Phases with collectives inside (training, curvature solves) are not guarded: catching there
would leave the other ranks waiting in a collective that the failed rank never joins.  An
exception there ends the rank's process; its peers' next collective then fails on the closed
connection, and ``torchrun`` reports the rank that failed first.  In a world of one
:func:`guarded` changes nothing: the original exception propagates unchanged.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from engine.distributed.group import DistContext
from engine.distributed.reduce import all_reduce_sum
from engine.distributed.traffic import record


class RankFailedError(RuntimeError):
    """One or more ranks of a distributed run failed; raised on every rank."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def agree(world: DistContext, what: str, error: BaseException | None) -> None:
    """Every rank calls this at the same point: raises :class:`RankFailedError` on every rank
    when any rank passes an ``error`` (in a world of one: re-raises ``error`` itself)."""
    if not world.distributed:
        if error is not None:
            raise error
        return
    flags = torch.zeros(world.world_size, dtype=torch.int64)
    flags[world.rank] = int(error is not None)
    failed = [int(r) for r in torch.nonzero(all_reduce_sum(flags, world)).flatten()]
    if not failed:
        return
    # Every rank saw the same flags, so every rank makes this second collective too.  Each
    # failed rank describes its own failure (``what`` may name its shard).
    messages: list[str | None] = [None] * world.world_size
    mine = None if error is None else f"failed while {what}: {_describe(error)}"
    dist.all_gather_object(messages, mine)
    record("all_gather_object", len(pickle.dumps(mine)))
    parts = [f"rank {r} of {world.world_size} {messages[r]}" for r in failed]
    exc = RankFailedError("; ".join(parts) + ". Nothing was written; fix the cause and re-run.",
                          failed)
    if error is not None:
        raise exc from error
    raise exc


@contextmanager
def guarded(world: DistContext, what: str) -> Iterator[None]:
    """Run a phase WITHOUT collectives inside; at its end every rank agrees on the outcome
    (see the module docstring).  ``what`` completes "rank R failed while ..."."""
    error: Exception | None = None
    try:
        yield
    except Exception as exc:   # noqa: BLE001 - reported by agree(), on every rank
        error = exc
    agree(world, what, error)
