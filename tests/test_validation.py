"""Tests for engine.validation: predicted vs actual influence by removal and retraining.

The fast tests build a tiny two-stage run (160 pretraining examples, 8 features, 6 hidden units)
through ``engine.pipeline.run`` from Parquet files written in tmp_path, and validate it with
reduced settings.  The ``slow`` test does the same on the digits sample data.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from benchmarks.make_synthetic_run import make_synthetic_run
from engine import artifacts, cli
from engine.pipeline import run as make_run
from engine.pipeline import task_from_run
from engine.validation import (
    VALIDATION_DIR,
    ValidationError,
    ValidationSettings,
    run_retrains,
    validate,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "digits"
FILES = ("summary.json", "loo.csv", "group.csv", "noise.csv", "finetune.csv", "loo_scatter.json")


def write_tiny_data(root: Path, n_pre: int = 160, n_ft: int = 60, n_test: int = 40, d: int = 8,
                    seed: int = 0, flip: float = 0.1, spread: float = 1.0) -> Path:
    """Four Gaussian classes -> even/odd; ~10% flipped pretraining labels; returns the config.

    Pretraining weight decay 3e-2: with 1e-2 this 160-example problem is so small that single
    removals act nonlinearly (actual/predicted slope 1.6, Pearson 0.87).
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, spread, size=(4, d))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, size=n)
        return centers[y] + rng.normal(0, 1.0, size=(n, d)), y

    def frame(prefix: str, X: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame({"example_id": [f"{prefix}{i:04d}" for i in range(len(X))],
                           "label": labels})
        for c in range(d):
            df[f"px_{c}"] = X[:, c]
        return df

    Xp, yp = draw(n_pre)
    flipped = rng.random(n_pre) < flip
    observed = np.where(flipped, (yp + rng.integers(1, 4, size=n_pre)) % 4, yp)
    frame("pre-", Xp, observed).to_parquet(root / "pretrain.parquet")
    (root / "corrupted_ids.txt").write_text(
        "".join(f"pre-{i:04d}\n" for i in np.flatnonzero(flipped)))
    parity = np.array(["even", "odd"])
    Xf, yf = draw(n_ft)
    frame("ft-", Xf, parity[yf % 2]).to_parquet(root / "finetune_train.parquet")
    Xt, yt = draw(n_test)
    frame("te-", Xt, parity[yt % 2]).to_parquet(root / "finetune_test.parquet")
    cfg = root / "config.toml"
    cfg.write_text("""seed = 0
dtype = "float64"
[data]
pretrain = "pretrain.parquet"
finetune_train = "finetune_train.parquet"
finetune_test = "finetune_test.parquet"
pretrain_classes = [0, 1, 2, 3]
finetune_classes = ["even", "odd"]
render = "none"
[model]
hidden = [6]
[pretrain]
weight_decay = 3e-2
[finetune]
weight_decay = 1e-2
[map]
method = "pca"
""")
    return cfg


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    cfg = write_tiny_data(root / "data")
    return make_run(cfg, root / "run", echo=quiet)


# Reduced settings: 3 misclassified test points x (4 top + 4 random), one group size, 2 draws.
REDUCED = ValidationSettings(max_test_points=3, per_point=4, group_sizes=(5,), random_draws=2,
                             workers=1)


@pytest.fixture(scope="module")
def validated(tiny) -> dict:
    return validate(tiny, REDUCED, echo=quiet)


def test_summary_and_files_are_well_formed(tiny, validated):
    out = tiny / VALIDATION_DIR
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    # Nothing partial is left next to the result.
    assert not [p for p in tiny.iterdir() if p.name.startswith(f".{VALIDATION_DIR}")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(validated))
    for key in ("created_at", "settings", "checks", "loo", "group", "noise", "finetune"):
        assert key in summary
    names = [c["name"] for c in summary["checks"]]
    assert names == ["loo_pearson", "loo_sign_top", "group_harmful_beats_random",
                     "group_prediction_k5", "noise_detection", "retrain_convergence",
                     "finetune_pearson"]
    for c in summary["checks"]:
        assert isinstance(c["passed"], bool) and c["verdict"] and "\n" not in c["verdict"]
    assert summary["settings"]["per_point"] == 4 and summary["settings"]["group_sizes"] == [5]
    # The artifacts loader (and so the dashboard) picks the summary up.
    assert artifacts.load_run(tiny).validation["checks"][0]["name"] == "loo_pearson"
    pio.from_json((out / "loo_scatter.json").read_text())  # a valid Plotly figure

    loo = pd.read_csv(out / "loo.csv")
    n_points = len(summary["loo"]["test_points"])
    assert (loo["role"] == "top").sum() == 4 * n_points
    assert (loo["role"] == "random").sum() == 4 * n_points
    # One retrain serves every chosen test point: the full cross product is recorded.
    assert len(loo) == n_points * loo["example_id"].nunique()
    group = pd.read_csv(out / "group.csv")
    assert sorted(group["kind"]) == ["harmful", "helpful", "random", "random"]
    noise = pd.read_csv(out / "noise.csv")
    assert len(noise) == 160 and noise["is_noise"].sum() == summary["noise"]["n_noise"]
    assert set(summary["noise"]["methods"]) == {"influence", "random", "pretrain_loss",
                                               "grad_similarity"}


def test_predicted_matches_actual_leave_one_out(validated):
    loo = validated["loo"]["designated_pairs"]
    # Measured on this tiny run (24 pairs): Pearson 0.82, Spearman 0.94, sign agreement 0.96,
    # actual/predicted slope 1.02; the thresholds leave room for platform round-off, not for a
    # wrong sign or scale.  (A wrong sign convention gives Pearson ~ -0.8.)
    assert loo["pearson"] > 0.7
    assert loo["spearman"] > 0.8
    assert loo["sign_agreement"] >= 0.85
    assert 0.5 < loo["slope_actual_on_predicted"] < 2.0
    assert validated["loo"]["reference_drift_max_abs"] < 1e-3
    conv = validated["convergence"]
    assert conv["n_failed"] == 0 and conv["max_pretrain_grad_norm"] <= 1e-10
    # Removing the most harmful examples lowers the misclassified points' loss (measured -0.28,
    # random +0.07), removing the most helpful raises it (+0.48).
    k5 = validated["group"]["by_k"][0]
    assert k5["harmful"]["actual_change"] < k5["random"]["actual_change_min"]
    assert k5["harmful"]["actual_change"] < 0 < k5["helpful"]["actual_change"]


def test_finetuning_data_influence_check(tiny, validated):
    """The run's finetune_scores.npy against finetuning-only retrains (a check row)."""
    ft = validated["finetune"]
    assert ft["scores_from"] == "run" and ft["scoring"] == {"given": True}
    n_points = len(ft["test_ids"])
    assert 1 <= n_points <= 5 and set(ft["test_ids"]) <= set(
        artifacts.load_run(tiny).test_points["test_id"])
    d = ft["designated_pairs"]
    assert d["n_pairs"] == n_points * 2 * 10
    # Measured on this tiny run (5 points x (10 + 10), 49 retrains, 0.7 s): Pearson 0.995,
    # sign agreement 99%, slope 1.27 (first order underestimates the largest removals).
    assert d["pearson"] > 0.9 and d["sign_agreement"] >= 0.9
    assert ft["convergence"]["n_unconverged"] == 0
    check = next(c for c in validated["checks"] if c["name"] == "finetune_pearson")
    assert check["passed"] == (d["pearson"] >= 0.95) and check["target"] == "Pearson >= 0.95"
    assert check["verdict"].startswith("Finetuning-data influence vs finetuning-only "
                                       "retraining: Pearson ")
    pairs = pd.read_csv(tiny / VALIDATION_DIR / "finetune.csv")
    assert len(pairs) == n_points * pairs["example_id"].nunique()
    assert set(pairs["role"]) <= {"top", "random", "other"}
    assert cli.build_parser().parse_args(
        ["validate", "x", "--finetune-per-point", "0"]).finetune_per_point == 0


def test_rerun_replaces_only_when_complete(tiny, validated, monkeypatch):
    import engine.validation.core as v

    before = (tiny / VALIDATION_DIR / "summary.json").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(v, "_scatter", broken)
    small = ValidationSettings(per_point=1, group_sizes=(), workers=1, max_test_points=1,
                               finetune_per_point=0)
    with pytest.raises(RuntimeError, match="disk full"):
        validate(tiny, small, echo=quiet)
    assert (tiny / VALIDATION_DIR / "summary.json").read_text() == before
    assert not [p for p in tiny.iterdir() if p.name.startswith(f".{VALIDATION_DIR}")]
    monkeypatch.undo()
    summary = validate(tiny, small, echo=quiet)
    assert summary["group"] is None and summary["settings"]["per_point"] == 1
    assert summary["finetune"] is None and "finetune_pearson" not in [
        c["name"] for c in summary["checks"]]
    assert any("finetuning-data influence check was skipped" in n for n in summary["notes"])
    assert json.loads((tiny / VALIDATION_DIR / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (tiny / VALIDATION_DIR).iterdir()) == sorted(FILES)


def test_unknown_test_id_is_a_clear_error(tiny, capsys):
    with pytest.raises(ValidationError, match=r"unknown test id\(s\) \['nope'\]"):
        validate(tiny, ValidationSettings(test_points=["nope"], workers=1), echo=quiet)
    assert cli.main(["validate", str(tiny), "--test-points", "te-0000", "nope"]) == 2
    assert "unknown test id(s) ['nope']" in capsys.readouterr().err


def test_bad_noise_ids_and_settings(tiny, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("pre-0001\nnot-an-example\n")
    with pytest.raises(ValidationError, match="not-an-example"):
        validate(tiny, ValidationSettings(noise_ids=str(ids), workers=1), echo=quiet)
    with pytest.raises(ValidationError, match="does not exist"):
        validate(tiny, ValidationSettings(noise_ids=str(tmp_path / "missing.txt")), echo=quiet)
    with pytest.raises(ValidationError, match="--group-sizes"):
        validate(tiny, ValidationSettings(group_sizes=(160,), workers=1), echo=quiet)
    with pytest.raises(ValidationError, match="--per-point"):
        validate(tiny, ValidationSettings(per_point=0), echo=quiet)
    with pytest.raises(ValidationError, match="--finetune-per-point 60 must be below the 60"):
        validate(tiny, ValidationSettings(finetune_per_point=60, workers=1), echo=quiet)
    with pytest.raises(ValidationError, match="--finetune-per-point must be >= 0"):
        validate(tiny, ValidationSettings(finetune_per_point=-1), echo=quiet)


def test_run_without_model_arrays_is_a_clear_error(tmp_path, capsys):
    run = make_synthetic_run(tmp_path / "synthetic", n_pretrain=50, n_test=10, seed=1)
    with pytest.raises(ValidationError, match=r"stores no trained parameters \(model/\*\.npy\)"):
        validate(run, ValidationSettings(workers=1), echo=quiet)
    assert cli.main(["validate", str(run)]) == 2
    assert "stores no trained parameters" in capsys.readouterr().err
    assert not (run / VALIDATION_DIR).exists()


def test_worker_pool_matches_in_process(tiny):
    """Spawned workers rebuild the task from the run dir and give the same retrains."""
    run = artifacts.load_run(tiny)
    _, task, fit = task_from_run(run)
    settings = ValidationSettings(workers=2)
    jobs = [(3,), (7, 11)]
    pooled = run_retrains(jobs, run.path, task, fit, settings)
    local = run_retrains(jobs, run.path, task, fit, ValidationSettings(workers=1))
    for a, b in zip(pooled, local, strict=True):
        for key in ("backbone_pre", "w", "backbone_ft", "t"):
            np.testing.assert_allclose(a["params"][key], b["params"][key], rtol=0, atol=1e-9)


def test_worker_pool_never_runs_the_callers_main_script(tiny, tmp_path, monkeypatch):
    """Spawned workers do not re-run ``__main__`` (AppTest leaves a temporary page script there,
    which killed every worker at start-up in CI)."""
    script = tmp_path / "page.py"
    script.write_text("raise RuntimeError('the caller main script ran in a worker')\n")
    fake = types.ModuleType("__main__")
    fake.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", fake)
    run = artifacts.load_run(tiny)
    _, task, fit = task_from_run(run)
    jobs = [(5,), (9,)]   # two jobs: with one, the retrain runs in this process
    pooled = run_retrains(jobs, run.path, task, fit, ValidationSettings(workers=2))
    local = run_retrains(jobs, run.path, task, fit, ValidationSettings(workers=1))
    for a, b in zip(pooled, local, strict=True):
        np.testing.assert_allclose(a["params"]["t"], b["params"]["t"], atol=1e-9)
    assert sys.modules["__main__"] is fake   # restored after the pool


def test_updated_scenario_terms_on_worker_pool(tmp_path):
    """Updated scenario (backbone finetuned too), retrained by two spawned worker processes."""
    cfg = write_tiny_data(tmp_path / "data")
    run = make_run(cfg, tmp_path / "run", scenario="updated", echo=quiet)
    settings = ValidationSettings(max_test_points=2, per_point=3, group_sizes=(), workers=2)
    summary = validate(run, settings, echo=quiet)
    assert summary["settings"]["workers"] == 2 and summary["group"] is None
    loo = summary["loo"]
    # Measured (12 pairs): Pearson 0.89 total (sign agreement 0.92), 0.91 pretrained-model term,
    # 0.64 finetuned-model term (small, partly cancelling changes on this tiny problem).  The
    # thresholds catch a swapped or negated term (negative correlation), not round-off.
    assert loo["designated_pairs"]["pearson"] > 0.75
    assert loo["designated_pairs"]["sign_agreement"] >= 0.8
    assert loo["pretrained_term"]["pearson"] > 0.75 and loo["finetuned_term"]["pearson"] > 0.4
    assert summary["convergence"]["n_unconverged"] == 0


@pytest.mark.slow
def test_digits_sample_reduced_validation(tmp_path, sample_run):
    """Reduced validation of the digits sample (fixed scenario) on a copy of the sample run
    (built once per session, shared with the browser tests): ~2-6 min."""
    run = tmp_path / "run"
    shutil.copytree(sample_run, run)
    settings = ValidationSettings(max_test_points=2, per_point=2, group_sizes=(10,),
                                  random_draws=1, noise_ids=str(SAMPLE / "corrupted_ids.txt"))
    summary = validate(run, settings, echo=quiet)
    loo = summary["loo"]["designated_pairs"]
    # Measured (per_point 3): Pearson 0.996, sign agreement 100% on 12 pairs; k=10 harmful -0.284 vs
    # random +0.045 (the full default validation: README "Validation").
    assert loo["pearson"] > 0.8 and loo["sign_agreement"] >= 0.75
    k10 = summary["group"]["by_k"][0]
    assert k10["harmful"]["actual_change"] < k10["random"]["actual_change_min"]
    assert math.isfinite(summary["noise"]["methods"]["influence"]["auc"])


def test_source_groups_are_retrained_whole(tiny, monkeypatch):
    """--source-column: the most harmful label groups (recomputed here from the run's scores)
    are removed whole and retrained; the summary has predicted beside actual for each."""
    run = artifacts.load_run(tiny)
    summary = validate(tiny, ValidationSettings(
        per_point=1, group_sizes=(), workers=1, max_test_points=1, finetune_per_point=0,
        source_column="label", source_groups=2), echo=quiet)
    mis = np.flatnonzero(~run.test_points["correct"].to_numpy(dtype=bool))
    total = np.asarray(run.scores["total"], dtype=np.float64)[mis]
    labels = run.pretrain_examples["label"].astype(str).to_numpy()
    effect = {g: total[:, labels == g].sum(1).mean() for g in np.unique(labels)}
    expected = sorted((g for g in effect if effect[g] < 0), key=effect.get)[:2]
    sources = summary["group"]["sources"]
    assert [s["group"] for s in sources] == expected
    for s in sources:
        assert s["column"] == "label" and s["n_examples"] == int((labels == s["group"]).sum())
        assert s["predicted_change"] == pytest.approx(effect[s["group"]], rel=1e-6)
        assert np.isfinite(s["actual_change"])
    # The Overview's harmful-sources table shows them beside the predicted effects.
    from tests.apptest_pages import open_page

    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(Path(tiny).parent))
    at = open_page(None, {"run": Path(tiny).name})
    table = next(d.value for d in at.dataframe if "actual (validation retrain)" in d.value.columns)
    got = dict(zip(table["label"].astype(str), table["actual (validation retrain)"],
                   strict=True))
    names = artifacts.load_run(tiny).manifest["classes"]["pretrain"]
    for s in sources:
        assert got[str(names[int(s["group"])])] == pytest.approx(s["actual_change"])
    with pytest.raises(ValidationError, match="--source-column 'nope'"):
        validate(tiny, ValidationSettings(workers=1, source_column="nope"), echo=quiet)
