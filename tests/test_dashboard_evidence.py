"""The evidence of the Test point page: thumbnail strips, evidence order, the map (colour modes,
greyed filtered-out points, fixed ranges), the term split chart, the score bars and the
label-noise marker, "Flag all shown" with helpful rows, and the URL binding of the filters and
navigation widgets (AppTest on small synthetic runs, plus the pure functions behind them).

AppTest always reruns whole pages (it cannot rerun one fragment) and does not see the URL
updates the browser makes when a user changes a bound widget; it does see what the server
writes into the URL (widgets seeded from it, values restored on coming back to the page, the
Reset button).  ``tests/e2e/test_browser.py`` checks the browser side.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import plotly.io as pio
import pytest

from benchmarks.make_synthetic_run import make_synthetic_run
from dashboard.charts import term_split_bars
from dashboard.evidence import greyed_positions
from dashboard.evidence_data import (
    NOISE_LABEL,
    build_point_data,
    build_run_constants,
    evidence_order,
    noise_threshold,
    top_rows,
)
from dashboard.filters import (
    FilterSpec,
    apply_filters,
    example_table,
    filter_mask,
    map_sample,
    score_frame,
)
from dashboard.flags import FlagStore
from dashboard.map_chart import FILTERED_OUT, MapScales, influence_map
from dashboard.run_details import class_names
from dashboard.terms import SENTENCE
from engine.artifacts import load_run
from tests.apptest_pages import open_page

TEST_PAGE = "views/test_point.py"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evidence_runs")
    make_synthetic_run(root / "digits", n_pretrain=400, n_test=60, seed=3)
    return root


@pytest.fixture()
def runs_dir(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(template, root)
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def run(template):
    return load_run(template / "digits", verify_hashes=False)


@pytest.fixture(scope="module")
def examples(run):
    return example_table(run)


def _row(run, correct: bool) -> int:
    return int(np.flatnonzero(run.test_points["correct"].astype(bool).to_numpy() == correct)[0])


def _tid(run, row: int) -> str:
    return str(run.test_points["test_id"].iloc[row])


def _ranked(run, row: int, sign: str, k: int) -> list[str]:
    total = np.asarray(run.scores["total"][row])
    order = np.argsort(total if sign == "harmful" else -total, kind="stable")[:k]
    return run.pretrain_examples["example_id"].iloc[order].astype(str).tolist()


def _figure(at, key_part: str):
    """The plotly figure of the chart whose element id contains ``key_part``."""
    (chart,) = [c for c in at.get("plotly_chart") if key_part in c.proto.id]
    return pio.from_json(chart.proto.spec)


def _values(data) -> np.ndarray:
    """Trace data of a figure read back from JSON (plotly sends arrays as typed base64)."""
    if isinstance(data, dict) and "bdata" in data:
        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=np.dtype(data["dtype"]))
    return np.asarray(data)


def _headings(at) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("#### Most")]


# --- pure functions -------------------------------------------------------------------------

def test_point_data_is_sorted_and_top_rows_are_strongest_first(run, examples):
    point = build_point_data(examples, run.scores, 4)
    assert point.frame["total"].is_monotonic_decreasing
    assert (point.frame.index == point.frame["row"]).all()
    assert list(top_rows(point.frame, "harmful", 8)["example_id"]) == _ranked(run, 4, "harmful", 8)
    assert list(top_rows(point.frame, "helpful", 8)["example_id"]) == _ranked(run, 4, "helpful", 8)
    total = np.asarray(run.scores["total"][4])
    assert point.total_max == pytest.approx(np.abs(total).max())
    assert point.n_helpful == int((total > 0).sum()) and point.n_harmful == int((total < 0).sum())
    # Sorting first does not change what the filters return.
    spec = FilterSpec(top_k=7, labels=(1, 2, 3))
    unsorted = apply_filters(score_frame(examples, run.scores, 4), spec)
    assert list(apply_filters(point.frame, spec)["example_id"]) == list(unsorted["example_id"])
    assert evidence_order(False) == ("harmful", "helpful")
    assert evidence_order(True) == ("helpful", "harmful")


@pytest.mark.parametrize("n_helpful,n_harmful,harmful_first", [(20, 20, True), (3, 0, False),
                                                               (25, 7, False)])
def test_split_chart_draws_every_row_it_claims(run, examples, n_helpful, n_harmful,
                                               harmful_first):
    point = build_point_data(examples, run.scores, 2)
    helpful = top_rows(point.frame, "helpful", n_helpful)
    harmful = top_rows(point.frame, "harmful", n_harmful)
    fig = term_split_bars(helpful, harmful, per_sign=25, harmful_first=harmful_first)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2
    n = n_helpful + n_harmful
    assert all(len(t.y) == n for t in bars) and len(set(bars[0].y)) == n
    title = fig.layout.title.text
    assert f"({n} bars)" in title
    if n_helpful:
        assert f"{n_helpful} most helpful" in title
    if n_harmful:
        assert f"{n_harmful} most harmful" in title
    assert list(fig.layout.yaxis.categoryarray) == list(bars[0].y)  # every row has a label
    top = bars[0].y[-1]  # plotly draws the last category at the top
    first = (harmful if harmful_first and n_harmful else helpful)["example_id"].iloc[0]
    assert top.startswith(f"{first} ")


def test_map_greys_filtered_out_points_with_fixed_ranges(run, examples):
    point = build_point_data(examples, run.scores, 5)
    consts = build_run_constants(run)
    scales = MapScales(consts.x_range, consts.y_range, point.score_bound, consts.loss_range,
                       class_names(run, "pretrain"))

    def draw(spec: FilterSpec, colour: str = "score"):
        passing = apply_filters(point.frame, spec)
        shown = map_sample(passing, seed=5)
        greyed = point.frame.iloc[greyed_positions(point, filter_mask(point.frame, spec))]
        return passing, influence_map(shown, greyed, run.pretrain_xy, (0.0, 0.0), "t", scales,
                                      colour)

    _, everything = draw(FilterSpec(top_k=None))
    passing, filtered = draw(FilterSpec(top_k=None, labels=(1, 2)))
    assert FILTERED_OUT not in {t.name for t in everything.data}
    (grey,) = [t for t in filtered.data if t.name == FILTERED_OUT]
    (coloured,) = [t for t in filtered.data if t.name == "pretraining examples"]
    assert len(grey.x) == run.n_pretrain - len(passing) > 0
    assert grey.customdata is None  # selecting grey points selects nothing
    assert {row[0] for row in coloured.customdata} == set(passing["example_id"])
    assert filtered.layout.xaxis.range == everything.layout.xaxis.range == consts.x_range
    assert filtered.layout.yaxis.range == everything.layout.yaxis.range
    assert coloured.marker.cmax == everything.data[0].marker.cmax == point.score_bound
    # The other colour modes.
    _, by_label = draw(FilterSpec(top_k=None, labels=(1, 2)), "label")
    names = {t.name for t in by_label.data if t.name.startswith("label ")}
    assert names == {f"label {n}" for n in class_names(run, "pretrain")}
    assert sum(len(t.x) for t in by_label.data if t.name in ("label 1", "label 2")) == len(passing)
    _, by_loss = draw(FilterSpec(top_k=None), "pretrain_loss")
    assert (by_loss.data[0].marker.cmin, by_loss.data[0].marker.cmax) == consts.loss_range


def test_noise_threshold_marks_the_top_five_percent(run):
    losses = run.pretrain_examples["pretrain_loss"].to_numpy()
    threshold = noise_threshold(losses)
    marked = (losses >= threshold).mean()
    assert 0.04 <= marked <= 0.06
    assert noise_threshold(np.array([])) is None


# --- the page -------------------------------------------------------------------------------

@pytest.mark.parametrize("correct", [False, True])
def test_evidence_order_and_thumbnails(runs_dir, run, correct):
    row = _row(run, correct)
    at = open_page(TEST_PAGE, {"test_id": _tid(run, row)})
    first, second = evidence_order(correct)
    assert _headings(at) == [f"#### Most {first} (20)", f"#### Most {second} (20)"]
    strips = [m.value for m in at.markdown if "pretraining examples (removing them" in m.value]
    assert [first in strips[0], second in strips[1]] == [True, True]
    # Thumbnails after the test image: 8 of the first sign then 8 of the second, in order.
    captions = [img.captions[0] for img in at.image[1:]]
    assert len(captions) == 16
    ids = [c.split("`")[1] for c in captions]
    assert ids[:8] == _ranked(run, row, first, 8) and ids[8:] == _ranked(run, row, second, 8)
    negative = [c.split("[**")[1].startswith("-") for c in captions]  # the score, coloured
    assert negative == [(i < 8) == (first == "harmful") for i in range(16)]
    split = _figure(at, "split_bars")
    top = [t for t in split.data if t.type == "bar"][0].y[-1]
    assert top.startswith(_ranked(run, row, first, 1)[0])


def test_score_bars_terms_and_noise_marker(runs_dir, run):
    row = _row(run, False)
    at = open_page(TEST_PAGE, {"test_id": _tid(run, row)})
    harmful = [e.value for e in at.data_editor if e.key.startswith("tbl_harmful")][0]
    np.testing.assert_allclose(harmful["|total|"], -harmful["total"])
    threshold = noise_threshold(run.pretrain_examples["pretrain_loss"].to_numpy())
    expected = np.where(harmful["pretrain_loss"] >= threshold, NOISE_LABEL, "")
    assert list(harmful["label noise?"]) == list(expected)
    (term,) = [m for m in at.markdown if m.value == SENTENCE]
    assert run.manifest["scenario"] == "updated"  # the synthetic run's scenario
    assert "**updated**" in term.help and "α[B⁻¹[0; ∇_U g_t]]_U" in term.help
    assert "α[B⁻¹[∇_T g_t; 0]]_U" in term.help and "A_TT⁻¹" not in term.help


def test_flag_all_warns_about_helpful_rows_and_can_flag_only_harmful(runs_dir, run):
    row = _row(run, False)
    tid = _tid(run, row)
    at = open_page(TEST_PAGE, {"test_id": tid})
    at.number_input(key="f_top_k").set_value(3).run()
    at.button(key="flag_all").click().run()
    warning = "\n".join(w.value for w in at.warning)
    assert "Flag all 6 examples" in warning and "3 of them are helpful" in warning
    assert "Flag only the 3 harmful" in at.button(key="flag_all_harmful").label
    at.button(key="flag_all_harmful").click().run()
    assert not at.exception
    flagged = FlagStore.beside_run(runs_dir / "digits").flagged_ids(run.run_id)
    assert flagged == set(_ranked(run, row, "harmful", 3))
    # Only harmful rows shown: no helpful warning, no "only harmful" button.
    at.radio(key="f_sign").set_value("harmful").run()
    at.button(key="flag_all").click().run()
    assert "helpful" not in "\n".join(w.value for w in at.warning)
    assert not [b for b in at.button if b.key == "flag_all_harmful"]


def test_map_colour_and_greyed_points_in_the_page(runs_dir, run):
    at = open_page(TEST_PAGE, {"map_colour": "flag"})
    assert at.selectbox(key="map_colour").value == "flag"
    fig = _figure(at, "map_")
    assert {"flagged", "not flagged"} <= {t.name for t in fig.data}
    ranges = (fig.layout.xaxis.range, fig.layout.yaxis.range)
    at.selectbox(key="map_colour").set_value("score").run()
    at.multiselect(key="f_labels").set_value([3]).run()
    fig = _figure(at, "map_")
    assert (fig.layout.xaxis.range, fig.layout.yaxis.range) == ranges
    (grey,) = [t for t in fig.data if t.name == FILTERED_OUT]
    n_label = int((run.pretrain_examples["label"] == 3).sum())
    assert len(_values(grey.x)) == run.n_pretrain - n_label


# --- URL binding ----------------------------------------------------------------------------

def _shown(at) -> int:
    (line,) = [m.value for m in at.markdown if "examples shown**" in m.value]
    return int(line.split("**")[1].split()[0].replace(",", ""))


def test_url_seeds_filters_and_navigation(runs_dir, run):
    names = class_names(run, "pretrain")
    at = open_page(TEST_PAGE, {
        "f_sign": "harmful", "f_top_k": "5", "f_labels": [names[1], names[4]],
        "f_dominant": "finetuned", "f_search": "p0", "map_colour": "label",
        "nav_subset": "misclassified", "nav_sort": "confidence", "nav_mis_first": "false",
        "nav_true": "odd", "f_score_max": "0"})
    assert at.radio(key="f_sign").value == "harmful"
    assert at.number_input(key="f_top_k").value == 5
    assert at.multiselect(key="f_labels").value == [1, 4]
    assert at.radio(key="f_dominant").value == "finetuned"
    assert at.text_input(key="f_search").value == "p0"
    assert at.number_input(key="f_score_max").value == 0.0
    assert at.number_input(key="f_score_min").value is None
    assert at.selectbox(key="map_colour").value == "label"
    assert at.radio(key="nav_subset").value == "misclassified"
    assert at.selectbox(key="nav_sort").value == "confidence"
    assert at.checkbox(key="nav_mis_first").value is False
    assert at.multiselect(key="nav_true").value == [1]
    tid = at.selectbox(key="nav_pick").value
    assert not bool(run.test_points.set_index("test_id").loc[tid, "correct"])
    row = int(np.flatnonzero(run.test_points["test_id"] == tid)[0])
    frame = build_point_data(example_table(run), run.scores, row).frame
    expected = apply_filters(frame, FilterSpec(sign="harmful", top_k=5, labels=(1, 4),
                                               dominant_term="finetuned", text_query="p0",
                                               score_max=0.0))
    assert _shown(at) == len(expected) > 0
    editors = [e.value for e in at.data_editor if e.key.startswith("tbl_harmful")]
    shown_ids = editors[0]["example"].str.extract(r"example_id=(.*)$")[0]
    assert list(shown_ids) == list(expected["example_id"])


def test_url_values_that_do_not_fit_are_ignored(runs_dir):
    at = open_page(TEST_PAGE, {"f_sign": "bogus", "f_top_k": "abc", "f_labels": "",
                               "f_score_min": "", "map_colour": "nope"})
    assert not at.exception
    assert at.radio(key="f_sign").value == "both"
    assert at.number_input(key="f_top_k").value == 20
    assert at.multiselect(key="f_labels").value == []
    assert at.number_input(key="f_score_min").value is None
    assert at.selectbox(key="map_colour").value == "score"
    assert _shown(at) == 40


def test_filters_come_back_into_the_url_after_a_page_switch(runs_dir, run):
    at = open_page(TEST_PAGE)
    at.radio(key="f_sign").set_value("harmful").run()
    at.number_input(key="f_top_k").set_value(7).run()
    at.multiselect(key="f_labels").set_value([2]).run()
    at.selectbox(key="map_colour").set_value("pretrain_loss").run()
    at.radio(key="nav_subset").set_value("misclassified").run()
    shown = _shown(at)
    at.switch_page("views/overview.py").run()
    at.switch_page(TEST_PAGE).run()
    assert not at.exception
    assert at.radio(key="f_sign").value == "harmful" and _shown(at) == shown
    for key, value in {"f_sign": "harmful", "f_top_k": "7", "f_labels": "2",
                       "map_colour": "pretrain_loss", "nav_subset": "misclassified"}.items():
        assert at.query_params.get(key) == value, key
    # A new session opened with that URL shows the same view.
    fresh = open_page(TEST_PAGE, dict(at.query_params))
    assert fresh.number_input(key="f_top_k").value == 7 and _shown(fresh) == shown


def test_reset_filters_clears_them_from_the_url(runs_dir):
    at = open_page(TEST_PAGE, {"f_sign": "helpful", "f_top_k": "3", "f_flag_status": "unflagged"})
    assert _shown(at) == 3
    at.button(key="f_reset").click().run()
    assert not at.exception
    assert at.radio(key="f_sign").value == "both" and at.number_input(key="f_top_k").value == 20
    assert not {k for k in at.query_params if k.startswith("f_")}, at.query_params
    assert _shown(at) == 40


def test_what_if_line_follows_the_flags(runs_dir, run):
    row = _row(run, False)
    tid = _tid(run, row)
    at = open_page(TEST_PAGE, {"test_id": tid})
    assert "Flag examples to see the predicted effect" in "\n".join(c.value for c in at.caption)
    FlagStore.beside_run(runs_dir / "digits").flag(run.run_id, _ranked(run, row, "harmful", 2),
                                                   "label noise", "", "tester", tid)
    at.run()
    assert not at.exception
    assert any("flagged examples are removed" in m.value for m in at.markdown)
    harmful = [e.value for e in at.data_editor if e.key.startswith("tbl_harmful")][0]
    assert list(harmful["flagged"][:2]) == [True, True] and not harmful["flagged"][2:].any()


def test_term_tooltip_follows_the_scenario(run):
    import dataclasses

    from dashboard.terms import term_tooltip

    fixed = dataclasses.replace(run, manifest=dict(run.manifest, scenario="fixed", alpha=None))
    text = term_tooltip(fixed)
    assert "**fixed**" in text and "s_pre(t) = ∇_U g_t" in text
    assert "s_ft(t) = −A_UT A_TT⁻¹ ∇_T g_t" in text and "B⁻¹" not in text
    assert "α = 1.0" in term_tooltip(run)


def test_evidence_section_is_a_fragment_around_the_plain_body():
    """The page renders the evidence through ``st.fragment`` (widgets inside rerun only it);
    the benchmark times the plain body, which is what the fragment wraps."""
    from dashboard.evidence import evidence_body, evidence_section

    assert evidence_section is not evidence_body
    assert evidence_section.__wrapped__ is evidence_body
    source = (Path(__file__).resolve().parents[1] / "dashboard" / "views" / "test_point.py")
    assert "evidence_section(run, current, row, ok)" in source.read_text()
