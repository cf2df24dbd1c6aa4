"""Per-example pretraining gradients and the choice of how the scoring pass forms its dot products.

Used by :func:`engine.scores.score_pretraining` (and re-exported there): the pretraining losses
as a function of the tracked tensors (:class:`_PretrainLosses`), per-example gradients, the
layerwise plan (:func:`_layer_plan`) and the ``"auto"`` method rule (:func:`_auto_method`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, vmap

from engine.layer_capture import LayerPlan, layer_plan
from engine.layer_contraction import (
    DEFAULT_MEMORY_BUDGET,
    LayerContraction,
    matches_reference,
)
from engine.task import TwoStageTask
from engine.training import TwoStageFit


class _PretrainLosses:
    """Per-example pretraining losses as a function of the tracked tensors ``[U blocks, W blocks]``.

    ``params`` holds the tracked tensors at (U*, W*), in the order of the rows of the directions
    (``u_layout`` names, then ``w_layout`` names); untracked backbone tensors stay at U*.
    """

    def __init__(self, task: TwoStageTask, fit: TwoStageFit) -> None:
        self.task = task
        base = fit.backbone_pre
        self.base_params = task.backbone_layout.unflatten(base)
        self.u_names, self.w_names = task.u_layout.names, task.w_layout.names
        self.params = [*task.u_layout.unflatten(task.tracked(base)).values(),
                       *task.w_layout.unflatten(fit.w).values()]

    def __call__(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        nu = len(self.u_names)
        u_p = dict(zip(self.u_names, params[:nu], strict=True))
        w_p = dict(zip(self.w_names, params[nu:], strict=True))
        feats = functional_call(self.task.backbone, {**self.base_params, **u_p}, (x,))
        return self.task.pretrain_loss(functional_call(self.task.pretrain_head, w_p, (feats,)), y)

    def gradient_blocks(self, x: torch.Tensor, y: torch.Tensor,
                        which: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per-example gradients, one ``(batch, numel)`` block per tracked tensor in ``which``.

        Differentiating w.r.t. named tensors (not slices of one flat vector) matters: the backward
        of a slice zero-fills and adds a full (batch, n_params) buffer per parameter tensor.
        """
        which = list(range(len(self.params))) if which is None else list(which)

        def loss_single(sub: list[torch.Tensor], xj: torch.Tensor,
                        yj: torch.Tensor) -> torch.Tensor:
            full = list(self.params)
            for i, t in zip(which, sub, strict=True):
                full[i] = t
            return self(full, xj[None], yj[None]).sum()

        grads = vmap(grad(loss_single), in_dims=(None, 0, 0))(
            [self.params[i] for i in which], x, y)
        return [g.reshape(len(x), -1) for g in grads]


def per_example_gradient_blocks(task: TwoStageTask, fit: TwoStageFit, x: torch.Tensor,
                                y: torch.Tensor) -> list[torch.Tensor]:
    """grad_{U,W} l_pre(z_j) for a batch, one (batch, numel) block per parameter tensor."""
    return _PretrainLosses(task, fit).gradient_blocks(x, y)


def per_example_gradients(task: TwoStageTask, fit: TwoStageFit, x: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor:
    """grad_{U,W} l_pre(z_j) for a batch of pretraining examples, shape (batch, n_u + n_w)."""
    return torch.cat(per_example_gradient_blocks(task, fit, x, y), 1)


# Examples used to estimate the layer covariances of a rank-r scoring pass (evenly spaced).
COVARIANCE_EXAMPLES = 4096


def _layer_plan(losses: _PretrainLosses, r_blocks: Sequence[torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, rank: int | None, batch_size: int,
                memory_budget: int = DEFAULT_MEMORY_BUDGET
                ) -> tuple[LayerContraction | None, LayerPlan | None, str]:
    """The layerwise contraction for the tensors only linear/conv2d/embedding layers use,
    checked on 4 examples against ``vmap(grad)`` per-example gradients.

    Returns (contraction or None, the plan (``plan.other`` minus ``plan.unused`` is left for
    per-example gradients), why-not message).
    """
    probe_x, probe_y = x[:4], y[:4]
    plan = layer_plan(losses, losses.params, probe_x, probe_y)
    if not plan.kinds:
        return None, plan, "no tracked tensor is used only by linear, conv2d or embedding layers"
    # Check the plan on random directions against vmap(grad) per-example gradients; tensors the
    # forward pass never touches are checked to have zero gradients.
    checked = sorted(plan.kinds) + plan.unused
    gen = torch.Generator().manual_seed(0)
    # drawn on the CPU: the same check on every device
    check_dirs = [torch.randn(b.shape[0], 3, generator=gen, dtype=b.dtype, device="cpu")
                  .to(b.device) for b in r_blocks]
    check = LayerContraction(losses, losses.params, check_dirs, plan.kinds,
                             memory_budget=memory_budget)
    blocks = losses.gradient_blocks(probe_x, probe_y, checked)
    reference = sum(g @ check_dirs[i] for g, i in zip(blocks, checked, strict=True))
    if not matches_reference(check, reference, probe_x, probe_y):
        return None, plan, ("the layers' inputs and output gradients do not reproduce the "
                            "per-example gradients (the model may not be batch-first)")
    # which rows: computed on the CPU, so every device rounds them alike
    cov_rows = torch.linspace(0, len(x) - 1, min(len(x), COVARIANCE_EXAMPLES),
                              device="cpu").round().long()
    return LayerContraction(losses, losses.params, r_blocks, plan.kinds, rank,
                            covariance_data=(x[cov_rows], y[cov_rows]), batch_size=batch_size,
                            memory_budget=memory_budget), plan, ""


# Flops per example of the supported layers per parameter of theirs above which a model is
# "position-heavy" (each weight is applied at many positions: conv nets ~170-300, transformers
# 10-25; vector MLPs ~2, embedding models < 1): with tensors left to per-example gradients,
# "auto" then prefers "gradients" to "layerwise" (benchmarks/engine_bench.py --grid).
POSITION_HEAVY_FLOPS_PER_PARAM = 4.0


def _auto_method(losses: _PretrainLosses, contraction: LayerContraction | None,
                 plan: LayerPlan | None, rest: Sequence[int], columns: int,
                 jvp_max_columns: int, rank: int | None, why_not: str, batch_size: int,
                 memory_budget: int) -> tuple[str, str]:
    """The scoring method ``"auto"`` runs, and why.

    Measured with ``benchmarks/engine_bench.py --grid`` (README, "Engine speed and memory"):

    * ``direction_rank`` set: ``"layerwise"`` (rank-r directions need it).
    * Every tracked tensor a linear/conv2d/embedding layer's: ``"layerwise"``: fastest from
      K = 8 on MLPs (2-4x ahead of ``"gradients"``) and at every K on embedding models (up to
      100x: their per-example gradients are huge), tied with ``"gradients"`` on CNNs (within
      +-15%, either way in repeated runs) with memory bounded by the budget, within ~20% of
      ``"jvp"`` at K = 1.
    * Some tensors left to per-example gradients (LayerNorm, GroupNorm, learned positions):
      layerwise then runs the network twice (its pass, and ``vmap(grad)`` for those tensors).
      That pays on models that are not position-heavy (vector MLPs, embeddings: at most
      :data:`POSITION_HEAVY_FLOPS_PER_PARAM` flops per parameter per example in the supported
      layers), where per-example weight gradients are expensive: ``"layerwise"`` (3.6x ahead of
      ``"gradients"`` at K = 8 on an MLP with LayerNorm).  On position-heavy models (conv nets
      with normalization layers, transformers) per-example gradients are cheap next to the
      activations and ``"gradients"`` was 1.1-1.8x faster, so ``"gradients"``, unless its
      per-batch gradient block (``batch_size x parameters``) exceeds ``memory_budget``.
    * No layerwise plan (no supported layer, or the plan failed its check): ``"jvp"`` up to
      ``jvp_max_columns`` columns (2K) on models that are not position-heavy (2-16x ahead of
      per-example gradients at K <= 8 on MLPs, behind at K = 32), else ``"gradients"`` (forward
      mode costs 2K forward passes: 5-70x slower on conv nets from K = 8).
    """
    supported = list(plan.kinds) if plan is not None else []
    p_sup = sum(losses.params[i].numel() for i in supported)
    per_param = plan.flops_per_example() / p_sup if plan is not None and p_sup else 0.0
    heavy = per_param > POSITION_HEAVY_FLOPS_PER_PARAM
    shape = (f"{per_param:.1f} flops per parameter per example in the linear/conv2d/embedding "
             "layers")
    if contraction is not None and rank is not None:
        return "layerwise", "direction_rank is set (rank-r directions need the layerwise pass)"
    if contraction is not None and not rest:
        return "layerwise", "every tracked tensor is a linear, conv2d or embedding layer's"
    if contraction is not None:
        if not heavy:
            return "layerwise", (f"{len(rest)} tensors need per-example gradients, but the "
                                 f"model is not position-heavy ({shape})")
        itemsize = losses.params[0].element_size()
        block = batch_size * sum(p.numel() for p in losses.params) * itemsize
        if block > memory_budget:
            return "layerwise", (f"{len(rest)} tensors need per-example gradients and the "
                                 f"model is position-heavy ({shape}), but a batch of "
                                 f"per-example gradients ({block / 2**30:.2f} GiB) exceeds the "
                                 f"memory budget ({memory_budget / 2**30:.2f} GiB)")
        return "gradients", (f"{len(rest)} tensors need per-example gradients and the model is "
                             f"position-heavy ({shape}): one pass of per-example gradients "
                             "beats layerwise plus a second pass")
    reason = why_not or "no layerwise plan"
    if heavy:
        return "gradients", f"{reason}; position-heavy ({shape})"
    if columns <= jvp_max_columns:
        return "jvp", f"{reason}; {columns} columns <= {jvp_max_columns}: forward mode"
    return "gradients", f"{reason}; {columns} columns > {jvp_max_columns}"
