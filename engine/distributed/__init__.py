"""Data-parallel runs on ``torch.distributed``: ``torchrun --nproc_per_node N -m engine run``.

==============  ==========================================================================
module          what it holds
==============  ==========================================================================
``group``       :class:`DistContext` (rank, world size, backend) from the torchrun
                environment; :data:`SINGLE`, the world of one of a plain run
``shards``      contiguous ``[lo, hi)`` shards of the pretraining examples, uneven sizes
``reduce``      sum all-reduces (float64 in transit), the differentiable pair
                :func:`replicated` / :func:`sum_across_ranks`, row gathers, broadcasts
``traffic``     :class:`CommunicationLog`: collective calls and bytes, counted while active
``failures``    :func:`guarded` phases and :class:`RankFailedError`: a failing rank fails
                the run on every rank, naming it
``writing``     the run directory written by ranks: rank 0 stages, creates the score files
                and seals; every rank writes its own score columns
==============  ==========================================================================

What is distributed: every sum over pretraining examples (the pretraining objective's value,
gradient and Hessian-vector products in training; the pretraining Hessian's products in the
curvature solvers) is computed on each rank's shard and all-reduced; per-example outputs
(scores, pretraining losses, backbone features for the map) are computed on each rank's own
rows.  The finetuning stage, the test gradients and the solves themselves (small, replicated
inputs) run redundantly on every rank.  Nothing here imports the rest of the engine except
:mod:`engine.artifacts` (in ``writing``).
"""

from engine.distributed.failures import RankFailedError, agree, guarded
from engine.distributed.group import (
    SINGLE,
    DistContext,
    backend_for,
    init_from_env,
    launched_by_torchrun,
    shutdown,
)
from engine.distributed.reduce import (
    CommunicationLog,
    all_reduce_scalar,
    all_reduce_sum,
    broadcast_object,
    gather_rows,
    gather_rows_numpy,
    replicated,
    sum_across_ranks,
)
from engine.distributed.shards import Shard, shard_bounds, shard_of

__all__ = [
    "SINGLE",
    "CommunicationLog",
    "DistContext",
    "RankFailedError",
    "Shard",
    "agree",
    "all_reduce_scalar",
    "all_reduce_sum",
    "backend_for",
    "broadcast_object",
    "gather_rows",
    "gather_rows_numpy",
    "guarded",
    "init_from_env",
    "launched_by_torchrun",
    "replicated",
    "shard_bounds",
    "shard_of",
    "shutdown",
    "sum_across_ranks",
]
