"""Which parameter tensors are weights of linear, conv2d and embedding layers, and what they see.

For a tensor used only as the weight (or only as the bias) of such layers, the per-example
gradient is a function of each call's input and output gradient alone:

* ``F.linear`` (``nn.Linear``): ``sum_s g_s a_s^T`` over the calls and positions ``s``
  (input ``a``, output gradient ``g``); the bias gets ``sum_s g_s``.
* ``F.conv2d`` (``nn.Conv2d``, ``groups == 1``): the same with ``a_s`` the input patch of output
  position ``s`` (``F.unfold``, ``C_in * kh * kw`` values in the order of
  ``weight.reshape(C_out, -1)``), ``g_s`` the output gradient at that position.
* ``F.embedding`` (``nn.Embedding``): row ``idx_s`` of the weight gets ``g_s``;
  positions holding ``padding_idx`` get nothing.  ``F.embedding_bag`` (``nn.EmbeddingBag``) on
  2-D input (fixed-size bags) in ``"sum"`` / ``"mean"`` mode is the same with ``g_s`` the bag's
  output gradient (divided by the number of non-padding tokens for ``"mean"``).
* ``nn.MultiheadAttention`` (``F.multi_head_attention_forward``): decomposed here into captured
  linear calls for the packed self-attention in-projection (``in_proj_weight`` / ``in_proj_bias``
  on the query, when query, key and value are the same tensor) or the separate q/k/v
  projection weights (``kdim``/``vdim`` != ``embed_dim``), and the out-projection, with torch's
  own attention ops in between (the explicit softmax path when attention weights are returned,
  else ``F.scaled_dot_product_attention``, masks merged as torch merges them).  The first pass
  (:func:`find_layer_tensors`) runs the decomposition next to torch's implementation and
  compares the outputs; a mismatch, or a configuration outside the decomposition
  (``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``, dropout while training,
  unbatched input), leaves the attention's tensors "other" (they get per-example gradients).
  Cross-attention with the packed weight uses slices of it (and separate projection weights use
  slices of ``in_proj_bias``), so those tensors are "other" too.

Calls are intercepted with a ``TorchFunctionMode`` (no module hooks), so this works under
``torch.func.functional_call`` on the user's own modules.  A tensor counts as supported only if
every use of it in the forward pass is as the weight, or every use as the bias, of supported
calls of ONE kind whose input and output have the batch on dimension 0; anything else (a
LayerNorm's parameters, a weight also used in a penalty term, a grouped convolution, an
embedding with ``max_norm`` or ``scale_grad_by_freq``, tied embedding/output weights, an
``nn.Conv1d``/``nn.ConvTranspose2d`` weight) is "other".  Reads of metadata (``.shape``,
``.dtype``, ``.dim()``...) are not uses.  Shapes that merely look batch-first (positions on
dimension 0 with as many positions as examples) are not caught here; callers check the plan
against per-example gradients (see ``engine.scores``).

The probe pass (:func:`probe_pass`) adds a zero *probe* tensor to every captured output and
differentiates the SUM of the per-example losses w.r.t. the probes: examples do not interact, so
each example's rows of a probe's gradient are that example's own output gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from engine.attention_capture import _is_tensor, _mha

# losses(params, x, y) -> per-example losses (batch,), params in the order of ``params``.
BatchLosses = Callable[[Sequence[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]

KINDS = ("linear", "conv2d", "embedding")

# Tensor methods that read metadata only: calling them on a tracked tensor is not a use.
_METADATA = frozenset(
    getattr(torch.Tensor, name) for name in (
        "dim", "ndimension", "size", "numel", "nelement", "stride", "is_contiguous",
        "is_floating_point", "is_complex", "element_size", "get_device", "__len__",
        "storage_offset", "data_ptr", "is_shared", "is_pinned", "is_inference")
    if hasattr(torch.Tensor, name))


def weight_matrix_shape(kind: str, param: torch.Tensor) -> tuple[int, int]:
    """The 2-D view of a weight: linear ``(d_out, d_in)``, conv2d ``(C_out, C_in*kh*kw)``,
    embedding ``(num_embeddings, dim)``.  The weight's row-major flattening is the view's."""
    if kind in ("linear", "embedding"):
        if param.dim() != 2:
            raise ValueError(f"a {kind} weight is 2-D, got shape {tuple(param.shape)}")
        return int(param.shape[0]), int(param.shape[1])
    if kind == "conv2d":
        if param.dim() != 4:
            raise ValueError(f"a conv2d weight is 4-D, got shape {tuple(param.shape)}")
        return int(param.shape[0]), int(param[0].numel())
    raise ValueError(f"unknown layer kind {kind!r}; use one of {KINDS}")


@dataclass(eq=False)
class LayerCall:
    """One call of a supported layer whose weight or bias is tracked.

    ``inputs`` (detached): linear ``(batch, ..., d_in)``; conv2d the (unpadded) input
    ``(batch, C_in, H, W)``; embedding the token ids ``(batch, ...)``.  ``d_out`` is the width
    of the output gradient (embedding: ``dim``), ``d_in`` that of an input patch (embedding:
    ``num_embeddings``).
    """

    kind: str                       # "linear" | "conv2d" | "embedding"
    weight: int | None              # index of the weight among the tracked tensors
    bias: int | None                # index of the bias among the tracked tensors
    inputs: torch.Tensor
    d_in: int
    d_out: int
    probe: torch.Tensor | None = None   # zero tensor added to the output; its gradient is g
    kernel_size: tuple[int, int] = (1, 1)           # conv2d geometry
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # zero padding (left, right, top, bottom)
    out_hw: tuple[int, int] = (1, 1)
    padding_idx: int | None = None                  # embedding
    bag_mode: str | None = None                     # embedding_bag: "sum" | "mean"

    @property
    def batch(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def positions(self) -> int:
        """Positions per example: what the per-example gradient sums over."""
        if self.kind == "conv2d":
            return self.out_hw[0] * self.out_hw[1]
        if self.kind == "linear":
            return math.prod(self.inputs.shape[1:-1])
        return math.prod(self.inputs.shape[1:])

    def input_patches(self, examples: slice | None = None,
                      positions: slice | None = None) -> torch.Tensor:
        """``(batch, positions, d_in)``: the per-example weight gradient (2-D view, see
        :func:`weight_matrix_shape`) is ``sum_s g[:, s, :]^T a[:, s, :]``.

        linear: the inputs; conv2d: the unfolded patches (a view of ``F.unfold``'s
        ``(batch, d_in, positions)`` output).  ``examples`` / ``positions`` (unit-step slices)
        compute only that block: for conv2d only the input rows it needs are unfolded, so memory
        is bounded by the block.
        """
        if self.kind == "embedding":
            raise TypeError("an embedding call has token ids, not input patches: use indices()")
        ex = examples if examples is not None else slice(None)
        if self.kind == "linear":
            a = self.inputs[ex]
            a = a.reshape(a.shape[0], -1, self.d_in)
            return a if positions is None else a[:, positions]
        h_out, w_out = self.out_hw
        p0, p1, _ = (positions or slice(None)).indices(h_out * w_out)
        p1 = max(p0, p1)
        r0, r1 = p0 // w_out, -(-p1 // w_out)          # output rows covering the positions
        (kh, _), (sh, _), (dh, _) = self.kernel_size, self.stride, self.dilation
        left, right, top, _ = self.pads
        x = self.inputs[ex]
        height = x.shape[2]
        lo, hi = r0 * sh - top, (r1 - 1) * sh + dh * (kh - 1) + 1 - top   # unpadded rows
        if r1 <= r0:
            return x.new_zeros(x.shape[0], 0, self.d_in)
        pad_top, pad_bottom = max(0, -lo), max(0, hi - height)
        x = x[:, :, max(lo, 0):min(hi, height)]
        if left or right or pad_top or pad_bottom:
            x = F.pad(x, (left, right, pad_top, pad_bottom))
        return _patches(x, self.kernel_size, self.stride, self.dilation)[
            :, p0 - r0 * w_out : p1 - r0 * w_out]

    def indices(self, examples: slice | None = None) -> torch.Tensor:
        """Embedding: ``(batch, positions)`` long token ids (row ``idx_s`` gets ``g_s``)."""
        if self.kind != "embedding":
            raise TypeError(f"a {self.kind} call has input patches, not indices")
        ids = self.inputs if examples is None else self.inputs[examples]
        return ids.reshape(ids.shape[0], -1)

    def output_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The probe's gradient as ``(batch, positions, d_out)``.

        Embedding: zero at positions holding ``padding_idx`` (they do not reach the weight's
        gradient); for bags, the bag's gradient at each of its positions (divided by the number
        of non-padding tokens in ``"mean"`` mode), so that ``sum_s onehot(idx_s) g_s^T`` is the
        per-example weight gradient in every case.
        """
        b = grad.shape[0]
        if self.kind == "conv2d":
            return grad.flatten(2).transpose(1, 2)
        if self.kind == "linear":
            return grad.reshape(b, -1, self.d_out)
        ids = self.indices()
        keep = None if self.padding_idx is None else (ids != self.padding_idx)
        if self.bag_mode is None:
            g = grad.reshape(b, -1, self.d_out)
            return g if keep is None else g * keep.unsqueeze(-1).to(g.dtype)
        g = grad.reshape(b, 1, self.d_out).expand(b, ids.shape[1], self.d_out)
        if self.bag_mode == "mean":
            count = (keep.sum(1) if keep is not None else torch.full(
                (b,), ids.shape[1], device=ids.device)).clamp_min(1)
            g = g / count.to(grad.dtype).view(b, 1, 1)
        return g if keep is None else g * keep.unsqueeze(-1).to(g.dtype)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(t) for t in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _bind(names: Sequence[str], defaults: dict[str, Any], args: Sequence[Any],
          kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


_LINEAR = ("input", "weight", "bias"), {"bias": None}

def _patches(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int]) -> torch.Tensor:
    """``F.unfold(x, ...).transpose(1, 2)`` as one contiguous ``(batch, positions, C kh kw)``
    copy: strided windows then a single reshape, where unfold's column layout would need a
    second copy (and ~2x the time) before every row-wise product."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    u = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    u = u[..., ::dh, ::dw]                                      # (B, C, Ho, Wo, kh, kw)
    b, c, ho, wo = u.shape[:4]
    return u.permute(0, 2, 3, 1, 4, 5).reshape(b, ho * wo, c * kh * kw)

_CONV2D = (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
           {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
_EMBEDDING = (("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
               "sparse"),
              {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False})
_EMBEDDING_BAG = (("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq",
                   "mode", "sparse", "per_sample_weights", "include_last_offset",
                   "padding_idx"),
                  {"offsets": None, "max_norm": None, "scale_grad_by_freq": False,
                   "mode": "mean", "per_sample_weights": None, "padding_idx": None})


@dataclass
class _Capture(TorchFunctionMode):
    """Record supported calls whose weight or bias is tracked, and every other use of one.

    ``check`` (the planning pass): run torch's multi-head attention next to the decomposition
    and compare.
    """

    index: dict[int, int]           # id(tensor) -> position among the tracked tensors
    batch: int
    probe: bool
    check: bool = False
    calls: list[LayerCall] = field(default_factory=list)
    other_uses: set[int] = field(default_factory=set)
    reasons: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()

    # ----- bookkeeping --------------------------------------------------------------------
    def _tracked(self, t: Any) -> int | None:
        return self.index.get(id(t)) if _is_tensor(t) else None

    def _mark(self, tensors: Any, reason: str) -> None:
        for leaf in tree_leaves(tensors):
            i = self._tracked(leaf)
            if i is not None:
                self.other_uses.add(i)
                self.reasons.setdefault(i, reason)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(self, func, args, kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        metadata = func in _METADATA or getattr(func, "__name__", "") == "__get__"
        if not (metadata and not any(_is_tensor(t) for t in tree_leaves(out))):
            self._mark((args, kwargs), "used outside linear/conv2d/embedding layers")
        return out

    def _record(self, call: LayerCall, out: torch.Tensor,
                extra: Sequence[Any] = ()) -> torch.Tensor:
        """Append the call (with a probe added to ``out``) and mark tracked ``extra`` args."""
        self._mark(list(extra), "used outside linear/conv2d/embedding layers")
        if self.probe:
            call.probe = torch.zeros_like(out, requires_grad=True)
            out = out + call.probe
        self.calls.append(call)
        return out

    def _batch_first(self, inp: torch.Tensor, out: torch.Tensor, min_dim: int) -> bool:
        return inp.dim() >= min_dim and inp.shape[0] == self.batch and out.dim() >= 1 \
            and out.shape[0] == self.batch

    # ----- the layers ---------------------------------------------------------------------
    def linear(self, inp: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear, captured when its weight or bias is tracked (also used by MHA)."""
        w_idx, b_idx = self._tracked(weight), self._tracked(bias)
        out = F.linear(inp, weight, bias)
        if w_idx is None and b_idx is None:
            self._mark(inp, "used outside linear/conv2d/embedding layers")
            return out
        if weight.dim() != 2:
            self._mark((inp, weight, bias), "a linear layer with a weight that is not 2-D")
            return out
        if self._tracked(inp) is not None or not self._batch_first(inp, out, 2):
            self._mark((inp, weight, bias), "a layer whose input/output is not batch-first")
            return out
        call = LayerCall("linear", w_idx, b_idx, inp.detach(), int(weight.shape[1]),
                         int(weight.shape[0]))
        return self._record(call, out)


def _linear(cap: _Capture, func, args, kwargs):  # noqa: ANN001, ANN202
    a = _bind(*_LINEAR, args, kwargs)
    if set(a) - set(_LINEAR[0]):
        return NotImplemented
    return cap.linear(a["input"], a["weight"], a["bias"])


def _conv_pads(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int],
               stride: tuple[int, int]) -> tuple[int, int, int, int] | None:
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding != "same" or stride != (1, 1):
            return None
        (th, tw) = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = _pair(padding)
    return pw, pw, ph, ph


def _conv2d(cap: _Capture, func, args, kwargs):  # noqa: ANN001, ANN202
    a = _bind(*_CONV2D, args, kwargs)
    inp, weight, bias = a["input"], a["weight"], a["bias"]
    w_idx, b_idx = cap._tracked(weight), cap._tracked(bias)
    if w_idx is None and b_idx is None:
        return NotImplemented
    out = func(*args, **kwargs)
    stride, dilation = _pair(a["stride"]), _pair(a["dilation"])
    kernel = (int(weight.shape[-2]), int(weight.shape[-1])) if weight.dim() == 4 else (1, 1)
    pads = _conv_pads(a["padding"], kernel, dilation, stride)
    if a["groups"] != 1 or weight.dim() != 4 or pads is None:
        cap._mark((args, kwargs), "a grouped convolution" if a["groups"] != 1
                  else "an unsupported convolution")
        return out
    if cap._tracked(inp) is not None or inp.dim() != 4 or not cap._batch_first(inp, out, 4):
        cap._mark((args, kwargs), "a layer whose input/output is not batch-first")
        return out
    call = LayerCall("conv2d", w_idx, b_idx, inp.detach(), int(weight[0].numel()),
                     int(weight.shape[0]), kernel_size=kernel, stride=stride, dilation=dilation,
                     pads=pads, out_hw=(int(out.shape[2]), int(out.shape[3])))
    return cap._record(call, out, [v for k, v in a.items() if k not in ("weight", "bias")])


def _embedding(cap: _Capture, func, args, kwargs):  # noqa: ANN001, ANN202
    bag = func is F.embedding_bag
    a = _bind(*(_EMBEDDING_BAG if bag else _EMBEDDING), args, kwargs)
    inp, weight = a["input"], a["weight"]
    w_idx = cap._tracked(weight)
    if w_idx is None:
        return NotImplemented
    out = func(*args, **kwargs)
    pad = a["padding_idx"]
    if pad is not None and pad < 0:
        pad += int(weight.shape[0])
    unsupported = (a["max_norm"] is not None or a["scale_grad_by_freq"] or weight.dim() != 2
                   or inp.is_floating_point())
    if bag:
        unsupported = unsupported or a["mode"] not in ("sum", "mean") or a["offsets"] is not None \
            or a["per_sample_weights"] is not None or inp.dim() != 2
    if unsupported:
        cap._mark((args, kwargs), "an embedding with max_norm, scale_grad_by_freq, per-sample "
                  "weights, offsets or max pooling")
        return out
    if cap._tracked(inp) is not None or not cap._batch_first(inp, out, 1):
        cap._mark((args, kwargs), "a layer whose input/output is not batch-first")
        return out
    call = LayerCall("embedding", w_idx, None, inp.detach(), int(weight.shape[0]),
                     int(weight.shape[1]), padding_idx=pad,
                     bag_mode=a["mode"] if bag else None)
    return cap._record(call, out, [v for k, v in a.items() if k not in ("weight", "input")])


_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.linear: _linear,
    torch.conv2d: _conv2d,
    F.embedding: _embedding,
    F.embedding_bag: _embedding,
    F.multi_head_attention_forward: _mha,
}


# ----- the passes -------------------------------------------------------------------------
def probe_pass(losses: BatchLosses, params: Sequence[torch.Tensor], index: dict[int, int],
               x: torch.Tensor, y: torch.Tensor) -> list[tuple[LayerCall, torch.Tensor]]:
    """Forward with probes, backward of the summed losses: (call, output gradient) pairs.

    ``index`` maps ``id(tensor)`` to its position among ``params`` for the tensors to capture
    (those :func:`find_layer_tensors` found supported).  The output gradient ``g`` is
    ``(batch, positions, d_out)`` (see :meth:`LayerCall.output_gradient`); examples do not
    interact, so each example's rows are its own.  Calls whose output does not reach the
    losses are left out.
    """
    capture = _Capture(index, batch=len(x), probe=True)
    with capture:
        out = losses(params, x, y)
    calls = [c for c in capture.calls if c.probe is not None]
    if not calls or not out.requires_grad:
        return []
    grads = torch.autograd.grad(out.sum(), [c.probe for c in calls], allow_unused=True)
    return [(c, c.output_gradient(g)) for c, g in zip(calls, grads, strict=True)
            if g is not None]


@dataclass
class LayerPlan:
    """How each tracked tensor is used: ``kinds`` {index: kind} for the supported ones,
    ``other`` the rest (ascending), ``unused`` the subset of ``other`` the forward pass never
    touches (zero gradient), ``reasons`` {index: why it is "other"}."""

    kinds: dict[int, str]
    other: list[int]
    unused: list[int]
    reasons: dict[int, str]
    calls: list[LayerCall] = field(default_factory=list)   # of the planning pass (no probes)

    def flops_per_example(self) -> float:
        """Multiply-adds x 2 per example of the supported tensors' layers (linear/conv2d:
        ``2 positions d_in d_out`` per call; embedding: ``2 positions dim``)."""
        total = 0.0
        for call in self.calls:
            if call.weight is None or call.weight not in self.kinds:
                continue
            width = call.d_out if call.kind == "embedding" else call.d_in * call.d_out
            total += 2.0 * call.positions * width
        return total


def layer_plan(losses: BatchLosses, params: Sequence[torch.Tensor], x: torch.Tensor,
               y: torch.Tensor) -> LayerPlan:
    """:func:`find_layer_tensors` with the reasons (one forward pass on ``x``, no gradients)."""
    capture = _Capture({id(p): i for i, p in enumerate(params)}, batch=len(x), probe=False,
                       check=True)
    with torch.no_grad(), capture:
        losses(params, x, y)
    roles: dict[int, set[tuple[str, str]]] = {}
    widths: dict[int, set[int]] = {}
    for call in capture.calls:
        for idx, role in ((call.weight, "weight"), (call.bias, "bias")):
            if idx is not None:
                roles.setdefault(idx, set()).add((call.kind, role))
        if call.bias is not None:
            widths.setdefault(call.bias, set()).add(call.d_out)
    kinds: dict[int, str] = {}
    other, unused, reasons = [], [], dict(capture.reasons)
    for i, p in enumerate(params):
        used = roles.get(i, set())
        why = None
        if i in capture.other_uses:
            why = reasons.get(i) or "used outside linear/conv2d/embedding layers"
        elif not used:
            why = "not used by the forward pass (zero gradient)"
            unused.append(i)
        elif len(used) > 1:
            why = ("used as both a weight and a bias" if len({r for _, r in used}) > 1
                   else "used by layers of different kinds (e.g. tied embedding/output weights)")
        else:
            ((kind, role),) = used
            if role == "bias" and (p.dim() != 1 or widths.get(i) != {p.numel()}):
                why = "a bias that is not 1-D with one entry per output"
            elif role == "weight":
                try:
                    weight_matrix_shape(kind, p)
                except ValueError:
                    why = f"a {kind} weight of unexpected shape {tuple(p.shape)}"
            if why is None:
                kinds[i] = kind
        if why is not None:
            other.append(i)
            reasons[i] = why
    return LayerPlan(kinds, other, unused, {i: reasons[i] for i in other}, capture.calls)


def find_layer_tensors(losses: BatchLosses, params: Sequence[torch.Tensor], x: torch.Tensor,
                       y: torch.Tensor) -> tuple[dict[int, str], list[int]]:
    """``({tensor index: kind}, other indices)``: the tensors used ONLY as the weight, or only
    as the bias, of supported calls of one kind (batch-first inputs and outputs), and the rest
    (a tensor the forward pass never touches counts as "other")."""
    plan = layer_plan(losses, params, x, y)
    return plan.kinds, plan.other
