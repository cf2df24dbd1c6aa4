"""Sum all-reduces over the ranks of a run, plain and differentiable; gathers of per-row data.

Every helper takes the run's :class:`~engine.distributed.group.DistContext` and is the identity
in a world of one.  Each makes exactly one collective call per call, whatever the size of the
rank's shard (an empty one included), so ranks that run the same code issue the same
collectives in the same order.

Float64-safe: floating tensors travel and are summed in float64 (float32/half values are
converted, summed, and converted back once), so the cross-rank sum adds no rounding of the
narrower type; float64 stays float64.  After an all-reduce every rank holds the same bits
(gloo and NCCL send the reduced chunks to everyone), which keeps replicated computations (the
trainer, the solvers) identical on every rank.

Differentiable pair for objectives evaluated on shards (Megatron's "f"/"g" operators), usable
under ``torch.autograd`` and ``torch.func`` (``grad``, ``vjp``, ``jvp``, ``vmap``):

* :func:`replicated` — identity forward; the backward all-reduces the gradient, so the
  gradient of a shard's loss w.r.t. a replicated parameter vector is the full-data gradient;
* :func:`sum_across_ranks` — all-reduce forward (the full-data value); identity backward.

``sum_across_ranks(loss_of_shard(replicated(theta)))`` then has the full-data value, gradient
and Hessian-vector products (forward-over-reverse and reverse-over-reverse) on every rank.

Every collective reports its call and payload bytes to the active
log (:class:`~engine.distributed.traffic.CommunicationLog`; none active: one list test).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.distributed.group import DistContext
from engine.distributed.shards import Shard
from engine.distributed.traffic import CommunicationLog, logging_active, record

__all__ = ["CommunicationLog", "all_reduce_scalar", "all_reduce_sum", "broadcast_object",
           "gather_rows", "gather_rows_numpy", "replicated", "sum_across_ranks"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _transit_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_floating_point:
        return torch.float64
    if dtype.is_complex or dtype == torch.bool:
        return dtype
    return torch.int64


def all_reduce_sum(tensor: torch.Tensor, world: DistContext) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all ranks (a new tensor; ``tensor`` itself in a
    world of one), in ``tensor``'s dtype and device."""
    if not world.distributed:
        return tensor
    buf = tensor.detach().to(device=world.device, dtype=_transit_dtype(tensor.dtype),
                             copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    record("all_reduce", _nbytes(buf))
    return buf.to(device=tensor.device, dtype=tensor.dtype)


def all_reduce_scalar(value: float | int, world: DistContext) -> float:
    """The sum of a Python number over all ranks (as a float; float64 in transit)."""
    if not world.distributed:
        return float(value)
    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64), world)[0])


def broadcast_object(obj: Any, world: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=world.device)
    if logging_active():   # the pickled size, measured only when someone counts
        record("broadcast", len(pickle.dumps(box[0])))
    return box[0]


def gather_rows(local: torch.Tensor, world: DistContext, shard: Shard, dst: int = 0
                ) -> torch.Tensor | None:
    """The rows of every rank's shard, in row order, on rank ``dst`` (``None`` elsewhere).

    ``local`` holds this rank's ``shard.size`` rows (any trailing shape, same on every rank).
    Shards are padded to the largest one for the transfer only; the padding never reaches the
    result.  In a world of one, ``local`` itself.
    """
    if not world.distributed:
        return local
    if len(local) != shard.size:
        raise ValueError(f"rank {world.rank}: {len(local)} rows for a shard of {shard.size}")
    shards = world.shards(shard.total)
    width = max(s.size for s in shards)
    dtype = _transit_dtype(local.dtype)
    buf = torch.zeros(width, *local.shape[1:], dtype=dtype, device=world.device)
    buf[: shard.size] = local.detach().to(device=world.device, dtype=dtype)
    parts = ([torch.empty_like(buf) for _ in shards] if world.rank == dst else None)
    dist.gather(buf, parts, dst=dst)
    record("gather", _nbytes(buf))
    if parts is None:
        return None
    rows = torch.cat([p[: s.size] for p, s in zip(parts, shards, strict=True)])
    return rows.to(device=local.device, dtype=local.dtype)


def gather_rows_numpy(local: np.ndarray, world: DistContext, shard: Shard, dst: int = 0
                      ) -> np.ndarray | None:
    """:func:`gather_rows` for a numpy array (float or integer rows)."""
    out = gather_rows(torch.from_numpy(np.ascontiguousarray(local)), world, shard, dst)
    return None if out is None else out.numpy()


# ----- differentiable collectives -----------------------------------------------------------
# The world rides along as a non-tensor argument of ``apply`` (no gradient, no tangent, no
# batch dimension).


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce forward, identity backward (each rank keeps its own cotangent)."""

    @staticmethod
    def forward(x: torch.Tensor, world: DistContext) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_sum(x, world)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.world = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, _: Any) -> torch.Tensor:
        return _SumAcrossRanks.apply(tangent, ctx.world)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, world: DistContext
             ) -> tuple[torch.Tensor, int | None]:
        # One all-reduce of the whole batch of columns: still one collective per call.
        return _SumAcrossRanks.apply(x, world), in_dims[0]


class _Replicated(torch.autograd.Function):
    """Identity forward, all-reduce backward (the gradient of a replicated input)."""

    @staticmethod
    def forward(x: torch.Tensor, world: DistContext) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.world = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _SumAcrossRanks.apply(grad, ctx.world), None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, _: Any) -> torch.Tensor:
        return tangent

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, world: DistContext
             ) -> tuple[torch.Tensor, int | None]:
        return _Replicated.apply(x, world), in_dims[0]


def sum_across_ranks(x: torch.Tensor, world: DistContext) -> torch.Tensor:
    """Differentiable all-reduce: the full-data value of a per-shard quantity ``x``."""
    return _SumAcrossRanks.apply(x, world) if world.distributed else x


def replicated(x: torch.Tensor, world: DistContext) -> torch.Tensor:
    """Mark a tensor held identically on every rank: gradients w.r.t. it are all-reduced."""
    return _Replicated.apply(x, world) if world.distributed else x
