"""Run comparison: the current run against another one (deep link ``?compare=NAME``), typically
a parent and its retrain without some pretraining examples.  Accuracy and confusion matrices
before / after, and per test point the change predicted from the parent's scores (first order)
against the actual change after retraining."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.compare_charts import confusion_pair, prediction_scatter
from dashboard.comparison import Comparison, compare_runs, comparison_problems, related_runs
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import label_name
from dashboard.runs_dir import run_names, run_path
from engine.artifacts import Run, RunError, read_manifest

COMPARE_KEY = "compare"
CHOICE_KEY = "compare_choice"
_WANTED_KEY = "_compare_wanted"  # a requested run that is not there (kept until another is chosen)
_BASE_KEY = "_compare_base"  # the sidebar's run when this page last ran
_SET_KEY = "_compare_set"  # this page set the selectbox's value through the state
TABLE_CAP = 2000  # rows of the per-point table sent to the browser
MAX_LINKS = 30
CHANGE_FORMAT = "%.4f"
SUBSETS = ("all", "misclassified before", "fixed or broken")


@st.cache_resource(max_entries=8, show_spinner="Comparing the two runs…")
def _comparison(before_id: str, after_id: str, _before: Run, _after: Run) -> Comparison:
    """:func:`compare_runs`, cached per pair of run ids (runs are immutable once written)."""
    return compare_runs(_before, _after)


def _manifests(root: Path, names: list[str]) -> dict[str, dict]:
    """Manifests of the listed runs that can be read (partial ones are skipped)."""
    out = {}
    for name in names:
        path = run_path(root, name)
        try:
            out[name] = read_manifest(path) if path is not None else None
        except RunError:
            continue
    return {n: m for n, m in out.items() if m is not None}


def _requested() -> str | None:
    """A missing run asked for earlier, else the picker's value, else ``?compare=``."""
    if _WANTED_KEY in st.session_state:
        return str(st.session_state[_WANTED_KEY])
    if st.session_state.get(COMPARE_KEY) is not None:
        return str(st.session_state[COMPARE_KEY])
    if COMPARE_KEY in st.query_params:
        return st.query_params.get_all(COMPARE_KEY)[-1]
    return None


def _choose() -> None:
    """``on_change`` of the picker shown when the requested run cannot be compared."""
    choice = st.session_state.get(CHOICE_KEY)
    if choice:
        st.session_state.pop(_WANTED_KEY, None)
        st.session_state[COMPARE_KEY] = choice
        st.session_state[_SET_KEY] = True


def _not_comparable(wanted: str, current: str, others: list[str]) -> None:
    """Say why ``wanted`` cannot be the other run and offer those that can (never silently
    another run)."""
    if wanted == current:
        what = (f"{md_code(wanted)} is the run open in the sidebar; a run cannot be compared "
                "with itself")
    elif not wanted.strip():
        what = "The URL names no run to compare with (`?compare=` is empty)"
    else:
        what = (f"There is no run {md_code(wanted)} in {md_code(session.runs_dir())} (deleted, "
                "renamed, or a typo in the link)")
    st.error(f"{what}. Pick the run to compare {md_code(current)} with.",
             icon=":material/error:")
    st.selectbox("Compare with", others, index=None, key=CHOICE_KEY, on_change=_choose,
                 placeholder="choose a run")
    links = " · ".join(f"[{md_escape(n)}](?run={quote(current, safe='')}&compare="
                       f"{quote(n, safe='')})" for n in others[:MAX_LINKS])
    st.markdown(f"Or open a pair in a fresh view: {links}")


def _pick_other(run: Run) -> str | None:
    """The run to compare with: the ``compare`` selectbox (bound to ``?compare=``), default the
    newest child of the current run, else its parent; ``None`` when there is nothing to show
    (the reason is on the page)."""
    root, current = session.runs_dir(), run.path.name
    others = [n for n in run_names(root) if n != current]
    if not others:
        cmd = (f"python -m engine run CONFIG --out {root / (current + '-child')} "
               f"--exclude flagged_ids.txt --parent {root / current}")
        st.info(f"{md_code(current)} is the only run in {md_code(root)}. Retrain it without "
                f"some pretraining examples to compare, e.g. {md_code(cmd, limit=600)} "
                "(flagged_ids.txt: exported from the Flags page).")
        return None
    wanted = _requested()
    base = st.session_state.get(_BASE_KEY)
    if wanted == current and base in others and _WANTED_KEY not in st.session_state:
        # The sidebar switched to the run being compared with: keep the pair, other way round.
        wanted = st.session_state[COMPARE_KEY] = base
        st.session_state[_SET_KEY] = True
    st.session_state[_BASE_KEY] = current
    if wanted is not None and wanted not in others:
        st.session_state[_WANTED_KEY] = wanted
        _not_comparable(wanted, current, others)
        return None
    st.session_state.pop(_WANTED_KEY, None)
    related = related_runs(run.manifest, current, _manifests(root, others))
    tags = dict(reversed(related))  # the first role of a name wins
    # The default is the related run even when the URL names another: the URL seeds the
    # widget, and a bound widget keeps ``?compare=`` in the URL only while it differs from
    # the default (the default pair's link is the shorter ``?run=``).  No default on a run
    # where the page set the value itself (Streamlit warns about a default and a set value).
    set_here = st.session_state.pop(_SET_KEY, False)
    st.selectbox(
        f"Compare {md_escape(current)} with", others,
        index=others.index(related[0][0]) if related and not set_here else None,
        key=COMPARE_KEY,
        bind="query-params", placeholder="choose a run",
        format_func=lambda n: f"{n} ({tags[n]})" if n in tags else n,
        help="Runs of the runs directory other than the one open in the sidebar; kept in the "
             "URL as ?compare=NAME. The run with the removed examples (the parent) is shown as "
             "'before'.")
    choice = st.session_state.get(COMPARE_KEY)
    if choice is None:
        st.info("Pick a run to compare with (none of the other runs is recorded as a child or "
                "the parent of this one).")
    return choice


def _fmt(value: float, spec: str = ".3f") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _links(run_name: str, ids: pd.Series) -> list[str]:
    """Links to the test point page of each id in ``run_name`` (open in a new tab)."""
    return [f"test-point?run={quote(run_name, safe='')}&test_id={quote(str(t), safe='')}"
            for t in ids]


def _point_table(cmp: Comparison, part: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Display frame of comparison points with links to both runs' test point pages."""
    names = cmp.class_names
    view = pd.DataFrame({
        "before": _links(cmp.before.path.name, part["test_id"]),
        "after": _links(cmp.after.path.name, part["test_id"]),
        "true": [label_name(names, int(v)) for v in part["label"]],
        "pred before": [label_name(names, int(v)) for v in part["pred_before"]],
        "pred after": [label_name(names, int(v)) for v in part["pred_after"]],
        "status": part["status"].to_numpy(),
        "loss before": part["loss_before"].to_numpy(),
        "loss after": part["loss_after"].to_numpy(),
        "predicted change": part["predicted_change"].to_numpy(),
        "actual change": part["actual_change"].to_numpy(),
        "prediction error": (part["predicted_change"] - part["actual_change"]).to_numpy(),
        "predicted pretrained_term": part["predicted_pretrained_term"].to_numpy(),
        "predicted finetuned_term": part["predicted_finetuned_term"].to_numpy(),
    })
    config = {
        "before": st.column_config.LinkColumn(f"in {cmp.before.path.name}",
                                              display_text=r"test_id=(.*)$"),
        "after": st.column_config.LinkColumn(f"in {cmp.after.path.name}",
                                             display_text=r"test_id=(.*)$"),
        **{c: st.column_config.NumberColumn(c, format=CHANGE_FORMAT)
           for c in view.columns if "change" in c or "loss" in c or "term" in c
           or "error" in c},
    }
    return view, config


def _header(cmp: Comparison, current: str) -> None:
    b, a = cmp.before.path.name, cmp.after.path.name
    n_ft = len(cmp.removed_finetune_ids)
    st.subheader(f"{md_code(b)} → {md_code(a)}: {len(cmp.removed_ids):,} pretraining "
                 f"example{'s' if len(cmp.removed_ids) != 1 else ''}"
                 + (f" and {n_ft:,} finetuning example{'s' if n_ft != 1 else ''}" if n_ft
                    else "") + " removed")
    measured = cmp.before.manifest.get("measurement", "loss")
    st.caption(f"{md_escape(cmp.relation, limit=400)} · compared on {len(cmp.points):,} common "
               f"test points · measurement {md_code(measured)}")
    if cmp.reordered:
        st.info(f"{md_code(current)} (open in the sidebar) is shown as **after**: the other run "
                "still has the removed examples, so its scores make the prediction.",
                icon=":material/swap_horiz:")
    for note in cmp.notes:
        if not note.startswith("swapped"):
            st.warning(md_escape(note, limit=600))


def _this_point(cmp: Comparison) -> None:
    """A highlighted row for the sidebar's test point when both runs have it."""
    tid = str(st.session_state.get(session.TEST_KEY) or "").strip()
    if not tid:
        return
    row = cmp.points[cmp.points["test_id"] == tid]
    if row.empty:
        st.caption(f"The current test point {md_code(tid)} is not in both runs.")
        return
    r = row.iloc[0]
    st.success(f"**This point {md_code(tid)}** ({md_escape(r['status'])}): loss before "
               f"{r['loss_before']:.4f}, after {r['loss_after']:.4f}, predicted change "
               f"{_fmt(r['predicted_change'], '+.4f')}, actual change "
               f"{r['actual_change']:+.4f}", icon=":material/target:")


def _correlation_caption(cmp: Comparison) -> str:
    n_mis = cmp.n_scored_misclassified
    return (f"predicted (first order, from {md_code(cmp.before.path.name)}'s scores) vs actual "
            f"(retrained): Pearson r = {_fmt(cmp.pearson)}, Spearman ρ = {_fmt(cmp.spearman)} "
            f"over {cmp.n_scored:,} test points; over the {n_mis} misclassified before: "
            f"Pearson r = {_fmt(cmp.pearson_misclassified)}, Spearman ρ = "
            f"{_fmt(cmp.spearman_misclassified)}; same sign in "
            f"{_fmt(100 * cmp.extra.get('sign_agreement', float('nan')), '.1f')}% of the "
            "points. Points on the dashed y = x line were predicted exactly; the prediction "
            "is linear in the removed set and ignores interactions between its examples.")


def _show(cmp: Comparison, current: str) -> None:
    _header(cmp, current)
    b, a = cmp.before.path.name, cmp.after.path.name
    c = st.columns(4)
    c[0].metric(f"Accuracy before ({md_escape(b)})", f"{cmp.accuracy_before:.1%}")
    c[1].metric(f"Accuracy after ({md_escape(a)})", f"{cmp.accuracy_after:.1%}",
                delta=f"{100 * (cmp.accuracy_after - cmp.accuracy_before):+.1f} pp")
    c[2].metric("Fixed (misclassified → correct)", f"{len(cmp.fixed):,}")
    c[3].metric("Newly broken (correct → misclassified)", f"{len(cmp.broken):,}",
                delta_color="inverse")
    _this_point(cmp)
    tid = str(st.session_state.get(session.TEST_KEY) or "").strip() or None
    st.plotly_chart(confusion_pair(cmp.confusion_before, cmp.confusion_after, b, a),
                    key="cmp_confusion", config={"displayModeBar": False})

    st.markdown("#### Predicted vs actual change of each test point")
    st.plotly_chart(prediction_scatter(cmp.points, b, highlight=tid), key="cmp_scatter")
    st.caption(_correlation_caption(cmp))

    for title, part, key in (("Fixed: misclassified before, correct after", cmp.fixed,
                              "cmp_fixed"),
                             ("Newly broken: correct before, misclassified after", cmp.broken,
                              "cmp_broken")):
        st.markdown(f"#### {title} ({len(part)})")
        if part.empty:
            st.caption("None.")
            continue
        view, config = _point_table(cmp, part.sort_values("actual_change"))
        st.dataframe(view, hide_index=True, column_config=config, key=key)

    st.markdown("#### Every common test point")
    subset = st.radio("Show", SUBSETS, key="cmp_subset", horizontal=True)
    pts = cmp.points
    part = (pts[~pts["correct_before"]] if subset == "misclassified before" else
            pts[pts["status"] != "unchanged"] if subset == "fixed or broken" else pts)
    # Largest actual changes first; the table is sortable by any column in the browser.
    part = part.iloc[np.argsort(-np.abs(part["actual_change"].to_numpy()), kind="stable")]
    if len(part) > TABLE_CAP:
        st.caption(f"The {TABLE_CAP:,} largest actual changes of {len(part):,} points.")
        part = part.head(TABLE_CAP)
    view, config = _point_table(cmp, part)
    st.dataframe(view, hide_index=True, column_config=config, key="cmp_points")


run = session.current_run()
st.title("Compare runs")
other_name = _pick_other(run)
if other_name is not None:
    other_dir = run_path(session.runs_dir(), other_name)
    if other_dir is None:
        st.error(f"Run {md_code(other_name)} is no longer in {md_code(session.runs_dir())}.")
        st.stop()
    try:
        other = session.load(other_dir)
    except RunError as exc:
        st.error(f"Cannot open run {md_code(other_name)}: {md_escape(exc, limit=1500)}",
                 icon=":material/error:")
        st.stop()
    problems = comparison_problems(run, other)
    if problems:
        st.error(f"{md_code(run.path.name)} and {md_code(other_name)} cannot be compared: "
                 + "; ".join(md_escape(p, limit=400) for p in problems) + ".",
                 icon=":material/error:")
        st.stop()
    _show(_comparison(run.run_id, other.run_id, run, other), run.path.name)
