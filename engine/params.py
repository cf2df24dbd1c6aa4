"""Flat parameter layouts: one vector per parameter group (U, W, T) <-> a module's named tensors.

Solvers and curvature operators work on flat vectors; modules are evaluated functionally with
``torch.func.functional_call`` so the same module can be evaluated at any parameter vector
without mutating it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a subset of a module's parameters, in a fixed order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, module: nn.Module, names: Sequence[str] | None = None) -> ParamLayout:
        """Layout of ``module``'s parameters (all of them, or ``names`` in the module's order)."""
        params = dict(module.named_parameters())
        if names is None:
            chosen = list(params)
        else:
            unknown = [n for n in names if n not in params]
            if unknown:
                raise ValueError(
                    f"unknown parameter names {unknown}; the module has {list(params)}"
                )
            chosen = [n for n in params if n in set(names)]
        return cls(tuple(chosen), tuple(params[n].shape for n in chosen))

    @property
    def numel(self) -> int:
        return int(sum(s.numel() for s in self.shapes))

    def flatten(self, module: nn.Module, device: torch.device | str | None = None
                ) -> torch.Tensor:
        """Current values of the layout's parameters as one detached flat vector.

        ``device``: where an empty layout's empty vector is made (a module without parameters
        has no device of its own); default the CPU.
        """
        params = dict(module.named_parameters())
        if not self.names:
            dtype = next(iter(params.values())).dtype if params else torch.get_default_dtype()
            return torch.zeros(0, dtype=dtype, device=device)
        return torch.cat([params[n].detach().reshape(-1) for n in self.names]).clone()

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into named tensors (views, so gradients flow back to ``vec``)."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = shape.numel()
            out[name] = vec[start : start + n].reshape(shape)
            start += n
        return out

    def load_into(self, module: nn.Module, vec: torch.Tensor) -> None:
        """Copy a flat vector into the module's parameters (used once training is done)."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self.unflatten(vec).items():
                params[name].copy_(value)
