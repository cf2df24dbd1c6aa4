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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.func import grad, jvp, vmap

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
from engine.distributed import DistContext, Shard, guarded
from engine.layer_contraction import DEFAULT_MEMORY_BUDGET
from engine.scoring_methods import (
    COVARIANCE_EXAMPLES,
    POSITION_HEAVY_FLOPS_PER_PARAM,
    _auto_method,
    _layer_plan,
    _PretrainLosses,
    per_example_gradient_blocks,
    per_example_gradients,
)
from engine.task import TwoStageTask
from engine.training import TwoStageFit

log = logging.getLogger(__name__)

__all__ = [   # the per-example gradient helpers live in engine.scoring_methods
    "COVARIANCE_EXAMPLES", "POSITION_HEAVY_FLOPS_PER_PARAM", "Directions", "InfluenceArguments",
    "InfluenceScores", "ScoringError", "compute_scores", "influence_directions",
    "low_rank_note", "per_example_gradient_blocks", "per_example_gradients",
    "score_pretraining", "test_gradients",
]


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
    """Score matrices of shape ``(n_test, n_pretrain)`` and the settings that produced them.

    In a data-parallel run the columns are this rank's pretraining examples only:
    ``pretrain_rows`` = ``[lo, hi)`` (``None``: every example).
    """

    total: torch.Tensor
    pretrained_term: torch.Tensor
    finetuned_term: torch.Tensor
    settings: dict[str, Any]
    timings: dict[str, float]
    pretrain_rows: tuple[int, int] | None = None


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
                         info: dict[str, Any] | None = None,
                         world: DistContext | None = None) -> Directions:
    """Sensitivities s_pre, s_ft (finetuning-stage solves) and r = H^{-1}[s; 0] (2K columns).

    ``info`` (if given) receives ``cross_term``: how ``A_UT`` was applied (fixed scenario).
    ``world`` (several ranks): H's products are summed over the ranks' shards; the finetuning
    stage and the solves run redundantly on every rank, which all return the same directions.
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
                             budget, world=world))
    nw = task.w_layout.numel
    s = torch.cat([s_pre, s_ft], 1)
    rhs = torch.cat([s, torch.zeros(nw, 2 * k, dtype=s.dtype, device=s.device)], 0)
    r = args.pretrain_solver.solve(h, rhs, args.pretrain_damping)
    timings["pretrain_solve"] = timings.get("pretrain_solve", 0.0) + time.perf_counter() - t0
    return Directions(s_pre, s_ft, r[:, :k], r[:, k:])


@differentiable_attention()
def score_pretraining(task: TwoStageTask, fit: TwoStageFit, directions: Directions,
                      batch_size: int = 512,
                      progress: Callable[[int, int], None] | None = None,
                      method: str = "auto", jvp_max_columns: int = 32,
                      direction_rank: int | None = None,
                      info: dict[str, Any] | None = None,
                      memory_budget: int = DEFAULT_MEMORY_BUDGET,
                      rows: Shard | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream the pretraining data and return (pretrained_term, finetuned_term), (K, M).

    ``rows`` (a data-parallel rank's shard): score only pretraining examples ``[lo, hi)``;
    the result is then ``(K, hi - lo)``.  The scores are divided by the full M either way, and
    the method choice and layer plan use the same (first, evenly spaced) examples on every rank.

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
    lo, hi = (0, m) if rows is None else (rows.lo, rows.hi)
    out = torch.empty(hi - lo, 2 * k, dtype=r.dtype, device=r.device)
    for start in range(lo, hi, batch_size):
        sl = slice(start, min(start + batch_size, hi))
        xb, yb = x[sl], y[sl]
        dst = slice(sl.start - lo, sl.stop - lo)
        if method == "jvp":
            def batch_losses(*params: torch.Tensor, xb=xb, yb=yb) -> torch.Tensor:
                return losses(params, xb, yb)

            try:
                out[dst] = vmap(lambda *v, f=batch_losses: jvp(f, tuple(losses.params), v)[1],
                                in_dims=0, out_dims=1)(*r_views)
            except (NotImplementedError, RuntimeError) as exc:
                if start > lo or not is_forward_ad_error(exc):
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
                sl.stop - sl.start, 2 * k, dtype=r.dtype, device=r.device)
            if rest:
                for g, i in zip(losses.gradient_blocks(xb, yb, rest), rest, strict=True):
                    acc.addmm_(g, r_blocks[i])
            out[dst] = acc
        # A NaN/inf anywhere in an example's gradient makes its row of the product non-finite.
        _check_finite("pretraining score", out[dst], "pretraining example", offset=start)
        if progress is not None:
            progress(sl.stop - lo, hi - lo)
    return out[:, :k].T.contiguous(), out[:, k:].T.contiguous()


@differentiable_attention()
def compute_scores(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                   y_test: torch.Tensor, args: InfluenceArguments | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   world: DistContext | None = None) -> InfluenceScores:
    """Influence of every pretraining example on every test point, split into two terms.

    ``world`` (a data-parallel run, :mod:`engine.distributed`): the pretraining Hessian's sums
    are reduced over the ranks, and each rank scores its own shard of the pretraining examples
    (``InfluenceScores.pretrain_rows``).  The scoring pass makes no collective call; a rank
    that fails in it fails every rank with a :class:`~engine.distributed.RankFailedError`
    naming it.
    """
    args = args or InfluenceArguments()
    if len(x_test) == 0:
        raise ScoringError("no test points to score")
    if len(x_test) != len(y_test):
        raise ScoringError(f"{len(x_test)} test inputs but {len(y_test)} test targets")
    timings: dict[str, float] = {}
    curvature_info: dict[str, Any] = {}
    directions = influence_directions(task, fit, x_test, y_test, args, timings, curvature_info,
                                      world=world)
    t0 = time.perf_counter()
    scoring: dict[str, Any] = {}
    shard = world.shard(task.n_pretrain) if world is not None and world.distributed else None
    with guarded(world or DistContext(), "scoring its pretraining examples"
                 if shard is None else f"scoring pretraining examples [{shard.lo}, {shard.hi})"):
        pre, ft = score_pretraining(task, fit, directions, args.batch_size, progress,
                                    method=args.scoring_method,
                                    direction_rank=args.direction_rank, info=scoring,
                                    memory_budget=args.memory_budget, rows=shard)
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
        "device": str(task.device),   # where it was computed (the scores are there too)
    }
    return InfluenceScores(pre + ft, pre, ft, settings, timings,
                           None if shard is None else (shard.lo, shard.hi))


def low_rank_note(scoring: dict[str, Any]) -> str | None:
    """The approximation note of a rank-r scoring pass, or ``None`` if it was exact."""
    report = scoring.get("direction_rank")
    if not report or not report["truncated_tensors"]:
        return None
    return (f"directions truncated to rank {report['rank']} in {report['truncated_tensors']} "
            f"weight matrices (keeping an estimated {report['kept_overall']:.1%} of the squared "
            f"scores, {report['kept_min']:.1%} for the worst block), so scores are an "
            "approximation")
