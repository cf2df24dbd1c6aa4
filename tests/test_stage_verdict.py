"""The per-point verdict "pretraining vs finetuning data": closed forms on hand-made rows, and
on a real run against the two retrains it predicts (``--exclude`` / ``--exclude-finetune``)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import artifacts
from engine.pipeline import run
from engine.stage_verdict import dominant_stage, predicted_fix, stage_verdict, stage_verdicts


def test_predicted_fix_sums_the_k_most_negative_scores_only():
    row = np.array([0.3, -0.5, -0.1, 0.0, -0.2, 0.9])
    assert predicted_fix(row, 2) == pytest.approx(-0.7)
    assert predicted_fix(row, 10) == pytest.approx(-0.8)   # k beyond the pool: all negatives
    assert predicted_fix(np.array([0.2, 0.1]), 1) == 0.0      # nothing harmful: no fix
    assert predicted_fix(row, 0) == 0.0


def test_dominant_stage_and_sentence():
    assert dominant_stage(-0.9, -0.1) == "pretraining"
    assert dominant_stage(-0.1, -0.9) == "finetuning"
    assert dominant_stage(-0.5, -0.4) == "both"
    assert dominant_stage(0.0, 0.0) == "neither"
    v = stage_verdict(np.array([-0.3, -0.1, 0.2]), np.array([-1.2, 0.4]), k=2)
    assert (v.pretrain_fix, v.finetune_fix, v.stage) == (pytest.approx(-0.4),
                                                          pytest.approx(-1.2), "finetuning")
    assert v.pretrain_share == pytest.approx(0.25)
    assert "mostly the finetuning data (75%" in v.sentence()
    table = stage_verdicts(np.array([[-0.3, -0.1, 0.2], [0.1, 0.1, 0.1]]),
                           np.array([[-1.2, 0.4], [0.2, 0.3]]), np.array([1, 0]), k=2)
    assert table["stage"].tolist() == ["neither", "finetuning"]
    assert table["row"].tolist() == [1, 0]


def test_verdict_fixes_match_the_two_retrains_it_predicts(small_config, tmp_path):
    """On the test point with the highest loss, remove its k most harmful pretraining examples
    (both stages retrained) and, separately, its k most harmful finetuning examples
    (finetuning retrained): each actual loss change has the sign of its predicted fix, and the
    stage the verdict names is the one whose removal lowered the loss more."""
    parent = artifacts.load_run(run(small_config, tmp_path / "p", echo=lambda s: None))
    t = int(parent.test_points["loss"].to_numpy().argmax())
    k = 3
    v = stage_verdict(parent.scores["total"][t], parent.finetune_scores[t], k)
    assert v.pretrain_fix < 0 and v.finetune_fix < 0
    worst_pre = parent.pretrain_examples.example_id.to_numpy()[
        np.argsort(parent.scores["total"][t])[:k]]
    worst_ft = parent.finetune_examples.example_id.to_numpy()[
        np.argsort(parent.finetune_scores[t])[:k]]
    no_pre = artifacts.load_run(run(small_config, tmp_path / "a", exclude_ids=list(worst_pre),
                                    echo=lambda s: None))
    no_ft = artifacts.load_run(run(small_config, tmp_path / "b",
                                   exclude_finetune_ids=list(worst_ft), echo=lambda s: None))
    loss = float(parent.test_points["loss"].iloc[t])
    actual_pre = float(no_pre.test_points["loss"].iloc[t]) - loss
    actual_ft = float(no_ft.test_points["loss"].iloc[t]) - loss
    assert actual_pre < 0 and actual_ft < 0
    assert (actual_pre < actual_ft) == (v.pretrain_fix < v.finetune_fix)
    # First order: each within a factor of 3 of what was predicted.
    for actual, predicted in ((actual_pre, v.pretrain_fix), (actual_ft, v.finetune_fix)):
        assert 1 / 3 < actual / predicted < 3
