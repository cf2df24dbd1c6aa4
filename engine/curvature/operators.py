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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad

from engine.autodiff import REVERSE, differentiable_attention, hvp_columns, select_hvp_mode
from engine.curvature.errors import (
    MEMORY_SETTINGS,
    CurvatureMemoryError,
    NonFiniteCurvatureError,
    is_allocation_error,
)
from engine.curvature.stage_functions import StageFunction, finetune_function, pretrain_function
from engine.distributed import DistContext, Shard, all_reduce_sum
from engine.task import TwoStageTask
from engine.training import StageFit, TwoStageFit

log = logging.getLogger(__name__)

# (params, x_batch, y_batch) -> sum of per-example losses over the batch (no regularizer).
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# ----- memory estimates ------------------------------------------------------------------------
DEFAULT_MEMORY_BUDGET = 4 << 30    # bytes
MIN_EXAMPLE_CHUNK = 16
# Peak memory of one batched Hessian-vector product on b examples with k columns, in values of
# the parameters' dtype (times its size in bytes):
#
#     ACTIVATION_FACTOR * (k + 1) * b * a  +  PARAMETER_FACTOR * k * P
#
# P = parameters, a = values autograd saves per example in ONE first-order forward pass
# (measured by saved_elements_per_example: inputs of every layer, conv inputs, attention
# matrices...).  Each column carries tangents (forward mode) or backward-of-backward
# intermediates (reverse mode) of the activations, and parameter-sized gradients, tangents and
# outputs; the "+ 1" is the primal pass shared by the columns.  Measured peak RSS of one product
# over this estimate (float32, torch 2.13 CPU, b = 32-2048, k = 4-32): a 181k-parameter CNN on
# 28x28 images (a = 192k) 0.66-0.68 forward mode, 0.59 reverse mode; a 100k-parameter MLP
# (a = 1.0k) 0.57-0.72 forward, 0.31 reverse.  The cruder "parameters x columns x batch" bound
# would be 0.36x the CNN's real peak (b = 64, k = 4: an underestimate) and
# 31x the MLP's (b = 512, k = 8: chunks far smaller than needed).
ACTIVATION_FACTOR = 3
PARAMETER_FACTOR = 10


def product_bytes(dim: int, activations: float, examples: int, columns: int,
                  itemsize: int) -> float:
    """Estimated peak bytes of one batched product (formula above)."""
    return itemsize * (ACTIVATION_FACTOR * (columns + 1) * examples * activations
                       + PARAMETER_FACTOR * columns * dim)


def plan_chunks(name: str, dim: int, activations: float, examples: int, columns: int,
                batch_size: int, budget: float, itemsize: int) -> tuple[int, int]:
    """(examples, columns) per chunk so that :func:`product_bytes` stays under ``budget``;
    raises :class:`CurvatureMemoryError` when not even one example and one column fit."""
    b = max(1, min(batch_size, examples))
    per_value = budget / itemsize
    if product_bytes(dim, activations, b, columns, itemsize) <= budget:
        return b, columns
    fit = int((per_value - PARAMETER_FACTOR * columns * dim)
              // (ACTIVATION_FACTOR * (columns + 1) * activations))
    b_min = min(b, MIN_EXAMPLE_CHUNK)
    if fit >= b_min:
        return min(b, fit), columns
    for bb in dict.fromkeys((b_min, 1)):
        k = int((per_value - ACTIVATION_FACTOR * bb * activations)
                // (ACTIVATION_FACTOR * bb * activations + PARAMETER_FACTOR * dim))
        if k >= 1:
            return bb, min(columns, k)
    need = product_bytes(dim, activations, 1, 1, itemsize)
    raise CurvatureMemoryError(
        f"{name}: one Hessian-vector product on a single example needs about "
        f"{need / 2**30:.3g} GB ({dim} parameters, ~{activations:.0f} activation values per "
        f"example, {itemsize}-byte floats), above the memory budget of {budget / 2**30:.3g} GB; "
        "raise `[influence] memory_budget_gb` (InfluenceArguments.memory_budget) or track fewer "
        "backbone parameters")


def saved_elements_per_example(batch_loss: BatchLoss, point: torch.Tensor, x: torch.Tensor,
                               y: torch.Tensor) -> float:
    """Values autograd saves per example for a first-order backward pass of ``batch_loss``:
    the difference between one and three examples (parameters saved once cancel out)."""

    def saved(count: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel()
            return t

        p = point.detach().clone().requires_grad_(True)
        with (torch.enable_grad(), differentiable_attention(),
              torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)):
            batch_loss(p, x[:count], y[:count])
        return total

    try:
        if len(x) >= 3:
            one, three = saved(1), saved(3)
            return float(max((three - one) / 2, 1))
        return float(max(saved(len(x)) / max(len(x), 1), 1))
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        # Not measurable (a loss that autograd cannot trace): one parameter-sized value per
        # example, the crude bound.
        log.debug("activation probe failed (%s); assuming %d values per example", exc,
                  point.numel())
        return float(point.numel())



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
    # The stage as a function of its named tensors (layer structure for EK-FAC), when known.
    function: StageFunction | None = None
    # Bytes one batched product may use (estimated, see :meth:`estimate_bytes`): examples and,
    # if need be, columns are chunked to stay below it.
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    # FORWARD or REVERSE (engine.autodiff), chosen at the first product and kept.
    hvp_mode: str | None = None
    # Data-parallel runs (engine.distributed): ``x``/``y`` hold this rank's ``shard`` of the
    # stage's ``shard.total`` examples, and every product's data sum is all-reduced over
    # ``world``, once per product whatever the rank's chunks, so every rank gets the full
    # matrix's product.  ``None``: all examples are here (a plain run).
    world: DistContext | None = None
    shard: Shard | None = None
    # Caches set on first use (plain attributes, not fields, so that copying an operator's
    # fields into another dataclass, as engine.curvature.gauss_newton does, still works):
    # ``_activations`` (see activation_elements) and ``_widest`` = (columns, examples per chunk,
    # columns per chunk) of the widest product so far.

    @property
    def dim(self) -> int:
        return self.point.numel()

    @property
    def n_examples(self) -> int:
        """Examples in the curvature's mean (all ranks' together in a data-parallel run)."""
        return self.shard.total if self.sharded else len(self.x)

    @property
    def sharded(self) -> bool:
        """Whether ``x`` is one rank's shard and products are all-reduced."""
        return self.shard is not None and self.world is not None and self.world.distributed

    # ----- memory ---------------------------------------------------------------------------
    def activation_elements(self) -> float:
        """Values autograd saves per example in one first-order forward pass (measured once)."""
        if getattr(self, "_activations", None) is None:
            self._activations = saved_elements_per_example(self.batch_loss, self.point, self.x,
                                                           self.y)
        return self._activations

    def estimate_bytes(self, examples: int, columns: int) -> float:
        """Estimated peak bytes of one batched product (see ``ACTIVATION_FACTOR``)."""
        return product_bytes(self.dim, self.activation_elements(), examples, columns,
                             self.point.element_size())

    def plan(self, columns: int, examples: int | None = None) -> tuple[int, int]:
        """(examples, columns) per chunk of a product with ``columns`` right-hand sides over
        ``examples`` examples (default: all), so that :meth:`estimate_bytes` fits the budget.

        Examples are chunked first (every chunk still batches all columns, sharing the primal
        pass); columns only when fewer than ``MIN_EXAMPLE_CHUNK`` examples would fit.
        """
        n = len(self.x) if examples is None else examples   # the rows this process holds
        return plan_chunks(self.name, self.dim, self.activation_elements(), max(n, 1),
                           max(columns, 1), self.batch_size, self.memory_budget,
                           self.point.element_size())

    def describe(self) -> dict[str, Any]:
        """How the products were computed (mode, chunks, budget), for solvers' reports."""
        w = getattr(self, "_widest", None)
        return {"hvp": self.hvp_mode, "memory_budget_gb": self.memory_budget / 2**30,
                "hvp_chunk": None if w is None else {"examples": w[1], "columns": w[2],
                                                     "of_columns": w[0]}}

    # ----- products -------------------------------------------------------------------------
    def _mode(self, xb: torch.Tensor, yb: torch.Tensor) -> str:
        if self.hvp_mode is None:
            probe_x, probe_y = xb[:2], yb[:2]
            g = grad(lambda p: self.batch_loss(p, probe_x, probe_y))
            self.hvp_mode = select_hvp_mode(g, self.point)
            if self.hvp_mode == REVERSE:
                log.info("%s: forward-mode AD is not implemented for an operator of the model; "
                         "using reverse-over-reverse Hessian-vector products", self.name)
        return self.hvp_mode

    def _data_hvp(self, V: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        mode = self._mode(xb, yb)
        g = grad(lambda p: self.batch_loss(p, xb, yb))
        try:
            return hvp_columns(g, self.point, V, mode)
        except (RuntimeError, MemoryError) as exc:
            if not is_allocation_error(exc) and not isinstance(exc, MemoryError):
                raise
            raise CurvatureMemoryError(
                f"{self.name}: out of memory in a Hessian-vector product on {len(xb)} examples x "
                f"{V.shape[1]} columns (estimated "
                f"{self.estimate_bytes(len(xb), V.shape[1]) / 2**30:.3g} GB, memory budget "
                f"{self.memory_budget / 2**30:.3g} GB); lower {MEMORY_SETTINGS}") from exc

    def _apply(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
        """``diag(reg) V + (1/n) sum_{examples in x} d2 loss_i V``, chunked to the budget
        (sharded: the data sum is over every rank's ``x``)."""
        k = V.shape[1]
        if self.sharded:
            return self._apply_sharded(V, x, y, n)
        if k == 0 or len(x) == 0:
            return self.reg_diag[:, None] * V
        b, c = self.plan(k, len(x))
        widest = getattr(self, "_widest", None)
        if widest is None or k >= widest[0]:
            self._widest = (k, b, c)
        parts = []
        for cs in range(0, k, c):
            Vc = V[:, cs : cs + c]
            out = self.reg_diag[:, None] * Vc
            for start in range(0, len(x), b):
                sl = slice(start, start + b)
                out = out + self._data_hvp(Vc, x[sl], y[sl]) / n
            parts.append(out)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        self._check(out)
        return out

    def _apply_sharded(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       n: int) -> torch.Tensor:
        # The local chunks may differ between ranks (uneven shards, an empty one): sum them
        # here, then make exactly one all-reduce per product on every rank.
        k = V.shape[1]
        data = torch.zeros_like(V)
        if k and len(x):
            b, c = self.plan(k, len(x))
            widest = getattr(self, "_widest", None)
            if widest is None or k >= widest[0]:
                self._widest = (k, b, c)
            for cs in range(0, k, c):
                acc = data[:, cs : cs + c]
                for start in range(0, len(x), b):
                    sl = slice(start, start + b)
                    acc += self._data_hvp(V[:, cs : cs + c], x[sl], y[sl]) / n
        out = self.reg_diag[:, None] * V + all_reduce_sum(data, self.world)
        self._check(out)
        return out

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """Curvature times each column of ``V`` (shape ``(dim, k)``), one pass over the data
        (per column chunk)."""
        return self._apply(V, self.x, self.y, self.n_examples)

    def _check(self, out: torch.Tensor) -> None:
        if not torch.isfinite(out).all():
            raise NonFiniteCurvatureError(
                f"{self.name}: a Hessian-vector product is NaN or infinite, so a loss, an input or "
                "a parameter is not finite at the trained parameters; check the data for NaN/inf "
                "features and that training converged")

    def matvec_sample(self, V: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Unbiased estimate of :meth:`matvec` from the examples ``idx`` (stochastic solvers;
        indices into all ``n_examples``, drawn identically on every rank when sharded)."""
        if self.sharded:
            local = self.shard.local(idx)
            return self._apply(V, self.x[local], self.y[local], len(idx))
        return self._apply(V, self.x[idx], self.y[idx], len(idx))

    def dense(self, chunk: int = 256) -> torch.Tensor:
        """The full matrix (a new tensor each call), built from HVPs with identity columns,
        ``chunk`` columns at a time (the identity is never built whole)."""
        cols = []
        for s in range(0, self.dim, chunk):
            width = min(chunk, self.dim - s)
            dev = self.point.device
            eye = torch.zeros(self.dim, width, dtype=self.point.dtype, device=dev)
            eye[torch.arange(s, s + width, device=dev), torch.arange(width, device=dev)] = 1.0
            cols.append(self.matvec(eye))
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
                     reuse_training: bool = False,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET,
                     world: DistContext | None = None) -> Curvature:
    """H: Hessian of L_pre w.r.t. the tracked backbone and the pretraining head at (U*, W*).

    ``world`` (several ranks): the operator holds this rank's shard of the pretraining examples
    and all-reduces its products (see :class:`Curvature`)."""
    base = fit.backbone_pre
    nu = task.u_layout.numel

    def batch_loss(theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        u, w = theta[:nu], theta[nu:]
        return task.pretrain_loss(task.pretrain_outputs(base, w, xb, u), yb).sum()

    point = torch.cat([task.tracked(base), fit.w])
    reg = torch.full_like(point, task.pretrain_weight_decay)
    x, y = task.pretrain_data
    shard = None
    if world is not None and world.distributed:
        shard = world.shard(len(x))
        x, y = x[shard.rows], y[shard.rows]
    return Curvature("pretraining Hessian H", batch_loss, point, x, y, reg, batch_size,
                     _trained_eigen(task, fit.pretrain, point, reuse_training),
                     function=pretrain_function(task, fit), memory_budget=memory_budget,
                     world=world if shard is not None else None, shard=shard)


def finetune_head_hessian(task: TwoStageTask, fit: TwoStageFit, batch_size: int = 1024,
                          reuse_training: bool = False,
                          memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Curvature:
    """A_TT: Hessian of L_ft w.r.t. the finetuning head at (T^, U*) (fixed scenario)."""
    base = fit.backbone_ft

    def batch_loss(t: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return task.finetune_loss(task.finetune_outputs(t, base, xb), yb).sum()

    reg = torch.full_like(fit.t, task.finetune_weight_decay)
    x, y = task.finetune_data
    return Curvature("finetuning head Hessian A_TT", batch_loss, fit.t, x, y, reg, batch_size,
                     _trained_eigen(task, fit.finetune, fit.t, reuse_training),
                     function=finetune_function(task, fit, with_backbone=False),
                     memory_budget=memory_budget)


def finetune_joint_hessian(task: TwoStageTask, fit: TwoStageFit, batch_size: int = 1024,
                           reuse_training: bool = False,
                           memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Curvature:
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
                     _trained_eigen(task, fit.finetune, point, reuse_training),
                     function=finetune_function(task, fit, with_backbone=True),
                     memory_budget=memory_budget)


def finetune_cross_matvec(task: TwoStageTask, fit: TwoStageFit, V: torch.Tensor,
                          batch_size: int = 1024, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                          info: dict[str, Any] | None = None) -> torch.Tensor:
    """A_UT V: mixed second derivative d/dU (dL_ft/dT) at (T^, U*) times columns of ``V``.

    Shape ``(n_t, k) -> (n_u, k)``; the regularizer ||T||^2 has no cross term.  Computed
    reverse-over-reverse (the pullback w.r.t. U of the head gradient), which needs no
    forward-mode rule, so it works on every model; examples and columns are chunked like
    :meth:`Curvature.plan` (variables ``[t; u]``) to stay under ``memory_budget``.  ``info``
    (if given) receives the mode and the chunks.
    """
    base = fit.backbone_ft
    u0 = task.tracked(base)
    x, y = task.finetune_data
    n = len(x)
    nt = fit.t.numel()

    def joint_loss(tu: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return task.finetune_loss(task.finetune_outputs(tu[:nt], base, xb, tu[nt:]), yb).sum()

    planner = Curvature("finetuning cross term A_UT", joint_loss, torch.cat([fit.t, u0]), x, y,
                        torch.zeros(0, device=V.device), batch_size,
                        memory_budget=memory_budget)
    k = V.shape[1]
    b, c = planner.plan(k)
    if info is not None:
        info.update({"hvp": REVERSE, "hvp_chunk": {"examples": b, "columns": c}})
    parts = []
    for cs in range(0, k, c):
        Vc = V[:, cs : cs + c]
        out = torch.zeros(u0.numel(), Vc.shape[1], dtype=V.dtype, device=V.device)
        for start in range(0, n, b):
            xb, yb = x[start : start + b], y[start : start + b]

            def grad_t(u: torch.Tensor, xb=xb, yb=yb) -> torch.Tensor:
                return grad(lambda t: task.finetune_loss(
                    task.finetune_outputs(t, base, xb, u), yb).sum())(fit.t)

            try:
                out = out + hvp_columns(grad_t, u0, Vc, REVERSE) / n
            except (RuntimeError, MemoryError) as exc:
                if not is_allocation_error(exc) and not isinstance(exc, MemoryError):
                    raise
                raise CurvatureMemoryError(
                    f"{planner.name}: out of memory in a product on {len(xb)} examples x "
                    f"{Vc.shape[1]} columns (estimated "
                    f"{planner.estimate_bytes(len(xb), Vc.shape[1]) / 2**30:.3g} GB, memory "
                    f"budget {memory_budget / 2**30:.3g} GB); lower {MEMORY_SETTINGS}") from exc
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
