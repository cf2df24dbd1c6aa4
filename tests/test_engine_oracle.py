"""Scores against exact refits of a two-stage ridge model (closed form / Newton to round-off)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import grad, hessian

from engine.scores import compute_scores
from engine.training import fit_two_stage
from tests.conftest import ridge_task


def closed_form_pretrain(x: np.ndarray, y: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    """argmin_U (1/M) sum_j c_j ||y_j - U x_j||^2 + lam/2 ||U||^2  (U is h x d)."""
    m, d = x.shape
    lhs = (2 / m) * (x.T * c) @ x + lam * np.eye(d)
    rhs = (2 / m) * (y.T * c) @ x
    return np.linalg.solve(lhs, rhs.T).T


def closed_form_head(f: np.ndarray, s: np.ndarray, mu: float) -> np.ndarray:
    """argmin_T (1/N) sum_i (s_i - T f_i)^2 + mu/2 ||T||^2  (T is 1 x h)."""
    n, h = f.shape
    return np.linalg.solve((2 / n) * f.T @ f + mu * np.eye(h), (2 / n) * f.T @ s)[None, :]


def newton_updated(xf, sf, mu, alpha, u_star, t0, u0):
    """argmin_{T,U} (1/N) sum (s - T U x)^2 + mu/2||T||^2 + alpha/2||U - U*||^2, by Newton."""
    h, d = u0.shape
    ustar = torch.as_tensor(u_star)
    xf_t, sf_t = torch.as_tensor(xf), torch.as_tensor(sf)

    def obj(z):
        t, u = z[:h].reshape(1, h), z[h:].reshape(h, d)
        r = sf_t - (xf_t @ u.T @ t.T).squeeze(1)
        return (r * r).mean() + 0.5 * mu * (t * t).sum() + 0.5 * alpha * ((u - ustar) ** 2).sum()

    z = torch.cat([torch.as_tensor(t0).reshape(-1), torch.as_tensor(u0).reshape(-1)])
    for _ in range(50):
        g = grad(obj)(z)
        if g.norm() < 1e-14:
            break
        z = z - torch.linalg.solve(hessian(obj)(z), g)
    assert grad(obj)(z).norm() < 1e-12
    return z[:h].reshape(1, h).numpy(), z[h:].reshape(h, d).numpy()


def refit(task, c: np.ndarray):
    """Exact (U*, T^, U^) for pretraining weights c (c_j = 0 removes example j)."""
    xp, yp = (a.numpy() for a in task.pretrain_data)
    xf, sf = (a.numpy() for a in task.finetune_data)
    u = closed_form_pretrain(xp, yp, c, task.pretrain_weight_decay)
    t = closed_form_head(xf @ u.T, sf, task.finetune_weight_decay)
    if task.scenario == "fixed":
        return u, t, u
    t2, u2 = newton_updated(xf, sf, task.finetune_weight_decay, task.alpha, u, t, u)
    return u, t2, u2


def loss_at(xt, yt, t, u):
    return ((yt - (xt @ u.T @ t.T).squeeze(1)) ** 2)


@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_scores_match_exact_leave_one_out_refits(scenario):
    task, xt, yt = ridge_task(scenario)
    fit = fit_two_stage(task, tolerance=(1e-12, 1e-12))
    m = task.n_pretrain
    u0, t0, uf0 = refit(task, np.ones(m))
    # The engine's own training reaches the closed-form optimum.
    np.testing.assert_allclose(fit.backbone_pre.numpy(), u0.reshape(-1), atol=1e-9)
    np.testing.assert_allclose(fit.t.numpy(), t0.reshape(-1), atol=1e-9)

    scores = compute_scores(task, fit, xt, yt)
    xt_np, yt_np = xt.numpy(), yt.numpy()
    base = loss_at(xt_np, yt_np, t0, uf0)
    actual = np.zeros((len(xt), m))
    for j in range(m):
        c = np.ones(m)
        c[j] = 0.0   # removal = eps = -1/M: the mean keeps its denominator M
        u, t, uf = refit(task, c)
        actual[:, j] = loss_at(xt_np, yt_np, t, uf) - base
    pred = scores.total.numpy()
    pearson = np.corrcoef(pred.ravel(), actual.ravel())[0, 1]
    sign = np.mean(np.sign(pred) == np.sign(actual))
    assert pearson >= 0.99, pearson
    assert sign >= 0.95, sign


def test_removal_with_smaller_denominator_is_still_close():
    """Dropping the row (mean over M-1) differs from eps=-1/M by O(1/M^2) per pair."""
    task, xt, yt = ridge_task("fixed", m=200)
    fit = fit_two_stage(task, tolerance=(1e-12, 1e-12))
    scores = compute_scores(task, fit, xt, yt).total.numpy()
    xp, yp = (a.numpy() for a in task.pretrain_data)
    xf, sf = (a.numpy() for a in task.finetune_data)
    u0, t0, _ = refit(task, np.ones(200))
    base = loss_at(xt.numpy(), yt.numpy(), t0, u0)
    actual = []
    for j in range(0, 200, 10):
        keep = np.arange(200) != j
        u = closed_form_pretrain(xp[keep], yp[keep], np.ones(199), task.pretrain_weight_decay)
        t = closed_form_head(xf @ u.T, sf, task.finetune_weight_decay)
        actual.append(loss_at(xt.numpy(), yt.numpy(), t, u) - base)
    actual = np.array(actual).T
    assert np.corrcoef(scores[:, ::10].ravel(), actual.ravel())[0, 1] > 0.95


def test_sign_convention_helpful_is_positive():
    """Removing the most helpful example raises the loss; the most harmful lowers it."""
    task, xt, yt = ridge_task("fixed")
    fit = fit_two_stage(task, tolerance=(1e-12, 1e-12))
    s = compute_scores(task, fit, xt[:1], yt[:1]).total.numpy()[0]
    u0, t0, _ = refit(task, np.ones(task.n_pretrain))
    base = loss_at(xt[:1].numpy(), yt[:1].numpy(), t0, u0)[0]
    for j, expect in ((int(np.argmax(s)), 1.0), (int(np.argmin(s)), -1.0)):
        c = np.ones(task.n_pretrain)
        c[j] = 0
        u, t, _ = refit(task, c)
        change = loss_at(xt[:1].numpy(), yt[:1].numpy(), t, u)[0] - base
        assert np.sign(change) == expect
        assert np.sign(s[j]) == expect
