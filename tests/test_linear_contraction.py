"""The layerwise scoring pass (linear layers' inputs x output gradients) and its rank-r option.

References are independent of the code under test: per-example gradients from ``vmap(grad)``
dotted with the directions, and for the rank-r option directions truncated here with a full
SVD, in the metric of covariances read off per-example BIAS gradients (a linear layer's bias
gradient is exactly its output gradient).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.scores import (
    Directions,
    InfluenceArguments,
    ScoringError,
    compute_scores,
    per_example_gradients,
    score_pretraining,
)
from engine.task import TwoStageTask
from engine.training import TwoStageFit, fit_two_stage
from tests.conftest import mlp_task

DT = torch.float64


def random_fit(task: TwoStageTask) -> TwoStageFit:
    """Scoring is a streaming identity: any parameters and directions will do."""
    ub, w, t = task.initial_state()
    return TwoStageFit(ub, w, ub.clone(), t)


def random_directions(task: TwoStageTask, k: int = 3, seed: int = 0) -> Directions:
    g = torch.Generator().manual_seed(seed)
    n = task.u_layout.numel + task.w_layout.numel
    return Directions(None, None, torch.randn(n, k, generator=g, dtype=DT),
                      torch.randn(n, k, generator=g, dtype=DT))


def reference(task: TwoStageTask, fit: TwoStageFit, d: Directions) -> torch.Tensor:
    x, y = task.pretrain_data
    r = torch.cat([d.r_pre, d.r_ft], 1) / len(x)
    return (per_example_gradients(task, fit, x, y) @ r).T


def scored(task, fit, d, **kw) -> tuple[torch.Tensor, dict]:
    info: dict = {}
    pre, ft = score_pretraining(task, fit, d, info=info, **kw)
    return torch.cat([pre, ft]), info


# ---- models that exercise each path ----------------------------------------------------------
class Tied(nn.Module):
    """One Linear applied twice (shared weights), a bias-free Linear, and a LayerNorm whose
    elementwise parameters are not linear-layer parameters."""

    def __init__(self, d: int = 4, h: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.shared = nn.Linear(h, h)
        self.nobias = nn.Linear(h, h, bias=False)
        self.norm = nn.LayerNorm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.inp(x))
        z = torch.tanh(self.shared(z))
        z = torch.tanh(self.shared(z))
        return self.norm(torch.tanh(self.nobias(z)))


class Sequence(nn.Module):
    """Inputs (batch, positions, d): linear layers act per position, then mean pooling."""

    def __init__(self, d: int = 3, h: int = 4, fold_batch: bool = False,
                 transpose: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(d, h)
        self.fold_batch, self.transpose = fold_batch, transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_batch:    # (B*S, d): rows are no longer examples
            b, s, _ = x.shape
            z = self.lin(x.reshape(b * s, -1)).reshape(b, s, -1)
        elif self.transpose:   # (S, B, d): dimension 0 is the position, not the example
            z = self.lin(x.transpose(0, 1)).transpose(0, 1)
        else:
            z = self.lin(x)
        return torch.tanh(z).mean(1)


class Reused(nn.Module):
    """A weight used by a linear layer AND elsewhere (a penalty-like term in the forward)."""

    def __init__(self, d: int = 4, h: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) + 0.1 * self.lin.weight.sum(1)


def make_task(backbone: nn.Module, x: torch.Tensor, width: int, seed: int = 0) -> TwoStageTask:
    g = torch.Generator().manual_seed(seed)
    m = len(x)
    torch.manual_seed(seed)
    return TwoStageTask(
        backbone.double(), nn.Linear(width, 3).double(), nn.Linear(width, 2).double(),
        (x, torch.randint(3, (m,), generator=g)),
        (x[:10], torch.randint(2, (10,), generator=g)), pretrain_weight_decay=1e-2)


def x_flat(m: int = 23, d: int = 4) -> torch.Tensor:
    return torch.randn(m, d, generator=torch.Generator().manual_seed(1), dtype=DT)


def x_seq(m: int = 23, s: int = 4, d: int = 3) -> torch.Tensor:
    return torch.randn(m, s, d, generator=torch.Generator().manual_seed(1), dtype=DT)


# ---- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_layerwise_equals_per_example_gradients_on_a_trained_mlp(scenario):
    task, xt, yt = mlp_task(scenario, alpha=0.5)
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    a = compute_scores(task, fit, xt, yt, InfluenceArguments(scoring_method="layerwise",
                                                             batch_size=7))
    b = compute_scores(task, fit, xt, yt, InfluenceArguments(scoring_method="gradients"))
    for name in ("total", "pretrained_term", "finetuned_term"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-14)
    assert a.settings["scoring"]["method"] == "layerwise"
    assert a.settings["approximation"] is None
    # "auto" takes the layerwise path on a plain MLP.
    assert compute_scores(task, fit, xt, yt).settings["scoring"]["method"] == "layerwise"


@pytest.mark.parametrize("backbone, x, width, fallback", [
    (Tied(), x_flat(), 5, 2),                     # shared weights, no bias; LayerNorm falls back
    (Sequence(), x_seq(), 4, 0),                  # several positions per example
    (Sequence(fold_batch=True), x_seq(), 4, 2),   # batch folded into rows: falls back
    (Reused(), x_flat(), 5, 1),                   # weight also used outside F.linear
], ids=["tied", "sequence", "folded", "reused"])
def test_layerwise_is_exact_on_harder_models(backbone, x, width, fallback):
    task = make_task(backbone, x, width)
    fit, d = random_fit(task), random_directions(task)
    got, info = scored(task, fit, d, batch_size=5, method="layerwise")
    torch.testing.assert_close(got, reference(task, fit, d), rtol=1e-10, atol=1e-14)
    assert info["method"] == "layerwise"
    assert info["per_example_gradient_tensors"] == fallback


def test_a_model_that_is_not_batch_first_fails_the_check_and_falls_back(caplog):
    """Positions on dimension 0 with as many positions as the check's examples (4): the shapes
    look batch-first, so only the check against per-example gradients can catch it."""
    task = make_task(Sequence(transpose=True), x_seq(s=4), 4)
    fit, d = random_fit(task), random_directions(task)
    ref = reference(task, fit, d)
    got, info = scored(task, fit, d, batch_size=4, method="auto")
    assert info["method"] == "jvp"
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    with caplog.at_level(logging.WARNING, logger="engine.scores"):
        got, info = scored(task, fit, d, batch_size=4, method="layerwise")
    assert "do not reproduce the per-example gradients" in caplog.text
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    with pytest.raises(ScoringError, match="direction_rank needs"):
        scored(task, fit, d, method="auto", direction_rank=1)


def test_rank_under_auto_keeps_the_other_tensors_exact():
    """A LayerNorm in the backbone: with a rank, "auto" still takes the layerwise path and gives
    the LayerNorm tensors exact per-example gradients."""
    task = make_task(Tied(), x_flat(), 5)
    fit, d = random_fit(task), random_directions(task)
    full, info = scored(task, fit, d, batch_size=5, direction_rank=5)   # no block truncated
    assert info["method"] == "layerwise" and info["per_example_gradient_tensors"] == 2
    torch.testing.assert_close(full, reference(task, fit, d), rtol=1e-10, atol=1e-14)
    low, info = scored(task, fit, d, batch_size=5, direction_rank=1)
    assert info["direction_rank"]["truncated_tensors"] == 4   # inp, shared, nobias, pretrain head
    assert not torch.allclose(low, full)


def test_many_directions_are_chunked_without_changing_scores(monkeypatch):
    import engine.layer_contraction as lc
    task = make_task(Sequence(), x_seq(), 4)
    fit, d = random_fit(task), random_directions(task, k=9)
    whole, _ = scored(task, fit, d, method="layerwise")
    monkeypatch.setattr(lc, "_CHUNK_ELEMENTS", 40)   # a few columns per chunk
    chunked, _ = scored(task, fit, d, method="layerwise")
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-15)


# ---- the rank-r approximation ---------------------------------------------------------------
def weighted_truncation(v: np.ndarray, s_a: np.ndarray, s_g: np.ndarray,
                        rank: int) -> np.ndarray:
    def powers(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lam, e = np.linalg.eigh(s)
        lam = np.maximum(lam, 1e-8 * lam.max())
        return (e * np.sqrt(lam)) @ e.T, (e / np.sqrt(lam)) @ e.T
    sq_a, isq_a = powers(s_a)
    sq_g, isq_g = powers(s_g)
    u, sv, vh = np.linalg.svd(sq_g @ v @ sq_a)
    return isq_g @ (u[:, :rank] * sv[:rank]) @ vh[:rank] @ isq_a


def test_rank_r_scores_match_directions_truncated_independently():
    """A 2-layer MLP (6 -> 7 -> 5 features, 3-way head): rank 2 truncates the two hidden
    weight matrices (2*(6+7) < 42, 2*(7+5) < 35) but not the head (2*(5+3) > 15)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh())
    task = make_task(backbone, x_flat(m=31, d=6), 5)
    fit, d = random_fit(task), random_directions(task, k=2)
    got, info = scored(task, fit, d, batch_size=8, method="layerwise", direction_rank=2)
    assert info["direction_rank"]["truncated_tensors"] == 2
    assert info["direction_rank"]["covariance_examples"] == 31

    # Covariances from the per-example gradients: bias gradient = output gradient; inputs are
    # x and tanh(layer 0) (recomputed here).
    x, y = task.pretrain_data
    m = len(x)
    grads = per_example_gradients(task, fit, x, y).numpy()
    sizes = [s.numel() for s in task.u_layout.shapes + task.w_layout.shapes]
    blocks = np.split(grads, np.cumsum(sizes)[:-1], axis=1)
    params = task.backbone_layout.unflatten(fit.backbone_pre)
    h0 = torch.tanh(x @ params["0.weight"].T + params["0.bias"]).numpy()
    cov = {0: (x.numpy().T @ x.numpy() / m, blocks[1].T @ blocks[1] / m),
           2: (h0.T @ h0 / m, blocks[3].T @ blocks[3] / m)}
    r = (torch.cat([d.r_pre, d.r_ft], 1) / m).numpy()
    r_blocks = np.split(r, np.cumsum(sizes)[:-1], axis=0)
    truncated = []
    for i, (block, shape) in enumerate(zip(r_blocks, task.u_layout.shapes + task.w_layout.shapes,
                                           strict=True)):
        if i in cov:
            cols = [weighted_truncation(block[:, c].reshape(shape), *cov[i], 2).ravel()
                    for c in range(block.shape[1])]
            block = np.stack(cols, 1)
        truncated.append(block)
    expected = (grads @ np.concatenate(truncated)).T
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7,
                               atol=1e-12 * np.abs(expected).max())
    assert np.abs(expected - reference(task, fit, d).numpy()).max() > 1e-6 * np.abs(expected).max()


def test_randomized_truncation_is_deterministic_and_close_to_the_full_svd(monkeypatch):
    """Blocks much larger than the rank use a seeded randomized SVD."""
    import engine.layer_contraction as lc
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(24, 30), nn.Tanh())
    task = make_task(backbone, x_flat(m=60, d=24), 30)
    fit, d = random_fit(task), random_directions(task, k=2)
    a, _ = scored(task, fit, d, method="layerwise", direction_rank=2)
    torch.manual_seed(123)   # the global generator must not matter
    b, _ = scored(task, fit, d, method="layerwise", direction_rank=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    def full_svd(mats: torch.Tensor, rank: int):
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
        return u[:, :, :rank], s[:, :rank], vh[:, :rank, :].transpose(1, 2)

    monkeypatch.setattr(lc, "_top_singular", full_svd)
    c, _ = scored(task, fit, d, method="layerwise", direction_rank=2)
    assert float((a - c).norm() / c.norm()) < 1e-2


def test_rank_at_full_size_is_exact_and_not_labelled():
    task, xt, yt = mlp_task("fixed")
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    exact = compute_scores(task, fit, xt, yt)
    full = compute_scores(task, fit, xt, yt, InfluenceArguments(direction_rank=5))
    torch.testing.assert_close(full.total, exact.total, rtol=1e-10, atol=1e-14)
    assert full.settings["approximation"] is None
    low = compute_scores(task, fit, xt, yt, InfluenceArguments(direction_rank=1))
    assert "rank 1" in low.settings["approximation"]
    assert "approximation" in low.settings["approximation"]
    assert low.settings["scoring"]["direction_rank"]["truncated_tensors"] >= 1


def test_rank_r_error_shrinks_with_the_rank():
    """The weighted truncation converges to the exact scores as the rank grows, and is exact
    from rank 3 on: with 3 pretraining classes the directions' weight blocks have rank 3."""
    task, xt, yt = mlp_task("fixed", m=120, d=12, hidden=10)
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    exact = compute_scores(task, fit, xt, yt).total
    errors = []
    for rank in (1, 2, 3):
        approx = compute_scores(task, fit, xt, yt, InfluenceArguments(direction_rank=rank))
        errors.append(float((approx.total - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > 0.01 and errors[2] < 1e-9


def test_bad_rank_and_method():
    task, xt, yt = mlp_task("fixed")
    fit = random_fit(task)
    d = random_directions(task)
    with pytest.raises(ScoringError, match="positive integer"):
        score_pretraining(task, fit, d, direction_rank=0)
    with pytest.raises(ScoringError, match="direction_rank needs"):
        score_pretraining(task, fit, d, method="jvp", direction_rank=2)
    with pytest.raises(ValueError, match="unknown scoring method"):
        score_pretraining(task, fit, d, method="fast")


def test_config_keys(tmp_path):
    from tests.test_data_config import MINIMAL_DATA, config_error, write_config
    cfg = load_config(write_config(
        tmp_path, MINIMAL_DATA + "[influence]\nscoring_method = 'jvp'\ndirection_rank = 8\n"))
    assert (cfg.influence.scoring_method, cfg.influence.direction_rank) == ("jvp", 8)
    assert load_config(write_config(tmp_path, MINIMAL_DATA)).influence.direction_rank is None
    assert "[influence] direction_rank" in config_error(
        tmp_path, MINIMAL_DATA + "[influence]\ndirection_rank = 0\n")
    assert "[influence] scoring_method" in config_error(
        tmp_path, MINIMAL_DATA + "[influence]\nscoring_method = 'fast'\n")
