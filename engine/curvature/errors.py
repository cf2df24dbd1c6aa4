"""Errors of the curvature backends, shared by every solver."""

from __future__ import annotations

import torch


class NotPositiveDefiniteError(ValueError):
    """The damped curvature of a stage is not positive definite."""


class NonFiniteCurvatureError(ValueError):
    """A Hessian-vector product came out NaN or infinite."""


class SolveAccuracyError(ValueError):
    """An iterative solve ended with a true relative residual above its tolerance."""


class SolveAccuracyWarning(UserWarning):
    """An iterative solve ended with a true relative residual above its warning tolerance."""


class CurvatureMemoryError(MemoryError, ValueError):
    """A curvature product or matrix does not fit in the memory budget (or ran out of memory).

    Also a ``ValueError``, so that the run command prints it as a one-line error."""


class SolverSettingError(ValueError):
    """A stage's solver cannot handle its curvature (size, memory): found before training."""


# What to lower (or raise) when curvature products do not fit; named in every memory error.
MEMORY_SETTINGS = ("`[influence] curvature_batch_size` / `memory_budget_gb` "
                   "(InfluenceArguments.curvature_batch_size / memory_budget)")


def is_allocation_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (CPU or accelerator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(w in text for w in (
        "not enough memory", "DefaultCPUAllocator", "out of memory", "Cannot allocate memory"))


def damping_advice(damping: float, lowest: float) -> str:
    """What to set: the damping must exceed ``damping - lowest`` (lowest: damped eigenvalue)."""
    need = max(damping - lowest, 1e-12)
    return (f"Increase this stage's damping above {need:.2g} "
            f"(e.g. damping = {float(f'{2 * need:.1g}'):g})")
