"""Checks that a stage's solver can handle its curvature, made before anything is trained.

Each is a plain function of sizes, so a caller can run it per stage (``pretrain`` with H of
``n_u + n_w`` variables; ``finetune`` with A_TT of ``n_t`` (fixed) or B of ``n_t + n_u``
(updated)) as soon as the task's layouts are known: a limit found after training has cost the
whole training time.  Errors are one line that names the setting to change.
"""

from __future__ import annotations

import torch

from engine.curvature.dense import ExactSolver
from engine.curvature.errors import CurvatureMemoryError, SolverSettingError
from engine.curvature.operators import Curvature

# Dense solves hold ~4 matrices of dim x dim: the matrix, its symmetrized copy, the
# eigenvectors and LAPACK's eigh workspace (syevd: ~2 dim^2 values at its peak, partly overlapping
# the copies).
DENSE_COPIES = 4
DENSE_SOLVERS = ("exact",)


def dense_bytes(dim: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes of building and eigendecomposing a dense ``dim x dim`` curvature."""
    itemsize = dtype.itemsize
    return DENSE_COPIES * dim * dim * itemsize


def dense_problem(dim: int, dtype: torch.dtype, memory_budget: float,
                  max_dim: int | None = None) -> str | None:
    """Why a dense solve of ``dim`` variables is not possible (``None``: it is), and what fixes
    it; the subject of the sentence is the curvature."""
    limit = ExactSolver.max_dim if max_dim is None else max_dim
    if dim > limit:
        return (f"has {dim:,} variables, above the exact solver's limit of {limit:,} (a dense "
                f"{dim:,} x {dim:,} matrix)")
    need = dense_bytes(dim, dtype)
    if need > memory_budget:
        itemsize = dtype.itemsize
        return (f"({dim:,} variables) needs about {need / 2**30:.3g} GB as a dense matrix and its "
                f"eigendecomposition ({DENSE_COPIES} x {dim:,}^2 x {itemsize} bytes), above the "
                f"memory budget of {memory_budget / 2**30:.3g} GB ([influence] memory_budget_gb)")
    return None


def check_stage_solver(stage: str, solver: str, dim: int, dtype: torch.dtype,
                       memory_budget: float, *, matrix: str | None = None,
                       max_dim: int | None = None, setting: str | None = None) -> None:
    """Raise :class:`SolverSettingError` if ``solver`` cannot handle the ``stage``'s curvature
    of ``dim`` variables in ``dtype`` within ``memory_budget`` bytes.

    ``stage``: ``"pretrain"`` or ``"finetune"`` (or any label); ``matrix``: its name in the
    message (default "curvature"); ``max_dim``: the exact solver's limit (default
    ``ExactSolver.max_dim``); ``setting``: the key to change (default ``[<stage>] solver``).
    Only dense solvers (``exact``) have size limits here; iterative ones need a few
    ``dim x k`` blocks beside their products, whose memory :func:`check_curvature_batch` checks.
    """
    if solver not in DENSE_SOLVERS:
        return
    problem = dense_problem(dim, dtype, memory_budget, max_dim)
    if problem:
        setting = setting or f"[{stage}] solver"
        raise SolverSettingError(
            f"{setting} = '{solver}': the {stage} stage's {matrix or 'curvature'} {problem}; "
            f"set {setting} to 'cg' (or 'lissa', 'ekfac+cg'), raise [influence] memory_budget_gb "
            "if memory is the limit, or track fewer backbone parameters "
            "([influence] tracked_backbone)")


def check_curvature_batch(stage: str, op: Curvature, columns: int = 1) -> tuple[int, int]:
    """The (examples, columns) chunks of a ``columns``-wide product of ``op`` within its memory
    budget; raises :class:`CurvatureMemoryError` (naming the setting) when not even one example
    and one column fit.  Needs no trained parameters: activations do not depend on the values."""
    try:
        return op.plan(columns)
    except CurvatureMemoryError as exc:
        raise CurvatureMemoryError(f"{stage} stage: {exc}") from None
