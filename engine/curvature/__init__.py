"""Curvature backends of both stages: operators, and solvers for ``(A + damping I)^{-1} V``.

==============  ==========================================================================
module          what it holds
==============  ==========================================================================
``operators``   the stages' curvature operators (H, A_TT, A_UT, B) as Hessian-vector products
``dense``       :class:`ExactSolver`: dense matrix + eigendecomposition (the reference)
``hvp``         :class:`CGSolver`, :class:`LissaSolver`: iterative solves on HVPs
``errors``      the errors every backend raises
==============  ==========================================================================
"""

from __future__ import annotations

from typing import Any

from engine.curvature.dense import ExactSolver
from engine.curvature.errors import (
    NonFiniteCurvatureError,
    NotPositiveDefiniteError,
    SolveAccuracyError,
)
from engine.curvature.hvp import CGSolver, LissaSolver
from engine.curvature.operators import (
    Curvature,
    finetune_cross_matvec,
    finetune_head_hessian,
    finetune_joint_hessian,
    pretrain_hessian,
)

Solver = ExactSolver | CGSolver | LissaSolver

__all__ = [
    "CGSolver", "Curvature", "ExactSolver", "LissaSolver", "NonFiniteCurvatureError",
    "NotPositiveDefiniteError", "SolveAccuracyError", "Solver", "finetune_cross_matvec",
    "finetune_head_hessian", "finetune_joint_hessian", "make_solver", "pretrain_hessian",
]


def make_solver(name: str, **options: Any) -> Solver:
    """A solver by name (``exact``, ``cg``, ``lissa``) with its options."""
    solvers = {"exact": ExactSolver, "cg": CGSolver, "lissa": LissaSolver}
    if name not in solvers:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(solvers)}")
    return solvers[name](**options)
