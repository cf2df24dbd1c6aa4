"""Curvature backends of both stages: operators, and solvers for ``(A + damping I)^{-1} V``.

==============  ==========================================================================
module          what it holds
==============  ==========================================================================
``operators``   the stages' curvature operators (H, A_TT, A_UT, B) as Hessian-vector products
``dense``       :class:`ExactSolver`: dense matrix + eigendecomposition (the reference)
``hvp``         :class:`CGSolver`, :class:`LissaSolver`: iterative solves on HVPs
``kronecker``   EK-FAC factors of a stage (Kronecker eigenbases + eigenvalue correction)
``ekfac``       :class:`EkfacSolver` (block-diagonal EK-FAC), :class:`EkfacCgSolver` (CG on
                exact products, EK-FAC preconditioned)
``stage_functions``  each stage's per-example losses as a function of its named tensors
``errors``      the errors every backend raises
``checks``      before training: can a stage's solver handle its curvature (size, memory)?
==============  ==========================================================================
"""

from __future__ import annotations

from typing import Any

from engine.curvature.checks import check_curvature_batch, check_stage_solver
from engine.curvature.dense import ExactSolver
from engine.curvature.ekfac import EkfacCgSolver, EkfacSolver
from engine.curvature.errors import (
    CurvatureMemoryError,
    NonFiniteCurvatureError,
    NotPositiveDefiniteError,
    SolveAccuracyError,
    SolveAccuracyWarning,
    SolverSettingError,
)
from engine.curvature.hvp import CGSolver, LissaSolver
from engine.curvature.operators import (
    Curvature,
    finetune_cross_matvec,
    finetune_head_hessian,
    finetune_joint_hessian,
    pretrain_hessian,
)

Solver = ExactSolver | CGSolver | LissaSolver | EkfacSolver | EkfacCgSolver

__all__ = [
    "CGSolver",
    "Curvature",
    "CurvatureMemoryError",
    "EkfacCgSolver",
    "EkfacSolver",
    "ExactSolver",
    "LissaSolver",
    "NonFiniteCurvatureError",
    "NotPositiveDefiniteError",
    "SolveAccuracyError",
    "SolveAccuracyWarning",
    "Solver",
    "SolverSettingError",
    "check_curvature_batch",
    "check_stage_solver",
    "finetune_cross_matvec",
    "finetune_head_hessian",
    "finetune_joint_hessian",
    "make_solver",
    "pretrain_hessian",
]


def make_solver(name: str, **options: Any) -> Solver:
    """A solver by name (``exact``, ``cg``, ``lissa``, ``ekfac``, ``ekfac+cg``) with its
    options."""
    solvers = {"exact": ExactSolver, "cg": CGSolver, "lissa": LissaSolver,
               "ekfac": EkfacSolver, "ekfac+cg": EkfacCgSolver}
    if name not in solvers:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(solvers)}")
    return solvers[name](**options)
