"""Dense curvature: the full matrix and its eigendecomposition (the reference; small models).

The factorization is cached per (operator, damping) and reused across test points; when training
already built the exact matrix at the trained point it is reused as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.curvature.errors import NotPositiveDefiniteError, SolverSettingError
from engine.curvature.errors import damping_advice as _advice
from engine.curvature.operators import Curvature


@dataclass
class ExactSolver:
    """Dense curvature + eigendecomposition (the reference solver)."""

    max_dim: int = 20_000
    name: str = "exact"
    _cache: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    def factorize(self, op: Curvature, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(op), float(damping))
        if key in self._cache:
            return self._cache[key]
        if op.eigen is not None:   # built by training at this point: same vectors, shifted
            evals, evecs = op.eigen[0] + damping, op.eigen[1]
        else:
            from engine.curvature.checks import dense_problem  # checks imports this module

            problem = dense_problem(op.dim, op.point.dtype, op.memory_budget, self.max_dim)
            if problem:
                raise SolverSettingError(
                    f"{op.name} {problem}; use solver 'cg' (or 'lissa', 'ekfac+cg'), a larger "
                    "memory budget if memory is the limit, or fewer tracked backbone parameters")
            mat = op.dense()
            damped = mat + damping * torch.eye(op.dim, dtype=mat.dtype,  # a new matrix
                                               device=mat.device)
            evals, evecs = torch.linalg.eigh(damped)
        lo = evals[0].item()
        # Eigenvalues at round-off level of the largest one count as non-positive too.
        floor = 1e-12 * max(abs(evals[-1].item()), 1.0) if evals.dtype == torch.float64 else \
            1e-6 * max(abs(evals[-1].item()), 1.0)
        if lo <= floor:
            raise NotPositiveDefiniteError(
                f"{op.name} + damping {damping:g} is not positive definite: its most negative "
                f"eigenvalue is {lo:.3g}. {_advice(damping, lo)}, or train closer to a minimum "
                "(more iterations, more weight decay).")
        self._cache = {k: v for k, v in self._cache.items() if k[0] == id(op)} | {
            key: (evals, evecs)}
        self.last_info = {"min_eigenvalue": lo, "max_eigenvalue": evals[-1].item(),
                          "matrix": "from training" if op.eigen is not None else "built",
                          **(op.describe() if op.eigen is None else {})}
        return evals, evecs

    def solve(self, op: Curvature, rhs: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """``(A + damping I)^{-1} rhs`` for ``rhs`` of shape ``(dim, k)``."""
        evals, evecs = self.factorize(op, damping)
        return evecs @ ((evecs.T @ rhs) / evals[:, None])

    def describe(self) -> dict[str, Any]:
        return {"solver": self.name, **getattr(self, "last_info", {})}


