"""The user-declared two-stage task: modules, losses, data, regularization, scenario, measurement.

Notation (see ``shared/docs/multistage-influence.md`` and README "Engine API"):

==========  =================  ===============================================================
doc         code               meaning
==========  =================  ===============================================================
U           ``u``              tracked backbone parameters (shared by both stages)
W           ``w``              pretraining-head parameters
T           ``t``              finetuning-head parameters
theta       ``theta = [u; w]`` pretraining parameters, the variables of the pretraining Hessian H
l_pre       ``pretrain_loss``  per-example pretraining loss
l_ft        ``finetune_loss``  per-example finetuning loss
g_t         ``measure``        the measured quantity on a test point (the loss by default)
==========  =================  ===============================================================

Untracked backbone parameters (when ``tracked_backbone`` names a subset) are held at their
trained values: the scores are then an approximation, and results say so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from torch.func import functional_call

from engine.params import ParamLayout

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Scenario = Literal["fixed", "updated"]
MEASUREMENTS = ("loss", "margin", "log_prob")


class TaskError(ValueError):
    """The declared task is inconsistent (shapes, data, settings)."""


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (no reduction): the default loss of both stages."""
    return F.cross_entropy(outputs, targets, reduction="none")


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example squared error summed over output dimensions (regression heads)."""
    diff = outputs - targets.reshape(outputs.shape)
    return (diff * diff).reshape(diff.shape[0], -1).sum(dim=1)


def negative_margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(logit of the true class - largest other logit): higher is worse, like a loss."""
    true = outputs.gather(1, targets.view(-1, 1)).squeeze(1)
    others = outputs.scatter(1, targets.view(-1, 1), float("-inf"))
    return others.max(dim=1).values - true


def negative_log_prob(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(true class): higher is worse, like a loss."""
    return -F.log_softmax(outputs, dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


@dataclass
class TwoStageTask:
    """A pretrain -> finetune pipeline declared on the user's own modules.

    ``backbone`` maps inputs to features (parameters U); ``pretrain_head`` maps features to
    pretraining outputs (W, may have no parameters); ``finetune_head`` maps features to finetuning
    outputs (T).  Losses take ``(outputs, targets)`` and return one loss per example.

    Objectives (the regularizers are part of the objective and of its Hessian)::

        L_pre(U, W) = mean_j l_pre(z_j) + pretrain_weight_decay/2 * ||(U, W)||^2
        L_ft(T, U)  = mean_i l_ft(x_i)  + finetune_weight_decay/2 * ||T||^2
                      [+ alpha/2 * ||U - U*||^2 in the "updated" scenario]

    ``measurement`` is the quantity whose change is scored, always oriented so that higher is
    worse: ``"loss"`` (the finetuning loss), ``"margin"`` (minus the true-class margin),
    ``"log_prob"`` (minus the log-probability of the true class), or a callable like a loss.

    Modules and data must be on one device (:attr:`device`; put them there with ``.to``,
    e.g. ``engine.devices.resolve_device("auto")``): training, solvers and scoring create
    their tensors on it.  Results stay there; copy them to the CPU to save them.
    """

    backbone: nn.Module
    pretrain_head: nn.Module
    finetune_head: nn.Module
    pretrain_data: tuple[torch.Tensor, torch.Tensor]
    finetune_data: tuple[torch.Tensor, torch.Tensor]
    pretrain_loss: LossFn = cross_entropy
    finetune_loss: LossFn = cross_entropy
    pretrain_weight_decay: float = 0.0
    finetune_weight_decay: float = 0.0
    scenario: Scenario = "fixed"
    alpha: float = 1.0
    measurement: str | LossFn = "loss"
    tracked_backbone: Sequence[str] | None = None
    u_layout: ParamLayout = field(init=False)
    w_layout: ParamLayout = field(init=False)
    t_layout: ParamLayout = field(init=False)
    backbone_layout: ParamLayout = field(init=False)

    def __post_init__(self) -> None:
        if self.scenario not in ("fixed", "updated"):
            raise TaskError(f"scenario must be 'fixed' or 'updated', got {self.scenario!r}")
        if self.scenario == "updated" and not self.alpha > 0:
            raise TaskError(f"alpha must be > 0 in the updated scenario, got {self.alpha}")
        if isinstance(self.measurement, str) and self.measurement not in MEASUREMENTS:
            raise TaskError(f"measurement must be one of {MEASUREMENTS} or a callable")
        for name, wd in (("pretrain", self.pretrain_weight_decay),
                         ("finetune", self.finetune_weight_decay)):
            if wd < 0:
                raise TaskError(f"{name}_weight_decay must be >= 0, got {wd}")
        for name, (x, y) in (("pretrain_data", self.pretrain_data),
                             ("finetune_data", self.finetune_data)):
            if len(x) == 0:
                raise TaskError(f"{name} is empty: a stage needs at least one training example")
            if len(x) != len(y):
                raise TaskError(f"{name}: {len(x)} inputs but {len(y)} targets")
        self._check_devices()
        self.backbone_layout = ParamLayout.of(self.backbone)
        self.u_layout = ParamLayout.of(self.backbone, self.tracked_backbone)
        if self.u_layout.numel == 0:
            raise TaskError("no backbone parameters are tracked; influence needs at least one")
        self.w_layout = ParamLayout.of(self.pretrain_head)
        self.t_layout = ParamLayout.of(self.finetune_head)
        if self.t_layout.numel == 0:
            raise TaskError("the finetuning head has no parameters")
        self._check_shapes()

    # ----- device and shape checks --------------------------------------------------------
    def _check_devices(self) -> None:
        """Modules and data on one device: the engine creates its work arrays there too."""
        found: dict[str, torch.device] = {}
        for name, module in (("backbone", self.backbone), ("pretrain_head", self.pretrain_head),
                             ("finetune_head", self.finetune_head)):
            for tensor in (*module.parameters(), *module.buffers()):
                found.setdefault(name, tensor.device)
                if tensor.device != found[name]:
                    raise TaskError(f"{name} has tensors on {found[name]} and on "
                                    f"{tensor.device}; move the module with .to(device)")
        for name, (x, y) in (("pretrain_data", self.pretrain_data),
                             ("finetune_data", self.finetune_data)):
            found[f"{name} inputs"], found[f"{name} targets"] = x.device, y.device
        devices = set(found.values())
        if len(devices) > 1:
            where = ", ".join(f"{k} on {v}" for k, v in found.items())
            raise TaskError(f"the task's modules and data must be on one device, found {where}; "
                            "move them with .to(device) (engine.devices.resolve_device turns a "
                            "'cpu' / 'cuda' / 'auto' setting into a device)")

    def _check_shapes(self) -> None:
        x_pre, y_pre = self.pretrain_data
        x_ft, y_ft = self.finetune_data
        with torch.no_grad():
            try:
                feats = self.backbone(x_pre[:2])
            except RuntimeError as exc:
                raise TaskError(f"backbone cannot take the pretraining inputs: {exc}") from exc
            for head, name, x, y, loss in (
                (self.pretrain_head, "pretrain_head", x_pre, y_pre, self.pretrain_loss),
                (self.finetune_head, "finetune_head", x_ft, y_ft, self.finetune_loss),
            ):
                try:
                    out = head(self.backbone(x[:2]) if x is x_ft else feats)
                except RuntimeError as exc:
                    raise TaskError(
                        f"{name} does not fit the backbone output of shape "
                        f"{tuple(feats.shape[1:])}: {exc}"
                    ) from exc
                try:
                    loss(out, y[:2])
                except (RuntimeError, IndexError, ValueError) as exc:
                    raise TaskError(
                        f"{name} outputs of shape {tuple(out.shape)} do not fit its loss and "
                        f"targets of shape {tuple(y[:2].shape)}: {exc}"
                    ) from exc

    # ----- sizes and current values --------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the modules and data are (checked to be one device): every tensor the engine
        creates for this task (solver work arrays, scores) is created there."""
        return next(self.backbone.parameters()).device

    @property
    def n_pretrain(self) -> int:
        return len(self.pretrain_data[0])

    @property
    def approximation(self) -> str | None:
        """A note when only part of the backbone is tracked, else ``None``."""
        if self.u_layout.numel == self.backbone_layout.numel:
            return None
        return (f"only {list(self.u_layout.names)} of the backbone are tracked "
                f"({self.u_layout.numel} of {self.backbone_layout.numel} parameters); the other "
                "backbone parameters are held fixed, so scores are an approximation")

    def tracked(self, ub: torch.Tensor) -> torch.Tensor:
        """The tracked part ``u`` of a full backbone vector ``ub``."""
        if self.u_layout.names == self.backbone_layout.names:
            return ub
        parts = self.backbone_layout.unflatten(ub)
        return torch.cat([parts[n].reshape(-1) for n in self.u_layout.names])

    def initial_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat (backbone, w, t) of the modules' current parameters: the training start."""
        return (self.backbone_layout.flatten(self.backbone, self.device),
                self.w_layout.flatten(self.pretrain_head, self.device),
                self.t_layout.flatten(self.finetune_head, self.device))

    # ----- functional evaluation -----------------------------------------------------------
    # ``ub`` is always a FULL backbone vector; ``u``, when given, overrides its tracked part.
    # Training differentiates through ``ub``; influence differentiates through ``u``.
    def features(self, ub: torch.Tensor, x: torch.Tensor,
                 u: torch.Tensor | None = None) -> torch.Tensor:
        params = self.backbone_layout.unflatten(ub)
        if u is not None:
            params.update(self.u_layout.unflatten(u))
        return functional_call(self.backbone, params, (x,))

    def pretrain_outputs(self, ub: torch.Tensor, w: torch.Tensor, x: torch.Tensor,
                         u: torch.Tensor | None = None) -> torch.Tensor:
        return functional_call(self.pretrain_head, self.w_layout.unflatten(w),
                               (self.features(ub, x, u),))

    def finetune_outputs(self, t: torch.Tensor, ub: torch.Tensor, x: torch.Tensor,
                         u: torch.Tensor | None = None) -> torch.Tensor:
        return functional_call(self.finetune_head, self.t_layout.unflatten(t),
                               (self.features(ub, x, u),))

    def measure(self, t: torch.Tensor, ub: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                u: torch.Tensor | None = None) -> torch.Tensor:
        """Per-test-point measurement g (higher is worse)."""
        out = self.finetune_outputs(t, ub, x, u)
        m = self.measurement
        if callable(m):
            return m(out, y)
        if m == "loss":
            return self.finetune_loss(out, y)
        if m == "margin":
            return negative_margin(out, y)
        return negative_log_prob(out, y)
