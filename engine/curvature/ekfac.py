"""Solvers built on EK-FAC (:mod:`engine.curvature.kronecker`): ``ekfac`` and ``ekfac+cg``.

* :class:`EkfacSolver` (``ekfac``) inverts the block-diagonal EK-FAC of the stage directly.  It
  is PSD by construction, so a model that is not at an exact minimum (SGD-trained weights) needs
  no guessed damping, but it is an APPROXIMATION: the blocks are layers, so for the pretraining
  Hessian it drops the coupling between layers, including the one between the backbone U and the
  pretraining head W: ``r_W = 0`` and ``r_U`` uses only the U blocks (the cruder approximation
  of ``shared/docs/multistage-influence.md``).  Results say so.
* :class:`EkfacCgSolver` (``ekfac+cg``) runs conjugate gradient on the exact curvature products
  (the stage's Hessian-vector products over all of its data), preconditioned by the EK-FAC
  inverse; it converges to the exact ``(A + damping I)^{-1}``, and with a few iterations is far
  closer than EK-FAC alone.  The EK-FAC damping only shapes the preconditioner.

Damping: the stage's ``damping`` is added as is; EK-FAC adds ``relative_damping`` times the mean
eigenvalue of the approximation on top (kronfluence's default rule, 0.1), both recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.curvature.block_cg import block_pcg
from engine.curvature.errors import SolverSettingError
from engine.curvature.hvp import (
    CGSolver,
    _accuracy_verdict,
    _residual_summary,
    residual_tolerances,
    true_relative_residuals,
)
from engine.curvature.kronecker import KroneckerFactors, KroneckerSettings, fit_kronecker
from engine.curvature.operators import Curvature

BLOCK_DIAGONAL_NOTE = (
    "block-diagonal EK-FAC: the curvature is approximated layer by layer, dropping the coupling "
    "between layers (for the pretraining Hessian also between the backbone U and the pretraining "
    "head W, so r_W = 0 and r_U = H_UU^-1 s within layers)")


# Devices the EK-FAC fit runs on: engine.curvature.kronecker still makes its factor sums and
# helper tensors on the CPU, so on a GPU it would stop at the first mixed-device operation.
# Every tensor of the fit and solve follows the data's device (tests/test_device.py audits the
# factories); CUDA has not run on hardware here, other device types are refused.
EKFAC_DEVICE_TYPES = ("cpu", "cuda")


def check_ekfac_device(device: torch.device, what: str = "an EK-FAC solver") -> None:
    """Refuse EK-FAC on a device it does not run on yet, with what to use instead."""
    if device.type not in EKFAC_DEVICE_TYPES:
        raise SolverSettingError(
            f"{what} does not run on {device} yet (EK-FAC runs on the CPU and CUDA); use "
            "solver 'cg' or 'exact' for this stage, or device = \"cpu\"")


@dataclass
class _FactorCache:
    """Factors per operator, fitted once and reused for every solve with that operator."""

    settings: KroneckerSettings
    _fitted: dict[int, tuple[Curvature, KroneckerFactors]] = field(default_factory=dict)

    def factors(self, op: Curvature) -> KroneckerFactors:
        hit = self._fitted.get(id(op))
        if hit is not None and hit[0] is op:
            return hit[1]
        check_ekfac_device(op.point.device, f"EK-FAC of the {op.name}")
        if op.function is None:
            raise ValueError(f"{op.name} carries no stage function, so its layers are unknown; "
                             "build it with engine.curvature.operators' stage constructors")
        # a sharded operator holds this rank's rows: the fit all-reduces its sums
        fitted = fit_kronecker(op.function, op.x, op.y, self.settings,
                               world=op.world if op.sharded else None,
                               shard=op.shard if op.sharded else None)
        self._fitted = {id(op): (op, fitted)}
        return fitted


@dataclass
class EkfacSolver:
    """``(EK-FAC + diag(reg) + damping + relative_damping * mean eigenvalue)^{-1} V``."""

    fisher: str = "true"
    relative_damping: float = 0.1
    batch_size: int = 128
    max_examples: int | None = None
    seed: int = 0
    other_dense_limit: int = 4096
    memory_budget: int = 4 << 30
    name: str = "ekfac"
    _cache: _FactorCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.relative_damping >= 0:
            raise ValueError(f"relative_damping must be >= 0, got {self.relative_damping}")
        self._cache = _FactorCache(KroneckerSettings(
            self.fisher, self.batch_size, self.max_examples, self.seed, self.other_dense_limit,
            self.memory_budget))

    def factors(self, op: Curvature) -> KroneckerFactors:
        """The fitted EK-FAC of ``op`` (fitted on first use, then cached)."""
        return self._cache.factors(op)

    def total_damping(self, factors: KroneckerFactors, damping: float) -> float:
        return damping + self.relative_damping * factors.mean_eigenvalue()

    def solve(self, op: Curvature, rhs: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """EK-FAC inverse of the stage applied to every column of ``rhs``."""
        factors = self.factors(op)
        total = self.total_damping(factors, damping)
        self.last_info = {**factors.describe(), "damping_added": total - damping,
                          "damping_total": total, "approximation": BLOCK_DIAGONAL_NOTE}
        return factors.solve(rhs, total)

    def describe(self) -> dict[str, Any]:
        return {"solver": self.name, "relative_damping": self.relative_damping,
                **getattr(self, "last_info", {})}


@dataclass
class EkfacCgSolver:
    """CG on the exact curvature products, preconditioned by the EK-FAC inverse."""

    iterations: int = 20
    rtol: float = 1e-10
    fisher: str = "true"
    relative_damping: float = 0.1
    batch_size: int = 128
    max_examples: int | None = None
    seed: int = 0
    other_dense_limit: int = 4096
    memory_budget: int = 4 << 30
    block: bool = True        # block PCG: all right-hand sides share one Krylov space
    name: str = "ekfac+cg"
    _ekfac: EkfacSolver | None = field(default=None, repr=False)
    _cg: CGSolver | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        self._ekfac = EkfacSolver(self.fisher, self.relative_damping, self.batch_size,
                                  self.max_examples, self.seed, self.other_dense_limit,
                                  self.memory_budget)

    def solve(self, op: Curvature, rhs: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """``(A + damping I)^{-1} rhs`` by at most ``iterations`` preconditioned CG steps."""
        factors = self._ekfac.factors(op)
        pc_damping = self._ekfac.total_damping(factors, damping)
        info: dict[str, Any] = {**factors.describe(), "preconditioner_damping": pc_damping,
                                "block": self.block}
        if not self.block:
            self._cg = CGSolver(rtol=self.rtol, max_iter=self.iterations,
                                preconditioner=lambda r: factors.solve(r, pc_damping),
                                fixed_iterations=True)
            out = self._cg.solve(op, rhs, damping)
            self.last_info = {**info, **{k: v for k, v in self._cg.describe().items()
                                         if k != "solver"}}
            return out
        out, stats = block_pcg(lambda p: op.matvec(p) + damping * p, rhs,
                               lambda r: factors.solve(r, pc_damping), self.iterations,
                               self.rtol, op.name)
        rel = true_relative_residuals(op, rhs, out, damping)
        warn, fail = residual_tolerances(rhs.dtype, requested=self.rtol)
        self.last_info = {**info, **stats, **_residual_summary(rel), "warn_residual": warn,
                          "fail_residual": fail}
        _accuracy_verdict(
            f"block CG on {op.name} + damping {damping:g} ({stats['iterations']} iterations)",
            rel, warn, fail, rhs.dtype,
            lambda: (f"It ran at most {self.iterations} iterations as asked; raise "
                     "cg_iterations for a closer solution"), fatal=False)
        return out

    def describe(self) -> dict[str, Any]:
        return {"solver": self.name, "iterations_allowed": self.iterations,
                "relative_damping": self.relative_damping, **getattr(self, "last_info", {})}
