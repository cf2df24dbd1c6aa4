"""Output gradients whose outer products give the chosen Fisher (for EK-FAC's two passes).

* ``"true"``: one target per example drawn from the model's own distribution (cross-entropy:
  a class from the softmax; squared error: ``out + N(0, I/2)``, whose ``E[g g^T] = 2 I`` is the
  loss's output Hessian), drawn inside the probe pass's forward (no separate forward);
* ``"empirical"``: the data's labels;
* ``"expected"``: the exact expectation over the model's distribution (the Gauss-Newton
  output Hessian), one surrogate pass per output.

Random draws are made per example row, once for all rows of the stage, from one seeded
generator (:class:`RowDraws`): a row's draw does not depend on the batch size, on which rows
are fitted, or on which rank of a data-parallel run holds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from engine.curvature.stage_functions import StageFunction
from engine.layer_capture import probe_pass
from engine.task import cross_entropy, squared_error

FISHER_TYPES = ("true", "empirical", "expected")


class FisherError(ValueError):
    """The chosen Fisher needs a model distribution this loss does not define."""


def _unknown(fisher: str) -> FisherError:
    return FisherError(
        f"fisher = {fisher!r} needs a model distribution, known for the built-in cross_entropy "
        "and squared_error losses only; for another loss use fisher = 'empirical'")


class RowDraws:
    """Uniform / normal draws for rows ``0 .. total-1``, made on first use from ``seed``."""

    def __init__(self, seed: int, total: int, device: torch.device | str = "cpu") -> None:
        # drawn on the CPU whatever the device, so every device gets the same draws
        self.gen = torch.Generator().manual_seed(seed)
        self.total = total
        self.device = torch.device(device)
        self._uniform: torch.Tensor | None = None
        self._normal: torch.Tensor | None = None

    def uniform(self, rows: torch.Tensor) -> torch.Tensor:
        if self._uniform is None:
            self._uniform = torch.rand(self.total, generator=self.gen, dtype=torch.float64,
                                       device="cpu").to(self.device)
        return self._uniform[rows]

    def normal(self, rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        if self._normal is None or self._normal.shape[1:] != tuple(shape):
            self._normal = torch.randn(self.total, *shape, generator=self.gen,
                                       dtype=torch.float64, device="cpu").to(self.device)
        return self._normal[rows]


def sample_targets(fn: StageFunction, out: torch.Tensor, y: torch.Tensor, fisher: str,
                   draws: RowDraws, rows: torch.Tensor) -> torch.Tensor:
    """Targets of one pass for ``fisher`` "true" (drawn from the model) or "empirical"."""
    if fisher == "empirical":
        return y
    if fn.loss is cross_entropy:
        # inverse CDF of the softmax at the row's uniform draw
        cdf = torch.softmax(out.double(), dim=1).cumsum(1)
        picked = (cdf < draws.uniform(rows)[:, None]).sum(1)
        return picked.clamp_max(out.shape[1] - 1)
    if fn.loss is squared_error:
        noise = draws.normal(rows, out.shape[1:]) * math.sqrt(0.5)
        return (out.double() + noise).to(out.dtype).reshape(y.shape)
    raise _unknown(fisher)


class SampledLosses:
    """The stage's losses on targets drawn from its own outputs in the same forward pass;
    ``rows`` (global row numbers of the batch) must be set before each call, ``targets``
    keeps the last draw."""

    def __init__(self, fn: StageFunction, fisher: str, draws: RowDraws) -> None:
        self.fn, self.fisher, self.draws = fn, fisher, draws
        self.rows: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None

    def __call__(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        out = self.fn.outputs(params, x)
        self.targets = sample_targets(self.fn, out.detach(), y, self.fisher, self.draws,
                                      self.rows)
        return self.fn.loss(out, self.targets)


def expected_targets(fn: StageFunction, x: torch.Tensor
                     ) -> Iterator[tuple[StageFunction, torch.Tensor]]:
    """(surrogate, coefficients) pairs whose output-gradient outer products sum to the exact
    expectation over the model's distribution (the Gauss-Newton output Hessian)."""
    with torch.no_grad():
        out = fn.outputs(fn.params, x)
    if fn.loss is cross_entropy:
        # diag(p) - p p^T = L L^T with columns L_c = sqrt(p_c) (e_c - p).
        probs = torch.softmax(out.double(), dim=1)
        surrogate = fn.with_loss(lambda o, coef: (o * coef).sum(1))
        root = probs.sqrt()
        for c in range(out.shape[1]):
            coef = -probs * root[:, c : c + 1]
            coef[:, c] += root[:, c]
            yield surrogate, coef.to(out.dtype)
        return
    if fn.loss is squared_error:
        surrogate = fn.with_loss(lambda o, coef: (o * coef).reshape(len(o), -1).sum(1))
        flat = out.reshape(len(out), -1)
        for c in range(flat.shape[1]):
            coef = torch.zeros_like(flat)
            coef[:, c] = math.sqrt(2.0)
            yield surrogate, coef.reshape(out.shape)
        return
    raise _unknown("expected")


ProbePass = tuple[StageFunction, torch.Tensor, list]


def probe_passes(fn: StageFunction, params: list[torch.Tensor], index: dict[int, int],
                 x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, fisher: str,
                 draws: RowDraws) -> Iterator[ProbePass]:
    """(function, targets, captured calls) of every pass of one batch (global ``rows``): one
    fused pass for true / empirical, one per output for expected."""
    if fisher == "expected":
        for fj, tj in expected_targets(fn, x):
            yield fj, tj, probe_pass(fj, params, index, x, tj)
        return
    sampled = SampledLosses(fn, fisher, draws)
    sampled.rows = rows
    calls = probe_pass(sampled, params, index, x, y)   # its forward always sets targets
    yield fn, sampled.targets, calls


PassFn = Callable[..., Iterator[ProbePass]]
