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

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.curvature.stage_functions import StageFunction
from engine.layer_capture import find_layer_tensors, probe_pass, weight_matrix_shape
from engine.task import cross_entropy, squared_error

FISHER_TYPES = ("true", "empirical", "expected")


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
        return [0, *torch.tensor(sizes).cumsum(0).tolist()]

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
            rows = torch.cat([torch.arange(off[i], off[i + 1]) for i in self.other])
            v = rhs[rows]
            reg = torch.cat([torch.full((off[i + 1] - off[i],), self.function.reg[i], dtype=dt)
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


# ----- targets whose output gradients give the chosen Fisher -------------------------------

def _targets(fn: StageFunction, x: torch.Tensor, y: torch.Tensor, fisher: str,
             gen: torch.Generator) -> Iterator[tuple[StageFunction, torch.Tensor]]:
    """(function, targets) pairs whose summed per-example output-gradient outer products, over
    the pairs, estimate (true), equal (expected) or are (empirical) the Fisher's."""
    if fisher == "empirical":
        yield fn, y
        return
    with torch.no_grad():
        out = fn.outputs(fn.params, x)
    if fn.loss is cross_entropy:
        probs = torch.softmax(out.double(), dim=1)
        if fisher == "true":
            yield fn, torch.multinomial(probs, 1, generator=gen).squeeze(1)
            return
        # diag(p) - p p^T = L L^T with columns L_c = sqrt(p_c) (e_c - p).
        surrogate = fn.with_loss(lambda o, coef: (o * coef).sum(1))
        root = probs.sqrt()
        for c in range(out.shape[1]):
            coef = -probs * root[:, c : c + 1]
            coef[:, c] += root[:, c]
            yield surrogate, coef.to(out.dtype)
        return
    if fn.loss is squared_error:
        if fisher == "true":   # y ~ N(out, I/2): E[g g^T] = 2 I, the loss's output Hessian
            noise = torch.randn(out.shape, generator=gen, dtype=torch.float64) * math.sqrt(0.5)
            yield fn, (out.double() + noise).to(out.dtype).reshape(y.shape)
            return
        surrogate = fn.with_loss(lambda o, coef: (o * coef).reshape(len(o), -1).sum(1))
        flat = out.reshape(len(out), -1)
        for c in range(flat.shape[1]):
            coef = torch.zeros_like(flat)
            coef[:, c] = math.sqrt(2.0)
            yield surrogate, coef.reshape(out.shape)
        return
    raise KroneckerError(
        f"fisher = {fisher!r} needs a model distribution, known for the built-in cross_entropy "
        "and squared_error losses only; for another loss use fisher = 'empirical'")


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
            grad = torch.zeros(len(x), *blk.shape, dtype=g.dtype)
            grad.scatter_add_(1, call.indices()[:, :, None].expand(-1, -1, blk.shape[1]), g)
        else:
            a = call.input_patches()
            grad = torch.einsum("bso,bsi->boi", g, _with_ones(a) if blk.bias is not None
                                else a)
        out[blk.weight] = out[blk.weight] + grad if blk.weight in out else grad
    return [out.get(b.weight) for b in blocks]


def _rows(n: int, max_examples: int | None) -> torch.Tensor | None:
    if max_examples is None or max_examples >= n:
        return None
    return torch.linspace(0, n - 1, max_examples).round().long()


def _batches(x: torch.Tensor, y: torch.Tensor, settings: KroneckerSettings
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rows = _rows(len(x), settings.max_examples)
    if rows is not None:
        x, y = x[rows], y[rows]
    for start in range(0, len(x), settings.batch_size):
        yield x[start : start + settings.batch_size], y[start : start + settings.batch_size]


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)


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
        dt = items[0][1].dtype
        q_s = b.q_s.to(dt)
        if b.kind == "embedding":
            # Sum each example's rotated output gradients per token (over positions and calls)
            # before squaring: the example's gradient row of that token, in the basis Q_S.
            keys = torch.cat([(torch.arange(c.indices().shape[0])[:, None] * b.shape[0]
                               + c.indices()).reshape(-1) for c, _ in items])
            rot = torch.cat([(g @ q_s).reshape(-1, b.shape[1]) for _, g in items])
            uniq, inv = torch.unique(keys, return_inverse=True)
            per_row = torch.zeros(len(uniq), b.shape[1], dtype=dt).index_add_(0, inv, rot)
            part = torch.zeros(*b.shape, dtype=torch.float64).index_add_(
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
            part = rot_g[0][:, 0].double().square().T @ rot_a[0][:, 0].double().square()
        else:
            a_all, g_all = torch.cat(rot_a, 1), torch.cat(rot_g, 1)   # calls x positions
            batch = a_all.shape[0]
            per = max(1, budget // max(1, 8 * b.shape[0] * b.width))
            part = torch.zeros(b.shape[0], b.width, dtype=torch.float64)
            for s0 in range(0, batch, per):
                grads = torch.einsum("bso,bsi->boi", g_all[s0 : s0 + per], a_all[s0 : s0 + per])
                part += grads.double().square().sum(0)
        sums[w] = part if w not in sums else sums[w] + part


def fit_kronecker(fn: StageFunction, x: torch.Tensor, y: torch.Tensor,
                  settings: KroneckerSettings | None = None) -> KroneckerFactors:
    """Fit EK-FAC of the stage ``fn`` on ``(x, y)``: two passes over the data (factors, then
    the eigenvalue correction) plus float64 eigendecompositions of every factor."""
    settings = settings or KroneckerSettings()
    params = list(fn.params)
    blocks, other = _plan(fn, x[:4], y[:4])
    index = {id(params[b.weight]): b.weight for b in blocks}
    factors = KroneckerFactors(fn, settings, blocks, other, None)
    n = 0
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed)
    for xb, yb in _batches(x, y, settings):
        for j, (fj, tj) in enumerate(_targets(fn, xb, yb, settings.fisher, gen)):
            _accumulate_factors(blocks, probe_pass(fj, params, index, xb, tj), j == 0)
        n += len(xb)
    factors.examples = n
    factors.timings["factors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for b in blocks:
        if b.s_sum is None:   # the weight never reaches the loss: zero curvature
            b.s_sum = torch.zeros(b.shape[1 if b.kind == "embedding" else 0],
                                  b.shape[1 if b.kind == "embedding" else 0],
                                  dtype=torch.float64)
        b.q_s = torch.linalg.eigh(b.s_sum / n)[1]
        if b.kind != "embedding":
            a_sum = b.a_sum if b.a_sum is not None else torch.zeros(b.width, b.width,
                                                                     dtype=torch.float64)
            b.q_a = torch.linalg.eigh(a_sum / max(b.rows, 1))[1]
    factors.timings["eigendecompositions"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sums: dict[int, torch.Tensor] = {}
    n_other = sum(params[i].numel() for i in other)
    dense_other = other and n_other <= settings.other_dense_limit
    other_sum = None
    gen = torch.Generator().manual_seed(settings.seed + 1)
    for xb, yb in _batches(x, y, settings):
        for fj, tj in _targets(fn, xb, yb, settings.fisher, gen):
            _accumulate_corrections(blocks, probe_pass(fj, params, index, xb, tj), sums,
                                    settings.memory_budget)
            if other:
                g = torch.cat(fj.gradient_blocks(xb, tj, other), 1).double()
                part = g.T @ g if dense_other else g.square().sum(0)
                other_sum = part if other_sum is None else other_sum + part
    for b in blocks:
        b.eigenvalues = sums.get(b.weight, torch.zeros(*b.shape[:1], b.width,
                                                       dtype=torch.float64)
                                 if b.kind != "embedding" else torch.zeros(*b.shape,
                                                                          dtype=torch.float64))
        b.eigenvalues = b.eigenvalues / n
    if other:
        regs = {fn.reg[i] for i in other}
        if dense_other and len(regs) == 1:
            factors.other_mode = "dense"
            factors.other_eigen = tuple(torch.linalg.eigh(other_sum / n))
        else:
            factors.other_mode = "diagonal"
            factors.other_diag = (other_sum / n).diagonal() if dense_other else other_sum / n
    factors.timings["correction"] = time.perf_counter() - t0
    return factors
