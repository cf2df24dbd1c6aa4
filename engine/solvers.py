"""Former home of the solvers, kept so scripts written against it keep importing.

The solvers live in :mod:`engine.curvature` (``dense``, ``hvp``, ``ekfac``).
"""

from engine.curvature import (  # noqa: F401 - re-exported names
    CGSolver,
    ExactSolver,
    LissaSolver,
    NotPositiveDefiniteError,
    Solver,
    make_solver,
)
