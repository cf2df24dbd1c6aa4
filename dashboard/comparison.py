"""Compare two runs, typically a parent and a child retrained without some pretraining
examples (``python -m engine run --exclude IDS --parent PARENT``); no Streamlit here.

Scores follow the convention "score = predicted change of the test loss if the pretraining
example is removed and both stages are retrained; score > 0: helpful; score < 0: harmful;
total = pretrained_term + finetuned_term."  So the first-order predicted change of a test
point's measurement when a *set* of pretraining examples is removed is the sum of its ``total``
scores over that set, read from the ``before`` run (the one that still has them).  The actual
change is ``measurement_after - measurement_before`` on the test points both runs scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dashboard.run_details import class_names
from dashboard.what_if import finetune_removal_prediction, removal_prediction
from engine.artifacts import Run

STATUSES = ("fixed", "broken", "unchanged")


class IncompatibleRunsError(ValueError):
    """The two runs cannot be compared (see :func:`comparison_problems`)."""


@dataclass(frozen=True)
class Comparison:
    """``before`` vs ``after`` on their common test points (see :func:`compare_runs`).

    ``points`` has one row per common test point (in ``before``'s order): test_id, label,
    pred_before, pred_after, correct_before, correct_after, loss_before, loss_after,
    measurement_before, measurement_after, actual_change, predicted_change (=
    predicted_pretraining_data + predicted_finetuning_data: the removed pretraining examples'
    scores plus the removed finetuning examples' finetuning-data scores),
    predicted_pretrained_term, predicted_finetuned_term, status (``fixed`` / ``broken`` /
    ``unchanged``).  Correlations are NaN when undefined (fewer than 3 points, or constant).
    """

    before: Run
    after: Run
    reordered: bool
    relation: str
    removed_ids: list[str]
    removed_finetune_ids: list[str]   # finetuning training examples the after run left out
    added_ids: list[str]
    notes: list[str]
    points: pd.DataFrame
    class_names: list[str]
    accuracy_before: float
    accuracy_after: float
    confusion_before: pd.DataFrame
    confusion_after: pd.DataFrame
    pearson: float
    spearman: float
    pearson_misclassified: float
    spearman_misclassified: float
    n_scored: int
    n_scored_misclassified: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed(self) -> pd.DataFrame:
        """Points misclassified before and correct after."""
        return self.points[self.points["status"] == "fixed"]

    @property
    def broken(self) -> pd.DataFrame:
        """Points correct before and misclassified after."""
        return self.points[self.points["status"] == "broken"]


def _parent_id(run: Run | Mapping[str, Any]) -> str | None:
    manifest = run.manifest if isinstance(run, Run) else run
    parent = manifest.get("parent") if isinstance(manifest, Mapping) else None
    if isinstance(parent, Mapping) and isinstance(parent.get("run_id"), str):
        return str(parent["run_id"])
    return None


def _finetune_classes(run: Run) -> list[str] | None:
    classes = run.manifest.get("classes")
    names = classes.get("finetune") if isinstance(classes, Mapping) else None
    return [str(c) for c in names] if isinstance(names, (list, tuple)) else None


def _measurement_name(run: Run) -> str:
    value = run.manifest.get("measurement")
    return str(value) if value is not None else "loss"


def _measurement(run: Run) -> np.ndarray | None:
    """The measurement column; the loss when the run has none and measures the loss
    (runs written before the column existed)."""
    tp = run.test_points
    if "measurement" in tp.columns:
        return tp["measurement"].to_numpy(dtype=float)
    if _measurement_name(run) == "loss":
        return tp["loss"].to_numpy(dtype=float)
    return None


def _ids(frame: pd.DataFrame, column: str) -> np.ndarray:
    return frame[column].astype(str).to_numpy()


def comparison_problems(before: Run, after: Run) -> list[str]:
    """Why ``before`` and ``after`` cannot be compared, as sentences (empty: they can):
    the same run twice, different finetuning classes or measurement, a missing measurement
    column, or no common test point."""
    out: list[str] = []
    if before.run_id == after.run_id:
        out.append(f"both sides are the same run (run_id {before.run_id}); pick another run")
    ca, cb = _finetune_classes(before), _finetune_classes(after)
    if ca != cb:
        out.append(f"the finetuning classes differ: {ca} vs {cb}")
    ma, mb = _measurement_name(before), _measurement_name(after)
    if ma != mb:
        out.append(f"the scored measurement differs: {ma!r} vs {mb!r}")
    for run in (before, after):
        if _measurement(run) is None:
            out.append(f"run {run.path.name} has no `measurement` column in its test points")
    common = np.intersect1d(_ids(before.test_points, "test_id"),
                            _ids(after.test_points, "test_id"))
    if not len(common):
        out.append("the runs have no test point id in common")
    return out


def parent_first(a: Run, b: Run) -> tuple[Run, Run, bool]:
    """``(before, after, swapped)``: the parent first when one run names the other as its
    parent (``manifest["parent"]["run_id"]``); else the run whose pretraining set strictly
    contains the other's (a retrain with ``--exclude`` and no ``--parent``); else as given."""
    if _parent_id(b) == a.run_id:
        return a, b, False
    if _parent_id(a) == b.run_id:
        return b, a, True
    ids_a = set(_ids(a.pretrain_examples, "example_id"))
    ids_b = set(_ids(b.pretrain_examples, "example_id"))
    if ids_b < ids_a:
        return a, b, False
    if ids_a < ids_b:
        return b, a, True
    return a, b, False


def relation(before: Run, after: Run) -> str:
    """How ``after`` relates to ``before``, in words (for the page header)."""
    if _parent_id(after) == before.run_id:
        return f"{after.path.name} is a child of {before.path.name} (engine run --parent)"
    ex_b = set(map(str, before.manifest.get("excluded_ids") or []))
    ex_a = set(map(str, after.manifest.get("excluded_ids") or []))
    if ex_b < ex_a:
        return (f"{after.path.name} excludes {len(ex_a - ex_b)} more pretraining examples "
                f"than {before.path.name} (manifest excluded_ids)")
    ids_b = set(_ids(before.pretrain_examples, "example_id"))
    ids_a = set(_ids(after.pretrain_examples, "example_id"))
    if ids_a < ids_b:
        return (f"{after.path.name} has {before.path.name}'s pretraining examples minus "
                f"{len(ids_b - ids_a)}")
    return "no recorded parent/child relation; compared by their pretraining example ids"


def _ranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank(method="average").to_numpy(dtype=float)


def correlations(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman) of the finite pairs; NaN when fewer than 3 or either is constant."""
    p = np.asarray(predicted, dtype=float)
    a = np.asarray(actual, dtype=float)
    ok = np.isfinite(p) & np.isfinite(a)
    p, a = p[ok], a[ok]
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(a) == 0:
        return float("nan"), float("nan")
    pearson = float(np.corrcoef(p, a)[0, 1])
    spearman = float(np.corrcoef(_ranks(p), _ranks(a))[0, 1])
    return pearson, spearman


def confusion_counts(labels: np.ndarray, preds: np.ndarray, names: Sequence[str]
                     ) -> pd.DataFrame:
    """Counts of (true, predicted) with class names as axes (rows true, columns predicted);
    labels outside the classes are not counted."""
    n = len(names)
    counts = np.zeros((n, n), dtype=int)
    labels = np.asarray(labels, dtype=int)
    preds = np.asarray(preds, dtype=int)
    ok = (labels >= 0) & (labels < n) & (preds >= 0) & (preds < n)
    np.add.at(counts, (labels[ok], preds[ok]), 1)
    return pd.DataFrame(counts, index=pd.Index(list(names), name="true"),
                        columns=pd.Index(list(names), name="predicted"))


def _status(correct_before: np.ndarray, correct_after: np.ndarray) -> np.ndarray:
    status = np.full(len(correct_before), "unchanged", dtype=object)
    status[~correct_before & correct_after] = "fixed"
    status[correct_before & ~correct_after] = "broken"
    return status


def _removed_finetune(before: Run, after: Run) -> list[str]:
    """Finetuning training ids ``after`` excluded beyond ``before`` (manifests)."""
    ex_b = {str(i) for i in before.manifest.get("excluded_finetune_ids") or []}
    return [str(i) for i in after.manifest.get("excluded_finetune_ids") or []
            if str(i) not in ex_b]


def compare_runs(before: Run, after: Run) -> Comparison:
    """Compare ``before`` and ``after`` (the parent is put first automatically, see
    :func:`parent_first`); raises :class:`IncompatibleRunsError` listing
    :func:`comparison_problems` when they cannot be compared."""
    problems = comparison_problems(before, after)
    if problems:
        raise IncompatibleRunsError("; ".join(problems))
    before, after, swapped = parent_first(before, after)
    pre_b = _ids(before.pretrain_examples, "example_id")
    pre_a = set(_ids(after.pretrain_examples, "example_id"))
    removed = [e for e in pre_b if e not in pre_a]
    added = sorted(pre_a - set(pre_b))
    how = relation(before, after)
    notes = []
    if swapped:
        notes.append(f"swapped the order so that the run with the removed examples comes "
                     f"first: {how}")
    if added:
        notes.append(f"{after.path.name} has {len(added)} pretraining examples that "
                     f"{before.path.name} does not; {before.path.name}'s scores cannot predict "
                     "their effect, so the prediction covers only the removed examples")
    removed_ft = _removed_finetune(before, after)
    if removed_ft and before.finetune_scores is None:
        notes.append(f"{len(removed_ft)} finetuning examples were removed but "
                     f"{before.path.name} has no finetuning-data scores: the prediction "
                     "covers only the removed pretraining examples")
    if not removed and not removed_ft:
        notes.append("no pretraining example was removed: the predicted change is zero")

    tid_b, tid_a = _ids(before.test_points, "test_id"), _ids(after.test_points, "test_id")
    row_a = {t: i for i, t in enumerate(tid_a)}
    rows_b = np.array([i for i, t in enumerate(tid_b) if t in row_a], dtype=np.int64)
    rows_a = np.array([row_a[t] for t in tid_b[rows_b]], dtype=np.int64)
    if len(rows_b) < len(tid_b) or len(rows_a) < len(tid_a):
        notes.append(f"compared on the {len(rows_b)} test points both runs have "
                     f"({len(tid_b)} in {before.path.name}, {len(tid_a)} in {after.path.name})")
    tb, ta = before.test_points.iloc[rows_b], after.test_points.iloc[rows_a]
    meas_b = _measurement(before)[rows_b]  # type: ignore[index]  # checked by problems
    meas_a = _measurement(after)[rows_a]  # type: ignore[index]
    # Every row of a run's test table is a row of its score matrices: all common points are
    # scored in ``before``; NaN stays possible for non-finite sums.
    predicted = {name: removal_prediction(before, removed, name)[rows_b]
                 for name in ("total", "pretrained_term", "finetuned_term")}
    # Removed finetuning examples add their finetuning-data scores (first order, additive).
    predicted_ft = finetune_removal_prediction(before, removed_ft)[rows_b]
    cb = tb["correct"].to_numpy(dtype=bool)
    ca = ta["correct"].to_numpy(dtype=bool)
    points = pd.DataFrame({
        "test_id": tid_b[rows_b], "label": tb["label"].to_numpy(dtype=int),
        "pred_before": tb["pred"].to_numpy(dtype=int), "pred_after": ta["pred"].to_numpy(dtype=int),
        "correct_before": cb, "correct_after": ca,
        "loss_before": tb["loss"].to_numpy(dtype=float),
        "loss_after": ta["loss"].to_numpy(dtype=float),
        "measurement_before": meas_b, "measurement_after": meas_a,
        "actual_change": meas_a - meas_b,
        "predicted_change": predicted["total"] + predicted_ft,
        "predicted_pretraining_data": predicted["total"],
        "predicted_finetuning_data": predicted_ft,
        "predicted_pretrained_term": predicted["pretrained_term"],
        "predicted_finetuned_term": predicted["finetuned_term"],
        "status": _status(cb, ca),
    })
    scored = np.isfinite(points["predicted_change"].to_numpy())
    pearson, spearman = correlations(points["predicted_change"], points["actual_change"])
    mis = ~cb
    pearson_m, spearman_m = correlations(points["predicted_change"][mis],
                                         points["actual_change"][mis])
    names = _finetune_classes(before) or class_names(before, "finetune")
    return Comparison(
        before=before, after=after, reordered=swapped, relation=how,
        removed_ids=removed, removed_finetune_ids=removed_ft, added_ids=added, notes=notes,
        points=points, class_names=names,
        accuracy_before=float(cb.mean()), accuracy_after=float(ca.mean()),
        confusion_before=confusion_counts(points["label"], points["pred_before"], names),
        confusion_after=confusion_counts(points["label"], points["pred_after"], names),
        pearson=pearson, spearman=spearman, pearson_misclassified=pearson_m,
        spearman_misclassified=spearman_m, n_scored=int(scored.sum()),
        n_scored_misclassified=int((scored & mis).sum()),
        extra={"sign_agreement": sign_agreement(points)})


def sign_agreement(points: pd.DataFrame) -> float:
    """Share of scored points whose predicted and actual change have the same sign (among
    those where both are non-zero); NaN when there are none."""
    p = points["predicted_change"].to_numpy(dtype=float)
    a = points["actual_change"].to_numpy(dtype=float)
    ok = np.isfinite(p) & np.isfinite(a) & (p != 0) & (a != 0)
    return float((np.sign(p[ok]) == np.sign(a[ok])).mean()) if ok.any() else float("nan")


def related_runs(current: Mapping[str, Any], current_name: str,
                 manifests: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(name, "child" | "parent")`` of the runs related to the run ``current`` (its
    manifest) among ``manifests`` (name -> manifest, in listing order, newest first): its
    children first (their ``parent.run_id`` is its run_id), then its parent (the run_id its
    ``parent`` names), then, for runs without a recorded parent, runs of the same config file
    whose ``excluded_ids`` strictly contain its own (children) or are strictly contained in
    them (parents)."""
    run_id = current.get("run_id")
    own_parent = _parent_id(current)
    ex_cur = set(map(str, current.get("excluded_ids") or []))
    cfg_cur = current.get("config_path")
    groups: dict[str, list[str]] = {"child": [], "parent": [], "loose child": [],
                                    "loose parent": []}
    for name, m in manifests.items():
        if name == current_name or m.get("run_id") == run_id:
            continue
        if _parent_id(m) == run_id:
            groups["child"].append(name)
        elif own_parent is not None and m.get("run_id") == own_parent:
            groups["parent"].append(name)
        elif cfg_cur is not None and m.get("config_path") == cfg_cur:
            ex = set(map(str, m.get("excluded_ids") or []))
            if ex_cur < ex and _parent_id(m) is None:
                groups["loose child"].append(name)
            elif ex < ex_cur and own_parent is None:
                groups["loose parent"].append(name)
    return [(n, role.removeprefix("loose ")) for role, names in groups.items() for n in names]
