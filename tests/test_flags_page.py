"""The Flags page with AppTest: the what-if numbers (the sum of the flagged scores), selection by
example id while another session changes the flags, and the run picker keeping the test point.

Runs are synthetic (``benchmarks/make_synthetic_run.py``), copied per test.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.make_synthetic_run import make_synthetic_run
from dashboard import flag_selection
from dashboard.flags import FlagStore
from dashboard.what_if import flip_thresholds, what_if
from engine.artifacts import load_run
from tests.apptest_pages import open_page

FLAGS_PAGE = "views/flag_list.py"
TEST_PAGE = "views/test_point.py"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flags_runs")
    make_synthetic_run(root / "digits", n_pretrain=300, n_test=40, seed=11)
    make_synthetic_run(root / "other", n_pretrain=120, n_test=15, seed=12)
    return root


@pytest.fixture()
def runs_dir(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(template, root)
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(root))
    return root


@pytest.fixture()
def run(runs_dir):
    return load_run(runs_dir / "digits", verify_hashes=False)


def _most_harmful(run, k: int) -> list[str]:
    mis = ~run.test_points["correct"].astype(bool).to_numpy()
    total = np.asarray(run.scores["total"])[mis].sum(axis=0)
    return run.pretrain_examples["example_id"].to_numpy()[np.argsort(total)[:k]].tolist()


def test_what_if_is_the_sum_of_the_flagged_scores(runs_dir, run):
    flagged = _most_harmful(run, 9)
    FlagStore(runs_dir / "flags.sqlite").flag(run.run_id, flagged, "label noise")
    cols = [int(np.flatnonzero(run.pretrain_examples["example_id"] == e)[0]) for e in flagged]
    total = np.asarray(run.scores["total"], dtype=np.float64)
    expected = total[:, cols].sum(axis=1)
    tp = run.test_points   # synthetic runs have no measurement column: it is the loss
    before = tp["measurement" if "measurement" in tp else "loss"].to_numpy(dtype=float)
    lo, hi = flip_thresholds(run)
    assert lo == hi == pytest.approx(math.log(2))   # two finetuning classes: exact rule
    correct = run.test_points["correct"].astype(bool).to_numpy()
    fixes = {t for t, c, a in zip(run.test_points["test_id"], correct, before + expected,
                                  strict=True) if not c and a < lo}
    breaks = {t for t, c, a in zip(run.test_points["test_id"], correct, before + expected,
                                   strict=True) if c and a > hi}

    at = open_page(FLAGS_PAGE, {"run": "digits"})
    table = next(d.value for d in at.dataframe if "predicted change" in d.value.columns)
    ids = table["test point"].str.extract(r"test_id=(.*)$")[0]
    got = dict(zip(ids, table["predicted change"], strict=True))
    for t, e in zip(run.test_points["test_id"], expected, strict=True):
        assert got[str(t)] == pytest.approx(e, rel=1e-9, abs=1e-12)
    metrics = {m.label: m.value for m in at.metric}
    n_mis = int((~correct).sum())
    assert metrics["misclassified → predicted fixed"] == f"{len(fixes)} of {n_mis}"
    assert metrics["correct → predicted broken"] == str(len(breaks))
    assert metrics["flagged examples in this run"] == "9"
    assert set(what_if(run, flagged).fixes) == fixes

    # Beside the test point: the same numbers for one point.
    point = str(run.test_points["test_id"].iloc[int(np.argmax(~correct))])
    at = open_page(TEST_PAGE, {"run": "digits", "test_id": point})
    row = int(np.flatnonzero(run.test_points["test_id"].astype(str) == point)[0])
    text = "\n".join(m.value for m in at.markdown)
    assert f"{before[row] + expected[row]:.3f}" in text and f"{expected[row]:+.3f}" in text


def test_unflag_selects_by_id_while_another_session_flags(runs_dir, run):
    store = FlagStore(runs_dir / "flags.sqlite")
    ids = run.pretrain_examples["example_id"].astype(str).tolist()
    store.flag(run.run_id, ids[10:13], "label noise")
    at = open_page(FLAGS_PAGE, {"run": "digits"})
    shown = store.flags(run.run_id)["example_id"].astype(str).tolist()   # the page's order
    key = flag_selection.table_key(shown)
    victim = shown[1]
    at.session_state[key] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    # Another tab flags two more examples: the next rerun's table has other rows at position 1.
    store.flag(run.run_id, ids[0:2], "duplicate")
    at.run()
    assert not at.exception, at.exception
    assert at.multiselect(key=flag_selection.PICK_KEY).value == [victim]
    button = at.button(key="unflag_selected")
    assert button.label == "Unflag 1 selected"
    button.click().run()
    assert not at.exception, at.exception
    assert store.flagged_ids(run.run_id) == set(ids[10:13] + ids[0:2]) - {victim}

    # Selecting by id directly, with one of them unflagged elsewhere before the click.
    at.multiselect(key=flag_selection.PICK_KEY).set_value([ids[0], ids[10]]).run()
    store.unflag(run.run_id, [ids[0]])
    at.button(key="unflag_selected").click().run()
    assert not at.exception, at.exception
    assert store.flagged_ids(run.run_id) == set(ids[11:13] + ids[1:2]) - {victim}
    assert any("already been unflagged" in s.value for s in at.success)


def test_flag_without_test_point_has_no_nan_link(runs_dir, run):
    store = FlagStore(runs_dir / "flags.sqlite")
    store.flag(run.run_id, ["p000001"], "other", test_id=None)
    store.flag(run.run_id, ["p000002"], "other", test_id="t00003")
    at = open_page(FLAGS_PAGE, {"run": "digits"})
    table = next(d.value for d in at.dataframe if "from test point" in d.value.columns)
    links = dict(zip(table["example"].str.extract(r"example_id=(.*)$")[0],
                     table["from test point"], strict=True))
    assert pd.isna(links["p000001"])            # an empty cell, not a link to "nan"
    assert links["p000002"].endswith("test_id=t00003")
    assert not any("test_id=nan" in str(v) for v in table["from test point"])


def test_switching_runs_keeps_a_test_point_both_runs_have(runs_dir, run):
    shared = str(run.test_points["test_id"].iloc[3])
    other = load_run(runs_dir / "other", verify_hashes=False)
    assert shared in set(other.test_points["test_id"].astype(str))
    at = open_page(TEST_PAGE, {"run": "digits", "test_id": shared})
    at.sidebar.selectbox(key="run").set_value("other").run()
    assert not at.exception, at.exception
    assert at.session_state["test_id"] == shared
    only_here = str(run.test_points["test_id"].iloc[-1])
    assert only_here not in set(other.test_points["test_id"].astype(str))
    at.sidebar.selectbox(key="run").set_value("digits").run()
    at.sidebar.text_input(key="test_id").set_value(only_here).run()
    at.sidebar.selectbox(key="run").set_value("other").run()
    assert not at.exception, at.exception
    assert at.session_state["test_id"] == ""
