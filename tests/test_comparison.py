"""The run comparison: pure logic on synthetic runs with hand-set outcomes (exact numbers), the
page with AppTest on synthetic pairs (fast) and on two real runs (the sample run and its
retrain without its 12 most harmful examples; ``slow``)."""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from benchmarks.make_synthetic_run import make_synthetic_run
from dashboard.compare_charts import confusion_pair, prediction_scatter
from dashboard.comparison import (
    IncompatibleRunsError,
    compare_runs,
    comparison_problems,
    correlations,
    parent_first,
    related_runs,
)
from engine.artifacts import Run, load_run, write_run
from tests.apptest_pages import new_app

ROOT = Path(__file__).resolve().parents[1]
COMPARE_PAGE = "views/compare.py"
REMOVED_COLS = [3, 10, 50, 77, 119]
_GENERATED = ("schema_version", "run_id", "score_convention", "shapes", "files")


def _derive(before: Run, out: Path, removed: list[str], *, loss: np.ndarray | None = None,
            correct: np.ndarray | None = None, test_rows: np.ndarray | None = None,
            parent: bool = True, **manifest_updates) -> Run:
    """A run like ``before`` without the ``removed`` pretraining examples, with hand-set test
    losses (= measurements) and correctness, optionally on a subset of the test points."""
    keep = ~before.pretrain_examples["example_id"].isin(removed).to_numpy()
    rows = np.arange(before.n_test) if test_rows is None else np.asarray(test_rows)
    tp = before.test_points.iloc[rows].reset_index(drop=True).copy()
    if loss is not None:
        tp["loss"] = loss
    if correct is not None:
        tp["correct"] = correct
        tp["pred"] = np.where(correct, tp["label"], 1 - tp["label"])
    tp["measurement"] = tp["loss"]
    manifest = {k: v for k, v in before.manifest.items() if k not in _GENERATED}
    manifest["excluded_ids"] = list(removed)
    if parent:
        manifest["parent"] = {"run_id": before.run_id, "name": before.path.name}
    manifest.update(manifest_updates)
    cols = np.flatnonzero(keep)
    scores = {n: np.asarray(before.scores[n])[np.ix_(rows, cols)]
              for n in ("total", "pretrained_term", "finetuned_term")}
    path = write_run(out, manifest, tp, before.pretrain_examples[keep].reset_index(drop=True),
                     scores, before.pretrain_xy[cols], before.test_xy[rows])
    return load_run(path, verify_hashes=False)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """A synthetic parent, a child with hand-set outcomes, and runs that cannot be compared."""
    root = tmp_path_factory.mktemp("cmp_runs")
    base = load_run(make_synthetic_run(root / "base", n_pretrain=120, n_test=30, seed=11),
                    verify_hashes=False)
    removed = base.pretrain_examples["example_id"].iloc[REMOVED_COLS].astype(str).tolist()
    ok = base.test_points["correct"].to_numpy(dtype=bool)
    fixed, broken = np.flatnonzero(~ok)[:2], np.flatnonzero(ok)[:3]
    correct_after = ok.copy()
    correct_after[fixed], correct_after[broken] = True, False
    delta = np.random.default_rng(0).normal(0, 0.2, base.n_test)
    loss_after = base.test_points["loss"].to_numpy() + delta
    child = _derive(base, root / "base-child", removed, loss=loss_after, correct=correct_after)
    classes = {"pretrain": [str(i) for i in range(10)], "finetune": ["low", "high"]}
    other = _derive(base, root / "other-classes", removed[:1], parent=False, classes=classes)
    renamed = base.test_points.assign(test_id="x" + base.test_points["test_id"].astype(str))
    manifest = {k: v for k, v in base.manifest.items() if k not in _GENERATED}
    disjoint = write_run(root / "disjoint", manifest, renamed, base.pretrain_examples,
                         {n: np.asarray(base.scores[n]) for n in base.scores},
                         base.pretrain_xy, base.test_xy)
    return {"root": root, "base": base, "child": child, "removed": removed,
            "fixed": base.test_points["test_id"].iloc[fixed].tolist(),
            "broken": base.test_points["test_id"].iloc[broken].tolist(),
            "other": other, "disjoint": load_run(disjoint, verify_hashes=False)}


def test_predicted_and_actual_changes_are_exact(synthetic):
    base, child = synthetic["base"], synthetic["child"]
    cmp = compare_runs(base, child)
    pts = cmp.points
    assert not cmp.reordered and cmp.removed_ids == synthetic["removed"] and not cmp.added_ids
    assert list(pts["test_id"]) == list(base.test_points["test_id"])
    for name, col in (("total", "predicted_change"),
                      ("pretrained_term", "predicted_pretrained_term"),
                      ("finetuned_term", "predicted_finetuned_term")):
        expected = np.asarray(base.scores[name], dtype=np.float64)[:, REMOVED_COLS].sum(1)
        np.testing.assert_allclose(pts[col], expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pts["predicted_pretrained_term"] + pts["predicted_finetuned_term"],
                               pts["predicted_change"], rtol=1e-5, atol=1e-9)
    actual = child.test_points["loss"].to_numpy() - base.test_points["loss"].to_numpy()
    np.testing.assert_array_equal(pts["actual_change"], actual)
    assert sorted(cmp.fixed["test_id"]) == sorted(synthetic["fixed"])
    assert sorted(cmp.broken["test_id"]) == sorted(synthetic["broken"])
    assert (pts["status"] == "unchanged").sum() == base.n_test - 5
    assert cmp.accuracy_before == base.test_points["correct"].mean()
    assert cmp.accuracy_after == child.test_points["correct"].mean()
    for matrix, run in ((cmp.confusion_before, base), (cmp.confusion_after, child)):
        tp = run.test_points
        for t in (0, 1):
            for p in (0, 1):
                expected = int(((tp["label"] == t) & (tp["pred"] == p)).sum())
                assert matrix.iloc[t, p] == expected
        assert list(matrix.index) == ["even", "odd"] and matrix.to_numpy().sum() == run.n_test
    pred = pts["predicted_change"].to_numpy()
    assert cmp.pearson == pytest.approx(np.corrcoef(pred, actual)[0, 1], abs=1e-12)
    assert cmp.spearman == pytest.approx(spearmanr(pred, actual).statistic, abs=1e-12)
    mis = ~base.test_points["correct"].to_numpy(dtype=bool)
    assert cmp.n_scored == base.n_test and cmp.n_scored_misclassified == mis.sum()
    assert cmp.pearson_misclassified == pytest.approx(
        np.corrcoef(pred[mis], actual[mis])[0, 1], abs=1e-12)


def test_parent_is_put_first(synthetic):
    base, child = synthetic["base"], synthetic["child"]
    assert parent_first(child, base)[:2] == (base, child) and parent_first(child, base)[2]
    cmp = compare_runs(child, base)
    assert cmp.reordered and cmp.before is base and cmp.after is child
    assert "child of base" in cmp.relation
    assert cmp.removed_ids == synthetic["removed"]


def test_without_parent_record_the_superset_is_before(synthetic, tmp_path):
    base = synthetic["base"]
    loose = _derive(base, tmp_path / "loose", synthetic["removed"][:2], parent=False)
    cmp = compare_runs(loose, base)
    assert cmp.reordered and cmp.before is base and len(cmp.removed_ids) == 2
    assert "excludes 2 more" in cmp.relation
    np.testing.assert_array_equal(cmp.points["actual_change"], 0.0)  # same losses
    assert np.isnan(cmp.pearson)  # constant actual change: undefined, not an error


def test_added_examples_and_test_subset_are_noted(synthetic, tmp_path):
    base = synthetic["base"]
    sub = _derive(base, tmp_path / "sub", synthetic["removed"], test_rows=np.arange(5, 20))
    cmp = compare_runs(base, sub)
    assert list(cmp.points["test_id"]) == list(base.test_points["test_id"].iloc[5:20])
    assert any("15 test points both runs have" in n for n in cmp.notes)
    expected = np.asarray(base.scores["total"], np.float64)[5:20][:, REMOVED_COLS].sum(1)
    np.testing.assert_allclose(cmp.points["predicted_change"], expected, rtol=1e-12)
    # Different pretraining sets both ways: only the removals are predicted; said so.
    swapped_ids = base.pretrain_examples.copy()
    swapped_ids.loc[0, "example_id"] = "new-example"
    manifest = {k: v for k, v in base.manifest.items() if k not in _GENERATED}
    path = write_run(tmp_path / "added", manifest, base.test_points, swapped_ids,
                     {n: np.asarray(base.scores[n]) for n in base.scores},
                     base.pretrain_xy, base.test_xy)
    cmp = compare_runs(base, load_run(path, verify_hashes=False))
    assert cmp.added_ids == ["new-example"] and cmp.removed_ids == [
        str(base.pretrain_examples["example_id"].iloc[0])]
    assert any("covers only the removed examples" in n for n in cmp.notes)


def test_incompatible_pairs_give_problems(synthetic, tmp_path):
    base = synthetic["base"]
    assert any("same run" in p for p in comparison_problems(base, base))
    assert any("finetuning classes differ" in p
               for p in comparison_problems(base, synthetic["other"]))
    assert any("no test point id in common" in p
               for p in comparison_problems(base, synthetic["disjoint"]))
    margin = _derive(base, tmp_path / "margin", [], parent=False, measurement="margin")
    assert any("measurement differs" in p for p in comparison_problems(base, margin))
    assert comparison_problems(base, synthetic["child"]) == []
    with pytest.raises(IncompatibleRunsError, match="classes differ"):
        compare_runs(base, synthetic["other"])


def test_correlations_and_related_runs():
    assert correlations(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 9.0]))[1] == 1.0
    assert all(np.isnan(correlations(np.array([1.0, 2.0]), np.array([1.0, 2.0]))))
    r, rho = correlations(np.array([1.0, np.nan, 3.0, 2.0]), np.array([1.0, 5.0, 2.0, 3.0]))
    assert r == pytest.approx(0.5) and rho == pytest.approx(0.5)
    cur = {"run_id": "c", "parent": {"run_id": "p", "name": "p-run"}, "config_path": "x",
           "excluded_ids": ["a"]}
    manifests = {"new-child": {"run_id": "k2", "parent": {"run_id": "c"}},
                 "unrelated": {"run_id": "u", "config_path": "y"},
                 "p-run": {"run_id": "p"},
                 "old-child": {"run_id": "k1", "parent": {"run_id": "c", "name": "cur"}},
                 "loose": {"run_id": "l", "config_path": "x", "excluded_ids": ["a", "b"]}}
    assert related_runs(cur, "cur", manifests) == [
        ("new-child", "child"), ("old-child", "child"), ("p-run", "parent"), ("loose", "child")]


def test_figures(synthetic):
    cmp = compare_runs(synthetic["base"], synthetic["child"])
    tid = synthetic["fixed"][0]
    fig = prediction_scatter(cmp.points, "base", highlight=tid)
    assert list(fig.layout.xaxis.range) == list(fig.layout.yaxis.range)
    diagonal = fig.data[0]
    assert list(diagonal.x) == list(diagonal.y) == list(fig.layout.xaxis.range)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name["fixed (misclassified → correct)"].customdata) == set(synthetic["fixed"])
    assert set(by_name["newly broken (correct → misclassified)"].customdata) == \
        set(synthetic["broken"])
    shown = [c for t in fig.data[1:4] for c in t.customdata]
    assert sorted(shown) == sorted(cmp.points["test_id"])
    assert list(by_name[f"this point ({tid})"].x) == [
        cmp.points.set_index("test_id").loc[tid, "predicted_change"]]
    pair = confusion_pair(cmp.confusion_before, cmp.confusion_after, "base", "base-child")
    np.testing.assert_array_equal(pair.data[0].z, cmp.confusion_before.to_numpy())
    np.testing.assert_array_equal(pair.data[1].z, cmp.confusion_after.to_numpy())


# --- the page (AppTest) -----------------------------------------------------------------------

def texts(elements) -> str:
    return html.unescape("\n".join(str(e.value) for e in elements))


def open_compare(query: dict[str, str]):
    """A fresh session deep-linked to the comparison page."""
    at = new_app()
    for k, v in query.items():
        at.query_params[k] = v
    at.switch_page(COMPARE_PAGE)
    at.run()
    assert not at.exception, at.exception
    return at


def tables(at, column: str) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe if column in d.value.columns]


@pytest.fixture()
def synthetic_env(synthetic, monkeypatch) -> dict:
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(synthetic["root"]))
    return synthetic


def check_page(at, cmp, tid: str) -> None:
    """The page shows ``cmp``'s numbers and the row of test point ``tid``."""
    b, a = cmp.before.path.name, cmp.after.path.name
    assert f"`{b}` → `{a}`" in at.subheader[0].value
    assert f"{len(cmp.removed_ids)} pretraining examples removed" in at.subheader[0].value
    metrics = {m.label: m for m in at.metric}
    before_acc = cmp.before.test_points["correct"].mean()
    after_acc = cmp.after.test_points.set_index("test_id").loc[
        cmp.points["test_id"], "correct"].mean()
    assert metrics[f"Accuracy before ({b})"].value == f"{before_acc:.1%}"
    assert metrics[f"Accuracy after ({a})"].value == f"{after_acc:.1%}"
    assert metrics["Fixed (misclassified → correct)"].value == str(len(cmp.fixed))
    row = cmp.points.set_index("test_id").loc[tid]
    this = texts(at.success)
    assert f"This point `{tid}`" in this
    assert f"loss before {row['loss_before']:.4f}, after {row['loss_after']:.4f}" in this
    assert f"actual change {row['actual_change']:+.4f}" in this
    assert f"predicted change {row['predicted_change']:+.4f}" in this
    assert len(at.get("plotly_chart")) == 2
    (every,) = [t for t in tables(at, "actual change") if len(t) == len(cmp.points)]
    assert set(every["status"]) <= {"fixed", "broken", "unchanged"}


def test_page_deep_link_shows_the_pair(synthetic_env):
    s = synthetic_env
    tid = s["fixed"][0]
    at = open_compare({"run": "base", "compare": "base-child", "test_id": tid})
    cmp = compare_runs(s["base"], s["child"])
    check_page(at, cmp, tid)
    assert f"Pearson r = {cmp.pearson:.3f}" in texts(at.caption)
    assert "predicted (first order, from `base`'s scores) vs actual (retrained)" in \
        texts(at.caption)
    fixed = [t for t in tables(at, "status") if set(t["status"]) == {"fixed"}]
    assert len(fixed) == 1 and fixed[0]["before"].str.startswith(
        "test-point?run=base&test_id=").all()
    assert sorted(fixed[0]["before"].str.split("test_id=").str[1]) == sorted(s["fixed"])
    at.radio(key="cmp_subset").set_value("fixed or broken").run()
    assert not at.exception
    assert len(tables(at, "actual change")[-1]) == len(s["fixed"]) + len(s["broken"])


def test_page_defaults_to_the_child_and_puts_the_parent_first(synthetic_env):
    at = open_compare({"run": "base"})
    assert at.selectbox(key="compare").value == "base-child"
    assert "`base` → `base-child`" in at.subheader[0].value
    at = open_compare({"run": "base-child", "compare": "base"})
    assert "`base` → `base-child`" in at.subheader[0].value  # the parent is "before"
    assert "shown as **after**" in texts(at.info)
    # Switching the sidebar to the compared run keeps the pair (and the test point).
    tid = synthetic_env["broken"][0]
    at = open_compare({"run": "base", "compare": "base-child", "test_id": tid})
    at.selectbox(key="run").set_value("base-child").run()
    assert not at.exception
    assert at.selectbox(key="compare").value == "base"
    assert "`base` → `base-child`" in at.subheader[0].value
    assert f"This point `{tid}`" in texts(at.success)


def test_page_unknown_same_and_incompatible_runs(synthetic_env):
    at = open_compare({"run": "base", "compare": "no-such-run"})
    assert "There is no run `no-such-run`" in texts(at.error) and not at.metric
    at.selectbox(key="compare_choice").set_value("base-child").run()
    assert not at.exception and "`base` → `base-child`" in at.subheader[0].value
    at = open_compare({"run": "base", "compare": "*x* [y](z) :red[w]"})
    assert "There is no run `*x* [y](z) :red[w]`" in texts(at.error)
    at = open_compare({"run": "base", "compare": "base"})
    assert "cannot be compared with itself" in texts(at.error) and not at.metric
    at = open_compare({"run": "base", "compare": "other-classes"})
    assert "finetuning classes differ" in texts(at.error) and not at.metric
    at = open_compare({"run": "base", "compare": "disjoint"})
    assert "no test point id in common" in texts(at.error) and not at.metric


# --- two real runs (slow) ---------------------------------------------------------------------

def harmful_ids(run: Run, k: int = 12) -> list[str]:
    """The ``k`` most harmful pretraining examples of the misclassified test points."""
    mis = ~run.test_points["correct"].to_numpy(dtype=bool)
    summed = np.asarray(run.scores["total"], dtype=np.float64)[mis].sum(0)
    ids = run.pretrain_examples["example_id"].astype(str).to_numpy()
    return ids[np.argsort(summed)[:k]].tolist()


@pytest.fixture(scope="session")
def real_runs(sample_run, tmp_path_factory) -> Path:
    """A runs dir with the sample run (``digits``) and its retrain without its 12 most
    harmful examples (``digits-child``, ``--parent digits`` when the engine has the flag)."""
    root = tmp_path_factory.mktemp("real_runs")
    parent = root / "digits"
    shutil.copytree(sample_run, parent)
    ids = root / "ids.txt"
    ids.write_text("".join(f"{i}\n" for i in harmful_ids(load_run(parent,
                                                                  verify_hashes=False))))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "engine", "run", str(ROOT / "sample_data/digits/config.toml"),
           "--out", str(root / "digits-child"), "--exclude", str(ids)]
    helptext = subprocess.run([sys.executable, "-m", "engine", "run", "--help"], cwd=ROOT,
                              env=env, capture_output=True, text=True).stdout
    if "--parent" in helptext:
        cmd += ["--parent", str(parent)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return root


def independent_pearson(parent: Run, child: Run) -> float:
    """Pearson of (sum of the parent's total scores over the removed ids) vs (child's minus
    parent's measurement), computed here from the two runs' files only."""
    pre = parent.pretrain_examples["example_id"].astype(str)
    cols = np.flatnonzero(~pre.isin(set(child.pretrain_examples["example_id"].astype(str))))
    predicted = np.asarray(parent.scores["total"], dtype=np.float64)[:, cols].sum(1)
    after = child.test_points.set_index("test_id")["measurement"]
    actual = after.loc[parent.test_points["test_id"]].to_numpy() - \
        parent.test_points["measurement"].to_numpy()
    return float(np.corrcoef(predicted, actual)[0, 1])


@pytest.mark.slow
def test_real_pair_prediction_correlates_with_retraining(real_runs):
    parent = load_run(real_runs / "digits", verify_hashes=False)
    child = load_run(real_runs / "digits-child", verify_hashes=False)
    cmp = compare_runs(child, parent)
    assert cmp.before.run_id == parent.run_id and len(cmp.removed_ids) == 12
    if "parent" in child.manifest:  # built with --parent
        assert child.manifest["parent"]["run_id"] == parent.run_id
        assert "child of digits" in cmp.relation
    assert sorted(cmp.removed_ids) == sorted(harmful_ids(parent))
    print(f"\nreal pair: Pearson {cmp.pearson:.3f}, Spearman {cmp.spearman:.3f}; misclassified "
          f"before: Pearson {cmp.pearson_misclassified:.3f}; fixed {len(cmp.fixed)}, broken "
          f"{len(cmp.broken)}; accuracy {cmp.accuracy_before:.4f} -> {cmp.accuracy_after:.4f}")
    assert cmp.pearson == pytest.approx(independent_pearson(parent, child), abs=1e-9)
    assert cmp.pearson > 0 and cmp.pearson_misclassified > 0
    # Removing examples that harm the misclassified points lowers their loss, as predicted.
    mis = cmp.points[~cmp.points["correct_before"]]
    assert mis["predicted_change"].sum() < 0 and mis["actual_change"].sum() < 0


@pytest.mark.slow
def test_real_pair_page(real_runs, monkeypatch):
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(real_runs))
    parent = load_run(real_runs / "digits", verify_hashes=False)
    child = load_run(real_runs / "digits-child", verify_hashes=False)
    cmp = compare_runs(parent, child)
    tid = str((cmp.fixed if len(cmp.fixed) else cmp.points)["test_id"].iloc[0])
    at = open_compare({"run": "digits", "compare": "digits-child", "test_id": tid})
    check_page(at, cmp, tid)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy before (digits)"] == f"{parent.test_points['correct'].mean():.1%}"
    assert metrics["Accuracy after (digits-child)"] == f"{child.test_points['correct'].mean():.1%}"
    assert f"Pearson r = {independent_pearson(parent, child):.3f}" in texts(at.caption)
    assert at.selectbox(key="compare").value == "digits-child"
    # The default for the parent is its child, also without ?compare=.
    assert open_compare({"run": "digits"}).selectbox(key="compare").value == "digits-child"
    at = open_compare({"run": "digits", "compare": "digits-chld"})
    assert "There is no run `digits-chld`" in texts(at.error) and not at.metric
