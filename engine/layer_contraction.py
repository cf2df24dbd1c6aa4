"""Scores from layers' inputs and output gradients: the exact scoring path at the flop floor.

A parameter tensor used only as the weight or the bias of linear, conv2d or embedding layers
(see :mod:`engine.layer_capture`) has, for one example, the gradient ``sum_s g_s a_s^T`` (2-D
view of the weight, summed over the layer's calls and positions ``s``: linear positions,
conv output positions with ``a_s`` the unfolded input patch), where ``g`` is the gradient of the
example's loss w.r.t. the layer output; an embedding weight gets ``g_s`` in row ``idx_s``.  Its
dot product with a direction ``V`` is therefore ``sum_s g_s^T V a_s`` (embedding:
``sum_s V[idx_s, :] . g_s``, a gather): computable from ``a`` (or the ids) and ``g`` without the
per-example gradient.  One batched forward pass records every input and adds a zero *probe* to
every output; one backward pass of the SUM of the per-example losses w.r.t. the probes gives
every example's own ``g``.

Per weight, the cheaper association is used: ``g_s^T (V a_s)`` for each position and direction
(``2 S C d_in d_out`` flops for S positions and C directions; one large matmul when S = 1, the
arithmetic floor of exact scores), or, when ``S C > S + C`` (conv layers, sequences), each
example's gradient ``G = sum_s g_s a_s^T`` first (``2 S d_in d_out``, one batched matmul over
the calls of the weight) and then ``G . V`` (``2 C d_in d_out``).  Every batched intermediate
(input patches, ``V a``, ``G``, gathered rows) is built in chunks of examples, positions,
output rows and directions so that it stays under ``memory_budget`` bytes.

``rank`` (linear weights only) replaces each direction's weight block by a rank-r approximation,
cutting the contraction to ``2 B r (d_in + d_out)`` flops per direction.  That is an
APPROXIMATION (like kronfluence's ``query_gradient_low_rank``, but truncated in the metric of
the layer's K-FAC gradient covariance, see :class:`LayerContraction`); the share it keeps is
reported so results can say so.  Conv and embedding weights are always exact: with many
positions the exact per-example-gradient association is already cheaper than rank-r factors
(``2 S C r (d_in + d_out)`` flops), and an embedding's gather costs ``dim`` per direction.

The plan is checked against ``vmap(grad)`` per-example gradients on a few examples before it is
trusted (``engine.scores``): a model that, say, folds the batch into another dimension fails
the check and falls back to a general method instead of returning wrong scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

from engine.layer_capture import (
    BatchLosses,
    LayerCall,
    probe_pass,
    weight_matrix_shape,
)

# Default bound on the contraction's batched intermediates, in bytes.
DEFAULT_MEMORY_BUDGET = 4 << 30
# At most this many intermediates of the budget's chunk size are alive at once.
_LIVE = 4
# Elements of one intermediate on the CPU whatever the budget: larger chunks are no faster there
# (benchmarks/engine_bench.py) and stay out of the cache (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


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
        for call, g in probe_pass(losses, params, index, xb, yb):
            if call.weight is None or call.weight not in index.values() or call.kind != "linear":
                continue
            a = call.input_patches().reshape(-1, call.d_in)
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


def _split(examples: int, positions: int, per_position: int, cap: int) -> tuple[int, int]:
    """(examples, positions) per chunk so that their product times ``per_position`` <= ``cap``
    (whole examples when one fits, else part of one; at least one position)."""
    per_example = positions * max(1, per_position)
    if per_example <= cap:
        return max(1, min(examples, cap // per_example)), positions
    return 1, max(1, min(positions, cap // max(1, per_position)))


def _padded_numel(call: LayerCall) -> int:
    """Elements of one example's input, padded as the layer pads it (conv2d)."""
    if call.kind != "conv2d":
        return 0
    left, right, top, bottom = call.pads
    c, h, w = call.inputs.shape[1:]
    return c * (h + top + bottom) * (w + left + right)


def _chunks(n: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class LayerContraction:
    """Per-example dot products of layer gradients with fixed directions, streamed.

    ``params``: the tracked tensors (shapes as used by the model); ``directions``: one
    ``(numel, C)`` block per tracked tensor; ``layers``: ``{index: kind}`` of the tensors to
    handle (from :func:`engine.layer_capture.find_layer_tensors`); the other tensors are the
    caller's business.  ``memory_budget`` (bytes) bounds the batched intermediates.

    With ``rank``, each direction's LINEAR weight block ``V`` (d_out x d_in) is replaced by
    ``S_g^{-1/2} [S_g^{1/2} V S_a^{1/2}]_r S_a^{-1/2}``, where ``[.]_r`` is the truncated SVD
    and ``S_a``, ``S_g`` the input and output-gradient second moments over ``covariance_data``:
    the rank-r block that best preserves ``g^T V a`` on average over the data when the gradient
    covariance is Kronecker-factored.  A plain truncated SVD of ``V`` is much worse, because
    ``H^{-1}`` puts most of ``V``'s norm where the data's gradients are small.  Conv2d and
    embedding weights stay exact (see the module docstring).
    """

    def __init__(self, losses: BatchLosses, params: Sequence[torch.Tensor],
                 directions: Sequence[torch.Tensor], layers: dict[int, str],
                 rank: int | None = None,
                 covariance_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 batch_size: int = 512, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 or None, got {rank}")
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got "
                             f"{memory_budget}")
        self.losses, self.params, self.kinds = losses, list(params), dict(layers)
        self.columns, self.dtype = directions[0].shape[1], directions[0].dtype
        self.device = directions[0].device
        self._index = {id(self.params[i]): i for i in self.kinds}
        self.rank = rank
        self.memory_budget = memory_budget
        itemsize = self.dtype.itemsize
        self._cap = max(1, memory_budget // (_LIVE * itemsize))
        if self.device.type == "cpu":
            self._cap = min(self._cap, _CHUNK_ELEMENTS)
        self._dirs: dict[int, torch.Tensor] = {}      # weights: (numel, C) as given
        self._direct: dict[int, torch.Tensor] = {}    # lazily: V laid out for "V a" / "V^T g"
        # (d_out, C * r) and (d_in, C * r) factors of the truncated blocks
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._biases: dict[int, torch.Tensor] = {}           # (d_out, C)
        truncate = [i for i, kind in self.kinds.items() if kind == "linear"
                    and self.params[i].dim() == 2 and rank is not None
                    and rank * sum(self.params[i].shape) < self.params[i].numel()]
        covariances: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if truncate:
            if covariance_data is None:
                raise ValueError("a rank-r contraction needs covariance_data (inputs, targets)")
            covariances = layer_covariances(losses, params, truncate, *covariance_data,
                                            batch_size)
        kept: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        for i in self.kinds:
            p, d = self.params[i], directions[i]
            if p.dim() == 1:   # a bias
                self._biases[i] = d.reshape(-1, self.columns)
                continue
            d_out, d_in = weight_matrix_shape(self.kinds[i], p)
            if i in covariances:
                blocks = d.T.reshape(self.columns, d_out, d_in)
                left, right, frac, energy = self._truncate(blocks, *covariances[i])
                self._factors[i] = (left.to(p.dtype), right.to(p.dtype))
                kept.append(frac)
                norms.append(energy)
            elif i in truncate:
                # Never reached by the data's gradients (no covariance): contributes nothing.
                self._factors[i] = (
                    torch.zeros(d_out, self.columns * rank, dtype=p.dtype, device=self.device),
                    torch.zeros(d_in, self.columns * rank, dtype=p.dtype, device=self.device))
            else:
                self._dirs[i] = d.reshape(-1, self.columns).contiguous()
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

    # ----- the pass ---------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(batch, C)``: sum over the handled tensors of grad_p l(z_j) . direction_p."""
        b = len(x)
        out = torch.zeros(b, self.columns, dtype=self.dtype, device=self.device)
        by_weight: dict[int, list[tuple[LayerCall, torch.Tensor]]] = {}
        for call, g in probe_pass(self.losses, self.params, self._index, x, y):
            if call.bias is not None and call.bias in self._biases:
                out.add_(g.sum(1) @ self._biases[call.bias])
            w = call.weight
            if w is None or w not in self.kinds:
                continue
            if call.kind == "embedding":
                self._add_embedding(out, w, call, g)
            elif w in self._factors:
                self._add_factors(out, w, call, g)
            else:
                by_weight.setdefault(w, []).append((call, g))
        for w, items in by_weight.items():
            d_out, d_in = weight_matrix_shape(self.kinds[w], self.params[w])
            positions = sum(call.positions for call, _ in items)
            # flops / (2 B d_in d_out) of the two associations
            if positions * self.columns <= positions + self.columns:
                for call, g in items:
                    self._add_direct(out, w, call, g, d_out, d_in)
            else:
                self._add_per_example(out, w, items, d_out, d_in)
        return out

    def _direct_layout(self, idx: int, d_out: int, d_in: int) -> torch.Tensor:
        """V as (d_in, C * d_out) when d_out <= d_in (applied to inputs), else (d_out, C * d_in)
        (applied to output gradients): the side whose product is smaller."""
        if idx not in self._direct:
            blocks = self._dirs[idx].T.reshape(self.columns, d_out, d_in)
            if d_out <= d_in:
                layout = blocks.permute(2, 0, 1).reshape(d_in, -1)
            else:
                layout = blocks.permute(1, 0, 2).reshape(d_out, -1)
            self._direct[idx] = layout.contiguous()
        return self._direct[idx]

    def _add_direct(self, out: torch.Tensor, idx: int, call: LayerCall, g: torch.Tensor,
                    d_out: int, d_in: int) -> None:
        """``sum_s g_s^T V a_s``: V applied per position, chunked over rows and columns."""
        v = self._direct_layout(idx, d_out, d_in)
        b, s, cols = call.batch, call.positions, self.columns
        apply_to_inputs = d_out <= d_in
        d = d_out if apply_to_inputs else d_in
        n = min(cols, max(1, self._cap // max(1, b * s * d)))
        eb, sb = _split(b, s, max(n * d, d_in), self._cap)
        for ex in _chunks(b, eb):
            for pos in _chunks(s, sb):
                a = call.input_patches(ex, pos)
                gg = g[ex, pos]
                src, other = (a, gg) if apply_to_inputs else (gg, a)
                for c in _chunks(cols, n):
                    z = src @ (v if c.stop - c.start == cols else v[:, c.start * d : c.stop * d])
                    out[ex, c] += torch.einsum(
                        "bscd,bsd->bc", z.view(*z.shape[:2], c.stop - c.start, d), other)

    def _add_per_example(self, out: torch.Tensor, idx: int,
                         items: Sequence[tuple[LayerCall, torch.Tensor]], d_out: int,
                         d_in: int) -> None:
        """Each example's gradient ``G = sum_s g_s a_s^T`` (all calls of the weight), then
        ``G . V``; chunked over examples and output rows of ``G``.  No patches are formed:
        linear inputs are read in place, conv2d gradients come from a convolution backward with
        one group per example (torch's own kernel, 2-3x faster than unfold + bmm on CPU)."""
        b = items[0][0].batch
        v = self._dirs[idx].view(d_out, d_in, self.columns)
        rows = max(1, min(d_out, self._cap // max(1, d_in)))
        # Per example: G's rows, and for conv2d the regrouped output gradient and the padded
        # input (copies only when needed).
        per_example = max(max(rows * d_in, rows * call.positions, _padded_numel(call))
                          for call, _ in items)
        eb = max(1, min(b, self._cap // per_example))
        for ex in _chunks(b, eb):
            ne = ex.stop - ex.start
            for r in _chunks(d_out, rows):
                grad = torch.zeros(ne, r.stop - r.start, d_in, dtype=self.dtype,
                                   device=self.device)
                for call, g in items:
                    grad += self._example_gradients(call, g, ex, r)
                out[ex] += grad.view(ne, -1) @ v[r].reshape(-1, self.columns)

    @staticmethod
    def _example_gradients(call: LayerCall, g: torch.Tensor, ex: slice, r: slice
                           ) -> torch.Tensor:
        """``(examples, rows, d_in)``: rows ``r`` of each example's weight gradient (2-D view)
        from one call."""
        if call.kind == "linear":
            return g[ex, :, r].transpose(1, 2) @ call.input_patches(ex)
        ne, nr = ex.stop - ex.start, r.stop - r.start
        h_out, w_out = call.out_hw
        # g is (batch, positions, C_out), a transposed view of the (batch, C_out, H, W) probe
        # gradient: back to that layout, one group of output channels per example.
        gg = g[ex].transpose(1, 2)[:, r].reshape(1, ne * nr, h_out, w_out)
        x = call.inputs[ex]
        left, right, top, bottom = call.pads
        padding = [top, left]
        if left != right or top != bottom:
            x, padding = F.pad(x, call.pads), [0, 0]
        c_in, kh, kw = x.shape[1], *call.kernel_size
        # Only the weight's shape matters for its gradient: a stride-0 placeholder.
        weight = x.new_empty(1, 1, 1, 1).expand(ne * nr, c_in, kh, kw)
        grad = torch.ops.aten.convolution_backward(
            gg, x.reshape(1, ne * c_in, *x.shape[2:]), weight, None, list(call.stride), padding,
            list(call.dilation), False, [0, 0], ne, [False, True, False])[1]
        return grad.view(ne, nr, call.d_in)

    def _add_factors(self, out: torch.Tensor, idx: int, call: LayerCall,
                     g: torch.Tensor) -> None:
        left, right = self._factors[idx]
        r, cols = self.rank, self.columns
        b, s = call.batch, call.positions
        eb, sb = _split(b, s, 2 * cols * r + call.d_in, self._cap)
        for ex in _chunks(b, eb):
            for pos in _chunks(s, sb):
                a, gg = call.input_patches(ex, pos), g[ex, pos]
                za = (a @ right).view(*a.shape[:2], cols, r)
                zg = (gg @ left).view(*a.shape[:2], cols, r)
                if za.shape[1] == 1:   # small (batch, C, r) blocks: a fused multiply-sum wins
                    out[ex] += (za * zg).sum((1, 3))
                else:
                    out[ex] += torch.einsum("bscr,bscr->bc", za, zg)

    def _add_embedding(self, out: torch.Tensor, idx: int, call: LayerCall,
                       g: torch.Tensor) -> None:
        """``sum_s V[idx_s, :] . g_s``: gathered rows of the directions, chunked."""
        num, dim = weight_matrix_shape("embedding", self.params[idx])
        v = self._dirs[idx].view(num, dim, self.columns)
        ids = call.indices()
        b, s, cols = ids.shape[0], ids.shape[1], self.columns
        n = min(cols, max(1, self._cap // max(1, dim)))
        eb, sb = _split(b, s, dim * n, self._cap)
        for c in _chunks(cols, n):
            vc = v if c.stop - c.start == cols else v[:, :, c]
            for ex in _chunks(b, eb):
                for pos in _chunks(s, sb):
                    rows = ids[ex, pos]
                    ne, ns = rows.shape
                    gathered = vc.index_select(0, rows.reshape(-1)).view(ne, ns * dim, -1)
                    gg = g[ex, pos].reshape(ne, 1, ns * dim)
                    out[ex, c] += torch.bmm(gg, gathered).squeeze(1)


def matches_reference(contraction: LayerContraction, reference: torch.Tensor,
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
