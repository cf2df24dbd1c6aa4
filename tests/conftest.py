"""Shared fixtures: small two-stage tasks with known structure, and the real sample run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from engine.task import TwoStageTask, squared_error

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "sample_data" / "digits"
SAMPLE_CONFIG = DIGITS / "config.toml"

# The test models are tiny: OpenMP threads only add spin-wait overhead (7x slower under load).
torch.set_num_threads(1)


def ridge_task(scenario: str = "fixed", alpha: float = 2.0, seed: int = 0, m: int = 60,
               n: int = 30, k: int = 6, d: int = 5, h: int = 3
               ) -> tuple[TwoStageTask, torch.Tensor, torch.Tensor]:
    """Two ridge regressions: linear backbone U (h x d), identity pretraining head, linear
    finetuning head T (1 x h), squared losses.  Returns (task, x_test, y_test), float64."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    xp = torch.randn(m, d, generator=g, dtype=dt)
    a = torch.randn(d, h, generator=g, dtype=dt)
    yp = xp @ a + 0.5 * torch.randn(m, h, generator=g, dtype=dt)
    c = torch.randn(h, generator=g, dtype=dt)
    xf = torch.randn(n, d, generator=g, dtype=dt)
    yf = xf @ a @ c + 0.3 * torch.randn(n, generator=g, dtype=dt)
    xt = torch.randn(k, d, generator=g, dtype=dt)
    yt = xt @ a @ c + 0.3 * torch.randn(k, generator=g, dtype=dt)
    torch.manual_seed(seed)
    task = TwoStageTask(
        nn.Linear(d, h, bias=False).double(), nn.Identity(), nn.Linear(h, 1, bias=False).double(),
        (xp, yp), (xf, yf), squared_error, squared_error, pretrain_weight_decay=0.1,
        finetune_weight_decay=0.05, scenario=scenario, alpha=alpha)
    return task, xt, yt


def mlp_task(scenario: str = "fixed", alpha: float = 1.0, seed: int = 0, m: int = 40,
             n: int = 30, k: int = 4, d: int = 4, hidden: int = 5,
             tracked: list[str] | None = None, activation: type[nn.Module] = nn.Tanh
             ) -> tuple[TwoStageTask, torch.Tensor, torch.Tensor]:
    """A small smooth MLP: 3-class pretraining, 2-class finetuning, weight decay, float64."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    centers = 2.0 * torch.randn(3, d, generator=g, dtype=dt)

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        lab = torch.randint(3, (count,), generator=g)
        return centers[lab] + torch.randn(count, d, generator=g, dtype=dt), lab

    xp, yp = sample(m)
    xf, lf = sample(n)
    xt, lt = sample(k)
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(d, hidden), activation()).double()
    task = TwoStageTask(
        backbone, nn.Linear(hidden, 3).double(), nn.Linear(hidden, 2).double(),
        (xp, yp), (xf, (lf == 0).long()), pretrain_weight_decay=1e-2,
        finetune_weight_decay=1e-2, scenario=scenario, alpha=alpha, tracked_backbone=tracked)
    return task, xt, (lt == 0).long()


@pytest.fixture(scope="session")
def small_config(tmp_path_factory) -> Path:
    """150 pretraining digits, 40 finetuning, 25 test; 8 hidden units; PCA map."""
    d = tmp_path_factory.mktemp("cfg")
    pd.read_parquet(DIGITS / "pretrain.parquet").iloc[:150].to_parquet(d / "pre.parquet")
    pd.read_parquet(DIGITS / "finetune_train.parquet").iloc[:40].to_parquet(d / "ft.parquet")
    pd.read_parquet(DIGITS / "finetune_test.parquet").iloc[:25].to_parquet(d / "test.parquet")
    text = (DIGITS / "config.toml").read_text()
    text = (text.replace('"pretrain.parquet"', '"pre.parquet"')
                .replace('"finetune_train.parquet"', '"ft.parquet"')
                .replace('"finetune_test.parquet"', '"test.parquet"')
                .replace("hidden = [32]", "hidden = [8]")
                .replace('method = "umap"', 'method = "pca"'))
    (d / "config.toml").write_text(text)
    return d / "config.toml"


@pytest.fixture(scope="session")
def sample_run() -> Path:
    """The real sample run (runs/digits), built with the README's command if missing."""
    run_dir = ROOT / "runs" / "digits"
    if not (run_dir / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "engine", "run", str(SAMPLE_CONFIG), "--out", str(run_dir),
             "--overwrite"],
            cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return run_dir
