"""``validate``: choose pairs and groups, retrain, analyse, write ``RUN_DIR/validation/``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine import artifacts
from engine.atomic_dir import Staging, recover
from engine.distributed import SINGLE, DistContext, init_from_env, launched_by_torchrun, shutdown
from engine.pipeline import task_from_run
from engine.progress import Progress
from engine.training import (
    NotConvergedWarning,
    fit_two_stage,
)
from engine.validation.finetune_check import FinetuneCheckSettings, check_loaded_run
from engine.validation.report import _checks, _scatter
from engine.validation.retrains import run_retrains
from engine.validation.sections import (
    _Context,
    _group_section,
    _loo_section,
    _measure,
    _noise_labels,
    _noise_section,
)
from engine.validation.settings import (
    NOISE_FILE,
    VALIDATION_DIR,
    ValidationError,
    ValidationSettings,
)
from engine.validation.stats import _clean


def _has_model_arrays(run: artifacts.Run) -> bool:
    return any(rel.startswith("model/") for rel in run.manifest["files"])


def _load(run_dir: Path, echo: Callable[[str], None]) -> tuple[artifacts.Run, Any, Any, Any]:
    run = artifacts.load_run(run_dir)
    if not _has_model_arrays(run):
        raise ValidationError(
            f"{run.path} stores no trained parameters (model/*.npy), so validation cannot "
            "warm-start retraining. Re-create the run with `python -m engine run CONFIG --out "
            f"{run.path} --overwrite` (runs made by the engine store them).")
    data, task, stored = task_from_run(run)
    if task.n_pretrain != run.n_pretrain:
        raise ValidationError(f"{run.path}: the rebuilt task has {task.n_pretrain} pretraining "
                              f"examples but the run has {run.n_pretrain}")
    ids = run.pretrain_examples["example_id"].astype(str).to_numpy()
    kept = data.pretrain.ids[data.keep].astype(str)
    if not np.array_equal(ids, kept):
        raise ValidationError(f"{run.path}: the pretraining table does not match the data files "
                              "row for row; re-run `python -m engine run`")
    echo(f"validating {run.path} (scenario {task.scenario}, {run.n_pretrain} pretraining "
         f"examples, {run.n_test} scored test points)")
    return run, data, task, stored


def _choose_test_points(run: artifacts.Run, settings: ValidationSettings,
                        rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Run test-table rows for leave-one-out, and how they were chosen."""
    test_ids = run.test_points["test_id"].astype(str).tolist()
    if settings.test_points:
        pos = {t: i for i, t in enumerate(test_ids)}
        unknown = [t for t in settings.test_points if t not in pos]
        if unknown:
            raise ValidationError(
                f"unknown test id(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: "
                f"--test-points must name scored test points of this run ({len(test_ids)} "
                f"scored, e.g. {test_ids[:3]}); see the `test_id` column of "
                f"{artifacts.TEST_TABLE}")
        return np.array(sorted({pos[t] for t in settings.test_points})), "given"
    correct = run.test_points["correct"].astype(bool).to_numpy()
    mis = np.flatnonzero(~correct)
    if len(mis):
        k = min(settings.max_test_points, len(mis))
        return np.sort(rng.choice(mis, size=k, replace=False)), (
            f"{k} of {len(mis)} misclassified (random, seed {settings.seed})")
    loss = run.test_points["loss"].to_numpy()
    k = min(settings.max_test_points, len(loss))
    return np.sort(np.argsort(-loss)[:k]), f"{k} highest-loss (no misclassified point)"


def _write_atomic(run_path: Path, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write all files into a staging directory, then swap it in as ``validation/``."""
    out = run_path / VALIDATION_DIR
    for line in recover(out, lambda p: (p / "summary.json").is_file()):
        print(line)
    with Staging(out) as staging:
        for name, writer in files.items():
            writer(staging.path / name)
        staging.swap_into_place(_check_validation_dir)
    return out


def _check_validation_dir(path: Path) -> None:
    """Only a previous validation result (or an empty folder) is replaced."""
    if path.is_dir() and not path.is_symlink() and (
            not any(path.iterdir()) or (path / "summary.json").is_file()):
        return
    raise ValidationError(f"refusing to replace {path}: it is not a validation result written "
                          "by this tool; move it away first")


def validate(run_dir: str | os.PathLike, settings: ValidationSettings | None = None,
             echo: Callable[[str], None] = print, world: DistContext | None = None
             ) -> dict[str, Any] | None:
    """Run all checks on a finished run; write ``RUN_DIR/validation/``; return the summary.

    ``world`` (:func:`engine.distributed.init_from_env` under ``torchrun``): every rank calls
    this; the retrains are split over the ranks, rank 0 gathers them, analyses, writes and
    returns the summary; the other ranks return ``None`` once their retrains are handed over.
    """
    settings = settings or ValidationSettings()
    settings.check()
    world = world or SINGLE
    echo = world.main_only(echo)
    # One torch thread, like the workers: on a busy machine intra-op threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _validate(Path(run_dir), settings, echo, world)
    finally:
        torch.set_num_threads(threads)



def source_group_jobs(run: artifacts.Run, targeted_total: np.ndarray, column: str,
                      n_groups: int) -> list[dict[str, Any]]:
    """Group-removal jobs for the ``n_groups`` values of pretraining column ``column`` whose
    removal is predicted to lower the targeted points' mean measurement most (mean over those
    points of the group's summed scores < 0; groups holding every example are skipped)."""
    table = run.pretrain_examples
    if column not in table.columns:
        usable = ["label"] + [c for c in (run.manifest.get("config", {}).get("data", {})
                                          .get("metadata_columns") or []) if c in table.columns]
        raise ValidationError(f"--source-column {column!r} is not a column of the run's "
                              f"pretraining examples; use one of {usable}")
    keys = table[column].astype(str).to_numpy()
    codes, names = pd.factorize(keys, sort=True)
    effect = np.zeros(len(names))
    np.add.at(effect, codes, targeted_total.mean(0))
    jobs = []
    for g in np.argsort(effect, kind="stable"):
        members = np.flatnonzero(codes == g)
        if effect[g] >= 0 or len(jobs) >= n_groups:
            break
        if len(members) == len(keys):
            continue
        jobs.append({"kind": "source", "k": int(len(members)), "draw": 0,
                     "removed": members.tolist(), "column": column, "group": str(names[g])})
    return jobs


def _validate(run_dir: Path, settings: ValidationSettings,
              echo: Callable[[str], None], world: DistContext) -> dict[str, Any] | None:
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    run, data, task, stored = _load(run_dir, echo)
    rng = np.random.default_rng(settings.seed)
    rows, how = _choose_test_points(run, settings, rng)
    m = run.n_pretrain
    if settings.per_point > m:
        raise ValidationError(f"--per-point {settings.per_point} exceeds the {m} pretraining "
                              "examples")
    too_big = [k for k in settings.group_sizes if k >= m]
    if too_big:
        raise ValidationError(f"--group-sizes {too_big} must be below the {m} pretraining "
                              "examples")
    n_ft = len(data.finetune_train)
    if settings.finetune_per_point >= n_ft:
        raise ValidationError(f"--finetune-per-point {settings.finetune_per_point} must be below "
                              f"the {n_ft} finetuning examples (0 skips that check)")
    noise_labels = _noise_labels(run, settings)
    noise_path = noise_labels[0] if noise_labels else None

    dtype = task.dtype
    test = data.finetune_test
    pos = {t: i for i, t in enumerate(test.ids.astype(str).tolist())}
    score_rows = np.array([pos[t] for t in run.test_points["test_id"].astype(str)])
    correct = run.test_points["correct"].astype(bool).to_numpy()
    targeted = np.flatnonzero(~correct)

    # Reference fit: the stored parameters polished with the retrains' optimizer settings.
    t0 = time.perf_counter()
    echo(f"reference fit: re-polishing the stored parameters to gradient norm "
         f"<= {settings.tolerance:g}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        reference = fit_two_stage(task, tolerance=(settings.tolerance,) * 2,
                                  max_iter=(settings.max_iter,) * 2, warm_start=stored)
    timings["reference_fit"] = time.perf_counter() - t0
    ctx = _Context(run, task, stored, reference, torch.as_tensor(data.inputs(test), dtype=dtype),
                   torch.as_tensor(test.y, dtype=torch.long), score_rows, targeted)
    drift = _measure(ctx, reference.t, reference.backbone_ft, score_rows[rows]) - _measure(
        ctx, stored.t, stored.backbone_ft, score_rows[rows])

    # Scores of the chosen points (float64 copies of the memory-mapped matrices).
    sc = {n: np.asarray(run.scores[n][rows], dtype=np.float64) for n in artifacts.SCORE_NAMES}
    full_total = np.asarray(run.scores["total"], dtype=np.float64)
    abs_order = np.argsort(-np.abs(sc["total"]), axis=1, kind="stable")
    abs_rank = np.empty_like(abs_order)
    np.put_along_axis(abs_rank, abs_order, np.arange(1, m + 1)[None, :].repeat(len(rows), 0), 1)
    sc_rows: dict[str, np.ndarray] = {**run.scores, "abs_rank": abs_rank}

    # Leave-one-out pairs: top-N by |score| plus N random ones per test point.
    roles: dict[tuple[int, int], str] = {}
    n = settings.per_point
    for a, r in enumerate(rows):
        top = abs_order[a, :n]
        rest = abs_order[a, n:]
        rnd = rng.choice(rest, size=min(n, len(rest)), replace=False)
        roles.update({(int(r), int(j)): "top" for j in top})
        roles.update({(int(r), int(j)): "random" for j in rnd})
    loo_examples = sorted({j for _, j in roles})

    # Group removals on the misclassified scored points.
    group_jobs: list[dict[str, Any]] = []
    if len(targeted) and settings.group_sizes:
        agg = full_total[targeted].sum(0)
        harmful, helpful = np.argsort(agg, kind="stable"), np.argsort(-agg, kind="stable")
        for k in settings.group_sizes:
            group_jobs.append({"kind": "harmful", "k": k, "draw": 0,
                               "removed": harmful[:k].tolist()})
            group_jobs.append({"kind": "helpful", "k": k, "draw": 0,
                               "removed": helpful[:k].tolist()})
            for d in range(settings.random_draws):
                group_jobs.append({"kind": "random", "k": k, "draw": d,
                                   "removed": sorted(rng.choice(m, size=k, replace=False)
                                                     .tolist())})

    if len(targeted) and settings.source_column:
        group_jobs += source_group_jobs(run, full_total[targeted], settings.source_column,
                                        settings.source_groups)

    jobs = [(j,) for j in loo_examples] + [tuple(g["removed"]) for g in group_jobs]
    workers = min(settings.n_workers, len(jobs))
    echo(f"leave-one-out: {len(rows)} test points ({how}), {len(loo_examples)} distinct "
         f"examples; group removal: {len(group_jobs)} retrains; {len(jobs)} retrains on "
         + (f"{world.world_size} ranks ({world.backend})" if world.distributed
            else f"{workers} worker process(es)"))
    t0 = time.perf_counter()
    results = run_retrains(jobs, run.path, task, reference, settings,
                           progress=Progress("retraining") if world.is_main else None,
                           world=world)
    timings["retraining"] = time.perf_counter() - t0
    if results is None:        # another rank of a torchrun launch: rank 0 goes on alone
        return None
    failed = [(job, r["error"]) for job, r in zip(jobs, results, strict=True) if "error" in r]
    for job, err in failed[:5]:
        echo(f"WARNING: retrain without {len(job)} example(s) failed: {err}")
    ok = [r for r in results if "error" not in r]
    conv = {
        "n_retrains": len(results), "n_failed": len(failed),
        "n_unconverged": sum(r["pretrain_grad_norm"] > settings.tolerance
                             or r["finetune_grad_norm"] > settings.tolerance for r in ok),
        "max_pretrain_grad_norm": max((r["pretrain_grad_norm"] for r in ok), default=None),
        "max_finetune_grad_norm": max((r["finetune_grad_norm"] for r in ok), default=None),
        "median_pretrain_grad_norm": float(np.median([r["pretrain_grad_norm"] for r in ok]))
        if ok else None,
        "mean_retrain_seconds": float(np.mean([r["seconds"] for r in results])),
        "max_rounds_used": max((r["rounds"] for r in ok), default=None),
        "n_multi_round": sum(r["rounds"] > 1 for r in ok),
    }

    t0 = time.perf_counter()
    loo_df, loo = _loo_section(ctx, rows, roles, loo_examples, results[:len(loo_examples)],
                               sc_rows)
    loo["test_points"] = run.test_points["test_id"].astype(str).to_numpy()[rows].tolist()
    loo["selection"] = how
    loo["reference_drift_max_abs"] = float(np.max(np.abs(drift)))
    group_df, group = (None, None)
    if group_jobs:
        group_df, group = _group_section(ctx, settings, group_jobs, results[len(loo_examples):],
                                         full_total)
    noise_df, noise = (None, None)
    if noise_labels is not None and len(targeted):
        noise_df, noise = _noise_section(ctx, *noise_labels, settings, full_total)
    timings["analysis"] = time.perf_counter() - t0
    # Finetuning-data influence: finetuning-only retrains, here (rank 0), with the run's
    # finetune_scores.npy when it has them (computed otherwise).
    finetune_df, finetune = None, None
    if settings.finetune_per_point:
        t0 = time.perf_counter()
        finetune_df, finetune = check_loaded_run(run, data, task, stored, FinetuneCheckSettings(
            test_points=rows.tolist() if settings.test_points else None,
            max_test_points=settings.finetune_test_points,
            per_point=settings.finetune_per_point, seed=settings.seed,
            tolerance=settings.tolerance, max_iter=settings.max_iter,
            max_rounds=settings.max_rounds), echo=echo)
        timings["finetune_check"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    stages = run.manifest.get("stages", {})
    diagnostics = {
        "pretrain_min_eigenvalue": stages.get("pretrain", {}).get("min_eigenvalue"),
        "pretrain_damping": stages.get("pretrain", {}).get("damping"),
        "pretrain_weight_decay": task.pretrain_weight_decay,
        "finetune_min_eigenvalue": stages.get("finetune", {}).get("min_eigenvalue"),
        "finetune_damping": stages.get("finetune", {}).get("damping"),
        "run_pretrain_grad_norm": stages.get("pretrain", {}).get("final_grad_norm"),
        "run_finetune_grad_norm": stages.get("finetune", {}).get("final_grad_norm"),
        "reference_pretrain_grad_norm": reference.pretrain.final_grad_norm,
        "reference_finetune_grad_norm": reference.finetune.final_grad_norm,
        "reference_measurement_drift_max_abs": float(np.max(np.abs(drift))),
    }
    notes = []
    if not len(targeted):
        notes.append("no scored test point is misclassified: group removal and noise detection "
                     "(both aggregate over the misclassified points) were skipped")
    elif not settings.group_sizes:
        notes.append("no group sizes given: group removal was skipped")
    if noise_labels is None:
        notes.append(f"no {NOISE_FILE} beside the pretraining file and no --noise-ids: noise "
                     "detection was skipped")
    if finetune is None:
        notes.append("--finetune-per-point 0: the finetuning-data influence check was skipped")
    checks = _checks(loo, group, noise, conv, settings, finetune)
    summary = _clean({
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_id": run.run_id, "scenario": task.scenario,
        "measurement": run.manifest.get("measurement"),
        "settings": {**asdict(settings), "workers": 1 if world.distributed else workers,
                     "ranks": world.world_size,
                     "removal": "weight 0 at the removed examples, denominator M (eps = -1/M); "
                                "warm start from the reference fit",
                     "noise_ids_file": str(noise_path) if noise_path else None},
        "checks": checks, "loo": loo, "group": group, "noise": noise, "finetune": finetune,
        "convergence": conv, "diagnostics": diagnostics, "notes": notes,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    })

    def writer_csv(df: pd.DataFrame | None) -> Callable[[Path], None]:
        return lambda p: (df if df is not None else pd.DataFrame()).to_csv(p, index=False)

    files: dict[str, Callable[[Path], None]] = {
        "loo.csv": writer_csv(loo_df),
        "group.csv": writer_csv(group_df),
        "noise.csv": writer_csv(noise_df),
        "finetune.csv": writer_csv(finetune_df),
        "loo_scatter.json": lambda p: p.write_text(_scatter(loo_df, loo, task.scenario)),
        "summary.json": lambda p: p.write_text(json.dumps(summary, indent=2)),
    }
    out = _write_atomic(run.path, files)
    echo(f"wrote {out} in {timings['total']:.0f}s")
    for note in notes:
        echo(f"note: {note}")
    for c in summary["checks"]:
        echo(f"[{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {c['verdict']}")
    return summary


def main(ns: argparse.Namespace) -> None:
    """CLI entry (``python -m engine validate``)."""
    settings = ValidationSettings(
        test_points=list(ns.test_points) if ns.test_points else None,
        per_point=ns.per_point, group_sizes=tuple(ns.group_sizes or ()),
        random_draws=ns.random_draws, workers=ns.workers, seed=ns.seed,
        noise_ids=getattr(ns, "noise_ids", None),
        tolerance=getattr(ns, "tolerance", 1e-10), max_iter=getattr(ns, "max_iter", 300),
        max_rounds=getattr(ns, "max_rounds", 5),
        finetune_per_point=getattr(ns, "finetune_per_point", 10),
        finetune_test_points=getattr(ns, "finetune_test_points", 5),
        source_column=getattr(ns, "source_column", None),
        source_groups=getattr(ns, "source_groups", 3))
    world = init_from_env() if launched_by_torchrun() else None
    try:
        validate(ns.run_dir, settings, world=world)
    finally:
        if world is not None:
            shutdown(world)
