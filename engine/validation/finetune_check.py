"""Check finetuning-example influence (:mod:`engine.finetune_influence`) by retraining the
finetuning stage only.

The prediction is ``finetune_score[t, i]``: the change of test point t's measurement if
finetuning example i is removed and the finetuning stage is retrained, the pretrained backbone
U* unchanged.  The ground truth follows the pretraining validation's protocol
(:mod:`engine.validation`), restricted to the second stage:

- *Removal* is the score's definition (eps = -1/N): weight 0 at the removed example in
  ``(1/N) sum_i c_i l_ft(x_i) + R_ft [+ alpha/2 ||U - U*||^2]``, the denominator stays N.
- *Reference*: the given finetuning solution re-polished with all weights 1 to the retrains'
  tolerance, so that optimizer error does not enter the differences.
- *Retraining*: warm-started from the reference, to gradient norm <= ``tolerance`` (default
  1e-10), with the reference's dense Hessian lent to the trust-region Newton phase (chord
  steps); an unconverged retrain is continued with twice the L-BFGS iterations, up to
  ``max_rounds`` rounds.  Pretraining is never retrained: this is cheap (the finetuning stage
  has ``n_t`` (fixed) or ``n_t + n_u`` (updated) variables and N examples).
- *Pairs*: for a few test points (default up to 5 misclassified ones, drawn with ``seed``), the
  top ``per_point`` finetuning examples by |score| plus ``per_point`` random others; one
  retrain per distinct example serves every chosen test point.

:func:`check_finetune_influence` works on a ``(task, fit)`` pair; :func:`check_run` on a run
directory (its task and parameters rebuilt as :mod:`engine.validation` does, scored with the
run's ``[finetune]`` solver, damping and curvature).  Both return ``(pairs, summary)``; the
summary holds Pearson / Spearman / sign agreement / slope (actual on predicted, through 0).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call

from engine.artifacts import Run
from engine.finetune_influence import FINETUNE_SCORE_CONVENTION, finetune_influence
from engine.scores import InfluenceArguments
from engine.task import TwoStageTask
from engine.training import NotConvergedWarning, StageFit, TwoStageFit, minimize
from engine.trust_region import DenseCurvature
from engine.validation.retrains import RETRAIN_NEWTON
from engine.validation.settings import ValidationError
from engine.validation.stats import _agreement, _clean, _fmt

if TYPE_CHECKING:   # engine.pipeline is imported where it is used (it imports much)
    from engine.config import RunConfig
    from engine.pipeline import PreparedData

__all__ = ["FinetuneCheckSettings", "check_finetune_influence", "check_loaded_run", "check_run",
           "refit_finetuning", "run_arguments", "weighted_finetune_objective"]


@dataclass
class FinetuneCheckSettings:
    """What to check and how hard to retrain (defaults sized for the digits sample)."""

    test_points: Sequence[int] | None = None  # rows of x_test; None: misclassified ones
    max_test_points: int = 5
    per_point: int = 10                      # top-N by |score| plus N random per test point
    seed: int = 0
    tolerance: float = 1e-10                 # gradient-norm tolerance of every retrain
    max_iter: int = 300                      # L-BFGS iterations of a retrain's first round
    max_rounds: int = 5

    def check(self, n_finetune: int) -> None:
        if self.per_point < 1:
            raise ValidationError(f"per_point must be >= 1, got {self.per_point}")
        if self.per_point >= n_finetune:
            raise ValidationError(f"per_point {self.per_point} must be below the {n_finetune} "
                                  "finetuning examples")
        if self.max_test_points < 1 or self.max_rounds < 1 or self.max_iter < 1:
            raise ValidationError("max_test_points, max_rounds and max_iter must be >= 1")
        if not self.tolerance > 0:
            raise ValidationError(f"tolerance must be > 0, got {self.tolerance}")


def weighted_finetune_objective(task: TwoStageTask, backbone_pre: torch.Tensor,
                                weights: torch.Tensor | None = None
                                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """L_ft with per-example weights ``c`` inside the mean (denominator N), as a function of
    ``t`` (fixed) or ``[t; backbone]`` (updated): :func:`engine.objectives.finetune_objective`
    with ``c``; weight 0 removes an example, ``1 + N eps`` upweights it by ``eps``."""
    x, y = task.finetune_data
    n, nt = len(x), task.t_layout.numel
    c = torch.ones(n, dtype=task.dtype, device=task.device) if weights is None else weights
    wd, alpha = task.finetune_weight_decay, task.alpha
    if task.scenario == "fixed":
        feats = task.features(backbone_pre, x).detach()

        def fixed(t: torch.Tensor) -> torch.Tensor:
            out = functional_call(task.finetune_head, task.t_layout.unflatten(t), (feats,))
            return (c * task.finetune_loss(out, y)).sum() / n + 0.5 * wd * (t * t).sum()
        return fixed

    def updated(tu: torch.Tensor) -> torch.Tensor:
        t, ub = tu[:nt], tu[nt:]
        d = ub - backbone_pre
        return ((c * task.finetune_loss(task.finetune_outputs(t, ub, x), y)).sum() / n
                + 0.5 * wd * (t * t).sum() + 0.5 * alpha * (d * d).sum())
    return updated


def refit_finetuning(task: TwoStageTask, fit: TwoStageFit, weights: torch.Tensor | None = None,
                     *, tolerance: float = 1e-10, max_iter: int = 300, max_rounds: int = 5,
                     hint: DenseCurvature | None = None) -> tuple[TwoStageFit, int]:
    """Retrain the finetuning stage only (pretraining unchanged), warm-started from ``fit``.

    ``hint`` (a reference fit's dense finetuning Hessian): chord Newton steps with it
    (:data:`engine.validation.retrains.RETRAIN_NEWTON`); without one the certified trainer
    runs (and the returned stage carries its dense Hessian for later hints).  Returns the new
    fit and the rounds used.
    """
    objective = weighted_finetune_objective(task, fit.backbone_pre, weights)
    x = fit.t if task.scenario == "fixed" else torch.cat([fit.t, fit.backbone_ft])
    nt = task.t_layout.numel
    stage: StageFit | None = None
    rounds = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        while rounds < max_rounds:
            rounds += 1
            stage = minimize(objective, x, tolerance=tolerance,
                             max_iter=max_iter * 2 ** (rounds - 1), name="finetuning retrain",
                             newton=RETRAIN_NEWTON if hint is not None else None, hint=hint)
            x = stage.params
            if stage.final_grad_norm <= tolerance:
                break
    assert stage is not None
    t, ub = (x, fit.backbone_pre) if task.scenario == "fixed" else (x[:nt], x[nt:])
    return TwoStageFit(fit.backbone_pre, fit.w, ub, t, fit.pretrain, stage), rounds


def _measure(task: TwoStageTask, fit: TwoStageFit, x: torch.Tensor,
             y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return task.measure(fit.t, fit.backbone_ft, x, y).to("cpu", torch.float64).numpy()


def _choose_points(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                   y_test: torch.Tensor, settings: FinetuneCheckSettings,
                   rng: np.random.Generator, correct: np.ndarray | None) -> tuple[np.ndarray, str]:
    if settings.test_points is not None:
        return np.array(sorted(set(int(r) for r in settings.test_points))), "given"
    if correct is None:
        with torch.no_grad():
            pred = task.finetune_outputs(fit.t, fit.backbone_ft, x_test).argmax(1)
        correct = (pred == y_test).cpu().numpy()
    mis = np.flatnonzero(~np.asarray(correct, dtype=bool))
    k = min(settings.max_test_points, len(mis) or len(x_test))
    if len(mis):
        return np.sort(rng.choice(mis, size=k, replace=False)), (
            f"{k} of {len(mis)} misclassified (random, seed {settings.seed})")
    order = np.argsort(-_measure(task, fit, x_test, y_test))
    return np.sort(order[:k]), f"{k} highest-measurement (no misclassified point)"


def check_finetune_influence(task: TwoStageTask, fit: TwoStageFit, x_test: torch.Tensor,
                             y_test: torch.Tensor, settings: FinetuneCheckSettings | None = None,
                             args: InfluenceArguments | None = None,
                             scores: np.ndarray | None = None, *,
                             test_ids: Sequence[str] | None = None,
                             example_ids: Sequence[str] | None = None,
                             correct: np.ndarray | None = None,
                             echo: Callable[[str], None] | None = None
                             ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predicted vs actual (finetuning-only retrain) change for chosen (test point, example)
    pairs.  ``scores`` (K x N, rows = ``x_test``): precomputed finetune scores, e.g. a run's
    ``finetune_scores.npy``; default :func:`finetune_influence` at ``fit`` with ``args``.
    ``correct`` (per ``x_test`` row): which points count as misclassified (default: the fit's
    predictions).  Returns ``(pairs, summary)``."""
    settings = settings or FinetuneCheckSettings()
    n = len(task.finetune_data[0])
    settings.check(n)
    say = echo or (lambda _m: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if scores is None:
        result = finetune_influence(task, fit, x_test, y_test, args)
        scores, solver_settings = result.numpy(), result.settings
    else:
        scores, solver_settings = np.asarray(scores, dtype=np.float64), {"given": True}
    if scores.shape != (len(x_test), n):
        raise ValidationError(f"scores have shape {scores.shape}, expected {(len(x_test), n)}")
    timings["scores"] = time.perf_counter() - t0
    rng = np.random.default_rng(settings.seed)
    rows, how = _choose_points(task, fit, x_test, y_test, settings, rng, correct)
    t0 = time.perf_counter()
    reference, _ = refit_finetuning(task, fit, tolerance=settings.tolerance,
                                    max_iter=settings.max_iter, max_rounds=settings.max_rounds)
    timings["reference_fit"] = time.perf_counter() - t0
    hint = reference.finetune.curvature if reference.finetune is not None else None
    xr, yr = x_test[rows], y_test[rows]
    g0 = _measure(task, reference, xr, yr)
    drift = g0 - _measure(task, fit, xr, yr)

    roles: dict[tuple[int, int], str] = {}
    p = settings.per_point
    for r in rows:
        order = np.argsort(-np.abs(scores[r]), kind="stable")
        rnd = rng.choice(order[p:], size=min(p, n - p), replace=False)
        roles.update({(int(r), int(i)): "top" for i in order[:p]})
        roles.update({(int(r), int(i)): "random" for i in rnd})
    examples = sorted({i for _, i in roles})
    say(f"finetuning-only leave-one-out: {len(rows)} test points ({how}), {len(examples)} "
        f"retrains of the finetuning stage ({task.scenario} scenario)")
    t0 = time.perf_counter()
    records, conv = [], []
    tids = list(test_ids) if test_ids is not None else [str(r) for r in range(len(x_test))]
    eids = list(example_ids) if example_ids is not None else [str(i) for i in range(n)]
    for i in examples:
        weights = torch.ones(n, dtype=task.dtype, device=task.device)
        weights[i] = 0.0
        start = time.perf_counter()
        new, rounds = refit_finetuning(task, reference, weights, tolerance=settings.tolerance,
                                       max_iter=settings.max_iter,
                                       max_rounds=settings.max_rounds, hint=hint)
        gnorm = new.finetune.final_grad_norm
        conv.append((gnorm, rounds, time.perf_counter() - start))
        actual = _measure(task, new, xr, yr) - g0
        for a, r in enumerate(rows):
            records.append({"test_id": tids[r], "example_id": eids[i],
                            "role": roles.get((int(r), i), "other"),
                            "predicted": float(scores[r, i]), "actual": float(actual[a]),
                            "grad_norm": gnorm, "rounds": rounds})
    timings["retraining"] = time.perf_counter() - t0
    df = pd.DataFrame.from_records(records)
    designated = df[df["role"] != "other"]

    def agree(d: pd.DataFrame) -> dict[str, Any]:
        return _agreement(d["predicted"].to_numpy(), d["actual"].to_numpy())

    per_point = [{"test_id": tid, **{k: v for k, v in agree(d).items() if k != "n_pairs"}}
                 for tid, d in designated.groupby("test_id", sort=True)]
    grad_norms = np.array([c[0] for c in conv])
    summary = _clean({
        "what": "finetuning-example influence vs retraining the finetuning stage only "
                "(pretraining unchanged)",
        "score_convention": FINETUNE_SCORE_CONVENTION, "scenario": task.scenario,
        "settings": {**asdict(settings), "test_points": [int(r) for r in rows],
                     "removal": "weight 0 at the removed example, denominator N (eps = -1/N); "
                                "warm start from the reference fit"},
        "selection": how, "test_ids": [tids[r] for r in rows],
        "designated_pairs": agree(designated),
        "top_pairs": agree(df[df["role"] == "top"]),
        "random_pairs": agree(df[df["role"] == "random"]),
        "all_pairs": agree(df), "per_test_point": per_point,
        "median_abs_actual": float(designated["actual"].abs().median()),
        "median_abs_predicted": float(designated["predicted"].abs().median()),
        "reference_drift_max_abs": float(np.max(np.abs(drift))) if len(drift) else 0.0,
        "convergence": {"n_retrains": len(conv),
                        "n_unconverged": int((grad_norms > settings.tolerance).sum()),
                        "max_grad_norm": float(grad_norms.max()) if len(conv) else None,
                        "max_rounds_used": max((c[1] for c in conv), default=None),
                        "mean_retrain_seconds": float(np.mean([c[2] for c in conv]))
                        if conv else None,
                        "reference_grad_norm": reference.finetune.final_grad_norm},
        "scoring": solver_settings,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    })
    d = summary["designated_pairs"]
    say(f"finetuning-example influence: Pearson {_fmt(d['pearson'])}, sign agreement "
        f"{_fmt(d['sign_agreement'], '.0%')}, slope {_fmt(d['slope_actual_on_predicted'], '.2f')}"
        f" on {d['n_pairs']} pairs")
    return df, summary


def run_arguments(cfg: RunConfig) -> InfluenceArguments:
    """The finetuning-stage scoring settings of a run's config (``[finetune]`` solver, damping
    and curvature, ``[influence]`` batch sizes and memory budget), as the run scored them."""
    from engine.pipeline import memory_budget, stage_solver

    return InfluenceArguments(
        finetune_damping=cfg.finetune.damping,
        finetune_solver=stage_solver(cfg.finetune, cfg.seed),
        finetune_curvature=cfg.finetune.curvature, batch_size=cfg.influence.batch_size,
        curvature_batch_size=cfg.influence.curvature_batch_size,
        memory_budget=memory_budget(cfg))


def check_loaded_run(run: Run, data: PreparedData, task: TwoStageTask, stored: TwoStageFit,
                     settings: FinetuneCheckSettings | None = None,
                     echo: Callable[[str], None] | None = print
                     ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`check_run` on a run already loaded (``data, task, stored``:
    :func:`engine.pipeline.task_from_run` of it), e.g. by ``engine validate``.  The summary's
    ``scores_from`` says whether the scores were the run's ``finetune_scores.npy`` (``"run"``)
    or computed here (``"computed"``)."""
    test = data.finetune_test
    pos = {t: i for i, t in enumerate(test.ids.astype(str).tolist())}
    test_ids = run.test_points["test_id"].astype(str).tolist()
    rows = np.array([pos[t] for t in test_ids])
    x_test = torch.as_tensor(data.inputs(test)[rows], dtype=task.dtype, device=task.device)
    y_test = torch.as_tensor(test.y[rows], dtype=torch.long, device=task.device)
    stored_scores = run.finetune_scores   # listed in the manifest and hash-checked by load_run
    scores = None if stored_scores is None else np.asarray(stored_scores, dtype=np.float64)
    if echo:
        echo(f"checking finetuning-example influence of {run.path} (scenario {task.scenario}, "
             f"{len(task.finetune_data[0])} finetuning examples, {len(rows)} scored test "
             f"points; scores {'from the run' if scores is not None else 'computed here'})")
    pairs, summary = check_finetune_influence(
        task, stored, x_test, y_test, settings, run_arguments(data.cfg), scores,
        test_ids=test_ids, example_ids=data.finetune_train.ids.astype(str).tolist(),
        correct=run.test_points["correct"].astype(bool).to_numpy(), echo=echo)
    summary["scores_from"] = "computed" if scores is None else "run"
    return pairs, summary


def check_run(run_dir: str | Path, settings: FinetuneCheckSettings | None = None,
              echo: Callable[[str], None] | None = print
              ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`check_finetune_influence` on a finished run: its rebuilt task and stored
    parameters, its scored test points (misclassified ones by the run's ``correct`` column),
    its ``[finetune]`` solver, damping and curvature, and its ``finetune_scores.npy`` when the
    run has one (otherwise the scores are computed here)."""
    from engine import artifacts
    from engine.pipeline import task_from_run

    run = artifacts.load_run(run_dir)
    data, task, stored = task_from_run(run)
    return check_loaded_run(run, data, task, stored, settings, echo)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m engine.validation.finetune_check RUN_DIR [--per-point N] ...``: print the
    summary as JSON (``engine validate`` runs this check too, as ``summary["finetune"]``)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--test-points", type=int, default=5, help="misclassified points to check")
    p.add_argument("--per-point", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-10)
    ns = p.parse_args(argv)
    _, summary = check_run(ns.run_dir, FinetuneCheckSettings(
        max_test_points=ns.test_points, per_point=ns.per_point, seed=ns.seed,
        tolerance=ns.tolerance))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
