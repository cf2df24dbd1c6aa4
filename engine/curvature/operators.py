"""Curvature operators of both stages as Hessian-vector products (``torch.func``).

Each operator is symmetric and acts on flat parameter vectors; many right-hand sides are applied
in one pass over the data (``vmap`` over the columns).  Damping is never stored here: solvers add
``damping * v`` on the fly, so the same operator serves any damping.

=====================  ============================  ==========================================
operator               variables                     matrix
=====================  ============================  ==========================================
:func:`pretrain_hessian`   ``theta = [u; w]``        H = d2 L_pre at (U*, W*)
:func:`finetune_head_hessian`  ``t``                 A_TT = d2 L_ft / dT2 at (T^, U*)  (fixed)
:func:`finetune_joint_hessian` ``[t; u]``            B = d2 L_ft + alpha diag(0, I) at (T^, U^)
=====================  ============================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, jvp, vjp, vmap

from engine.curvature.errors import NonFiniteCurvatureError
from engine.task import TwoStageTask
from engine.training import StageFit, TwoStageFit

# (params, x_batch, y_batch) -> sum of per-example losses over the batch (no regularizer).
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Curvature:
    """A symmetric curvature ``(1/n) sum_i d2 loss_i + diag(reg)`` evaluated at ``point``."""

    name: str
    batch_loss: BatchLoss
    point: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    reg_diag: torch.Tensor
    batch_size: int = 1024
    # Eigendecomposition (ascending) of this exact matrix, when training already built it at
    # this very point (see :func:`_trained_eigen`); the exact solver then reuses it.
    eigen: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dim(self) -> int:
        return self.point.numel()

    @property
    def n_examples(self) -> int:
        return len(self.x)

    def _data_hvp(self, V: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        g = grad(lambda p: self.batch_loss(p, xb, yb))

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return jvp(g, (self.point,), (v,))[1]

        return vmap(hvp, in_dims=1, out_dims=1)(V)

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """Curvature times each column of ``V`` (shape ``(dim, k)``), one pass over the data."""
        out = self.reg_diag[:, None] * V
        for start in range(0, self.n_examples, self.batch_size):
            sl = slice(start, start + self.batch_size)
            out = out + self._data_hvp(V, self.x[sl], self.y[sl]) / self.n_examples
        self._check(out)
        return out

    def _check(self, out: torch.Tensor) -> None:
        if not torch.isfinite(out).all():
            raise NonFiniteCurvatureError(
                f"{self.name}: a Hessian-vector product is NaN or infinite, so a loss, an input or "
                "a parameter is not finite at the trained parameters; check the data for NaN/inf "
                "features and that training converged")

    def matvec_sample(self, V: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Unbiased estimate of :meth:`matvec` from the examples ``idx`` (stochastic solvers)."""
        out = self.reg_diag[:, None] * V + self._data_hvp(V, self.x[idx], self.y[idx]) / len(idx)
        self._check(out)
        return out

    def dense(self, chunk: int = 256) -> torch.Tensor:
        """The full matrix (a new tensor each call), built from HVPs with identity columns."""
        eye = torch.eye(self.dim, dtype=self.point.dtype)
        cols = [self.matvec(eye[:, s : s + chunk]) for s in range(0, self.dim, chunk)]
        mat = torch.cat(cols, dim=1)
        return 0.5 * (mat + mat.T)  # symmetrize away floating-point asymmetry


def _trained_eigen(task: TwoStageTask, stage: StageFit | None, point: torch.Tensor,
                   reuse: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The training stage's final dense Hessian, if asked for (``reuse``: the task still holds
    the data it was trained on) and if it is this operator's matrix: same variables (every
    backbone parameter tracked) and built at exactly ``point``.  Each stage's training objective
    is the matrix's objective (losses + the same regularizers)."""
    cur = None if stage is None or not reuse else stage.curvature
    if (cur is None or task.u_layout.numel != task.backbone_layout.numel
            or cur.point.shape != point.shape or not torch.equal(cur.point, point)):
        return None
    return cur.evals, cur.evecs


def pretrain_hessian(task: TwoStageTask, fit: TwoStageFit, batch_size: int = 1024,
                     reuse_training: bool = False) -> Curvature:
    """H: Hessian of L_pre w.r.t. the tracked backbone and the pretraining head at (U*, W*)."""
    base = fit.backbone_pre
    nu = task.u_layout.numel

    def batch_loss(theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        u, w = theta[:nu], theta[nu:]
        return task.pretrain_loss(task.pretrain_outputs(base, w, xb, u), yb).sum()

    point = torch.cat([task.tracked(base), fit.w])
    reg = torch.full_like(point, task.pretrain_weight_decay)
    x, y = task.pretrain_data
    return Curvature("pretraining Hessian H", batch_loss, point, x, y, reg, batch_size,
                     _trained_eigen(task, fit.pretrain, point, reuse_training))


def finetune_head_hessian(task: TwoStageTask, fit: TwoStageFit, batch_size: int = 1024,
                          reuse_training: bool = False) -> Curvature:
    """A_TT: Hessian of L_ft w.r.t. the finetuning head at (T^, U*) (fixed scenario)."""
    base = fit.backbone_ft

    def batch_loss(t: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return task.finetune_loss(task.finetune_outputs(t, base, xb), yb).sum()

    reg = torch.full_like(fit.t, task.finetune_weight_decay)
    x, y = task.finetune_data
    return Curvature("finetuning head Hessian A_TT", batch_loss, fit.t, x, y, reg, batch_size,
                     _trained_eigen(task, fit.finetune, fit.t, reuse_training))


def finetune_joint_hessian(task: TwoStageTask, fit: TwoStageFit, batch_size: int = 1024,
                           reuse_training: bool = False) -> Curvature:
    """B = d2 L_ft / d(T,U)2 + alpha diag(0, I) at (T^, U^) (updated scenario)."""
    base = fit.backbone_ft
    nt = task.t_layout.numel

    def batch_loss(tu: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        t, u = tu[:nt], tu[nt:]
        return task.finetune_loss(task.finetune_outputs(t, base, xb, u), yb).sum()

    u = task.tracked(base)
    point = torch.cat([fit.t, u])
    reg = torch.cat([torch.full_like(fit.t, task.finetune_weight_decay),
                     torch.full_like(u, task.alpha)])
    x, y = task.finetune_data
    return Curvature("finetuning joint Hessian B", batch_loss, point, x, y, reg, batch_size,
                     _trained_eigen(task, fit.finetune, point, reuse_training))


def finetune_cross_matvec(task: TwoStageTask, fit: TwoStageFit, V: torch.Tensor,
                          batch_size: int = 1024) -> torch.Tensor:
    """A_UT V: mixed second derivative d/dU (dL_ft/dT) at (T^, U*) times columns of ``V``.

    Shape ``(n_t, k) -> (n_u, k)``; the regularizer ||T||^2 has no cross term.
    """
    base = fit.backbone_ft
    u0 = task.tracked(base)
    x, y = task.finetune_data
    n = len(x)
    out = torch.zeros(u0.numel(), V.shape[1], dtype=V.dtype)
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]

        def grad_t(u: torch.Tensor, xb=xb, yb=yb) -> torch.Tensor:
            return grad(lambda t: task.finetune_loss(
                task.finetune_outputs(t, base, xb, u), yb).sum())(fit.t)

        _, pullback = vjp(grad_t, u0)
        out = out + vmap(lambda v, pb=pullback: pb(v)[0], in_dims=1, out_dims=1)(V) / n
    return out
