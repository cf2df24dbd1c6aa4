"""Accuracy of the ``ekfac`` and ``ekfac+cg`` solvers against the exact solver on a real run.

For a finished run (default: the digits sample ``runs/digits``, whose pretraining Hessian the
exact solver handles), recomputes the influence directions of every scored test point with the
exact solver (the reference) and with EK-FAC variants for the pretraining Hessian (the
finetuning stage stays exact, so only H's approximation is measured, then with both stages
approximated), scores every pretraining example, and prints per score column (test point x
term, and the totals) the Pearson correlation and the overlap of the 20 most harmful examples.

    python benchmarks/ekfac_accuracy.py [RUN_DIR] [--iterations 5 10 20] [--fisher true]

Writes ``benchmarks/out/ekfac_accuracy.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from engine_bench import accuracy_vs_exact  # noqa: E402

from engine import artifacts  # noqa: E402
from engine.curvature import EkfacCgSolver, EkfacSolver, ExactSolver  # noqa: E402
from engine.pipeline import task_from_run  # noqa: E402
from engine.scores import InfluenceArguments, influence_directions, score_pretraining  # noqa: E402


def scores_with(task, fit, x_test, y_test, pre, ft, damping: dict) -> tuple[torch.Tensor, float,
                                                                             dict]:
    """Totals (K, M) for one pair of stage solvers, the seconds of the solves, settings."""
    args = InfluenceArguments(pretrain_solver=pre, finetune_solver=ft,
                              pretrain_damping=damping["pretrain"],
                              finetune_damping=damping["finetune"])
    t0 = time.perf_counter()
    d = influence_directions(task, fit, x_test, y_test, args)
    seconds = time.perf_counter() - t0
    p, f = score_pretraining(task, fit, d)
    return torch.cat([p + f, p, f]), seconds, pre.describe()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", type=Path, default=ROOT / "runs" / "digits")
    p.add_argument("--iterations", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--fisher", default="true", choices=["true", "empirical", "expected"])
    p.add_argument("--relative-damping", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=None,
                   help="score only K evenly spaced test points (block CG shares one Krylov "
                        "space across the 2K right-hand sides, so K matters)")
    p.add_argument("--columnwise", action="store_true",
                   help="also run ekfac+cg with column-wise (non-block) PCG")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "ekfac_accuracy.json")
    cfg = p.parse_args(argv)
    torch.set_num_threads(cfg.threads)
    run = artifacts.load_run(cfg.run_dir)
    data, task, fit = task_from_run(run)
    test = data.finetune_test
    position = {tid: i for i, tid in enumerate(test.ids)}
    rows = np.array([position[t] for t in run.test_points.test_id])
    if cfg.k is not None:
        rows = rows[np.linspace(0, len(rows) - 1, min(cfg.k, len(rows))).round().astype(int)]
    x_test = torch.as_tensor(test.X[rows], dtype=task.dtype)
    y_test = torch.as_tensor(test.y[rows])
    damping = {s: run.manifest["stages"][s]["damping"] for s in ("pretrain", "finetune")}
    k = len(rows)
    print(f"run {cfg.run_dir}: scenario {task.scenario}, {k} test points x {task.n_pretrain} "
          f"pretraining examples, H of dimension {task.u_layout.numel + task.w_layout.numel}; "
          f"fisher {cfg.fisher}, relative damping {cfg.relative_damping}")
    exact, exact_s, _ = scores_with(task, fit, x_test, y_test, ExactSolver(), ExactSolver(),
                                    damping)
    ek = {"fisher": cfg.fisher, "relative_damping": cfg.relative_damping}
    ft_exact = ExactSolver()
    variants = [("ekfac (H) + exact (finetuning)", EkfacSolver(**ek), ft_exact)]
    variants += [(f"ekfac+cg {n} its (H) + exact", EkfacCgSolver(iterations=n, **ek), ft_exact)
                 for n in cfg.iterations]
    if cfg.columnwise:
        variants += [(f"column-wise ekfac+cg {n} its (H)",
                      EkfacCgSolver(iterations=n, block=False, **ek), ft_exact)
                     for n in cfg.iterations]
    if task.scenario == "fixed":
        variants.append(("ekfac (both stages)", EkfacSolver(**ek), EkfacSolver(**ek)))
    variants += [(f"ekfac+cg {n} its (both stages)", EkfacCgSolver(iterations=n, **ek),
                  EkfacCgSolver(iterations=n, **ek)) for n in cfg.iterations[-1:]]
    results = []
    print(f"exact solves {exact_s:.2f} s")
    print(f"{'variant':<36} {'solve s':>8} {'Pearson total':>14} {'min':>6} {'pre-term':>9} "
          f"{'ft-term':>8} {'top20 harmful':>14} {'residual':>9}")
    for name, pre, ft in variants:
        got, secs, info = scores_with(task, fit, x_test, y_test, pre, ft, damping)
        parts = [accuracy_vs_exact(got[i * k:(i + 1) * k], exact[i * k:(i + 1) * k], top=20)
                 for i in range(3)]
        residual = info.get("true_relative_residual_max", info.get("max_relative_residual"))
        results.append({"variant": name, "solve_seconds": secs, "total": parts[0],
                        "pretrained_term": parts[1], "finetuned_term": parts[2],
                        "pretrain_solver": info})
        res = f"{residual:9.1e}" if residual is not None else f"{'-':>9}"
        print(f"{name:<36} {secs:>8.2f} {parts[0]['pearson_mean']:>14.4f} "
              f"{parts[0]['pearson_min']:>6.3f} {parts[1]['pearson_mean']:>9.4f} "
              f"{parts[2]['pearson_mean']:>8.4f} {parts[0]['top20_harmful_overlap']:>13.0%} "
              f"{res}")
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    cfg.json.write_text(json.dumps({"run": str(cfg.run_dir), "scenario": task.scenario,
                                    "threads": cfg.threads,
                                    "n_test": k, "fisher": cfg.fisher,
                                    "relative_damping": cfg.relative_damping,
                                    "exact_solve_seconds": exact_s, "variants": results},
                                   indent=2, default=str))
    print(f"wrote {cfg.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
