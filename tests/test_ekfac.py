"""EK-FAC against closed forms and brute force; the ekfac and ekfac+cg solvers against exact."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from torch.func import functional_call, hessian

from engine.curvature import (
    EkfacCgSolver,
    EkfacSolver,
    NotPositiveDefiniteError,
    finetune_joint_hessian,
    pretrain_hessian,
)
from engine.curvature.kronecker import KroneckerSettings, fit_kronecker
from engine.curvature.stage_functions import StageFunction
from engine.scores import InfluenceArguments, ScoringError, compute_scores
from engine.task import cross_entropy, squared_error
from engine.training import fit_two_stage
from tests.conftest import mlp_task

DT = torch.float64


def module_function(model: nn.Module, loss, reg: float = 0.0) -> StageFunction:
    """A StageFunction over all of ``model``'s parameters."""
    names = tuple(n for n, _ in model.named_parameters())
    params = tuple(p.detach().clone() for _, p in model.named_parameters())

    def outputs(ps: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, ps, strict=True)), (x,))

    return StageFunction(names, params, outputs, loss, (reg,) * len(params))


def fisher_from_gradients(fn: StageFunction, x: torch.Tensor, y: torch.Tensor,
                          which: list[int]) -> torch.Tensor:
    """(1/M) sum_j g_j g_j^T of the per-example gradients of the tensors ``which``."""
    g = torch.cat(fn.gradient_blocks(x, y, which), 1)
    return g.T @ g / len(x)


def block_gradient_order(fn: StageFunction, blk, x, y) -> torch.Tensor:
    """Per-example gradients of a block laid out as [W | b] (row-major), (M, d_out * width)."""
    w = fn.gradient_blocks(x, y, [blk.weight])[0].reshape(len(x), *blk.shape)
    if blk.bias is not None:
        w = torch.cat([w, fn.gradient_blocks(x, y, [blk.bias])[0][:, :, None]], 2)
    return w.reshape(len(x), -1)


def test_kfac_of_one_linear_layer_with_squared_loss_is_the_gauss_newton_block():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    fn = module_function(layer, squared_error)
    x, y = torch.randn(40, 5, dtype=DT), torch.randn(40, 3, dtype=DT)
    factors = fit_kronecker(fn, x, y, KroneckerSettings(fisher="expected"))
    (blk,) = factors.blocks
    a = blk.a_sum / blk.rows
    s = blk.s_sum / factors.examples
    # Independent reference: for a linear model the Hessian of the mean squared error is its
    # Gauss-Newton matrix; lay it out as vec([W | b]) row-major.
    def mean_loss(wb: torch.Tensor) -> torch.Tensor:
        return squared_error(F.linear(x, wb[:, :5], wb[:, 5]), y).mean()

    wb = torch.cat([fn.params[0], fn.params[1][:, None]], 1)
    gn = hessian(mean_loss)(wb).reshape(18, 18)
    assert torch.allclose(torch.kron(s, a), gn, atol=1e-12, rtol=1e-10)
    # With the eigenvalue correction the approximation is the same matrix: the solve is exact.
    rhs = torch.randn(18, 2, dtype=DT)
    flat = torch.cat([rhs[:15], rhs[15:]])   # [W rows; b] in the function's tensor order
    got = factors.solve(flat, damping=0.1)
    want = torch.linalg.solve(gn + 0.1 * torch.eye(18, dtype=DT), rhs_as_wb(rhs))
    assert torch.allclose(wb_as_flat(want), got, atol=1e-10)


def rhs_as_wb(v: torch.Tensor) -> torch.Tensor:
    """Flat [W (3x5) ; b (3)] -> vec([W | b]) row-major (3 x 6)."""
    w, b = v[:15].T.reshape(-1, 3, 5), v[15:].T.reshape(-1, 3, 1)
    return torch.cat([w, b], 2).reshape(-1, 18).T


def wb_as_flat(v: torch.Tensor) -> torch.Tensor:
    m = v.T.reshape(-1, 3, 6)
    return torch.cat([m[:, :, :5].reshape(-1, 15).T, m[:, :, 5].T])


def check_correction_is_least_squares_optimum(fn: StageFunction, x, y) -> int:
    """Every block's corrected eigenvalues are argmin ||F - Q diag(L) Q^T||_F in its basis."""
    factors = fit_kronecker(fn, x, y, KroneckerSettings(fisher="empirical", batch_size=7))
    gen = torch.Generator().manual_seed(1)
    for blk in factors.blocks:
        g = block_gradient_order(fn, blk, x, y)
        f_block = g.T @ g / len(x)
        # (d_out, d_in') row-major: Q_S (x) Q_A; an embedding's (V, D): Q_S acts on D only.
        q_s = blk.q_s.contiguous()
        q = (torch.kron(torch.eye(blk.shape[0], dtype=DT), q_s) if blk.kind == "embedding"
             else torch.kron(q_s, blk.q_a.contiguous()))
        lam = blk.eigenvalues.reshape(-1)
        assert torch.allclose(lam, torch.diagonal(q.T @ f_block @ q), atol=1e-12, rtol=1e-9)

        def error(values: torch.Tensor, q=q, f_block=f_block) -> float:
            return float(torch.linalg.matrix_norm(f_block - (q * values) @ q.T))

        best = error(lam)
        for _ in range(20):
            assert error(lam + 1e-3 * torch.randn(lam.shape, generator=gen, dtype=DT)) > best
    return len(factors.blocks)


def test_eigenvalue_correction_is_the_least_squares_optimum_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(30, 4, dtype=DT), torch.randint(2, (30,))
    assert check_correction_is_least_squares_optimum(module_function(model, cross_entropy),
                                                     x, y) == 2


def test_eigenvalue_correction_is_the_least_squares_optimum_conv_and_embedding():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 3)).double()
    x = torch.randn(20, 1, 6, 6, dtype=DT)
    assert check_correction_is_least_squares_optimum(
        module_function(conv, cross_entropy), x, torch.randint(3, (20,))) == 2

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(7, 3), nn.Linear(3, 2)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.emb(tokens)).mean(1))

    bag = Bag().double()
    tokens = torch.randint(7, (25, 5))
    assert check_correction_is_least_squares_optimum(
        module_function(bag, cross_entropy), tokens, torch.randint(2, (25,))) == 2


class TinyEncoder(nn.Module):
    """Embedding -> TransformerEncoderLayer (self-attention, LayerNorm) -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.enc = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0,
                                              batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.emb(tokens)).mean(1))


def test_eigenvalue_correction_is_the_least_squares_optimum_transformer():
    torch.manual_seed(0)
    model = TinyEncoder().double()
    fn = module_function(model, cross_entropy)
    tokens, y = torch.randint(7, (24, 5)), torch.randint(2, (24,))
    # embedding, attention in/out projections, two feed-forward layers, output layer
    assert check_correction_is_least_squares_optimum(fn, tokens, y) == 6
    factors = fit_kronecker(fn, tokens, y, KroneckerSettings(fisher="empirical"))
    assert sorted(fn.names[i] for i in factors.other) == [
        "enc.norm1.bias", "enc.norm1.weight", "enc.norm2.bias", "enc.norm2.weight"]


def test_true_fisher_samples_average_to_the_expected_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    fn = module_function(model, cross_entropy)
    x = torch.randn(10, 3, dtype=DT).repeat(400, 1)   # 400 label samples per input
    y = torch.zeros(len(x), dtype=torch.long)
    true = fit_kronecker(fn, x, y, KroneckerSettings(fisher="true", batch_size=1000))
    expected = fit_kronecker(fn, x, y, KroneckerSettings(fisher="expected", batch_size=1000))
    for bt, be in zip(true.blocks, expected.blocks, strict=True):
        rel = (bt.eigenvalues.sum() - be.eigenvalues.sum()).abs() / be.eigenvalues.sum()
        assert rel < 0.05
        s_t, s_e = bt.s_sum / true.examples, be.s_sum / expected.examples
        assert torch.linalg.matrix_norm(s_t - s_e) < 0.1 * torch.linalg.matrix_norm(s_e)


def test_other_tensors_get_an_exact_dense_fisher_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 2)).double()
    fn = module_function(model, cross_entropy, reg=0.05)
    x, y = torch.randn(30, 4, dtype=DT), torch.randint(2, (30,))
    factors = fit_kronecker(fn, x, y, KroneckerSettings(fisher="empirical"))
    names = [fn.names[i] for i in factors.other]
    assert names == ["1.weight", "1.bias"] and factors.other_mode == "dense"
    f_other = fisher_from_gradients(fn, x, y, factors.other)
    rhs = torch.randn(sum(p.numel() for p in fn.params), 3, dtype=DT)
    got = factors.solve(rhs, damping=0.01)
    off = factors.offsets
    rows = torch.arange(off[factors.other[0]], off[factors.other[-1] + 1])
    want = torch.linalg.solve(f_other + 0.06 * torch.eye(6, dtype=DT), rhs[rows])
    assert torch.allclose(got[rows], want, atol=1e-10)


@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_ekfac_cg_converges_to_the_exact_directions(scenario):
    task, xt, yt = mlp_task(scenario, m=60)
    fit = fit_two_stage(task)
    exact = compute_scores(task, fit, xt, yt, InfluenceArguments())
    errors = {}
    for block in (True, False):
        for iterations in (1, 2, 40):
            solver = EkfacCgSolver(iterations=iterations, fisher="expected", block=block)
            args = InfluenceArguments(pretrain_solver=solver, finetune_solver=EkfacCgSolver(
                iterations=iterations, block=block))
            got = compute_scores(task, fit, xt, yt, args)
            errors[block, iterations] = float((got.total - exact.total).abs().max()
                                              / exact.total.abs().max())
            info = got.settings["pretrain"]
            assert info["solver"] == "ekfac+cg" and "true_relative_residual_max" in info
    for block in (True, False):
        assert errors[block, 1] > errors[block, 2] and errors[block, 40] < 1e-8, errors
    # One shared Krylov space: the block version is closer after the same iterations.
    assert errors[True, 2] < errors[False, 2], errors


def test_ekfac_solver_is_psd_labelled_and_refused_for_b_in_the_updated_scenario():
    task, xt, yt = mlp_task("fixed", m=60)
    fit = fit_two_stage(task)
    args = InfluenceArguments(pretrain_solver=EkfacSolver(), finetune_solver=EkfacSolver())
    got = compute_scores(task, fit, xt, yt, args)
    assert torch.isfinite(got.total).all()
    assert "block-diagonal EK-FAC" in got.settings["approximation"]
    assert got.settings["pretrain"]["damping_added"] > 0
    h = pretrain_hessian(task, fit)
    # The block-diagonal inverse has zero W rows for a right-hand side with zero W rows.
    nu = task.u_layout.numel
    rhs = torch.cat([torch.randn(nu, 2, dtype=DT), torch.zeros(h.dim - nu, 2, dtype=DT)])
    assert EkfacSolver().solve(h, rhs)[nu:].abs().max() == 0
    up_task, xu, yu = mlp_task("updated", m=60)
    up_fit = fit_two_stage(up_task)
    with pytest.raises(ScoringError, match="ekfac\\+cg"):
        compute_scores(up_task, up_fit, xu, yu,
                       InfluenceArguments(finetune_solver=EkfacSolver()))
    b = finetune_joint_hessian(up_task, up_fit)
    assert b.function is not None and b.function.reg[-1] == up_task.alpha



def test_gauss_newton_products_equal_explicit_jacobians():
    """J^T H_out J v / n + reg v against jacrev Jacobians, and = the Hessian for ridge."""
    from torch.func import jacrev

    from engine.curvature.gauss_newton import gauss_newton
    task, _, _ = mlp_task("fixed", m=30)
    fit = fit_two_stage(task)
    h = pretrain_hessian(task, fit)
    gn = gauss_newton(h)
    fn = h.function
    sizes = [p.numel() for p in fn.params]

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        return fn.outputs([t.reshape(p.shape) for t, p in zip(parts, fn.params, strict=True)],
                          h.x)

    jac = jacrev(outputs)(h.point)                     # (n, C, dim)
    p = torch.softmax(outputs(h.point), 1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    want = torch.einsum("nci,ncd,ndj->ij", jac, h_out, jac) / len(h.x) + torch.diag(h.reg_diag)
    v = torch.randn(h.dim, 3, dtype=DT)
    assert torch.allclose(gn.matvec(v), want @ v, atol=1e-12)
    # PSD where the Hessian is not guaranteed to be; the exact solver accepts it.
    assert torch.linalg.eigvalsh(gn.dense()).min() > 0
    assert "Gauss-Newton" in gn.name


def test_gauss_newton_is_the_hessian_of_a_linear_model_with_squared_loss():
    from engine.curvature.gauss_newton import gauss_newton
    from tests.conftest import ridge_task
    task, xt, yt = ridge_task("updated")
    fit = fit_two_stage(task)
    h = pretrain_hessian(task, fit)
    assert torch.allclose(gauss_newton(h).dense(), h.dense(), atol=1e-12)
    b = finetune_joint_hessian(task, fit)
    # B's finetuning loss is not linear in (T, U) jointly (T U x), so GN differs from B there.
    assert not torch.allclose(gauss_newton(b).dense(), b.dense(), atol=1e-6)
    args = InfluenceArguments(pretrain_curvature="gauss_newton")
    got = compute_scores(task, fit, xt, yt, args)
    want = compute_scores(task, fit, xt, yt, InfluenceArguments())
    assert torch.allclose(got.total, want.total, atol=1e-10)
    assert "Gauss-Newton" in got.settings["approximation"]


def test_block_pcg_solves_with_dependent_columns_and_beats_columnwise_cg():
    from engine.curvature.block_cg import block_pcg, orthonormal_basis
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=DT))
    evals = torch.logspace(-4, 0, 60, dtype=DT)
    a = (q * evals) @ q.T
    rhs = torch.randn(60, 6, generator=gen, dtype=DT)
    rhs = torch.cat([rhs, rhs[:, :2] * 3.0, rhs[:, :1] + rhs[:, 1:2]], 1)   # dependent columns
    want = torch.linalg.solve(a, rhs)
    x, info = block_pcg(lambda p: a @ p, rhs, lambda r: r, max_iter=200, rtol=1e-12)
    assert torch.allclose(x, want, rtol=1e-7, atol=1e-9)
    basis = orthonormal_basis(rhs, 0.0)      # the dependent columns are dropped from a block
    assert basis.shape[1] == 6 and torch.allclose(basis.T @ basis, torch.eye(6, dtype=DT))
    # After 8 iterations, the column that searched the block's space is closer than alone.
    block8, _ = block_pcg(lambda p: a @ p, rhs, lambda r: r, 8, 1e-12)
    single8, _ = block_pcg(lambda p: a @ p, rhs[:, :1], lambda r: r, 8, 1e-12)
    err = [float((v[:, 0] - want[:, 0]).norm() / want[:, 0].norm()) for v in (block8, single8)]
    assert err[0] < 0.5 * err[1], err
    # An exact preconditioner solves in one iteration.
    ainv = torch.linalg.inv(a)
    x1, info1 = block_pcg(lambda p: a @ p, rhs, lambda r: ainv @ r, 10, 1e-10)
    assert info1["iterations"] == 1 and torch.allclose(x1, want, rtol=1e-6, atol=1e-8)
    with pytest.raises(NotPositiveDefiniteError, match="block CG breakdown"):
        block_pcg(lambda p: -(a @ p), rhs, lambda r: r, 10, 1e-10)
