"""The minus-flagged export is a usable dataset: a run trained on the exported file (as its
pretraining table) equals the run retrained with ``--exclude flagged_ids.txt``."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashboard.export import build_export, read_frame
from dashboard.export_features import LABEL_INDEX, SourceDataError, source_columns
from dashboard.flags import FlagStore
from engine import artifacts
from engine.ids_file import parse_ids_text
from engine.pipeline import run as engine_run


@pytest.fixture(scope="module")
def parent(small_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_runs") / "parent"
    return engine_run(small_config, out, echo=lambda s: None)


def _flag_worst(parent: Path, k: int = 7) -> tuple[FlagStore, list[str]]:
    r = artifacts.load_run(parent)
    worst = r.pretrain_examples.example_id.to_numpy()[np.argsort(r.scores["total"].sum(0))[:k]]
    store = FlagStore(parent.parent / "flags.sqlite")
    store.flag(r.run_id, worst.tolist(), "label noise")
    return store, sorted(worst.tolist())


def test_minus_flagged_export_trains_like_exclude(parent, small_config, tmp_path):
    store, worst = _flag_worst(parent)
    r = artifacts.load_run(parent)
    bundle = build_export(r, "minus-flagged", "parquet", store)
    with zipfile.ZipFile(io.BytesIO(bundle.zip_bytes())) as zf:
        assert sorted(parse_ids_text(zf.read("flagged_ids.txt").decode())) == worst
        kept = parse_ids_text(zf.read("kept_ids.txt").decode())
        data = read_frame(zf.read(bundle.data_name), "parquet")
    assert len(kept) == r.n_pretrain - len(worst) and not set(kept) & set(worst)
    source = pd.read_parquet(small_config.parent / "pre.parquet").set_index("example_id")
    features = [c for c in source.columns if c.startswith("px_")]
    np.testing.assert_array_equal(data.set_index("example_id").loc[kept, features].to_numpy(),
                                  source.loc[kept, features].to_numpy(dtype=float))
    assert (data["label"].to_numpy() == source.loc[data["example_id"], "label"]).all()
    assert (data[LABEL_INDEX] == data["label"]).all()   # digits: class index = label value

    # The export as the pretraining table of a config: same run as --exclude.
    exported = tmp_path / "minus.parquet"
    exported.write_bytes(bundle.data_bytes())
    text = small_config.read_text()
    cfg_dir = small_config.parent
    text = text.replace('"pre.parquet"', f'"{exported}"')
    for name in ("ft.parquet", "test.parquet"):
        text = text.replace(f'"{name}"', f'"{cfg_dir / name}"')
    config = tmp_path / "config.toml"
    config.write_text(text)
    from_export = artifacts.load_run(engine_run(config, tmp_path / "from-export",
                                                echo=lambda s: None))
    ids = tmp_path / "flagged_ids.txt"
    ids.write_text("\n".join(worst) + "\n")
    excluded = artifacts.load_run(engine_run(small_config, tmp_path / "excluded",
                                             exclude_ids=worst, echo=lambda s: None))
    assert list(from_export.pretrain_examples["example_id"]) == \
        list(excluded.pretrain_examples["example_id"])
    np.testing.assert_allclose(from_export.test_points["loss"], excluded.test_points["loss"],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(from_export.scores["total"], excluded.scores["total"],
                               rtol=1e-6, atol=1e-9)


def test_changed_source_file_is_refused_not_mixed(parent, small_config, tmp_path):
    r = artifacts.load_run(parent)
    source = small_config.parent / "pre.parquet"
    original = source.read_bytes()
    try:
        pd.read_parquet(source).iloc[:-1].to_parquet(source)
        with pytest.raises(SourceDataError, match="changed since run"):
            source_columns(r)
        store = FlagStore(tmp_path / "flags.sqlite")
        bundle = build_export(r, "flagged", "csv", store)
        assert bundle.manifest["features"].startswith("not included: ")
        assert not any(c.startswith("px_") for c in bundle.frame.columns)
    finally:
        source.write_bytes(original)
