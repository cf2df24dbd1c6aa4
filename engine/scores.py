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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vmap

from engine.autodiff import differentiable_attention, is_forward_ad_error
from engine.config import SCORING_METHODS
from engine.convention import SCORE_CONVENTION
from engine.curvature import (
    Curvature,
    ExactSolver,
    Solver,
    finetune_cross_matvec,
    finetune_head_hessian,
    finetune_joint_hessian,
    pretrain_hessian,
)
from engine.curvature.gauss_newton import CURVATURE_TYPES, gauss_newton
from engine.layer_capture import LayerPlan, layer_plan
from engine.layer_contraction import (
    DEFAULT_MEMORY_BUDGET,
    LayerContraction,
    matches_reference,
)
from engine.task import TwoStageTask
from engine.training import TwoStageFit

log = logging.getLogger(__name__)


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
    # Reuse the dense Hessians training built at the trained point (the exact solver then skips
    # building them again).  Only valid when the task's data and objectives are those the fit
    # was trained on, as in ``python -m engine run``.
    reuse_training_curvature: bool = False
    scoring_method: str = "auto"
    direction_rank: int | None = None   # rank-r directions (layerwise): faster, approximate
    # Bytes per batched intermediate: curvature products (examples and columns chunked under
    # it, see engine.curvature.operators) and the layerwise pass's intermediates.
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    # "hessian" (exact second derivatives) or "gauss_newton" (PSD; an approximation) per stage
    pretrain_curvature: str = "hessian"
    finetune_curvature: str = "hessian"


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


def _check_finite(name: str, value: torch.Tensor, what: str, offset: int = 0) -> None:
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value.reshape(value.shape[0], -1))).any(1).nonzero()
        first = offset + (int(bad[0]) if len(bad) else 0)
        raise ScoringError(
            f"{name}: non-finite values (NaN/inf) for {what} #{first}; check that the loss and "
            "the inputs are finite at the trained parameters")


@differentiable_attention()
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


def _as(kind: str, op: Curvature) -> Curvature:
    """The stage operator as the curvature the arguments name."""
    if kind not in CURVATURE_TYPES:
        raise ScoringError(f"curvature must be one of {CURVATURE_TYPES}, got {kind!r}")
    return gauss_newton(op) if kind == "gauss_newton" else op


@differentiable_attention()
def influence_directions(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                         y_test: torch.Tensor, args: InfluenceArguments,
                         timings: dict[str, float] | None = None,
                         info: dict[str, Any] | None = None) -> Directions:
    """Sensitivities s_pre, s_ft (finetuning-stage solves) and r = H^{-1}[s; 0] (2K columns).

    ``info`` (if given) receives ``cross_term``: how ``A_UT`` was applied (fixed scenario).
    """
    timings = {} if timings is None else timings
    info = {} if info is None else info
    budget = args.memory_budget
    t0 = time.perf_counter()
    gt, gu = test_gradients(task, fit, x_test, y_test)
    k, nt = gt.shape[1], gt.shape[0]
    if task.scenario == "updated" and args.finetune_solver.name == "ekfac":
        raise ScoringError("the finetuning solver 'ekfac' would block-diagonalise B across the "
                           "head T and the backbone U, which zeros the finetuned-model term in "
                           "the updated scenario; use 'ekfac+cg', 'cg' or 'exact'")
    if task.scenario == "fixed":
        a_tt = _as(args.finetune_curvature, finetune_head_hessian(
            task, fit, args.curvature_batch_size, args.reuse_training_curvature, budget))
        solved = args.finetune_solver.solve(a_tt, gt, args.finetune_damping)
        s_pre = gu
        info["cross_term"] = {}
        s_ft = -finetune_cross_matvec(task, fit, solved, args.curvature_batch_size, budget,
                                      info=info["cross_term"])
    else:
        b = _as(args.finetune_curvature, finetune_joint_hessian(
            task, fit, args.curvature_batch_size, args.reuse_training_curvature, budget))
        rhs = torch.cat([
            torch.cat([torch.zeros_like(gt), gu], 0),   # [0; grad_U g]
            torch.cat([gt, torch.zeros_like(gu)], 0),   # [grad_T g; 0]
        ], 1)
        solved = args.finetune_solver.solve(b, rhs, args.finetune_damping)
        s_pre = task.alpha * solved[nt:, :k]
        s_ft = task.alpha * solved[nt:, k:]
    timings["finetune_solve"] = timings.get("finetune_solve", 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    h = _as(args.pretrain_curvature,
            pretrain_hessian(task, fit, args.curvature_batch_size, args.reuse_training_curvature,
                             budget))
    nw = task.w_layout.numel
    s = torch.cat([s_pre, s_ft], 1)
    rhs = torch.cat([s, torch.zeros(nw, 2 * k, dtype=s.dtype)], 0)
    r = args.pretrain_solver.solve(h, rhs, args.pretrain_damping)
    timings["pretrain_solve"] = timings.get("pretrain_solve", 0.0) + time.perf_counter() - t0
    return Directions(s_pre, s_ft, r[:, :k], r[:, k:])


class _PretrainLosses:
    """Per-example pretraining losses as a function of the tracked tensors ``[U blocks, W blocks]``.

    ``params`` holds the tracked tensors at (U*, W*), in the order of the rows of the directions
    (``u_layout`` names, then ``w_layout`` names); untracked backbone tensors stay at U*.
    """

    def __init__(self, task: TwoStageTask, fit: TwoStageFit) -> None:
        self.task = task
        base = fit.backbone_pre
        self.base_params = task.backbone_layout.unflatten(base)
        self.u_names, self.w_names = task.u_layout.names, task.w_layout.names
        self.params = [*task.u_layout.unflatten(task.tracked(base)).values(),
                       *task.w_layout.unflatten(fit.w).values()]

    def __call__(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        nu = len(self.u_names)
        u_p = dict(zip(self.u_names, params[:nu], strict=True))
        w_p = dict(zip(self.w_names, params[nu:], strict=True))
        feats = functional_call(self.task.backbone, {**self.base_params, **u_p}, (x,))
        return self.task.pretrain_loss(functional_call(self.task.pretrain_head, w_p, (feats,)), y)

    def gradient_blocks(self, x: torch.Tensor, y: torch.Tensor,
                        which: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per-example gradients, one ``(batch, numel)`` block per tracked tensor in ``which``.

        Differentiating w.r.t. named tensors (not slices of one flat vector) matters: the backward
        of a slice zero-fills and adds a full (batch, n_params) buffer per parameter tensor.
        """
        which = list(range(len(self.params))) if which is None else list(which)

        def loss_single(sub: list[torch.Tensor], xj: torch.Tensor,
                        yj: torch.Tensor) -> torch.Tensor:
            full = list(self.params)
            for i, t in zip(which, sub, strict=True):
                full[i] = t
            return self(full, xj[None], yj[None]).sum()

        grads = vmap(grad(loss_single), in_dims=(None, 0, 0))(
            [self.params[i] for i in which], x, y)
        return [g.reshape(len(x), -1) for g in grads]


def per_example_gradient_blocks(task: TwoStageTask, fit: TwoStageFit, x: torch.Tensor,
                                y: torch.Tensor) -> list[torch.Tensor]:
    """grad_{U,W} l_pre(z_j) for a batch, one (batch, numel) block per parameter tensor."""
    return _PretrainLosses(task, fit).gradient_blocks(x, y)


def per_example_gradients(task: TwoStageTask, fit: TwoStageFit, x: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor:
    """grad_{U,W} l_pre(z_j) for a batch of pretraining examples, shape (batch, n_u + n_w)."""
    return torch.cat(per_example_gradient_blocks(task, fit, x, y), 1)


# Examples used to estimate the layer covariances of a rank-r scoring pass (evenly spaced).
COVARIANCE_EXAMPLES = 4096


def _layer_plan(losses: _PretrainLosses, r_blocks: Sequence[torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, rank: int | None, batch_size: int,
                memory_budget: int = DEFAULT_MEMORY_BUDGET
                ) -> tuple[LayerContraction | None, LayerPlan | None, str]:
    """The layerwise contraction for the tensors only linear/conv2d/embedding layers use,
    checked on 4 examples against ``vmap(grad)`` per-example gradients.

    Returns (contraction or None, the plan (``plan.other`` minus ``plan.unused`` is left for
    per-example gradients), why-not message).
    """
    probe_x, probe_y = x[:4], y[:4]
    plan = layer_plan(losses, losses.params, probe_x, probe_y)
    if not plan.kinds:
        return None, plan, "no tracked tensor is used only by linear, conv2d or embedding layers"
    # Check the plan on random directions against vmap(grad) per-example gradients; tensors the
    # forward pass never touches are checked to have zero gradients.
    checked = sorted(plan.kinds) + plan.unused
    gen = torch.Generator().manual_seed(0)
    check_dirs = [torch.randn(b.shape[0], 3, generator=gen, dtype=b.dtype) for b in r_blocks]
    check = LayerContraction(losses, losses.params, check_dirs, plan.kinds,
                             memory_budget=memory_budget)
    blocks = losses.gradient_blocks(probe_x, probe_y, checked)
    reference = sum(g @ check_dirs[i] for g, i in zip(blocks, checked, strict=True))
    if not matches_reference(check, reference, probe_x, probe_y):
        return None, plan, ("the layers' inputs and output gradients do not reproduce the "
                            "per-example gradients (the model may not be batch-first)")
    cov_rows = torch.linspace(0, len(x) - 1, min(len(x), COVARIANCE_EXAMPLES)).round().long()
    return LayerContraction(losses, losses.params, r_blocks, plan.kinds, rank,
                            covariance_data=(x[cov_rows], y[cov_rows]), batch_size=batch_size,
                            memory_budget=memory_budget), plan, ""


# Flops per example of the supported layers per parameter of theirs above which a model is
# "position-heavy" (each weight is applied at many positions: conv nets ~170-300, transformers
# 10-25; vector MLPs ~2, embedding models < 1): with tensors left to per-example gradients,
# "auto" then prefers "gradients" to "layerwise" (benchmarks/engine_bench.py --grid).
POSITION_HEAVY_FLOPS_PER_PARAM = 4.0


def _auto_method(losses: _PretrainLosses, contraction: LayerContraction | None,
                 plan: LayerPlan | None, rest: Sequence[int], columns: int,
                 jvp_max_columns: int, rank: int | None, why_not: str, batch_size: int,
                 memory_budget: int) -> tuple[str, str]:
    """The scoring method ``"auto"`` runs, and why.

    Measured with ``benchmarks/engine_bench.py --grid`` (README, "Engine speed and memory"):

    * ``direction_rank`` set: ``"layerwise"`` (rank-r directions need it).
    * Every tracked tensor a linear/conv2d/embedding layer's: ``"layerwise"``: fastest from
      K = 8 on MLPs (2-4x ahead of ``"gradients"``) and at every K on embedding models (up to
      100x: their per-example gradients are huge), tied with ``"gradients"`` on CNNs (within
      +-15%, either way in repeated runs) with memory bounded by the budget, within ~20% of
      ``"jvp"`` at K = 1.
    * Some tensors left to per-example gradients (LayerNorm, GroupNorm, learned positions):
      layerwise then runs the network twice (its pass, and ``vmap(grad)`` for those tensors).
      That pays on models that are not position-heavy (vector MLPs, embeddings: at most
      :data:`POSITION_HEAVY_FLOPS_PER_PARAM` flops per parameter per example in the supported
      layers), where per-example weight gradients are expensive: ``"layerwise"`` (3.6x ahead of
      ``"gradients"`` at K = 8 on an MLP with LayerNorm).  On position-heavy models (conv nets
      with normalization layers, transformers) per-example gradients are cheap next to the
      activations and ``"gradients"`` was 1.1-1.8x faster, so ``"gradients"``, unless its
      per-batch gradient block (``batch_size x parameters``) exceeds ``memory_budget``.
    * No layerwise plan (no supported layer, or the plan failed its check): ``"jvp"`` up to
      ``jvp_max_columns`` columns (2K) on models that are not position-heavy (2-16x ahead of
      per-example gradients at K <= 8 on MLPs, behind at K = 32), else ``"gradients"`` (forward
      mode costs 2K forward passes: 5-70x slower on conv nets from K = 8).
    """
    supported = list(plan.kinds) if plan is not None else []
    p_sup = sum(losses.params[i].numel() for i in supported)
    per_param = plan.flops_per_example() / p_sup if plan is not None and p_sup else 0.0
    heavy = per_param > POSITION_HEAVY_FLOPS_PER_PARAM
    shape = (f"{per_param:.1f} flops per parameter per example in the linear/conv2d/embedding "
             "layers")
    if contraction is not None and rank is not None:
        return "layerwise", "direction_rank is set (rank-r directions need the layerwise pass)"
    if contraction is not None and not rest:
        return "layerwise", "every tracked tensor is a linear, conv2d or embedding layer's"
    if contraction is not None:
        if not heavy:
            return "layerwise", (f"{len(rest)} tensors need per-example gradients, but the "
                                 f"model is not position-heavy ({shape})")
        itemsize = losses.params[0].element_size()
        block = batch_size * sum(p.numel() for p in losses.params) * itemsize
        if block > memory_budget:
            return "layerwise", (f"{len(rest)} tensors need per-example gradients and the "
                                 f"model is position-heavy ({shape}), but a batch of "
                                 f"per-example gradients ({block / 2**30:.2f} GiB) exceeds the "
                                 f"memory budget ({memory_budget / 2**30:.2f} GiB)")
        return "gradients", (f"{len(rest)} tensors need per-example gradients and the model is "
                             f"position-heavy ({shape}): one pass of per-example gradients "
                             "beats layerwise plus a second pass")
    reason = why_not or "no layerwise plan"
    if heavy:
        return "gradients", f"{reason}; position-heavy ({shape})"
    if columns <= jvp_max_columns:
        return "jvp", f"{reason}; {columns} columns <= {jvp_max_columns}: forward mode"
    return "gradients", f"{reason}; {columns} columns > {jvp_max_columns}"


@differentiable_attention()
def score_pretraining(task: TwoStageTask, fit: TwoStageFit, directions: Directions,
                      batch_size: int = 512,
                      progress: Callable[[int, int], None] | None = None,
                      method: str = "auto", jvp_max_columns: int = 32,
                      direction_rank: int | None = None,
                      info: dict[str, Any] | None = None,
                      memory_budget: int = DEFAULT_MEMORY_BUDGET
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream the pretraining data and return (pretrained_term, finetuned_term), (K, M).

    ``score[t, j] = r(t) . grad l(z_j) / M`` is the directional derivative of l(z_j) along r(t):

    * ``"layerwise"``: for tensors used only by linear, conv2d or embedding layers (weights and
      biases of ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``/``nn.EmbeddingBag``, the
      projections of ``nn.MultiheadAttention``), the dot products come from each layer's inputs
      and output gradients (:mod:`engine.layer_contraction`): one forward, one backward, and the
      contraction with the 2K directions, the arithmetic floor of exact scores; any other
      tensor gets per-example gradients as in ``"gradients"``.  ``memory_budget`` (bytes)
      bounds the contraction's intermediates.
    * ``"jvp"``: one forward-mode pass per direction (``jvp`` under ``vmap`` over the 2K
      columns); no per-example gradient is ever formed, cost ~ 2K forward passes.
    * ``"gradients"``: per-example gradients per parameter tensor, contracted block by block
      with all 2K directions at once; cost ~ one per-example backward pass.
    * ``"auto"``: see :func:`_auto_method` (measured with benchmarks/engine_bench.py).

    ``direction_rank`` (layerwise only) replaces each direction's linear weight matrices by
    their best rank-r approximation: faster, and an APPROXIMATION; ``info`` then reports how
    much of the directions was kept.  ``info`` (if given) receives the method that ran and why.
    """
    if method not in SCORING_METHODS:
        raise ValueError(f"unknown scoring method {method!r}; use one of {SCORING_METHODS}")
    if direction_rank is not None and direction_rank < 1:
        raise ScoringError(f"direction_rank must be a positive integer, got {direction_rank}")
    if direction_rank is not None and method not in ("auto", "layerwise"):
        raise ScoringError(f"direction_rank needs scoring_method 'layerwise' or 'auto', not "
                           f"{method!r}")
    x, y = task.pretrain_data
    m, k = len(x), directions.r_pre.shape[1]
    r = torch.cat([directions.r_pre, directions.r_ft], 1) / m
    losses = _PretrainLosses(task, fit)
    r_blocks = torch.split(r, [p.numel() for p in losses.params])
    # Directions per tensor, shaped like it, columns first (the jvp tangents).
    r_views = [b.T.reshape(-1, *p.shape) for b, p in zip(r_blocks, losses.params, strict=True)]
    requested = method
    contraction, plan, rest, why_not = None, None, list(range(len(losses.params))), ""
    if method in ("auto", "layerwise"):
        contraction, plan, why_not = _layer_plan(losses, r_blocks, x, y, direction_rank,
                                                 batch_size, memory_budget)
        if contraction is not None:
            rest = [i for i in plan.other if i not in plan.unused]
    if direction_rank is not None and contraction is None:
        raise ScoringError(f"direction_rank needs tracked tensors used by linear layers: "
                           f"{why_not}")
    if method == "auto":
        method, why = _auto_method(losses, contraction, plan, rest, 2 * k, jvp_max_columns,
                                   direction_rank, why_not, batch_size, memory_budget)
    elif method == "layerwise" and contraction is None:
        log.warning("layerwise scoring unavailable (%s): using per-example gradients", why_not)
        why = f"requested; unavailable ({why_not}), per-example gradients for every tensor"
    else:
        why = "requested"
    if method != "layerwise":
        contraction, rest = None, list(range(len(losses.params)))
    if info is not None:
        info["method"] = method
        info["requested_method"] = requested
        info["why"] = why
        info["per_example_gradient_tensors"] = len(rest) if method != "jvp" else 0
        if contraction is not None:
            names = [*losses.u_names, *losses.w_names]
            kinds = sorted(set(contraction.kinds.values()))
            info["layerwise_tensors"] = {kind: sum(v == kind for v in contraction.kinds.values())
                                         for kind in kinds}
            info["per_example_gradient_names"] = {names[i]: plan.reasons[i] for i in rest}
            if contraction.low_rank is not None:
                info["direction_rank"] = asdict(contraction.low_rank)
    out = torch.empty(m, 2 * k, dtype=r.dtype)
    for start in range(0, m, batch_size):
        sl = slice(start, min(start + batch_size, m))
        xb, yb = x[sl], y[sl]
        if method == "jvp":
            def batch_losses(*params: torch.Tensor, xb=xb, yb=yb) -> torch.Tensor:
                return losses(params, xb, yb)

            try:
                out[sl] = vmap(lambda *v, f=batch_losses: jvp(f, tuple(losses.params), v)[1],
                               in_dims=0, out_dims=1)(*r_views)
            except (NotImplementedError, RuntimeError) as exc:
                if start > 0 or not is_forward_ad_error(exc):
                    raise
                # An operator of the model has no forward-mode rule: per-example gradients.
                log.warning("jvp scoring unavailable (%s): using per-example gradients",
                            str(exc).splitlines()[0])
                method = "gradients"
                if info is not None:
                    info["method"] = method
                    info["why"] = (f"{info.get('why', '')}; forward mode is not implemented for "
                                   "an operator of the model, so per-example gradients")
                    info["per_example_gradient_tensors"] = len(rest)
        if method != "jvp":
            acc = contraction(xb, yb) if contraction is not None else torch.zeros(
                sl.stop - sl.start, 2 * k, dtype=r.dtype)
            if rest:
                for g, i in zip(losses.gradient_blocks(xb, yb, rest), rest, strict=True):
                    acc.addmm_(g, r_blocks[i])
            out[sl] = acc
        # A NaN/inf anywhere in an example's gradient makes its row of the product non-finite.
        _check_finite("pretraining score", out[sl], "pretraining example", offset=start)
        if progress is not None:
            progress(sl.stop, m)
    return out[:, :k].T.contiguous(), out[:, k:].T.contiguous()


@differentiable_attention()
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
    curvature_info: dict[str, Any] = {}
    directions = influence_directions(task, fit, x_test, y_test, args, timings, curvature_info)
    t0 = time.perf_counter()
    scoring: dict[str, Any] = {}
    pre, ft = score_pretraining(task, fit, directions, args.batch_size, progress,
                                method=args.scoring_method, direction_rank=args.direction_rank,
                                info=scoring, memory_budget=args.memory_budget)
    timings["scoring"] = time.perf_counter() - t0
    stage_notes = [f"{stage} stage: {solver.describe()['approximation']}"
                   for stage, solver in (("pretraining", args.pretrain_solver),
                                         ("finetuning", args.finetune_solver))
                   if solver.describe().get("approximation")]
    stage_notes += [f"{stage} stage: Gauss-Newton matrix instead of the Hessian"
                    for stage, kind in (("pretraining", args.pretrain_curvature),
                                        ("finetuning", args.finetune_curvature))
                    if kind == "gauss_newton"]
    notes = [n for n in (task.approximation, *stage_notes, low_rank_note(scoring)) if n]
    settings = {
        "scenario": task.scenario,
        "alpha": task.alpha if task.scenario == "updated" else None,
        "measurement": task.measurement if isinstance(task.measurement, str) else "custom",
        "pretrain": {"damping": args.pretrain_damping, "curvature": args.pretrain_curvature,
                     **args.pretrain_solver.describe(),
                     "weight_decay": task.pretrain_weight_decay},
        "finetune": {"damping": args.finetune_damping, "curvature": args.finetune_curvature,
                     **args.finetune_solver.describe(), **curvature_info,
                     "weight_decay": task.finetune_weight_decay},
        "scoring": scoring,
        "tracked_backbone": list(task.u_layout.names) if task.approximation else "all",
        "approximation": "; ".join(notes) if notes else None,
        "score_convention": SCORE_CONVENTION,
    }
    return InfluenceScores(pre + ft, pre, ft, settings, timings)


def low_rank_note(scoring: dict[str, Any]) -> str | None:
    """The approximation note of a rank-r scoring pass, or ``None`` if it was exact."""
    report = scoring.get("direction_rank")
    if not report or not report["truncated_tensors"]:
        return None
    return (f"directions truncated to rank {report['rank']} in {report['truncated_tensors']} "
            f"weight matrices (keeping an estimated {report['kept_overall']:.1%} of the squared "
            f"scores, {report['kept_min']:.1%} for the worst block), so scores are an "
            "approximation")
