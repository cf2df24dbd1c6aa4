"""Retraining jobs of a validation: both stages without some pretraining examples, warm-started
from the reference fit; in-process, in a ``ProcessPoolExecutor`` of spawned workers (one
node), or split over the ranks of a ``torchrun`` launch (``torch.distributed``)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import multiprocessing as mp
import signal
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine import artifacts
from engine.distributed import DistContext, guarded
from engine.pipeline import task_from_run
from engine.task import TwoStageTask
from engine.training import (
    NotConvergedWarning,
    StageFit,
    TrainingError,
    TwoStageFit,
    fit_two_stage,
)
from engine.trust_region import DenseCurvature, NewtonSettings
from engine.validation.settings import FIT_KEYS, ValidationSettings

# ----- retraining jobs (run in worker processes or in-process) ------------------------------
_WORKER: dict[str, Any] = {}


# Retrains start at the reference minimum and reuse its Hessians (chord steps: no L-BFGS, no
# new Hessian); their curvature is the reference's, reported as such, not rebuilt per retrain.
# A retrain that drifts onto a saddle (large group removals) gets a bounded number of Hessians
# per round; what stays unconverged is reported, as before.
RETRAIN_NEWTON = NewtonSettings(certify=False, max_steps=200, max_hessians=1)


def _fit_to_arrays(fit: TwoStageFit, curvature: bool = False) -> dict[str, np.ndarray]:
    out = {k: getattr(fit, k).detach().numpy().copy() for k in FIT_KEYS}
    for name in ("pretrain", "finetune") if curvature else ():
        stage = getattr(fit, name)
        if stage is not None and stage.curvature is not None:
            cur = stage.curvature
            out.update({f"{name}_evals": cur.evals.numpy(), f"{name}_evecs": cur.evecs.numpy(),
                        f"{name}_point": cur.point.numpy()})
    return out


def _arrays_to_fit(arrays: dict[str, np.ndarray], dtype: torch.dtype) -> TwoStageFit:
    fit = TwoStageFit(*(torch.as_tensor(arrays[k], dtype=dtype) for k in FIT_KEYS))
    for name in ("pretrain", "finetune"):
        if f"{name}_evals" in arrays:
            cur = DenseCurvature(*(torch.as_tensor(arrays[f"{name}_{k}"], dtype=dtype)
                                   for k in ("evals", "evecs", "point")))
            setattr(fit, name, StageFit(cur.point, math.nan, math.nan, 0, math.nan, 0.0,
                                        curvature=cur))
    return fit



@contextlib.contextmanager
def _without_main_script() -> Iterator[None]:
    """Start spawned workers without re-running the caller's ``__main__``.

    ``spawn`` re-imports the parent's main module in every child.  The workers need only this
    package (their initializer rebuilds the task from the run directory), and the caller's
    main can be anything: a script with side effects, or, under AppTest, a temporary page
    script that cannot run outside it (which killed every worker at start-up in CI).  A blank
    ``__main__`` while the pool starts its processes (they start on ``submit``) avoids it.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main

def _init_worker(run_path: str, reference_file: str, tolerance: float,
                 max_iter: int, max_rounds: int) -> None:
    """Worker initializer: one torch thread; rebuild the task once from the run directory and
    the reference fit from the ``.npz`` the parent wrote."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    run = artifacts.load_run(run_path, verify_hashes=False)
    _, task, _ = task_from_run(run)
    with np.load(reference_file, allow_pickle=False) as data:
        reference = {k: data[k] for k in data.files}
    _set_worker_state(task, _arrays_to_fit(reference, task.dtype), tolerance, max_iter,
                      max_rounds)


def _set_worker_state(task: TwoStageTask, reference: TwoStageFit, tolerance: float,
                      max_iter: int, max_rounds: int) -> None:
    _WORKER.update(task=task, reference=reference, tolerance=tolerance, max_iter=max_iter,
                   max_rounds=max_rounds)


def _retrain(removed: tuple[int, ...]) -> dict[str, Any]:
    """Retrain both stages with weight 0 at ``removed`` (denominator M), warm-started."""
    task: TwoStageTask = _WORKER["task"]
    tol, max_iter = _WORKER["tolerance"], _WORKER["max_iter"]
    weights = torch.ones(task.n_pretrain, dtype=task.dtype)
    weights[list(removed)] = 0.0
    start = time.perf_counter()
    fit = _WORKER["reference"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotConvergedWarning)
            # Large removals (groups) can need more than one round: each round continues from
            # the previous one's result with twice the L-BFGS iterations and the trainer's
            # trust-region Newton phase, which reuses the reference Hessian while it helps.
            rounds = 0
            while rounds < _WORKER["max_rounds"]:
                rounds += 1
                limit = max_iter * 2 ** (rounds - 1)
                fit = fit_two_stage(task, tolerance=(tol, tol), max_iter=(limit, limit),
                                    sample_weights=weights, warm_start=fit,
                                    newton=RETRAIN_NEWTON)
                if max(fit.pretrain.final_grad_norm, fit.finetune.final_grad_norm) <= tol:
                    break
    except TrainingError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - start}
    return {"params": _fit_to_arrays(fit), "seconds": time.perf_counter() - start,
            "rounds": rounds, "pretrain_grad_norm": fit.pretrain.final_grad_norm,
            "finetune_grad_norm": fit.finetune.final_grad_norm}


def run_retrains(jobs: Sequence[tuple[int, ...]], run_path: Path, task: TwoStageTask,
                 reference: TwoStageFit, settings: ValidationSettings,
                 progress: Callable[[int, int], None] | None = None,
                 world: DistContext | None = None) -> list[dict[str, Any]] | None:
    """Retrain once per job (a tuple of removed pretraining indices); results in job order.

    ``world`` with several ranks (``torchrun``): rank r retrains jobs r, r + N, r + 2N, ... in
    its own process and rank 0 gathers every result (``None`` on the other ranks).  Each
    retrain is deterministic given its job, so the results are the same however they are run.
    """
    if world is not None and world.distributed:
        return _run_on_ranks(jobs, task, reference, settings, progress, world)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    workers = min(settings.n_workers, max(1, len(jobs)))
    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _set_worker_state(task, reference, settings.tolerance, settings.max_iter,
                              settings.max_rounds)
            for i, job in enumerate(jobs):
                results[i] = _retrain(job)
                if progress:
                    progress(i + 1, len(jobs))
        finally:
            torch.set_num_threads(threads)
            _WORKER.clear()
        return results  # type: ignore[return-value]
    # The reference fit (dense curvature included: tens of MB) goes through a file, not the
    # spawn pipe: a worker that dies at start-up would leave the parent blocked writing to it
    # forever, where a file read fails the pool (BrokenProcessPool) with an error instead.
    with tempfile.TemporaryDirectory(prefix="influence-validate-") as tmp:
        reference_file = str(Path(tmp) / "reference.npz")
        np.savez(reference_file, **_fit_to_arrays(reference, curvature=True))
        with _without_main_script():
            ex = cf.ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                initargs=(str(run_path), reference_file, settings.tolerance, settings.max_iter,
                          settings.max_rounds))
            try:
                futures = {ex.submit(_retrain, job): i for i, job in enumerate(jobs)}
                for done, fut in enumerate(cf.as_completed(futures), 1):
                    results[futures[fut]] = fut.result()
                    if progress:
                        progress(done, len(jobs))
            except BaseException:
                ex.shutdown(wait=False, cancel_futures=True)
                raise
            ex.shutdown()
    return results  # type: ignore[return-value]


def _run_on_ranks(jobs: Sequence[tuple[int, ...]], task: TwoStageTask, reference: TwoStageFit,
                  settings: ValidationSettings, progress: Callable[[int, int], None] | None,
                  world: DistContext) -> list[dict[str, Any]] | None:
    mine = list(range(world.rank, len(jobs), world.world_size))
    done: dict[int, dict[str, Any]] = {}
    threads = torch.get_num_threads()
    # no collectives inside: a rank that raises is reported by name on every rank
    with guarded(world, f"retraining {len(mine)} of {len(jobs)} validation jobs"):
        torch.set_num_threads(1)
        try:
            _set_worker_state(task, reference, settings.tolerance, settings.max_iter,
                              settings.max_rounds)
            for count, i in enumerate(mine, 1):
                done[i] = _retrain(jobs[i])
                if progress and world.is_main:   # rank 0's share stands for the whole
                    progress(min(count * world.world_size, len(jobs)), len(jobs))
        finally:
            torch.set_num_threads(threads)
            _WORKER.clear()
    parts: list[dict[int, dict[str, Any]]] | None = (
        [{} for _ in range(world.world_size)] if world.is_main else None)
    dist.gather_object(done, parts, dst=0)
    if parts is None:
        return None
    merged = {i: r for part in parts for i, r in part.items()}
    return [merged[i] for i in range(len(jobs))]
