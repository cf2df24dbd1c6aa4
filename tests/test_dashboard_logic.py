"""Pure-function tests of the dashboard: filters, aggregations, flag store, exports, helpers."""

from __future__ import annotations

import io
import json
import multiprocessing
import sqlite3
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.make_synthetic_run import make_synthetic_run
from dashboard import export as export_mod
from dashboard.charts import selected_example_ids
from dashboard.convention import SCORE_CONVENTION
from dashboard.export import build_export, read_frame
from dashboard.filters import (
    FilterSpec,
    aggregate_by_group,
    apply_filters,
    example_table,
    map_sample,
    mean_influence,
    most_harmful,
    most_helpful,
    score_frame,
)
from dashboard.flags import FlagStore, flag_store_path
from dashboard.run_details import misclassified_rows
from dashboard.runs_dir import resolve_runs_dir, run_names
from dashboard.test_point_list import list_test_points
from dashboard.thumbnails import pixels_to_uint8, png_bytes, png_data_uri
from engine.artifacts import load_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_synthetic_run(root / "img", n_pretrain=300, n_test=40, seed=1)
    make_synthetic_run(root / "txt", n_pretrain=120, n_test=10, seed=2, render="text")
    return root


@pytest.fixture(scope="module")
def run(runs):
    return load_run(runs / "img")


@pytest.fixture(scope="module")
def text_run(runs):
    return load_run(runs / "txt")


@pytest.fixture(scope="module")
def examples(run):
    return example_table(run)


@pytest.fixture()
def frame(run, examples):
    """Scores of test point 3 with three examples flagged."""
    return score_frame(examples, run.scores, 3, {"p000001", "p000005", "p000007"})


# --- frames and filters ---------------------------------------------------------------------

def test_score_frame_reads_one_row_of_each_matrix(run, frame):
    assert len(frame) == run.n_pretrain
    np.testing.assert_array_equal(frame["total"], run.scores["total"][3])
    np.testing.assert_array_equal(frame["pretrained_term"], run.scores["pretrained_term"][3])
    np.testing.assert_allclose(frame["total"], frame["pretrained_term"] + frame["finetuned_term"],
                               rtol=1e-5, atol=1e-9)
    assert frame["flagged"].sum() == 3
    assert not run.scores["total"].flags.writeable  # memmaps stay read-only


def test_no_filter_keeps_everything_sorted(frame):
    out = apply_filters(frame, FilterSpec(top_k=None))
    assert len(out) == len(frame)
    assert out["total"].is_monotonic_decreasing


@pytest.mark.parametrize("sign,op", [("helpful", np.greater), ("harmful", np.less)])
def test_sign_filter(frame, sign, op):
    out = apply_filters(frame, FilterSpec(sign=sign, top_k=None))
    assert len(out) == int(op(frame["total"], 0).sum())
    assert op(out["total"], 0).all()


def test_top_k_per_sign_matches_reference(frame):
    out = apply_filters(frame, FilterSpec(sign="both", top_k=7))
    ref_pos = frame[frame["total"] > 0].sort_values("total", ascending=False).head(7)
    ref_neg = frame[frame["total"] < 0].sort_values("total").head(7)
    assert set(out["example_id"]) == set(ref_pos["example_id"]) | set(ref_neg["example_id"])
    assert len(out) == 14 and out["total"].is_monotonic_decreasing
    harmful = apply_filters(frame, FilterSpec(sign="harmful", top_k=5))
    assert list(harmful["example_id"]) == list(ref_neg["example_id"][:5])  # most harmful first


def test_label_filter(frame):
    out = apply_filters(frame, FilterSpec(labels=(2, 5), top_k=None))
    assert set(out["label"]) <= {2, 5}
    assert len(out) == int(frame["label"].isin([2, 5]).sum())


def test_group_filter(frame):
    out = apply_filters(frame, FilterSpec(group_column="source", groups=("flipped",), top_k=None))
    assert len(out) == int((frame["source"] == "flipped").sum()) > 0
    assert (out["source"] == "flipped").all()
    with pytest.raises(ValueError):
        apply_filters(frame, FilterSpec(group_column="nope", groups=("x",)))


def test_score_range_is_inclusive(frame):
    lo, hi = np.quantile(frame["total"], [0.25, 0.75])
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    out = apply_filters(frame, FilterSpec(score_min=lo, score_max=hi, top_k=None))
    ref = frame[(frame["total"] >= lo) & (frame["total"] <= hi)]
    assert len(out) == len(ref) > 0
    assert set(out["example_id"]) == set(ref["example_id"])


@pytest.mark.parametrize("term", ["pretrained", "finetuned"])
def test_dominant_term_filter(frame, term):
    out = apply_filters(frame, FilterSpec(dominant_term=term, top_k=None))
    pre, ft = out["pretrained_term"].abs(), out["finetuned_term"].abs()
    assert ((pre >= ft) if term == "pretrained" else (ft > pre)).all()
    other = apply_filters(frame, FilterSpec(
        dominant_term="finetuned" if term == "pretrained" else "pretrained", top_k=None))
    assert len(out) + len(other) == len(frame)


def test_flag_status_filter(frame):
    flagged = apply_filters(frame, FilterSpec(flag_status="flagged", top_k=None))
    assert set(flagged["example_id"]) == {"p000001", "p000005", "p000007"}
    unflagged = apply_filters(frame, FilterSpec(flag_status="unflagged", top_k=None))
    assert len(unflagged) == len(frame) - 3 and not unflagged["flagged"].any()


def test_text_search(text_run):
    frame = score_frame(example_table(text_run), text_run.scores, 0)
    word = frame["text"].iloc[0].split()[0].upper()  # case-insensitive
    out = apply_filters(frame, FilterSpec(text_query=word, top_k=None))
    assert len(out) == int(frame["text"].str.contains(word.lower(), regex=False).sum()) > 0


def test_search_without_text_matches_ids(frame):
    out = apply_filters(frame, FilterSpec(text_query="P00001", top_k=None))
    assert set(out["example_id"]) == {f"p0000{i}" for i in range(10, 20)}


def test_map_selection_filter(frame):
    ids = ("p000010", "p000020", "p000030")
    out = apply_filters(frame, FilterSpec(selected_ids=ids, top_k=None))
    assert set(out["example_id"]) == set(ids)
    assert apply_filters(frame, FilterSpec(selected_ids=(), top_k=None)).empty


def test_filters_combine(frame):
    spec = FilterSpec(sign="harmful", top_k=3, group_column="source", groups=("flipped",))
    out = apply_filters(frame, spec)
    ref = frame[(frame["total"] < 0) & (frame["source"] == "flipped")].nsmallest(3, "total")
    assert list(out["example_id"]) == list(ref["example_id"])


def test_filter_spec_validation_and_round_trip():
    spec = FilterSpec(sign="helpful", top_k=5, labels=(1,), group_column="source",
                      groups=("a",), score_min=-1.0, selected_ids=("x",))
    assert FilterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for bad in (dict(sign="up"), dict(top_k=0), dict(dominant_term="x"), dict(flag_status="x")):
        with pytest.raises(ValueError):
            FilterSpec(**bad)


def test_without_scores_score_filters_are_ignored(examples):
    base = examples.assign(flagged=examples["example_id"].isin({"p000002"}))
    out = apply_filters(base, FilterSpec(sign="helpful", top_k=3, flag_status="flagged"))
    assert list(out["example_id"]) == ["p000002"]


# --- aggregations ---------------------------------------------------------------------------

def test_aggregate_by_group_hand_computed():
    influence = pd.DataFrame({
        "example_id": ["a", "b", "c", "d", "e"],
        "label": [0, 0, 1, 1, 1],
        "label_name": ["zero", "zero", "one", "one", "one"],
        "source": ["x", "y", "x", "x", "y"],
        "total": [1.0, -3.0, 2.0, 0.5, -0.5],
        "pretrained_term": [0.5, -1.0, 1.0, 0.5, 0.0],
        "finetuned_term": [0.5, -2.0, 1.0, 0.0, -0.5],
    })
    by_label = aggregate_by_group(influence, "label").set_index("label")
    assert by_label.loc[0, "total"] == -2.0 and by_label.loc[1, "total"] == 2.0
    assert by_label.loc[0, "n_examples"] == 2 and by_label.loc[1, "n_examples"] == 3
    assert by_label.loc[1, "total_per_example"] == pytest.approx(2.0 / 3)
    assert by_label.loc[0, "pretrained_term"] == -0.5 and by_label.loc[1, "finetuned_term"] == 0.5
    assert (by_label.loc[1, "n_helpful"], by_label.loc[1, "n_harmful"]) == (2, 1)
    assert by_label.loc[0, "label_name"] == "zero"
    by_source = aggregate_by_group(influence, "source").set_index("source")
    assert by_source.loc["x", "total"] == 3.5 and by_source.loc["y", "total"] == -3.5


def test_mean_influence_and_group_sums_match_pandas_reference(run, examples):
    rows = misclassified_rows(run)
    assert len(rows) > 0
    inf = mean_influence(examples, run.scores, rows, chunk=3)
    total = np.asarray(run.scores["total"])[rows]
    np.testing.assert_allclose(inf["total"], total.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(inf["finetuned_term"],
                               np.asarray(run.scores["finetuned_term"])[rows].mean(axis=0),
                               rtol=1e-5)
    np.testing.assert_array_equal(inf["n_harmed"], (total < 0).sum(axis=0))
    np.testing.assert_array_equal(inf["n_helped"], (total > 0).sum(axis=0))
    # Reference: long-format pandas groupby of every (test point, example) score.
    long = pd.DataFrame(total, columns=run.pretrain_examples["source"]).T
    ref = long.groupby(level=0).sum().mean(axis=1)
    agg = aggregate_by_group(inf, "source").set_index("source")["total"]
    np.testing.assert_allclose(agg.loc[ref.index], ref, rtol=1e-5)


def test_false_transfer_rankings(run, examples):
    inf = mean_influence(examples, run.scores, misclassified_rows(run))
    harm = most_harmful(inf, 5)
    help_ = most_helpful(inf, 5)
    order = np.argsort(inf["total"].to_numpy())
    assert list(harm["example_id"]) == list(inf["example_id"].iloc[order[:5]])
    assert list(help_["example_id"]) == list(inf["example_id"].iloc[order[::-1][:5]])
    # The generator plants flipped labels that harm misclassified points.
    assert (harm["source"] == "flipped").all()


def test_map_sample_keeps_top_and_is_deterministic(frame):
    sample = map_sample(frame, n_top=20, n_random=30, seed=4)
    assert len(sample) == 50
    top = frame.loc[frame["total"].abs().nlargest(20).index, "example_id"]
    assert set(top) <= set(sample["example_id"])
    assert sample.equals(map_sample(frame, n_top=20, n_random=30, seed=4))
    assert len(map_sample(frame, n_top=1000, n_random=10)) == len(frame)


def test_list_test_points(run):
    tp = run.test_points
    listing = list_test_points(tp)
    n_mis = int((~tp["correct"]).sum())
    assert not listing["correct"].iloc[:n_mis].any() and listing["correct"].iloc[n_mis:].all()
    assert listing["loss"].iloc[:n_mis].is_monotonic_decreasing
    mis = list_test_points(tp, "misclassified", sort_by="confidence")
    assert len(mis) == n_mis and mis["confidence"].is_monotonic_decreasing
    odd_as_even = list_test_points(tp, true_labels=[1], pred_labels=[0])
    assert ((odd_as_even["label"] == 1) & (odd_as_even["pred"] == 0)).all()
    assert list(list_test_points(tp, misclassified_first=False)["loss"]) == \
        sorted(tp["loss"], reverse=True)
    assert (listing["row"].map(lambda r: tp["test_id"].iloc[r]) == listing["test_id"]).all()


# --- flag store -----------------------------------------------------------------------------

def test_flag_store_round_trip(tmp_path):
    store = FlagStore(tmp_path / "flags.sqlite")
    assert store.flagged_ids("r1") == set() and not store.path.exists()  # reads create nothing
    assert store.flag("r1", ["a", "b", "a"], "label noise", "n", "ann", "t1") == 2
    store.flag("r2", ["a"], "duplicate")
    assert store.flagged_ids("r1") == {"a", "b"} and store.flagged_ids("r2") == {"a"}
    # A fresh store object (as after a restart) sees the same flags.
    again = FlagStore(tmp_path / "flags.sqlite")
    flags = again.flags("r1").set_index("example_id")
    assert flags.loc["a", "reason"] == "label noise" and flags.loc["a", "user"] == "ann"
    assert flags.loc["a", "test_id"] == "t1" and flags.loc["a", "note"] == "n"
    again.flag("r1", ["a", "c"], "other", overwrite=False)  # keeps a's first reason
    assert again.flags("r1").set_index("example_id").loc["a", "reason"] == "label noise"
    again.flag("r1", ["a"], "off-task")  # overwrite
    assert again.flags("r1").set_index("example_id").loc["a", "reason"] == "off-task"
    assert again.unflag("r1", ["a", "zzz"]) == 1
    assert again.flagged_ids("r1") == {"b", "c"}
    history = again.history("r1")
    assert list(history["action"]).count("unflag") == 2 and len(history) == 7
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError):
        store.flag("r1", ["x"], "because")


def test_flag_store_path_is_beside_the_run(tmp_path):
    assert flag_store_path(tmp_path / "runs" / "digits") == tmp_path / "runs" / "flags.sqlite"


def _flag_many(path: str, prefix: str, n: int) -> None:
    store = FlagStore(path)
    for i in range(n):  # one connection / transaction per flag: maximal contention
        store.flag("run", [f"{prefix}{i}"], "label noise", user=prefix)


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "flags.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_flag_many, args=(path, p, 150)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ids = FlagStore(path).flagged_ids("run")
    assert ids == {f"{p}{i}" for p in "ab" for i in range(150)}
    assert len(FlagStore(path).history("run")) == 300


def test_flag_waits_for_a_writer_on_a_file_not_yet_in_wal_mode(tmp_path):
    """Switching a fresh file to WAL while another connection is writing fails at once in
    SQLite (no busy wait); the flag must wait for the writer instead of failing."""
    path = tmp_path / "flags.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    FlagStore(path).flag("run", ["e1"], "label noise", user="u")
    release.join()
    assert FlagStore(path).flagged_ids("run") == {"e1"}
    FlagStore(path).flag("run", ["e2"], "label noise", user="u")   # the next write switches
    other.close()
    fresh = sqlite3.connect(path)
    assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    fresh.close()


# --- exports --------------------------------------------------------------------------------

@pytest.fixture()
def store(tmp_path, run):
    store = FlagStore(tmp_path / "flags.sqlite")
    store.flag(run.run_id, ["p000003", "p000004", "p000100"], "label noise", "x", "ann", "t00002")
    return store


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_view_export_rows_equal_the_filtered_view(run, examples, store, fmt):
    spec = FilterSpec(sign="both", top_k=9, group_column="source", groups=("original",))
    test_id = run.test_points["test_id"].iloc[5]
    view = apply_filters(score_frame(examples, run.scores, 5, store.flagged_ids(run.run_id)), spec)
    bundle = build_export(run, "view", fmt, store, spec, test_id)
    data = read_frame(bundle.data_bytes(), fmt)
    assert len(data) == len(view) == bundle.manifest["counts"]["rows"]
    assert list(data["example_id"].astype(str)) == list(view["example_id"])
    np.testing.assert_allclose(data["total"], view["total"], rtol=1e-6)
    assert {"flagged", "flag_reason", "pretrained_term", "finetuned_term"} <= set(data.columns)
    assert bundle.ids_text().splitlines() == list(view["example_id"])
    m = bundle.manifest
    assert m["run_id"] == run.run_id and m["test_id"] == test_id
    assert m["filters"] == spec.to_dict() and m["score_convention"] == SCORE_CONVENTION
    assert m["counts"]["n_helpful"] + m["counts"]["n_harmful"] == len(view)
    with zipfile.ZipFile(io.BytesIO(bundle.zip_bytes())) as zf:
        assert set(zf.namelist()) == {bundle.data_name, "manifest.json", "view_ids.txt"}
        assert json.loads(zf.read("manifest.json"))["counts"]["rows"] == len(view)
        assert zf.read("view_ids.txt").decode() == bundle.ids_text()
        assert len(read_frame(zf.read(bundle.data_name), fmt)) == len(view)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_flagged_and_minus_flagged_exports(run, store, fmt):
    flagged = build_export(run, "flagged", fmt, store)
    data = read_frame(flagged.data_bytes(), fmt)
    assert set(data["example_id"].astype(str)) == {"p000003", "p000004", "p000100"}
    assert (data["flag_reason"] == "label noise").all() and "total" not in data.columns
    assert flagged.ids_text() == "p000003\np000004\np000100\n"
    minus = build_export(run, "minus-flagged", fmt, store, test_id="t00001")
    rest = read_frame(minus.data_bytes(), fmt)
    assert len(rest) == run.n_pretrain - 3 == minus.manifest["counts"]["rows"]
    assert set(rest["example_id"].astype(str)) == \
        set(run.pretrain_examples["example_id"]) - {"p000003", "p000004", "p000100"}
    assert "total" in rest.columns and not rest["flagged"].any()
    assert minus.manifest["counts"]["n_excluded"] == 3
    with zipfile.ZipFile(io.BytesIO(minus.zip_bytes())) as zf:
        assert zf.read("flagged_ids.txt").decode().split() == ["p000003", "p000004", "p000100"]
        assert zf.read("kept_ids.txt").decode() == minus.ids_text()


def test_export_errors(run, store):
    with pytest.raises(ValueError):
        build_export(run, "view", "csv", store)  # view needs a test point
    with pytest.raises(KeyError):
        build_export(run, "view", "csv", store, FilterSpec(), "no-such-test")
    with pytest.raises(ValueError):
        build_export(run, "everything", "csv", store)


def test_export_cli(runs, run, store, tmp_path, capsys):
    out = tmp_path / "out" / "view.csv"
    rc = export_mod.main([str(runs / "img"), "--what", "view", "--format", "csv", "--out",
                          str(out), "--test-id", "t00004", "--sign", "harmful", "--top-k", "6",
                          "--flags-db", str(store.path)])
    assert rc == 0
    data = pd.read_csv(out)
    assert len(data) == 6 and (data["total"] < 0).all()
    ids = (tmp_path / "out" / "view.csv.view_ids.txt").read_text().split()
    assert ids == list(data["example_id"])
    manifest = json.loads((tmp_path / "out" / "view.csv.manifest.json").read_text())
    assert manifest["filters"]["sign"] == "harmful" and manifest["counts"]["rows"] == 6
    zpath = tmp_path / "flagged.zip"
    assert export_mod.main([str(runs / "img"), "--what", "flagged", "--format", "parquet",
                            "--out", str(zpath), "--flags-db", str(store.path)]) == 0
    with zipfile.ZipFile(zpath) as zf:
        assert zf.read("flagged_ids.txt").decode().split() == ["p000003", "p000004", "p000100"]
    assert export_mod.main([str(runs / "img"), "--what", "view", "--out", str(out),
                            "--test-id", "nope"]) == 2
    assert "not in run" in capsys.readouterr().err


# --- small helpers --------------------------------------------------------------------------

def test_png_thumbnails():
    from PIL import Image

    gray = pixels_to_uint8(np.arange(64), (8, 8), scale=3)
    assert gray.shape == (24, 24) and gray.min() == 0 and gray.max() == 255
    img = Image.open(io.BytesIO(png_bytes(gray)))
    assert img.size == (24, 24) and np.array_equal(np.asarray(img), gray)
    assert png_data_uri(np.zeros(64), (8, 8)).startswith("data:image/png;base64,")


def test_selected_example_ids_normalises_customdata():
    assert selected_example_ids(None) is None
    assert selected_example_ids({"selection": {"points": [], "box": [], "lasso": []}}) is None
    event = {"selection": {"points": [{"customdata": {"0": "a"}}, {"customdata": ["b"]},
                                      {"customdata": "c"}, {"x": 1}, {"customdata": "a"}],
                           "box": [{}]}}
    assert selected_example_ids(event) == ("a", "b", "c")
    assert selected_example_ids({"selection": {"points": [], "box": [{"x": [0, 1]}]}}) == ()


def test_runs_dir_resolution(tmp_path):
    assert resolve_runs_dir(["--runs-dir", str(tmp_path)], {}) == tmp_path
    assert resolve_runs_dir(["-k", "x", "tests/foo.py"], {"INFLUENCE_RUNS_DIR": str(tmp_path)}) \
        == tmp_path
    assert resolve_runs_dir([], {}).name == "runs"
    (tmp_path / "partial").mkdir()
    (tmp_path / ".hidden").mkdir()
    make_synthetic_run(tmp_path / "good", n_pretrain=20, n_test=4)
    assert run_names(tmp_path) == ["good", "partial"]
    assert run_names(Path(tmp_path / "missing")) == []
