"""The engine's derivative d g_t / d eps against central finite differences of real retrains.

Upweighting pretraining example j by eps is the sample weight 1 + M*eps; the engine's score is
-(1/M) d g/d eps, so d g/d eps = -M * score.  The pretrained-model term is the path through the
finetuned model's backbone (head held at its trained value); the finetuned-model term is the path
through the refitted head (backbone held).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.scores import compute_scores
from engine.training import fit_two_stage
from tests.conftest import mlp_task

EPS = 1e-3
TOL = (1e-11, 1e-11)


def central_differences(task, fit, j, xt, yt):
    m = task.n_pretrain
    fits = {}
    for sign in (1, -1):
        w = torch.ones(m, dtype=torch.float64)
        w[j] += sign * m * EPS
        fits[sign] = fit_two_stage(task, tolerance=TOL, sample_weights=w, warm_start=fit,
                                   max_iter=(5000, 5000))
        assert fits[sign].pretrain.converged and fits[sign].finetune.converged

    def g(t, ub):
        return task.measure(t, ub, xt, yt).detach().numpy()

    p, q = fits[1], fits[-1]
    total = (g(p.t, p.backbone_ft) - g(q.t, q.backbone_ft)) / (2 * EPS)
    through_backbone = (g(fit.t, p.backbone_ft) - g(fit.t, q.backbone_ft)) / (2 * EPS)
    through_head = (g(p.t, fit.backbone_ft) - g(q.t, fit.backbone_ft)) / (2 * EPS)
    return total, through_backbone, through_head


@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_terms_match_finite_differences(scenario):
    task, xt, yt = mlp_task(scenario, alpha=0.5)
    fit = fit_two_stage(task, tolerance=TOL, max_iter=(5000, 5000))
    assert fit.pretrain.converged and fit.finetune.converged
    sc = compute_scores(task, fit, xt, yt)
    m = task.n_pretrain
    # The examples with the largest influence on the test points (well above FD noise).
    for j in np.argsort(-np.abs(sc.total.numpy()).sum(0))[:2]:
        total, backbone, head = central_differences(task, fit, int(j), xt, yt)
        for fd, engine_term in ((total, sc.total), (backbone, sc.pretrained_term),
                                (head, sc.finetuned_term)):
            predicted = -m * engine_term[:, j].numpy()
            scale = np.abs(predicted).max()
            np.testing.assert_allclose(fd, predicted, rtol=0.03, atol=0.03 * scale)


def test_tracked_subset_is_labelled_as_approximation():
    task, xt, yt = mlp_task("fixed", tracked=["0.weight"])
    fit = fit_two_stage(task, tolerance=TOL)
    sc = compute_scores(task, fit, xt, yt)
    assert sc.settings["approximation"] and "0.weight" in sc.settings["approximation"]
    assert sc.settings["tracked_backbone"] == ["0.weight"]
    full = compute_scores(mlp_task("fixed")[0], fit, xt, yt)
    assert full.settings["approximation"] is None
    # Tracking most of the backbone keeps the ranking close to the full computation.
    corr = np.corrcoef(sc.total.numpy().ravel(), full.total.numpy().ravel())[0, 1]
    assert corr > 0.5
