"""Data-parallel scaling on this machine: curvature and scoring time for 1 and 2 ranks.

    .venv/bin/python benchmarks/distributed_bench.py            # default size: ~2 min on 2 cores
    .venv/bin/python benchmarks/distributed_bench.py --tiny     # smoke test, seconds
    .venv/bin/python benchmarks/distributed_bench.py --ranks 1 2 4 --examples 40000

One ``torchrun --standalone --nproc_per_node N`` launch per world size (gloo on the CPU, every
rank with ``--threads`` BLAS/OpenMP threads, 1 by default, so that N ranks use N cores).  A
launch of 1 rank is the plain single-process engine (``WORLD_SIZE=1``: no process group).  Every
rank builds the same synthetic task (an MLP, float64) and times, at the modules' initial
parameters (the timings do not depend on the values; a damping of 5 keeps H positive
definite there):

* ``finetune solve``  test gradients and the finetuning-stage solve (exact ``A_TT``):
  replicated on every rank, so it does not scale (Amdahl's share);
* ``cg``              the pretraining solve ``r = H^{-1} [s; 0]``: CG with a fixed number of
  iterations on 2K right-hand sides; each product sums its rank's shard, then one all-reduce
  of the ``(P, 2K)`` product;
* ``ekfac fit``       EK-FAC factors of H: two passes over the shard, one all-reduce per pass,
  the layer plan broadcast from rank 0, the eigendecompositions replicated;
* ``scoring``         every pretraining example's score, each rank its own shard; no
  collective but the failure check of :func:`engine.distributed.guarded`.

Each phase starts and ends with a barrier (outside the timing of its communication), so its
time is the slowest rank's.  Communication is rank 0's :class:`CommunicationLog` of the phase
(payload bytes per kind; a ring all-reduce moves ~2 (N - 1) / N x that per rank), printed with
the bytes the scaling model predicts.  The 2-rank launch also times gloo all-reduces of the CG
product's size (payload GB/s).  Results: a table on stdout and
``benchmarks/out/distributed_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the engine package, when run as a script
OUT = ROOT / "benchmarks" / "out" / "distributed_bench.json"

SIZES = {   # examples M, inputs, hidden, features, pretraining classes, test points K, CG its
    # 79 s for 1 rank, 41 s for 2 on 2 cores; CG (4 products of 8 columns) costs ~20x an
    # EK-FAC fit or a scoring pass, so M is large enough for those to take seconds too
    "default": dict(examples=400_000, inputs=64, hidden=64, features=32, classes=10,
                    test_points=4, cg_iterations=3),
    "tiny": dict(examples=1_200, inputs=16, hidden=16, features=8, classes=4, test_points=4,
                 cg_iterations=3),
}
PHASES = ("finetune solve", "cg", "ekfac fit", "scoring")


def build(size: dict[str, int]) -> tuple[Any, Any, Any, Any]:
    """The synthetic task (same on every rank: seeded), its initial 'fit' and test points."""
    import torch
    from torch import nn

    from engine.task import TwoStageTask
    from engine.training import TwoStageFit

    g = torch.Generator().manual_seed(0)
    d, c = size["inputs"], size["classes"]
    centers = 2.0 * torch.randn(c, d, generator=g, dtype=torch.float64)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.randint(c, (n,), generator=g)
        return centers[label] + torch.randn(n, d, generator=g, dtype=torch.float64), label

    pre, ft, test = sample(size["examples"]), sample(400), sample(size["test_points"])
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(d, size["hidden"]), nn.Tanh(),
                             nn.Linear(size["hidden"], size["features"]), nn.Tanh()).double()
    task = TwoStageTask(backbone, nn.Linear(size["features"], c).double(),
                        nn.Linear(size["features"], 2).double(), pre, (ft[0], ft[1] % 2),
                        pretrain_weight_decay=1e-2, finetune_weight_decay=1e-2)
    ub, w, t = task.initial_state()
    return task, TwoStageFit(ub, w, ub, t), test[0], test[1] % 2


def predicted_bytes(task: Any, size: dict[str, int]) -> dict[str, int]:
    """Payload bytes all-reduced per phase by the scaling model (float64 in transit)."""
    p = task.u_layout.numel + task.w_layout.numel
    cols = 2 * size["test_points"]
    layers = [m for mod in (task.backbone, task.pretrain_head) for m in mod.modules()
              if hasattr(m, "in_features")]
    factors = 1 + len(layers) + sum(m.out_features ** 2 + (m.in_features + 1) ** 2
                                    for m in layers)
    corrections = sum(m.out_features * (m.in_features + 1) for m in layers)
    # CG: one product per iteration and the final true-residual product, all 2K columns
    return {"cg": 8 * (size["cg_iterations"] + 1) * p * cols,
            "ekfac fit": 8 * (factors + corrections)}


def worker(out_path: Path, size: dict[str, int], threads: int) -> None:
    """One rank: time every phase, log its communication, write rank 0's results."""
    import torch

    from engine.curvature import (
        CGSolver,
        EkfacSolver,
        ExactSolver,
        finetune_cross_matvec,
        finetune_head_hessian,
        pretrain_hessian,
    )
    from engine.distributed import CommunicationLog, guarded, init_from_env, shutdown
    from engine.distributed.reduce import all_reduce_sum
    from engine.scores import Directions, score_pretraining, test_gradients

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")          # fixed CG iterations: inexact solves, as asked
    world = init_from_env()
    task, fit, x_test, y_test = build(size)
    k, nw = size["test_points"], task.w_layout.numel
    results: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        world.barrier()
        start = time.perf_counter()
        with CommunicationLog() as log:
            value = fn()
        world.barrier()
        results[name] = {"seconds": time.perf_counter() - start, "traffic": log.summary()}
        return value

    def finetune_solve() -> torch.Tensor:   # engine.scores.influence_directions, fixed scenario
        gt, gu = test_gradients(task, fit, x_test, y_test)
        solved = ExactSolver().solve(finetune_head_hessian(task, fit), gt, 0.1)
        return torch.cat([gu, -finetune_cross_matvec(task, fit, solved)], 1)

    def cg(s: torch.Tensor) -> torch.Tensor:
        h = pretrain_hessian(task, fit, 1024, world=world)
        solver = CGSolver(rtol=1e-12, max_iter=size["cg_iterations"], fixed_iterations=True)
        # damping 5: H at the initial parameters has eigenvalues down to about -1.6
        return solver.solve(h, torch.cat([s, s.new_zeros(nw, 2 * k)]), 5.0)

    s = timed("finetune solve", finetune_solve)
    r = timed("cg", lambda: cg(s))
    directions = Directions(s[:, :k], s[:, k:], r[:, :k], r[:, k:])
    h = pretrain_hessian(task, fit, 1024, world=world)
    timed("ekfac fit", lambda: EkfacSolver(batch_size=512).factors(h))
    shard = world.shard(task.n_pretrain) if world.distributed else None

    def scoring() -> None:
        with guarded(world, "scoring"):
            score_pretraining(task, fit, directions, 512, rows=shard)

    timed("scoring", scoring)
    probe = None
    if world.distributed:    # gloo's all-reduce rate for the CG product's size
        buf = torch.ones(r.shape, dtype=torch.float64)
        seconds = []
        for _ in range(5):
            world.barrier()
            t0 = time.perf_counter()
            all_reduce_sum(buf, world)
            seconds.append(time.perf_counter() - t0)
        probe = {"bytes": buf.numel() * 8, "seconds": sorted(seconds)[2]}
    if world.is_main:
        out_path.write_text(json.dumps({
            "world_size": world.world_size, "backend": world.backend, "threads": threads,
            "parameters": r.shape[0], "predicted_bytes": predicted_bytes(task, size),
            "phases": results, "allreduce_probe": probe}))
    shutdown(world)


def launch(ranks: int, size: dict[str, int], threads: int, name: str) -> dict[str, Any]:
    """One torchrun launch of ``ranks`` workers; rank 0's results, plus the launch's wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(ranks), __file__, "--worker", str(out), "--size", name,
             "--threads", str(threads), *_size_args(size)],
            cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise SystemExit(f"the {ranks}-rank launch failed:\n{tail}")
        result = json.loads(out.read_text())
    result["launch_seconds"] = time.perf_counter() - start
    return result


def _size_args(size: dict[str, int]) -> list[str]:
    return [a for k, v in size.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _size(nbytes: float) -> str:
    if nbytes < 1e3:
        return f"{nbytes:.0f} B"
    return f"{nbytes / 1e3:.1f} kB" if nbytes < 1e6 else f"{nbytes / 1e6:.1f} MB"


def report(runs: list[dict[str, Any]], size: dict[str, int]) -> str:
    """The table printed at the end (and nothing else: the JSON has the details)."""
    base = runs[0]["phases"]
    lines = [f"synthetic MLP, float64: M = {size['examples']:,} pretraining examples, "
             f"P = {runs[0]['parameters']:,} parameters (U + W), K = {size['test_points']} test "
             f"points (2K = {2 * size['test_points']} columns), CG {size['cg_iterations']} "
             f"iterations; gloo on the CPU, {runs[0]['threads']} thread(s) per rank",
             "", f"{'phase':<15} {'ranks':>5} {'seconds':>8} {'vs 1 rank':>9} {'speedup':>7}  "
             "communication of rank 0: payload (calls)                 model"]
    for phase in PHASES:
        for r in runs:
            p = r["phases"][phase]
            t1, t = base[phase]["seconds"], p["seconds"]
            kinds = {k: v for k, v in p["traffic"].items() if k != "total"}
            comm = ", ".join(f"{k} {_size(v['bytes'])} ({v['calls']})"
                             for k, v in kinds.items())
            model = r["predicted_bytes"].get(phase) if r["world_size"] > 1 else None
            lines.append(f"{phase:<15} {r['world_size']:>5} {t:>8.2f} {t / t1:>9.2f} "
                         f"{t1 / t:>7.2f}  {comm or 'none':<52} "
                         f"{_size(model) if model else '':>8}")
    for r in runs:
        lines.append(f"launch of {r['world_size']} rank(s): {r['launch_seconds']:.1f} s wall "
                     "(imports, data, phases)")
        probe = r.get("allreduce_probe")
        if probe:
            lines.append(f"gloo all-reduce of {_size(probe['bytes'])} between "
                         f"{r['world_size']} ranks: {probe['seconds'] * 1e3:.1f} ms "
                         f"({probe['bytes'] / probe['seconds'] / 1e9:.2f} GB/s payload)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a smoke-test size (seconds)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per rank")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)   # set by launch()
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    for key, value in SIZES["default"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"default {value:,}")
    ns = p.parse_args(argv)
    name = ns.size or ("tiny" if ns.tiny else "default")
    size = {k: getattr(ns, k) if getattr(ns, k) is not None else v
            for k, v in SIZES[name].items()}
    if ns.worker is not None:
        worker(ns.worker, size, ns.threads)
        return
    runs = [launch(n, size, ns.threads, name) for n in sorted(set(ns.ranks))]
    text = report(runs, size)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"size": size, "runs": runs, "table": text}, indent=2))


if __name__ == "__main__":
    main()
