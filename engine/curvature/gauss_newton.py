"""Gauss-Newton curvature: ``(1/n) sum_i J_i^T H_out,i J_i + diag(reg)``, PSD by construction.

``J_i`` is the Jacobian of example i's model outputs w.r.t. the operator's variables and
``H_out,i`` the Hessian of the loss w.r.t. those outputs (``diag(p) - p p^T`` for cross-entropy,
``2 I`` for squared error).  It equals the Hessian minus the terms with the loss's first
derivative times the outputs' second derivatives, so it is the Hessian at a perfect fit and a
positive semi-definite stand-in for it elsewhere: iterative solvers (``cg``, ``ekfac+cg``) on a
model that is not at an exact minimum (SGD-trained weights) then never meet negative curvature.
It is an approximation of the Hessian and results name it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.func import jvp, vjp, vmap

from engine.autodiff import differentiable_attention, is_forward_ad_error
from engine.curvature.operators import Curvature
from engine.task import cross_entropy, squared_error

CURVATURE_TYPES = ("hessian", "gauss_newton")


def output_hessian_product(loss: Callable, outputs: torch.Tensor
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``u -> H_out u`` per example for the built-in losses (``u`` shaped like ``outputs``)."""
    if loss is cross_entropy:
        p = torch.softmax(outputs, dim=1)
        return lambda u: p * u - p * (p * u).sum(1, keepdim=True)
    if loss is squared_error:
        return lambda u: 2.0 * u
    raise ValueError("Gauss-Newton curvature needs the output Hessian of the loss, known for the "
                     "built-in cross_entropy and squared_error; use curvature = 'hessian'")


@dataclasses.dataclass
class GaussNewtonCurvature(Curvature):
    """The Gauss-Newton matrix of the same stage, variables and point as a Hessian operator."""

    def _data_hvp(self, V: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with differentiable_attention():
            return self._gauss_newton_columns(V, xb)

    def _gauss_newton_columns(self, V: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        fn = self.function
        sizes = [p.numel() for p in fn.params]

        def outputs(flat: torch.Tensor) -> torch.Tensor:
            parts = torch.split(flat, sizes)
            return fn.outputs([t.reshape(p.shape) for t, p in zip(parts, fn.params,
                                                                    strict=True)], xb)

        out, pullback = vjp(outputs, self.point)
        h_out = output_hessian_product(fn.loss, out.detach())
        try:
            jv = vmap(lambda v: jvp(outputs, (self.point,), (v,))[1], in_dims=1)(V)
            self.hvp_mode = "gauss-newton (forward Jacobian products)"
        except (NotImplementedError, RuntimeError) as exc:
            if not is_forward_ad_error(exc):
                raise
            # Forward mode not implemented for an operator: J v as the pullback of the (linear)
            # map u -> J^T u, i.e. reverse over reverse.
            _, pull_t = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))
            jv = vmap(lambda v: pull_t(v)[0], in_dims=1)(V)
            self.hvp_mode = "gauss-newton (reverse Jacobian products)"
        return vmap(lambda u: pullback(h_out(u))[0], in_dims=0, out_dims=1)(jv)


def gauss_newton(op: Curvature) -> GaussNewtonCurvature:
    """The Gauss-Newton counterpart of a stage's Hessian operator (needs ``op.function``)."""
    if op.function is None:
        raise ValueError(f"{op.name} carries no stage function; Gauss-Newton needs the outputs")
    output_hessian_product(op.function.loss,    # fail early on other losses
                           torch.zeros(1, 1, device=op.point.device))
    values = {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
    values.update(name=op.name.replace("Hessian", "Gauss-Newton matrix"), eigen=None)
    return GaussNewtonCurvature(**values)
