"""The three analyses of a validation: leave-one-out pairs, group removal, planted noise."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine import artifacts
from engine.ids_file import read_ids_file
from engine.scores import per_example_gradients, test_gradients
from engine.task import TwoStageTask
from engine.training import (
    TwoStageFit,
)
from engine.validation.retrains import _arrays_to_fit
from engine.validation.settings import NOISE_FILE, ValidationError, ValidationSettings
from engine.validation.stats import _agreement, _auc


# ----- the validation -----------------------------------------------------------------------
@dataclass
class _Context:
    run: artifacts.Run
    task: TwoStageTask
    stored: TwoStageFit
    reference: TwoStageFit
    x_test: torch.Tensor            # the whole finetuning test table
    y_test: torch.Tensor
    score_rows: np.ndarray          # run test-table row -> finetuning test-table row
    targeted: np.ndarray            # run test-table rows of the misclassified scored points
    timings: dict[str, float] = field(default_factory=dict)


def _measure(ctx: _Context, t: torch.Tensor, ub: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ctx.task.measure(t, ub, ctx.x_test[rows], ctx.y_test[rows]).numpy()


def _predict(ctx: _Context, fit: TwoStageFit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class, loss, measurement) on the whole test table."""
    with torch.no_grad():
        out = ctx.task.finetune_outputs(fit.t, fit.backbone_ft, ctx.x_test)
        return (out.argmax(1).numpy(), ctx.task.finetune_loss(out, ctx.y_test).numpy(),
                ctx.task.measure(fit.t, fit.backbone_ft, ctx.x_test, ctx.y_test).numpy())


def _loo_section(ctx: _Context, rows: np.ndarray, roles: dict[tuple[int, int], str],
                 examples: list[int], results: list[dict[str, Any]],
                 scores: dict[str, np.ndarray]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Actual vs predicted change for every (chosen test point, retrained example) pair."""
    ref = ctx.reference
    frows = ctx.score_rows[rows]
    g0 = _measure(ctx, ref.t, ref.backbone_ft, frows)
    records = []
    test_ids = ctx.run.test_points["test_id"].astype(str).to_numpy()
    ex_ids = ctx.run.pretrain_examples["example_id"].astype(str).to_numpy()
    for j, res in zip(examples, results, strict=True):
        if "error" in res:
            continue
        new = _arrays_to_fit(res["params"], ctx.task.dtype)
        total = _measure(ctx, new.t, new.backbone_ft, frows) - g0
        through_backbone = _measure(ctx, ref.t, new.backbone_ft, frows) - g0
        through_head = _measure(ctx, new.t, ref.backbone_ft, frows) - g0
        for a, r in enumerate(rows):
            records.append({
                "test_id": test_ids[r], "example_id": ex_ids[j],
                "role": roles.get((int(r), j), "other"),
                "abs_rank": int(scores["abs_rank"][a, j]),
                "predicted_total": float(scores["total"][r, j]),
                "predicted_pretrained_term": float(scores["pretrained_term"][r, j]),
                "predicted_finetuned_term": float(scores["finetuned_term"][r, j]),
                "actual_total": float(total[a]),
                "actual_pretrained_term": float(through_backbone[a]),
                "actual_finetuned_term": float(through_head[a]),
                "pretrain_grad_norm": res["pretrain_grad_norm"],
                "finetune_grad_norm": res["finetune_grad_norm"], "rounds": res["rounds"],
            })
    df = pd.DataFrame.from_records(records)
    if df.empty:
        raise ValidationError("every leave-one-out retrain failed; see the errors above")
    designated = df[df["role"] != "other"]
    top = df[df["role"] == "top"]
    rnd = df[df["role"] == "random"]

    def agree(d: pd.DataFrame, term: str = "total") -> dict[str, Any]:
        return _agreement(d[f"predicted_{term}"].to_numpy(), d[f"actual_{term}"].to_numpy())

    summary = {
        "designated_pairs": agree(designated),
        "top_pairs": agree(top),
        "random_pairs": agree(rnd),
        "all_pairs": agree(df),
        "pretrained_term": agree(designated, "pretrained_term"),
        "finetuned_term": agree(designated, "finetuned_term"),
        "interaction": {
            "description": "actual_total - (actual_pretrained_term + actual_finetuned_term): "
                           "the second-order cross effect the split ignores",
            "max_abs": float(np.max(np.abs(designated["actual_total"]
                                           - designated["actual_pretrained_term"]
                                           - designated["actual_finetuned_term"]))),
        },
        "median_abs_actual": float(designated["actual_total"].abs().median()),
        "median_abs_predicted": float(designated["predicted_total"].abs().median()),
    }
    per_point = []
    for tid, d in designated.groupby("test_id", sort=True):
        a = agree(d)
        per_point.append({"test_id": tid, "pearson": a["pearson"],
                          "sign_agreement": a["sign_agreement"],
                          "slope": a["slope_actual_on_predicted"]})
    summary["per_test_point"] = per_point
    return df, summary


def _group_section(ctx: _Context, settings: ValidationSettings, group_jobs: list[dict[str, Any]],
                   results: list[dict[str, Any]], total: np.ndarray
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Actual vs predicted effect of removing groups on the misclassified points."""
    tg = ctx.score_rows[ctx.targeted]
    label = ctx.y_test.numpy()
    ex_ids = ctx.run.pretrain_examples["example_id"].astype(str).to_numpy()
    pred0, loss0, meas0 = _predict(ctx, ctx.reference)
    rows = []
    for job, res in zip(group_jobs, results, strict=True):
        row = {"kind": job["kind"], "k": job["k"], "draw": job["draw"],
               **({"column": job["column"], "group": job["group"]} if "group" in job else {}),
               "predicted_change": float(total[ctx.targeted][:, job["removed"]].sum(1).mean())}
        tail = {"removed_ids": " ".join(ex_ids[job["removed"]])}
        if "error" in res:
            rows.append({**row, "error": res["error"], **tail})
            continue
        pred1, loss1, meas1 = _predict(ctx, _arrays_to_fit(res["params"], ctx.task.dtype))
        row.update({
            "actual_change": float(meas1[tg].mean() - meas0[tg].mean()),
            "actual_change_loss": float(loss1[tg].mean() - loss0[tg].mean()),
            "targeted_accuracy_before": float((pred0[tg] == label[tg]).mean()),
            "targeted_accuracy_after": float((pred1[tg] == label[tg]).mean()),
            "test_accuracy_before": float((pred0 == label).mean()),
            "test_accuracy_after": float((pred1 == label).mean()),
            "test_mean_loss_change": float(loss1.mean() - loss0.mean()),
            "pretrain_grad_norm": res["pretrain_grad_norm"],
            "finetune_grad_norm": res["finetune_grad_norm"], "rounds": res["rounds"], **tail,
        })
        rows.append(row)
    df = pd.DataFrame.from_records(rows)
    table = []
    for k in settings.group_sizes:
        entry: dict[str, Any] = {"k": k}
        for kind in ("harmful", "helpful", "random"):
            d = df[(df["k"] == k) & (df["kind"] == kind)]
            if "actual_change" in d:
                d = d.dropna(subset=["actual_change"])
            if d.empty:
                continue
            act = d["actual_change"].to_numpy()
            entry[kind] = {
                "actual_change": float(act.mean()),
                "predicted_change": float(d["predicted_change"].mean()),
                "targeted_accuracy_after": float(d["targeted_accuracy_after"].mean()),
                "test_accuracy_after": float(d["test_accuracy_after"].mean()),
            }
            if kind == "random":
                entry[kind].update(actual_change_std=float(act.std(ddof=1)) if len(act) > 1
                                   else 0.0, actual_change_min=float(act.min()),
                                   actual_change_max=float(act.max()), draws=int(len(act)))
        table.append(entry)
    summary = {
        "targeted": "misclassified scored test points", "n_targeted": int(len(ctx.targeted)),
        "targeted_mean_measurement_before": float(meas0[tg].mean()),
        "targeted_accuracy_before": float((pred0[tg] == label[tg]).mean()),
        "test_accuracy_before": float((pred0 == label).mean()),
        "n_test": int(len(label)),
        "by_k": table,
    }
    if "group" in df.columns:   # --source-column: whole source groups removed
        src = df[df["kind"] == "source"]
        summary["sources"] = [
            {"column": r["column"], "group": r["group"], "n_examples": int(r["k"]),
             "predicted_change": float(r["predicted_change"]),
             **({"actual_change": float(r["actual_change"]),
                 "targeted_accuracy_after": float(r["targeted_accuracy_after"])}
                if pd.notna(r.get("actual_change", np.nan)) else {"error": r.get("error")})}
            for _, r in src.iterrows()]
    return df, summary


def _noise_labels(run: artifacts.Run, settings: ValidationSettings
                  ) -> tuple[Path, np.ndarray] | None:
    """(ids file, boolean mask over the run's pretraining examples), or None without a file.

    Read before any retraining so that a bad file fails fast.
    """
    if settings.noise_ids:
        path = Path(settings.noise_ids)
        if not path.is_file():
            raise ValidationError(f"--noise-ids file {path} does not exist")
    else:
        path = Path(run.manifest["config"]["data"]["pretrain"]).parent / NOISE_FILE
        if not path.is_file():
            return None
    ids = run.pretrain_examples["example_id"].astype(str).to_numpy()
    listed = read_ids_file(path)
    excluded = set(map(str, run.manifest.get("excluded_ids", [])))
    known = set(ids.tolist())
    unknown = [i for i in listed if i not in known and i not in excluded]
    if unknown:
        raise ValidationError(
            f"{path} lists {len(unknown)} id(s) that are not pretraining examples of this run: "
            f"{unknown[:5]}; it must hold `example_id` values, one per line")
    is_noise = np.isin(ids, listed)
    if not is_noise.any() or is_noise.all():
        raise ValidationError(f"{path}: noise detection needs both listed and unlisted examples")
    return path, is_noise


def _noise_section(ctx: _Context, path: Path, is_noise: np.ndarray,
                   settings: ValidationSettings, total: np.ndarray
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Precision@k and ROC AUC of rankings for finding the listed (mislabelled) examples."""
    run = ctx.run
    ids = run.pretrain_examples["example_id"].astype(str).to_numpy()
    # Rankings: higher = more suspicious.
    influence = -total[ctx.targeted].sum(0)
    if "pretrain_loss" in run.pretrain_examples:
        loss = run.pretrain_examples["pretrain_loss"].to_numpy(np.float64)
    else:
        with torch.no_grad():
            x, y = ctx.task.pretrain_data
            loss = ctx.task.pretrain_loss(ctx.task.pretrain_outputs(
                ctx.stored.backbone_pre, ctx.stored.w, x), y).numpy()
    # Hessian-free first-order baseline: -sum_t grad l_pre(z_j) . [grad_U g_t; 0].
    tg = ctx.score_rows[ctx.targeted]
    _, gu = test_gradients(ctx.task, ctx.stored, ctx.x_test[tg], ctx.y_test[tg])
    v = torch.cat([gu.sum(1), torch.zeros(ctx.task.w_layout.numel, dtype=gu.dtype)])
    x, y = ctx.task.pretrain_data
    gsim = np.concatenate([
        (per_example_gradients(ctx.task, ctx.stored, x[s:s + 512], y[s:s + 512]) @ v).numpy()
        for s in range(0, len(x), 512)])
    rng = np.random.default_rng(settings.seed + 1)
    rankings = {"influence": influence, "random": rng.permutation(len(ids)).astype(float),
                "pretrain_loss": loss, "grad_similarity": -gsim}
    n_noise = int(is_noise.sum())
    ks = sorted({k for k in (10, 20, 50, n_noise) if k <= len(ids)})
    methods = {}
    for name, s in rankings.items():
        order = np.argsort(-s, kind="stable")
        methods[name] = {"auc": _auc(is_noise, s),
                         **{f"precision_at_{k}": float(is_noise[order[:k]].mean()) for k in ks}}
    base_rate = n_noise / len(ids)
    methods["random"]["expected"] = {"auc": 0.5, "precision": base_rate}
    df = pd.DataFrame({"example_id": ids, "label": run.pretrain_examples["label"].to_numpy(),
                       "is_noise": is_noise, "aggregate_total": -influence,
                       **{f"{n}_suspicion": s for n, s in rankings.items() if n != "random"},
                       **{f"{n}_rank": np.argsort(np.argsort(-s, kind="stable")) + 1
                          for n, s in rankings.items() if n != "random"}})
    summary = {"ids_file": str(path), "n_noise": n_noise, "n_pretrain": int(len(ids)),
               "base_rate": base_rate, "ks": ks, "n_targeted": int(len(ctx.targeted)),
               "ranking": "harmfulness = -(sum of total scores over the misclassified scored "
                          "test points); baselines: random order, pretraining loss, "
                          "Hessian-free gradient similarity -sum_t grad l_pre . [grad_U g_t; 0]",
               "methods": methods}
    return df, summary
