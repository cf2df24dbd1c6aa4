"""Iterative solvers on Hessian-vector products: conjugate gradient and LiSSA.

* :class:`CGSolver` — conjugate gradient, all columns in one pass over the data per iteration.
* :class:`LissaSolver` — stochastic Neumann series (Agarwal et al. 2017).

Damping is added on the fly and never written into a stored matrix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from engine.curvature.errors import NotPositiveDefiniteError
from engine.curvature.errors import damping_advice as _advice
from engine.curvature.operators import Curvature


@dataclass
class CGSolver:
    """Conjugate gradient on HVPs; columns are solved together but converge independently."""

    rtol: float = 1e-10
    max_iter: int | None = None
    name: str = "cg"

    def solve(self, op: Curvature, rhs: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        max_iter = self.max_iter or max(10 * op.dim, 100)
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rs = (r * r).sum(0)
        bnorm = rs.sqrt().clamp_min(1e-300)
        active = rs.sqrt() > self.rtol * bnorm
        it = 0
        while active.any() and it < max_iter:
            ap = op.matvec(p) + damping * p
            pap = (p * ap).sum(0)
            bad = active & (pap <= 0)
            if bad.any():
                j = int(bad.nonzero()[0])
                rq = (pap[j] / (p[:, j] * p[:, j]).sum()).item()
                raise NotPositiveDefiniteError(
                    f"CG breakdown on {op.name} + damping {damping:g}: curvature along a search "
                    f"direction is {rq:.3g} <= 0, so the damped curvature is not positive "
                    f"definite. {_advice(damping, rq)}.")
            step = torch.where(active, rs / torch.where(active, pap, 1.0), 0.0)
            x = x + step * p
            r = r - step * ap
            rs_new = (r * r).sum(0)
            active = active & (rs_new.sqrt() > self.rtol * bnorm)
            beta = torch.where(active, rs_new / rs.clamp_min(1e-300), 0.0)
            p = r + beta * p
            rs = rs_new
            it += 1
        rel = (rs.sqrt() / bnorm).max().item()
        self.last_info = {"iterations": it, "max_relative_residual": rel}
        if active.any():
            warnings.warn(f"CG on {op.name} stopped after {it} iterations with relative residual "
                          f"{rel:.2g} > {self.rtol:g}; raise max_iter or damping", stacklevel=2)
        return x

    def describe(self) -> dict[str, Any]:
        return {"solver": self.name, "rtol": self.rtol, **getattr(self, "last_info", {})}


@dataclass
class LissaSolver:
    """Stochastic Neumann series ``(A+dI)^{-1} v = (1/s) sum_k (I - (A+dI)/s)^k v``.

    ``scale`` must exceed the largest eigenvalue of the damped curvature; when ``None`` it is
    1.5x a power-iteration estimate.  ``batch_size=None`` uses full-batch HVPs (deterministic);
    otherwise each step uses a random minibatch.  Converges at rate ``1 - lambda_min/scale`` per
    step, so ``depth`` must grow with the condition number.
    """

    depth: int = 1000
    repeats: int = 1
    scale: float | None = None
    batch_size: int | None = None
    seed: int = 0
    name: str = "lissa"

    def _estimate_scale(self, op: Curvature, damping: float) -> float:
        gen = torch.Generator().manual_seed(self.seed)
        v = torch.randn(op.dim, 1, generator=gen, dtype=op.point.dtype)
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
                    idx = torch.randint(op.n_examples, (self.batch_size,), generator=gen)
                    ah = op.matvec_sample(h, idx)
                h = rhs + h - (ah + damping * h) / scale
                if not torch.isfinite(h).all():
                    raise NotPositiveDefiniteError(
                        f"LiSSA diverged on {op.name}: scale {scale:g} is below the largest "
                        "eigenvalue, or the damped curvature is not positive definite; "
                        "raise scale or damping")
            total = total + h / scale
        self.last_info = {"scale": scale}
        return total / self.repeats

    def describe(self) -> dict[str, Any]:
        return {"solver": self.name, "depth": self.depth, "repeats": self.repeats,
                "batch_size": self.batch_size, "seed": self.seed,
                "scale": getattr(self, "last_info", {}).get("scale", self.scale)}


