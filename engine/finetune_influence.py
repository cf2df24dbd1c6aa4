"""Single-stage influence of the FINETUNING examples on the finetuned model's test points.

Beside the multi-stage scores of the pretraining examples (:mod:`engine.scores`), a run can say
which of its N finetuning examples helped or hurt a test point.  This is Koh & Liang's influence
function on the finetuning objective only: the pretraining stage (U*, W*) is held fixed.

Derivation (notation of ``shared/docs/multistage-influence.md``).  The finetuning variables are
``theta = T`` in the **fixed** scenario and ``theta = (T, U)`` in the **updated** one; with
per-example weights ``c_i`` the finetuning objective is::

    L_ft(theta; c) = (1/N) sum_i c_i l_ft(x_i; theta) + R_ft(T)   [+ alpha/2 ||U - U*||^2]

Upweighting example k by ``eps`` (``c_k = 1 + N eps``) adds ``eps l_ft(x_k)``; differentiating
the stationarity condition ``grad L_ft(theta^) = 0`` gives::

    d theta^ / d eps = - A^{-1} grad_theta l_ft(x_k)
    d g_t / d eps    = - grad_theta g_t^T A^{-1} grad_theta l_ft(x_k)

with ``A = A_TT`` (fixed, at (T^, U*)) or ``A = B = d2 L_ft / d(T,U)2 + alpha diag(0, I)``
(updated, at (T^, U^)): exactly the finetuning-stage curvature the multi-stage scores already
invert.  Removing x_k is ``c_k = 0``, i.e. ``eps = -1/N`` (the denominator stays N), so::

    finetune_score[t, k] = delta_remove(k, t) = -(1/N) d g_t / d eps
                         = (1/N) grad_theta g_t^T A^{-1} grad_theta l_ft(x_k)

Sign, as for the pretraining scores: **the predicted change of the test loss (the run's
measurement) if finetuning example k is removed and only the finetuning stage is retrained**.
``> 0``: removing it raises the test loss, so it is **helpful**; ``< 0``: **harmful**.
Validated by retraining the finetuning stage without it (:mod:`engine.validation.finetune_check`).

Cost: one solve with A for the K test gradients (or, when N is smaller, for the N training
gradients: A is symmetric, so ``(A^{-1} a) . b = a . (A^{-1} b)``; ``solve_side``), and one
per-example gradient per finetuning example, streamed in batches under the memory budget.
Per-example gradients come from the curvature operator's own stage function (``vmap(grad)``
over its named tensors), so they are in exactly the order of A's variables; untracked backbone
tensors (``tracked_backbone``) are held fixed as everywhere else.

Run artifacts (written by :func:`write_finetune_artifacts`): ``finetune_scores.npy`` (float32,
``(n_test, N)``, rows in the order of ``test_points.parquet``) and ``finetune_examples.parquet``
(one row per finetuning example, in the order of the columns).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from engine.artifacts import FINETUNE_SCORES_FILE, FINETUNE_TABLE
from engine.curvature import Curvature, finetune_head_hessian, finetune_joint_hessian
from engine.curvature.gauss_newton import CURVATURE_TYPES, gauss_newton
from engine.scores import InfluenceArguments, ScoringError, test_gradients
from engine.task import TwoStageTask
from engine.training import TwoStageFit

FINETUNE_SCORE_CONVENTION = (
    "finetune_score = predicted change of the test loss if the finetuning example is removed "
    "and only the finetuning stage is retrained (pretraining unchanged); score > 0: helpful; "
    "score < 0: harmful."
)
SolveSide = Literal["auto", "test", "train"]
EVAL_CHUNK = 4096    # rows per forward pass when the finetuning table is evaluated

__all__ = ["FINETUNE_SCORES_FILE", "FINETUNE_SCORE_CONVENTION", "FINETUNE_TABLE",
           "FinetuneScores", "finetune_curvature", "finetune_gradients", "finetune_influence",
           "load_finetune_artifacts", "write_finetune_artifacts"]


@dataclass
class FinetuneScores:
    """``scores[t, i]`` (K test points x N finetuning examples, on the task's device), the
    settings that produced them and where the time went."""

    scores: torch.Tensor
    settings: dict[str, Any]
    timings: dict[str, float]

    def numpy(self) -> np.ndarray:
        """The scores as a float64 host array."""
        return self.scores.detach().to("cpu", torch.float64).numpy()


def finetune_curvature(task: TwoStageTask, fit: TwoStageFit,
                       args: InfluenceArguments) -> tuple[Curvature, Curvature]:
    """(the operator to solve with, the raw Hessian operator) of the finetuning stage:
    A_TT (fixed) or B (updated), as Gauss-Newton when ``args.finetune_curvature`` says so."""
    build = finetune_head_hessian if task.scenario == "fixed" else finetune_joint_hessian
    raw = build(task, fit, args.curvature_batch_size, args.reuse_training_curvature,
                args.memory_budget)
    kind = args.finetune_curvature
    if kind not in CURVATURE_TYPES:
        raise ScoringError(f"curvature must be one of {CURVATURE_TYPES}, got {kind!r}")
    return (gauss_newton(raw) if kind == "gauss_newton" else raw), raw


def _example_batch(op: Curvature, batch_size: int, budget: int) -> int:
    """Examples per per-example-gradient batch: about ``3 (P + a)`` values per example (the
    gradient block, vmap's intermediates, the activations ``a`` autograd saves)."""
    per_example = 3 * (op.dim + op.activation_elements()) * op.point.element_size()
    return int(max(1, min(batch_size, budget // max(per_example, 1))))


def finetune_gradients(op: Curvature, x: torch.Tensor, y: torch.Tensor,
                       batch_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, grad_theta l_ft(x_i) for those rows, shape (b, dim))`` batch by batch, in the
    order of ``op``'s variables (``op.function``: A_TT's ``t`` or B's ``[t; u]``)."""
    fn = op.function
    if fn is None:
        raise ScoringError(f"{op.name} carries no stage function: per-example gradients need it")
    which = list(range(len(fn.params)))
    for start in range(0, len(x), batch_size):
        sl = slice(start, min(start + batch_size, len(x)))
        yield sl, torch.cat(fn.gradient_blocks(x[sl], y[sl], which), 1)


def _check_finite(what: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        raise ScoringError(f"{what}: non-finite values (NaN/inf); check that the finetuning "
                           "loss and inputs are finite at the trained parameters")


def finetune_influence(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                       y_test: torch.Tensor, args: InfluenceArguments | None = None, *,
                       solve_side: SolveSide = "auto",
                       progress: Callable[[int, int], None] | None = None) -> FinetuneScores:
    """Influence of every finetuning example on every test point (finetuning stage only).

    ``scores[t, i] = (1/N) grad g_t^T A^{-1} grad l_ft(x_i)``: the predicted change of the
    measurement ``g_t`` (the task's ``measurement``) if finetuning example i is removed and the
    finetuning stage is retrained with the pretrained backbone unchanged; ``> 0`` helpful,
    ``< 0`` harmful (see the module docstring).  ``A`` is A_TT (fixed) or B (updated) with
    ``args.finetune_damping`` added on the fly, solved by ``args.finetune_solver`` (the run's
    ``[finetune] solver``), as ``args.finetune_curvature`` (Hessian or Gauss-Newton).

    ``solve_side``: ``"test"`` solves with the K test gradients and streams the training
    gradients in batches; ``"train"`` solves with the N training gradients (held in memory);
    ``"auto"`` picks the side with fewer columns (``"train"`` only if its N x dim gradients fit
    in half of ``args.memory_budget``).  Both are the same number for an exact solve.
    ``progress(done, N)`` is called after each batch of training examples.
    """
    args = args or InfluenceArguments()
    if len(x_test) == 0:
        raise ScoringError("no test points to score")
    if len(x_test) != len(y_test):
        raise ScoringError(f"{len(x_test)} test inputs but {len(y_test)} test targets")
    if solve_side not in ("auto", "test", "train"):
        raise ScoringError(f"solve_side must be 'auto', 'test' or 'train', got {solve_side!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x, y = task.finetune_data
    n, k = len(x), len(x_test)
    op, raw = finetune_curvature(task, fit, args)
    gt, gu = test_gradients(task, fit, x_test, y_test)           # (n_t, K), (n_u, K)
    g_test = gt if task.scenario == "fixed" else torch.cat([gt, gu], 0)   # A's variables
    batch = _example_batch(op, args.batch_size, args.memory_budget)
    timings["test_gradients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    held = n * op.dim * op.point.element_size()
    side = solve_side
    if side == "auto":
        side = "train" if n < k and 2 * held <= args.memory_budget else "test"
    solver, damping = args.finetune_solver, args.finetune_damping
    out = torch.empty(k, n, dtype=g_test.dtype, device=g_test.device)
    if side == "test":
        v = solver.solve(op, g_test, damping) / n                   # (dim, K)
        timings["finetune_solve"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for sl, g in finetune_gradients(raw, x, y, batch):
            _check_finite(f"finetuning example gradients {sl.start}..{sl.stop - 1}", g)
            out[:, sl] = (g @ v).T
            if progress is not None:
                progress(sl.stop, n)
        timings["finetune_gradients"] = time.perf_counter() - t0
    else:
        grads = torch.empty(op.dim, n, dtype=g_test.dtype, device=g_test.device)
        for sl, g in finetune_gradients(raw, x, y, batch):
            _check_finite(f"finetuning example gradients {sl.start}..{sl.stop - 1}", g)
            grads[:, sl] = g.T
            if progress is not None:
                progress(sl.stop, n)
        timings["finetune_gradients"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out[:] = g_test.T @ solver.solve(op, grads, damping) / n
        timings["finetune_solve"] = time.perf_counter() - t0
    _check_finite("finetuning-example influence", out)
    described = solver.describe()
    notes = [n_ for n_ in (
        task.approximation if task.scenario == "updated" else None,
        described.get("approximation"),
        "Gauss-Newton matrix instead of the Hessian" if args.finetune_curvature == "gauss_newton"
        else None) if n_]
    settings = {
        "scenario": task.scenario,
        "alpha": task.alpha if task.scenario == "updated" else None,
        "measurement": task.measurement if isinstance(task.measurement, str) else "custom",
        "variables": "T" if task.scenario == "fixed" else "(T, U)",
        "curvature_operator": op.name, "dim": op.dim, "n_finetune": n,
        "damping": damping, "curvature": args.finetune_curvature, **described,
        "weight_decay": task.finetune_weight_decay, "solve_side": side,
        "gradient_batch": batch, "approximation": "; ".join(notes) if notes else None,
        "score_convention": FINETUNE_SCORE_CONVENTION, "device": str(task.device),
    }
    return FinetuneScores(out, settings, timings)


# ----- run artifacts ---------------------------------------------------------------------------
def write_finetune_artifacts(directory: str | Path, task: TwoStageTask, fit: TwoStageFit,
                             x_test: torch.Tensor, y_test: torch.Tensor,
                             args: InfluenceArguments, example_ids: Sequence[Any],
                             labels: Sequence[Any] | None = None,
                             extra_columns: dict[str, Any] | None = None,
                             progress: Callable[[int, int], None] | None = None
                             ) -> dict[str, Any]:
    """Score the finetuning examples and write them into a run's (staging) ``directory``.

    Writes ``finetune_scores.npy`` (float32 ``(K, N)``, rows = the scored test points in the
    order of ``test_points.parquet``, columns = finetuning examples in table order) and
    ``finetune_examples.parquet`` (``example_id``, ``label``, ``pred``, ``finetune_loss``,
    ``correct``, then ``extra_columns``, e.g. the render payload ``pixels`` / ``text`` and the
    map coordinates ``map_x`` / ``map_y``).  Call it
    before :func:`engine.artifacts.write_run` hashes the staging directory, so both files are
    listed (and verified) in the manifest's ``files``.  Returns the manifest section to record
    as ``manifest["finetune_influence"]`` (settings, shape, file names, timings).
    """
    out_dir = Path(directory)
    x, y = task.finetune_data
    n = len(x)
    if len(example_ids) != n:
        raise ScoringError(f"{len(example_ids)} finetuning example ids for {n} examples")
    result = finetune_influence(task, fit, x_test, y_test, args, progress=progress)
    scores = result.scores.detach().to("cpu", torch.float32).numpy()
    np.save(out_dir / FINETUNE_SCORES_FILE, np.ascontiguousarray(scores))
    with torch.no_grad():   # in chunks of EVAL_CHUNK rows: bounded memory on large sets
        outputs = torch.cat([task.finetune_outputs(fit.t, fit.backbone_ft, x[s:s + EVAL_CHUNK])
                             for s in range(0, n, EVAL_CHUNK)])
        losses = task.finetune_loss(outputs, y).to("cpu", torch.float64).numpy()
        pred = outputs.argmax(1).cpu().numpy() if outputs.ndim == 2 else None
    table: dict[str, Any] = {"example_id": np.asarray(example_ids).astype(str),
                             "label": np.asarray(labels if labels is not None
                                                 else y.cpu().numpy())}
    if pred is not None and outputs.shape[1] > 1:
        table["pred"] = pred
        table["correct"] = pred == y.cpu().numpy()
    table["finetune_loss"] = losses
    table.update(extra_columns or {})
    pd.DataFrame(table).to_parquet(out_dir / FINETUNE_TABLE, index=False)
    return {
        "scores_file": FINETUNE_SCORES_FILE, "table": FINETUNE_TABLE,
        "shape": [int(scores.shape[0]), int(scores.shape[1])],
        "score_convention": FINETUNE_SCORE_CONVENTION,
        "settings": json.loads(json.dumps(result.settings, default=str)),
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
    }


def load_finetune_artifacts(run_dir: str | Path, manifest: dict[str, Any] | None = None
                            ) -> tuple[np.ndarray, pd.DataFrame] | None:
    """``(scores (K, N) memory-mapped, table)`` of a run, or ``None`` if it has none.

    ``manifest`` (the run's, e.g. ``Run.manifest``, whose file hashes ``load_run`` verified):
    both files must then be listed in its ``files`` (an unlisted copy was not written with the
    run: refused), and the shapes must match ``finetune_influence.shape`` and
    ``shapes.n_test``.
    """
    path = Path(run_dir)
    present = [(path / f).is_file() for f in (FINETUNE_SCORES_FILE, FINETUNE_TABLE)]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"{path}: one of {FINETUNE_SCORES_FILE} / {FINETUNE_TABLE} is missing; "
                         "re-run `python -m engine run`")
    if manifest is not None:
        unlisted = [f for f in (FINETUNE_SCORES_FILE, FINETUNE_TABLE)
                    if f not in manifest.get("files", {})]
        if unlisted:
            raise ValueError(f"{path}: {unlisted} are not listed in the run's manifest, so they "
                             "were not written with this run; remove them or re-run it")
    scores = np.load(path / FINETUNE_SCORES_FILE, mmap_mode="r")
    table = pd.read_parquet(path / FINETUNE_TABLE)
    if scores.ndim != 2 or scores.shape[1] != len(table):
        raise ValueError(f"{path}: {FINETUNE_SCORES_FILE} has shape {scores.shape} but "
                         f"{FINETUNE_TABLE} has {len(table)} rows")
    if manifest is not None:
        want = manifest.get("finetune_influence", {}).get("shape")
        n_test = manifest.get("shapes", {}).get("n_test")
        if (want is not None and list(scores.shape) != list(want)) or (
                n_test is not None and scores.shape[0] != n_test):
            raise ValueError(f"{path}: {FINETUNE_SCORES_FILE} has shape {scores.shape}; the "
                             f"manifest says {want} with {n_test} scored test points")
    return scores, table
