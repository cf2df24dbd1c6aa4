"""The built-in model families of the run command: a smooth MLP or CNN backbone, two linear heads.

Users with their own modules declare a :class:`engine.task.TwoStageTask` directly instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ARCHITECTURES = ("mlp", "cnn")
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


class ImageInput(nn.Module):
    """Flat feature rows (row-major over ``[height, width]`` or ``[height, width, channels]``)
    -> ``(batch, channels, height, width)`` images for the convolutions."""

    def __init__(self, image_shape: Sequence[int]) -> None:
        super().__init__()
        shape = tuple(int(s) for s in image_shape)
        if len(shape) not in (2, 3) or any(s < 1 for s in shape):
            raise ValueError(f"image_shape {list(image_shape)} must be [height, width] or "
                             "[height, width, channels] of positive sizes")
        self.hwc = shape if len(shape) == 3 else (*shape, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, c = self.hwc
        if c == 1:
            return x.reshape(x.shape[0], 1, h, w)
        return x.reshape(x.shape[0], h, w, c).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"image_shape={list(self.hwc)}"


def cnn_feature_maps(image_shape: Sequence[int], channels: Sequence[int], kernel_size: int,
                     pool: int) -> list[tuple[int, int, int]]:
    """``(channels, height, width)`` after each convolution + pooling block, in order.

    Convolutions pad by ``(kernel_size - 1) // 2`` (an odd kernel keeps the size), then
    ``pool x pool`` average pooling (``pool = 1``: none) divides it, rounding down.
    """
    shape = tuple(int(s) for s in image_shape)
    h, w = shape[0], shape[1]
    pad = (kernel_size - 1) // 2
    out = []
    for c in channels:
        h, w = h + 2 * pad - kernel_size + 1, w + 2 * pad - kernel_size + 1
        if pool > 1:
            h, w = h // pool, w // pool
        out.append((int(c), h, w))
    return out


def cnn_fit_problem(image_shape: Sequence[int], channels: Sequence[int], kernel_size: int,
                    pool: int) -> str | None:
    """Why the convolutions do not fit the image (a map shrinks to nothing), or ``None``."""
    for i, (_, h, w) in enumerate(cnn_feature_maps(image_shape, channels, kernel_size, pool)):
        if h < 1 or w < 1:
            size = "x".join(str(s) for s in list(image_shape)[:2])
            return (f"the {size} image shrinks to {max(h, 0)}x{max(w, 0)} after convolution "
                    f"block {i + 1} of {len(channels)} (kernel {kernel_size}, pool {pool})")
    return None


def cnn_backbone(image_shape: Sequence[int], channels: Sequence[int], kernel_size: int,
                 pool: int, hidden: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """Conv + smooth activation + average pooling blocks, then fully connected layers.

    Inputs are flat feature rows reshaped to ``image_shape`` (see :class:`ImageInput`); the
    output is the last fully connected layer (the features).  Average pooling and smooth
    activations keep the loss twice differentiable (influence needs second derivatives).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if not channels:
        raise ValueError("the CNN needs at least one convolution (channels is empty)")
    if not hidden:
        raise ValueError("the CNN needs at least one fully connected layer (hidden is empty)")
    if kernel_size < 1 or pool < 1:
        raise ValueError(f"kernel_size ({kernel_size}) and pool ({pool}) must be >= 1")
    problem = cnn_fit_problem(image_shape, channels, kernel_size, pool)
    if problem:
        raise ValueError(problem)
    first = ImageInput(image_shape)
    layers: list[nn.Module] = [first]
    prev = first.hwc[2]
    for c in channels:
        layers += [nn.Conv2d(prev, c, kernel_size, padding=(kernel_size - 1) // 2),
                   ACTIVATIONS[activation]()]
        if pool > 1:
            layers.append(nn.AvgPool2d(pool))
        prev = c
    c, h, w = cnn_feature_maps(image_shape, channels, kernel_size, pool)[-1]
    layers.append(nn.Flatten())
    prev = c * h * w
    for width in hidden:
        layers += [nn.Linear(prev, width), ACTIVATIONS[activation]()]
        prev = width
    return nn.Sequential(*layers)


def build_model(in_dim: int, hidden: Sequence[int], activation: str, n_pretrain_classes: int,
                n_finetune_classes: int, *, architecture: str = "mlp",
                image_shape: Sequence[int] | None = None, channels: Sequence[int] = (),
                kernel_size: int = 5, pool: int = 2
                ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(backbone, pretraining head, finetuning head) for the run command.

    ``architecture = "mlp"`` (the default) ignores the CNN arguments; ``"cnn"`` needs
    ``image_shape`` with ``prod(image_shape) == in_dim``.
    """
    if architecture == "mlp":
        backbone = mlp_backbone(in_dim, hidden, activation)
    elif architecture == "cnn":
        if image_shape is None or math.prod(image_shape) != in_dim:
            raise ValueError(f"the CNN reshapes {in_dim} features to image_shape "
                             f"{None if image_shape is None else list(image_shape)}, whose "
                             "sizes must multiply to the number of features")
        backbone = cnn_backbone(image_shape, channels, kernel_size, pool, hidden, activation)
    else:
        raise ValueError(f"architecture {architecture!r} is not one of {list(ARCHITECTURES)}")
    return (backbone, nn.Linear(hidden[-1], n_pretrain_classes),
            nn.Linear(hidden[-1], n_finetune_classes))
