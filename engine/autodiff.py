"""Second-order automatic differentiation that works on every model.

Shared by training (:mod:`engine.trust_region`) and influence (:mod:`engine.curvature`):

* :func:`differentiable_attention` — a context in which attention runs on kernels that have
  derivatives of every order.  PyTorch's fused paths have none beyond the first:
  ``nn.TransformerEncoderLayer``'s fast path (``aten::_transformer_encoder_layer_fwd``, taken in
  eval mode or without grad) has no forward-mode rule, and the CPU flash attention kernel
  (``_scaled_dot_product_flash_attention_for_cpu``) has neither a forward-mode rule nor a double
  backward, and no ``vmap`` batching rule.  Inside the context the fast path is off and
  ``scaled_dot_product_attention`` uses the math kernel (plain matmuls and a softmax), which
  gives the same values up to round-off.  Models without attention are unaffected.
* Hessian-vector products in two modes: **forward-over-reverse** (``jvp`` of ``grad``, the
  default) and **reverse-over-reverse** (``vjp`` of ``grad``), chosen by :func:`select_hvp_mode`:
  forward mode first, reverse mode when forward mode raises because an operator of the model
  has no forward-mode rule (a custom ``autograd.Function`` without ``jvp``, some fused kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

FORWARD = "forward-over-reverse"   # jvp of grad
REVERSE = "reverse-over-reverse"   # vjp of grad
HVP_MODES = (FORWARD, REVERSE)

GradFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention on kernels with derivatives of every order (see the module docstring)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


_FORWARD_AD_WORDS = ("forward ad", "forward-mode", "forward mode", "jvp", "dual tensor")


def is_forward_ad_error(exc: BaseException) -> bool:
    """Whether ``exc`` says that forward-mode AD is not implemented for an operator."""
    if isinstance(exc, NotImplementedError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in _FORWARD_AD_WORDS)


def hvp_product(grad_fn: GradFn, x: torch.Tensor, mode: str) -> Callable[[torch.Tensor],
                                                                          torch.Tensor]:
    """``v -> Hess(x) v`` where ``grad_fn`` is the gradient of the objective.

    Works on one vector, or on columns under ``vmap``.  The reverse mode runs the forward and
    backward pass once (here) and keeps it; each product is then one more backward pass.
    """
    if mode == FORWARD:
        def forward(v: torch.Tensor) -> torch.Tensor:
            with differentiable_attention():
                return jvp(grad_fn, (x,), (v,))[1]

        return forward
    if mode != REVERSE:
        raise ValueError(f"unknown HVP mode {mode!r}; use one of {HVP_MODES}")
    with differentiable_attention():
        _, pullback = vjp(grad_fn, x)

    def reverse(v: torch.Tensor) -> torch.Tensor:
        with differentiable_attention():
            return pullback(v)[0]

    return reverse


def select_hvp_mode(grad_fn: GradFn, x: torch.Tensor) -> str:
    """:data:`FORWARD` if forward mode works through ``grad_fn`` at ``x``, else :data:`REVERSE`.

    Costs one product (call it on a small batch of the data).  Errors other than a missing
    forward-mode rule propagate.
    """
    try:
        hvp_product(grad_fn, x, FORWARD)(torch.zeros_like(x))
    except (NotImplementedError, RuntimeError) as exc:
        if not is_forward_ad_error(exc):
            raise
        return REVERSE
    return FORWARD


def hvp_columns(grad_fn: GradFn, x: torch.Tensor, V: torch.Tensor, mode: str) -> torch.Tensor:
    """``Hess(x) V`` for the columns of ``V`` (shape ``(dim, k)``), batched with ``vmap``."""
    return vmap(hvp_product(grad_fn, x, mode), in_dims=1, out_dims=1)(V)
