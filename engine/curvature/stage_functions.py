"""Each stage's per-example losses as a function of a list of parameter tensors.

Kronecker-factored curvature needs the structure a flat vector hides: which tensor is which
layer's weight, the model outputs (to sample labels for the true Fisher) and the loss applied to
them.  A :class:`StageFunction` holds the tracked tensors of one curvature operator in the order
of its flat vector (``[u; w]`` for H, ``t`` for A_TT, ``[t; u]`` for B) and evaluates the stage
at any values of them with ``torch.func.functional_call``; the other parameters stay fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch.func import functional_call, grad, vmap

from engine.task import LossFn, TwoStageTask
from engine.training import TwoStageFit

# (tensors, inputs) -> model outputs of the stage, batch first
OutputsFn = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StageFunction:
    """Per-example losses ``loss(outputs(params, x), y)`` of one stage.

    ``names`` label the tensors in results (``backbone.0.weight``, ``pretrain_head.bias``...);
    ``params`` are their values at the trained point, in the order of the operator's flat
    vector; ``reg`` is each tensor's coefficient in the quadratic regularizer of the objective
    (weight decay, or ``alpha`` for the backbone in the updated scenario).
    """

    names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]
    outputs: OutputsFn
    loss: LossFn
    reg: tuple[float, ...]

    def __call__(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.outputs(params, x), y)

    def with_loss(self, loss: LossFn) -> StageFunction:
        """The same model with another loss on its outputs (surrogates for Fisher factors)."""
        return replace(self, loss=loss)

    def gradient_blocks(self, x: torch.Tensor, y: torch.Tensor,
                        which: Sequence[int]) -> list[torch.Tensor]:
        """Per-example gradients of the tensors ``which``, one ``(batch, numel)`` block each."""
        which = list(which)

        def single(sub: list[torch.Tensor], xj: torch.Tensor, yj: torch.Tensor) -> torch.Tensor:
            full = list(self.params)
            for i, t in zip(which, sub, strict=True):
                full[i] = t
            return self(full, xj[None], yj[None]).sum()

        grads = vmap(grad(single), in_dims=(None, 0, 0))([self.params[i] for i in which], x, y)
        return [g.reshape(len(x), -1) for g in grads]


def _named(prefix: str, layout_names: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" for n in layout_names)


def pretrain_function(task: TwoStageTask, fit: TwoStageFit) -> StageFunction:
    """The pretraining stage over ``[U blocks, W blocks]`` at (U*, W*) (the variables of H)."""
    base = task.backbone_layout.unflatten(fit.backbone_pre)
    u_names, w_names = task.u_layout.names, task.w_layout.names
    params = (*task.u_layout.unflatten(task.tracked(fit.backbone_pre)).values(),
              *task.w_layout.unflatten(fit.w).values())
    nu = len(u_names)

    def outputs(ps: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        feats = functional_call(task.backbone, {**base, **dict(zip(u_names, ps[:nu],
                                                                   strict=True))}, (x,))
        return functional_call(task.pretrain_head, dict(zip(w_names, ps[nu:], strict=True)),
                               (feats,))

    wd = task.pretrain_weight_decay
    return StageFunction(_named("backbone", u_names) + _named("pretrain_head", w_names),
                         tuple(p.detach() for p in params), outputs, task.pretrain_loss,
                         (wd,) * len(params))


def finetune_function(task: TwoStageTask, fit: TwoStageFit, with_backbone: bool
                      ) -> StageFunction:
    """The finetuning stage over ``[T blocks]`` (A_TT) or ``[T blocks, U blocks]`` (B) at the
    finetuned point; the backbone's coefficient is ``alpha`` (the proximal term) in B."""
    base = task.backbone_layout.unflatten(fit.backbone_ft)
    t_names, u_names = task.t_layout.names, task.u_layout.names
    t_params = tuple(task.t_layout.unflatten(fit.t).values())
    u_params = (tuple(task.u_layout.unflatten(task.tracked(fit.backbone_ft)).values())
                if with_backbone else ())
    nt = len(t_names)

    def outputs(ps: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        over = dict(zip(u_names, ps[nt:], strict=True)) if with_backbone else {}
        feats = functional_call(task.backbone, {**base, **over}, (x,))
        return functional_call(task.finetune_head, dict(zip(t_names, ps[:nt], strict=True)),
                               (feats,))

    names = _named("finetune_head", t_names) + (_named("backbone", u_names)
                                                if with_backbone else ())
    reg = (task.finetune_weight_decay,) * nt + (task.alpha,) * len(u_params)
    return StageFunction(names, tuple(p.detach() for p in t_params + u_params), outputs,
                         task.finetune_loss, reg)
