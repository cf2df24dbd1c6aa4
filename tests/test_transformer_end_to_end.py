"""A transformer backbone (nn.Embedding + nn.TransformerEncoderLayer + mean pooling) scored end
to end: CG on both stages agrees with the exact solver in both scenarios, in train mode (math or
flash attention) and in eval mode (where PyTorch takes its fused fast path without grad)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.autodiff import FORWARD
from engine.curvature import (
    CGSolver,
    finetune_head_hessian,
    finetune_joint_hessian,
    pretrain_hessian,
)
from engine.scores import InfluenceArguments, compute_scores
from engine.task import TwoStageTask
from engine.training import NotConvergedWarning, fit_two_stage
from engine.trust_region import NewtonSettings, lanczos_min_eig

VOCAB, D_MODEL, LENGTH = 12, 8, 5


class TokenBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D_MODEL)
        self.encoder = nn.TransformerEncoderLayer(D_MODEL, nhead=2, dim_feedforward=16,
                                                  dropout=0.0, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embedding(tokens)).mean(dim=1)


def token_task(scenario: str, train_mode: bool, seed: int = 0):
    """Tiny synthetic token data: the label is a function of the first token."""
    gen = torch.Generator().manual_seed(seed)

    def data(n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(VOCAB, (n, LENGTH), generator=gen)
        return x, x[:, 0] % classes

    torch.manual_seed(seed)
    modules = (TokenBackbone().double(), nn.Linear(D_MODEL, 3).double(),
               nn.Linear(D_MODEL, 2).double())
    for m in modules:
        m.train(train_mode)
    x_test, y_test = data(3, 2)
    task = TwoStageTask(*modules, data(24, 3), data(16, 2), pretrain_weight_decay=1e-2,
                        finetune_weight_decay=1e-2, scenario=scenario, alpha=1.0)
    return task, x_test, y_test


def short_fit(task):
    """25 L-BFGS iterations per stage, no Newton phase: not a minimum (damping makes the
    curvatures positive definite below)."""
    with pytest.warns(NotConvergedWarning):
        return fit_two_stage(task, tolerance=(1e-9, 1e-9), max_iter=(25, 25),
                             newton=NewtonSettings(max_hessians=0))


def damping_for(op) -> float:
    """Above the most negative eigenvalue (a Lanczos estimate, with a margin)."""
    lowest, _, _ = lanczos_min_eig(lambda v: op.matvec(v[:, None])[:, 0], op.dim,
                                   torch.float64, 30)
    return 1.5 * max(0.0, -lowest) + 0.1


@pytest.mark.parametrize(("scenario", "train_mode"), [
    ("fixed", True), ("updated", True), ("fixed", False), ("updated", False)])
def test_transformer_scores_with_cg_match_exact(scenario, train_mode):
    task, x_test, y_test = token_task(scenario, train_mode)
    if not train_mode:
        # Outside our calls PyTorch takes the fused fast path here, which has no forward mode.
        with torch.no_grad():
            task.features(task.initial_state()[0], x_test)
        with pytest.raises(NotImplementedError):
            torch.func.jvp(lambda e: task.backbone.encoder(e).sum(),
                           (torch.randn(2, LENGTH, D_MODEL, dtype=torch.float64),),
                           (torch.randn(2, LENGTH, D_MODEL, dtype=torch.float64),))
    fit = short_fit(task)
    finetune_op = (finetune_head_hessian if scenario == "fixed" else finetune_joint_hessian)
    damping = {"pretrain_damping": damping_for(pretrain_hessian(task, fit)),
               "finetune_damping": damping_for(finetune_op(task, fit))}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    exact = compute_scores(task, fit, x_test, y_test, InfluenceArguments(**damping))
    cg = compute_scores(task, fit, x_test, y_test, InfluenceArguments(
        pretrain_solver=CGSolver(rtol=1e-10), finetune_solver=CGSolver(rtol=1e-10), **damping))
    assert torch.backends.mha.get_fastpath_enabled() == fast_path    # restored
    for scores in (exact, cg):
        assert scores.total.shape == (3, 24)
        assert torch.isfinite(scores.total).all()
        torch.testing.assert_close(scores.total, scores.pretrained_term + scores.finetuned_term)
    rel = ((cg.total - exact.total).norm() / exact.total.norm()).item()
    assert rel < 1e-6
    for stage in ("pretrain", "finetune"):
        info = cg.settings[stage]
        assert info["hvp"] == FORWARD     # forward mode works once attention runs on math kernels
        assert info["true_relative_residual_max"] <= 1e-9
