"""Minibatch training of one stage (Adam, or SGD with momentum) for a fixed budget: reproducible
(seeded epoch orders), data-parallel under ``torchrun`` through the stage's
:class:`~engine.objectives.StochasticObjective`, and honest about what it reached (the final
full-batch gradient norm; recorded as "not certified")."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import torch

from engine.fit_results import NotConvergedWarning, StageFit, TrainingError, TrainingMonitor
from engine.objectives import StochasticObjective

log = logging.getLogger(__name__)


MINIBATCH_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class MinibatchSettings:
    """Minibatch training of one stage with Adam or SGD (with momentum) for a fixed budget.

    Each epoch visits every example once in an order drawn from ``seed`` (a fresh
    ``torch.Generator``), so the same settings, data and start give bit-identical parameters.
    ``eval_batch_size`` rows at a time are used for the final full-batch objective and gradient.
    """

    optimizer: str = "adam"
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3
    momentum: float = 0.9          # sgd only
    seed: int = 0
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.optimizer not in MINIBATCH_OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of "
                             f"{list(MINIBATCH_OPTIMIZERS)}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    @property
    def status(self) -> str:
        """The stage status this training records, e.g. ``not certified (adam, 5 epochs)``."""
        return (f"not certified ({self.optimizer}, {self.epochs} "
                f"epoch{'' if self.epochs == 1 else 's'})")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m{sec:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def minimize_minibatch(objective: StochasticObjective, x0: torch.Tensor, *,
                       settings: MinibatchSettings, tolerance: float, name: str,
                       monitor: TrainingMonitor | None = None) -> StageFit:
    """Train a flat parameter vector by minibatch Adam/SGD for ``settings.epochs`` epochs.

    No minimum is certified: the result's status is ``settings.status``, its gradient norm is
    the full-batch gradient at the end (``tolerance`` is only recorded), and a
    :class:`NotConvergedWarning` says so.  Progress: a line per epoch with an ETA, and throttled
    minibatch lines through ``monitor``.
    """
    start = time.perf_counter()
    n = objective.n
    if n == 0:
        raise TrainingError(f"{name}: no examples to train on")
    x = x0.detach().clone().requires_grad_(True)
    if settings.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([x], lr=settings.learning_rate)
    else:
        opt = torch.optim.SGD([x], lr=settings.learning_rate, momentum=settings.momentum)
    gen = torch.Generator().manual_seed(settings.seed)
    size = min(settings.batch_size, n)
    per_epoch = math.ceil(n / size)
    total_steps = settings.epochs * per_epoch
    label = settings.optimizer
    steps = 0
    for epoch in range(1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        # drawn on the CPU: the same order, hence the same parameters, on every device
        order = torch.randperm(n, generator=gen, device="cpu").to(x.device)
        running = 0.0
        for b in range(per_epoch):
            rows = order[b * size:(b + 1) * size]
            opt.zero_grad(set_to_none=True)
            value = objective.batch(x, rows)
            if not torch.isfinite(value):
                raise TrainingError(
                    f"{name}: the minibatch objective became {value.item()} at {label} epoch "
                    f"{epoch}, step {b + 1}; lower learning_rate, or check the inputs for "
                    "NaN/inf values")
            value.backward()
            opt.step()
            steps += 1
            running += value.item()
            if monitor is not None:
                elapsed = time.perf_counter() - start
                eta = elapsed / steps * (total_steps - steps)
                monitor.step(name, f"{label} epoch {epoch}/{settings.epochs}", b + 1, per_epoch,
                             x.grad.norm().item(),
                             f"minibatch gradient; objective {value.item():.4g}, stage ETA "
                             f"{_duration(eta)}")
        if monitor is not None:
            elapsed = time.perf_counter() - start
            monitor.note(name, f"{label} epoch {epoch}/{settings.epochs} done in "
                               f"{time.perf_counter() - t_epoch:.1f}s: mean minibatch objective "
                               f"{running / per_epoch:.4g}; ETA "
                               f"{_duration(elapsed / epoch * (settings.epochs - epoch))}")
    if monitor is not None:
        monitor.note(name, "full-batch objective and gradient at the end of training")
    value, g = objective.value_and_grad(x.detach(), settings.eval_batch_size)
    grad_norm = g.norm().item()
    if not (math.isfinite(value) and math.isfinite(grad_norm)):
        raise TrainingError(f"{name}: the objective or its gradient is not finite after "
                            f"training ({value}, {grad_norm}); lower learning_rate")
    fit = StageFit(x.detach().clone(), grad_norm, value, steps, tolerance,
                   time.perf_counter() - start, settings.status, optimizer=settings.optimizer,
                   epochs=settings.epochs)
    warnings.warn(
        f"{name} was trained with {label} for {settings.epochs} epoch(s) ({steps} minibatch "
        f"steps of {size}): not a certified minimum (full-batch gradient norm {grad_norm:.3g}, "
        "curvature not checked). Influence scores assume a minimum: use a curvature that is "
        "positive definite by construction (EK-FAC) or a damping, and read the scores as "
        "approximate.", NotConvergedWarning, stacklevel=2)
    log.info("%s: %s, %d steps, full-batch gradient norm %.3g, objective %.6g, %.2fs", name,
             fit.status, steps, grad_norm, value, fit.seconds)
    return fit
