"""The stage objectives as functions of flat parameter vectors (what the trainers minimize).

``pretrain_objective`` / ``finetune_objective`` are full-batch callables for the certified
trainer (:func:`engine.training.minimize`); the ``*_stochastic_objective`` variants give the
same objectives by rows for minibatch training (:class:`StochasticObjective`).

In a data-parallel run (``world`` of several ranks, :mod:`engine.distributed`) the pretraining
objective is evaluated on this rank's shard of the examples: each rank sums its shard's losses,
the sum is all-reduced (:func:`~engine.distributed.sum_across_ranks`) and the regularizer is
added once, after the reduction.  The parameters enter through
:func:`~engine.distributed.replicated`, so gradients and Hessian-vector products (under
``torch.autograd`` and ``torch.func`` alike) are all-reduced too: the trainer sees one callable
with the full-data value, gradient and curvature on every rank, and never knows about ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call

from engine.distributed import DistContext, replicated, sum_across_ranks
from engine.task import TwoStageTask


@dataclass
class StochasticObjective:
    """A stage objective ``(1/n) sum_j loss_j(params) + regularizer(params)``, by rows.

    ``loss_sum(params, rows)`` is the sum of the (weighted) per-example losses of ``rows`` (a
    LongTensor of row indices); a minibatch estimate of the objective divides it by the batch
    size, the full objective by ``n``.
    """

    n: int
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    regularizer: Callable[[torch.Tensor], torch.Tensor]

    def batch(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Unbiased minibatch estimate of the objective."""
        return self.loss_sum(params, rows) / len(rows) + self.regularizer(params)

    def value_and_grad(self, params: torch.Tensor, chunk: int = 1024
                       ) -> tuple[float, torch.Tensor]:
        """The full objective and its gradient, summed over chunks of ``chunk`` rows."""
        p = params.detach().requires_grad_(True)
        reg = self.regularizer(p)
        (total_grad,) = torch.autograd.grad(reg, p)
        value = reg.item()
        for start in range(0, self.n, chunk):
            rows = torch.arange(start, min(start + chunk, self.n), device=p.device)
            part = self.loss_sum(p, rows) / self.n
            (g,) = torch.autograd.grad(part, p)
            total_grad = total_grad + g
            value += part.item()
        return value, total_grad


def pretrain_stochastic_objective(task: TwoStageTask, x: torch.Tensor, y: torch.Tensor,
                                  sample_weights: torch.Tensor | None = None,
                                  world: DistContext | None = None) -> StochasticObjective:
    """:func:`pretrain_objective` by rows: the same losses, weights and weight decay.

    ``world`` (several ranks): every rank draws the same minibatch rows; each computes the
    losses of the rows in its own shard, the sum is all-reduced and the gradient w.r.t. the
    replicated parameters too (data-parallel minibatch training, one all-reduce each way per
    step), so every rank takes the same steps as one process would, up to summation order.
    """
    nb = task.backbone_layout.numel
    wd = task.pretrain_weight_decay
    shard = world.shard(len(x)) if world is not None and world.distributed else None

    def loss_sum(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if shard is not None:
            theta = replicated(theta, world)
            rows = rows[(rows >= shard.lo) & (rows < shard.hi)]
        losses = task.pretrain_loss(task.pretrain_outputs(theta[:nb], theta[nb:], x[rows]),
                                    y[rows])
        if sample_weights is not None:
            losses = losses * sample_weights[rows]
        return losses.sum() if shard is None else sum_across_ranks(losses.sum(), world)

    return StochasticObjective(len(x), loss_sum, lambda theta: 0.5 * wd * (theta * theta).sum())


def finetune_stochastic_objective(task: TwoStageTask, backbone_pre: torch.Tensor,
                                  x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
                                  ) -> StochasticObjective:
    """:func:`finetune_objective` by rows (fixed: features computed once, in chunks)."""
    nt = task.t_layout.numel
    wd = task.finetune_weight_decay
    if task.scenario == "fixed":
        with torch.no_grad():
            feats = torch.cat([task.features(backbone_pre, x[s:s + chunk])
                               for s in range(0, len(x), chunk)])

        def loss_fixed(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            out = functional_call(task.finetune_head, task.t_layout.unflatten(t), (feats[rows],))
            return task.finetune_loss(out, y[rows]).sum()

        return StochasticObjective(len(x), loss_fixed, lambda t: 0.5 * wd * (t * t).sum())

    def loss_updated(tu: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = task.finetune_outputs(tu[:nt], tu[nt:], x[rows])
        return task.finetune_loss(out, y[rows]).sum()

    def reg_updated(tu: torch.Tensor) -> torch.Tensor:
        t, d = tu[:nt], tu[nt:] - backbone_pre
        return 0.5 * wd * (t * t).sum() + 0.5 * task.alpha * (d * d).sum()

    return StochasticObjective(len(x), loss_updated, reg_updated)


def pretrain_objective(task: TwoStageTask, x: torch.Tensor, y: torch.Tensor,
                       sample_weights: torch.Tensor | None = None,
                       world: DistContext | None = None
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """L_pre as a function of the full pretraining vector ``[backbone; w]``.

    ``sample_weights`` multiply each example's loss inside the mean (1 = unchanged); an
    upweighting by ``eps`` of example j is the weight ``1 + M * eps`` at j.  ``world`` (several
    ranks): the same objective, summed over this rank's shard of ``x`` and all-reduced (see the
    module docstring); every rank passes the same full ``x``, ``y`` and weights.
    """
    if world is not None and world.distributed:
        return _sharded_pretrain_objective(task, x, y, sample_weights, world)
    nb = task.backbone_layout.numel
    m = len(x)

    def objective(theta: torch.Tensor) -> torch.Tensor:
        ub, w = theta[:nb], theta[nb:]
        losses = task.pretrain_loss(task.pretrain_outputs(ub, w, x), y)
        if sample_weights is not None:
            losses = losses * sample_weights
        return losses.sum() / m + 0.5 * task.pretrain_weight_decay * (theta * theta).sum()

    return objective


def _sharded_pretrain_objective(task: TwoStageTask, x: torch.Tensor, y: torch.Tensor,
                                sample_weights: torch.Tensor | None, world: DistContext
                                ) -> Callable[[torch.Tensor], torch.Tensor]:
    nb = task.backbone_layout.numel
    m = len(x)
    rows = world.shard(m).rows
    xs, ys = x[rows], y[rows]
    ws = None if sample_weights is None else sample_weights[rows]

    def objective(theta: torch.Tensor) -> torch.Tensor:
        shared = replicated(theta, world)   # gradients w.r.t. theta: summed over ranks
        ub, w = shared[:nb], shared[nb:]
        losses = task.pretrain_loss(task.pretrain_outputs(ub, w, xs), ys)
        if ws is not None:
            losses = losses * ws
        # The regularizer uses theta itself, not `shared`: added once, never all-reduced.
        return (sum_across_ranks(losses.sum(), world) / m
                + 0.5 * task.pretrain_weight_decay * (theta * theta).sum())

    return objective


def finetune_objective(task: TwoStageTask, backbone_pre: torch.Tensor,
                       x: torch.Tensor, y: torch.Tensor
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """L_ft as a function of ``t`` (fixed) or of ``[t; backbone]`` (updated)."""
    nt = task.t_layout.numel

    if task.scenario == "fixed":
        # The backbone is frozen, so its features are computed once.
        feats = task.features(backbone_pre, x).detach()

        def objective(t: torch.Tensor) -> torch.Tensor:
            out = functional_call(task.finetune_head, task.t_layout.unflatten(t), (feats,))
            return (task.finetune_loss(out, y).mean()
                    + 0.5 * task.finetune_weight_decay * (t * t).sum())
        return objective

    def objective_updated(tu: torch.Tensor) -> torch.Tensor:
        t, ub = tu[:nt], tu[nt:]
        d = ub - backbone_pre
        return (task.finetune_loss(task.finetune_outputs(t, ub, x), y).mean()
                + 0.5 * task.finetune_weight_decay * (t * t).sum()
                + 0.5 * task.alpha * (d * d).sum())
    return objective_updated
