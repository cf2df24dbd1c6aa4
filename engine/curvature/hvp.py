"""Iterative solvers on Hessian-vector products: conjugate gradient and LiSSA.

* :class:`CGSolver` — (preconditioned) conjugate gradient, all columns in one pass over the data
  per iteration, each column converging on its own.
* :class:`LissaSolver` — stochastic Neumann series (Agarwal et al. 2017).

Damping is added on the fly and never written into a stored matrix.

**No solve reports more accuracy than it has.**  Every solve ends by computing the TRUE relative
residual ``||b - (A + damping I) x|| / ||b||`` of each column with one more product (CG skips
the columns whose true residual it already computed at the current ``x``), records its maximum
and median in ``last_info`` / :meth:`describe`, and compares the maximum with two tolerances
(:func:`residual_tolerances`): above ``fail_residual`` it raises :class:`SolveAccuracyError`
(saying what to change), above ``warn_residual`` it warns (:class:`SolveAccuracyWarning`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.curvature.errors import (
    NotPositiveDefiniteError,
    SolveAccuracyError,
    SolveAccuracyWarning,
)
from engine.curvature.errors import damping_advice as _advice
from engine.curvature.operators import Curvature
from engine.trust_region import lanczos_min_eig

Preconditioner = Callable[[torch.Tensor], torch.Tensor]
CHECK_EVERY = 25    # CG iterations between true-residual checks of a restarted column

# (warn above, fail above) for the true relative residual, per dtype of the products.
# The error of a solution is at most cond(A) x its relative residual, and the scores inherit it.
# float64: CG reaches 1e-10 and below on the curvatures of this project, so a residual above
#   1e-6 means the solve stopped early (iteration limit) or stagnated: worth a warning; above
#   1e-3 the directions can be off by more than their size (the digits H has cond ~ 6e4): an
#   error.
# float32: every product carries rounding of ~1e-7 x ||A|| ||x||, so the attainable residual is
#   ~1e-6 - 1e-4 depending on the conditioning; above 1e-3 float32 accuracy is exhausted (warn);
#   above 1e-1 the result explains less than 90% of the right-hand side: not a solution (error).
# Half precision: rounding of ~1e-3 per product; only gross failures are caught.
RESIDUAL_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-6, 1e-3),
    torch.float32: (1e-3, 1e-1),
}
HALF_PRECISION_TOLERANCES = (1e-1, 0.5)
# Minibatch LiSSA: each step's product is a sample, and the result carries that noise
# (measured on tests/test_solvers.py's B, 16 of 30 examples per step, 2 repeats: residual 3.6%,
# error 1.4%).  Above 0.1 the noise is large; above 0.5 noise or a divergence dominates.
STOCHASTIC_TOLERANCES = (0.1, 0.5)


def residual_tolerances(dtype: torch.dtype, warn: float | None = None,
                        fail: float | None = None, requested: float = 0.0,
                        stochastic: bool = False) -> tuple[float, float]:
    """(warn, fail) thresholds of a solve's true relative residual.

    Defaults by dtype (``RESIDUAL_TOLERANCES``), never below 10x the accuracy the caller
    ``requested`` (a CG ``rtol``: asking for 1e-4 and getting 1e-4 is no cause for a warning).
    """
    base = (STOCHASTIC_TOLERANCES if stochastic
            else RESIDUAL_TOLERANCES.get(dtype, HALF_PRECISION_TOLERANCES))
    w = max(base[0], 10.0 * requested) if warn is None else warn
    f = max(base[1], w) if fail is None else fail
    return w, f


def true_relative_residuals(op: Curvature, rhs: torch.Tensor, x: torch.Tensor,
                            damping: float) -> torch.Tensor:
    """``||b - (A + damping I) x|| / ||b||`` per column (one batched product; 0 where b = 0
    and x solves it)."""
    res = (rhs - (op.matvec(x) + damping * x)).norm(dim=0)
    bnorm = rhs.norm(dim=0)
    return torch.where(bnorm > 0, res / bnorm.clamp_min(torch.finfo(rhs.dtype).tiny), res)


def _residual_summary(rel: torch.Tensor) -> dict[str, float]:
    return {"true_relative_residual_max": rel.max().item() if rel.numel() else 0.0,
            "true_relative_residual_median": rel.median().item() if rel.numel() else 0.0}


def _accuracy_verdict(what: str, rel: torch.Tensor, warn: float, fail: float, dtype: torch.dtype,
                      advice: Callable[[], str], fatal: bool) -> None:
    """Raise (``fatal``) or warn above ``fail``; warn above ``warn``."""
    if rel.numel() == 0:
        return
    worst, median = rel.max().item(), rel.median().item()
    dtype_name = str(dtype).removeprefix("torch.")
    text = (f"{what}: true relative residual ||b - (A + damping I) x|| / ||b|| is {worst:.2g} "
            f"(worst of {rel.numel()} columns, median {median:.2g})")
    if not math.isfinite(worst) or worst > fail:
        message = f"{text}, above the {dtype_name} error tolerance {fail:g}. {advice()}"
        if fatal:
            raise SolveAccuracyError(message)
        warnings.warn(message, SolveAccuracyWarning, stacklevel=3)
    elif worst > warn:
        warnings.warn(f"{text}, above the {dtype_name} warning tolerance {warn:g} (error above "
                      f"{fail:g}). {advice()}", SolveAccuracyWarning, stacklevel=3)


def _name(fn: Any) -> str | None:
    if fn is None:
        return None
    return str(getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__)


@dataclass
class CGSolver:
    """(Preconditioned) conjugate gradient on HVPs; columns are solved together but converge
    independently.

    ``preconditioner``: ``M_inv(R) -> Z`` on a ``(dim, k)`` block, a symmetric positive definite
    approximation of ``(A + damping I)^{-1}`` (e.g. EK-FAC); ``None`` = plain CG.  Convergence
    is judged on the unpreconditioned residual ``||r|| <= rtol ||b||``.

    **Residual replacement.**  The recurrence residual of CG drifts away from the true one in
    finite precision (in float32 it keeps shrinking long after the true residual has stopped).
    Whenever the recurrence says a column has converged, its true residual is computed (one
    product on those columns) and replaces the recurrence's; if it is still above ``rtol``, the
    column restarts from it, unless its true residual did not shrink 10x since its last check: it
    has then reached the accuracy its dtype allows (``stagnated_columns``) and stops.  A
    restarted column's true residual is checked every ``CHECK_EVERY`` iterations too, and the
    column stops when it no longer halves.

    ``max_iter``: iteration limit (default ``max(10 dim, 100)``).  ``fixed_iterations=True``:
    the caller asked for at most ``max_iter`` iterations (e.g. 20 preconditioned steps), so an
    inaccurate result is reported (true residual in ``last_info``) and warned about, never an
    error.  ``warn_residual`` / ``fail_residual``: tolerances of the true relative residual
    (default: :func:`residual_tolerances` for the dtype and ``rtol``).
    """

    rtol: float = 1e-10
    max_iter: int | None = None
    preconditioner: Preconditioner | None = None
    fixed_iterations: bool = False
    warn_residual: float | None = None
    fail_residual: float | None = None
    name: str = "cg"

    def __post_init__(self) -> None:
        if self.fixed_iterations and self.max_iter is None:
            raise ValueError("CGSolver(fixed_iterations=True) needs max_iter (the number of "
                             "iterations to run)")
        if self.max_iter is not None and self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")

    def _precondition(self, op: Curvature, R: torch.Tensor) -> torch.Tensor:
        if self.preconditioner is None:
            return R
        Z = self.preconditioner(R)
        if Z.shape != R.shape:
            raise ValueError(f"the CG preconditioner returned shape {tuple(Z.shape)} for a block "
                             f"of shape {tuple(R.shape)} ({op.name})")
        return Z

    def _check_rz(self, op: Curvature, rz: torch.Tensor, R: torch.Tensor) -> None:
        bad = (rz <= 0) & (R.norm(dim=0) > 0)
        if bad.any():
            raise ValueError(
                f"the CG preconditioner of {op.name} is not positive definite: r . M_inv r = "
                f"{rz[bad][0].item():.3g} <= 0 for a residual r; it must approximate the inverse "
                "of a positive definite matrix (check its damping)")

    def solve(self, op: Curvature, rhs: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """``(A + damping I)^{-1} rhs`` for ``rhs`` of shape ``(dim, k)``."""
        max_iter = self.max_iter or max(10 * op.dim, 100)
        warn, fail = residual_tolerances(rhs.dtype, self.warn_residual, self.fail_residual,
                                         self.rtol)

        def apply(P: torch.Tensor) -> torch.Tensor:
            return op.matvec(P) + damping * P

        k = rhs.shape[1]
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        bnorm = rhs.norm(dim=0)
        tol = self.rtol * bnorm
        # True relative residual at the current x, where known (NaN: unknown).
        dev = rhs.device
        true_rel = torch.full((k,), math.nan, dtype=rhs.dtype, device=dev)
        true_rel[bnorm == 0] = 0.0                       # x = 0 solves b = 0 exactly
        # lowest true residual norm seen
        best = torch.full((k,), math.inf, dtype=rhs.dtype, device=dev)
        stagnated = torch.zeros(k, dtype=torch.bool, device=dev)
        restarted = torch.zeros(k, dtype=torch.bool, device=dev)
        last_check = torch.zeros(k, dtype=torch.long, device=dev)
        idx = (bnorm > 0).nonzero().squeeze(1)
        p = torch.zeros_like(rhs)
        rz = torch.zeros(k, dtype=rhs.dtype, device=dev)
        if len(idx):
            R = r[:, idx]
            Z = self._precondition(op, R)
            rz[idx] = (R * Z).sum(0)
            self._check_rz(op, rz[idx], R)
            p[:, idx] = Z
        it = replacements = restarts = 0
        while len(idx) and it < max_iter:
            P = p[:, idx]
            AP = apply(P)
            pap = (P * AP).sum(0)
            if (pap <= 0).any():
                j = int((pap <= 0).nonzero()[0])
                rq = (pap[j] / (P[:, j] * P[:, j]).sum()).item()
                raise NotPositiveDefiniteError(
                    f"CG breakdown on {op.name} + damping {damping:g}: curvature along a search "
                    f"direction is {rq:.3g} <= 0, so the damped curvature is not positive "
                    f"definite. {_advice(damping, rq)}.")
            step = rz[idx] / pap
            x[:, idx] += step * P
            r[:, idx] -= step * AP
            true_rel[idx] = math.nan
            it += 1
            claim = r[:, idx].norm(dim=0) <= tol[idx]
            # Columns that restarted once are near their attainable accuracy: their true
            # residual is also checked every CHECK_EVERY iterations.
            due = restarted[idx] & (it - last_check[idx] >= CHECK_EVERY)
            check = claim | due
            done = torch.zeros_like(claim)
            restart = torch.zeros_like(claim)
            if check.any():
                # Residual replacement: the true residual of these columns replaces the
                # recurrence's.
                ci = idx[check]
                tr = rhs[:, ci] - apply(x[:, ci])
                replacements += 1
                r[:, ci] = tr
                tn = tr.norm(dim=0)
                true_rel[ci] = tn / bnorm[ci]
                last_check[ci] = it
                ok = tn <= tol[ci]
                # Stagnated: a convergence claim the true residual does not confirm, with less
                # than a 10x gain since the column's last check; or a periodic check with less
                # than a 2x gain.  A claim with progress restarts the column from the true
                # residual (the recurrence drifted).
                gain = torch.where(claim[check], 0.1, 0.5).to(tn.dtype)
                stuck = ~ok & (tn > gain * best[ci])
                best[ci] = torch.minimum(best[ci], tn)
                stagnated[ci[stuck]] = True
                done[check] = ok | stuck
                fresh = ~ok & ~stuck & claim[check]
                restart[check] = fresh
                restarted[ci[fresh]] = True
                restarts += int(fresh.sum())
            keep = ~done
            idx_next = idx[keep]
            if len(idx_next):
                R = r[:, idx_next]
                Z = self._precondition(op, R)
                rz_new = (R * Z).sum(0)
                self._check_rz(op, rz_new, R)
                beta = torch.where(restart[keep], 0.0, rz_new / rz[idx_next])
                p[:, idx_next] = Z + beta * p[:, idx_next]
                rz[idx_next] = rz_new
            idx = idx_next
        unknown = torch.isnan(true_rel).nonzero().squeeze(1)
        if len(unknown):   # the final check: columns stopped by the iteration limit
            true_rel[unknown] = true_relative_residuals(op, rhs[:, unknown], x[:, unknown],
                                                        damping)
        recurrence = (r.norm(dim=0) / bnorm.clamp_min(torch.finfo(rhs.dtype).tiny))
        self.last_info = {
            "iterations": it, "max_iter": max_iter, "fixed_iterations": self.fixed_iterations,
            "columns": k, "converged_columns": int((true_rel <= self.rtol).sum()),
            **_residual_summary(true_rel),
            "recurrence_relative_residual_max": recurrence.max().item() if k else 0.0,
            "residual_replacements": replacements, "restarts": restarts,
            "stagnated_columns": int(stagnated.sum()),
            "warn_residual": warn, "fail_residual": fail,
            **op.describe(),
        }

        def advice() -> str:
            if self.fixed_iterations:
                return (f"It ran at most {max_iter} iterations as asked; allow more iterations, "
                        "raise the damping or improve the preconditioner for a closer solution")
            tips = [f"raise max_iter (stopped after {it} iterations)" if len(idx) else "",
                    "raise this stage's damping (a better-conditioned system)",
                    "use a preconditioner" if self.preconditioner is None else
                    "improve the preconditioner"]
            if stagnated.any() or rhs.dtype != torch.float64:
                tips.append(f"{int(stagnated.sum())} column(s) stagnated at the accuracy of "
                            f"{str(rhs.dtype).removeprefix('torch.')} products: compute in "
                            "float64 (dtype = \"float64\")")
            return "To fix: " + "; ".join(t for t in tips if t) + "."

        _accuracy_verdict(f"CG on {op.name} + damping {damping:g} ({it} iterations)", true_rel,
                          warn, fail, rhs.dtype, advice, fatal=not self.fixed_iterations)
        return x

    def describe(self) -> dict[str, Any]:
        return {"solver": self.name, "rtol": self.rtol,
                "preconditioner": _name(self.preconditioner), **getattr(self, "last_info", {})}


@dataclass
class LissaSolver:
    """Stochastic Neumann series ``(A+dI)^{-1} v = (1/s) sum_k (I - (A+dI)/s)^k v``.

    ``scale`` must exceed the largest eigenvalue of the damped curvature; when ``None`` it is
    1.5x a power-iteration estimate.  ``batch_size=None`` uses full-batch HVPs (deterministic);
    otherwise each step uses a random minibatch.  Converges at rate ``1 - lambda_min/scale`` per
    step, so ``depth`` must grow with the condition number; it diverges when the damped curvature
    has a negative eigenvalue.  The true residual is checked at the end (see the module
    docstring; minibatch runs use the looser ``STOCHASTIC_TOLERANCES``).
    """

    depth: int = 1000
    repeats: int = 1
    scale: float | None = None
    batch_size: int | None = None
    seed: int = 0
    warn_residual: float | None = None
    fail_residual: float | None = None
    name: str = "lissa"

    def _estimate_scale(self, op: Curvature, damping: float) -> float:
        gen = torch.Generator().manual_seed(self.seed)
        # drawn on the CPU: the same start vector on every device
        v = torch.randn(op.dim, 1, generator=gen, dtype=op.point.dtype,
                        device="cpu").to(op.point.device)
        lam = 1.0
        for _ in range(30):
            av = op.matvec(v) + damping * v
            lam = av.norm().item() / max(v.norm().item(), 1e-300)
            v = av / max(av.norm().item(), 1e-300)
        return 1.5 * lam

    def solve(self, op: Curvature, rhs: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        scale = self.scale or self._estimate_scale(op, damping)
        gen = torch.Generator().manual_seed(self.seed)
        total = torch.zeros_like(rhs)
        for _ in range(self.repeats):
            h = rhs.clone()
            for _ in range(self.depth):
                if self.batch_size is None:
                    ah = op.matvec(h)
                else:
                    # global example indices, drawn on the CPU (the same on every device)
                    idx = torch.randint(op.n_examples, (self.batch_size,), generator=gen,
                                        device="cpu")
                    ah = op.matvec_sample(h, idx)
                h = rhs + h - (ah + damping * h) / scale
                if not torch.isfinite(h).all():
                    raise NotPositiveDefiniteError(
                        f"LiSSA diverged on {op.name}: scale {scale:g} is below the largest "
                        "eigenvalue, or the damped curvature is not positive definite; "
                        "raise scale or damping")
            total = total + h / scale
        x = total / self.repeats
        stochastic = self.batch_size is not None
        warn, fail = residual_tolerances(rhs.dtype, self.warn_residual, self.fail_residual,
                                         stochastic=stochastic)
        rel = true_relative_residuals(op, rhs, x, damping)
        self.last_info = {"scale": scale, **_residual_summary(rel), "warn_residual": warn,
                          "fail_residual": fail, **op.describe()}

        def advice() -> str:
            lo, _, hi = lanczos_min_eig(
                lambda v: (op.matvec(v[:, None]) + damping * v[:, None])[:, 0], op.dim,
                rhs.dtype, min(40, op.dim), seed=self.seed, device=rhs.device)
            est = (f"a {min(40, op.dim)}-step Lanczos estimate puts the damped curvature's "
                   f"eigenvalues in [{lo:.3g}, {hi:.3g}], scale {scale:g}")
            if lo <= 0:
                return (f"The series diverges: {est}, so it is not positive definite. "
                        f"{_advice(damping, lo)}, or use solver 'cg' or 'exact' (which detect "
                        "this)")
            if hi >= scale:
                return (f"The series diverges: {est}; set scale above {hi:.3g} "
                        "(or leave it None)")
            rate = 1.0 - lo / scale
            need = math.log(max(fail, 1e-300) / 10) / math.log(rate) if 0 < rate < 1 else math.inf
            tips = (f"raise depth (now {self.depth}; about {need:.0f} for this tolerance), raise "
                    "the damping, or use solver 'cg'")
            if stochastic:
                tips += f"; minibatch noise: raise batch_size (now {self.batch_size}) or repeats"
            return f"The series converges at rate {rate:.6g} per step ({est}): {tips}"

        _accuracy_verdict(f"LiSSA on {op.name} + damping {damping:g} (depth {self.depth})", rel,
                          warn, fail, rhs.dtype, advice, fatal=True)
        return x

    def describe(self) -> dict[str, Any]:
        return {"solver": self.name, "depth": self.depth, "repeats": self.repeats,
                "batch_size": self.batch_size, "seed": self.seed,
                "scale": self.scale, **getattr(self, "last_info", {})}
