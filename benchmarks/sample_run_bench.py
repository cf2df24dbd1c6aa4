"""Time the README's sample run several times per setting; print min / median / max.

    .venv/bin/python benchmarks/sample_run_bench.py --repeats 3 --threads 1 2
    .venv/bin/python benchmarks/sample_run_bench.py --repeats 2 --threads 2 --coretype Haswell

Each run is a fresh ``python -m engine run sample_data/digits/config.toml`` subprocess with
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` set to the thread count
(and ``OPENBLAS_CORETYPE`` when given: a different BLAS kernel, i.e. the floating-point
differences between machines).  Per run it reads the manifest: wall time per phase, L-BFGS
iterations, Newton steps, Hessians built, saddle escapes and the final status of pretraining,
and the ratio of pretraining time to one full-batch gradient of the pretraining objective (an
"epoch" here).  Results go to ``benchmarks/out/sample_run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the engine package, when run as a script
CONFIG = ROOT / "sample_data" / "digits" / "config.toml"


def one_run(threads: int, coretype: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "engine", "run", str(CONFIG), "--out", str(out)],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text())
    pre = manifest["stages"]["pretrain"]
    return {"wall_s": wall, "timings": manifest["timings"], "status": pre["status"],
            "lbfgs_iterations": pre["iterations"], "newton_steps": pre["newton_steps"],
            "hessians": pre["hessians"], "saddle_escapes": pre["saddle_escapes"],
            "final_grad_norm": pre["final_grad_norm"], "min_eigenvalue": pre["min_eigenvalue"]}


def epoch_seconds(threads: int) -> float:
    """One full-batch gradient of the sample's pretraining objective (median of 20)."""
    import torch

    from engine.config import load_config
    from engine.pipeline import build_task, prepare_data
    from engine.training import pretrain_objective

    torch.set_num_threads(threads)
    task = build_task(prepare_data(load_config(CONFIG)))
    x, y = task.pretrain_data
    ub, w, _ = task.initial_state()
    theta = torch.cat([ub, w]).requires_grad_(True)
    obj = pretrain_objective(task, x, y)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        torch.autograd.grad(obj(theta), theta)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def spread(values: list[float]) -> str:
    return (f"min {min(values):6.1f}  median {statistics.median(values):6.1f}  "
            f"max {max(values):6.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--coretype", default=None, help="OPENBLAS_CORETYPE for every run")
    ns = p.parse_args()
    results = {}
    for threads in ns.threads:
        epoch = epoch_seconds(threads)
        runs = []
        for i in range(ns.repeats):
            r = one_run(threads, ns.coretype)
            runs.append(r)
            print(f"threads {threads} run {i + 1}: {r['wall_s']:.1f}s wall, pretraining "
                  f"{r['timings']['pretrain']:.1f}s ({r['status']}, {r['lbfgs_iterations']} "
                  f"L-BFGS iterations, {r['newton_steps']} Newton steps, {r['hessians']} "
                  f"Hessians, {r['saddle_escapes']} saddle escapes, gradient "
                  f"{r['final_grad_norm']:.1e}), map {r['timings']['map']:.1f}s", flush=True)
        key = f"threads={threads},coretype={ns.coretype or 'unset'}"
        results[key] = {"epoch_s": epoch, "runs": runs}
        pre = [r["timings"]["pretrain"] for r in runs]
        print(f"{key}: total wall {spread([r['wall_s'] for r in runs])} s")
        print(f"{key}: pretraining {spread(pre)} s = "
              f"{min(pre) / epoch:.0f} / {statistics.median(pre) / epoch:.0f} / "
              f"{max(pre) / epoch:.0f} epochs (one full-batch gradient: {epoch * 1e3:.1f} ms)")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sample_run.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
