"""Scores from linear layers' inputs and output gradients: the exact scoring path at the flop floor.

A parameter tensor used only as the weight ``V``-shaped ``(d_out, d_in)`` or the bias of linear
layers (``torch.nn.functional.linear``, which ``nn.Linear`` calls) has, for one example, the
gradient ``sum_s g_s a_s^T`` (summed over the layer's calls and positions ``s``), where ``a`` is
the layer input and ``g`` the gradient of the example's loss w.r.t. the layer output.  Its dot
product with a direction ``V`` is therefore ``sum_s g_s^T V a_s``: computable from ``a`` and
``g`` without ever forming the gradient.  One batched forward pass records every ``a`` and adds
a zero *probe* tensor to every output; one backward pass of the SUM of the per-example losses
w.r.t. the probes gives every example's own ``g`` (examples do not interact, so the gradient of
the sum w.r.t. example i's output is example i's gradient).  Cost: a forward pass, a backward
pass through the activations (no weight gradients), and ``2 B d_in d_out`` flops per direction
for the contraction -- the arithmetic floor of exact per-pair scores.

``rank`` replaces each direction's weight block by a rank-r approximation, cutting the
contraction to ``2 B r (d_in + d_out)`` flops per direction.  That is an APPROXIMATION (like
kronfluence's ``query_gradient_low_rank``, but truncated in the metric of the layer's K-FAC
gradient covariance, see :class:`LinearContraction`); the share it keeps is reported so results
can say so.

The linear uses are found by intercepting ``F.linear`` with a ``TorchFunctionMode`` (no module
hooks, so it works under ``torch.func.functional_call`` on the user's own modules), and the
resulting plan is checked against ``vmap(grad)`` per-example gradients on a few examples before
it is trusted: a model that, say, folds the batch into another dimension fails the check and
falls back to a general method instead of returning wrong scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# losses(params, x, y) -> per-example losses (batch,), params in the order of ``params``.
BatchLosses = Callable[[Sequence[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]

# Elements of one (batch, positions, columns, features) intermediate: bounds the memory of the
# contraction whatever the number of directions (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class _LinearCall:
    """One call of F.linear that involves a tracked tensor."""

    inputs: torch.Tensor            # (batch, ..., d_in), detached
    probe: torch.Tensor | None      # zero tensor added to the output; its gradient is g
    weight: int | None              # index of the weight among the tracked tensors
    bias: int | None


@dataclass
class _Capture(TorchFunctionMode):
    """Record F.linear calls whose weight or bias is tracked, and every other use of one."""

    index: dict[int, int]           # id(tensor) -> position among the tracked tensors
    batch: int
    probe: bool
    calls: list[_LinearCall] = field(default_factory=list)
    other_uses: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.linear:
            inp = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            w_idx = self.index.get(id(weight))
            b_idx = self.index.get(id(bias)) if bias is not None else None
            tracked_input = id(inp) in self.index
            if (w_idx is not None or b_idx is not None) and not tracked_input:
                out = func(*args, **kwargs)
                if inp.dim() < 2 or inp.shape[0] != self.batch or out.shape[0] != self.batch:
                    # Not batch-first: per-example sums cannot be read off dimension 0.
                    self.other_uses.update(i for i in (w_idx, b_idx) if i is not None)
                    return out
                probe = torch.zeros_like(out, requires_grad=True) if self.probe else None
                self.calls.append(_LinearCall(inp.detach(), probe, w_idx, b_idx))
                return out + probe if probe is not None else out
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.index:
                self.other_uses.add(self.index[id(leaf)])
        return func(*args, **kwargs)


def _probe_pass(losses: BatchLosses, params: Sequence[torch.Tensor], index: dict[int, int],
                x: torch.Tensor, y: torch.Tensor) -> list[tuple[_LinearCall, torch.Tensor]]:
    """Forward with probes, backward of the summed losses: (call, output gradient) pairs.

    Examples do not interact, so each example's rows of the output gradient are its own.  Calls
    whose output does not reach the losses are left out.
    """
    capture = _Capture(index, batch=len(x), probe=True)
    with capture:
        out = losses(params, x, y)
    calls = [c for c in capture.calls if c.probe is not None]
    if not calls or not out.requires_grad:
        return []
    grads = torch.autograd.grad(out.sum(), [c.probe for c in calls], allow_unused=True)
    return [(c, g) for c, g in zip(calls, grads, strict=True) if g is not None]


def find_linear_tensors(losses: BatchLosses, params: Sequence[torch.Tensor], x: torch.Tensor,
                        y: torch.Tensor) -> tuple[list[int], list[int]]:
    """Split tracked tensors into (used only by linear layers, used otherwise), by index.

    A tensor the forward pass never touches has a zero gradient and counts as linear-only.
    """
    capture = _Capture({id(p): i for i, p in enumerate(params)}, batch=len(x), probe=False)
    with torch.no_grad(), capture:
        losses(params, x, y)
    roles: dict[int, set[str]] = {}
    for call in capture.calls:
        for idx, role in ((call.weight, "weight"), (call.bias, "bias")):
            if idx is not None:
                roles.setdefault(idx, set()).add(role)
    linear, other = [], []
    for i, p in enumerate(params):
        mixed = len(roles.get(i, ())) > 1
        bad_weight = "weight" in roles.get(i, ()) and p.dim() != 2
        (other if i in capture.other_uses or mixed or bad_weight else linear).append(i)
    return linear, other


@dataclass
class LowRankReport:
    """What a rank-r contraction keeps of the directions.

    ``kept_*`` are fractions of the squared norm of each truncated block measured in the metric
    of the layer's gradient covariance, i.e. estimates of the share of the expected squared
    score that the truncation keeps (per block: worst case, and norm-weighted overall).
    """

    rank: int
    truncated_tensors: int
    kept_min: float
    kept_overall: float
    covariance_examples: int


def layer_covariances(losses: BatchLosses, params: Sequence[torch.Tensor], linear: Sequence[int],
                      x: torch.Tensor, y: torch.Tensor, batch_size: int
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear weight: second moments of its inputs and output gradients, float64.

    ``E[a a^T]`` (d_in, d_in) and ``E[g g^T]`` (d_out, d_out) over the examples, summed over
    the weight's calls and positions: the two Kronecker factors (K-FAC) of the per-example
    gradient covariance of that weight.
    """
    index = {id(params[i]): i for i in linear if params[i].dim() == 2}
    sums: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        for call, g in _probe_pass(losses, params, index, xb, yb):
            if call.weight is None:
                continue
            a = call.inputs.reshape(-1, call.inputs.shape[-1])
            g = g.reshape(-1, g.shape[-1])
            # Per batch in the model's dtype, accumulated across batches in float64.
            moments = ((a.T @ a).double(), (g.T @ g).double())
            if call.weight in sums:
                sums[call.weight][0] += moments[0]
                sums[call.weight][1] += moments[1]
            else:
                sums[call.weight] = list(moments)
    return {i: (sa / len(x), sg / len(x)) for i, (sa, sg) in sums.items()}


def _sqrt_and_inverse_sqrt(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S^{1/2}`` and ``S^{-1/2}`` of a second-moment matrix, with a relative floor of 1e-8.

    The floor keeps the inverse finite in directions no example visits (they get ~no weight
    in the truncation, and a full-rank "truncation" still returns the directions unchanged).
    """
    lam, vec = torch.linalg.eigh(cov)
    lam = lam.clamp_min(1e-8 * max(float(lam.max()), 1e-300))
    return (vec * lam.sqrt()) @ vec.T, (vec * lam.rsqrt()) @ vec.T


def _top_singular(mats: torch.Tensor, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``rank`` singular triplets (U, S, V) of a batch of matrices, deterministically.

    Randomized (``torch.svd_lowrank``, 8 extra columns, 2 power iterations) when that is much
    smaller than the matrices -- ~10x faster than a full SVD and accurate for the leading
    triplets -- under a fixed seed so that scores are reproducible bit for bit.
    """
    q = rank + 8
    if q >= min(mats.shape[1:]) // 2:
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
        return u[:, :, :rank], s[:, :rank], vh[:, :rank, :].transpose(1, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(mats, q=q, niter=2)
    return u[:, :, :rank], s[:, :rank], v[:, :, :rank]


class LinearContraction:
    """Per-example dot products of linear-layer gradients with fixed directions, streamed.

    ``params``: the tracked tensors (shapes as used by the model); ``directions``: one
    ``(numel, C)`` block per tracked tensor; ``linear``: indices of the tensors to handle (from
    :func:`find_linear_tensors`); the other tensors are the caller's business.

    With ``rank``, each direction's weight block ``V`` (d_out x d_in) is replaced by
    ``S_g^{-1/2} [S_g^{1/2} V S_a^{1/2}]_r S_a^{-1/2}``, where ``[.]_r`` is the truncated SVD
    and ``S_a``, ``S_g`` the input and output-gradient second moments over ``covariance_data``:
    the rank-r block that best preserves ``g^T V a`` on average over the data when the gradient
    covariance is Kronecker-factored.  A plain truncated SVD of ``V`` is much worse, because
    ``H^{-1}`` puts most of ``V``'s norm where the data's gradients are small.
    """

    def __init__(self, losses: BatchLosses, params: Sequence[torch.Tensor],
                 directions: Sequence[torch.Tensor], linear: Sequence[int],
                 rank: int | None = None,
                 covariance_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 batch_size: int = 512) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 or None, got {rank}")
        self.losses, self.params, self.linear = losses, list(params), list(linear)
        self.columns, self.dtype = directions[0].shape[1], directions[0].dtype
        self._index = {id(self.params[i]): i for i in self.linear}
        self.rank = rank
        # V arranged for one matmul with the smaller side's partner: (d_in, C * d_out) applied
        # to inputs when d_out <= d_in, else (d_out, C * d_in) applied to output gradients.
        self._weights: dict[int, torch.Tensor] = {}
        # (d_out, C * r) and (d_in, C * r) factors of the truncated blocks
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._biases: dict[int, torch.Tensor] = {}           # (d_out, C)
        truncate = [i for i in self.linear if self.params[i].dim() == 2 and rank is not None
                    and rank * sum(self.params[i].shape) < self.params[i].numel()]
        covariances: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if truncate:
            if covariance_data is None:
                raise ValueError("a rank-r contraction needs covariance_data (inputs, targets)")
            covariances = layer_covariances(losses, params, truncate, *covariance_data,
                                            batch_size)
        kept: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        for i in self.linear:
            p, d = self.params[i], directions[i]
            if p.dim() != 2:
                self._biases[i] = d.reshape(*p.shape, self.columns).reshape(-1, self.columns)
                continue
            blocks = d.T.reshape(self.columns, *p.shape)
            d_out, d_in = p.shape
            if i in covariances:
                left, right, frac, energy = self._truncate(blocks, *covariances[i])
                self._factors[i] = (left.to(p.dtype), right.to(p.dtype))
                kept.append(frac)
                norms.append(energy)
            elif i in truncate:
                # Never reached by the data's gradients (no covariance): contributes nothing.
                self._factors[i] = (torch.zeros(d_out, self.columns * rank, dtype=p.dtype),
                                    torch.zeros(d_in, self.columns * rank, dtype=p.dtype))
            elif d_out <= d_in:
                self._weights[i] = blocks.permute(2, 0, 1).reshape(d_in, -1).contiguous()
            else:
                self._weights[i] = blocks.permute(1, 0, 2).reshape(d_out, -1).contiguous()
        self.low_rank: LowRankReport | None = None
        if rank is not None:
            n_cov = len(covariance_data[0]) if covariance_data is not None and truncate else 0
            if kept:
                k_all, n_all = torch.cat(kept), torch.cat(norms)
                overall = float((k_all * n_all).sum() / n_all.sum().clamp_min(1e-300))
                self.low_rank = LowRankReport(rank, len(truncate), float(k_all.min()), overall,
                                              n_cov)
            else:
                self.low_rank = LowRankReport(rank, len(truncate), 1.0, 1.0, n_cov)

    def _truncate(self, blocks: torch.Tensor, s_a: torch.Tensor, s_g: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Factors (d_out, C r), (d_in, C r) of the weighted truncation, kept fraction, norm."""
        r = self.rank
        d_out, d_in = blocks.shape[1:]
        sq_a, isq_a = _sqrt_and_inverse_sqrt(s_a)
        sq_g, isq_g = _sqrt_and_inverse_sqrt(s_g)
        weighted = sq_g @ blocks.double() @ sq_a
        u, sv, v = _top_singular(weighted, r)
        left = isq_g @ (u * sv[:, None, :])                         # (C, d_out, r)
        right = isq_a @ v                                          # (C, d_in, r)
        energy = weighted.square().sum((1, 2))
        frac = (sv * sv).sum(1) / energy.clamp_min(1e-300)
        return (left.permute(1, 0, 2).reshape(d_out, -1).contiguous(),
                right.permute(1, 0, 2).reshape(d_in, -1).contiguous(), frac, energy)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(batch, C)``: sum over the handled tensors of grad_p l(z_j) . direction_p."""
        b = len(x)
        out = torch.zeros(b, self.columns, dtype=self.dtype)
        for call, g in _probe_pass(self.losses, self.params, self._index, x, y):
            a = call.inputs.reshape(b, -1, call.inputs.shape[-1])
            g = g.reshape(b, -1, g.shape[-1])
            if call.weight is not None:
                self._add_weight(out, call.weight, a, g)
            if call.bias is not None and call.bias in self._biases:
                out.add_(g.sum(1) @ self._biases[call.bias])
        return out

    def _add_weight(self, out: torch.Tensor, idx: int, a: torch.Tensor, g: torch.Tensor) -> None:
        b, s = a.shape[:2]
        if idx in self._factors:
            left, right = self._factors[idx]
            r = self.rank
            za = (a @ right).view(b, s, self.columns, r)
            zg = (g @ left).view(b, s, self.columns, r)
            if s == 1:   # small (batch, C, r) blocks: a fused multiply-sum beats bmm
                out.add_((za * zg).sum((1, 3)))
            else:
                out.add_(torch.einsum("bscr,bscr->bc", za, zg))
            return
        v = self._weights[idx]
        d_out, d_in = self.params[idx].shape
        # Apply V on the side whose result is smaller; chunk the columns to bound memory.
        src, other, d = (a, g, d_out) if d_out <= d_in else (g, a, d_in)
        step = max(1, min(self.columns, _CHUNK_ELEMENTS // max(1, b * s * d)))
        for c0 in range(0, self.columns, step):
            n = min(step, self.columns - c0)
            z = src @ (v if n == self.columns else v[:, c0 * d : (c0 + n) * d])
            out[:, c0 : c0 + n] += torch.einsum("bscd,bsd->bc", z.view(b, s, n, d), other)


def matches_reference(contraction: LinearContraction, reference: torch.Tensor,
                      x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the contraction reproduces ``reference`` (per-example gradients . directions).

    The two differ only by summation order, so the tolerance is 4 sqrt(eps) of the dtype relative
    to the largest value (3e-4 in float32, 6e-8 in float64); a wrong plan is off by O(1).
    """
    got = contraction(x, y)
    scale = float(reference.abs().max())
    if not math.isfinite(scale):
        return False
    finfo = torch.finfo(reference.dtype)
    tol = 4 * math.sqrt(finfo.eps) * max(scale, finfo.tiny)
    return bool((got - reference).abs().max() <= tol)
