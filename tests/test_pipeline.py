"""The run command end to end on a reduced digits config, and the run-artifact loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import artifacts
from engine.cli import main as cli_main
from engine.pipeline import run
from tests.conftest import ROOT

DIGITS = ROOT / "sample_data" / "digits"


@pytest.fixture(scope="module")
def small_run(small_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "small"
    return run(small_config, out, echo=lambda s: None)


def test_run_writes_a_complete_consistent_run(small_run):
    r = artifacts.load_run(small_run)
    assert (r.n_test, r.n_pretrain) == (25, 150)
    m = r.manifest
    assert m["schema_version"] == artifacts.SCHEMA_VERSION
    assert m["stages"]["pretrain"]["converged"] and m["stages"]["finetune"]["converged"]
    assert m["stages"]["pretrain"]["solver"] == "exact"
    for key in ("config", "scenario", "metrics", "versions", "input_hashes", "timings",
                "score_convention", "classes", "render"):
        assert key in m
    np.testing.assert_allclose(r.scores["total"],
                               r.scores["pretrained_term"] + r.scores["finetuned_term"],
                               atol=1e-6)
    tp = r.test_points
    assert list(tp.test_id) == [f"test-{i:03d}" for i in range(25)]
    assert (tp.correct == (tp.label == tp.pred)).all()
    np.testing.assert_allclose(tp.prob_0 + tp.prob_1, 1.0, atol=1e-6)
    assert m["metrics"]["n_misclassified"] == int((~tp.correct).sum())
    assert len(r.pretrain_examples.pixels.iloc[0]) == 64
    assert r.pretrain_xy.shape == (150, 2)


def test_same_config_and_seed_give_the_same_scores(small_config, small_run, tmp_path):
    again = run(small_config, tmp_path / "again", echo=lambda s: None)
    a, b = artifacts.load_run(small_run), artifacts.load_run(again)
    for name in artifacts.SCORE_NAMES:
        np.testing.assert_array_equal(a.scores[name], b.scores[name])


def test_exclude_retrains_without_the_ids(small_config, small_run, tmp_path):
    r = artifacts.load_run(small_run)
    worst = r.pretrain_examples.example_id.to_numpy()[np.argsort(r.scores["total"].sum(0))[:5]]
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(worst) + "\n")
    out = tmp_path / "excl"
    assert cli_main(["run", str(small_config), "--out", str(out), "--exclude", str(ids)]) == 0
    ex = artifacts.load_run(out)
    assert ex.n_pretrain == 145
    assert not set(worst) & set(ex.pretrain_examples.example_id)
    assert ex.manifest["excluded_ids"] == list(worst)


def test_unknown_excluded_id_is_an_error(small_config, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("pre-0001\nno-such-id\n")
    assert cli_main(["run", str(small_config), "--out", str(tmp_path / "x"),
                     "--exclude", str(ids)]) == 2
    err = capsys.readouterr().err
    assert "no-such-id" in err and "not pretraining example ids" in err
    assert not (tmp_path / "x").exists()


def test_exclude_finetune_refits_without_them_as_their_scores_predict(small_config, small_run,
                                                                      tmp_path):
    """--exclude-finetune drops finetuning training examples (pretraining untouched); the
    actual change of every test loss follows the sum of their finetuning-data scores."""
    r = artifacts.load_run(small_run)
    worst = r.finetune_examples.example_id.to_numpy()[np.argsort(r.finetune_scores.sum(0))[:3]]
    ids = tmp_path / "ft_ids.txt"
    ids.write_text("\n".join(worst) + "\n")
    out = tmp_path / "ft_excl"
    assert cli_main(["run", str(small_config), "--out", str(out),
                     "--exclude-finetune", str(ids)]) == 0
    ex = artifacts.load_run(out)
    assert ex.n_pretrain == r.n_pretrain and ex.manifest["excluded_ids"] == []
    assert ex.manifest["excluded_finetune_ids"] == list(worst)
    assert len(ex.finetune_examples) == len(r.finetune_examples) - 3
    assert not set(worst) & set(ex.finetune_examples.example_id)
    np.testing.assert_allclose(artifacts.load_model_arrays(ex)["backbone_pre"],
                               artifacts.load_model_arrays(r)["backbone_pre"], atol=1e-8)
    cols = np.flatnonzero(np.isin(r.finetune_examples.example_id, worst))
    predicted = r.finetune_scores[:, cols].sum(1)
    actual = ex.test_points["loss"].to_numpy() - r.test_points["loss"].to_numpy()
    assert np.corrcoef(predicted, actual)[0, 1] > 0.9
    assert predicted.sum() < 0 and actual.sum() < 0   # the most harmful ones, overall


def test_unknown_excluded_finetune_id_is_an_error(small_config, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("pre-0001\n")
    assert cli_main(["run", str(small_config), "--out", str(tmp_path / "x"),
                     "--exclude-finetune", str(ids)]) == 2
    err = capsys.readouterr().err
    assert "pre-0001" in err and "not finetuning training example ids" in err
    assert not (tmp_path / "x").exists()


def test_existing_output_is_not_overwritten_without_flag(small_config, small_run):
    with pytest.raises(artifacts.RunError, match="already exists"):
        run(small_config, small_run, echo=lambda s: None)


def test_updated_scenario_override(small_config, tmp_path):
    out = run(small_config, tmp_path / "upd", scenario="updated", alpha=3.0, echo=lambda s: None)
    m = artifacts.read_manifest(out)
    assert m["scenario"] == "updated" and m["alpha"] == 3.0


# ---- the loader refuses partial, corrupted or mixed runs --------------------------------

@pytest.fixture
def copy_run(small_run, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(small_run, dst)
    return dst


def test_truncated_score_file_is_rejected(copy_run):
    f = copy_run / "scores" / "total.npy"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(artifacts.RunError, match="does not match the hash"):
        artifacts.load_run(copy_run)


def test_missing_file_is_rejected(copy_run):
    (copy_run / "map" / "test_xy.npy").unlink()
    with pytest.raises(artifacts.RunError, match="missing map/test_xy.npy"):
        artifacts.load_run(copy_run)


def test_mixed_runs_are_rejected(copy_run, small_config, tmp_path):
    other = run(small_config, tmp_path / "other", scenario="updated", echo=lambda s: None)
    shutil.copy(other / "scores" / "finetuned_term.npy", copy_run / "scores")
    with pytest.raises(artifacts.RunError, match="mixed"):
        artifacts.load_run(copy_run)


def test_partial_run_without_manifest_is_rejected(copy_run):
    (copy_run / "manifest.json").unlink()
    with pytest.raises(artifacts.RunError, match="partial"):
        artifacts.load_run(copy_run)


def test_incompatible_schema_version_is_rejected(copy_run):
    mpath = copy_run / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = 999
    mpath.write_text(json.dumps(m))
    with pytest.raises(artifacts.RunError, match="schema version 999"):
        artifacts.load_run(copy_run)


def test_shape_mismatch_between_tables_and_scores_is_rejected(copy_run):
    m = json.loads((copy_run / "manifest.json").read_text())
    df = pd.read_parquet(copy_run / "test_points.parquet").iloc[:-1]
    df.to_parquet(copy_run / "test_points.parquet")
    m["files"]["test_points.parquet"] = artifacts.sha256_file(copy_run / "test_points.parquet")
    (copy_run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(artifacts.RunError, match="manifest says"):
        artifacts.load_run(copy_run)


def test_crash_while_writing_leaves_no_run(small_run, tmp_path, monkeypatch):
    r = artifacts.load_run(small_run)
    calls = {"n": 0}
    real_save = np.save

    def failing_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(*a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    out = tmp_path / "crashed"
    with pytest.raises(OSError, match="disk full"):
        artifacts.write_run(out, {"config": {}}, r.test_points, r.pretrain_examples,
                            {n: np.asarray(r.scores[n]) for n in artifacts.SCORE_NAMES},
                            np.asarray(r.pretrain_xy), np.asarray(r.test_xy))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []   # no temporary directory left behind


def test_failed_overwrite_keeps_the_old_run(copy_run, monkeypatch):
    r = artifacts.load_run(copy_run)
    before = (copy_run / "manifest.json").read_text()
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        artifacts.write_run(copy_run, {"config": {}}, r.test_points, r.pretrain_examples,
                            {n: np.asarray(r.scores[n]) for n in artifacts.SCORE_NAMES},
                            np.asarray(r.pretrain_xy), np.asarray(r.test_xy), overwrite=True)
    assert (copy_run / "manifest.json").read_text() == before
    artifacts.load_run(copy_run)


def test_missing_run_directory_message(tmp_path):
    with pytest.raises(artifacts.RunError, match="python -m engine run"):
        artifacts.load_run(tmp_path / "nope")


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[finetune]\nscenario = 'frozen'\n")
    assert cli_main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


def test_verify_command(small_run, capsys):
    assert cli_main(["verify", str(small_run)]) == 0
    assert "complete and intact" in capsys.readouterr().out


# ---- finetuning-data influence (engine.finetune_influence) in the run ---------------------

def test_run_scores_the_finetuning_examples(small_config, small_run):
    import torch

    from engine.finetune_influence import FINETUNE_SCORE_CONVENTION, finetune_influence
    from engine.pipeline import task_from_run
    from engine.validation.finetune_check import run_arguments

    r = artifacts.load_run(small_run)   # verifies every listed hash
    m = r.manifest
    for name in (artifacts.FINETUNE_SCORES_FILE, artifacts.FINETUNE_TABLE):
        assert m["files"][name] == artifacts.sha256_file(small_run / name)
    scores, table = r.finetune_scores, r.finetune_examples
    assert scores.dtype == np.float32 and scores.shape == (25, 40) and np.isfinite(scores).all()
    ft = pd.read_parquet(small_config.parent / "ft.parquet")
    assert table["example_id"].tolist() == ft["example_id"].astype(str).tolist()
    assert {"label", "pred", "correct", "finetune_loss", "pixels"} <= set(table.columns)
    assert len(table["pixels"].iloc[0]) == 64
    section = m["finetune_influence"]
    assert section["shape"] == [25, 40] and section["score_convention"] == \
        FINETUNE_SCORE_CONVENTION
    assert section["settings"]["solver"] == "exact" and section["settings"]["n_finetune"] == 40
    assert m["timings"]["finetune_influence"] >= 0
    # The stored scores are the formula at the stored parameters, rows = test_points.parquet.
    data, task, fit = task_from_run(r)
    assert list(r.test_points["test_id"]) == data.finetune_test.ids.astype(str).tolist()
    x = torch.as_tensor(data.inputs(data.finetune_test), dtype=task.dtype)
    y = torch.as_tensor(data.finetune_test.y)
    want = finetune_influence(task, fit, x, y, run_arguments(data.cfg)).numpy()
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_finetune_influence_false_skips_the_step(small_config, tmp_path):
    from engine.config import ConfigError, load_config

    text = small_config.read_text()
    assert "finetune_influence = true" in text   # listed in the sample config at its default
    off = small_config.parent / "no_finetune_influence.toml"
    off.write_text(text.replace("finetune_influence = true", "finetune_influence = false"))
    assert load_config(off).influence.finetune_influence is False
    assert load_config(small_config).influence.finetune_influence is True
    bad = small_config.parent / "bad_finetune_influence.toml"
    bad.write_text(text.replace("finetune_influence = true", 'finetune_influence = "yes"'))
    with pytest.raises(ConfigError, match=r"\[influence\] finetune_influence"):
        load_config(bad)
    progress = tmp_path / "progress.jsonl"
    out = run(off, tmp_path / "off", echo=lambda s: None, progress_file=progress)
    r = artifacts.load_run(out)
    assert r.finetune_scores is None and r.finetune_examples is None
    assert "finetune_influence" not in r.manifest and "finetune_influence" not in \
        r.manifest["timings"]
    assert not (out / artifacts.FINETUNE_SCORES_FILE).exists()
    assert not (out / artifacts.FINETUNE_TABLE).exists()
    phases = [json.loads(line)["phase"] for line in progress.read_text().splitlines()]
    assert "finetune_influence" not in phases and phases[-1] == "done"


def test_finetune_files_are_checked_like_the_others(copy_run):
    mpath = copy_run / "manifest.json"
    m = json.loads(mpath.read_text())
    # A table of other examples (fewer rows): the shapes no longer match.
    table = pd.read_parquet(copy_run / artifacts.FINETUNE_TABLE).iloc[:-1]
    table.to_parquet(copy_run / artifacts.FINETUNE_TABLE)
    m["files"][artifacts.FINETUNE_TABLE] = artifacts.sha256_file(
        copy_run / artifacts.FINETUNE_TABLE)
    mpath.write_text(json.dumps(m))
    with pytest.raises(artifacts.RunError, match="finetune_scores.npy has shape"):
        artifacts.load_run(copy_run)
    # One of the two files listed without the other: a damaged manifest.
    del m["files"][artifacts.FINETUNE_TABLE]
    mpath.write_text(json.dumps(m))
    with pytest.raises(artifacts.RunError, match="lists finetune_scores.npy without"):
        artifacts.load_run(copy_run)
    # Neither listed (nor the section): copies left in the folder are not part of the run.
    del m["files"][artifacts.FINETUNE_SCORES_FILE], m["finetune_influence"]
    mpath.write_text(json.dumps(m))
    r = artifacts.load_run(copy_run)
    assert r.finetune_scores is None and r.finetune_examples is None
