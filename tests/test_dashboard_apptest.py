"""Server-side tests of every dashboard page with ``streamlit.testing.v1.AppTest``.

Runs are small synthetic runs (``benchmarks/make_synthetic_run.py``) copied into a fresh runs
directory per test, so flags written by one test never leak into another.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from benchmarks.make_synthetic_run import make_synthetic_run
from dashboard.convention import SCORE_CONVENTION
from dashboard.flags import FlagStore
from engine.artifacts import load_run
from tests.apptest_pages import open_page

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
TEST_PAGE = "views/test_point.py"
EXAMPLE_PAGE = "views/example.py"
FLAGS_PAGE = "views/flag_list.py"


@pytest.fixture(scope="session")
def template_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template_runs")
    make_synthetic_run(root / "digits", n_pretrain=400, n_test=60, seed=3)
    validated = make_synthetic_run(root / "validated", n_pretrain=200, n_test=30, seed=4,
                                   converged=False)
    (validated / "validation").mkdir()
    (validated / "validation" / "summary.json").write_text(json.dumps({"checks": [
        {"name": "loo_correlation", "verdict": "Pearson r = 0.93 vs leave-one-out",
         "passed": True, "r": 0.93},
        {"name": "term_sum", "verdict": "total = pretrained + finetuned to 1e-7",
         "passed": False, "max_abs_error": 1e-3}]}))
    (validated / "validation" / "loo_scatter.json").write_text(json.dumps(
        {"data": [{"type": "scatter", "x": [1, 2], "y": [1, 2], "mode": "markers"}],
         "layout": {"title": {"text": "LOO vs predicted"}}}))
    make_synthetic_run(root / "words", n_pretrain=150, n_test=12, seed=5, render="text")
    make_synthetic_run(root / "approx", n_pretrain=150, n_test=12, seed=6,
                       approximation="directions truncated to rank 8 in 2 weight matrices")
    return root


@pytest.fixture()
def runs_dir(template_runs, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(template_runs, root)
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(root))
    return root


@pytest.fixture()
def run(runs_dir):
    return load_run(runs_dir / "digits", verify_hashes=False)




def texts(elements) -> str:
    """Text of the elements, HTML entities decoded (the legend is an HTML block)."""
    return html.unescape("\n".join(str(e.value) for e in elements))


def tables_with(at: AppTest, column: str) -> list:
    """Values of the (static, key-less) dataframes that have ``column``, in page order."""
    return [d.value for d in at.dataframe if column in d.value.columns]


def editor_frames(at: AppTest) -> dict[str, object]:
    """Data editors on the test point page by role ("helpful" / "harmful")."""
    out = {}
    for ed in at.data_editor:
        key = getattr(ed, "key", None) or ""
        for role in ("helpful", "harmful"):
            if key.startswith(f"tbl_{role}"):
                out[role] = ed.value
    return out


def test_overview_page(runs_dir, run):
    at = open_page()
    assert "digits" in at.title[0].value
    assert SCORE_CONVENTION in texts(at.markdown)
    assert "python -m engine validate" in texts(at.info)  # how to produce validation
    assert not at.warning  # the synthetic digits run converged
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Misclassified"].startswith(str(int((~run.test_points["correct"]).sum())))
    harmful, helpful = tables_with(at, "n_harmed")
    assert len(harmful) == 10 and (harmful["total"] < 0).all() and (helpful["total"] > 0).all()
    assert len(at.get("plotly_chart")) >= 2  # confusion matrix + group bars
    # "Open" goes to the example page of the most harmful example.
    target = at.selectbox(key="ov_open_pick").value
    assert target == harmful["example"].iloc[0].split("example_id=")[1]
    at.button(key="ov_open").click().run()
    assert not at.exception and target in at.subheader[0].value
    at.switch_page("views/overview.py").run()
    at.radio(key="ov_group").set_value("source").run()
    assert not at.exception
    (groups,) = tables_with(at, "predicted (misclassified)")
    assert set(groups["source"]) == {"flipped", "original"}
    # Predicted effect of removing a group = mean over the misclassified points of its summed
    # scores, with a bootstrap interval around it; most harmful first.
    mis = ~run.test_points["correct"].astype(bool).to_numpy()
    total = np.asarray(run.scores["total"], dtype=np.float64)[mis]
    source = run.pretrain_examples["source"].astype(str).to_numpy()
    for _, g in groups.iterrows():
        expected = total[:, source == g["source"]].sum(axis=1).mean()
        assert g["predicted (misclassified)"] == pytest.approx(expected, rel=1e-9)
        assert g["low"] <= g["predicted (misclassified)"] <= g["high"]
        assert g["examples"] == int((source == g["source"]).sum())
    assert groups["predicted (misclassified)"].is_monotonic_increasing


def test_overview_shows_validation_and_convergence_warning(runs_dir):
    at = open_page(query={"run": "validated"})
    assert "validated" in at.title[0].value
    assert "did not converge" in texts(at.warning)
    assert "1 of 2 validation checks passed" in texts(at.warning)
    (checks,) = tables_with(at, "verdict")
    assert list(checks["result"]) == ["pass", "FAIL"]
    assert len(at.get("plotly_chart")) >= 3  # confusion, LOO scatter, group bars


def test_approximate_scores_are_announced(runs_dir):
    at = open_page(query={"run": "approx"})
    assert "Approximate scores" in texts(at.warning) and "rank 8" in texts(at.warning)
    at = open_page(TEST_PAGE, {"run": "approx"})
    assert not at.exception
    assert "Approximate scores" in texts(at.caption)


@pytest.mark.parametrize("page", [None, TEST_PAGE, EXAMPLE_PAGE, FLAGS_PAGE])
def test_every_page_shows_the_convention_legend(runs_dir, page):
    at = open_page(page)
    legend = texts(at.markdown)
    assert SCORE_CONVENTION in legend and "helpful" in legend and "harmful" in legend


def test_deep_link_to_misclassified_point(runs_dir, run):
    mis = run.test_points[~run.test_points["correct"]]
    tid = str(mis["test_id"].iloc[-1])
    at = open_page(TEST_PAGE, {"test_id": tid})
    assert tid in at.subheader[0].value and "misclassified" in at.subheader[0].value
    assert at.selectbox(key="nav_pick").value == tid
    tables = editor_frames(at)
    assert len(tables["helpful"]) == 20 and len(tables["harmful"]) == 20
    row = int(np.flatnonzero(run.test_points["test_id"] == tid)[0])
    top = np.argsort(-np.asarray(run.scores["total"][row]))[:20]
    assert set(tables["helpful"]["example"].str.extract(r"example_id=(.*)$")[0]) == \
        set(run.pretrain_examples["example_id"].iloc[top])
    # The id survives page switches (it is bound to the URL).
    at.switch_page("views/overview.py").run()
    at.switch_page(TEST_PAGE).run()
    assert not at.exception
    assert at.session_state["test_id"] == tid and tid in at.subheader[0].value


def test_default_order_puts_misclassified_first(runs_dir, run):
    at = open_page(TEST_PAGE)
    first = at.selectbox(key="nav_pick").value
    assert not bool(run.test_points.set_index("test_id").loc[first, "correct"])
    at.button(key="nav_next").click().run()
    assert not at.exception
    assert at.session_state["test_id"] != first
    at.radio(key="nav_subset").set_value("correct").run()
    assert not at.exception
    assert "correct" in at.selectbox(key="nav_pick").options[0]


def test_filters_change_the_table(runs_dir, run):
    at = open_page(TEST_PAGE)
    at.radio(key="f_sign").set_value("harmful").run()
    assert not at.exception
    tables = editor_frames(at)
    assert "helpful" not in tables and len(tables["harmful"]) == 20
    assert (tables["harmful"]["total"] < 0).all()
    at.number_input(key="f_top_k").set_value(5).run()
    assert len(editor_frames(at)["harmful"]) == 5
    at.multiselect(key="f_labels").set_value([3]).run()
    harmful = editor_frames(at)["harmful"]
    assert not at.exception and (harmful["label"] == "3").all()
    at.multiselect(key="f_labels").set_value([]).run()
    at.multiselect(key="f_groups_source").set_value(["flipped"]).run()
    assert (editor_frames(at)["harmful"]["source"] == "flipped").all()
    at.radio(key="f_dominant").set_value("finetuned").run()
    harmful = editor_frames(at).get("harmful")
    assert not at.exception
    if harmful is not None:
        assert (harmful["finetuned_term"].abs() > harmful["pretrained_term"].abs()).all()
    assert "sign: harmful" in texts(at.markdown)


def test_map_selection_filters_the_table(runs_dir, run):
    at = open_page(TEST_PAGE)
    tid = at.selectbox(key="nav_pick").value
    chosen = list(run.pretrain_examples["example_id"].iloc[[5, 17, 42, 99]])
    key = f"map_{run.run_id}_{tid}_0"
    at.session_state[key] = {"selection": {
        "points": [{"customdata": e, "curve_number": 0, "point_index": i}
                   for i, e in enumerate(chosen)],
        "box": [{"xref": "x", "yref": "y", "x": [0, 1], "y": [0, 1]}], "lasso": []}}
    at.run()
    assert not at.exception
    shown = [t for t in editor_frames(at).values()]
    ids = {e.split("example_id=")[1] for t in shown for e in t["example"]}
    assert ids == set(chosen)
    assert "4 examples selected" in texts(at.caption)


def test_flag_all_shown_persists_across_sessions(runs_dir, run):
    at = open_page(TEST_PAGE)
    tid = at.selectbox(key="nav_pick").value
    at.number_input(key="f_top_k").set_value(3).run()
    at.selectbox(key="flag_reason").set_value("off-task").run()
    at.button(key="flag_all").click().run()
    assert "Flag all 6 examples" in texts(at.warning)
    assert not FlagStore.beside_run(runs_dir / "digits").flagged_ids(run.run_id)  # not yet
    at.button(key="flag_all_confirm").click().run()
    assert not at.exception
    flags = FlagStore.beside_run(runs_dir / "digits").flags(run.run_id)
    assert len(flags) == 6 and set(flags["reason"]) == {"off-task"}
    assert set(flags["test_id"]) == {tid} and set(flags["user"]) != {""}
    tables = editor_frames(at)
    assert all(t["flagged"].all() for t in tables.values())
    # A fresh session (as after a restart) still sees them, on the flags page too.
    fresh = open_page(FLAGS_PAGE)
    assert "6 flagged examples" in texts(fresh.markdown)
    (table,) = [d for d in fresh.dataframe if str(d.key or "").startswith("flags_table_")]
    assert len(table.value) == 6
    fresh.session_state[table.key] = {"selection": {"rows": [0, 1], "columns": []}}
    fresh.run()
    fresh.button(key="unflag_selected").click().run()
    assert not fresh.exception
    assert len(FlagStore.beside_run(runs_dir / "digits").flagged_ids(run.run_id)) == 4


def test_example_page_flag_unflag_and_links(runs_dir, run):
    eid = str(run.pretrain_examples["example_id"].iloc[7])
    at = open_page(EXAMPLE_PAGE, {"example_id": eid})
    assert eid in at.subheader[0].value
    harms = tables_with(at, "link")[0]
    assert harms["link"].str.startswith("test-point?run=digits&test_id=").all()   # names the run
    at.button(key="ex_flag").click().run()
    assert not at.exception and "Flagged" in texts(at.markdown)
    fresh = open_page(EXAMPLE_PAGE, {"example_id": eid})
    assert "Flagged" in texts(fresh.markdown)
    fresh.button(key="ex_unflag").click().run()
    assert "Not flagged" in texts(fresh.markdown)
    # "Open" switches to the test point page with that test point.
    target = fresh.selectbox(key="ex_open_pick").value
    fresh.button(key="ex_open").click().run()
    assert not fresh.exception
    assert fresh.session_state["test_id"] == target
    assert target in fresh.subheader[0].value


def test_unknown_ids_give_clear_messages(runs_dir):
    at = open_page(TEST_PAGE, {"test_id": "no-such-point"})
    assert "`no-such-point`" in texts(at.error) and "is not in run" in texts(at.error)
    at.button(key="clear_test_id").click().run()
    assert not at.exception and not at.error
    ex = open_page(EXAMPLE_PAGE, {"example_id": "no-such-example"})
    assert "`no-such-example`" in texts(ex.error) and "is not in run" in texts(ex.error)


def test_missing_partial_and_corrupted_runs(tmp_path, monkeypatch, runs_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(empty))
    at = open_page()
    assert "No runs found" in texts(at.error) and "python -m engine run" in texts(at.error)

    (runs_dir / "half").mkdir()
    (runs_dir / "half" / "test_points.parquet").write_bytes(b"x")
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(runs_dir))
    at = open_page(query={"run": "half"})
    assert "Cannot open run `half`" in texts(at.error) and "partial" in texts(at.error)

    scores = runs_dir / "words" / "scores" / "total.npy"
    data = bytearray(scores.read_bytes())
    data[-1] ^= 0xFF
    scores.write_bytes(bytes(data))
    at = open_page(TEST_PAGE, {"run": "words"})
    assert "Cannot open run `words`" in texts(at.error) and "hash" in texts(at.error)


def test_text_run_search(runs_dir):
    at = open_page(TEST_PAGE, {"run": "words"})
    at.number_input(key="f_top_k").set_value(0).run()
    at.text_input(key="f_search").set_value("SEVEN").run()
    assert not at.exception
    for table in editor_frames(at).values():
        assert table["text"].str.contains("seven").all()


def test_flag_store_failure_is_reported_not_raised(runs_dir, run):
    (runs_dir / "flags.sqlite").mkdir()  # sqlite cannot open a directory as a database
    eid = str(run.pretrain_examples["example_id"].iloc[3])
    at = open_page(EXAMPLE_PAGE, {"example_id": eid})
    at.button(key="ex_flag").click().run()
    assert not at.exception
    assert "Could not save flags" in texts(at.error)
    assert "Not flagged" in texts(at.markdown)
