"""One rank of the 2-process launch of ``tests/test_distributed.py`` (not a test module itself).

Started by ``torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py ROOT``; every
check of the distributed engine runs in this one launch (each launch costs ~20 s of imports),
and each rank saves what it computed to ``ROOT/rank<R>.pt`` (and writes runs under ``ROOT``)
for the test to compare with single-process results:

1. the engine API on a synthetic task with M = 1,001 pretraining examples (shards [0, 501) and
   [501, 1001)): trained parameters, pretraining-Hessian products (``matvec``,
   ``matvec_sample``, ``dense``, Gauss-Newton), EK-FAC and ekfac+cg solves (all-reduced
   factors), scores and both terms (exact and CG solvers);
2. ``python -m engine run`` through :func:`engine.cli.main` on ``ROOT/data/config.toml``, then
   ``validate`` of that run with its retrains split over the two ranks;
3. the same run with rank 1 raising mid-scoring: must fail on every rank, naming rank 1.
"""

from __future__ import annotations

import datetime as dt
import sys
import traceback
from pathlib import Path

import torch

import engine.scores as scores_module
from engine import cli
from engine.curvature import CGSolver, EkfacCgSolver, EkfacSolver, ExactSolver, pretrain_hessian
from engine.curvature.gauss_newton import gauss_newton
from engine.distributed import CommunicationLog, RankFailedError, init_from_env
from engine.pipeline import run
from engine.scores import InfluenceArguments, compute_scores
from engine.training import MinibatchSettings, fit_pretraining, fit_two_stage
from engine.validation import ValidationSettings, validate
from tests.conftest import mlp_task

M = 1001
TOLERANCE = (1e-12, 1e-12)
INJECTED = "injected failure in the middle of scoring"


def api_task() -> tuple:
    """The synthetic task of check 1 (the test builds the same one)."""
    return mlp_task(scenario="updated", alpha=0.5, m=M, n=40, k=5, d=4, hidden=5)


def probe_columns(dim: int) -> torch.Tensor:
    """Fixed right-hand sides for the curvature products (the test draws the same)."""
    return torch.randn(dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def sample_rows() -> torch.Tensor:
    """Global example indices for ``matvec_sample`` (both shards, a repeat)."""
    return torch.tensor([3, 500, 501, 777, 3, 1000])


# EK-FAC solvers on the sharded pretraining Hessian: the factors' sums are all-reduced and each
# row's sampled label is the single-process one; 300 fitted rows straddle the shard boundary.
EKFAC_SOLVERS = {
    "ekfac": lambda: EkfacSolver(batch_size=64),
    "ekfac_subset": lambda: EkfacSolver(batch_size=64, max_examples=300),
    "ekfac_expected": lambda: EkfacSolver(batch_size=64, fisher="expected"),
    "ekfac+cg": lambda: EkfacCgSolver(iterations=4, batch_size=64),
}


# Data-parallel minibatch training: 3 epochs of batches of 128 drawn identically on both ranks
# (the last batch of each epoch is short; some batches fall in one shard only).
ADAM = MinibatchSettings("adam", epochs=3, batch_size=128, learning_rate=1e-2, seed=0,
                         eval_batch_size=300)


# A small validation (the test repeats it in one process): 2 test points x (2 top + 2 random)
# single removals and one group size with 1 random draw.
VALIDATION = ValidationSettings(max_test_points=2, per_point=2, group_sizes=(5,),
                                random_draws=1, workers=1)


SCORE_ARGS = {
    "exact": lambda: InfluenceArguments(pretrain_solver=ExactSolver(),
                                        finetune_solver=ExactSolver(), batch_size=128,
                                        curvature_batch_size=200),
    "cg": lambda: InfluenceArguments(pretrain_solver=CGSolver(rtol=1e-12),
                                     finetune_solver=CGSolver(rtol=1e-12), batch_size=128,
                                     curvature_batch_size=200),
}


def _api_checks(world, out: dict) -> None:
    task, x_test, y_test = api_task()
    fit = fit_two_stage(task, tolerance=TOLERANCE, world=world)
    out["fit"] = {k: getattr(fit, k) for k in ("backbone_pre", "w", "backbone_ft", "t")}
    out["pretrain_status"] = fit.pretrain.status
    h = pretrain_hessian(task, fit, batch_size=200, world=world)   # chunks differ per rank
    V = probe_columns(h.dim)
    out["shard"] = (h.shard.lo, h.shard.hi)
    with CommunicationLog() as log:   # one all-reduce of the (dim, 3) product per product
        out["matvec"] = h.matvec(V)
    out["matvec_traffic"] = log.summary()
    out["matvec_sample"] = h.matvec_sample(V, sample_rows())
    out["dense"] = h.dense(chunk=17)
    out["gauss_newton"] = gauss_newton(h).matvec(V)
    adam = fit_pretraining(task, optimizer=ADAM, world=world)
    out["adam"], out["adam_grad_norm"] = adam.params, adam.final_grad_norm
    for name, make in EKFAC_SOLVERS.items():
        solver = make()
        with CommunicationLog() as log:
            out[name] = solver.solve(h, V, 1e-3)
        out[f"{name}_traffic"] = log.summary()
        out[f"{name}_examples"] = solver.describe().get("factor_examples")
    for name, make in SCORE_ARGS.items():
        s = compute_scores(task, fit, x_test, y_test, make(), world=world)
        out[f"scores_{name}"] = {"total": s.total, "pretrained_term": s.pretrained_term,
                                 "finetuned_term": s.finetuned_term,
                                 "pretrain_rows": s.pretrain_rows}


def _failing_scoring(world):
    """score_pretraining that raises on rank 1 after its first batch (mid-scoring)."""
    original = scores_module.score_pretraining

    def failing(task, fit, directions, batch_size=512, progress=None, **kwargs):
        def progress_then_fail(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            if world.rank == 1 and done < total:
                raise RuntimeError(INJECTED)

        return original(task, fit, directions, batch_size, progress_then_fail, **kwargs)

    return failing


def main(root: Path) -> None:
    world = init_from_env(timeout=dt.timedelta(seconds=120))
    assert world.distributed and world.backend == "gloo", world
    torch.set_num_threads(1)
    out: dict = {"rank": world.rank, "world_size": world.world_size, "backend": world.backend}
    _api_checks(world, out)

    # 2. the run command, in this process group (cli.main reuses it and leaves it alone)
    config = root / "data" / "config.toml"
    out["cli_exit"] = cli.main(["run", str(config), "--out", str(root / "dist_run")])

    # 2b. validation of that run, its retrains split over the two ranks
    out["validation"] = validate(root / "dist_run", VALIDATION, echo=lambda _: None, world=world)

    # 3. rank 1 raises mid-scoring: the run must fail on every rank and leave nothing
    scores_module.score_pretraining = _failing_scoring(world)
    try:
        run(config, root / "failed_run", world=world, echo=lambda _: None)
        out["failure"] = None
    except RankFailedError as exc:
        out["failure"] = {"type": type(exc).__name__, "message": str(exc), "ranks": exc.ranks}
    except Exception as exc:   # noqa: BLE001 - recorded for the test to report
        out["failure"] = {"type": type(exc).__name__, "message": str(exc), "ranks": None}
    world.barrier()
    torch.save(out, root / f"rank{world.rank}.pt")


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        raise
