"""Training converges to a *certified minimum*: trust-region Newton, saddle escape, stall
detection, progress lines, Hessian reuse.  References: closed forms, brute force, KKT
conditions, finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from engine.training import fit_two_stage, minimize
from engine.trust_region import (
    NewtonSettings,
    dense_hessian,
    eig_trust_step,
    hvp_function,
    lanczos_min_eig,
    steihaug_cg,
)
from tests.conftest import mlp_task

DT = torch.float64


class Recorder:
    """A TrainingMonitor that keeps everything it is told."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []
        self.notes: list[str] = []

    def step(self, stage, phase, done, limit, grad_norm, detail=""):
        self.steps.append((stage, phase, done, grad_norm, detail))

    def note(self, stage, message):
        self.notes.append(message)


def saddle_function(x: torch.Tensor) -> torch.Tensor:
    """f = x0^2 - x1^2 + x1^4 (+ a mild coupling): a saddle at 0 with gradient exactly 0,
    minima at x1 = +-1/sqrt(2), x0 = 0."""
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4 + 0.1 * (x[2:] ** 2).sum() + 0.05 * x[0] * x[2]


@pytest.mark.parametrize("mode", ["dense", "hvp"])
def test_a_saddle_with_zero_gradient_is_not_reported_as_converged(mode):
    # The start is a stationary point: a gradient-norm test alone would call it converged.
    x0 = torch.zeros(5, dtype=DT)
    rec = Recorder()
    fit = minimize(saddle_function, x0, tolerance=1e-12, max_iter=200, name="toy",
                   newton=NewtonSettings(mode=mode), monitor=rec)
    assert fit.converged and fit.status == "minimum"
    assert abs(abs(fit.params[1].item()) - 1 / math.sqrt(2)) < 1e-9
    assert fit.final_grad_norm <= 1e-12
    exact = torch.linalg.eigvalsh(torch.func.hessian(saddle_function)(fit.params))[0].item()
    assert fit.min_eigenvalue == pytest.approx(exact, rel=1e-6)
    assert ("Lanczos" in fit.curvature_check) == (mode == "hvp")
    assert fit.saddle_escapes >= 1
    assert any("saddle" in n for n in rec.notes)


def test_newton_disabled_keeps_plain_lbfgs_and_says_unchecked():
    fit = minimize(saddle_function, torch.zeros(5, dtype=DT), tolerance=1e-12, max_iter=50,
                   name="toy", newton=NewtonSettings(max_steps=0))
    assert fit.status == "unchecked" and fit.min_eigenvalue is None
    assert fit.params.abs().max() == 0  # it never left the saddle: that is why Newton exists


def test_stall_detector_switches_to_newton_and_says_so():
    # A quadratic with condition number 1e10: L-BFGS crawls, Newton finishes in one step.
    n = 60
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    a = q @ torch.diag(torch.logspace(-8, 2, n, dtype=DT)) @ q.T
    b = a @ torch.randn(n, generator=gen, dtype=DT)   # |x*| ~ 1: round-off stays ~1e-14

    def f(x):
        return 0.5 * x @ a @ x - b @ x

    rec = Recorder()
    fit = minimize(f, torch.zeros(n, dtype=DT), tolerance=1e-9, max_iter=5000, name="quad",
                   newton=NewtonSettings(switch_grad=1e-14), monitor=rec)
    assert any("stalled" in n and "switching to trust-region Newton" in n for n in rec.notes)
    assert fit.converged and fit.iterations < 5000
    # Newton's answer has gradient <= 1e-9, so its error is at most 1e-9 / lambda_min = 10.
    assert torch.linalg.norm(a @ fit.params - b) <= 1e-9
    phases = {s[1] for s in rec.steps}
    assert "L-BFGS" in phases and any("Newton" in p for p in phases)


@pytest.mark.parametrize("seed", range(4))
def test_trust_region_step_satisfies_the_kkt_conditions(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 12
    m = torch.randn(n, n, generator=gen, dtype=DT)
    h = 0.5 * (m + m.T)          # indefinite
    g = torch.randn(n, generator=gen, dtype=DT)
    lam, v = torch.linalg.eigh(h)
    for delta in (1e-3, 0.3, 5.0):
        s_t, _ = eig_trust_step(v.T @ g, lam, delta)
        s = v @ s_t
        assert s.norm() <= delta * (1 + 1e-10)
        # KKT: (H + mu I) s = -g with mu >= max(0, -lambda_min), on the boundary when mu > 0.
        mu = (-(g + h @ s) @ s / (s @ s)).item()
        assert mu >= -lam[0].item() - 1e-8
        assert torch.allclose((h + mu * torch.eye(n, dtype=DT)) @ s, -g, atol=1e-7)
        # No random feasible point does better on the model (brute force).
        model = lambda d: (g @ d + 0.5 * d @ h @ d).item()  # noqa: E731
        cand = torch.randn(2000, n, generator=gen, dtype=DT)
        cand = cand / cand.norm(dim=1, keepdim=True) * delta * torch.rand(
            2000, 1, generator=gen, dtype=DT)
        best = min(model(c) for c in cand)
        assert model(s) <= best + 1e-12


def test_trust_region_hard_case_uses_the_lowest_eigenvector():
    lam = torch.tensor([-1.0, 2.0, 3.0], dtype=DT)
    gt = torch.tensor([0.0, 0.1, 0.1], dtype=DT)   # no gradient along the negative direction
    s, kind = eig_trust_step(gt, lam, 1.0)
    assert kind == "negative curvature"
    assert s.norm().item() == pytest.approx(1.0)
    assert abs(s[0].item()) > 0.9


def test_steihaug_model_value_matches_an_explicit_product():
    gen = torch.Generator().manual_seed(3)
    n = 30
    m = torch.randn(n, n, generator=gen, dtype=DT)
    h = m @ m.T / n + 0.1 * torch.eye(n, dtype=DT)
    g = torch.randn(n, generator=gen, dtype=DT)
    for delta in (0.05, 100.0):
        d, gd, dhd, kind, used = steihaug_cg(lambda v: h @ v, g, delta, 200, 1e-12)
        assert gd == pytest.approx((g @ d).item(), rel=1e-10)
        assert dhd == pytest.approx((d @ h @ d).item(), rel=1e-8)
        assert d.norm() <= delta * (1 + 1e-10)
        if delta == 100.0:
            assert kind == "newton"
            assert torch.allclose(d, -torch.linalg.solve(h, g), atol=1e-8)


def test_lanczos_estimates_the_extreme_eigenvalues():
    gen = torch.Generator().manual_seed(1)
    n = 200
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    evals = torch.linspace(-0.5, 4.0, n, dtype=DT)
    h = q @ torch.diag(evals) @ q.T
    lo, vec, hi = lanczos_min_eig(lambda v: h @ v, n, DT, 80)
    assert lo == pytest.approx(-0.5, abs=1e-3) and hi == pytest.approx(4.0, abs=1e-3)
    assert (vec @ h @ vec).item() == pytest.approx(lo, abs=1e-9)


class _NoForwardTanh(torch.autograd.Function):
    """tanh with a backward formula but no forward-mode rule (like some fused kernels)."""

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


def test_hvp_falls_back_to_reverse_over_reverse():
    w0 = torch.randn(6, dtype=DT)

    def f(w):
        return (_NoForwardTanh.apply(w) ** 2).sum() + (w ** 4).sum()

    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.func.jvp(torch.func.grad(f), (w0,), (w0,))
    v = torch.randn(6, dtype=DT)
    hv = hvp_function(f, w0)(v)
    eps = 1e-6
    g = torch.func.grad(f)
    fd = (g(w0 + eps * v) - g(w0 - eps * v)) / (2 * eps)
    assert torch.allclose(hv, fd, atol=1e-7)


def test_dense_hessian_equals_torch_func_hessian():
    task, _, _ = mlp_task()
    from engine.training import pretrain_objective

    x, y = task.pretrain_data
    obj = pretrain_objective(task, x, y)
    ub, w, _ = task.initial_state()
    theta = torch.cat([ub, w])
    ref = torch.func.hessian(obj)(theta)
    assert torch.allclose(dense_hessian(obj, theta, chunk=7), 0.5 * (ref + ref.T), atol=1e-12)


@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_both_stages_reach_a_certified_minimum_at_round_off(scenario):
    task, _, _ = mlp_task(scenario=scenario)
    fit = fit_two_stage(task, tolerance=(1e-12, 1e-12))
    for stage in (fit.pretrain, fit.finetune):
        assert stage.converged and stage.status == "minimum"
        assert stage.final_grad_norm <= 1e-12
        assert stage.min_eigenvalue > 0 and stage.curvature_check == "exact eigenvalues"


def test_warm_started_retrain_reuses_the_reference_curvature():
    task, _, _ = mlp_task(m=80)
    ref = fit_two_stage(task, tolerance=(1e-12, 1e-12))
    weights = torch.ones(task.n_pretrain, dtype=DT)
    weights[3] = 0.0
    retrain = fit_two_stage(task, tolerance=(1e-12, 1e-12), sample_weights=weights,
                            warm_start=ref)
    # One Hessian per stage (the certificate at the new point), no L-BFGS at all.
    assert retrain.pretrain.hessians == 1 and retrain.pretrain.iterations == 0
    assert retrain.pretrain.converged and retrain.pretrain.final_grad_norm <= 1e-12
    # The same retrain without the hint (parameters only) lands on the same minimum.
    from engine.training import TwoStageFit

    bare = TwoStageFit(ref.backbone_pre, ref.w, ref.backbone_ft, ref.t)
    plain = fit_two_stage(task, tolerance=(1e-12, 1e-12), sample_weights=weights,
                          warm_start=bare)
    assert plain.pretrain.iterations > 0
    assert torch.allclose(retrain.backbone_pre, plain.backbone_pre, atol=1e-9)
