"""Curvature products and solves that work on every model, fit in memory and never overstate
their accuracy: HVP mode fallback, memory-bounded chunking, true residuals and their
tolerances, preconditioned CG, and the checks made before training."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from engine import pipeline
from engine.autodiff import FORWARD, REVERSE, differentiable_attention
from engine.curvature import (
    CGSolver,
    Curvature,
    CurvatureMemoryError,
    ExactSolver,
    LissaSolver,
    SolveAccuracyError,
    SolveAccuracyWarning,
    SolverSettingError,
    check_stage_solver,
    finetune_cross_matvec,
    finetune_head_hessian,
    finetune_joint_hessian,
    pretrain_hessian,
)
from engine.curvature import operators as operators_module
from engine.scores import InfluenceArguments, compute_scores
from engine.training import TwoStageFit
from tests.conftest import mlp_task

DT = torch.float64
CONSTRUCTORS = [pretrain_hessian, finetune_head_hessian, finetune_joint_hessian]


def start_fit(task) -> TwoStageFit:
    ub, w, t = task.initial_state()
    return TwoStageFit(ub, w, ub, t)


def columns(dim: int, k: int, seed: int = 0, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----- HVP modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", CONSTRUCTORS)
def test_reverse_over_reverse_equals_forward_over_reverse(make):
    task, _, _ = mlp_task("updated", alpha=0.7)
    fit = start_fit(task)
    auto = make(task, fit, batch_size=7)
    V = columns(auto.dim, 4)
    products = {}
    for mode in (FORWARD, REVERSE):
        op = make(task, fit, batch_size=7)
        op.hvp_mode = mode
        products[mode] = op.matvec(V)
        assert op.describe()["hvp"] == mode
    torch.testing.assert_close(products[REVERSE], products[FORWARD], rtol=1e-10, atol=1e-12)
    auto.matvec(V)
    assert auto.hvp_mode == FORWARD     # forward mode works on an MLP, so it is kept


class _NoForwardTanh(torch.autograd.Function):
    """tanh with a backward formula but no forward-mode rule (like some fused kernels)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        return gy * (1 - y * y)


class NoForwardTanh(nn.Module):
    def forward(self, x):
        return _NoForwardTanh.apply(x)


def test_missing_forward_mode_falls_back_to_reverse_and_matches_finite_differences():
    task, xt, yt = mlp_task("fixed", activation=NoForwardTanh)
    fit = start_fit(task)
    op = pretrain_hessian(task, fit, batch_size=16)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(grad(lambda p: op.batch_loss(p, op.x, op.y)), (op.point,), (op.point,))
    v = columns(op.dim, 1, seed=3)
    hv = op.matvec(v)[:, 0]
    assert op.hvp_mode == REVERSE

    def objective_grad(p):
        return grad(lambda q: op.batch_loss(q, op.x, op.y) / op.n_examples
                    + 0.5 * (op.reg_diag * q * q).sum())(p)

    eps = 1e-5
    fd = (objective_grad(op.point + eps * v[:, 0]) - objective_grad(op.point - eps * v[:, 0])) / (
        2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)
    # The mode is remembered per operator and reported by the solvers.
    solver = CGSolver(rtol=1e-10)
    solver.solve(op, columns(op.dim, 2), damping=2.0)
    assert solver.describe()["hvp"] == REVERSE
    # Whole scores on this model: curvature products, the cross term and the scoring pass
    # (jvp falls back to per-example gradients) all work and agree with the exact solver.
    args = dict(pretrain_damping=2.0, finetune_damping=0.1, scoring_method="jvp")
    cg = compute_scores(task, fit, xt, yt, InfluenceArguments(
        pretrain_solver=CGSolver(rtol=1e-12), finetune_solver=CGSolver(rtol=1e-12), **args))
    exact = compute_scores(task, fit, xt, yt, InfluenceArguments(**args))
    assert cg.settings["pretrain"]["hvp"] == REVERSE
    assert cg.settings["finetune"]["cross_term"]["hvp"] == REVERSE
    assert cg.settings["scoring"]["method"] == "gradients"
    rel = ((cg.total - exact.total).norm() / exact.total.norm()).item()
    assert rel < 1e-8


# ----- memory budget ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", CONSTRUCTORS)
def test_tiny_memory_budget_chunks_and_gives_the_same_products(make):
    task, _, _ = mlp_task("updated", alpha=0.7, m=12, n=10)
    fit = start_fit(task)
    ref = make(task, fit)
    small = make(task, fit)
    small.memory_budget = small.estimate_bytes(2, 2)   # a budget for 2 examples x 2 columns
    V = columns(ref.dim, 5)
    torch.testing.assert_close(small.matvec(V), ref.matvec(V), rtol=1e-12, atol=1e-14)
    chunk = small.describe()["hvp_chunk"]
    assert chunk["examples"] < ref.n_examples and chunk["columns"] < 5
    assert small.estimate_bytes(chunk["examples"], chunk["columns"]) <= small.memory_budget
    assert ref.describe()["hvp_chunk"] == {"examples": ref.n_examples, "columns": 5,
                                           "of_columns": 5}
    idx = torch.arange(0, ref.n_examples, 3)
    torch.testing.assert_close(small.matvec_sample(V, idx), ref.matvec_sample(V, idx),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(small.dense(chunk=4), ref.dense(), rtol=1e-12, atol=1e-14)


def test_cross_term_is_chunked_to_the_budget():
    task, _, _ = mlp_task("fixed")
    fit = start_fit(task)
    V = columns(task.t_layout.numel, 6)
    info: dict = {}
    ref = finetune_cross_matvec(task, fit, V)
    small = finetune_cross_matvec(task, fit, V, memory_budget=20_000, info=info)
    torch.testing.assert_close(small, ref, rtol=1e-12, atol=1e-14)
    assert info["hvp"] == REVERSE
    assert info["hvp_chunk"]["columns"] < 6 or info["hvp_chunk"]["examples"] < len(
        task.finetune_data[0])


def test_budget_below_one_product_names_the_setting():
    task, _, _ = mlp_task()
    op = pretrain_hessian(task, start_fit(task), memory_budget=100)
    with pytest.raises(CurvatureMemoryError, match="memory_budget_gb") as err:
        op.matvec(columns(op.dim, 2))
    assert isinstance(err.value, ValueError)   # the run command prints it as one error line


def test_allocator_error_becomes_an_error_naming_the_settings(monkeypatch):
    task, _, _ = mlp_task()
    op = pretrain_hessian(task, start_fit(task))

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 2147483648 bytes.")

    monkeypatch.setattr(operators_module, "hvp_columns", no_memory)
    with pytest.raises(CurvatureMemoryError) as err:
        op.matvec(columns(op.dim, 3))
    msg = str(err.value)
    assert "curvature_batch_size" in msg and "memory_budget_gb" in msg
    assert "DefaultCPUAllocator" not in msg


def _cnn_operator(budget: int) -> Curvature:
    """A 181k-parameter CNN on 28x28 images (the kind of model whose batched HVPs with several
    right-hand sides did not fit), float32."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(32, 64, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                        nn.Conv2d(64, 64, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(64 * 7 * 7, 40))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    point = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def batch_loss(p, xb, yb):
        parts = dict(zip(names, (t.view(s) for t, s in zip(
            torch.split(p, [s.numel() for s in shapes]), shapes, strict=True)), strict=True))
        return nn.functional.cross_entropy(functional_call(net, parts, (xb,)), yb,
                                           reduction="sum")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1, 28, 28, generator=g)
    y = torch.randint(40, (1024,), generator=g)
    return Curvature("CNN Hessian", batch_loss, point, x, y, torch.zeros_like(point),
                     memory_budget=budget)


def test_cnn_products_are_planned_under_the_budget():
    op = _cnn_operator(4 << 30)
    assert 100_000 < op.dim < 500_000
    # Measured activations: the conv layers' inputs dominate (~195k values per image).
    assert 1e5 < op.activation_elements() < 5e5
    # 16 right-hand sides on 1,024 images would need ~40 GB in one batch: chunked under 4 GiB.
    assert op.estimate_bytes(1024, 16) > 8 * op.memory_budget
    b, c = op.plan(16)
    assert c == 16 and 16 <= b < 1024
    assert op.estimate_bytes(b, c) <= op.memory_budget
    # A small budget chunks the columns too, and chunked products equal one-batch products.
    op.x, op.y = op.x[:6], op.y[:6]
    small = _cnn_operator(0)
    small.x, small.y = op.x, op.y
    small.memory_budget = int(1.01 * small.estimate_bytes(1, 2))
    assert small.plan(3) == (1, 2)
    V = columns(op.dim, 3, dtype=torch.float32)
    torch.testing.assert_close(small.matvec(V), op.matvec(V), rtol=1e-4, atol=1e-5)


# ----- true residuals and tolerances -----------------------------------------------------------


def quadratic(dtype: torch.dtype, d: int = 60, n: int = 200, spread: float = 2.0,
              reg: float = 1e-3) -> tuple[Curvature, torch.Tensor]:
    """Curvature of 0.5 ||X p||^2 / n + reg/2 ||p||^2 (columns of X scaled over `spread`
    decades) and its float64 matrix."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=DT) * torch.logspace(0, spread, d, dtype=DT)

    def batch_loss(p, xb, yb):
        return 0.5 * ((xb @ p) ** 2).sum()

    op = Curvature("quadratic", batch_loss, torch.zeros(d, dtype=dtype), X.to(dtype),
                   torch.zeros(n, dtype=dtype), torch.full((d,), reg, dtype=dtype), 256)
    return op, X.T @ X / n + reg * torch.eye(d, dtype=DT)


def residuals(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor, damping: float = 0.0
              ) -> torch.Tensor:
    """The true relative residuals, computed independently with numpy in float64."""
    A = A.numpy()
    b, x = b.double().numpy(), x.double().numpy()
    res = b - (A @ x + damping * x)
    return torch.from_numpy(np.linalg.norm(res, axis=0) / np.linalg.norm(b, axis=0))


def test_cg_records_the_true_residual_matching_numpy():
    op, A = quadratic(DT, spread=1.0)
    b = columns(op.dim, 4, seed=1)
    solver = CGSolver(rtol=1e-7)
    x = solver.solve(op, b, damping=0.05)
    ref = residuals(A, b, x, 0.05)
    info = solver.describe()
    assert info["true_relative_residual_max"] == pytest.approx(ref.max().item(), rel=1e-6)
    assert info["true_relative_residual_median"] == pytest.approx(ref.median().item(), rel=1e-6)
    assert info["true_relative_residual_max"] <= 1e-7
    assert info["converged_columns"] == 4 and info["iterations"] > 0


def test_float32_cg_reports_what_float32_reached():
    """rtol = 1e-10 in float32 (cond ~ 1.6e4): the recurrence residual alone went down to
    ~1e-10 (the old report) while the true residual stayed at ~8e-6.  The solver now reports
    the true residual (restarting from it once it drifted) and does not claim 1e-10."""
    op, A = quadratic(torch.float32, spread=2.0)
    b = columns(op.dim, 4, seed=1)
    exact = torch.linalg.solve(A, b)
    solver = CGSolver(rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolveAccuracyWarning)    # 1e-5 is fine for float32
        x = solver.solve(op, b.float(), 0.0)
    info = solver.describe()
    ref = residuals(A, b, x)
    reported = info["true_relative_residual_max"]
    assert reported > 1e-8                          # no float32 solve reaches 1e-10
    assert ref.max().item() / 3 <= reported <= 3 * ref.max().item()
    assert info["recurrence_relative_residual_max"] == pytest.approx(reported, rel=1e-6)
    assert info["restarts"] >= 1 and info["converged_columns"] == 0
    assert info["warn_residual"] == 1e-3 and info["fail_residual"] == 1e-1
    err = ((x.double() - exact).norm(dim=0) / exact.norm(dim=0)).max().item()
    assert err < 1e-5


def test_cg_stopped_early_fails_unless_fixed_iterations_were_asked_for():
    op, A = quadratic(DT, spread=2.0)
    b = columns(op.dim, 3, seed=2)
    with pytest.raises(SolveAccuracyError, match="max_iter") as err:
        CGSolver(rtol=1e-10, max_iter=5).solve(op, b, 0.0)
    assert "true relative residual" in str(err.value)
    solver = CGSolver(rtol=1e-10, max_iter=5, fixed_iterations=True)
    with pytest.warns(SolveAccuracyWarning, match="at most 5 iterations"):
        x = solver.solve(op, b, 0.0)
    info = solver.describe()
    assert info["iterations"] == 5
    assert info["true_relative_residual_max"] == pytest.approx(residuals(A, b, x).max().item(),
                                                               rel=1e-6)
    with pytest.raises(ValueError, match="max_iter"):
        CGSolver(fixed_iterations=True)


def indefinite_hessian():
    """Pretraining stopped early from a scaled random start: H has negative eigenvalues."""
    task, _, _ = mlp_task("fixed", hidden=6, seed=3)
    task.pretrain_weight_decay = 0.0
    ub, w, t = task.initial_state()
    return pretrain_hessian(task, TwoStageFit(ub * 3, w * 3, ub * 3, t))


def test_lissa_on_an_indefinite_hessian_raises_and_says_what_to_do():
    op = indefinite_hessian()
    lowest = torch.linalg.eigvalsh(op.dense())[0].item()
    assert lowest < 0
    rhs = columns(op.dim, 2)
    with pytest.raises(SolveAccuracyError) as err:
        LissaSolver(depth=100).solve(op, rhs, 0.0)
    msg = str(err.value)
    assert "true relative residual" in msg and "not positive definite" in msg
    assert f"{lowest:.3g}" in msg                   # the Lanczos estimate finds it
    suggested = float(msg.split("damping = ")[1].split(")")[0])
    assert suggested > -lowest
    solver = LissaSolver(depth=200)
    x = solver.solve(op, rhs, suggested)            # the advice works
    assert solver.describe()["true_relative_residual_max"] < 1e-10
    torch.testing.assert_close(x, ExactSolver().solve(op, rhs, suggested), rtol=1e-8, atol=1e-10)


def test_lissa_too_shallow_raises_with_the_depth_it_needs():
    op, _ = quadratic(DT, spread=1.0)
    with pytest.raises(SolveAccuracyError, match="raise depth"):
        LissaSolver(depth=5).solve(op, columns(op.dim, 2), 0.0)


# ----- preconditioned CG -----------------------------------------------------------------------


def test_pcg_with_the_exact_inverse_converges_in_one_iteration():
    op, A = quadratic(DT, spread=2.0)
    damping = 0.01
    inverse = torch.linalg.inv(A + damping * torch.eye(op.dim, dtype=DT))
    b = columns(op.dim, 3)
    solver = CGSolver(rtol=1e-10, preconditioner=lambda R: inverse @ R)
    x = solver.solve(op, b, damping)
    assert solver.describe()["iterations"] == 1
    torch.testing.assert_close(x, torch.linalg.solve(A + damping * torch.eye(op.dim, dtype=DT),
                                                     b), rtol=1e-9, atol=1e-12)


def test_jacobi_pcg_matches_linalg_solve_and_needs_fewer_iterations():
    op, A = quadratic(DT, spread=2.0)
    damping = 1e-3
    damped = A + damping * torch.eye(op.dim, dtype=DT)
    diag = damped.diagonal().clone()
    b = columns(op.dim, 4)

    def jacobi(R):
        return R / diag[:, None]

    pcg = CGSolver(rtol=1e-11, preconditioner=jacobi)
    x = pcg.solve(op, b, damping)
    torch.testing.assert_close(x, torch.linalg.solve(damped, b), rtol=1e-8, atol=1e-10)
    plain = CGSolver(rtol=1e-11)
    plain.solve(op, b, damping)
    assert pcg.describe()["iterations"] < plain.describe()["iterations"]
    assert pcg.describe()["preconditioner"] == "jacobi"


def test_a_preconditioner_that_is_not_positive_definite_is_refused():
    op, _ = quadratic(DT)
    with pytest.raises(ValueError, match="preconditioner .* not positive definite"):
        CGSolver(preconditioner=lambda R: -R).solve(op, columns(op.dim, 2), 0.0)


# ----- checks before training ------------------------------------------------------------------


def test_stage_solver_check_names_the_setting():
    check_stage_solver("pretrain", "cg", 10**7, DT, 4 << 30)           # iterative: no limit
    check_stage_solver("finetune", "exact", 5_000, DT, 4 << 30)        # 0.8 GB dense: fine
    with pytest.raises(SolverSettingError, match=r"\[pretrain\] solver = 'exact'.*20,000"):
        check_stage_solver("pretrain", "exact", 30_010, DT, 4 << 30, matrix="Hessian H")
    with pytest.raises(SolverSettingError, match="memory_budget_gb") as err:
        check_stage_solver("finetune", "exact", 15_000, DT, 4 << 30)
    assert "[finetune] solver" in str(err.value) and "'cg'" in str(err.value)
    # The exact solver applies the same rule to the operator's own budget.
    task, _, _ = mlp_task()
    op = pretrain_hessian(task, start_fit(task), memory_budget=1000)
    with pytest.raises(SolverSettingError, match="memory budget"):
        ExactSolver().solve(op, torch.ones(op.dim, 1, dtype=DT))


def _config(small_config, tmp_path, old: str, new: str):
    text = small_config.read_text()
    assert old in text
    path = small_config.parent / f"cfg_{tmp_path.name}.toml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("hidden = [8]", "hidden = [400]", r"\[pretrain\] solver = 'exact'.*30,010 variables"),
    ("[influence]\n", "[influence]\nmemory_budget_gb = 0.0001\n", "memory_budget_gb"),
    ('solver = "exact"', 'solver = "cg"\nmemory_budget_gb = 0.00001', "memory_budget_gb"),
])
def test_run_refuses_solver_and_memory_problems_before_training(small_config, tmp_path,
                                                               monkeypatch, old, new, expected):
    config = _config(small_config, tmp_path, old, new)

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the solver check")

    monkeypatch.setattr(pipeline, "train", no_training)
    with pytest.raises(ValueError, match=expected) as err:
        pipeline.run(config, tmp_path / "out", echo=lambda _: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_attention_context_restores_the_fast_path_flag():
    before = torch.backends.mha.get_fastpath_enabled()
    with differentiable_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == before
