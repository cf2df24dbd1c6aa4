"""Multi-stage influence scores of pretraining examples on test points, split in two terms.

For test points t and pretraining examples j (see ``shared/docs/multistage-influence.md``)::

    s_pre(t), s_ft(t)   test sensitivities w.r.t. the pretrained backbone U*     (per scenario)
    r(t)   = H^{-1} [s(t); 0]                                                 (2 solves per t)
    score  = (1/M) r(t)^T grad_{U,W} l_pre(z_j)                               (a dot product)

``score`` is the predicted change of the test loss (the measurement) if z_j is removed and both
stages are retrained: > 0 helpful, < 0 harmful.  ``pretrained_term`` uses s_pre (the path through
the backbone), ``finetuned_term`` uses s_ft (the path through the finetuning head), and
``total = pretrained_term + finetuned_term``.

Per-example gradients are computed with ``vmap(grad)`` in batches of ``batch_size`` and
immediately contracted with the stacked directions, so memory is bounded by the batch size,
never by the number of pretraining examples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad, vmap

from engine.curvature import (
    finetune_cross_matvec,
    finetune_head_hessian,
    finetune_joint_hessian,
    pretrain_hessian,
)
from engine.solvers import ExactSolver, Solver
from engine.task import TwoStageTask
from engine.training import TwoStageFit

log = logging.getLogger(__name__)

SCORE_CONVENTION = (
    "score = predicted change of the test loss if the pretraining example is removed and both "
    "stages are retrained; score > 0: helpful; score < 0: harmful; "
    "total = pretrained_term + finetuned_term"
)


class ScoringError(ValueError):
    """Scores cannot be computed from these inputs."""


@dataclass
class InfluenceArguments:
    """How curvature is inverted and how the pretraining data is streamed."""

    pretrain_damping: float = 0.0
    finetune_damping: float = 0.0
    pretrain_solver: Solver = field(default_factory=ExactSolver)
    finetune_solver: Solver = field(default_factory=ExactSolver)
    batch_size: int = 512
    curvature_batch_size: int = 1024


@dataclass
class InfluenceScores:
    """Score matrices of shape ``(n_test, n_pretrain)`` and the settings that produced them."""

    total: torch.Tensor
    pretrained_term: torch.Tensor
    finetuned_term: torch.Tensor
    settings: dict[str, Any]
    timings: dict[str, float]


@dataclass
class Directions:
    """Per-test-point vectors: sensitivities ``s`` (n_u, K) and directions ``r`` (n_u + n_w, K)."""

    s_pre: torch.Tensor
    s_ft: torch.Tensor
    r_pre: torch.Tensor
    r_ft: torch.Tensor


def _check_finite(name: str, value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value.reshape(value.shape[0], -1))).any(1).nonzero()
        first = int(bad[0]) if len(bad) else -1
        raise ScoringError(
            f"{name}: non-finite values (NaN/inf) for {what} {first}; check that the loss and the "
            "inputs are finite at the trained parameters")


def test_gradients(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                   y_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-test-point gradients of the measurement: (grad_T g, grad_U g), shapes (n, K)."""
    base = fit.backbone_ft
    u0 = task.tracked(base)

    def g_single(t: torch.Tensor, u: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        return task.measure(t, base, x[None], y[None], u).sum()

    gt, gu = vmap(grad(g_single, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        fit.t, u0, x_test, y_test)
    _check_finite("measurement gradient", torch.cat([gt, gu], 1), "test point")
    return gt.T.contiguous(), gu.T.contiguous()


def influence_directions(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                         y_test: torch.Tensor, args: InfluenceArguments,
                         timings: dict[str, float] | None = None) -> Directions:
    """Sensitivities s_pre, s_ft (finetuning-stage solves) and r = H^{-1}[s; 0] (2K columns)."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    gt, gu = test_gradients(task, fit, x_test, y_test)
    k, nt = gt.shape[1], gt.shape[0]
    if task.scenario == "fixed":
        a_tt = finetune_head_hessian(task, fit, args.curvature_batch_size)
        solved = args.finetune_solver.solve(a_tt, gt, args.finetune_damping)
        s_pre = gu
        s_ft = -finetune_cross_matvec(task, fit, solved, args.curvature_batch_size)
    else:
        b = finetune_joint_hessian(task, fit, args.curvature_batch_size)
        rhs = torch.cat([
            torch.cat([torch.zeros_like(gt), gu], 0),   # [0; grad_U g]
            torch.cat([gt, torch.zeros_like(gu)], 0),   # [grad_T g; 0]
        ], 1)
        solved = args.finetune_solver.solve(b, rhs, args.finetune_damping)
        s_pre = task.alpha * solved[nt:, :k]
        s_ft = task.alpha * solved[nt:, k:]
    timings["finetune_solve"] = timings.get("finetune_solve", 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    h = pretrain_hessian(task, fit, args.curvature_batch_size)
    nw = task.w_layout.numel
    s = torch.cat([s_pre, s_ft], 1)
    rhs = torch.cat([s, torch.zeros(nw, 2 * k, dtype=s.dtype)], 0)
    r = args.pretrain_solver.solve(h, rhs, args.pretrain_damping)
    timings["pretrain_solve"] = timings.get("pretrain_solve", 0.0) + time.perf_counter() - t0
    return Directions(s_pre, s_ft, r[:, :k], r[:, k:])


def per_example_gradients(task: TwoStageTask, fit: TwoStageFit, x: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor:
    """grad_{U,W} l_pre(z_j) for a batch of pretraining examples, shape (batch, n_u + n_w)."""
    base = fit.backbone_pre
    nu = task.u_layout.numel

    def loss_single(theta: torch.Tensor, xj: torch.Tensor, yj: torch.Tensor) -> torch.Tensor:
        return task.pretrain_loss(
            task.pretrain_outputs(base, theta[nu:], xj[None], theta[:nu]), yj[None]).sum()

    theta = torch.cat([task.tracked(base), fit.w])
    return vmap(grad(loss_single), in_dims=(None, 0, 0))(theta, x, y)


def score_pretraining(task: TwoStageTask, fit: TwoStageFit, directions: Directions,
                      batch_size: int = 512,
                      progress: Callable[[int, int], None] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream per-example gradients and return (pretrained_term, finetuned_term), (K, M)."""
    x, y = task.pretrain_data
    m, k = len(x), directions.r_pre.shape[1]
    r = torch.cat([directions.r_pre, directions.r_ft], 1) / m
    out = torch.empty(m, 2 * k, dtype=r.dtype)
    for start in range(0, m, batch_size):
        sl = slice(start, min(start + batch_size, m))
        g = per_example_gradients(task, fit, x[sl], y[sl])
        _check_finite("pretraining per-example gradient", g,
                      f"pretraining example (offset {start})")
        out[sl] = g @ r
        if progress is not None:
            progress(sl.stop, m)
    return out[:, :k].T.contiguous(), out[:, k:].T.contiguous()


def compute_scores(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                   y_test: torch.Tensor, args: InfluenceArguments | None = None,
                   progress: Callable[[int, int], None] | None = None) -> InfluenceScores:
    """Influence of every pretraining example on every test point, split into two terms."""
    args = args or InfluenceArguments()
    if len(x_test) == 0:
        raise ScoringError("no test points to score")
    if len(x_test) != len(y_test):
        raise ScoringError(f"{len(x_test)} test inputs but {len(y_test)} test targets")
    timings: dict[str, float] = {}
    directions = influence_directions(task, fit, x_test, y_test, args, timings)
    t0 = time.perf_counter()
    pre, ft = score_pretraining(task, fit, directions, args.batch_size, progress)
    timings["scoring"] = time.perf_counter() - t0
    settings = {
        "scenario": task.scenario,
        "alpha": task.alpha if task.scenario == "updated" else None,
        "measurement": task.measurement if isinstance(task.measurement, str) else "custom",
        "pretrain": {"damping": args.pretrain_damping, **args.pretrain_solver.describe(),
                     "weight_decay": task.pretrain_weight_decay},
        "finetune": {"damping": args.finetune_damping, **args.finetune_solver.describe(),
                     "weight_decay": task.finetune_weight_decay},
        "tracked_backbone": list(task.u_layout.names) if task.approximation else "all",
        "approximation": task.approximation,
        "score_convention": SCORE_CONVENTION,
    }
    return InfluenceScores(pre + ft, pre, ft, settings, timings)
