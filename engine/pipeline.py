"""The end-to-end run: data -> both training stages -> evaluation -> scores -> map ->
finetuning-example scores (``[influence] finetune_influence``) -> run dir.

``python -m engine run CONFIG --out RUN_DIR`` calls :func:`run`; validation reloads the same
task and trained parameters from a finished run with :func:`task_from_run`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import artifacts
from engine.config import RunConfig, StageConfig, load_config
from engine.curvature import (
    Solver,
    check_curvature_batch,
    check_stage_solver,
    finetune_joint_hessian,
    make_solver,
    pretrain_hessian,
)
from engine.curvature.ekfac import check_ekfac_device
from engine.data import Table, load_run_data
from engine.devices import DeviceError, resolve_device, to_host
from engine.distributed import (
    SINGLE,
    DistContext,
    all_reduce_scalar,
    gather_rows,
    guarded,
)
from engine.distributed.writing import (
    RankStaging,
    open_staging,
    seal_on_main,
    write_scores_by_rank,
)
from engine.finetune_influence import write_finetune_artifacts
from engine.maps import map_coordinates
from engine.models import build_model
from engine.pause_points import pause_point
from engine.progress import Progress, ProgressFile, TrainingProgress
from engine.run_record import RunOutputs, render_column, write_outputs
from engine.scores import InfluenceArguments, compute_scores
from engine.task import TwoStageTask
from engine.training import MinibatchSettings, NotConvergedWarning, TwoStageFit, fit_two_stage

log = logging.getLogger(__name__)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class RunInputError(ValueError):
    """The run command's inputs are inconsistent (unknown ids, empty selections)."""


@dataclass
class PreparedData:
    """The three tables of a config, with pretraining rows restricted to the kept examples."""

    cfg: RunConfig
    pretrain: Table
    finetune_train: Table
    finetune_test: Table
    keep: np.ndarray            # boolean mask over the pretraining FILE's rows
    excluded_ids: list[str]
    shift: np.ndarray | None = None   # [data] standardize: inputs = (X - shift) / scale
    scale: np.ndarray | None = None
    excluded_finetune_ids: list[str] = field(default_factory=list)

    def inputs(self, table: Table) -> np.ndarray:
        """The model inputs of a table's rows (standardized when the config says so)."""
        if self.shift is None or self.scale is None:
            return table.X
        return (table.X - self.shift) / self.scale


# Features beyond this magnitude make full-batch training slow or overflow; say so up front.
FEATURE_SCALE_LIMIT = 1e4


def _without(table: Table, ids: Sequence[str]) -> Table:
    """``table`` minus the rows whose id is in ``ids`` (order kept)."""
    keep = ~np.isin(table.ids, list(ids))
    return replace(table, ids=table.ids[keep], X=table.X[keep], y=table.y[keep],
                   frame=table.frame[keep].reset_index(drop=True))


def prepare_data(cfg: RunConfig, exclude_ids: Sequence[str] = (),
                 exclude_finetune_ids: Sequence[str] = ()) -> PreparedData:
    """Load and validate the data; drop excluded pretraining examples and excluded finetuning
    training examples (unknown ids: error)."""
    pretrain, ft_train, ft_test = load_run_data(cfg)
    if exclude_finetune_ids:
        known_ft = set(ft_train.ids.tolist())
        unknown = [i for i in exclude_finetune_ids if i not in known_ft]
        if unknown:
            raise RunInputError(
                f"{len(unknown)} excluded finetuning id(s) are not finetuning training example "
                f"ids of {ft_train.path.name}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
                ". Use the `example_id` values of the run's finetune_examples.parquet.")
        ft_train = _without(ft_train, exclude_finetune_ids)
        if len(ft_train) == 0:
            raise RunInputError("every finetuning training example is excluded; nothing is "
                                "left to finetune on")
    known = set(pretrain.ids.tolist())
    unknown = [i for i in exclude_ids if i not in known]
    if unknown:
        raise RunInputError(
            f"{len(unknown)} excluded id(s) are not pretraining example ids of "
            f"{pretrain.path.name}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}. "
            "Use the `example_id` values of the run's pretraining table.")
    keep = ~np.isin(pretrain.ids, list(exclude_ids))
    if not keep.any():
        raise RunInputError("every pretraining example is excluded; nothing is left to train on")
    shift = scale = None
    if cfg.data.standardize:
        # Statistics of the whole pretraining file, so that --exclude retrains see the same
        # inputs as the run they are compared with.
        shift = pretrain.X.mean(axis=0)
        scale = pretrain.X.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        if not (np.isfinite(shift).all() and np.isfinite(scale).all()):
            raise RunInputError(f"{pretrain.path.name}: features are too large to standardize "
                                "in float64 (their mean or spread overflows); rescale them")
    else:
        for table in (pretrain, ft_train, ft_test):
            big = np.abs(table.X).max(initial=0.0)
            if big > FEATURE_SCALE_LIMIT:
                col = int(np.abs(table.X).max(axis=0).argmax())
                raise RunInputError(
                    f"{table.path.name}: feature column #{col} reaches |x| = {big:.3g}; features "
                    f"beyond {FEATURE_SCALE_LIMIT:g} make training slow or overflow. Standardize "
                    "them, or set `standardize = true` in the config's [data] section")
    if cfg.model.architecture == "cnn":
        size, n_features = math.prod(cfg.data.image_shape), pretrain.X.shape[1]
        if size != n_features:
            raise RunInputError(
                f"{pretrain.path.name}: [model] architecture = 'cnn' reshapes the features to "
                f"[data] image_shape = {list(cfg.data.image_shape)} ({size} values), but the "
                f"files have {n_features} feature columns; fix image_shape (or the features)")
    return PreparedData(cfg, pretrain, ft_train, ft_test, keep,
                        list(dict.fromkeys(exclude_ids)), shift, scale,
                        list(dict.fromkeys(exclude_finetune_ids)))


def check_exclusion_share(data: PreparedData, yes: bool, echo: Callable[[str], None]) -> None:
    """Refuse (unless ``yes``) an exclusion of more than half the pretraining examples or of
    more than half the finetuning training examples."""
    n_ft = len(data.excluded_finetune_ids)
    checks = [(len(data.excluded_ids), len(data.keep), "--exclude", "pretraining"),
              (n_ft, len(data.finetune_train) + n_ft, "--exclude-finetune",
               "finetuning training")]
    for n, m, option, kind in checks:
        if 2 * n > m:
            what = f"{option} removes {n} of {m} {kind} examples (more than half)"
            if not yes:
                raise RunInputError(f"{what}; pass --yes if that is intended")
            echo(f"WARNING: {what}; going ahead (--yes)")


def build_task(data: PreparedData, device: torch.device | str | None = None) -> TwoStageTask:
    """The built-in MLP or CNN two-stage task of a config (modules initialized from the seed),
    with modules and data on ``device`` (default: the config's ``device``, resolved)."""
    cfg = data.cfg
    dtype = DTYPES[cfg.dtype]
    device = resolve_device(cfg.device if device is None else device)
    torch.manual_seed(cfg.seed)
    m = cfg.model
    backbone, pre_head, ft_head = build_model(
        data.pretrain.X.shape[1], m.hidden, m.activation,
        len(data.pretrain.classes), len(data.finetune_train.classes),
        architecture=m.architecture, image_shape=cfg.data.image_shape, channels=m.channels,
        kernel_size=m.kernel_size, pool=m.pool)
    for m in (backbone, pre_head, ft_head):   # initialized on the CPU: the same on any device
        m.to(device=device, dtype=dtype)
    keep = data.keep

    def tensors(table: Table, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.inputs(table), table.y
        if mask is not None:
            x, y = x[mask], y[mask]
        return (torch.as_tensor(x, dtype=dtype, device=device),
                torch.as_tensor(y, dtype=torch.long, device=device))

    tracked = cfg.influence.tracked_backbone
    return TwoStageTask(
        backbone, pre_head, ft_head, tensors(data.pretrain, keep), tensors(data.finetune_train),
        pretrain_weight_decay=cfg.pretrain.weight_decay,
        finetune_weight_decay=cfg.finetune.weight_decay,
        scenario=cfg.finetune.scenario, alpha=cfg.finetune.alpha,
        measurement=cfg.influence.measurement,
        tracked_backbone=None if tracked == "all" else list(tracked))


def minibatch_settings(stage: StageConfig, seed: int) -> MinibatchSettings | None:
    """A stage's adam / sgd settings, or ``None`` for the certified (newton) trainer."""
    if stage.optimizer == "newton":
        return None
    return MinibatchSettings(stage.optimizer, stage.epochs, stage.batch_size,
                             stage.learning_rate, stage.momentum, seed)


def train(task: TwoStageTask, cfg: RunConfig, **kwargs: Any) -> TwoStageFit:
    """Both stages with the config's trainers, tolerances and iteration limits."""
    kwargs.setdefault("optimizer", (minibatch_settings(cfg.pretrain, cfg.seed),
                                    minibatch_settings(cfg.finetune, cfg.seed + 1)))
    return fit_two_stage(task, tolerance=(cfg.pretrain.tolerance, cfg.finetune.tolerance),
                         max_iter=(cfg.pretrain.max_iter, cfg.finetune.max_iter), **kwargs)


# Tables larger than this are evaluated in chunks of this many rows (bounded memory, e.g. a CNN
# on 60,000 images); smaller ones in one pass, as before.
EVAL_CHUNK = 4096


def _by_rows(fn: Callable[[slice], torch.Tensor], n: int) -> torch.Tensor:
    """``fn(rows)`` for all ``n`` rows: one call, or concatenated chunks of ``EVAL_CHUNK``."""
    if n <= EVAL_CHUNK:
        return fn(slice(None))
    return torch.cat([fn(slice(s, s + EVAL_CHUNK)) for s in range(0, n, EVAL_CHUNK)])


def predict(task: TwoStageTask, fit: TwoStageFit, x: torch.Tensor, y: torch.Tensor
            ) -> dict[str, np.ndarray]:
    """Finetuned-model predictions: probabilities, predicted class, loss and measurement."""
    with torch.no_grad():
        out = _by_rows(lambda r: task.finetune_outputs(fit.t, fit.backbone_ft, x[r]), len(x))
        probs = torch.softmax(out, dim=1)
        return {"probs": to_host(probs), "pred": to_host(probs.argmax(1)),
                "loss": to_host(task.finetune_loss(out, y)),
                "measure": to_host(_by_rows(lambda r: task.measure(fit.t, fit.backbone_ft, x[r],
                                                                   y[r]), len(x)))}


def select_test_points(cfg: RunConfig, test: Table, correct: np.ndarray) -> np.ndarray:
    """Row indices of the test points to score, in test-table order."""
    sel = cfg.influence.test_points
    if sel == "all":
        return np.arange(len(test))
    if sel == "misclassified":
        idx = np.flatnonzero(~correct)
        if len(idx) == 0:
            raise RunInputError("test_points = 'misclassified' but no test point is misclassified")
        return idx
    pos = {tid: i for i, tid in enumerate(test.ids.tolist())}
    unknown = [t for t in sel if t not in pos]
    if unknown:
        raise RunInputError(f"[influence] test_points names unknown test ids {unknown[:5]}")
    return np.array(sorted(pos[t] for t in sel))


def stage_solver(stage: StageConfig, seed: int = 0) -> Solver:
    """The curvature solver a stage's config names, with its options."""
    ekfac = {"fisher": stage.fisher, "relative_damping": stage.relative_damping, "seed": seed,
             "max_examples": stage.factor_examples or None}
    if stage.solver == "ekfac":
        return make_solver("ekfac", **ekfac)
    if stage.solver == "ekfac+cg":
        return make_solver("ekfac+cg", iterations=stage.cg_iterations, **ekfac)
    return make_solver(stage.solver)


def memory_budget(cfg: RunConfig) -> int:
    """``[influence] memory_budget_gb`` in bytes."""
    return int(cfg.influence.memory_budget_gb * 2**30)


def check_curvature_settings(cfg: RunConfig, task: TwoStageTask) -> None:
    """Before training: each stage's solver against the size of its curvature (H: n_u + n_w
    variables; A_TT: n_t (fixed) or B: n_t + n_u (updated)), and one curvature batch against
    the memory budget.  Raises a one-line error naming the setting to change."""
    for stage in ("pretrain", "finetune"):
        if getattr(cfg, stage).solver.startswith("ekfac"):
            check_ekfac_device(task.device, f"[{stage}] solver = {getattr(cfg, stage).solver!r}")
    budget = memory_budget(cfg)
    dtype = DTYPES[cfg.dtype]
    nu, nw, nt = task.u_layout.numel, task.w_layout.numel, task.t_layout.numel
    fixed = task.scenario == "fixed"
    check_stage_solver("pretrain", cfg.pretrain.solver, nu + nw, dtype, budget,
                       matrix="Hessian H")
    check_stage_solver("finetune", cfg.finetune.solver, nt if fixed else nt + nu, dtype, budget,
                       matrix="head Hessian A_TT" if fixed else "joint Hessian B")
    # Activations do not depend on the parameter values: the initial ones will do.
    ub, w, t = task.initial_state()
    start = TwoStageFit(ub, w, ub, t)
    batch = cfg.influence.curvature_batch_size
    check_curvature_batch("pretrain", pretrain_hessian(task, start, batch, memory_budget=budget))
    # B's products have the variables of the fixed scenario's cross term A_UT ([t; u]) too.
    check_curvature_batch("finetune", finetune_joint_hessian(task, start, batch,
                                                             memory_budget=budget))


def run_device(cfg: RunConfig, world: DistContext | None = None) -> torch.device:
    """The device of a run of ``cfg`` (``device``, resolved for this rank of ``world``); a
    device that is not there raises :class:`~engine.devices.DeviceError` naming the file."""
    try:
        return resolve_device(cfg.device, world)
    except DeviceError as exc:
        raise DeviceError(f"{cfg.path}: {exc}") from None


def run(config_path: str | Path, out_dir: str | Path, *, scenario: str | None = None,
        alpha: float | None = None, exclude_ids: Sequence[str] = (), overwrite: bool = False,
        echo: Callable[[str], None] = print, world: DistContext | None = None,
        device: str | None = None, yes: bool = False, parent: dict[str, str] | None = None,
        progress_file: str | Path | None = None,
        exclude_finetune_ids: Sequence[str] = ()) -> Path:
    """Train, evaluate, score and map; write the run atomically to ``out_dir``.

    ``exclude_ids`` / ``exclude_finetune_ids``: pretraining / finetuning training examples left
    out of training (both recorded in the manifest).

    ``device`` overrides the config's ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``).
    Excluding more than half the pretraining examples is refused before training unless
    ``yes``.  ``parent`` (``{"run_id", "name"}`` of the run this one retrains) is recorded in
    the manifest; ``progress_file``: JSON lines per phase (:class:`ProgressFile`, rank 0).

    ``world`` (:func:`engine.distributed.init_from_env` under ``torchrun``): every rank calls
    this with the same arguments; sums over pretraining examples are all-reduced, each rank
    scores and writes its own pretraining examples, rank 0 alone prints, scores the finetuning
    examples, writes the manifest and swaps the run into place (see
    :mod:`engine.distributed.writing`).
    """
    world = world or SINGLE
    echo = world.main_only(echo)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def phase(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 3)

    t0 = time.perf_counter()
    pf = ProgressFile(str(progress_file) if progress_file and world.is_main else None)
    pf.start("load", "loading the data, checking the settings")
    cfg = load_config(config_path).with_overrides(scenario=scenario, alpha=alpha, device=device)
    run_on = run_device(cfg, world)   # before the data: a missing GPU fails at once
    data = prepare_data(cfg, exclude_ids, exclude_finetune_ids)
    check_exclusion_share(data, yes, echo)
    task = build_task(data, run_on)
    # Everything that can be checked is checked before training: each stage's solver against
    # its curvature's size and the memory budget, the test-point selection and the destination
    # (which is staged now, so an unwritable --out fails at once).
    check_curvature_settings(cfg, task)
    if not isinstance(cfg.influence.test_points, str):
        select_test_points(cfg, data.finetune_test, np.ones(len(data.finetune_test), bool))
    staging = open_staging(world, out_dir, overwrite, echo)
    with staging:
        try:
            return _run(cfg, config_path, data, task, staging, overwrite, echo, timings, t0,
                        t_all, phase, world, pf, parent)
        except KeyboardInterrupt:
            if staging.path == staging.dest:      # the signal arrived right after the swap
                raise KeyboardInterrupt(f"the run was written completely to {staging.dest}"
                                        ) from None
            raise KeyboardInterrupt(f"nothing was written ({staging.dest} is unchanged)"
                                    ) from None



def _run(cfg: RunConfig, config_path: str | Path, data: PreparedData, task: TwoStageTask,
         staging: artifacts.Staging | RankStaging, overwrite: bool,
         echo: Callable[[str], None], timings: dict[str, float], t0: float, t_all: float,
         phase: Callable[[str, float], None], world: DistContext, pf: ProgressFile,
         parent: dict[str, str] | None) -> Path:
    main = world.is_main
    phase("load", t0)
    pf.start("pretrain", "pretraining")
    echo(f"data: {int(data.keep.sum())} pretraining examples "
         f"({len(data.excluded_ids)} excluded), {len(data.finetune_train)} finetuning"
         + (f" ({len(data.excluded_finetune_ids)} excluded)" if data.excluded_finetune_ids
            else "") + ", "
         f"{len(data.finetune_test)} test; {task.u_layout.numel + task.w_layout.numel} "
         f"pretraining parameters, scenario {task.scenario}"
         + (f"; {world.world_size} ranks ({world.backend})" if world.distributed else ""))

    t0 = time.perf_counter()
    pause_point("training")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotConvergedWarning)
        fit = train(task, cfg, monitor=TrainingProgress(sink=pf) if main else None, world=world)
    for w in caught:
        echo(f"WARNING: {w.message}")
    timings["pretrain"] = round(fit.pretrain.seconds, 3)
    timings["finetune"] = round(fit.finetune.seconds, 3)
    echo(f"trained: pretraining gradient norm {fit.pretrain.final_grad_norm:.2e}, "
         f"finetuning {fit.finetune.final_grad_norm:.2e} ({time.perf_counter() - t0:.1f}s)")

    pf.start("finetune", "finetuning")    # when training reported no finetuning step
    pf.start("evaluate", "evaluating")
    t0 = time.perf_counter()
    dtype = DTYPES[cfg.dtype]
    x_test = torch.as_tensor(data.inputs(data.finetune_test), dtype=dtype, device=task.device)
    y_test = torch.as_tensor(data.finetune_test.y, dtype=torch.long, device=task.device)
    pred = predict(task, fit, x_test, y_test)
    correct = pred["pred"] == data.finetune_test.y
    pre_x, pre_y = task.pretrain_data
    # Per-example outputs on this rank's own pretraining examples; rank 0 gathers them.
    shard = world.shard(len(pre_x))
    own_x, own_y = pre_x[shard.rows], pre_y[shard.rows]
    with torch.no_grad():
        pre_out = _by_rows(lambda r: task.pretrain_outputs(fit.backbone_pre, fit.w, own_x[r]),
                           len(own_x))
        pre_losses = gather_rows(task.pretrain_loss(pre_out, own_y), world, shard)
        pre_acc = all_reduce_scalar(int((pre_out.argmax(1) == own_y).sum()), world) / len(pre_x)
        ft_x, ft_y = task.finetune_data
        ft_acc = float((task.finetune_outputs(fit.t, fit.backbone_ft, ft_x).argmax(1) == ft_y)
                       .double().mean())
    rows = select_test_points(cfg, data.finetune_test, correct)
    phase("evaluate", t0)

    pf.start("influence", "scoring")
    t0 = time.perf_counter()
    inf = cfg.influence
    args = InfluenceArguments(
        pretrain_damping=cfg.pretrain.damping, finetune_damping=cfg.finetune.damping,
        pretrain_solver=stage_solver(cfg.pretrain, cfg.seed),
        finetune_solver=stage_solver(cfg.finetune, cfg.seed),
        batch_size=inf.batch_size, scoring_method=inf.scoring_method,
        direction_rank=inf.direction_rank, reuse_training_curvature=True,
        pretrain_curvature=cfg.pretrain.curvature, finetune_curvature=cfg.finetune.curvature,
        curvature_batch_size=inf.curvature_batch_size, memory_budget=memory_budget(cfg))
    rank = f", directions of rank {inf.direction_rank}" if inf.direction_rank else ""
    solvers = (cfg.pretrain.solver if cfg.pretrain.solver == cfg.finetune.solver
               else f"{cfg.pretrain.solver} / {cfg.finetune.solver}")
    echo(f"scoring {len(rows)} test points x {len(pre_x)} pretraining examples "
         f"(solver {solvers}{rank})")
    pause_point("scoring")
    scores = compute_scores(task, fit, x_test[rows], y_test[rows], args,
                            progress=pf.tee(Progress("per-example gradients") if main else None,
                                            "per-example gradients"),
                            world=world)
    timings.update({k: round(v, 3) for k, v in scores.timings.items()})
    if scores.settings["approximation"]:
        echo(f"NOTE: {scores.settings['approximation']}")
    phase("influence", t0)

    pf.start("map", f"map: {cfg.map.method}")
    t0 = time.perf_counter()
    with torch.no_grad():
        f_pre = gather_rows(_by_rows(lambda r: task.features(fit.backbone_pre, own_x[r]),
                                     len(own_x)), world, shard)
    pre_xy = test_xy = ft_xy = None
    with guarded(world, "computing the map"):
        if main:    # one map of all examples, on rank 0
            with torch.no_grad():
                x_rows = x_test[rows]
                f_test = to_host(_by_rows(lambda r: task.features(fit.backbone_pre, x_rows[r]),
                                          len(x_rows)))
                ft_x = task.finetune_data[0]
                f_ft = (to_host(_by_rows(lambda r: task.features(fit.backbone_pre, ft_x[r]),
                                         len(ft_x)))
                        if cfg.influence.finetune_influence else None)
            echo(f"map: {cfg.map.method} of backbone features")
            pre_xy, test_xy, ft_xy = map_coordinates(
                to_host(f_pre), f_test, method=cfg.map.method, n_neighbors=cfg.map.n_neighbors,
                min_dist=cfg.map.min_dist, seed=cfg.seed, finetune_features=f_ft)
    phase("map", t0)
    score_arrays = {name: to_host(getattr(scores, name)) for name in artifacts.SCORE_NAMES}
    if world.distributed:   # every rank writes its own columns into rank 0's score files
        write_scores_by_rank(world, staging, shard, len(rows), score_arrays)

    finetune_section = None   # influence of the finetuning examples (finetuning stage only)
    if cfg.influence.finetune_influence:
        pf.start("finetune_influence", "scoring the finetuning examples")
        t0 = time.perf_counter()
        ft = data.finetune_train
        with guarded(world, "scoring the finetuning examples"):
            if main:   # every rank holds all finetuning examples: rank 0 scores them alone
                echo(f"scoring {len(rows)} test points x {len(ft)} finetuning examples "
                     "(finetuning stage only)")
                finetune_section = write_finetune_artifacts(
                    staging.path, task, fit, x_test[rows], y_test[rows], args, ft.ids, ft.y,
                    extra_columns={**render_column(cfg, ft, np.arange(len(ft))),
                                   "map_x": ft_xy[:, 0], "map_y": ft_xy[:, 1]},
                    progress=pf.tee(Progress("finetuning-example gradients"),
                                    "finetuning-example gradients"))
        phase("finetune_influence", t0)
    if not main:
        return seal_on_main(world, staging, lambda: staging.dest)
    outputs = RunOutputs(fit, scores, rows, pred, correct, pre_losses, pre_acc, ft_acc, pre_xy,
                         test_xy, finetune_section)

    def seal() -> Path:
        timings["total"] = round(time.perf_counter() - t_all, 3)
        return write_outputs(cfg, config_path, data, task, outputs,
                             None if world.distributed else score_arrays, staging, overwrite,
                             timings, world, parent=parent)

    pf.start("write", "writing the run")
    path = seal_on_main(world, staging, seal) if world.distributed else seal()
    pf.finish(f"wrote {path}")
    echo(f"wrote {path} in {time.perf_counter() - t_all:.1f}s: test accuracy "
         f"{correct.mean():.3f}, {int((~correct).sum())} of {len(correct)} test points "
         "misclassified; time per phase: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()
                                                      if k != "total"))
    return path


def task_from_run(run: artifacts.Run, device: torch.device | str = "cpu"
                  ) -> tuple[PreparedData, TwoStageTask, TwoStageFit]:
    """Rebuild a finished run's task and trained parameters (for validation retraining), on
    ``device``: the CPU by default, whatever device made the run (``engine.validation``'s
    retrains build CPU tensors).

    Refuses when the input files changed since the run was made.
    """
    cfg = load_config(run.manifest["config_path"]).with_overrides(
        scenario=run.manifest["scenario"], alpha=run.manifest["config"]["finetune"]["alpha"])
    for key, digest in run.manifest["input_hashes"].items():
        if artifacts.sha256_file(Path(getattr(cfg.data, key))) != digest:
            raise artifacts.RunError(
                f"input file {getattr(cfg.data, key)} changed since run {run.path} was made; "
                "re-run `python -m engine run` first")
    data = prepare_data(cfg, run.manifest.get("excluded_ids", []),
                        run.manifest.get("excluded_finetune_ids", []))
    task = build_task(data, device)
    arrays = artifacts.load_model_arrays(run)
    dtype = DTYPES[cfg.dtype]
    fit = TwoStageFit(*(torch.as_tensor(arrays[k], dtype=dtype, device=task.device)
                        for k in ("backbone_pre", "w", "backbone_ft", "t")))
    return data, task, fit

