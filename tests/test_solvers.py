"""Inverse-curvature solvers against dense closed forms, and their failure modes."""

from __future__ import annotations

import pytest
import torch
from torch.func import hessian

from engine.curvature import (
    CGSolver,
    ExactSolver,
    LissaSolver,
    NotPositiveDefiniteError,
    finetune_joint_hessian,
    pretrain_hessian,
)
from engine.training import TwoStageFit, fit_two_stage
from tests.conftest import mlp_task


@pytest.fixture(scope="module")
def fitted():
    task, xt, yt = mlp_task("updated", alpha=0.5)
    return task, fit_two_stage(task, tolerance=(1e-10, 1e-10))


def reference_hessian(task, fit) -> torch.Tensor:
    """torch.func.hessian of the full pretraining objective (independent of the HVP code)."""
    x, y = task.pretrain_data
    nu = task.u_layout.numel

    def objective(theta):
        u, w = theta[:nu], theta[nu:]
        out = task.pretrain_outputs(fit.backbone_pre, w, x, u)
        return (task.pretrain_loss(out, y).mean()
                + 0.5 * task.pretrain_weight_decay * (theta * theta).sum())

    return hessian(objective)(torch.cat([task.tracked(fit.backbone_pre), fit.w]))


def test_dense_hvp_matrix_equals_autograd_hessian(fitted):
    task, fit = fitted
    op = pretrain_hessian(task, fit, batch_size=7)   # odd batch size: chunking must not matter
    torch.testing.assert_close(op.dense(chunk=5), reference_hessian(task, fit),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_exact_and_cg_match_linalg_solve(fitted, damping):
    task, fit = fitted
    op = pretrain_hessian(task, fit)
    ref_mat = reference_hessian(task, fit) + damping * torch.eye(op.dim, dtype=torch.float64)
    rhs = torch.randn(op.dim, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = torch.linalg.solve(ref_mat, rhs)
    exact = ExactSolver().solve(op, rhs, damping)
    cg = CGSolver(rtol=1e-12).solve(op, rhs, damping)
    assert ((exact - ref).norm() / ref.norm()).item() < 1e-9
    assert ((cg - exact).norm() / exact.norm()).item() < 1e-6


def test_lissa_within_stated_tolerance(fitted):
    """Full-batch LiSSA, depth >> condition number: <= 1e-6 relative error (deterministic).
    Minibatch LiSSA (16 of 30 examples per step, 2 repeats): <= 10% relative error."""
    task, fit = fitted
    op = finetune_joint_hessian(task, fit)
    rhs = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    damping = 0.2
    exact = ExactSolver().solve(op, rhs, damping)
    lissa = LissaSolver(depth=300).solve(op, rhs, damping)
    assert ((lissa - exact).norm() / exact.norm()).item() < 1e-6
    noisy = LissaSolver(depth=300, repeats=2, batch_size=16, seed=3).solve(op, rhs, damping)
    assert ((noisy - exact).norm() / exact.norm()).item() < 0.10


def test_exact_factorization_is_reused_and_damping_never_stored(fitted):
    task, fit = fitted
    op = pretrain_hessian(task, fit)
    solver = ExactSolver()
    calls = {"n": 0}
    original = op.dense

    def counting_dense(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    op.dense = counting_dense
    rhs = torch.ones(op.dim, 2, dtype=torch.float64)
    a = solver.solve(op, rhs, 0.1)
    solver.solve(op, rhs * 2, 0.1)
    assert calls["n"] == 1
    b = solver.solve(op, rhs, 0.0)       # another damping: a new factorization of the same H
    assert calls["n"] == 2
    assert not torch.allclose(a, b)
    # The operator itself is unchanged: its matrix has no damping added.
    torch.testing.assert_close(original(), reference_hessian(task, fit), rtol=1e-10, atol=1e-12)


def test_exact_solver_reuses_the_hessian_training_built_at_the_same_point(fitted):
    task, fit = fitted
    assert fit.pretrain.curvature is not None
    assert pretrain_hessian(task, fit).eigen is None   # reuse is opt-in
    op = pretrain_hessian(task, fit, reuse_training=True)
    assert op.eigen is not None                        # built by training at (U*, W*)
    rhs = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reused = ExactSolver().solve(op, rhs, 0.05)
    op.eigen = None
    built = ExactSolver().solve(op, rhs, 0.05)
    torch.testing.assert_close(reused, built, rtol=1e-9, atol=1e-12)
    # A fit whose point differs from where training built it gets no reuse.
    moved = TwoStageFit(fit.backbone_pre + 1e-3, fit.w, fit.backbone_ft, fit.t, fit.pretrain)
    assert pretrain_hessian(task, moved, reuse_training=True).eigen is None


def indefinite_task():
    """Stop pretraining early from a random start so the Hessian has negative eigenvalues."""
    task, _, _ = mlp_task("fixed", hidden=6, seed=3)
    task.pretrain_weight_decay = 0.0
    ub, w, t = task.initial_state()
    from engine.training import TwoStageFit
    return task, TwoStageFit(ub * 3, w * 3, ub * 3, t)


def test_not_positive_definite_error_names_eigenvalue_and_damping():
    task, fit = indefinite_task()
    op = pretrain_hessian(task, fit)
    lowest = torch.linalg.eigvalsh(op.dense())[0].item()
    assert lowest < 0
    with pytest.raises(NotPositiveDefiniteError) as err:
        ExactSolver().solve(op, torch.ones(op.dim, 1, dtype=torch.float64), 0.0)
    msg = str(err.value)
    assert f"{lowest:.3g}" in msg and "damping" in msg
    # The suggested damping makes the solve succeed.
    suggested = float(msg.split("damping = ")[1].split(")")[0])
    ExactSolver().solve(op, torch.ones(op.dim, 1, dtype=torch.float64), suggested)


def test_cg_breakdown_is_reported():
    task, fit = indefinite_task()
    op = pretrain_hessian(task, fit)
    evals, evecs = torch.linalg.eigh(op.dense())
    rhs = evecs[:, :1]   # the most negative direction: CG meets negative curvature at once
    with pytest.raises(NotPositiveDefiniteError, match="CG breakdown"):
        CGSolver().solve(op, rhs, 0.0)
