"""``nn.MultiheadAttention`` under the layer capture: ``F.multi_head_attention_forward``
decomposed into its captured projections (``F.linear``) and the attention itself, so EK-FAC and
layerwise scoring see the four projections as linear layers.

The decomposition follows torch's own (masks merged as torch merges them; math attention, or
``F.scaled_dot_product_attention``); in the planning pass (``check``) it runs next to torch's
function and a decomposition that does not reproduce the output is not trusted (its tensors
become "other").  Used by :mod:`engine.layer_capture`, which owns the capture mode.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:
    from engine.layer_capture import _Capture

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


# ----- multi-head attention ---------------------------------------------------------------
_MHA_WEIGHTS = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean masks become additive -inf masks, as torch's ``_canonical_mask`` does."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError("only bool and float masks are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _mha_decomposed(cap: _Capture, a: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """``F.multi_head_attention_forward`` from captured linear calls and torch's attention ops.

    Shapes inside are batch-first ``(N, L, E)``; the result is laid out as torch's
    (``(L, N, E)``, attention weights ``(N, L, S)`` or ``(N, H, L, S)``).
    """
    query, key, value = a["query"], a["key"], a["value"]
    tgt_len, bsz, embed = query.shape
    src_len = key.shape[0]
    heads = a["num_heads"]
    head_dim = embed // heads
    need_weights, is_causal = a["need_weights"], a["is_causal"]
    attn_mask = a["attn_mask"]
    kpm = _float_mask(a["key_padding_mask"], query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("is_causal needs attn_mask")
    if is_causal and kpm is None and not need_weights:
        attn_mask = None        # torch passes the causal hint to SDPA and drops the mask
    else:
        attn_mask = _float_mask(attn_mask, query.dtype)
        if kpm is not None:
            is_causal = False
    qb = query.transpose(0, 1)
    in_w, in_b = a["in_proj_weight"], a["in_proj_bias"]
    if not a["use_separate_proj_weight"]:
        if query is key and key is value:
            proj = cap.linear(qb, in_w, in_b)
            q, k, v = proj[..., :embed], proj[..., embed : 2 * embed], proj[..., 2 * embed :]
        else:   # the packed weight is used in slices: its tensors are "other"
            cap._mark((in_w, in_b), "a multi-head attention with key/value != query "
                      "(packed in-projection used in slices)")
            w_q, w_k, w_v = in_w.chunk(3)
            b_q, b_k, b_v = in_b.chunk(3) if in_b is not None else (None, None, None)
            q = F.linear(qb, w_q, b_q)
            k = F.linear(key.transpose(0, 1), w_k, b_k)
            v = F.linear(value.transpose(0, 1), w_v, b_v)
    else:
        if in_b is not None:
            cap._mark(in_b, "the in-projection bias of a multi-head attention with separate "
                      "q/k/v weights (used in slices)")
        b_q, b_k, b_v = in_b.chunk(3) if in_b is not None else (None, None, None)
        q = cap.linear(qb, a["q_proj_weight"], b_q)
        k = cap.linear(key.transpose(0, 1), a["k_proj_weight"], b_k)
        v = cap.linear(value.transpose(0, 1), a["v_proj_weight"], b_v)
    q = q.reshape(bsz, tgt_len, heads, head_dim).transpose(1, 2)
    k = k.reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
    v = v.reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
    if attn_mask is not None:
        attn_mask = (attn_mask.reshape(1, 1, tgt_len, src_len) if attn_mask.dim() == 2
                     else attn_mask.reshape(bsz, heads, tgt_len, src_len))
    if kpm is not None:
        kpm = kpm.reshape(bsz, 1, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        ctx = weights @ v
        if a["average_attn_weights"]:
            weights = weights.mean(dim=1)
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
    ctx = ctx.transpose(1, 2).reshape(bsz, tgt_len, embed)
    out = cap.linear(ctx, a["out_proj_weight"], a["out_proj_bias"])
    return out.transpose(0, 1), weights


def _mha(cap: _Capture, func, args, kwargs):  # noqa: ANN001, ANN202
    try:
        a = _MHA_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return NotImplemented
    a.apply_defaults()
    a = dict(a.arguments)
    tracked = [a[n] for n in _MHA_WEIGHTS if cap._tracked(a[n]) is not None]
    if not tracked:
        return NotImplemented
    training_dropout = a["training"] and a["dropout_p"] > 0
    unsupported = (a["query"].dim() != 3 or a["bias_k"] is not None or a["bias_v"] is not None
                   or a["add_zero_attn"] or a["static_k"] is not None
                   or a["static_v"] is not None or training_dropout
                   or any(cap._tracked(a[n]) is not None for n in ("query", "key", "value"))
                   or any(m is not None and not (m.is_floating_point() or m.dtype == torch.bool)
                          for m in (a["attn_mask"], a["key_padding_mask"])))
    if unsupported or (a["query"].shape[1] != cap.batch):
        cap._mark((args, kwargs), "a multi-head attention configuration the decomposition does "
                  "not cover (bias_k/bias_v, add_zero_attn, static_k/v, dropout while training, "
                  "unbatched or not batch-first)")
        return func(*args, **kwargs)
    n_calls = len(cap.calls)
    out = _mha_decomposed(cap, a)
    if cap.check:
        ref = func(*args, **kwargs)
        if not _close(out, ref):
            reason = "a multi-head attention whose decomposition does not reproduce torch's output"
            for call in cap.calls[n_calls:]:
                for i in (call.weight, call.bias):
                    if i is not None:
                        cap.other_uses.add(i)
                        cap.reasons.setdefault(i, reason)
            cap._mark(tracked, reason)
            del cap.calls[n_calls:]
            return ref
    return out


def _close(got: Any, ref: Any) -> bool:
    gl, rl = tree_leaves(got), tree_leaves(ref)
    if len(gl) != len(rl):
        return False
    for g, r in zip(gl, rl, strict=True):
        if _is_tensor(g) != _is_tensor(r):
            return False
        if not _is_tensor(g):
            continue
        if g.shape != r.shape:
            return False
        if g.numel() == 0:
            continue
        eps = torch.finfo(r.dtype).eps if r.is_floating_point() else 0.0
        scale = float(r.abs().max()) if r.is_floating_point() else 0.0
        if not bool(((g - r).abs() <= 4 * math.sqrt(eps) * max(scale, 1e-30)).all()):
            return False
    return True
