"""The layerwise scoring pass on conv2d, embedding and multi-head attention layers.

References are independent of the code under test: per-example gradients from ``vmap(grad)``
dotted with the directions (``tests/test_linear_contraction.py``'s ``reference``), or the
``"gradients"`` scoring method.  All in float64, to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from torch.func import functional_call

import engine.attention_capture as attention_capture
from engine.layer_capture import (
    find_layer_tensors,
    layer_plan,
    probe_pass,
    weight_matrix_shape,
)
from tests.test_linear_contraction import (
    DT,
    make_task,
    random_directions,
    random_fit,
    reference,
    scored,
)


def images(m: int = 11, c: int = 2, h: int = 7, w: int = 6) -> torch.Tensor:
    return torch.randn(m, c, h, w, generator=torch.Generator().manual_seed(1), dtype=DT)


def tokens(m: int = 12, s: int = 5, vocab: int = 8) -> torch.Tensor:
    ids = torch.randint(vocab, (m, s), generator=torch.Generator().manual_seed(1))
    ids[0] = 3            # one token repeated over a whole example
    ids[1, :3] = 1        # padding (padding_idx=1) at the start
    ids[2, -2:] = vocab - 1   # padding (padding_idx=-1) at the end
    return ids


def exact(task, k: int = 3, **kw) -> tuple[torch.Tensor, dict]:
    """Layerwise scores, asserting that they equal vmap(grad) per-example gradients."""
    fit, d = random_fit(task), random_directions(task, k=k)
    got, info = scored(task, fit, d, batch_size=kw.pop("batch_size", 4), method="layerwise",
                       **kw)
    torch.testing.assert_close(got, reference(task, fit, d), rtol=1e-10, atol=1e-14)
    assert info["method"] == "layerwise"
    return got, info


# ---- conv2d -------------------------------------------------------------------------------
class Convs(nn.Module):
    """Stride, padding, dilation, 'same' padding with an even kernel, reflect padding, a conv
    without bias applied twice, and a conv whose single output position takes the direct
    (per-position) association; an optional grouped conv."""

    def __init__(self, grouped: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 3, (2, 3), padding="same", dilation=(2, 1), bias=False)
        self.c3 = nn.Conv2d(3, 4, 3, padding=(2, 2), dilation=2, stride=(1, 2))
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(4, 4, 1, groups=2) if grouped else None
        self.whole = nn.Conv2d(4, 5, (4, 2))   # 4x2 input map -> one position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.c1(x))                    # (B, 3, 4, 3)
        z = torch.tanh(self.c2(torch.tanh(self.c2(z))))
        z = torch.tanh(self.c3(z))                    # (B, 4, 4, 2)
        z = torch.tanh(self.reflect(z))
        if self.grouped is not None:
            z = torch.tanh(self.grouped(z))
        return torch.tanh(self.whole(z)).flatten(1)   # (B, 5)


def test_conv2d_layerwise_equals_per_example_gradients():
    task = make_task(Convs(), images(), 5)
    _, info = exact(task)
    assert info["per_example_gradient_tensors"] == 0
    assert info["layerwise_tensors"] == {"conv2d": 9, "linear": 2}


def test_conv2d_with_one_column_pair_takes_the_direct_association():
    """K = 1 (2 columns): 2 * positions > positions + 2 only from 3 positions on, so c1..c3
    use per-example gradients and the one-position conv the per-position product."""
    exact(make_task(Convs(), images(), 5), k=1)


def test_grouped_conv_counts_as_other_and_falls_back():
    task = make_task(Convs(grouped=True), images(), 5)
    _, info = exact(task)
    assert info["per_example_gradient_tensors"] == 2
    assert set(info["per_example_gradient_names"]) == {"grouped.weight", "grouped.bias"}
    assert "grouped" in info["per_example_gradient_names"]["grouped.weight"]


def test_input_patches_are_unfold_and_rebuild_the_weight_gradient():
    """The interface the EK-FAC factors use: patches (batch, positions, C_in kh kw), g
    (batch, positions, C_out), per-example gradient sum_s g_s^T a_s (and blocks of them)."""
    task = make_task(Convs(), images(), 5)
    fit = random_fit(task)
    from engine.scores import _PretrainLosses
    losses = _PretrainLosses(task, fit)
    x, y = task.pretrain_data
    kinds, other = find_layer_tensors(losses, losses.params, x, y)
    assert other == [] and kinds[0] == "conv2d"
    index = {id(losses.params[i]): i for i in kinds}
    grads = losses.gradient_blocks(x, y)
    rebuilt: dict[int, torch.Tensor] = {}
    for call, g in probe_pass(losses, losses.params, index, x, y):
        a = call.input_patches()
        assert a.shape == (len(x), call.positions, call.d_in)
        assert g.shape == (len(x), call.positions, call.d_out)
        if call.weight == 0:   # c1: stride 2, padding 1 -> plain F.unfold
            torch.testing.assert_close(a, F.unfold(x, 3, padding=1, stride=2).transpose(1, 2))
        # Any block of examples x positions is the same block of the whole.
        torch.testing.assert_close(call.input_patches(slice(2, 5), slice(1, 4)), a[2:5, 1:4])
        w = call.weight
        rebuilt[w] = rebuilt.get(w, 0) + g.transpose(1, 2) @ a
    for w, grad in rebuilt.items():
        shape = weight_matrix_shape(kinds[w], losses.params[w])
        torch.testing.assert_close(grad, grads[w].reshape(len(x), *shape), rtol=1e-10,
                                   atol=1e-14)


# ---- embedding ----------------------------------------------------------------------------
class Embeddings(nn.Module):
    """Two embeddings (padding_idx 1 and -1) on the same ids, EmbeddingBag (mean with padding,
    and sum), and one embedding of a single token per example (1-D ids)."""

    def __init__(self, vocab: int = 8, dim: int = 3) -> None:
        super().__init__()
        self.e = nn.Embedding(vocab, dim, padding_idx=1)
        self.e_last = nn.Embedding(vocab, dim, padding_idx=-1)
        self.bag_mean = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=1)
        self.bag_sum = nn.EmbeddingBag(vocab, dim, mode="sum")
        self.first = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.lin(torch.tanh(self.e(ids) + self.e_last(ids)))).mean(1)
        return z + torch.tanh(self.bag_mean(ids) * self.bag_sum(ids) + self.first(ids[:, 0]))


def test_embedding_layerwise_equals_per_example_gradients():
    task = make_task(Embeddings(), tokens(), 3)
    _, info = exact(task)
    assert info["layerwise_tensors"] == {"embedding": 5, "linear": 4}
    assert info["per_example_gradient_tensors"] == 0


def test_embedding_output_gradient_is_zero_at_padding():
    task = make_task(Embeddings(), tokens(), 3)
    from engine.scores import _PretrainLosses
    losses = _PretrainLosses(task, random_fit(task))
    x, y = task.pretrain_data
    kinds, _ = find_layer_tensors(losses, losses.params, x, y)
    index = {id(losses.params[i]): i for i in kinds}
    calls = [(c, g) for c, g in probe_pass(losses, losses.params, index, x, y)
             if c.kind == "embedding"]
    assert len(calls) == 5
    for call, g in calls:
        ids = call.indices()
        assert ids.dtype == torch.long and g.shape == (*ids.shape, 3)
        if call.padding_idx is not None:
            assert (g[ids == call.padding_idx] == 0).all()
            assert (g[ids != call.padding_idx] != 0).any()


def test_tied_embedding_and_output_weights_count_as_other():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(6, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.e(ids)).mean(1)
            return torch.tanh(F.linear(h, self.e.weight))   # (B, 6)

    task = make_task(Tied(), tokens(vocab=6), 6)
    _, info = exact(task)
    assert "different kinds" in info["per_example_gradient_names"]["e.weight"]


# ---- a model of every kind, chunking ---------------------------------------------------------
class Mixed(nn.Module):
    """Conv2d on an image, Embedding of ids read off the same input, Linear, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.emb = nn.Embedding(5, 3, padding_idx=0)
        self.norm = nn.LayerNorm(3)
        self.lin = nn.Linear(3, 4)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, 0, 0, :] * 2).floor().long().clamp(0, 4)       # (B, 5) token ids
        z = torch.tanh(self.conv(x)).mean((2, 3)) + self.emb(ids).mean(1)
        return torch.tanh(self.lin(self.norm(z)))


def mixed_task() -> tuple:
    task = make_task(Mixed(), images(m=11, c=1, h=4, w=5), 4)
    return task, random_fit(task), random_directions(task)


def test_mixed_model_layerwise_equals_gradients_and_unused_tensors_cost_nothing():
    task, fit, d = mixed_task()
    got, info = scored(task, fit, d, batch_size=4, method="layerwise")
    ref, _ = scored(task, fit, d, batch_size=4, method="gradients")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    # LayerNorm gets per-example gradients; the unused Linear contributes zero without them.
    assert info["per_example_gradient_tensors"] == 2
    assert set(info["per_example_gradient_names"]) == {"norm.weight", "norm.bias"}
    assert info["layerwise_tensors"] == {"conv2d": 2, "embedding": 1, "linear": 4}


def test_a_tiny_memory_budget_chunks_everything_without_changing_scores():
    task, fit, d = mixed_task()
    whole, _ = scored(task, fit, d, batch_size=6, method="layerwise")
    chunked, _ = scored(task, fit, d, batch_size=6, method="layerwise", memory_budget=64)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-15)
    conv = make_task(Convs(), images(), 5)
    fit, d = random_fit(conv), random_directions(conv, k=2)
    for k in (1, 2):   # direct and per-example associations, chunked to single elements
        d = random_directions(conv, k=k)
        whole, _ = scored(conv, fit, d, batch_size=7, method="layerwise")
        chunked, _ = scored(conv, fit, d, batch_size=7, method="layerwise", memory_budget=32)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="memory_budget"):
        scored(conv, fit, d, method="layerwise", memory_budget=0)


# ---- multi-head attention -------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, batch_first: bool = True, need_weights: bool = False,
                 masks: bool = False, kdim: int | None = None, cross: bool = False) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(6, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.kv = nn.Linear(6, kdim or 6) if (kdim or cross) else None
        self.batch_first, self.need_weights, self.masks = batch_first, need_weights, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x if self.batch_first else x.transpose(0, 1)
        kv = q if self.kv is None else self.kv(q)
        s = x.shape[1]
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1) if self.masks else None
        kpm = None
        if self.masks:
            kpm = torch.zeros(x.shape[0], s)
            kpm[:, -1] = float("-inf")
        o, w = self.att(q, kv, kv, need_weights=self.need_weights, attn_mask=mask,
                        key_padding_mask=kpm)
        o = o if self.batch_first else o.transpose(0, 1)
        extra = 0.0 if w is None else w.reshape(len(x), -1)[:, :6]
        return torch.tanh(o).mean(1) + extra


def seq(m: int = 10, s: int = 4) -> torch.Tensor:
    return torch.randn(m, s, 6, generator=torch.Generator().manual_seed(1), dtype=DT)


@pytest.mark.parametrize("kw", [{}, {"batch_first": False}, {"need_weights": True},
                                {"masks": True}, {"masks": True, "need_weights": True}],
                         ids=["self", "seq-first", "weights", "masks", "masks-weights"])
def test_self_attention_projections_are_layerwise(kw):
    task = make_task(Attention(**kw), seq(), 6)
    _, info = exact(task)
    assert info["per_example_gradient_tensors"] == 0
    assert info["layerwise_tensors"] == {"linear": 6}


def test_attention_tensors_used_in_slices_are_other():
    """Cross-attention slices the packed in-projection; separate q/k/v weights slice the packed
    bias.  Those get per-example gradients; the rest stays layerwise."""
    _, info = exact(make_task(Attention(cross=True), seq(), 6))
    assert set(info["per_example_gradient_names"]) == {"att.in_proj_weight", "att.in_proj_bias"}
    _, info = exact(make_task(Attention(kdim=4), seq(), 6))
    assert set(info["per_example_gradient_names"]) == {"att.in_proj_bias"}
    assert info["layerwise_tensors"] == {"linear": 9}   # q, k, v, out (2), kv (2), head (2)


def test_attention_decomposition_that_disagrees_with_torch_is_not_trusted(monkeypatch):
    original = attention_capture._mha_decomposed

    def wrong(cap, a):   # noqa: ANN001, ANN202
        out, weights = original(cap, a)
        return 1.01 * out, weights

    monkeypatch.setattr(attention_capture, "_mha_decomposed", wrong)
    task = make_task(Attention(), seq(), 6)
    _, info = exact(task)
    assert info["per_example_gradient_tensors"] == 4
    assert "does not reproduce" in info["per_example_gradient_names"]["att.out_proj.weight"]


def test_transformer_encoder_layer():
    layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
    task = make_task(nn.Sequential(layer, nn.Flatten(), nn.Tanh()), seq(s=3), 18)
    _, info = exact(task)
    names = set(info["per_example_gradient_names"])
    assert names == {"0.norm1.weight", "0.norm1.bias", "0.norm2.weight", "0.norm2.bias"}
    assert info["layerwise_tensors"] == {"linear": 10}


def test_find_layer_tensors_interface():
    model = Mixed().double()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def losses(ps, x, y):  # noqa: ANN001, ANN202
        return functional_call(model, dict(zip(names, ps, strict=True)), (x,)).sum(1)

    x = images(m=3, c=1, h=4, w=5)
    kinds, other = find_layer_tensors(losses, params, x, torch.zeros(3))
    assert {names[i]: k for i, k in kinds.items()} == {
        "conv.weight": "conv2d", "conv.bias": "conv2d", "emb.weight": "embedding",
        "lin.weight": "linear", "lin.bias": "linear"}
    assert [names[i] for i in other] == ["norm.weight", "norm.bias", "unused.weight",
                                         "unused.bias"]
    plan = layer_plan(losses, params, x, torch.zeros(3))
    assert [names[i] for i in plan.unused] == ["unused.weight", "unused.bias"]
    assert weight_matrix_shape("conv2d", model.conv.weight) == (3, 9)
    assert weight_matrix_shape("embedding", model.emb.weight) == (5, 3)
    assert weight_matrix_shape("linear", model.lin.weight) == (4, 3)


# ---- "auto" ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone, x, width, budget, method", [
    (Convs(), images(), 5, None, "layerwise"),             # every tensor layerwise
    (Embeddings(), tokens(), 3, None, "layerwise"),
    (Convs(grouped=True), images(), 5, None, "gradients"),  # position-heavy + other tensors
    (Convs(grouped=True), images(), 5, 1000, "layerwise"),  # ... whose gradients do not fit
    (nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)), torch.randn(11, 6, dtype=DT), 6, None,
     "layerwise"),                                          # vector MLP + other tensors
], ids=["conv", "embedding", "conv+other", "conv+other-budget", "mlp+other"])
def test_auto_picks_by_layer_types_and_says_why(backbone, x, width, budget, method):
    task = make_task(backbone, x, width)
    fit, d = random_fit(task), random_directions(task)
    kw = {} if budget is None else {"memory_budget": budget}
    got, info = scored(task, fit, d, batch_size=4, **kw)
    assert info["method"] == method and info["requested_method"] == "auto"
    heavy_with_other = isinstance(backbone, Convs) and backbone.grouped is not None
    assert ("is position-heavy" in info["why"]) == heavy_with_other
    torch.testing.assert_close(got, reference(task, fit, d), rtol=1e-10, atol=1e-14)
