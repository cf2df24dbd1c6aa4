"""Training routines for both stages: L-BFGS, then trust-region Newton that certifies a minimum.

Influence functions assume each stage sits at a *minimum* of its objective (gradient ~ 0,
positive definite Hessian).  Each stage is trained full-batch in two phases:

1. **L-BFGS** (strong Wolfe) until the gradient norm is below ``NewtonSettings``'s switch point
   (``switch_grad``, default 1e-4) or until a stall detector sees no progress for 100
   iterations; both are cheap per iteration but slow in the tail, and their trajectory depends
   on floating-point details (BLAS kernels, thread counts).
2. **Trust-region Newton** (:mod:`engine.trust_region`): exact dense Hessian + eigendecomposition
   for models up to ``dense_max_dim`` variables, Steihaug CG on Hessian-vector products above.
   It takes the gradient to ``tolerance`` in a handful of steps and checks the curvature where it
   stops; at a saddle it steps along negative curvature and hands back to L-BFGS.  A saddle is
   never reported as converged.

Every phase reports progress through a :class:`TrainingMonitor`; the final status, gradient
norm, smallest Hessian eigenvalue and how it was obtained are recorded in the results.  Users
may skip these routines and bring already trained parameters (see :func:`fit_from_modules`).

For models and data sets where full-batch second-order training is out of reach (a CNN on
60,000 images), a stage can instead be trained by minibatch Adam or SGD
(:class:`MinibatchSettings`, :func:`minimize_minibatch`): the same objective, a fixed budget of
seeded, deterministic epochs, and an honest record: status ``not certified (adam, 5 epochs)``,
the final full-batch gradient norm, no curvature check and no claim of a minimum.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable

import torch

from engine.distributed import DistContext
from engine.fit_results import (
    NotConvergedWarning,
    StageFit,
    TrainingError,
    TrainingMonitor,
    TwoStageFit,
)
from engine.minibatch import MinibatchSettings, minimize_minibatch
from engine.objectives import (
    StochasticObjective,
    finetune_objective,
    finetune_stochastic_objective,
    pretrain_objective,
    pretrain_stochastic_objective,
)
from engine.task import TwoStageTask
from engine.trust_region import DenseCurvature, NewtonSettings, newton_phase

# The objectives moved to engine.objectives; they stay importable from here.
# Re-exported: the objectives, the fit results and the minibatch trainer live in their own
# modules (engine.objectives, engine.fit_results, engine.minibatch).
__all__ = ["MinibatchSettings", "NotConvergedWarning", "StageFit", "StochasticObjective",
           "TrainingError", "TrainingMonitor", "TwoStageFit", "finetune_objective",
           "finetune_stochastic_objective", "minimize_minibatch", "pretrain_objective",
           "pretrain_stochastic_objective"]

log = logging.getLogger(__name__)

MAX_SADDLE_ESCAPES = 5
STALL_WINDOW = 100          # L-BFGS iterations without halving the best gradient norm




def _checked(name: str, objective: Callable[[torch.Tensor], torch.Tensor]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    def closure_value(x: torch.Tensor) -> torch.Tensor:
        value = objective(x)
        if not torch.isfinite(value):
            raise TrainingError(
                f"{name}: the objective became {value.item()} (NaN or infinite). Check the "
                "inputs for NaN/inf values, lower the learning problem's scale, or use float64.")
        return value
    return closure_value


def _lbfgs_phase(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *,
                 target: float, budget: int, name: str, history_size: int,
                 monitor: TrainingMonitor | None, stall_window: int | None
                 ) -> tuple[torch.Tensor, float, float, int, str]:
    """L-BFGS until the gradient norm is <= ``target``, a stall, or ``budget`` iterations.

    Returns ``(x, gradient norm, objective, iterations, why it stopped)``.
    """
    x = x0.detach().clone().requires_grad_(True)
    checked = _checked(name, objective)
    value_t = checked(x)
    (g,) = torch.autograd.grad(value_t, x)
    grad_norm, value = g.norm().item(), value_t.item()
    if grad_norm <= target or budget <= 0:
        return x.detach(), grad_norm, value, 0, "target" if grad_norm <= target else "budget"
    opt = torch.optim.LBFGS([x], lr=1.0, history_size=history_size, tolerance_grad=0.0,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v = checked(x)
        v.backward()
        return v

    iters, best, best_at = 0, grad_norm, 0
    state = opt.state[x]
    while True:
        opt.param_groups[0]["max_iter"] = min(25, budget - iters)
        opt.step(closure)
        done = int(state.get("n_iter", 0))
        value_t = checked(x)
        (g,) = torch.autograd.grad(value_t, x)
        grad_norm, value = g.norm().item(), value_t.item()
        if not math.isfinite(grad_norm):
            raise TrainingError(f"{name}: the gradient became non-finite")
        no_step = done == iters     # the line search found no acceptable step at all
        iters = done
        if grad_norm < 0.5 * best:
            best, best_at = grad_norm, iters
        if monitor is not None:
            monitor.step(name, "L-BFGS", iters, budget, grad_norm)
        if grad_norm <= target:
            return x.detach(), grad_norm, value, iters, "target"
        if no_step:
            return x.detach(), grad_norm, value, iters, "no step"
        if stall_window is not None and iters - best_at >= stall_window:
            return x.detach(), grad_norm, value, iters, "stall"
        if iters >= budget:
            return x.detach(), grad_norm, value, iters, "budget"


def minimize(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *,
             tolerance: float, max_iter: int, name: str,
             newton: NewtonSettings | None = None, history_size: int = 100,
             hint: DenseCurvature | None = None,
             monitor: TrainingMonitor | None = None) -> StageFit:
    """Minimize a smooth scalar function of a flat vector to a certified minimum.

    ``max_iter`` bounds the L-BFGS iterations (all phases together); ``newton`` (default
    :class:`NewtonSettings`) configures the trust-region Newton phase; ``max_steps=0`` disables
    it (plain L-BFGS to ``tolerance``, curvature unchecked).  ``hint`` is a dense curvature near
    ``x0`` (e.g. from the run being warm-started): Newton then starts at once and reuses it.
    """
    start = time.perf_counter()
    settings = newton if newton is not None else NewtonSettings()
    use_newton = settings.max_steps > 0
    x = x0.detach().clone()
    iters = escapes = steps = hessians = hvps = 0
    result = None
    while True:
        if hint is None or escapes > 0:
            target = max(tolerance, settings.switch_grad) if use_newton else tolerance
            x, grad_norm, value, done, why = _lbfgs_phase(
                objective, x, target=target, budget=max_iter - iters, name=name,
                history_size=history_size, monitor=monitor,
                stall_window=STALL_WINDOW if use_newton else None)
            iters += done
            if why == "stall" and monitor is not None:
                monitor.note(name, f"L-BFGS stalled: gradient norm {grad_norm:.2e} has not halved "
                                   f"in {STALL_WINDOW} iterations; switching to trust-region "
                                   "Newton")
            if not use_newton:
                break
        result = newton_phase(
            _checked(name, objective), x, tolerance=tolerance, settings=settings,
            hint=hint, radius=None if result is None else result.radius,
            on_step=None if monitor is None else (
                lambda phase, k, limit, gn, detail: monitor.step(name, phase, k, limit, gn,
                                                                 detail)))
        x, grad_norm, value = result.x, result.grad_norm, result.value
        steps, hessians, hvps = steps + result.steps, hessians + result.hessians, \
            hvps + result.hvps
        if result.status == "saddle" and result.escaped_saddle and escapes < MAX_SADDLE_ESCAPES:
            escapes += 1
            hint = result.curvature    # stale, but a good model to resume Newton with
            if monitor is not None:
                monitor.note(name, f"left a saddle point (lowest Hessian eigenvalue "
                                   f"{result.min_eigenvalue:.3g}) along negative curvature; "
                                   "resuming L-BFGS")
            continue
        break
    if result is None:
        status, lo, check, curvature = "unchecked", None, "none", None
        if grad_norm > tolerance:
            status = "not converged"
    else:
        status = result.status if result.status in ("minimum", "singular", "saddle") \
            else "not converged"
        lo, check, curvature = result.min_eigenvalue, result.curvature_check, result.curvature
    fit = StageFit(x.detach(), grad_norm, value, iters, tolerance, time.perf_counter() - start,
                   status, lo, check, steps, hessians, hvps, escapes, curvature)
    if not fit.converged:
        warnings.warn(_not_converged_message(name, fit, result), NotConvergedWarning,
                      stacklevel=2)
    log.info("%s: %s, %d L-BFGS iterations, %d Newton steps (%d Hessians, %d HVPs), gradient "
             "norm %.3g, objective %.6g, %.2fs", name, status, iters, steps, hessians, hvps,
             grad_norm, value, fit.seconds)
    return fit


def _not_converged_message(name: str, fit: StageFit, result: object | None) -> str:
    if fit.status == "saddle":
        return (f"{name} stopped at a saddle point, not a minimum: the Hessian's lowest "
                f"eigenvalue is {fit.min_eigenvalue:.3g} ({fit.curvature_check}) after "
                f"{fit.saddle_escapes} escapes. Influence scores assume a minimum; change the "
                "seed or add weight decay.")
    why = "the L-BFGS iteration limit (max_iter)" if result is None else (
        "the Newton step limit" if getattr(result, "status", "") == "limit"
        else "a stall at floating-point round-off")
    return (f"{name} did not converge: gradient norm {fit.final_grad_norm:.3g} > tolerance "
            f"{fit.tolerance:.3g} after {fit.iterations} L-BFGS iterations and "
            f"{fit.newton_steps} Newton steps (stopped by {why}). Influence scores assume a "
            "minimum; raise max_iter, add weight decay, standardize the features, or use "
            "float64.")


def minimize_lbfgs(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *,
                   tolerance: float, max_iter: int, name: str, history_size: int = 100,
                   newton_steps: int = 100, monitor: TrainingMonitor | None = None) -> StageFit:
    """:func:`minimize` with ``newton_steps`` trust-region steps (0: L-BFGS only)."""
    return minimize(objective, x0, tolerance=tolerance, max_iter=max_iter, name=name,
                    newton=NewtonSettings(max_steps=newton_steps), history_size=history_size,
                    monitor=monitor)


# --- minibatch first-order training ---------------------------------------------------------



def fit_pretraining(task: TwoStageTask, *, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                    keep: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None,
                    tolerance: float = 1e-7, max_iter: int = 2000,
                    newton: NewtonSettings | None = None, hint: DenseCurvature | None = None,
                    monitor: TrainingMonitor | None = None,
                    optimizer: MinibatchSettings | None = None,
                    world: DistContext | None = None) -> StageFit:
    """Train stage 1 (backbone + pretraining head) and return ``[backbone; w]``.

    ``keep`` is a boolean mask over pretraining examples (removal retraining); ``init`` warm
    starts from given (backbone, w) vectors, otherwise from the modules' current parameters.
    ``optimizer`` (minibatch Adam/SGD) replaces the certified trainer (``max_iter``, ``newton``
    and ``hint`` then do not apply).  ``world`` (a data-parallel run, :mod:`engine.distributed`):
    the certified trainer's objective is summed over each rank's shard of the (kept) examples
    and all-reduced, so every rank trains the same parameters; minibatch training is
    data-parallel the same way (the same seeded minibatches; each rank the rows of its shard).
    """
    x, y = task.pretrain_data
    if keep is not None:
        x, y = x[keep], y[keep]
        if sample_weights is not None:
            sample_weights = sample_weights[keep]
    if len(x) == 0:
        raise TrainingError("no pretraining examples are left to train on")
    ub0, w0, _ = task.initial_state()
    if init is not None:
        ub0, w0 = init
    if optimizer is not None:
        return minimize_minibatch(pretrain_stochastic_objective(task, x, y, sample_weights,
                                                                world),
                                  torch.cat([ub0, w0]), settings=optimizer, tolerance=tolerance,
                                  name="pretraining", monitor=monitor)
    return minimize(pretrain_objective(task, x, y, sample_weights, world), torch.cat([ub0, w0]),
                    tolerance=tolerance, max_iter=max_iter, name="pretraining", newton=newton,
                    hint=hint, monitor=monitor)


def fit_finetuning(task: TwoStageTask, backbone_pre: torch.Tensor, *,
                   init: tuple[torch.Tensor, torch.Tensor] | None = None,
                   tolerance: float = 1e-7, max_iter: int = 2000,
                   newton: NewtonSettings | None = None, hint: DenseCurvature | None = None,
                   monitor: TrainingMonitor | None = None,
                   optimizer: MinibatchSettings | None = None) -> StageFit:
    """Train stage 2 given U*; returns ``t`` (fixed) or ``[t; backbone]`` (updated).

    ``init`` = (t, backbone) warm start; the backbone starts at U* when not given.
    ``optimizer``: minibatch Adam/SGD instead of the certified trainer (as in pretraining).
    """
    x, y = task.finetune_data
    _, _, t0 = task.initial_state()
    ub0 = backbone_pre
    if init is not None:
        t0, ub0 = init
    x0 = t0 if task.scenario == "fixed" else torch.cat([t0, ub0])
    if optimizer is not None:
        return minimize_minibatch(finetune_stochastic_objective(task, backbone_pre, x, y), x0,
                                  settings=optimizer, tolerance=tolerance, name="finetuning",
                                  monitor=monitor)
    return minimize(finetune_objective(task, backbone_pre, x, y), x0,
                    tolerance=tolerance, max_iter=max_iter, name="finetuning", newton=newton,
                    hint=hint, monitor=monitor)


def fit_two_stage(task: TwoStageTask, *, tolerance: tuple[float, float] = (1e-7, 1e-7),
                  max_iter: tuple[int, int] = (2000, 2000), keep: torch.Tensor | None = None,
                  sample_weights: torch.Tensor | None = None,
                  warm_start: TwoStageFit | None = None,
                  newton: NewtonSettings | None = None,
                  monitor: TrainingMonitor | None = None,
                  optimizer: tuple[MinibatchSettings | None, MinibatchSettings | None] = (
                      None, None),
                  world: DistContext | None = None) -> TwoStageFit:
    """Train both stages (optionally without some pretraining examples, warm-started).

    A ``warm_start`` that carries its stages' dense curvature (a fit made by this function)
    also lends it to the Newton phase, so a retrain near it needs few or no new Hessians.
    ``optimizer`` = (pretraining, finetuning) minibatch settings; ``None`` = the certified
    L-BFGS + trust-region Newton trainer (the default) for that stage.  ``world``: pretraining
    sums are reduced over its ranks (see :func:`fit_pretraining`); finetuning (N examples, small)
    runs redundantly on every rank.
    """
    nb = task.backbone_layout.numel

    def hint(stage: StageFit | None) -> DenseCurvature | None:
        return None if stage is None else stage.curvature

    pre = fit_pretraining(
        task, keep=keep, sample_weights=sample_weights, tolerance=tolerance[0],
        max_iter=max_iter[0], newton=newton, monitor=monitor, optimizer=optimizer[0],
        world=world,
        hint=None if warm_start is None or keep is not None else hint(warm_start.pretrain),
        init=None if warm_start is None else (warm_start.backbone_pre, warm_start.w))
    backbone_pre, w = pre.params[:nb], pre.params[nb:]
    ft = fit_finetuning(
        task, backbone_pre, tolerance=tolerance[1], max_iter=max_iter[1], newton=newton,
        monitor=monitor, optimizer=optimizer[1],
        hint=None if warm_start is None else hint(warm_start.finetune),
        init=None if warm_start is None else (warm_start.t, warm_start.backbone_ft))
    nt = task.t_layout.numel
    if task.scenario == "fixed":
        t, backbone_ft = ft.params, backbone_pre
    else:
        t, backbone_ft = ft.params[:nt], ft.params[nt:]
    return TwoStageFit(backbone_pre, w, backbone_ft, t, pre, ft)


def fit_from_modules(task: TwoStageTask, backbone_pre: torch.Tensor | None = None) -> TwoStageFit:
    """Use already trained modules instead of training.

    The modules hold the finetuned model; ``backbone_pre`` is U* as a flat vector, required in
    the updated scenario (where the finetuned backbone differs from the pretrained one).
    """
    ub, w, t = task.initial_state()
    if task.scenario == "updated" and backbone_pre is None:
        raise ValueError("the updated scenario needs the pretrained backbone vector U*")
    pre = ub if backbone_pre is None else backbone_pre
    return TwoStageFit(pre, w, ub, t)
