"""Structural properties of the scores and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.curvature import CGSolver, NonFiniteCurvatureError
from engine.scores import (
    InfluenceArguments,
    ScoringError,
    compute_scores,
    influence_directions,
    per_example_gradients,
    score_pretraining,
)
from engine.task import TaskError, TwoStageTask
from engine.training import TrainingError, fit_two_stage
from tests.conftest import mlp_task

TOL = (1e-10, 1e-10)


@pytest.fixture(scope="module", params=["fixed", "updated"])
def fitted(request):
    task, xt, yt = mlp_task(request.param, alpha=0.5)
    return task, fit_two_stage(task, tolerance=TOL), xt, yt


def test_total_is_sum_of_terms_and_of_one_combined_solve(fitted):
    task, fit, xt, yt = fitted
    sc = compute_scores(task, fit, xt, yt)
    torch.testing.assert_close(sc.total, sc.pretrained_term + sc.finetuned_term,
                               rtol=0, atol=1e-10)
    # Independently: one solve with s = s_pre + s_ft gives the same totals.
    d = influence_directions(task, fit, xt, yt, InfluenceArguments())
    from engine.curvature import ExactSolver, pretrain_hessian
    h = pretrain_hessian(task, fit)
    s = d.s_pre + d.s_ft
    r = ExactSolver().solve(h, torch.cat([s, torch.zeros(task.w_layout.numel, s.shape[1],
                                                          dtype=s.dtype)]))
    x, y = task.pretrain_data
    combined = (per_example_gradients(task, fit, x, y) @ r / len(x)).T
    torch.testing.assert_close(sc.total, combined, rtol=0, atol=1e-10)
    assert sc.pretrained_term.abs().max() > 0 and sc.finetuned_term.abs().max() > 0


def test_independent_of_batch_size_and_example_order(fitted):
    task, fit, xt, yt = fitted
    ref = compute_scores(task, fit, xt, yt, InfluenceArguments(batch_size=512))
    small = compute_scores(task, fit, xt, yt, InfluenceArguments(batch_size=7,
                                                                 curvature_batch_size=9))
    torch.testing.assert_close(small.total, ref.total, rtol=1e-9, atol=1e-12)
    perm = torch.randperm(task.n_pretrain, generator=torch.Generator().manual_seed(0))
    x, y = task.pretrain_data
    original = task.pretrain_data
    task.pretrain_data = (x[perm], y[perm])
    try:
        shuffled = compute_scores(task, fit, xt, yt)
    finally:
        task.pretrain_data = original
    torch.testing.assert_close(shuffled.total, ref.total[:, perm], rtol=1e-9, atol=1e-12)


def test_cg_scores_match_exact_scores(fitted):
    task, fit, xt, yt = fitted
    exact = compute_scores(task, fit, xt, yt)
    cg = compute_scores(task, fit, xt, yt, InfluenceArguments(
        pretrain_solver=CGSolver(rtol=1e-12), finetune_solver=CGSolver(rtol=1e-12)))
    rel = ((cg.total - exact.total).norm() / exact.total.norm()).item()
    assert rel < 1e-6


def test_updated_scores_approach_fixed_as_alpha_grows():
    task, xt, yt = mlp_task("fixed")
    fixed = compute_scores(task, fit_two_stage(task, tolerance=TOL), xt, yt).total
    gaps = []
    for alpha in (0.1, 1.0, 10.0, 100.0, 1e4):
        up, _, _ = mlp_task("updated", alpha=alpha)
        fit = fit_two_stage(up, tolerance=TOL)
        s = compute_scores(up, fit, xt, yt).total
        gaps.append(((s - fixed).norm() / fixed.norm()).item())
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 1e-2, gaps


def test_updated_scores_vanish_as_alpha_goes_to_zero():
    task, xt, yt = mlp_task("fixed")
    fixed = compute_scores(task, fit_two_stage(task, tolerance=TOL), xt, yt).total
    up, _, _ = mlp_task("updated", alpha=1e-4)
    s = compute_scores(up, fit_two_stage(up, tolerance=TOL), xt, yt).total
    assert (s.norm() / fixed.norm()).item() < 0.05


# ---- bad input ---------------------------------------------------------------------------

def _data(n=10, d=4, classes=3):
    return torch.randn(n, d, dtype=torch.float64), torch.randint(classes, (n,))


def _mods(d=4, h=5, wrong_head=False):
    head_in = h + 1 if wrong_head else h
    return (nn.Sequential(nn.Linear(d, h), nn.Tanh()).double(), nn.Linear(h, 3).double(),
            nn.Linear(head_in, 2).double())


def test_shape_mismatch_between_backbone_and_head_is_explained():
    b, p, f = _mods(wrong_head=True)
    with pytest.raises(TaskError, match="finetune_head does not fit the backbone output"):
        TwoStageTask(b, p, f, _data(), _data(classes=2))


def test_inputs_of_wrong_width_are_explained():
    b, p, f = _mods()
    with pytest.raises(TaskError, match="backbone cannot take the pretraining inputs"):
        TwoStageTask(b, p, f, _data(d=7), _data(classes=2))


def test_empty_datasets_are_rejected():
    b, p, f = _mods()
    empty = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TaskError, match="pretrain_data is empty"):
        TwoStageTask(b, p, f, empty, _data(classes=2))
    with pytest.raises(TaskError, match="finetune_data is empty"):
        TwoStageTask(b, p, f, _data(), empty)


def test_nan_loss_is_reported_during_training():
    b, p, f = _mods()
    x, y = _data()
    x[3, 1] = float("nan")
    task = TwoStageTask(b, p, f, (x, y), _data(classes=2))
    with pytest.raises(TrainingError, match="NaN or infinite"):
        fit_two_stage(task)


def test_nan_at_scoring_time_is_reported():
    """Trained parameters brought in from elsewhere, data with a NaN: the curvature says so, and
    the scoring pass names the example."""
    task, xt, yt = mlp_task("fixed")
    fit = fit_two_stage(task, tolerance=TOL)
    directions = influence_directions(task, fit, xt, yt, InfluenceArguments())
    x, y = task.pretrain_data
    x = x.clone()
    x[5, 0] = float("nan")
    task.pretrain_data = (x, y)
    with pytest.raises(NonFiniteCurvatureError, match="NaN or infinite"):
        compute_scores(task, fit, xt, yt)
    for method in ("layerwise", "jvp", "gradients"):
        with pytest.raises(ScoringError, match="non-finite.*pretraining example #5"):
            score_pretraining(task, fit, directions, batch_size=4, method=method)


def test_mismatched_test_inputs_and_targets():
    task, xt, yt = mlp_task("fixed")
    fit = fit_two_stage(task, tolerance=TOL)
    with pytest.raises(ScoringError, match="3 test inputs but 4 test targets"):
        compute_scores(task, fit, xt[:3], yt)
    with pytest.raises(ScoringError, match="no test points"):
        compute_scores(task, fit, xt[:0], yt[:0])


def test_bad_settings():
    b, p, f = _mods()
    with pytest.raises(TaskError, match="alpha must be > 0"):
        TwoStageTask(b, p, f, _data(), _data(classes=2), scenario="updated", alpha=0.0)
    with pytest.raises(TaskError, match="scenario"):
        TwoStageTask(b, p, f, _data(), _data(classes=2), scenario="frozen")
    with pytest.raises(ValueError, match="unknown parameter names"):
        TwoStageTask(b, p, f, _data(), _data(classes=2), tracked_backbone=["nope"])


def test_jvp_and_gradient_scoring_agree(fitted):
    """The two scoring passes (forward-mode directional derivatives, per-example gradients)."""
    task, fit, xt, yt = fitted
    a = compute_scores(task, fit, xt, yt, InfluenceArguments(scoring_method="jvp"))
    b = compute_scores(task, fit, xt, yt, InfluenceArguments(scoring_method="gradients",
                                                             batch_size=9))
    torch.testing.assert_close(a.total, b.total, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(a.finetuned_term, b.finetuned_term, rtol=1e-10, atol=1e-13)
