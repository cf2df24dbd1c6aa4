"""Speed and memory of the influence engine on a ~100k-parameter MLP (20,000 pretraining examples).

Measures, for K = 1, 8 and 32 test points (defaults; ``--quick`` shrinks everything):

* the scoring pass, :func:`engine.scores.score_pretraining`, divided by ONE plain training epoch
  over the same pretraining data (forward + backward of the mean loss, same batch size, an SGD
  step).  The headline is ``method="auto"`` (what ``InfluenceArguments.scoring_method`` defaults
  to: ``"jvp"`` while 2K <= ``jvp_max_columns``, else ``"gradients"``); both methods are also
  timed on their own as variants (``--variants``): ``"jvp"`` = forward-mode directional
  derivatives of the per-example losses along the 2K directions, ``"gradients"`` =
  per-parameter-tensor per-example gradients contracted block by block with ``addmm``;
* the time of each phase: training (a short FIXED number of full-batch L-BFGS iterations via
  :func:`engine.training.minimize_lbfgs`, Newton polish off), curvature + solves
  (:func:`engine.scores.influence_directions`; exact eigendecomposition of the small finetuning
  head Hessian, CG with a fixed iteration budget and damping on the 100k-dim pretraining Hessian),
  scoring;
* peak resident memory per phase (VmHWM from ``/proc/self/status``, reset before each phase and
  before each scoring method; ``getrusage`` maxrss only as a fallback, as it survives fork + exec
  and stops tracking after a reset; ``tracemalloc`` does not see torch's allocator), and the
  scoring pass alone in fresh subprocesses for several numbers of pretraining examples M
  (``--mem-variants``, auto and gradients by default), printed net of the input data and of the
  output matrices, to show it does not grow with M;
* the speed-up over a naive loop that calls ``torch.autograd.grad`` once per pretraining example
  and dots the gradient with the directions (timed on a subset, extrapolated per example).  The
  naive loop's scores are the reference: every method's scores must agree with them (max
  |difference| / max |naive score| <= ``--agree-rtol``), else the run exits with status 1;
* the arithmetic floor of exact per-pair scores: forward (2·M·P flops) + per-example weight
  gradients (2·M·P) + their contraction with the 2K directions (2·M·P·2K), i.e. (4K + 4)·M·P
  against ~6·M·P for an epoch, turned into seconds with a measured single-thread sgemm rate.

``--grid`` instead times every scoring method (and ``auto``) alone on MLPs, CNNs, both with
normalization layers, bag-of-embeddings models (``nn.Embedding`` + mean, ``nn.EmbeddingBag``) and
a small transformer, at K = 1, 8, 32 and two sizes each (``GRID_MODELS``), random parameters and
directions: the measurements behind ``"auto"`` (``engine.scores._auto_method``).  Writes
``benchmarks/out/engine_bench_grid.json`` (``--grid-json``).

Timings are medians of ``--repeats`` runs with ``--threads`` torch threads (1 by default: on a
shared 2-core machine two OpenMP threads spin against other jobs and run up to ~30x slower).  The
load average and the CPU-time / wall-time ratio of each timed call are recorded to show contention.

    python benchmarks/engine_bench.py            # full size, ~10 min on one loaded core
    python benchmarks/engine_bench.py --quick    # smoke run, seconds

Writes ``benchmarks/out/engine_bench.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine import curvature as engine_solvers  # noqa: E402
from engine.config import SCORING_METHODS  # noqa: E402
from engine.curvature import CGSolver, ExactSolver  # noqa: E402
from engine.scores import (  # noqa: E402
    Directions,
    InfluenceArguments,
    influence_directions,
    score_pretraining,
)
from engine.task import TwoStageTask  # noqa: E402
from engine.training import (  # noqa: E402
    TwoStageFit,
    finetune_objective,
    minimize_lbfgs,
    pretrain_objective,
)

TARGETS = {
    "scoring / epoch at K=8": "<= 3x",
    "speed-up over the naive loop": ">= 10x",
    "scoring memory vs M": "independent of M apart from the output",
}
METHODS = SCORING_METHODS
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MB = 1024 * 1024
# The solvers' "not positive definite" error (renamed once; both names are ValueErrors).
NotPositiveDefinite: type[Exception] = getattr(
    engine_solvers, "NotPositiveDefiniteError",
    getattr(engine_solvers, "CurvatureNotPositiveDefinite", ValueError))


# ----- setup ---------------------------------------------------------------------------------
def make_modules(input_dim: int, hidden: list[int], pre_classes: int,
                 ft_classes: int, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, nn.Module]:
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    backbone = nn.Sequential(*layers).to(dtype)
    return (backbone, nn.Linear(width, pre_classes).to(dtype),
            nn.Linear(width, ft_classes).to(dtype))


def make_data(n: int, input_dim: int, classes: int, seed: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs, labels from a fixed random linear teacher plus noise."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(input_dim, classes, generator=torch.Generator().manual_seed(classes))
    x = torch.randn(n, input_dim, generator=gen)
    logits = x @ teacher / input_dim ** 0.5 + 0.5 * torch.randn(n, classes, generator=gen)
    return x.to(dtype), logits.argmax(1)


def make_task(cfg: argparse.Namespace, n_pretrain: int) -> TwoStageTask:
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    backbone, pre_head, ft_head = make_modules(cfg.input_dim, cfg.hidden, cfg.pre_classes,
                                               cfg.ft_classes, dtype)
    return TwoStageTask(
        backbone, pre_head, ft_head,
        pretrain_data=make_data(n_pretrain, cfg.input_dim, cfg.pre_classes, cfg.seed + 1, dtype),
        finetune_data=make_data(cfg.n_finetune, cfg.input_dim, cfg.ft_classes, cfg.seed + 2,
                                dtype),
        pretrain_weight_decay=cfg.weight_decay, finetune_weight_decay=cfg.weight_decay,
        scenario=cfg.scenario)


def initial_fit(task: TwoStageTask) -> TwoStageFit:
    ub, w, t = task.initial_state()
    return TwoStageFit(ub, w, ub, t)


def random_directions(task: TwoStageTask, k: int, seed: int) -> Directions:
    """Directions of the right shape (the scoring cost does not depend on their values)."""
    gen = torch.Generator().manual_seed(seed)
    n = task.u_layout.numel + task.w_layout.numel
    r = torch.randn(n, 2 * k, generator=gen).to(task.dtype)
    return Directions(r[: task.u_layout.numel, :k], r[: task.u_layout.numel, k:],
                      r[:, :k].contiguous(), r[:, k:].contiguous())


# ----- measurement helpers -------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size (VmHWM) since the process started or since :func:`reset_peak`.

    VmHWM rather than ``getrusage`` maxrss: on Linux maxrss survives fork + exec, so a fresh
    subprocess would report its parent's peak; maxrss is used only where VmHWM is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5) so a phase's own peak is read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def timed(fn: Callable[[], object], repeats: int) -> dict:
    """Median wall time of ``repeats`` calls, with CPU/wall ratios (contention indicator)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"median_s": statistics.median(walls), "runs_s": [round(s, 4) for s in walls],
            "cpu_median_s": statistics.median(cpus),
            "cpu_over_wall": round(sum(cpus) / max(sum(walls), 1e-12), 3), "result": result}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "result"}


# ----- the phases ----------------------------------------------------------------------------
def train(task: TwoStageTask, cfg: argparse.Namespace) -> tuple[TwoStageFit, dict]:
    """A fixed budget of full-batch L-BFGS iterations per stage, no Newton polish.

    (``fit_two_stage`` trains to a gradient tolerance and then runs up to 30 Newton-CG polish
    steps, far too slow at 100k parameters for a benchmark, so the stages are run directly.)
    """
    nb = task.backbone_layout.numel
    ub0, w0, t0 = task.initial_state()
    x, y = task.pretrain_data
    xf, yf = task.finetune_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotConvergedWarning is expected with a fixed budget
        start = time.perf_counter()
        pre = minimize_lbfgs(pretrain_objective(task, x, y), torch.cat([ub0, w0]),
                             tolerance=0.0, max_iter=cfg.lbfgs_iters, name="pretraining",
                             newton_steps=0)
        pre_s = time.perf_counter() - start
        backbone_pre, w = pre.params[:nb], pre.params[nb:]
        x0 = t0 if task.scenario == "fixed" else torch.cat([t0, backbone_pre])
        start = time.perf_counter()
        ft = minimize_lbfgs(finetune_objective(task, backbone_pre, xf, yf), x0, tolerance=0.0,
                            max_iter=cfg.ft_lbfgs_iters, name="finetuning", newton_steps=0)
        ft_s = time.perf_counter() - start
    nt = task.t_layout.numel
    if task.scenario == "fixed":
        t, backbone_ft = ft.params, backbone_pre
    else:
        t, backbone_ft = ft.params[:nt], ft.params[nt:]
    info = {"pretrain_s": pre_s, "finetune_s": ft_s, "pretrain": pre.summary(),
            "finetune": ft.summary()}
    return TwoStageFit(backbone_pre, w, backbone_ft, t, pre, ft), info


def solve_directions(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                     y_test: torch.Tensor, cfg: argparse.Namespace,
                     damping: float) -> tuple[Directions, dict]:
    """influence_directions with CG (fixed budget) on H; retries with 10x damping on breakdown."""
    for _ in range(4):
        cg = CGSolver(rtol=cfg.cg_rtol, max_iter=cfg.cg_iters, fixed_iterations=True)
        ft_solver = (ExactSolver() if task.scenario == "fixed"
                     else CGSolver(rtol=cfg.cg_rtol, max_iter=cfg.cg_iters, fixed_iterations=True))
        args = InfluenceArguments(pretrain_damping=damping, finetune_damping=cfg.finetune_damping,
                                  pretrain_solver=cg, finetune_solver=ft_solver,
                                  batch_size=cfg.batch_size,
                                  curvature_batch_size=cfg.curvature_batch_size)
        timings: dict[str, float] = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # CG stopping at max_iter is expected
                directions = influence_directions(task, fit, x_test, y_test, args, timings)
        except NotPositiveDefinite as exc:
            print(f"  CG breakdown at damping {damping:g} ({str(exc)[:80]}...); x10")
            damping *= 10
            continue
        return directions, {**timings, "pretrain_damping": damping,
                            "pretrain_solver": cg.describe(),
                            "finetune_solver": ft_solver.describe()}
    raise SystemExit("the pretraining Hessian stayed indefinite; raise --pretrain-damping")


def plain_epoch_fn(task: TwoStageTask, fit: TwoStageFit,
                   batch_size: int) -> Callable[[], float]:
    """One SGD epoch (forward + backward of the mean loss, step) on copies of the modules."""
    backbone, head = copy.deepcopy(task.backbone), copy.deepcopy(task.pretrain_head)
    task.backbone_layout.load_into(backbone, fit.backbone_pre)
    task.w_layout.load_into(head, fit.w)
    model = nn.Sequential(backbone, head)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = task.pretrain_data

    def epoch() -> float:
        total = 0.0
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = task.pretrain_loss(model(xb), yb).mean()
            loss.backward()
            opt.step()
            total += loss.item()
        return total

    return epoch


def naive_scores(task: TwoStageTask, fit: TwoStageFit, directions: Directions,
                 n: int) -> torch.Tensor:
    """One ``torch.autograd.grad`` call per example, flattened and dotted with the directions.

    Returns (n, 2K) with the same 1/M scaling as ``score_pretraining``.
    """
    backbone, head = copy.deepcopy(task.backbone), copy.deepcopy(task.pretrain_head)
    task.backbone_layout.load_into(backbone, fit.backbone_pre)
    task.w_layout.load_into(head, fit.w)
    bp, hp = dict(backbone.named_parameters()), dict(head.named_parameters())
    params = [bp[n_] for n_ in task.u_layout.names] + [hp[n_] for n_ in task.w_layout.names]
    x, y = task.pretrain_data
    r = torch.cat([directions.r_pre, directions.r_ft], 1) / len(x)
    out = torch.empty(n, r.shape[1], dtype=r.dtype)
    for j in range(n):
        loss = task.pretrain_loss(head(backbone(x[j : j + 1])), y[j : j + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        out[j] = torch.cat([g.reshape(-1) for g in grads]) @ r
    return out


def warm_up(task: TwoStageTask, fit: TwoStageFit, batch_size: int, seed: int) -> None:
    """Run each scoring method once on one batch so first-call costs stay out of the timings."""
    x, y = task.pretrain_data
    small = dataclasses.replace(task, pretrain_data=(x[:batch_size], y[:batch_size]))
    directions = random_directions(small, 1, seed)
    for method in ("layerwise", "jvp", "gradients"):
        score_pretraining(small, fit, directions, batch_size, method=method)
    score_pretraining(small, fit, directions, batch_size, method="layerwise", direction_rank=4)


def sgemm_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` rate of an (n, n) @ (n, n) matmul: the core's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def exact_score_floor_flops(m: int, p: int, k: int) -> float:
    """Forward (2MP) + backward to the layer outputs (~2MP) + contraction with 2K columns (4KMP).

    The contraction ``g^T V a`` of each per-example gradient ``g a^T`` with each direction
    ``V`` costs ``2 d_in d_out`` flops however it is associated, so exact per-pair scores
    cannot go below this.
    """
    return (4 * k + 4) * m * p


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----- memory in fresh subprocesses ------------------------------------------------------------
def memory_child(cfg: argparse.Namespace) -> None:
    """Run one scoring pass for ``cfg.mem_child`` examples and print a JSON line."""
    torch.set_num_threads(cfg.threads)
    task = make_task(cfg, cfg.mem_child)
    fit = initial_fit(task)  # values do not matter for memory
    k = cfg.mem_k
    directions = random_directions(task, k, cfg.seed)
    x, y = task.pretrain_data
    input_mb = (x.numel() * x.element_size() + y.numel() * y.element_size()) / MB
    itemsize = torch.empty(0, dtype=task.dtype).element_size()
    # score_pretraining holds the (M, 2K) buffer and returns two (K, M) copies of it.
    output_mb = 2 * len(x) * 2 * k * itemsize / MB
    before = current_rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    info: dict = {}
    score_pretraining(task, fit, directions, cfg.batch_size, method=cfg.mem_variant, info=info)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    method = info["method"]
    print(json.dumps({"variant": cfg.mem_variant, "method": method, "M": len(x), "K": k,
                      "peak_rss_mb": peak, "rss_before_scoring_mb": before,
                      "input_mb": input_mb, "output_mb": output_mb,
                      "peak_minus_output_mb": peak - output_mb,
                      "peak_minus_output_input_mb": peak - output_mb - input_mb,
                      "scoring_increment_mb": peak - before - output_mb, "seconds": seconds}))


def run_memory(cfg: argparse.Namespace, variant: str, argv: list[str]) -> list[dict]:
    rows = []
    for m in cfg.mem_ms:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--mem-child", str(m),
               "--mem-variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory subprocess failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


# ----- method grid: which scoring method is fastest for which layer types --------------------
class _Cnn(nn.Module):
    """Conv2d stack (3x3 kernels, stride 2 after the first), tanh, global average pooling."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(width, c, 3, stride=1 if i == 0 else 2, padding=1), nn.Tanh()]
            width = c
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


class _Normed(nn.Module):
    """A backbone followed by a normalization layer on its features (LayerNorm for vectors,
    GroupNorm inside a CNN): parameters that are not linear/conv2d/embedding layers."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "mlp":
            self.body = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Tanh(),
                                      nn.Linear(256, 128), nn.LayerNorm(128), nn.Tanh())
        else:
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Tanh(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.Tanh(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        return z if z.dim() == 2 else z.mean(2)


class _EmbeddingMean(nn.Module):
    """Bag of embeddings (nn.Embedding + mean over positions, or nn.EmbeddingBag), then a
    tanh Linear."""

    def __init__(self, vocab: int, dim: int, bag: bool) -> None:
        super().__init__()
        self.bag = bag
        self.emb = (nn.EmbeddingBag(vocab, dim, mode="mean") if bag
                    else nn.Embedding(vocab, dim))
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.emb(x) if self.bag else self.emb(x).mean(1)
        return torch.tanh(self.lin(z))


class _Transformer(nn.Module):
    """Token embedding + learned positions + pre-norm encoder layers (no dropout), mean pool."""

    def __init__(self, vocab: int, dim: int, length: int, layers: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(length, dim))
        self.enc = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.emb(x) + self.pos
        for layer in self.enc:
            z = layer(z)
        return z.mean(1)


# name -> size -> (description, backbone factory, input factory (M, generator) -> x, features)
GRID_MODELS: dict[str, dict[str, tuple]] = {
    "mlp": {
        "small": ("MLP 64-64-32", lambda: make_modules(64, [64, 32], 10, 2, torch.float32)[0],
                  lambda m, g: torch.randn(m, 64, generator=g), 32),
        "large": ("MLP 256-256-128",
                  lambda: make_modules(256, [256, 128], 10, 2, torch.float32)[0],
                  lambda m, g: torch.randn(m, 256, generator=g), 128),
    },
    "cnn": {
        "small": ("CNN 3x16x16, conv 8-16", lambda: _Cnn([8, 16]),
                  lambda m, g: torch.randn(m, 3, 16, 16, generator=g), 16),
        "large": ("CNN 3x32x32, conv 16-32-32", lambda: _Cnn([16, 32, 32]),
                  lambda m, g: torch.randn(m, 3, 32, 32, generator=g), 32),
    },
    "mlp_layernorm": {
        "large": ("MLP 256-256-128 with LayerNorm", lambda: _Normed("mlp"),
                  lambda m, g: torch.randn(m, 256, generator=g), 128),
    },
    "cnn_groupnorm": {
        "large": ("CNN 3x32x32, conv 16-32-32 with GroupNorm", lambda: _Normed("cnn"),
                  lambda m, g: torch.randn(m, 3, 32, 32, generator=g), 32),
    },
    "embedding": {
        "small": ("Embedding 1000x32, 16 tokens, mean, Linear 32",
                  lambda: _EmbeddingMean(1000, 32, bag=False),
                  lambda m, g: torch.randint(1000, (m, 16), generator=g), 32),
        "large": ("Embedding 20000x64, 64 tokens, mean, Linear 64",
                  lambda: _EmbeddingMean(20000, 64, bag=False),
                  lambda m, g: torch.randint(20000, (m, 64), generator=g), 64),
    },
    "embedding_bag": {
        "small": ("EmbeddingBag 1000x32 (mean), 16 tokens, Linear 32",
                  lambda: _EmbeddingMean(1000, 32, bag=True),
                  lambda m, g: torch.randint(1000, (m, 16), generator=g), 32),
        "large": ("EmbeddingBag 20000x64 (mean), 64 tokens, Linear 64",
                  lambda: _EmbeddingMean(20000, 64, bag=True),
                  lambda m, g: torch.randint(20000, (m, 64), generator=g), 64),
    },
    "transformer": {
        "small": ("Transformer d=32, 1 layer, 16 tokens, vocab 500",
                  lambda: _Transformer(500, 32, 16, 1),
                  lambda m, g: torch.randint(500, (m, 16), generator=g), 32),
        "large": ("Transformer d=64, 2 layers, 32 tokens, vocab 2000",
                  lambda: _Transformer(2000, 64, 32, 2),
                  lambda m, g: torch.randint(2000, (m, 32), generator=g), 64),
    },
}


def grid_task(model: str, size: str, m: int, seed: int) -> tuple[TwoStageTask, str]:
    desc, backbone_fn, x_fn, width = GRID_MODELS[model][size]
    torch.manual_seed(seed)
    backbone = backbone_fn().float()
    gen = torch.Generator().manual_seed(seed + 1)
    x = x_fn(m, gen)
    y = torch.randint(10, (m,), generator=gen)
    xf = x_fn(64, gen)
    yf = torch.randint(2, (64,), generator=gen)
    task = TwoStageTask(backbone, nn.Linear(width, 10), nn.Linear(width, 2), (x, y), (xf, yf),
                        pretrain_weight_decay=1e-4)
    return task, desc


def run_grid(cfg: argparse.Namespace) -> dict:
    """Time score_pretraining for each grid model x size x K x method on random directions.

    Scores of every exact method are compared with ``gradients`` (max |diff| / max |score|).
    """
    torch.set_num_threads(cfg.threads)
    rows = []
    methods = ["auto", "layerwise", "jvp", "gradients"]
    print(f"method grid: M={cfg.grid_m}, batch {cfg.batch_size}, {cfg.threads} thread(s), "
          f"medians of {cfg.grid_repeats}; load average {loadavg()}")
    for model in cfg.grid_models:
        for size in [s for s in cfg.grid_sizes if s in GRID_MODELS[model]]:
            task, desc = grid_task(model, size, cfg.grid_m, cfg.seed)
            fit = initial_fit(task)
            n_params = task.u_layout.numel + task.w_layout.numel
            x, y = task.pretrain_data
            small = dataclasses.replace(task, pretrain_data=(x[: cfg.batch_size // 4],
                                                             y[: cfg.batch_size // 4]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # functorch's "no batching rule" notices
                for method in methods:            # warm-up (first-call costs)
                    try:
                        score_pretraining(small, fit, random_directions(small, 1, cfg.seed),
                                          cfg.batch_size, method=method)
                    except (NotImplementedError, RuntimeError):
                        pass
                previous: dict | None = None
                for k in cfg.grid_ks:
                    directions = random_directions(task, k, cfg.seed)
                    row: dict = {"model": model, "size": size, "description": desc,
                                 "params": n_params, "K": k, "M": cfg.grid_m, "methods": {}}
                    scores = {}
                    for method in methods:
                        info: dict = {}
                        if previous is not None and method == "jvp":
                            # jvp costs ~ 2K forward passes: skip it when the estimate is more
                            # than 5x the fastest method at the previous K (and above 5 s).
                            est = previous["methods"]["jvp"]["median_s"] * k / previous["K"]
                            best = previous["methods"][previous["fastest"]]["median_s"]
                            if est > max(5.0, 5 * best):
                                row["methods"][method] = {
                                    "median_s": est, "skipped": True, "runs": method,
                                    "note": f"skipped: estimated {est:.0f} s from K="
                                            f"{previous['K']}"}
                                continue
                        try:
                            res = timed(lambda d=directions, mt=method, i=info, t=task, f=fit:
                                        score_pretraining(t, f, d, cfg.batch_size, method=mt,
                                                          info=i), cfg.grid_repeats)
                        except (NotImplementedError, RuntimeError) as exc:
                            row["methods"][method] = {"median_s": float("inf"),
                                                      "error": str(exc).splitlines()[0][:200],
                                                      "runs": method}
                            print(f"  {model} {size} K={k} {method}: FAILED "
                                  f"({row['methods'][method]['error'][:90]})")
                            continue
                        pre, ft = res.pop("result")
                        scores[method] = torch.cat([pre, ft])
                        res["runs"] = info["method"]
                        res["why"] = info.get("why")
                        res["per_example_gradient_tensors"] = info[
                            "per_example_gradient_tensors"]
                        row["methods"][method] = res
                    ref = scores["gradients"]
                    for method, res in row["methods"].items():
                        res["max_rel_diff_vs_gradients"] = (
                            max_rel_diff(scores[method], ref) if method in scores else None)
                    exact = {mt: r for mt, r in row["methods"].items() if mt != "auto"}
                    row["fastest"] = min(exact, key=lambda mt: exact[mt]["median_s"])
                    # Under contention CPU time is the steadier measure (1 thread).
                    row["fastest_cpu"] = min(exact, key=lambda mt: exact[mt].get(
                        "cpu_median_s", exact[mt]["median_s"]))
                    rows.append(row)
                    previous = row
                    times = "  ".join(f"{mt} {r['median_s']:7.3f}s" + ("(est)" if r.get(
                        "skipped") else "") for mt, r in row["methods"].items())
                    diff = max(r["max_rel_diff_vs_gradients"] or 0.0
                               for r in row["methods"].values())
                    print(f"{model:>13} {size:>5} ({n_params:>9,} params) K={k:>3}: {times}  "
                          f"auto -> {row['methods']['auto']['runs']}; fastest "
                          f"{row['fastest']} (cpu: {row['fastest_cpu']}); max rel diff "
                          f"{diff:.1e}; load {loadavg()[0]}")
    return {"loadavg_end": loadavg(), "rows": rows}


# ----- main ----------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke run (seconds); overrides the size options")
    p.add_argument("--n-pretrain", type=int, default=20_000)
    p.add_argument("--n-finetune", type=int, default=2_000)
    p.add_argument("--input-dim", type=int, default=256)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 128])
    p.add_argument("--pre-classes", type=int, default=10)
    p.add_argument("--ft-classes", type=int, default=2)
    p.add_argument("--scenario", choices=["fixed", "updated"], default="fixed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32], help="numbers of test points")
    p.add_argument("--batch-size", type=int, default=512,
                   help="scoring batch size = plain-epoch minibatch size")
    p.add_argument("--curvature-batch-size", type=int, default=1024)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="both stages")
    p.add_argument("--lbfgs-iters", type=int, default=25, help="pretraining L-BFGS iterations")
    p.add_argument("--ft-lbfgs-iters", type=int, default=100,
                   help="finetuning L-BFGS iterations")
    p.add_argument("--cg-iters", type=int, default=10, help="CG iterations on H (fixed budget)")
    p.add_argument("--cg-rtol", type=float, default=1e-6)
    p.add_argument("--pretrain-damping", type=float, default=1e-2)
    p.add_argument("--finetune-damping", type=float, default=1e-3)
    p.add_argument("--naive-examples", type=int, default=500,
                   help="examples timed with the naive loop (extrapolated per example)")
    p.add_argument("--variants", nargs="*", default=["layerwise", "jvp", "gradients"],
                   choices=["layerwise", "jvp", "gradients"],
                   help="exact methods timed besides the auto headline (none: --variants)")
    p.add_argument("--ranks", type=int, nargs="*", default=[8, 16],
                   help="direction ranks of the APPROXIMATE layerwise variants (none: --ranks)")
    p.add_argument("--agree-rtol", type=float, default=1e-4,
                   help="max |score - naive| / max |naive| for a method to count as agreeing")
    p.add_argument("--mem-ms", type=int, nargs="+", default=[5_000, 10_000, 20_000])
    p.add_argument("--mem-k", type=int, default=8)
    p.add_argument("--mem-variants", nargs="+", default=["auto", "gradients"], choices=METHODS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--grid", action="store_true",
                   help="only the method grid: every scoring method on each --grid-models "
                        "model (scoring alone, random directions), writes --grid-json")
    p.add_argument("--grid-models", nargs="+", default=list(GRID_MODELS),
                   choices=list(GRID_MODELS))
    p.add_argument("--grid-sizes", nargs="+", default=["small", "large"],
                   choices=["small", "large"])
    p.add_argument("--grid-ks", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--grid-m", type=int, default=2048, help="pretraining examples in the grid")
    p.add_argument("--grid-repeats", type=int, default=2)
    p.add_argument("--grid-json", type=Path,
                   default=ROOT / "benchmarks" / "out" / "engine_bench_grid.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "engine_bench.json")
    p.add_argument("--mem-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mem-variant", default="auto", choices=METHODS, help=argparse.SUPPRESS)
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.n_pretrain, cfg.n_finetune, cfg.input_dim, cfg.hidden = 2_000, 300, 64, [64, 32]
        cfg.ks, cfg.lbfgs_iters, cfg.ft_lbfgs_iters, cfg.cg_iters = [1, 8], 5, 20, 3
        cfg.naive_examples, cfg.mem_ms, cfg.repeats = 100, [2_000, 4_000, 8_000], 1
    return cfg


def time_method(task: TwoStageTask, fit: TwoStageFit, directions: Directions, method: str,
                naive: torch.Tensor, per_example_naive: float, epoch_s: float,
                cfg: argparse.Namespace, rank: int | None = None) -> dict:
    """Time score_pretraining(method=...) and compare its scores with the naive loop's."""
    k, n = directions.r_pre.shape[1], len(naive)
    info: dict = {}
    reset_peak()
    res = timed(lambda: score_pretraining(task, fit, directions, cfg.batch_size, method=method,
                                          direction_rank=rank, info=info), cfg.repeats)
    res["peak_rss_mb"] = peak_rss_mb()
    pre, ft = res.pop("result")
    res["scores"] = torch.cat([pre, ft])  # kept in memory only, for the approximate variants
    res["runs"] = info["method"]
    res["direction_rank"] = info.get("direction_rank")
    res["max_rel_diff_vs_naive"] = max(max_rel_diff(pre[:, :n], naive[:, :k].T),
                                       max_rel_diff(ft[:, :n], naive[:, k:].T))
    res["exact"] = rank is None
    res["agrees_with_naive"] = res["max_rel_diff_vs_naive"] <= cfg.agree_rtol
    res["scoring_over_epoch"] = res["median_s"] / epoch_s
    res["speedup_vs_naive"] = per_example_naive / (res["median_s"] / cfg.n_pretrain)
    return res


def accuracy_vs_exact(approx: torch.Tensor, exact: torch.Tensor, top: int = 10) -> dict:
    """Per score column (test point x term): Pearson, and overlap of the ``top`` most harmful
    and most helpful examples; means over the columns."""
    a, e = approx.double(), exact.double()
    ac, ec = a - a.mean(1, keepdim=True), e - e.mean(1, keepdim=True)
    pearson = (ac * ec).sum(1) / (ac.norm(dim=1) * ec.norm(dim=1)).clamp_min(1e-300)

    def overlap(largest: bool) -> float:
        ia = a.topk(top, dim=1, largest=largest).indices
        ie = e.topk(top, dim=1, largest=largest).indices
        common = sum(len(set(x.tolist()) & set(y.tolist()))
                     for x, y in zip(ia, ie, strict=True))
        return common / (top * len(a))

    return {"pearson_mean": float(pearson.mean()), "pearson_min": float(pearson.min()),
            f"top{top}_harmful_overlap": overlap(False), f"top{top}_helpful_overlap": overlap(True),
            "relative_error": float((a - e).norm() / e.norm())}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    if cfg.mem_child is not None:
        memory_child(cfg)
        return 0
    if cfg.grid:
        if cfg.quick:
            cfg.grid_m, cfg.grid_ks, cfg.grid_repeats, cfg.grid_sizes = 256, [1, 8], 1, ["small"]
        grid = run_grid(cfg)
        cfg.grid_json.parent.mkdir(parents=True, exist_ok=True)
        cfg.grid_json.write_text(json.dumps(
            {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
             "env": {"torch": torch.__version__, "threads": cfg.threads,
                     "cpus": os.cpu_count()}, **grid}, indent=2, default=str))
        print(f"wrote {cfg.grid_json}")
        bad = [(r["model"], r["size"], r["K"], m) for r in grid["rows"]
               for m, res in r["methods"].items()
               if (res.get("max_rel_diff_vs_gradients") or 0.0) > cfg.agree_rtol]
        if bad:
            print(f"ERROR: scores disagree with 'gradients' beyond {cfg.agree_rtol:g}: {bad}")
            return 1
        return 0
    torch.set_num_threads(cfg.threads)
    load_start = loadavg()
    task = make_task(cfg, cfg.n_pretrain)
    n_u, n_w, n_t = task.u_layout.numel, task.w_layout.numel, task.t_layout.numel
    kmax = max(cfg.ks)
    x_test, y_test = make_data(kmax, cfg.input_dim, cfg.ft_classes, cfg.seed + 3, task.dtype)
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "dtype": cfg.dtype,
           "loadavg_start": load_start, "sgemm_gflops": sgemm_gflops(task.dtype)}
    methods = ["auto", *[m for m in cfg.variants if m != "auto"]]
    approximate = {f"rank{r}": r for r in cfg.ranks}
    print(f"engine benchmark: MLP {cfg.input_dim} -> {' -> '.join(map(str, cfg.hidden))} tanh, "
          f"heads {cfg.pre_classes}/{cfg.ft_classes}; n_u={n_u:,} n_w={n_w:,} n_t={n_t:,} "
          f"(pretraining parameters {n_u + n_w:,}); M={cfg.n_pretrain:,}, {cfg.dtype}, "
          f"scenario {cfg.scenario}, batch {cfg.batch_size}, {env['threads']} thread(s), "
          f"{cfg.repeats} repeat(s); exact scoring methods {methods}, approximate "
          f"{list(approximate)}; sgemm {env['sgemm_gflops']:.0f} GFLOP/s; load average "
          f"{load_start} on {env['cpus']} CPUs")

    # Training.
    reset_peak()
    fit, train_info = train(task, cfg)
    train_info["peak_rss_mb"] = peak_rss_mb()
    print(f"training: pretraining {train_info['pretrain']['iterations']} L-BFGS iterations "
          f"{train_info['pretrain_s']:.1f} s (grad norm "
          f"{train_info['pretrain']['final_grad_norm']:.2g}), finetuning "
          f"{train_info['finetune']['iterations']} iterations {train_info['finetune_s']:.1f} s; "
          f"peak RSS {train_info['peak_rss_mb']:.0f} MB")

    # One plain epoch.
    epoch = plain_epoch_fn(task, fit, cfg.batch_size)
    epoch()  # warm-up
    ep = strip(timed(epoch, cfg.repeats))
    print(f"plain SGD epoch ({-(-cfg.n_pretrain // cfg.batch_size)} batches): "
          f"median {ep['median_s']:.3f} s {ep['runs_s']} cpu/wall {ep['cpu_over_wall']}")

    warm_up(task, fit, cfg.batch_size, cfg.seed)

    per_k: list[dict] = []
    damping = cfg.pretrain_damping  # raised (and kept) if CG breaks down
    n_params = n_u + n_w
    for k in cfg.ks:
        row: dict = {"K": k}
        reset_peak()
        directions, solve_info = solve_directions(task, fit, x_test[:k], y_test[:k], cfg,
                                                  damping)
        damping = solve_info["pretrain_damping"]
        row["solve"] = solve_info
        row["solve_s"] = solve_info["finetune_solve"] + solve_info["pretrain_solve"]
        row["solve_peak_rss_mb"] = peak_rss_mb()
        # Naive loop on a subset: the reference scores and the baseline time.
        n = min(cfg.naive_examples, cfg.n_pretrain)
        nv = timed(lambda d=directions, n=n: naive_scores(task, fit, d, n), 1)
        naive = nv.pop("result")
        per_example_naive = nv["median_s"] / n
        row["naive"] = {**nv, "examples": n, "per_example_s": per_example_naive,
                        "extrapolated_full_s": per_example_naive * cfg.n_pretrain}
        floor_s = exact_score_floor_flops(cfg.n_pretrain, n_params, k) / (
            env["sgemm_gflops"] * 1e9)
        row["floor"] = {"flops": exact_score_floor_flops(cfg.n_pretrain, n_params, k),
                        "over_epoch_flops": (4 * k + 4) / 6, "seconds_at_sgemm_rate": floor_s,
                        "max_speedup_vs_naive": per_example_naive * cfg.n_pretrain / floor_s}
        print(f"K={k:>3}: solve {row['solve_s']:7.2f} s (CG {solve_info['pretrain_solver']}"
              f" at damping {solve_info['pretrain_damping']:g}); naive "
              f"{per_example_naive * 1e3:.3f} ms/example")
        row["methods"] = {}
        for method in methods:
            res = time_method(task, fit, directions, method, naive, per_example_naive,
                              ep["median_s"], cfg)
            row["methods"][method] = res
            label = f"{method} ({res['runs']})" if method == "auto" else method
            print(f"        {label:16}: scoring median {res['median_s']:7.3f} s {res['runs_s']} "
                  f"cpu/wall {res['cpu_over_wall']}; {res['scoring_over_epoch']:.1f}x epoch, "
                  f"{res['speedup_vs_naive']:.1f}x naive; max rel diff vs naive "
                  f"{res['max_rel_diff_vs_naive']:.1e}"
                  + ("" if res["agrees_with_naive"] else "  DISAGREES"))
        exact_scores = row["methods"]["auto"]["scores"]
        for name, rank in approximate.items():
            res = time_method(task, fit, directions, "layerwise", naive, per_example_naive,
                              ep["median_s"], cfg, rank=rank)
            res["accuracy_vs_exact"] = accuracy_vs_exact(res["scores"], exact_scores)
            row["methods"][name] = res
            acc = res["accuracy_vs_exact"]
            print(f"        {name:16}: scoring median {res['median_s']:7.3f} s {res['runs_s']} "
                  f"cpu/wall {res['cpu_over_wall']}; {res['scoring_over_epoch']:.1f}x epoch, "
                  f"{res['speedup_vs_naive']:.1f}x naive; APPROXIMATE: Pearson vs exact "
                  f"{acc['pearson_mean']:.3f} (min {acc['pearson_min']:.3f}), top-10 harmful "
                  f"overlap {acc['top10_harmful_overlap']:.0%}, kept (estimated) "
                  f"{res['direction_rank']['kept_overall']:.1%}")
        for res in row["methods"].values():
            del res["scores"]
        per_k.append(row)

    # Memory in fresh subprocesses.
    memory: dict[str, list[dict]] = {}
    if not cfg.no_memory:
        child_argv = [a for a in argv if a != "--quick"] + (
            ["--quick"] if cfg.quick else []) + ["--mem-k", str(cfg.mem_k)]
        for variant in cfg.mem_variants:
            memory[variant] = run_memory(cfg, variant, child_argv)

    env["loadavg_end"] = loadavg()
    # getrusage maxrss stops tracking once VmHWM is reset, so the overall peak is the max phase.
    env["process_peak_rss_mb"] = max(
        [train_info["peak_rss_mb"]] + [r["solve_peak_rss_mb"] for r in per_k]
        + [res["peak_rss_mb"] for r in per_k for res in r["methods"].values()])
    report(cfg, env, n_params, train_info, ep, per_k, memory)
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in vars(cfg).items() if not k.startswith("mem_child")},
               "env": env, "n_params": {"u": n_u, "w": n_w, "t": n_t},
               "targets": TARGETS,
               "training": train_info, "plain_epoch": ep, "per_k": per_k, "memory": memory,
               "memory_verdict": {v: memory_verdict(rows) for v, rows in memory.items()}}
    cfg.json.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {cfg.json}")
    disagree = [(r["K"], m) for r in per_k for m, res in r["methods"].items()
                if res["exact"] and not res["agrees_with_naive"]]
    if disagree:
        print(f"ERROR: scores disagree with the naive loop beyond {cfg.agree_rtol:g}: {disagree}")
        return 1
    return 0


def memory_verdict(rows: list[dict]) -> dict:
    """Flat if peak - output - input moves by <= 10% of the scoring working set (or 10 MB):
    allocator noise, not a per-example cost."""
    vals = [r["peak_minus_output_input_mb"] for r in rows]
    working = statistics.median(r["scoring_increment_mb"] for r in rows)
    growth = vals[-1] - vals[0]
    spread = max(vals) - min(vals)
    return {"growth_mb": growth, "spread_mb": spread, "working_set_mb": working,
            "flat": spread <= max(0.10 * working, 10.0)}


def report(cfg: argparse.Namespace, env: dict, n_params: int, train_info: dict, ep: dict,
           per_k: list[dict], memory: dict[str, list[dict]]) -> None:
    print(f"\n=== summary ({cfg.dtype}, {env['threads']} thread(s), medians of {cfg.repeats}; "
          f"load average {env['loadavg_start']} -> {env['loadavg_end']} on {env['cpus']} CPUs; "
          f"sgemm {env['sgemm_gflops']:.0f} GFLOP/s)")
    print(f"pretraining parameters {n_params:,}, M = {cfg.n_pretrain:,}, batch {cfg.batch_size}")
    print(f"one plain SGD epoch: {ep['median_s']:.3f} s (cpu/wall {ep['cpu_over_wall']})")
    print("\nphase times (s): training = fixed L-BFGS budget "
          f"({cfg.lbfgs_iters} pretraining + {cfg.ft_lbfgs_iters} finetuning iterations, "
          f"no Newton polish); solves = exact on A_TT + CG {cfg.cg_iters} iterations on H; "
          "scoring = score_pretraining(method='auto')")
    print("peak RSS (MB) is the process's VmHWM during that phase alone (reset before it)")
    print(f"{'K':>4} {'training':>9} {'solves':>8} {'scoring':>9} {'auto runs':>10} "
          f"{'score/epoch':>12} {'naive ms/ex':>12} {'vs naive':>9} {'RSS train':>10} "
          f"{'RSS solve':>10} {'RSS score':>10}")
    tr = train_info["pretrain_s"] + train_info["finetune_s"]
    for row in per_k:
        a = row["methods"]["auto"]
        print(f"{row['K']:>4} {tr:>9.2f} {row['solve_s']:>8.2f} {a['median_s']:>9.3f} "
              f"{a['runs']:>10} {a['scoring_over_epoch']:>11.1f}x "
              f"{row['naive']['per_example_s'] * 1e3:>12.3f} {a['speedup_vs_naive']:>8.1f}x "
              f"{train_info['peak_rss_mb']:>10.0f} {row['solve_peak_rss_mb']:>10.0f} "
              f"{a['peak_rss_mb']:>10.0f}")
    print(f"naive: one torch.autograd.grad per example on the first {per_k[0]['naive']['examples']}"
          " examples, time per example extrapolated to M; speed-up = naive / method per example")
    print(f"peak RSS of the whole benchmark process: {env['process_peak_rss_mb']:.0f} MB")

    print("\nevery method (scores checked against the naive loop's; floor = (4K+4)·M·P flops of "
          "exact per-pair scores at the sgemm rate):")
    print(f"{'K':>4} {'method':>10} {'scoring s':>10} {'score/epoch':>12} {'vs naive':>9} "
          f"{'max rel diff':>13} {'RSS score':>10} {'floor s':>8} {'floor/epoch':>12} "
          f"{'max vs naive':>13}")
    for row in per_k:
        fl = row["floor"]
        for method, res in row["methods"].items():
            name = f"auto={res['runs']}" if method == "auto" else method
            print(f"{row['K']:>4} {name:>10} {res['median_s']:>10.3f} "
                  f"{res['scoring_over_epoch']:>11.1f}x {res['speedup_vs_naive']:>8.1f}x "
                  f"{res['max_rel_diff_vs_naive']:>13.1e} {res['peak_rss_mb']:>10.0f} "
                  f"{fl['seconds_at_sgemm_rate']:>8.3f} {fl['over_epoch_flops']:>11.1f}x "
                  f"{fl['max_speedup_vs_naive']:>12.1f}x")
    for variant, rows in memory.items():
        name = f"auto = {rows[0]['method']}" if variant == "auto" else variant
        print(f"\nscoring pass alone in fresh subprocesses ({name}, K={cfg.mem_k}), MB:")
        print(f"{'M':>8} {'peak RSS':>9} {'input':>7} {'output':>7} {'peak-out-in':>12} "
              f"{'scoring increment':>18} {'seconds':>8}")
        for r in rows:
            print(f"{r['M']:>8,} {r['peak_rss_mb']:>9.1f} {r['input_mb']:>7.1f} "
                  f"{r['output_mb']:>7.2f} {r['peak_minus_output_input_mb']:>12.1f} "
                  f"{r['scoring_increment_mb']:>18.1f} {r['seconds']:>8.2f}")

    print("\ntargets (headline: method='auto', exact scores; rank-r variants are APPROXIMATE "
          "and listed with their accuracy against the exact scores):")
    k8 = next((r for r in per_k if r["K"] == 8), None)
    if k8 is not None:
        v = k8["methods"]["auto"]["scoring_over_epoch"]
        exact = {m: r for m, r in k8["methods"].items() if r["exact"]}
        best = min(exact.items(), key=lambda kv: kv[1]["scoring_over_epoch"])
        print(f"  scoring / epoch at K=8 {TARGETS['scoring / epoch at K=8']}: auto "
              f"({k8['methods']['auto']['runs']}) {v:.1f}x -> {'met' if v <= 3 else 'MISSED'}; "
              f"best exact method {best[0]} {best[1]['scoring_over_epoch']:.1f}x; arithmetic "
              f"floor of exact scores (4K+4)/6 = {k8['floor']['over_epoch_flops']:.1f}x")
        for name, res in k8["methods"].items():
            if res["exact"]:
                continue
            acc = res["accuracy_vs_exact"]
            print(f"    approximate {name}: {res['scoring_over_epoch']:.1f}x -> "
                  f"{'met' if res['scoring_over_epoch'] <= 3 else 'MISSED'}, at Pearson "
                  f"{acc['pearson_mean']:.3f} with the exact scores, top-10 harmful overlap "
                  f"{acc['top10_harmful_overlap']:.0%}")
    for row in per_k:
        s = row["methods"]["auto"]["speedup_vs_naive"]
        exact = {m: r for m, r in row["methods"].items() if r["exact"]}
        best = max(exact.items(), key=lambda kv: kv[1]["speedup_vs_naive"])
        approx = ", ".join(f"{m} {r['speedup_vs_naive']:.1f}x" for m, r in row["methods"].items()
                           if not r["exact"])
        print(f"  speed-up over naive at K={row['K']} {TARGETS['speed-up over the naive loop']}: "
              f"auto {s:.1f}x -> {'met' if s >= 10 else 'MISSED'}; best exact method {best[0]} "
              f"{best[1]['speedup_vs_naive']:.1f}x; cap at the floor "
              f"{row['floor']['max_speedup_vs_naive']:.1f}x"
              + (f"; approximate: {approx}" if approx else ""))
    for variant, rows in memory.items():
        v = memory_verdict(rows)
        print(f"  memory vs M ({variant}): peak - output - input changes by "
              f"{v['growth_mb']:+.1f} MB from M={rows[0]['M']:,} to M={rows[-1]['M']:,} "
              f"(scoring working set ~{v['working_set_mb']:.0f} MB) -> "
              f"{'independent of M (met)' if v['flat'] else 'GROWS with M (MISSED)'}")
    agree = [res["max_rel_diff_vs_naive"] for r in per_k for res in r["methods"].values()
             if res["exact"]]
    print(f"  agreement of the exact methods with the naive loop: max rel diff {max(agree):.1e} "
          f"(tolerance {cfg.agree_rtol:g}) -> "
          f"{'all methods agree' if max(agree) <= cfg.agree_rtol else 'DISAGREE'}")


if __name__ == "__main__":
    raise SystemExit(main())
