"""Finetuning-data influence in the dashboard, on a real (small) run: the Test point page's
finetuning section (verdict, ranked tables, what-if of flagged finetuning examples), the Flags
page's finetuning flags, and a retrain job without flagged finetuning examples whose comparison
predicts the actual change from the finetuning-data scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dashboard.comparison import compare_runs
from dashboard.finetune_flags_panel import predicted_fixes
from dashboard.flags import FINETUNE_FLAGS_FILE, FLAGS_FILE, FlagStore
from dashboard.jobs import JobStore
from engine.artifacts import load_run
from engine.pipeline import run as engine_run
from engine.stage_verdict import DEFAULT_K, stage_verdict
from tests.apptest_pages import open_page
from tests.test_jobs import finished

TEST_PAGE = "views/test_point.py"
FLAGS_PAGE = "views/flag_list.py"


@pytest.fixture(scope="module")
def template(small_config, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft_dash")
    engine_run(small_config, root / "base", echo=lambda s: None)
    return root


@pytest.fixture()
def runs_dir(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(template, root)
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(root))
    return root


def _worst_point(run) -> tuple[int, str]:
    row = int(run.test_points["loss"].to_numpy().argmax())
    return row, str(run.test_points["test_id"].iloc[row])


def test_test_point_page_shows_the_verdict_and_the_ranked_finetuning_examples(runs_dir):
    run = load_run(runs_dir / "base")
    row, tid = _worst_point(run)
    at = open_page(TEST_PAGE, {"run": "base", "test_id": tid})
    assert "Finetuning examples" in [s.value for s in at.subheader]
    verdict = stage_verdict(run.scores["total"][row], run.finetune_scores[row], DEFAULT_K)
    texts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    assert any(verdict.sentence() in t for t in texts), verdict.sentence()
    scores = np.asarray(run.finetune_scores[row], dtype=float)
    ids = run.finetune_examples["example_id"].to_numpy()
    harmful = [e for e, s in zip(ids[np.argsort(scores, kind="stable")],
                                 np.sort(scores, kind="stable"), strict=True) if s < 0][:DEFAULT_K]
    tables = [d.value for d in at.dataframe
              if "example_id" in d.value.columns and "finetune_loss" in d.value.columns]
    shown = tables[0] if not bool(run.test_points["correct"].iloc[row]) else tables[1]
    assert shown["example_id"].tolist() == harmful
    np.testing.assert_allclose(shown["score"], np.sort(scores)[:len(harmful)], rtol=1e-6)


def test_flagged_finetuning_examples_have_their_own_store_what_if_and_retrain(runs_dir):
    run = load_run(runs_dir / "base")
    row, tid = _worst_point(run)
    scores = np.asarray(run.finetune_scores[row], dtype=float)
    ids = run.finetune_examples["example_id"].to_numpy()
    picked = ids[np.argsort(scores)[:2]].tolist()
    FlagStore.beside_run(runs_dir / "base", "finetune").flag(run.run_id, picked, "other")
    assert (runs_dir / FINETUNE_FLAGS_FILE).is_file() and not (runs_dir / FLAGS_FILE).exists()

    at = open_page(TEST_PAGE, {"run": "base", "test_id": tid})
    change = float(np.sort(scores)[:2].sum())
    assert any(f"**2 flagged finetuning examples** is predicted to change this point's loss by "
               f"**{change:+.4f}**" in m.value for m in at.markdown)

    at = open_page(FLAGS_PAGE, {"run": "base"})
    assert "Flagged finetuning examples" in [s.value for s in at.subheader]
    table = next(d.value for d in at.dataframe if "from test point" in d.value.columns
                 and "who" in d.value.columns and d.value["example_id"].isin(picked).all())
    assert sorted(table["example_id"]) == sorted(picked)
    _, fixed, broken = predicted_fixes(run, picked)
    n_mis = int((~run.test_points["correct"].to_numpy(dtype=bool)).sum())
    assert any(f"predicted fixed **{fixed} of {n_mis}**, correct → predicted broken "
               f"**{broken}**" in m.value for m in at.markdown)
    start = at.button(key="retrain_start")
    assert start.label == ("Retrain without the 0 flagged pretraining and 2 flagged "
                           "finetuning examples") and not start.disabled


def test_retrain_job_without_finetuning_examples_and_its_comparison(runs_dir):
    base = load_run(runs_dir / "base")
    total = np.asarray(base.finetune_scores, dtype=float).sum(0)
    picked = base.finetune_examples["example_id"].to_numpy()[np.argsort(total)[:3]].tolist()
    store = JobStore(runs_dir)
    job = store.start_retrain(runs_dir / "base", [], "base-noft", excluded_finetune_ids=picked)
    done = finished(store, job.job_id)
    assert done.status == "succeeded", done.message
    child = load_run(runs_dir / "base-noft")
    assert child.manifest["excluded_finetune_ids"] == picked
    assert child.manifest["excluded_ids"] == []
    assert child.manifest["parent"]["run_id"] == base.run_id
    cmp = compare_runs(base, child)
    assert cmp.removed_ids == [] and cmp.removed_finetune_ids == picked
    cols = np.flatnonzero(np.isin(base.finetune_examples["example_id"], picked))
    np.testing.assert_allclose(cmp.points["predicted_change"],
                               np.asarray(base.finetune_scores, dtype=np.float64)[:, cols].sum(1),
                               rtol=1e-9)
    assert cmp.pearson > 0.9, cmp.pearson


def test_overview_counts_misclassified_points_by_stage(runs_dir):
    run = load_run(runs_dir / "base")
    mis = np.flatnonzero(~run.test_points["correct"].to_numpy(dtype=bool))
    assert len(mis), "the small run has misclassified points"
    stages = [stage_verdict(run.scores["total"][r], run.finetune_scores[r], DEFAULT_K).stage
              for r in mis]
    at = open_page(None, {"run": "base"})
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["mostly pretraining"] == str(stages.count("pretraining"))
    assert metrics["mostly finetuning"] == str(stages.count("finetuning"))
    table = next(d.value for d in at.dataframe if "pretraining_share" in d.value.columns)
    assert len(table) == len(mis)
