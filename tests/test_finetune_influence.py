"""Finetuning-example influence (engine.finetune_influence) against finetuning-only refits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import functional_call, grad, hessian, vmap

from engine import artifacts
from engine.curvature import CGSolver
from engine.finetune_influence import (
    FINETUNE_SCORES_FILE,
    FINETUNE_TABLE,
    finetune_influence,
    load_finetune_artifacts,
    write_finetune_artifacts,
)
from engine.scores import InfluenceArguments, ScoringError
from engine.training import fit_two_stage
from engine.validation.finetune_check import (
    FinetuneCheckSettings,
    check_finetune_influence,
    refit_finetuning,
    weighted_finetune_objective,
)
from engine.validation.stats import _agreement
from tests.conftest import mlp_task, ridge_task

TOL = 1e-12


def _setup(make, scenario: str, **kw):
    task, xt, yt = make(scenario, **kw)
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    ref, _ = refit_finetuning(task, fit, tolerance=TOL)
    return task, xt, yt, ref


def _refit(task, ref, weights):
    new, _ = refit_finetuning(task, ref, weights, tolerance=TOL, hint=ref.finetune.curvature)
    assert new.finetune.final_grad_norm <= TOL
    return new


def _g(task, fit, xt, yt) -> np.ndarray:
    with torch.no_grad():
        return task.measure(fit.t, fit.backbone_ft, xt, yt).numpy()


def _weights(task, values: dict[int, float]) -> torch.Tensor:
    w = torch.ones(len(task.finetune_data[0]), dtype=task.dtype)
    for i, v in values.items():
        w[i] = v
    return w


# ----- (a) leave-one-out: exact refits of the finetuning stage ---------------------------------
@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_scores_match_leave_one_out_refits_of_the_finetuning_stage(scenario):
    n = 100
    task, xt, yt, ref = _setup(ridge_task, scenario, n=n)
    scores = finetune_influence(task, ref, xt, yt).numpy()
    assert scores.shape == (len(xt), n)
    g0 = _g(task, ref, xt, yt)
    actual = np.stack([_g(task, _refit(task, ref, _weights(task, {i: 0.0})), xt, yt) - g0
                       for i in range(n)], 1)
    a = _agreement(scores.ravel(), actual.ravel())
    # Measured: Pearson 0.9987 / 0.9983, slope 1.067 / 1.093 (fixed / updated), sign 100%.
    assert a["pearson"] > 0.99
    assert 0.95 < a["slope_actual_on_predicted"] < 1.15
    assert a["sign_agreement"] > 0.97


def test_fixed_ridge_refit_is_the_closed_form_weighted_ridge():
    """The ground truth itself: the engine's finetuning-only refit reaches the closed form."""
    task, xt, yt, ref = _setup(ridge_task, "fixed", n=40)
    f = task.features(ref.backbone_pre, task.finetune_data[0]).detach().numpy()
    s = task.finetune_data[1].numpy()
    n, h = f.shape
    for i in (0, 7):
        c = np.ones(n)
        c[i] = 0.0
        lhs = (2 / n) * (f.T * c) @ f + task.finetune_weight_decay * np.eye(h)
        t_exact = np.linalg.solve(lhs, (2 / n) * (f.T * c) @ s)
        new = _refit(task, ref, _weights(task, {i: 0.0}))
        np.testing.assert_allclose(new.t.numpy(), t_exact, atol=1e-10)
        np.testing.assert_array_equal(new.backbone_ft.numpy(), ref.backbone_pre.numpy())


@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_check_on_a_small_mlp_meets_the_target(scenario):
    task, xt, yt = mlp_task(scenario, n=80)
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    pairs, summary = check_finetune_influence(
        task, fit, xt, yt, FinetuneCheckSettings(test_points=range(len(xt)), per_point=8))
    d = summary["designated_pairs"]
    # Measured: Pearson 0.997 / 0.997, slope ~1.2 (first order underestimates the largest
    # removals of an 80-example stage), every sign right.
    assert d["n_pairs"] == len(xt) * 16
    assert d["pearson"] > 0.98 and d["sign_agreement"] >= 0.97
    assert 0.9 < d["slope_actual_on_predicted"] < 1.4
    assert summary["convergence"]["n_unconverged"] == 0
    assert set(pairs["role"]) <= {"top", "random", "other"}
    json.dumps(summary)   # JSON-safe


# ----- (b) finite differences: d g / d eps = -N * score ----------------------------------------
@pytest.mark.parametrize("scenario", ["fixed", "updated"])
@pytest.mark.parametrize("measurement", ["loss", "margin", "log_prob"])
def test_upweighting_derivative_is_minus_n_times_the_score(scenario, measurement):
    task, xt, yt = mlp_task(scenario, n=30)
    task.measurement = measurement
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    ref, _ = refit_finetuning(task, fit, tolerance=TOL)
    n = len(task.finetune_data[0])
    scores = finetune_influence(task, ref, xt, yt).numpy()
    eps = 1e-4
    for i in np.argsort(-np.abs(scores).sum(0))[:2]:
        up = _g(task, _refit(task, ref, _weights(task, {int(i): 1 + n * eps})), xt, yt)
        down = _g(task, _refit(task, ref, _weights(task, {int(i): 1 - n * eps})), xt, yt)
        np.testing.assert_allclose((up - down) / (2 * eps), -n * scores[:, i], rtol=2e-3,
                                   atol=1e-6)


# ----- (c) sign: removing the most harmful examples lowers the test loss -----------------------
@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_removing_the_most_harmful_lowers_and_the_most_helpful_raises_the_loss(scenario):
    task, xt, yt, ref = _setup(mlp_task, scenario, n=30)
    scores = finetune_influence(task, ref, xt, yt).numpy()
    g0 = _g(task, ref, xt, yt)
    checked = 0
    for t in range(len(xt)):
        order = np.argsort(scores[t])
        harmful = order[:3][scores[t, order[:3]] < 0]
        helpful = order[-3:][scores[t, order[-3:]] > 0]
        if not (len(harmful) and len(helpful)):
            continue
        checked += 1
        lower = _g(task, _refit(task, ref, _weights(task, dict.fromkeys(harmful.tolist(), 0.0))),
                   xt, yt)
        higher = _g(task, _refit(task, ref, _weights(task, dict.fromkeys(helpful.tolist(), 0.0))),
                    xt, yt)
        assert lower[t] < g0[t] < higher[t]
    assert checked >= len(xt) - 1


# ----- the formula, solvers, solve sides -------------------------------------------------------
def _dense_formula(task, fit, xt, yt, damping: float) -> np.ndarray:
    """(1/N) grad g^T (A + damping I)^{-1} grad l_i from torch.func Hessians (an oracle)."""
    n, nt = len(task.finetune_data[0]), task.t_layout.numel
    x, y = task.finetune_data
    point = fit.t if task.scenario == "fixed" else torch.cat([fit.t, fit.backbone_ft])
    a = hessian(weighted_finetune_objective(task, fit.backbone_pre))(point)
    a = a + damping * torch.eye(len(point), dtype=a.dtype)

    def split(p):
        return (p, fit.backbone_ft) if task.scenario == "fixed" else (p[:nt], p[nt:])

    def loss_i(p, xi, yi):
        t, ub = split(p)
        return task.finetune_loss(task.finetune_outputs(t, ub, xi[None]), yi[None]).sum()

    def g_t(p, xi, yi):
        t, ub = split(p)
        return task.measure(t, ub, xi[None], yi[None]).sum()

    gl = vmap(grad(loss_i), in_dims=(None, 0, 0))(point, x, y)
    gg = vmap(grad(g_t), in_dims=(None, 0, 0))(point, xt, yt)
    return (gg @ torch.linalg.solve(a, gl.T) / n).numpy()


@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_scores_are_the_formula_for_every_solver_and_solve_side(scenario):
    task, xt, yt = mlp_task(scenario, n=30)
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    for damping in (0.0, 0.05):
        want = _dense_formula(task, fit, xt, yt, damping)
        for solver in ("exact", "cg"):
            args = InfluenceArguments(finetune_damping=damping,
                                      finetune_solver=CGSolver() if solver == "cg" else
                                      InfluenceArguments().finetune_solver)
            for side in ("test", "train"):
                got = finetune_influence(task, fit, xt, yt, args, solve_side=side)
                np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-12)
                assert got.settings["solve_side"] == side
                assert got.settings["damping"] == damping
    auto = finetune_influence(task, fit, xt, yt)     # K = 4 < N = 30: the test side
    assert auto.settings["solve_side"] == "test"
    assert auto.settings["score_convention"].startswith("finetune_score = predicted change")


def test_gauss_newton_curvature_and_tracked_subset_are_named():
    task, xt, yt = mlp_task("updated", n=30, tracked=["0.weight"])
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    res = finetune_influence(task, fit, xt, yt, InfluenceArguments(
        finetune_curvature="gauss_newton", finetune_damping=1e-3))
    assert "Gauss-Newton" in res.settings["approximation"]
    assert "tracked" in res.settings["approximation"]
    assert res.settings["dim"] == task.t_layout.numel + task.u_layout.numel
    with pytest.raises(ScoringError, match="no test points"):
        finetune_influence(task, fit, xt[:0], yt[:0])
    with pytest.raises(ScoringError, match="solve_side"):
        finetune_influence(task, fit, xt, yt, solve_side="both")  # type: ignore[arg-type]


# ----- run artifacts ---------------------------------------------------------------------------
def test_artifacts_are_hashed_into_the_run_and_load_back(tmp_path):
    task, xt, yt = mlp_task("fixed", n=30)
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    n, k, m = len(task.finetune_data[0]), len(xt), task.n_pretrain
    staging = artifacts.open_destination(tmp_path / "run", overwrite=False)
    ids = [f"ft-{i:03d}" for i in range(n)]
    section = write_finetune_artifacts(
        staging.path, task, fit, xt, yt, InfluenceArguments(), ids,
        extra_columns={"pixels": [np.zeros(4, np.float32)] * n})
    assert section["shape"] == [k, n] and section["scores_file"] == FINETUNE_SCORES_FILE
    json.dumps(section)
    test_df = pd.DataFrame({"test_id": [f"t{i}" for i in range(k)], "label": yt.numpy(),
                            "pred": yt.numpy(), "loss": np.ones(k), "correct": True})
    pre_df = pd.DataFrame({"example_id": [f"p{j}" for j in range(m)],
                           "label": task.pretrain_data[1].numpy()})
    zeros = np.zeros((k, m), np.float32)
    path = artifacts.write_run(staging.dest, {"finetune_influence": section}, test_df, pre_df,
                               dict.fromkeys(artifacts.SCORE_NAMES, zeros),
                               np.zeros((m, 2)), np.zeros((k, 2)), staging=staging)
    run = artifacts.load_run(path)
    assert {FINETUNE_SCORES_FILE, FINETUNE_TABLE} <= set(run.manifest["files"])
    scores, table = load_finetune_artifacts(run.path, run.manifest)
    assert scores.dtype == np.float32 and scores.shape == (k, n)
    np.testing.assert_allclose(scores, finetune_influence(task, fit, xt, yt).numpy(),
                               rtol=1e-5, atol=1e-7)
    assert table["example_id"].tolist() == ids
    assert {"label", "pred", "correct", "finetune_loss", "pixels"} <= set(table.columns)
    # Unlisted copies and shape mismatches are refused; a run without them has none.
    with pytest.raises(ValueError, match="not listed"):
        load_finetune_artifacts(run.path, {**run.manifest, "files": {}})
    with pytest.raises(ValueError, match="manifest says"):
        load_finetune_artifacts(run.path, {**run.manifest, "shapes": {"n_test": k + 1}})
    assert load_finetune_artifacts(tmp_path) is None


def test_per_example_gradients_match_autograd():
    """The stage function's per-example gradients are in the order of A's variables."""
    task, xt, yt = mlp_task("fixed", n=12)
    fit = fit_two_stage(task, tolerance=(1e-10, 1e-10))
    from engine.finetune_influence import finetune_curvature, finetune_gradients

    op, raw = finetune_curvature(task, fit, InfluenceArguments())
    x, y = task.finetune_data
    got = torch.cat([g for _, g in finetune_gradients(raw, x, y, batch_size=5)])
    feats = task.features(fit.backbone_pre, x).detach()

    def loss_i(t, f, yi):
        out = functional_call(task.finetune_head, task.t_layout.unflatten(t), (f[None],))
        return task.finetune_loss(out, yi[None]).sum()

    want = vmap(grad(loss_i), in_dims=(None, 0, 0))(fit.t, feats, y)
    torch.testing.assert_close(got, want)
    assert op.dim == task.t_layout.numel


def test_check_run_on_a_run_directory_with_and_without_stored_scores(small_config, tmp_path):
    """A real (reduced digits) run: made with ``[influence] finetune_influence = false`` the
    scores are computed by check_run; made by the pipeline with it on (the default), they are
    read from the run's finetune_scores.npy -- the same numbers either way."""
    from engine.pipeline import run
    from engine.validation.finetune_check import check_run

    off = small_config.parent / "finetune_influence_off.toml"
    off.write_text(small_config.read_text().replace("finetune_influence = true",
                                                    "finetune_influence = false"))
    path = run(off, tmp_path / "run", echo=lambda s: None)
    assert artifacts.load_run(path).finetune_scores is None
    settings = FinetuneCheckSettings(per_point=5, max_test_points=2)
    pairs, summary = check_run(path, settings, echo=None)
    d = summary["designated_pairs"]
    # Measured: Pearson 0.944, sign 100%, slope 1.53 on 20 pairs (N = 40 finetuning examples:
    # single removals are large, first order underestimates them).
    assert d["n_pairs"] == 20 and d["pearson"] > 0.9 and d["sign_agreement"] >= 0.9
    assert summary["scoring"]["solver"] == "exact" and summary["scores_from"] == "computed"

    # The pipeline's run: the files written into the staging folder, listed in the manifest.
    with_scores = run(small_config, tmp_path / "with_finetune", echo=lambda s: None)
    loaded = artifacts.load_run(with_scores)
    assert {FINETUNE_SCORES_FILE, FINETUNE_TABLE} <= set(loaded.manifest["files"])
    assert load_finetune_artifacts(loaded.path, loaded.manifest)[0].shape == (25, 40)
    pairs2, summary2 = check_run(with_scores, settings, echo=None)
    assert summary2["scoring"] == {"given": True} and summary2["scores_from"] == "run"
    np.testing.assert_allclose(pairs2["predicted"], pairs["predicted"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(pairs2["actual"], pairs["actual"], atol=1e-9)
