"""Tests for engine.data (table loading/validation), engine.config (TOML) and the sample data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.config import ConfigError, RunConfig, load_config
from engine.data import DataError, Table, check_same_features, load_run_data, load_table

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "sample_data" / "digits"
BYOD = ROOT / "sample_data" / "byod_example"

MINIMAL_DATA = """\
[data]
pretrain = "pre.csv"
finetune_train = "ft.csv"
finetune_test = "test.csv"
"""


# --- helpers ---------------------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str, name: str = "table.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path: Path, **kwargs) -> Table:
    args = dict(id_column="id", label_column="label", classes=[0, 1, 2],
                feature_columns=["a", "b"])
    args.update(kwargs)
    return load_table(path, **args)


def data_error(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load(path, **kwargs)
    return str(info.value)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text))
    return str(info.value)


# --- sample data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[RunConfig, Table, Table, Table]:
    cfg = load_config(DIGITS / "config.toml")
    return (cfg, *load_run_data(cfg))


def test_digits_config_has_documented_defaults(digits):
    cfg = digits[0]
    assert cfg.seed == 0 and cfg.dtype == "float64"
    assert cfg.data.pretrain == DIGITS / "pretrain.parquet"
    assert cfg.data.pretrain.is_absolute()
    assert cfg.data.feature_prefix == "px_" and cfg.data.feature_columns is None
    assert cfg.data.pretrain_classes == tuple(range(10))
    assert cfg.data.finetune_classes == ("even", "odd")
    assert cfg.data.metadata_columns == ("source",)
    assert cfg.data.text_column is None
    assert cfg.data.render == "image" and cfg.data.image_shape == (8, 8)
    assert cfg.model.hidden == (32,) and cfg.model.activation == "tanh"
    assert cfg.pretrain.weight_decay == 1e-2 and cfg.finetune.weight_decay == 1e-3
    assert cfg.finetune.scenario == "fixed" and cfg.finetune.alpha == 1.0
    assert cfg.influence.solver == "exact" and cfg.influence.test_points == "all"
    assert cfg.map.method == "umap"


def test_digits_tables(digits):
    _, pre, ft, test = digits
    assert (len(pre), len(ft), len(test)) == (1100, 150, 547)
    for table in (pre, ft, test):
        assert table.X.dtype == np.float64 and table.X.shape[1] == 64
        assert table.feature_columns == [f"px_{j}" for j in range(64)]
        assert table.X.min() >= 0.0 and table.X.max() <= 1.0
        assert table.y.dtype == np.int64
        assert len(set(table.ids.tolist())) == len(table)
    assert pre.ids[0] == "pre-0000" and ft.ids[-1] == "ft-149" and test.ids[-1] == "test-546"
    assert set(pre.y.tolist()) == set(range(10))
    assert ft.classes == ["even", "odd"] and set(test.y.tolist()) == {0, 1}
    assert list(pre.frame.columns) == ["example_id", "label", "source"]
    assert list(ft.frame.columns) == ["example_id", "label"]
    assert (pre.frame["source"] == "uci-digits").all()
    # The splits are disjoint images (the digits data has no exact duplicate images).
    rows = {tuple(r) for t in (pre, ft, test) for r in t.X}
    assert len(rows) == 1797


def test_corrupted_ids(digits):
    _, pre, _, _ = digits
    corrupted = (DIGITS / "corrupted_ids.txt").read_text().split()
    assert len(corrupted) == len(set(corrupted)) == 88
    assert set(corrupted) <= set(pre.ids.tolist())
    assert abs(len(corrupted) / len(pre) - 0.08) < 0.005
    # The original label must not leak into the pretraining file.
    columns = pd.read_parquet(DIGITS / "pretrain.parquet").columns
    assert not any("true" in c or "orig" in c or "clean" in c for c in columns)


def test_byod_example_loads():
    cfg = load_config(BYOD / "config.toml")
    assert cfg.data.feature_columns == ("x1", "x2") and cfg.data.feature_prefix is None
    assert cfg.data.render == "none"
    pre, ft, test = load_run_data(cfg)
    assert (len(pre), len(ft), len(test)) == (210, 60, 60)
    assert pre.classes == ["red", "green", "blue"]
    assert set(pre.frame["group"]) == {"site-a", "site-b"}
    assert pre.X.shape == (210, 2)


# --- load_table: happy paths -----------------------------------------------------------------


def test_csv_integer_labels_match_int_classes_and_ids_stay_text(tmp_path):
    path = write_csv(tmp_path, "id,label,a,b\n007,2,1.5,0\n8,0,2,1\n")
    table = load(path)
    assert table.ids.tolist() == ["007", "8"]
    assert table.y.tolist() == [2, 0]
    assert table.X.tolist() == [[1.5, 0.0], [2.0, 1.0]]


def test_string_labels_and_parquet_prefix(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({
        "key": [10, 11, 12], "f_1": [0.1, 0.2, 0.3], "other": ["x", "y", "z"],
        "f_0": [1, 2, 3], "y": ["odd", "even", "odd"], "txt": ["a", "b", "c"],
    }).to_parquet(path)
    table = load_table(path, id_column="key", label_column="y", classes=["even", "odd"],
                       feature_prefix="f_", metadata_columns=["other"], text_column="txt")
    assert table.feature_columns == ["f_1", "f_0"]  # file order
    assert table.ids.tolist() == ["10", "11", "12"]
    assert table.y.tolist() == [1, 0, 1]
    assert list(table.frame.columns) == ["key", "y", "other", "txt"]


def test_optional_labels(tmp_path):
    path = write_csv(tmp_path, "id,a,b\nr0,1,2\n")
    assert load(path, require_labels=False).y.tolist() == [-1]


# --- load_table: errors ----------------------------------------------------------------------


def test_missing_file(tmp_path):
    msg = data_error(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "not found" in msg


def test_bad_suffix(tmp_path):
    msg = data_error(write_csv(tmp_path, "id,label,a,b\n", name="table.xlsx"))
    assert "table.xlsx" in msg and ".parquet or .csv" in msg


def test_malformed_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    msg = data_error(path)
    assert "broken.parquet" in msg and "Parquet" in msg


def test_malformed_csv(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_bytes(b"id,label,a,b\n\xff\xfe,1,2,3\n")
    assert "broken.csv" in data_error(path)


def test_missing_columns(tmp_path):
    msg = data_error(write_csv(tmp_path, "id,label,a\nr0,1,2\n"), metadata_columns=["grp"])
    assert "table.csv" in msg and "'b'" in msg and "'grp'" in msg and "missing" in msg


def test_non_numeric_feature(tmp_path):
    msg = data_error(write_csv(tmp_path, "id,label,a,b\nr0,1,1,2\nr1,1,2,oops\n"))
    assert "table.csv" in msg and "'b'" in msg and "row 1" in msg and "'r1'" in msg
    assert "'oops'" in msg


@pytest.mark.parametrize("cell", ["", "nan", "inf"])
def test_nan_or_inf_feature(tmp_path, cell):
    msg = data_error(write_csv(tmp_path, f"id,label,a,b\nr0,1,1,2\nr1,1,{cell},2\n"))
    assert "table.csv" in msg and "'a'" in msg and "row 1" in msg and "'r1'" in msg


def test_label_outside_classes(tmp_path):
    msg = data_error(write_csv(tmp_path, "id,label,a,b\nr0,1,1,2\nr1,7,1,2\n"))
    assert "table.csv" in msg and "'label'" in msg and "row 1" in msg and "'r1'" in msg
    assert "7" in msg and "[0, 1, 2]" in msg


def test_string_label_outside_classes(tmp_path):
    msg = data_error(write_csv(tmp_path, "id,label,a,b\nr0,even,1,2\nr1,Odd,1,2\n"),
                     classes=["even", "odd"])
    assert "row 1" in msg and "'Odd'" in msg and "['even', 'odd']" in msg


def test_missing_label(tmp_path):
    msg = data_error(write_csv(tmp_path, "id,label,a,b\nr0,1,1,2\nr1,,1,2\n"))
    assert "row 1" in msg and "'r1'" in msg and "missing" in msg


def test_duplicate_ids(tmp_path):
    msg = data_error(write_csv(tmp_path, "id,label,a,b\nr0,1,1,2\nr1,1,1,2\nr0,0,1,2\n"))
    assert "table.csv" in msg and "'r0'" in msg and "row 0" in msg and "row 2" in msg


@pytest.mark.parametrize("text", ["", "id,label,a,b\n"])
def test_empty_file(tmp_path, text):
    msg = data_error(write_csv(tmp_path, text))
    assert "table.csv" in msg and "empty" in msg


def test_prefix_matches_nothing(tmp_path):
    msg = data_error(write_csv(tmp_path, "id,label,a,b\nr0,1,1,2\n"),
                     feature_columns=None, feature_prefix="px_")
    assert "table.csv" in msg and "'px_'" in msg


def test_needs_exactly_one_feature_selector(tmp_path):
    path = write_csv(tmp_path, "id,label,a,b\nr0,1,1,2\n")
    with pytest.raises(DataError, match="exactly one"):
        load(path, feature_prefix="a")


def test_mismatched_feature_columns(tmp_path):
    one = load(write_csv(tmp_path, "id,label,a,b\nr0,1,1,2\n", name="one.csv"))
    two = load(write_csv(tmp_path, "id,label,a,c\nr0,1,1,2\n", name="two.csv"),
               feature_columns=["a", "c"])
    with pytest.raises(DataError) as info:
        check_same_features(one, two)
    msg = str(info.value)
    assert "one.csv" in msg and "two.csv" in msg and "'b'" in msg and "'c'" in msg
    swapped = load(write_csv(tmp_path, "id,label,b,a\nr0,1,1,2\n", name="three.csv"),
                   feature_columns=["b", "a"])
    with pytest.raises(DataError, match="order"):
        check_same_features(one, swapped)
    check_same_features(one, one)


def test_run_data_checks_image_shape(tmp_path, digits):
    cfg = dataclasses.replace(digits[0], data=dataclasses.replace(digits[0].data,
                                                                  image_shape=(4, 4)))
    with pytest.raises(DataError, match="image_shape"):
        load_run_data(cfg)


# --- config ----------------------------------------------------------------------------------


def test_minimal_config_defaults_and_paths(tmp_path):
    cfg = load_config(write_config(tmp_path, MINIMAL_DATA))
    assert cfg.data.pretrain == (tmp_path / "pre.csv").resolve()
    assert cfg.finetune == dataclasses.replace(cfg.finetune)  # frozen, replace-friendly
    assert cfg.influence.batch_size == 512 and cfg.map.n_neighbors == 15
    as_dict = cfg.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["data"]["pretrain"] == str((tmp_path / "pre.csv").resolve())
    assert as_dict["data"]["pretrain_classes"] == list(range(10))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_overrides(tmp_path):
    cfg = load_config(write_config(tmp_path, MINIMAL_DATA))
    assert cfg.with_overrides() is cfg
    new = cfg.with_overrides(scenario="updated", alpha=0.5)
    assert (new.finetune.scenario, new.finetune.alpha) == ("updated", 0.5)
    assert new.finetune.weight_decay == cfg.finetune.weight_decay
    assert (cfg.finetune.scenario, cfg.finetune.alpha) == ("fixed", 1.0)
    with pytest.raises(ConfigError, match="scenario = 'foo' is not one of fixed, updated"):
        cfg.with_overrides(scenario="foo")
    with pytest.raises(ConfigError, match="alpha"):
        cfg.with_overrides(alpha=0.0)


def test_unknown_key(tmp_path):
    msg = config_error(tmp_path, MINIMAL_DATA + "[finetune]\nscenarioo = 'fixed'\n")
    assert "config.toml" in msg and "[finetune] scenarioo" in msg and "'scenario'" in msg


def test_unknown_top_level_key_and_section(tmp_path):
    assert "seeed" in config_error(tmp_path, "seeed = 1\n" + MINIMAL_DATA)
    msg = config_error(tmp_path, MINIMAL_DATA + "[optimizer]\nlr = 1\n")
    assert "unknown section [optimizer]" in msg


def test_bad_enum(tmp_path):
    msg = config_error(tmp_path, MINIMAL_DATA + "[finetune]\nscenario = 'foo'\n")
    assert msg.endswith("config.toml: [finetune] scenario = 'foo' is not one of fixed, updated")
    msg = config_error(tmp_path, MINIMAL_DATA + "[model]\nactivation = 'relu'\n")
    assert "[model] activation = 'relu'" in msg and "tanh, softplus, gelu, sigmoid" in msg


@pytest.mark.parametrize("alpha", ["0", "-1.0"])
def test_alpha_must_be_positive(tmp_path, alpha):
    msg = config_error(tmp_path, MINIMAL_DATA + f"[finetune]\nalpha = {alpha}\n")
    assert "[finetune] alpha" in msg and "> 0" in msg


def test_both_feature_selectors(tmp_path):
    msg = config_error(tmp_path, MINIMAL_DATA + "feature_prefix = 'px_'\nfeature_columns = ['a']\n")
    assert "feature_prefix" in msg and "feature_columns" in msg


@pytest.mark.parametrize("extra, where", [
    ("[pretrain]\nmax_iter = 'many'\n", "[pretrain] max_iter"),
    ("[pretrain]\nweight_decay = -1\n", "[pretrain] weight_decay"),
    ("[influence]\ntest_points = 'some'\n", "[influence] test_points"),
    ("[map]\nmin_dist = 2.0\n", "[map] min_dist"),
    ("seed = true\n", "seed"),
])
def test_wrong_types_and_ranges(tmp_path, extra, where):
    text = extra + MINIMAL_DATA if extra.startswith("seed") else MINIMAL_DATA + extra
    assert where in config_error(tmp_path, text)


def test_missing_data_path_and_bad_toml(tmp_path):
    assert "[data] finetune_test is required" in config_error(
        tmp_path, MINIMAL_DATA.replace('finetune_test = "test.csv"\n', ""))
    assert "not valid TOML" in config_error(tmp_path, "seed = = 1\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_test_point_ids_and_duplicate_classes(tmp_path):
    cfg = load_config(write_config(
        tmp_path, MINIMAL_DATA + "[influence]\ntest_points = ['t-1', 't-2']\n"))
    assert cfg.influence.test_points == ("t-1", "t-2")
    msg = config_error(tmp_path, MINIMAL_DATA + "pretrain_classes = [3, '3']\n")
    assert "[data] pretrain_classes" in msg and "more than once" in msg


def test_csv_row_with_extra_fields_is_not_silently_shifted(tmp_path):
    # pandas would otherwise turn the leading columns into the index and shift the rest.
    msg = data_error(write_csv(tmp_path, "id,label,a,b\nr0,1,1,2,5,6\nr1,1,1,2\n"))
    assert "table.csv" in msg and "more fields than the header" in msg
