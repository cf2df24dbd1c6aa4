"""Training routines for both stages: full-batch L-BFGS to a gradient-norm tolerance.

Influence functions assume each stage sits at a stationary point of its objective, so both
stages are trained full-batch with strong-Wolfe L-BFGS until the 2-norm of the objective's
gradient is below ``tolerance``.  The final gradient norm is reported; an unconverged stage
triggers a visible warning and is recorded in the results.  Users may skip these routines and
bring already trained parameters (see :func:`fit_from_modules`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call

from engine.task import TwoStageTask

log = logging.getLogger(__name__)

# (stage name, iterations done, iteration limit, current gradient norm)
ProgressCallback = Callable[[str, int, int, float], None]


class NotConvergedWarning(UserWarning):
    """A stage's gradient norm is above its tolerance: influence scores may be unreliable."""


class TrainingError(RuntimeError):
    """Training produced a non-finite loss or gradient."""


@dataclass
class StageFit:
    """Outcome of training one stage."""

    params: torch.Tensor
    final_grad_norm: float
    final_objective: float
    iterations: int
    tolerance: float
    seconds: float

    @property
    def converged(self) -> bool:
        return self.final_grad_norm <= self.tolerance

    def summary(self) -> dict:
        return {"final_grad_norm": self.final_grad_norm, "final_objective": self.final_objective,
                "iterations": self.iterations, "tolerance": self.tolerance,
                "converged": self.converged, "seconds": round(self.seconds, 3)}


@dataclass
class TwoStageFit:
    """Trained parameters of both stages as flat vectors.

    ``backbone_pre`` is U* (full backbone after pretraining), ``backbone_ft`` is the backbone used
    by the finetuned model (U* in the fixed scenario, U^ in the updated one).
    """

    backbone_pre: torch.Tensor
    w: torch.Tensor
    backbone_ft: torch.Tensor
    t: torch.Tensor
    pretrain: StageFit | None = None
    finetune: StageFit | None = None


def minimize_lbfgs(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *,
                   tolerance: float, max_iter: int, name: str,
                   history_size: int = 100, newton_steps: int = 30,
                   progress: ProgressCallback | None = None) -> StageFit:
    """Minimize a smooth scalar function of a flat vector with full-batch L-BFGS.

    L-BFGS's line search stalls once objective changes drop below float round-off (gradient
    norms around 1e-9 in float64); a few Newton-CG steps, which only need gradients, then take
    the gradient norm down to round-off level so removal experiments are not drowned in noise.
    """
    start = time.perf_counter()
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, history_size=history_size,
                            tolerance_grad=0.0, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective(x)
        if not torch.isfinite(value):
            raise TrainingError(
                f"{name}: the objective became {value.item()} (NaN or infinite). Check the "
                "inputs for NaN/inf values, lower the learning problem's scale, or use float64."
            )
        value.backward()
        return value

    iters, grad_norm, value = 0, math.inf, math.inf
    state = opt.state[x]
    while iters < max_iter:
        # Check the gradient-norm tolerance every few dozen iterations.
        opt.param_groups[0]["max_iter"] = min(25, max_iter - iters)
        opt.step(closure)
        done = int(state.get("n_iter", 0))
        x_val = objective(x)
        (g,) = torch.autograd.grad(x_val, x)
        prev_value, prev_norm = value, grad_norm
        grad_norm, value = g.norm().item(), x_val.item()
        if not math.isfinite(grad_norm):
            raise TrainingError(f"{name}: the gradient became non-finite")
        # At round-off level the line search stops making progress: nothing more to gain.
        stalled = done == iters or (value >= prev_value and grad_norm >= 0.5 * prev_norm)
        iters = done
        if progress is not None:
            progress(name, iters, max_iter, grad_norm)
        if grad_norm <= tolerance or stalled:
            break
    if grad_norm > tolerance and newton_steps > 0:
        x_new, grad_norm, value = _newton_polish(objective, x.detach(), grad_norm, value,
                                                 newton_steps, tolerance)
        x = x_new
    fit = StageFit(x.detach(), grad_norm, value, iters, tolerance, time.perf_counter() - start)
    if not fit.converged:
        warnings.warn(
            f"{name} did not converge: gradient norm {grad_norm:.3g} > tolerance {tolerance:.3g} "
            f"after {iters} iterations. Influence scores assume a stationary point; raise "
            "max_iter, add weight decay, or use float64.",
            NotConvergedWarning, stacklevel=2)
    log.info("%s: %d iterations, gradient norm %.3g, objective %.6g, %.2fs",
             name, iters, grad_norm, value, fit.seconds)
    return fit


def _newton_polish(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   grad_norm: float, value: float, steps: int, tolerance: float
                   ) -> tuple[torch.Tensor, float, float]:
    """Levenberg-damped Newton-CG on Hessian-vector products; keeps only improving steps.

    Solves ``(Hess + mu I) d = -grad`` by CG; negative curvature (a saddle region) raises ``mu``,
    accepted full steps lower it, so the iteration ends in plain Newton steps near a minimum.
    """
    grad_fn = torch.func.grad(objective)
    mu = 1e-8 * max(1.0, abs(value))
    for _ in range(steps):
        g = grad_fn(x)

        def hvp(v: torch.Tensor, x=x) -> torch.Tensor:
            return torch.func.jvp(grad_fn, (x,), (v,))[1]

        d, r = torch.zeros_like(x), -g
        p, rs = r.clone(), (r * r).sum()
        negative = False
        for _ in range(min(5 * x.numel(), 300)):
            hp = hvp(p) + mu * p
            php = (p * hp).sum()
            if php <= 0:
                negative = True
                break
            a = rs / php
            d, r = d + a * p, r - a * hp
            rs_new = (r * r).sum()
            if rs_new.sqrt() <= 1e-10 * grad_norm:
                break
            p, rs = r + (rs_new / rs) * p, rs_new
        if negative:
            mu = max(mu * 100, 1e-6)
            continue
        accepted = False
        for step in (1.0, 0.5, 0.25, 0.1):
            cand = x + step * d
            with torch.no_grad():
                cand_value = objective(cand).item()
            cand_norm = grad_fn(cand).norm().item()
            # Near round-off the objective cannot drop further; the gradient norm still can.
            if math.isfinite(cand_norm) and (cand_value < value or (
                    cand_value <= value + 1e-13 * abs(value) and cand_norm < grad_norm)):
                x, grad_norm, value, accepted = cand, cand_norm, cand_value, True
                mu = mu / 10 if step == 1.0 else mu
                break
        if not accepted:
            mu *= 100
            if mu > 1e6:
                break
        if grad_norm <= tolerance:
            break
    return x, grad_norm, value


def pretrain_objective(task: TwoStageTask, x: torch.Tensor, y: torch.Tensor,
                       sample_weights: torch.Tensor | None = None
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """L_pre as a function of the full pretraining vector ``[backbone; w]``.

    ``sample_weights`` multiply each example's loss inside the mean (1 = unchanged); an
    upweighting by ``eps`` of example j is the weight ``1 + M * eps`` at j.
    """
    nb = task.backbone_layout.numel
    m = len(x)

    def objective(theta: torch.Tensor) -> torch.Tensor:
        ub, w = theta[:nb], theta[nb:]
        losses = task.pretrain_loss(task.pretrain_outputs(ub, w, x), y)
        if sample_weights is not None:
            losses = losses * sample_weights
        return losses.sum() / m + 0.5 * task.pretrain_weight_decay * (theta * theta).sum()

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


def fit_pretraining(task: TwoStageTask, *, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                    keep: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None,
                    tolerance: float = 1e-7, max_iter: int = 2000,
                    progress: ProgressCallback | None = None) -> StageFit:
    """Train stage 1 (backbone + pretraining head) and return ``[backbone; w]``.

    ``keep`` is a boolean mask over pretraining examples (removal retraining); ``init`` warm
    starts from given (backbone, w) vectors, otherwise from the modules' current parameters.
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
    return minimize_lbfgs(pretrain_objective(task, x, y, sample_weights), torch.cat([ub0, w0]),
                          tolerance=tolerance, max_iter=max_iter, name="pretraining",
                          progress=progress)


def fit_finetuning(task: TwoStageTask, backbone_pre: torch.Tensor, *,
                   init: tuple[torch.Tensor, torch.Tensor] | None = None,
                   tolerance: float = 1e-7, max_iter: int = 2000,
                   progress: ProgressCallback | None = None) -> StageFit:
    """Train stage 2 given U*; returns ``t`` (fixed) or ``[t; backbone]`` (updated).

    ``init`` = (t, backbone) warm start; the backbone starts at U* when not given.
    """
    x, y = task.finetune_data
    _, _, t0 = task.initial_state()
    ub0 = backbone_pre
    if init is not None:
        t0, ub0 = init
    x0 = t0 if task.scenario == "fixed" else torch.cat([t0, ub0])
    return minimize_lbfgs(finetune_objective(task, backbone_pre, x, y), x0,
                          tolerance=tolerance, max_iter=max_iter, name="finetuning",
                          progress=progress)


def fit_two_stage(task: TwoStageTask, *, tolerance: tuple[float, float] = (1e-7, 1e-7),
                  max_iter: tuple[int, int] = (2000, 2000), keep: torch.Tensor | None = None,
                  sample_weights: torch.Tensor | None = None,
                  warm_start: TwoStageFit | None = None,
                  progress: ProgressCallback | None = None) -> TwoStageFit:
    """Train both stages (optionally without some pretraining examples, warm-started)."""
    nb = task.backbone_layout.numel
    pre = fit_pretraining(
        task, keep=keep, sample_weights=sample_weights, tolerance=tolerance[0],
        max_iter=max_iter[0], progress=progress,
        init=None if warm_start is None else (warm_start.backbone_pre, warm_start.w))
    backbone_pre, w = pre.params[:nb], pre.params[nb:]
    ft = fit_finetuning(
        task, backbone_pre, tolerance=tolerance[1], max_iter=max_iter[1], progress=progress,
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
