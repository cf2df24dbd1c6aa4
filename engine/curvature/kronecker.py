"""Eigenvalue-corrected Kronecker-factored Fisher (EK-FAC) of one stage, fitted from the data.

For a layer whose per-example weight gradient is ``G_j = sum_s g_s a_s^T`` (linear, conv2d on
unfolded patches; the bias is one more input column of ones), K-FAC approximates the Fisher block
by ``S (x) A`` with ``A = E[a a^T]`` (inputs) and ``S = E[g g^T]`` (output gradients); EK-FAC
(George et al. 2018) keeps the eigenbases ``Q_S (x) Q_A`` of that product and replaces its
eigenvalues by the least-squares optimum in that basis, the second moments of the per-example
gradients projected on it: ``Lambda_ab = (1/M) sum_j ((Q_S^T G_j Q_A)_ab)^2``.  An embedding
(a gather) has a diagonal ``A`` (token counts), so its basis is the identity on the token side.

Output gradients come from labels sampled from the model (``fisher="true"``, the default, one
sample per example), from the data's labels (``"empirical"``), or from the exact expectation over
the model's distribution (``"expected"``: the Gauss-Newton matrix for cross-entropy and squared
error; one backward pass per output class).  Tensors outside supported layers get an exact dense
Fisher block (up to ``other_dense_limit`` parameters) or its diagonal, and are listed.  Every sum
is accumulated in float64 and the eigendecompositions are float64.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.curvature.fisher_targets import FISHER_TYPES, RowDraws, probe_passes
from engine.curvature.stage_functions import StageFunction
from engine.distributed import DistContext, Shard, all_reduce_sum, broadcast_object
from engine.layer_capture import find_layer_tensors, probe_pass, weight_matrix_shape


class KroneckerError(ValueError):
    """The Kronecker-factored curvature cannot be fitted to this model or loss."""


@dataclass(frozen=True)
class KroneckerSettings:
    """How the factors are fitted (recorded with every result)."""

    fisher: str = "true"
    batch_size: int = 128
    max_examples: int | None = None      # None: all examples; else evenly spaced rows
    seed: int = 0
    other_dense_limit: int = 4096
    memory_budget: int = 4 << 30         # bytes for one batched intermediate

    def __post_init__(self) -> None:
        if self.fisher not in FISHER_TYPES:
            raise KroneckerError(f"fisher must be one of {FISHER_TYPES}, got {self.fisher!r}")
        if self.batch_size < 1:
            raise KroneckerError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class LayerBlock:
    """One Kronecker block: a weight (and its bias) of a supported layer."""

    kind: str
    weight: int
    bias: int | None
    shape: tuple[int, int]          # 2-D view of the weight: (d_out, d_in), embedding (V, D)
    reg: float
    a_sum: torch.Tensor | None = None   # (d_in', d_in') float64; embedding: counts (V,)
    s_sum: torch.Tensor | None = None   # (d_out, d_out); embedding (D, D)
    rows: int = 0                        # example-positions in a_sum
    q_a: torch.Tensor | None = None      # None for embedding (identity)
    q_s: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None   # corrected, (d_out, d_in') / (V, D)

    @property
    def width(self) -> int:
        """Columns of the block: inputs, plus one for the bias."""
        return self.shape[1] + (1 if self.bias is not None else 0)


@dataclass
class KroneckerFactors:
    """The fitted EK-FAC of one stage: layer blocks plus the block of the other tensors."""

    function: StageFunction
    settings: KroneckerSettings
    blocks: list[LayerBlock]
    other: list[int]
    other_mode: str | None                    # "dense", "diagonal" or None
    other_eigen: tuple[torch.Tensor, torch.Tensor] | None = None   # dense: (evals, evecs)
    other_diag: torch.Tensor | None = None
    examples: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def offsets(self) -> list[int]:
        sizes = [p.numel() for p in self.function.params]
        return [0, *itertools.accumulate(sizes)]

    def mean_eigenvalue(self) -> float:
        """Mean over every eigenvalue of the approximation (without the regularizer)."""
        total, count = 0.0, 0
        for b in self.blocks:
            total += float(b.eigenvalues.sum())
            count += b.eigenvalues.numel()
        extra = self.other_eigen[0] if self.other_eigen is not None else self.other_diag
        if extra is not None:
            total += float(extra.sum())
            count += extra.numel()
        return total / max(count, 1)

    def solve(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """``(F_ekfac + diag(reg) + damping I)^{-1} rhs`` for ``rhs`` of shape (dim, k)."""
        off = self.offsets
        out = torch.empty_like(rhs)
        k, dt = rhs.shape[1], rhs.dtype
        for b in self.blocks:
            sl = slice(off[b.weight], off[b.weight + 1])
            x = rhs[sl].T.reshape(k, *b.shape)
            denom = (b.eigenvalues + b.reg + damping).to(dt)
            if b.kind == "embedding":
                q_s = b.q_s.to(dt)
                out[sl] = ((x @ q_s) / denom @ q_s.T).reshape(k, -1).T
                continue
            if b.bias is not None:
                bs = slice(off[b.bias], off[b.bias + 1])
                x = torch.cat([x, rhs[bs].T[:, :, None]], 2)
            q_a, q_s = b.q_a.to(dt), b.q_s.to(dt)
            y = q_s @ ((q_s.T @ x @ q_a) / denom) @ q_a.T
            out[sl] = y[:, :, : b.shape[1]].reshape(k, -1).T
            if b.bias is not None:
                out[bs] = y[:, :, -1].T
        if self.other:
            rows = torch.cat([torch.arange(off[i], off[i + 1], device=rhs.device)
                              for i in self.other])
            v = rhs[rows]
            reg = torch.cat([torch.full((off[i + 1] - off[i],), self.function.reg[i], dtype=dt,
                                        device=rhs.device)
                             for i in self.other])
            if self.other_eigen is not None:
                evals, evecs = (t.to(dt) for t in self.other_eigen)
                shift = reg[0]   # one coefficient for the whole block (checked when fitted)
                out[rows] = evecs @ ((evecs.T @ v) / (evals + shift + damping)[:, None])
            else:
                out[rows] = v / (self.other_diag.to(dt) + reg + damping)[:, None]
        return out

    def describe(self) -> dict[str, Any]:
        names = self.function.names
        return {
            "fisher": self.settings.fisher,
            "factor_examples": self.examples,
            "layers": [{"kind": b.kind, "weight": names[b.weight],
                        "bias": names[b.bias] if b.bias is not None else None,
                        "shape": list(b.shape)} for b in self.blocks],
            "other_tensors": [names[i] for i in self.other],
            "other_block": self.other_mode,
            "mean_eigenvalue": self.mean_eigenvalue(),
            "fit_seconds": dict(self.timings),
        }


# ----- fitting ------------------------------------------------------------------------------

def _plan(fn: StageFunction, x: torch.Tensor, y: torch.Tensor
          ) -> tuple[list[LayerBlock], list[int]]:
    """Kronecker blocks for tensors only supported layers use, checked against per-example
    gradients on 4 examples; everything else goes to the 'other' block."""
    params = list(fn.params)
    kinds, other = find_layer_tensors(fn, params, x, y)
    index = {id(params[i]): i for i in kinds}
    pairs: dict[int, set[int | None]] = {}
    bias_of: dict[int, set[int | None]] = {}
    for call, _ in probe_pass(fn, params, index, x, y):
        if call.weight is not None:
            pairs.setdefault(call.weight, set()).add(call.bias)
        if call.bias is not None:
            bias_of.setdefault(call.bias, set()).add(call.weight)
    blocks, handled = [], set()
    for w, biases in sorted(pairs.items()):
        kind = kinds.get(w)
        if kind is None:
            continue
        bias = next(iter(biases)) if len(biases) == 1 else None
        if bias is not None and (bias_of.get(bias) != {w} or fn.reg[bias] != fn.reg[w]
                                 or kind == "embedding"):
            bias = None
        blocks.append(LayerBlock(kind, w, bias, weight_matrix_shape(kind, params[w]),
                                 fn.reg[w]))
        handled.update(i for i in (w, bias) if i is not None)
    other = sorted(set(range(len(params))) - handled)
    # Trust the plan only if the captured inputs and output gradients rebuild each example's
    # gradient (a model that mixes examples, or a missed use of a tensor, fails here).
    good = []
    tensors = [i for b in blocks for i in (b.weight, b.bias) if i is not None]
    reference = dict(zip(tensors, fn.gradient_blocks(x, y, tensors), strict=True)) \
        if blocks else {}
    rebuilt = _per_example_gradients(fn, blocks, x, y)
    for b, got in zip(blocks, rebuilt, strict=True):
        ref = reference[b.weight]
        if b.bias is not None:
            ref = torch.cat([ref.reshape(len(x), *b.shape), reference[b.bias][:, :, None]], 2)
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        tol = 4 * math.sqrt(torch.finfo(ref.dtype).eps) * max(scale, 1e-30)
        if got is not None and (got.reshape(ref.shape) - ref).abs().max() <= tol:
            good.append(b)
        else:
            other += [i for i in (b.weight, b.bias) if i is not None]
    return good, sorted(other)


def _per_example_gradients(fn: StageFunction, blocks: Sequence[LayerBlock], x: torch.Tensor,
                           y: torch.Tensor) -> list[torch.Tensor | None]:
    """Weight gradients per example rebuilt from captured (a, g): (batch, d_out, d_in)."""
    params = list(fn.params)
    index = {id(params[b.weight]): b.weight for b in blocks}
    out: dict[int, torch.Tensor] = {}
    for call, g in probe_pass(fn, params, index, x, y):
        blk = next((b for b in blocks if b.weight == call.weight), None)
        if blk is None:
            continue
        if blk.kind == "embedding":
            grad = torch.zeros(len(x), *blk.shape, dtype=g.dtype, device=g.device)
            grad.scatter_add_(1, call.indices()[:, :, None].expand(-1, -1, blk.shape[1]), g)
        else:
            a = call.input_patches()
            grad = torch.einsum("bso,bsi->boi", g, _with_ones(a) if blk.bias is not None
                                else a)
        out[blk.weight] = out[blk.weight] + grad if blk.weight in out else grad
    return [out.get(b.weight) for b in blocks]


def _fitted_rows(total: int, max_examples: int | None, device: torch.device) -> torch.Tensor:
    """Global rows the factors are fitted on: all, or ``max_examples`` evenly spaced."""
    if max_examples is None or max_examples >= total:
        return torch.arange(total, device=device)
    return torch.linspace(0, total - 1, max_examples, device=device).round().long()


def _batches(x: torch.Tensor, y: torch.Tensor, settings: KroneckerSettings, lo: int,
             total: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, y, global rows) of the fitted rows this process holds (rows ``[lo, lo + len(x))``
    of ``total``), ``batch_size`` at a time."""
    rows = _fitted_rows(total, settings.max_examples, x.device)
    rows = rows[(rows >= lo) & (rows < lo + len(x))]
    for start in range(0, len(rows), settings.batch_size):
        r = rows[start : start + settings.batch_size]
        yield x[r - lo], y[r - lo], r


def _all_reduced(tensors: list[torch.Tensor], world: DistContext | None) -> list[torch.Tensor]:
    """Every tensor summed over the ranks, in ONE collective (float64), same shapes."""
    if world is None or not world.distributed or not tensors:
        return tensors
    flat = all_reduce_sum(torch.cat([t.reshape(-1).double() for t in tensors]), world)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.numel()].reshape(t.shape))
        at += t.numel()
    return out


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)], -1)


def _accumulate_factors(blocks: Sequence[LayerBlock], calls: list, first_target: bool) -> None:
    by_weight = {b.weight: b for b in blocks}
    for call, g in calls:
        b = by_weight.get(call.weight)
        if b is None:
            continue
        g2 = g.reshape(-1, g.shape[-1])
        s = (g2.T @ g2).double()
        b.s_sum = s if b.s_sum is None else b.s_sum + s
        if not first_target:
            continue   # inputs do not depend on the targets: count them once
        if b.kind == "embedding":
            idx = call.indices().reshape(-1)
            counts = torch.bincount(idx, minlength=b.shape[0]).double()
            b.a_sum = counts if b.a_sum is None else b.a_sum + counts
            b.rows += idx.numel()
            continue
        a = call.input_patches()
        if b.bias is not None:
            a = _with_ones(a)
        a2 = a.reshape(-1, a.shape[-1])
        cov = (a2.T @ a2).double()
        b.a_sum = cov if b.a_sum is None else b.a_sum + cov
        b.rows += a2.shape[0]


def _accumulate_corrections(blocks: Sequence[LayerBlock], calls: list, sums: dict[int, Any],
                            budget: int) -> None:
    """Add ``sum_j (Q_S^T G_j Q_A)^2`` of this batch to ``sums`` (per block, float64)."""
    by_weight = {b.weight: b for b in blocks}
    grouped: dict[int, list] = {}
    for call, g in calls:
        if call.weight in by_weight:
            grouped.setdefault(call.weight, []).append((call, g))
    for w, items in grouped.items():
        b = by_weight[w]
        dt, dev = items[0][1].dtype, items[0][1].device
        q_s = b.q_s.to(dt)
        if b.kind == "embedding":
            # Sum each example's rotated output gradients per token (over positions and calls)
            # before squaring: the example's gradient row of that token, in the basis Q_S.
            keys = torch.cat([(torch.arange(c.indices().shape[0], device=dev)[:, None]
                               * b.shape[0]
                               + c.indices()).reshape(-1) for c, _ in items])
            rot = torch.cat([(g @ q_s).reshape(-1, b.shape[1]) for _, g in items])
            uniq, inv = torch.unique(keys, return_inverse=True)
            per_row = torch.zeros(len(uniq), b.shape[1], dtype=dt, device=dev).index_add_(
                0, inv, rot)
            part = torch.zeros(*b.shape, dtype=torch.float64, device=dev).index_add_(
                0, uniq % b.shape[0], per_row.double().square())
            sums[w] = part if w not in sums else sums[w] + part
            continue
        q_a = b.q_a.to(dt)
        rot_a = []
        rot_g = []
        for call, g in items:
            a = call.input_patches()
            if b.bias is not None:
                a = _with_ones(a)
            rot_a.append(a @ q_a)
            rot_g.append(g @ q_s)
        if len(items) == 1 and rot_a[0].shape[1] == 1:
            part = (rot_g[0][:, 0].square().T @ rot_a[0][:, 0].square()).double()
        else:
            if len(items) == 1:
                a_all, g_all = rot_a[0], rot_g[0]
            else:
                a_all, g_all = torch.cat(rot_a, 1), torch.cat(rot_g, 1)   # calls x positions
            batch = a_all.shape[0]
            per = max(1, budget // max(1, 8 * b.shape[0] * b.width))
            part = torch.zeros(b.shape[0], b.width, dtype=torch.float64, device=dev)
            for s0 in range(0, batch, per):
                grads = torch.einsum("bso,bsi->boi", g_all[s0 : s0 + per], a_all[s0 : s0 + per])
                # a batched dot product: ~20x faster than squaring a float64 copy; the chunk's
                # sum is in the model's dtype, the running sum in float64
                part += torch.einsum("boi,boi->oi", grads, grads).double()
        sums[w] = part if w not in sums else sums[w] + part


def _s_zeros(b: LayerBlock, device: torch.device) -> torch.Tensor:
    d = b.shape[1 if b.kind == "embedding" else 0]
    return torch.zeros(d, d, dtype=torch.float64, device=device)


def _a_zeros(b: LayerBlock, device: torch.device) -> torch.Tensor:
    if b.kind == "embedding":
        return torch.zeros(b.shape[0], dtype=torch.float64, device=device)
    return torch.zeros(b.width, b.width, dtype=torch.float64, device=device)


def _eigen_zeros(b: LayerBlock, device: torch.device) -> torch.Tensor:
    return torch.zeros(*(b.shape if b.kind == "embedding" else (b.shape[0], b.width)),
                       dtype=torch.float64, device=device)


def _reduce_factors(blocks: list[LayerBlock], n: int, world: DistContext | None,
                    device: torch.device) -> int:
    """Pass 1's sums (and the example count) over every rank; a rank whose rows never reached
    a layer contributes zeros, so every rank reduces the same tensors."""
    for b in blocks:
        b.s_sum = _s_zeros(b, device) if b.s_sum is None else b.s_sum
        b.a_sum = _a_zeros(b, device) if b.a_sum is None else b.a_sum
    counts = torch.tensor([float(n), *(float(b.rows) for b in blocks)], dtype=torch.float64,
                          device=device)
    reduced = _all_reduced([counts, *(b.s_sum for b in blocks), *(b.a_sum for b in blocks)],
                           world)
    k = len(blocks)
    for i, b in enumerate(blocks):
        b.rows = int(reduced[0][1 + i])
        b.s_sum, b.a_sum = reduced[1 + i], reduced[1 + k + i]
    return int(reduced[0][0])


def fit_kronecker(fn: StageFunction, x: torch.Tensor, y: torch.Tensor,
                  settings: KroneckerSettings | None = None, *,
                  world: DistContext | None = None, shard: Shard | None = None
                  ) -> KroneckerFactors:
    """Fit EK-FAC of the stage ``fn`` on ``(x, y)``: two passes over the data (factors, then
    the eigenvalue correction) plus float64 eigendecompositions of every factor.

    Data-parallel (``world`` with several ranks): ``x``, ``y`` are this rank's ``shard``;
    every sum is all-reduced (one collective per pass), the plan is rank 0's, and each row's
    random draw is the one a single process would make, so every rank ends with the factors
    of all the data (equal to a single process's up to the order of summation).
    """
    settings = settings or KroneckerSettings()
    params = list(fn.params)
    distributed = world is not None and world.distributed
    lo, total = (shard.lo, shard.total) if shard is not None else (0, len(x))
    plan = _plan(fn, x[:4], y[:4]) if not distributed or world.rank == 0 else None
    blocks, other = broadcast_object(plan, world) if distributed else plan
    index = {id(params[b.weight]): b.weight for b in blocks}
    factors = KroneckerFactors(fn, settings, blocks, other, None)
    n = 0
    t0 = time.perf_counter()
    draws = RowDraws(settings.seed, total, x.device)
    for xb, yb, rows in _batches(x, y, settings, lo, total):
        for j, (_, _, calls) in enumerate(probe_passes(fn, params, index, xb, yb, rows,
                                                        settings.fisher, draws)):
            _accumulate_factors(blocks, calls, j == 0)
        n += len(xb)
    n = _reduce_factors(blocks, n, world, x.device)
    if n == 0:
        raise KroneckerError("no examples to fit the Kronecker factors on")
    factors.examples = n
    factors.timings["factors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for b in blocks:
        b.q_s = torch.linalg.eigh(b.s_sum / n)[1]
        if b.kind != "embedding":
            b.q_a = torch.linalg.eigh(b.a_sum / max(b.rows, 1))[1]
    factors.timings["eigendecompositions"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sums: dict[int, torch.Tensor] = {}
    n_other = sum(params[i].numel() for i in other)
    dense_other = bool(other) and n_other <= settings.other_dense_limit
    other_sum = None
    draws = RowDraws(settings.seed + 1, total, x.device)
    for xb, yb, rows in _batches(x, y, settings, lo, total):
        for fj, tj, calls in probe_passes(fn, params, index, xb, yb, rows, settings.fisher,
                                          draws):
            _accumulate_corrections(blocks, calls, sums, settings.memory_budget)
            if other:
                g = torch.cat(fj.gradient_blocks(xb, tj, other), 1).double()
                part = g.T @ g if dense_other else g.square().sum(0)
                other_sum = part if other_sum is None else other_sum + part
    parts = [sums.get(b.weight, _eigen_zeros(b, x.device)) for b in blocks]
    if other:
        if other_sum is None:
            other_sum = torch.zeros(*((n_other, n_other) if dense_other else (n_other,)),
                                    dtype=torch.float64, device=x.device)
        parts.append(other_sum)
    parts = _all_reduced(parts, world)
    for b, part in zip(blocks, parts, strict=False):
        b.eigenvalues = part / n
    if other:
        other_sum = parts[-1]
        regs = {fn.reg[i] for i in other}
        if dense_other and len(regs) == 1:
            factors.other_mode = "dense"
            factors.other_eigen = tuple(torch.linalg.eigh(other_sum / n))
        else:
            factors.other_mode = "diagonal"
            factors.other_diag = (other_sum / n).diagonal() if dense_other else other_sum / n
    factors.timings["correction"] = time.perf_counter() - t0
    return factors
