"""What training returns and reports: :class:`StageFit`, :class:`TwoStageFit`, the monitor
protocol and the warning / error types (shared by the certified and the minibatch trainers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.trust_region import DenseCurvature


class TrainingMonitor(Protocol):
    """Receives progress of a training stage (see :class:`engine.progress.TrainingProgress`)."""

    def step(self, stage: str, phase: str, done: int, limit: int, grad_norm: float,
             detail: str = "") -> None:
        """A phase made progress (called often; implementations throttle)."""

    def note(self, stage: str, message: str) -> None:
        """Something the user should read (a stall, a saddle, a switch of method)."""


class NotConvergedWarning(UserWarning):
    """A stage is not at a certified minimum: influence scores may be unreliable."""


class TrainingError(RuntimeError):
    """Training produced a non-finite loss or gradient."""


@dataclass
class StageFit:
    """Outcome of training one stage.

    ``status``: ``minimum`` (gradient below tolerance, Hessian positive definite), ``singular``
    (gradient below tolerance, smallest eigenvalue at round-off: a flat direction), ``saddle``,
    ``unchecked`` (Newton phase disabled: curvature not examined), ``not converged``, or
    ``not certified (adam, 5 epochs)`` for a minibatch-trained stage (``iterations`` then counts
    minibatch steps; never ``converged``).
    ``curvature`` is the dense Hessian's eigendecomposition at ``params`` when one was built
    there (reused as a warm-start hint); it is not part of :meth:`summary`.
    """

    params: torch.Tensor
    final_grad_norm: float
    final_objective: float
    iterations: int
    tolerance: float
    seconds: float
    status: str = "unchecked"
    min_eigenvalue: float | None = None
    curvature_check: str = "none"
    newton_steps: int = 0
    hessians: int = 0
    hvps: int = 0
    saddle_escapes: int = 0
    curvature: DenseCurvature | None = field(default=None, repr=False)
    optimizer: str = "newton"      # "newton" (this module's certified trainer), "adam", "sgd"
    epochs: int | None = None      # minibatch optimizers only

    @property
    def converged(self) -> bool:
        return (self.final_grad_norm <= self.tolerance
                and self.status in ("minimum", "singular", "unchecked"))

    def summary(self) -> dict:
        return {"final_grad_norm": self.final_grad_norm, "final_objective": self.final_objective,
                "iterations": self.iterations, "tolerance": self.tolerance,
                "converged": self.converged, "status": self.status,
                "min_eigenvalue": self.min_eigenvalue, "curvature_check": self.curvature_check,
                "newton_steps": self.newton_steps, "hessians": self.hessians,
                "hvps": self.hvps, "saddle_escapes": self.saddle_escapes,
                "optimizer": self.optimizer, "epochs": self.epochs,
                "seconds": round(self.seconds, 3)}


@dataclass
class TwoStageFit:
    """Trained parameters of both stages as flat vectors.

    ``backbone_pre`` is U* (full backbone after pretraining), ``backbone_ft`` is the backbone used
    by the finetuned model (U* in the fixed scenario, U^ in the updated one).
    """

    backbone_pre: torch.Tensor
    w: torch.Tensor
    backbone_ft: torch.Tensor
    t: torch.Tensor
    pretrain: StageFit | None = None
    finetune: StageFit | None = None
