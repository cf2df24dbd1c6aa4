"""Errors of the curvature backends, shared by every solver."""

from __future__ import annotations


class NotPositiveDefiniteError(ValueError):
    """The damped curvature of a stage is not positive definite."""


class NonFiniteCurvatureError(ValueError):
    """A Hessian-vector product came out NaN or infinite."""


class SolveAccuracyError(ValueError):
    """An iterative solve ended with a true relative residual above its tolerance."""


def damping_advice(damping: float, lowest: float) -> str:
    """What to set: the damping must exceed ``damping - lowest`` (lowest: damped eigenvalue)."""
    need = max(damping - lowest, 1e-12)
    return (f"Increase this stage's damping above {need:.2g} "
            f"(e.g. damping = {float(f'{2 * need:.1g}'):g})")
