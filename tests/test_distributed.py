"""Data-parallel runs on torch.distributed (engine.distributed).

Fast, single-process tests: shard bounds, the world of one (every collective a no-op), the
score files written by columns, the settings refused under torchrun.

One launch of 2 gloo processes on the CPU (``torchrun --standalone --nproc_per_node 2
tests/distributed_worker.py``, module fixture ``launched``; each launch costs ~20 s of imports,
so every distributed check runs in it) with M = 1,001 pretraining examples, an uneven split
([0, 501) and [501, 1001)).  Each rank saves what it computed; the tests compare it with the
single-process run here (float64, relative error <= 1e-10): trained parameters, pretraining
Hessian products, scores and both terms (exact and CG solvers), the run command's output, and
a run in which rank 1 raises mid-scoring (it must fail on both ranks, name rank 1 and leave no
run behind).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import engine.distributed.reduce as reduce_module
from engine import artifacts
from engine.curvature import pretrain_hessian
from engine.curvature.gauss_newton import gauss_newton
from engine.distributed import (
    SINGLE,
    CommunicationLog,
    DistContext,
    RankFailedError,
    Shard,
    agree,
    all_reduce_scalar,
    all_reduce_sum,
    broadcast_object,
    gather_rows,
    guarded,
    init_from_env,
    replicated,
    shard_bounds,
    shard_of,
    sum_across_ranks,
)
from engine.pipeline import run as make_run
from engine.scores import compute_scores
from engine.training import fit_pretraining, fit_two_stage, pretrain_objective
from engine.validation import VALIDATION_DIR, validate
from tests.conftest import ROOT, mlp_task
from tests.distributed_worker import (
    ADAM,
    EKFAC_SOLVERS,
    INJECTED,
    SCORE_ARGS,
    TOLERANCE,
    VALIDATION,
    api_task,
    probe_columns,
    sample_rows,
)
from tests.test_validation import write_tiny_data

WORKER = Path(__file__).with_name("distributed_worker.py")
RTOL = 1e-10


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """max |actual - expected| <= rtol * max |expected| (relative to the array's scale)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"relative error {err / scale:.3g} > {rtol:g}"


# ----- shards ---------------------------------------------------------------------------------

def test_uneven_split_of_1001_over_2_ranks():
    assert shard_bounds(1001, 2) == [Shard(0, 501, 1001), Shard(501, 1001, 1001)]
    assert shard_of(1001, 1, 2).rows == slice(501, 1001)
    assert shard_of(1001, 0, 1).whole


@pytest.mark.parametrize("total", [0, 1, 2, 7, 100, 1001])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_are_contiguous_disjoint_and_balanced(total, world_size):
    shards = shard_bounds(total, world_size)
    assert len(shards) == world_size
    assert shards[0].lo == 0 and shards[-1].hi == total
    assert all(a.hi == b.lo for a, b in zip(shards, shards[1:], strict=False))   # no gap
    sizes = [s.size for s in shards]
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)                    # larger shards first


def test_shard_errors_and_local_indices():
    with pytest.raises(ValueError, match="world_size"):
        shard_bounds(10, 0)
    with pytest.raises(ValueError, match="rank"):
        shard_of(10, 2, 2)
    with pytest.raises(ValueError):
        Shard(5, 3, 10)
    assert shard_bounds(1, 3)[2].size == 0        # fewer rows than ranks: empty shards
    local = Shard(501, 1001, 1001).local(sample_rows())
    assert local.tolist() == [0, 276, 499]


# ----- a world of one -------------------------------------------------------------------------

def test_world_of_one_makes_every_collective_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is SINGLE
    assert not SINGLE.distributed and SINGLE.is_main and SINGLE.backend is None
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert all_reduce_sum(x, SINGLE) is x
    assert sum_across_ranks(x, SINGLE) is x and replicated(x, SINGLE) is x
    assert all_reduce_scalar(3, SINGLE) == 3.0
    assert gather_rows(x, SINGLE, SINGLE.shard(4)) is x
    agree(SINGLE, "doing nothing", None)
    SINGLE.barrier()


def test_communication_log_counts_calls_and_payload_bytes(monkeypatch):
    """The counting, with the collectives themselves stubbed out (rank 0 of a world of 2)."""
    world = DistContext(rank=0, world_size=2, backend="gloo")
    dist = reduce_module.dist
    monkeypatch.setattr(dist, "all_reduce", lambda buf, op=None: None)
    monkeypatch.setattr(dist, "gather", lambda buf, parts, dst=0: None)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src=0, device=None: None)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    x = torch.ones(10, dtype=torch.float32)
    with CommunicationLog() as outer:
        all_reduce_sum(x, world)                      # float32 travels as float64: 80 bytes
        with CommunicationLog() as inner:
            all_reduce_scalar(3, world)
            gather_rows(torch.ones(501, 2, dtype=torch.float64), world, Shard(0, 501, 1001))
        broadcast_object({"plan": [1, 2]}, world)
        world.barrier()
    assert inner.calls == {"all_reduce": 1, "gather": 1}
    assert inner.bytes == {"all_reduce": 8, "gather": 501 * 2 * 8}
    assert outer.calls == {"all_reduce": 2, "gather": 1, "broadcast": 1, "barrier": 1}
    assert outer.bytes["all_reduce"] == 88 and outer.bytes["broadcast"] > 0
    assert outer.summary()["total"] == {"calls": 5, "bytes": outer.total_bytes}
    all_reduce_sum(x, world)                          # no log active: nothing counted
    assert outer.total_calls == 5
    with CommunicationLog() as single:                # a world of one communicates nothing
        with CommunicationLog() as empty:             # equal to `single`, left first
            pass
        all_reduce_sum(x, SINGLE)
        SINGLE.barrier()
        all_reduce_sum(x, world)
    assert (single.calls, empty.calls) == ({"all_reduce": 1}, {})


def test_guarded_in_a_world_of_one_raises_the_original_error():
    with pytest.raises(KeyError, match="original"), guarded(SINGLE, "scoring"):
        raise KeyError("original")


def test_single_process_objective_and_curvature_are_unchanged():
    task, _, _ = mlp_task(m=50)
    x, y = task.pretrain_data
    theta = torch.cat(task.initial_state()[:2])
    assert torch.equal(pretrain_objective(task, x, y, world=SINGLE)(theta),
                       pretrain_objective(task, x, y)(theta))
    fit = fit_two_stage(task)
    h = pretrain_hessian(task, fit, world=SINGLE)
    assert h.shard is None and not h.sharded and h.n_examples == 50


def test_score_files_written_by_column_blocks(tmp_path):
    """The distributed writer's file steps, in one process: blocks in any order, then seal."""
    staging = artifacts.open_destination(tmp_path / "run", overwrite=False)
    n_test, n_pre = 3, 7
    full = {name: np.arange(n_test * n_pre, dtype=np.float32).reshape(n_test, n_pre) + i
            for i, name in enumerate(artifacts.SCORE_NAMES)}
    artifacts.create_score_files(staging.path, n_test, n_pre)
    for lo, hi in ((4, 7), (0, 4)):
        artifacts.write_score_columns(staging.path, lo, {k: v[:, lo:hi] for k, v in full.items()})
    with pytest.raises(artifacts.RunError, match="does not fit"):
        artifacts.write_score_columns(staging.path, 5, {k: v[:, :4] for k, v in full.items()})
    bad = {k: v[:, :1].copy() for k, v in full.items()}
    bad["total"][0, 0] = np.nan
    with pytest.raises(artifacts.RunError, match="NaN"):
        artifacts.write_score_columns(staging.path, 0, bad)
    test_df = pd.DataFrame({"test_id": ["a", "b", "c"], "label": 0, "pred": 0, "loss": 0.0,
                            "correct": True})
    pre_df = pd.DataFrame({"example_id": [f"p{i}" for i in range(n_pre)], "label": 0})
    path = artifacts.write_run(tmp_path / "run", {"config": {}}, test_df, pre_df, None,
                               np.zeros((n_pre, 2)), np.zeros((n_test, 2)), staging=staging)
    loaded = artifacts.load_run(path)
    for name in artifacts.SCORE_NAMES:
        np.testing.assert_array_equal(loaded.scores[name], full[name])


# ----- one launch of 2 gloo processes ---------------------------------------------------------

@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Run every distributed check in one 2-process launch; returns its directory."""
    root = tmp_path_factory.mktemp("dist")
    config = write_tiny_data(root / "data", n_pre=1001)
    # Batches of 128 examples: several per shard, so rank 1 fails in the middle of scoring.
    config.write_text(config.read_text() + "[influence]\nbatch_size = 128\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(root)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return root


@pytest.fixture(scope="module")
def ranks(launched) -> list[dict]:
    return [torch.load(launched / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    """The single-process run of the worker's synthetic task."""
    task, x_test, y_test = api_task()
    fit = fit_two_stage(task, tolerance=TOLERANCE)
    return task, x_test, y_test, fit


def test_launch_is_two_gloo_ranks_with_an_uneven_split(ranks):
    assert [(r["rank"], r["world_size"], r["backend"]) for r in ranks] == [
        (0, 2, "gloo"), (1, 2, "gloo")]
    assert [r["shard"] for r in ranks] == [(0, 501), (501, 1001)]


def test_trained_parameters_equal_the_single_process_run(ranks, single):
    fit = single[3]
    for r in ranks:
        assert r["pretrain_status"] == "minimum"
        for name in ("backbone_pre", "w", "backbone_ft", "t"):
            assert_rel(r["fit"][name], getattr(fit, name))


def test_minibatch_adam_is_data_parallel_and_equals_one_process(ranks, single):
    """Each rank computes its shard's rows of every minibatch; the all-reduced steps equal
    the single-process ones (Adam, 3 epochs, float64)."""
    task = single[0]
    ref = fit_pretraining(task, optimizer=ADAM)
    for r in ranks:
        assert_rel(r["adam"], ref.params)
        assert abs(r["adam_grad_norm"] - ref.final_grad_norm) <= 1e-10 * ref.final_grad_norm


def test_pretraining_hessian_products_equal_the_single_process_ones(ranks, single):
    task, _, _, fit = single
    h = pretrain_hessian(task, fit, batch_size=200)
    V = probe_columns(h.dim)
    expected = {"matvec": h.matvec(V), "matvec_sample": h.matvec_sample(V, sample_rows()),
                "dense": h.dense(), "gauss_newton": gauss_newton(h).matvec(V)}
    for r in ranks:
        for name, value in expected.items():
            assert_rel(r[name], value)
        # one all-reduce of the float64 (dim, 3) product, whatever the rank's chunks
        assert r["matvec_traffic"] == {"all_reduce": {"calls": 1, "bytes": h.dim * 3 * 8},
                                       "total": {"calls": 1, "bytes": h.dim * 3 * 8}}


@pytest.mark.parametrize("name", sorted(EKFAC_SOLVERS))
def test_ekfac_factors_are_reduced_to_the_single_process_ones(ranks, single, name):
    """EK-FAC fitted on two shards (sums all-reduced, per-row label draws) solves exactly as
    the single-process fit: same factors, eigenvalue corrections and fitted rows."""
    task, _, _, fit = single
    h = pretrain_hessian(task, fit, batch_size=200)
    V = probe_columns(h.dim)
    solver = EKFAC_SOLVERS[name]()
    expected = solver.solve(h, V, 1e-3)
    examples = solver.describe().get("factor_examples")
    for r in ranks:
        # ekfac+cg: 4 CG iterations compound round-off differences of the factors a little
        assert_rel(r[name], expected, 1e-9 if name == "ekfac+cg" else 1e-10)
        assert r[f"{name}_examples"] == examples
    assert examples == (300 if name == "ekfac_subset" else 1001)
    # the fit: rank 0's layer plan broadcast, one all-reduce per pass over the data
    traffic = [r[f"{name}_traffic"] for r in ranks]
    assert traffic[0] == traffic[1]
    assert traffic[0]["broadcast"]["calls"] == 1
    if name != "ekfac+cg":   # + one all-reduce per CG product
        assert traffic[0]["all_reduce"]["calls"] == 2


@pytest.mark.parametrize("solver", sorted(SCORE_ARGS))
def test_scores_and_both_terms_equal_the_single_process_run(ranks, single, solver):
    task, x_test, y_test, fit = single
    ref = compute_scores(task, fit, x_test, y_test, SCORE_ARGS[solver]())
    for r in ranks:
        got = r[f"scores_{solver}"]
        lo, hi = got["pretrain_rows"]
        assert (lo, hi) == r["shard"]
        for term in ("total", "pretrained_term", "finetuned_term"):
            assert_rel(got[term], getattr(ref, term)[:, lo:hi])
        assert_rel(got["total"], got["pretrained_term"] + got["finetuned_term"], 1e-12)


def test_run_command_under_torchrun_equals_the_single_process_run(launched, ranks):
    assert [r["cli_exit"] for r in ranks] == [0, 0]
    dist_run = artifacts.load_run(launched / "dist_run")     # complete, hashes intact
    one = artifacts.load_run(make_run(launched / "data" / "config.toml", launched / "single",
                                      echo=lambda _: None))
    assert dist_run.manifest["distributed"] == {"world_size": 2, "backend": "gloo",
                                                "shards": [[0, 501], [501, 1001]]}
    assert one.manifest["distributed"] == {"world_size": 1, "backend": None,
                                           "shards": [[0, 1001]]}
    a, b = artifacts.load_model_arrays(dist_run), artifacts.load_model_arrays(one)
    for name in b:
        assert_rel(torch.from_numpy(a[name]), torch.from_numpy(b[name]))
    assert_rel(torch.tensor(dist_run.pretrain_examples["pretrain_loss"].to_numpy()),
               torch.tensor(one.pretrain_examples["pretrain_loss"].to_numpy()))
    for name in artifacts.SCORE_NAMES:    # float32 files of float64 scores equal to 1e-10
        np.testing.assert_allclose(dist_run.scores[name], one.scores[name], rtol=1e-6,
                                   atol=1e-6 * np.abs(one.scores[name]).max())
    pd.testing.assert_frame_equal(dist_run.test_points, one.test_points)
    # Finetuning-data influence: rank 0 alone scores all finetuning examples, as one process.
    assert dist_run.finetune_scores.shape == (dist_run.n_test, 60)
    np.testing.assert_allclose(dist_run.finetune_scores, one.finetune_scores, rtol=1e-6,
                               atol=1e-6 * np.abs(one.finetune_scores).max())
    pd.testing.assert_frame_equal(dist_run.finetune_examples, one.finetune_examples,
                                  check_exact=False, rtol=1e-9)
    np.testing.assert_allclose(dist_run.pretrain_xy, one.pretrain_xy, rtol=1e-5, atol=1e-5)
    assert (dist_run.manifest["metrics"]["pretrain_train_accuracy"]
            == one.manifest["metrics"]["pretrain_train_accuracy"])


def assert_close_tree(a, b, where: str) -> None:
    """Nested dicts / lists equal, floats to 1e-9 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where
    else:
        assert a == b, where


def test_validation_on_two_ranks_equals_the_single_process_one(launched, ranks, tmp_path):
    """Retrains split over the ranks (rank 0 gathers and writes) give the single-process
    results bit for bit; the other rank returns None."""
    assert ranks[1]["validation"] is None
    dist_summary = ranks[0]["validation"]
    assert dist_summary["settings"]["ranks"] == 2
    copy = tmp_path / "run"
    shutil.copytree(launched / "dist_run", copy)
    shutil.rmtree(copy / VALIDATION_DIR)
    one = validate(copy, VALIDATION, echo=lambda _: None)
    assert one["settings"]["ranks"] == 1
    # Bit for bit when both sides run with the same BLAS threading; the ranks were started with
    # OMP_NUM_THREADS=1 and this process may not be, which moves the last digits only.
    for section in ("loo", "group"):
        assert_close_tree(dist_summary[section], one[section], section)
    for key in ("designated_pairs", "test_ids", "scores_from"):   # rank 0's finetuning check
        assert_close_tree(dist_summary["finetune"][key], one["finetune"][key], key)
    for name in ("loo.csv", "group.csv"):
        a = pd.read_csv(launched / "dist_run" / VALIDATION_DIR / name)
        b = pd.read_csv(copy / VALIDATION_DIR / name)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12)


def test_a_rank_failing_mid_scoring_fails_the_run_on_every_rank(launched, ranks):
    for r in ranks:
        failure = r["failure"]
        assert failure is not None and failure["type"] == RankFailedError.__name__, failure
        assert failure["ranks"] == [1]
        assert "rank 1 of 2 failed while scoring pretraining examples [501, 1001)" in \
            failure["message"]
        assert INJECTED in failure["message"]
    assert not (launched / "failed_run").exists()
    assert not list(launched.glob(".failed_run*")), "a staging directory was left behind"
