"""Accuracy and speed of the APPROXIMATE rank-r scoring pass on a real run, vs its exact scores.

For a finished run (default: the digits sample, ``runs/digits``), recomputes the influence
directions of every scored test point, scores all pretraining examples with
``score_pretraining(method="layerwise", direction_rank=r)`` for each rank, and compares with the
exact scores of the same directions (the run's own scoring method): Pearson per score column
(test point x term), overlap of the 10 most harmful / helpful examples, relative error, the
kept share the engine reports, and the time against the exact pass.

    python benchmarks/low_rank_accuracy.py [RUN_DIR] [--ranks 2 4 8 16]

Writes ``benchmarks/out/low_rank_accuracy.json`` (``--json`` to change).
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
from engine.curvature import make_solver  # noqa: E402
from engine.pipeline import task_from_run  # noqa: E402
from engine.scores import InfluenceArguments, influence_directions, score_pretraining  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", type=Path, default=ROOT / "runs" / "digits")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path,
                   default=ROOT / "benchmarks" / "out" / "low_rank_accuracy.json")
    cfg = p.parse_args(argv)
    torch.set_num_threads(1)
    run = artifacts.load_run(cfg.run_dir)
    data, task, fit = task_from_run(run)
    m = run.manifest
    test = data.finetune_test
    position = {tid: i for i, tid in enumerate(test.ids)}
    rows = np.array([position[t] for t in run.test_points.test_id])
    x_test = torch.as_tensor(test.X[rows], dtype=task.dtype)
    y_test = torch.as_tensor(test.y[rows])
    solver = m["config"]["pretrain"].get("solver", m["config"]["influence"]["solver"])
    args = InfluenceArguments(pretrain_damping=m["stages"]["pretrain"]["damping"],
                              finetune_damping=m["stages"]["finetune"]["damping"],
                              pretrain_solver=make_solver(solver),
                              finetune_solver=make_solver(solver))
    directions = influence_directions(task, fit, x_test, y_test, args)
    shapes = {n: list(s) for n, s in zip(task.u_layout.names + task.w_layout.names,
                                         task.u_layout.shapes + task.w_layout.shapes,
                                         strict=True)}
    print(f"run {cfg.run_dir}: {len(rows)} test points x {task.n_pretrain} pretraining "
          f"examples; tracked tensors {shapes}")

    def timed(rank: int | None) -> tuple[torch.Tensor, float, dict]:
        walls, info = [], {}
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            pre, ft = score_pretraining(task, fit, directions, method="layerwise",
                                        direction_rank=rank, info=info)
            walls.append(time.perf_counter() - t0)
        return torch.cat([pre, ft]), float(np.median(walls)), info

    exact, exact_s, _ = timed(None)
    stored = torch.as_tensor(np.concatenate([run.scores["pretrained_term"],
                                             run.scores["finetuned_term"]]), dtype=exact.dtype)
    stored_diff = float((exact - stored).abs().max() / stored.abs().max())
    print(f"exact (layerwise): {exact_s:.3f} s; max rel diff vs the run's stored float32 scores "
          f"{stored_diff:.1e}")
    results = []
    print(f"{'rank':>5} {'seconds':>8} {'vs exact':>9} {'kept (est.)':>12} {'Pearson':>8} "
          f"{'min':>7} {'top10 harmful':>14} {'top10 helpful':>14} {'rel error':>10}")
    for rank in cfg.ranks:
        approx, secs, info = timed(rank)
        acc = accuracy_vs_exact(approx, exact)
        report = info.get("direction_rank") or {}
        results.append({"rank": rank, "seconds": secs, "speedup_vs_exact": exact_s / secs,
                        "direction_rank": report, **acc})
        print(f"{rank:>5} {secs:>8.3f} {exact_s / secs:>8.1f}x "
              f"{report.get('kept_overall', 1.0):>11.1%} {acc['pearson_mean']:>8.4f} "
              f"{acc['pearson_min']:>7.3f} {acc['top10_harmful_overlap']:>13.0%} "
              f"{acc['top10_helpful_overlap']:>13.0%} {acc['relative_error']:>10.2e}")
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    cfg.json.write_text(json.dumps({
        "run": str(cfg.run_dir), "n_test": len(rows), "n_pretrain": task.n_pretrain,
        "tensors": shapes, "exact_seconds": exact_s, "stored_max_rel_diff": stored_diff,
        "ranks": results}, indent=2))
    print(f"wrote {cfg.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
