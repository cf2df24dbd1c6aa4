"""Arithmetic floors (multiply-adds per example, in units of one training epoch) of EK-FAC's
fit and of layerwise scoring, from the Conv2d / Linear geometry of a model.

An epoch is forward (1 MAC per layer MAC) + weight gradient (1) + input gradient (1, none for
the first layer: the images need no gradient).  A probe pass (forward + backward to the layer
outputs, what both the fit and scoring need) is forward + input gradient.  Used by
``benchmarks/ekfac_scale_bench.py``; measured / floor says how much the code leaves on the table.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.task import TwoStageTask


def layer_geometry(task: TwoStageTask) -> list[dict]:
    """Per Conv2d / Linear layer of backbone + pretraining head, in forward order: MACs per
    example, positions, weight size (2-D view, bias included as one more input column)."""
    rows: list[dict] = []
    hooks = []
    for name, mod in [*(("backbone." + n, m) for n, m in task.backbone.named_modules()),
                      *(("pretrain_head" + ("." + n if n else ""), m)
                        for n, m in task.pretrain_head.named_modules())]:
        if isinstance(mod, nn.Conv2d | nn.Linear):
            def hook(m: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                kind = "conv2d" if isinstance(m, nn.Conv2d) else "linear"
                positions = out.shape[2] * out.shape[3] if kind == "conv2d" else 1
                d_out = m.weight.shape[0]
                d_in = m.weight[0].numel()
                rows.append({"layer": name, "kind": kind, "positions": int(positions),
                             "d_in": int(d_in), "d_out": int(d_out),
                             "macs": int(positions * d_in * d_out),
                             "weight": int(d_out * (d_in + (m.bias is not None)))})
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        task.pretrain_head(task.backbone(task.pretrain_data[0][:1]))
    for h in hooks:
        h.remove()
    return rows


def code_uses_per_example(positions: int, columns: int) -> bool:
    """The rule of ``LayerContraction.__call__`` (engine/layer_contraction.py): per-example
    gradient first when ``S C > S + C``, else ``g_s^T (V a_s)`` per position."""
    return positions * columns > positions + columns


def floor_report(layers: list[dict], k: int, rank: int | None = None) -> dict:
    """Flops per example of an epoch and of exact (or rank-r) layerwise scoring, per layer.

    epoch: forward 2 MAC + weight gradient 2 MAC + input gradient 2 MAC (none for the first
    layer: the images need no gradient).  Scoring with C = 2K directions: forward 2 MAC +
    backward to the layer outputs (input gradients of every layer but the first, 2 MAC) +
    the contraction, per layer either
      * per position, ``sum_s g_s^T V a_s``: 2 MAC per direction (2 C MAC), or
      * per-example gradient first, ``G = sum_s g_s a_s^T`` (2 MAC) then ``G . V``
        (2 x weight size per direction): 2 MAC + 2 C W,
    whichever the code picks (:func:`code_uses_per_example`); a linear layer has S = 1, so
    both are ~2 C MAC and the model floor for linear layers is (4K + 4) / 6 epochs.  With
    ``rank`` r a linear weight's contraction is 2 C r (d_in + d_out) when that is smaller.
    """
    c = 2 * k
    rows, epoch, floor_code, floor_pos, floor_pex = [], 0.0, 0.0, 0.0, 0.0
    for i, layer in enumerate(layers):
        mac, w, s = layer["macs"], layer["weight"], layer["positions"]
        first = i == 0
        ep = (4 if first else 6) * mac
        base = (2 if first else 4) * mac          # forward + input gradient (not first)
        per_position = 2 * c * mac
        per_example = 2 * mac + 2 * c * w
        if rank is not None and layer["kind"] == "linear" \
                and rank * (layer["d_in"] + layer["d_out"]) < layer["d_in"] * layer["d_out"]:
            per_position = per_example = 2 * c * rank * (layer["d_in"] + layer["d_out"])
        uses_pex = layer["kind"] == "conv2d" and code_uses_per_example(s, c)
        code = per_example if uses_pex else per_position
        rows.append({**layer, "epoch_flops": ep, "floor_flops_code": base + code,
                     "floor_flops_per_position": base + per_position,
                     "floor_flops_per_example_gradient": base + per_example,
                     "code_method": "per-example gradient" if uses_pex else "per position",
                     "floor_epochs_code": (base + code) / ep})
        epoch += ep
        floor_code += base + code
        floor_pos += base + per_position
        floor_pex += base + min(per_position, per_example)
    return {"K": k, "columns": c, "rank": rank, "layers": rows, "epoch_flops": epoch,
            "floor_flops_code": floor_code, "floor_epochs_code": floor_code / epoch,
            "floor_epochs_per_position": floor_pos / epoch,
            "floor_epochs_cheapest": floor_pex / epoch,
            "linear_floor_epochs": (4 * k + 4) / 6}



def fit_floor_report(layers: list[dict]) -> dict:
    """MACs per example of the EK-FAC fit (true Fisher: one sampled label per example, both
    passes over the data), per layer, with ``d_in' = d_in + 1`` (the bias column):

    * two probe passes (factors, then correction): forward + input gradient each;
    * factor statistics: ``A = sum_s a_s a_s^T``: ``S d_in'^2`` as a general product (what the
      code does; ``S d_in'^2 / 2`` if only one triangle were formed), ``S = sum_s g_s g_s^T``:
      ``S d_out^2``;
    * eigenvalue correction: each example's gradient in the Kronecker eigenbasis, the cheaper
      of rotating the patches and output gradients (``S (d_in'^2 + d_out^2)``) then forming
      ``sum_s g'_s a'_s^T`` (``S d_out d_in'``; for ``S = 1`` the squares' product over the
      batch, ``d_out d_in'``), or forming ``G_j`` first (``S d_out d_in'``) then rotating it
      (``d_out^2 d_in' + d_out d_in'^2``); squaring and summing: ``d_out d_in'``.

    A conv layer whose patch width ``d_in'`` far exceeds ``d_out`` costs ``d_in' / d_out`` times
    its forward pass in each of A and the rotation alone: that, not the code, bounds the fit.
    """
    rows, epoch, floor_code, floor_sym = [], 0.0, 0.0, 0.0
    for i, layer in enumerate(layers):
        mac, s, d_out = layer["macs"], layer["positions"], layer["d_out"]
        d_in = layer["d_in"] + 1
        first = i == 0
        ep = (2 if first else 3) * mac
        probe = 2 * (1 if first else 2) * mac
        a_cov, s_cov = s * d_in * d_in, s * d_out * d_out
        rotate_patches = s * (d_in * d_in + d_out * d_out) + (s * d_out * d_in if s > 1
                                                              else d_out * d_in)
        rotate_gradient = s * d_out * d_in + d_out * d_out * d_in + d_out * d_in * d_in
        correction = min(rotate_patches, rotate_gradient) + d_out * d_in
        code = probe + a_cov + s_cov + correction
        sym = probe + a_cov / 2 + s_cov + correction
        rows.append({**layer, "epoch_macs": ep, "probe_macs": probe, "a_factor_macs": a_cov,
                     "s_factor_macs": s_cov, "correction_macs": correction,
                     "floor_macs": code, "floor_epochs_of_layer": code / ep})
        epoch += ep
        floor_code += code
        floor_sym += sym
    return {"layers": rows, "epoch_macs": epoch, "floor_epochs": floor_code / epoch,
            "floor_epochs_symmetric_a": floor_sym / epoch}
