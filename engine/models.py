"""The built-in model family of the run command: a smooth MLP backbone with two linear heads.

Users with their own modules declare a :class:`engine.task.TwoStageTask` directly instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def mlp_backbone(in_dim: int, hidden: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """Linear + smooth activation layers; the output is the last hidden layer (the features).

    Activations must be twice differentiable: influence functions need second derivatives.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if not hidden:
        raise ValueError("the backbone needs at least one hidden layer")
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), ACTIVATIONS[activation]()]
        prev = width
    return nn.Sequential(*layers)


def build_model(in_dim: int, hidden: Sequence[int], activation: str, n_pretrain_classes: int,
                n_finetune_classes: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(backbone, pretraining head, finetuning head) for the run command."""
    backbone = mlp_backbone(in_dim, hidden, activation)
    return (backbone, nn.Linear(hidden[-1], n_pretrain_classes),
            nn.Linear(hidden[-1], n_finetune_classes))
