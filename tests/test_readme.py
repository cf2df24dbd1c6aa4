"""The README's promises: its engine example runs, its bring-your-own-data command works."""

from __future__ import annotations

import re

from engine import artifacts
from engine.pipeline import run
from tests.conftest import ROOT


def test_engine_api_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Engine API"):text.index("## Run command and config")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md:engine-example", "exec"), namespace)
    scores = namespace["scores"]
    assert tuple(scores.total.shape) == (5, 200)
    assert namespace["fit"].pretrain.converged and namespace["fit"].finetune.converged


def test_bring_your_own_data_example(tmp_path):
    out = run(ROOT / "sample_data" / "byod_example" / "config.toml", tmp_path / "byod",
              echo=lambda s: None)
    r = artifacts.load_run(out)
    assert r.n_pretrain > 0 and r.n_test > 0
    assert "group" in r.pretrain_examples.columns
    assert r.manifest["render"] == {"kind": "none"}
