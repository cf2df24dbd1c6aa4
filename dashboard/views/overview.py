"""Overview: what the run is, how well it converged and predicts, what validation says, and
which parts of the pretraining data help or hurt overall (including "false transfer")."""

from __future__ import annotations

import pandas as pd
import plotly.io as pio
import streamlit as st

from dashboard import session
from dashboard.charts import confusion_heatmap
from dashboard.example_display import example_table_view
from dashboard.filters import most_harmful, most_helpful
from dashboard.group_charts import BOOT_LEVEL, N_BOOT, group_effect_bars, group_effects_cached
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import (
    class_names,
    confusion_matrix,
    group_columns,
    label_name,
    manifest_mapping,
    stage_rows,
    task_description,
    unconverged_stages,
)
from dashboard.verdict_table import verdict_section

run = session.current_run()
manifest = run.manifest
_group_effects = group_effects_cached


def _ranked_sources(effects: dict[str, pd.DataFrame], column: str, run) -> pd.DataFrame:
    """One row per group: predicted effect on the misclassified points (with its interval) and
    on all points, most harmful to the misclassified first."""
    mis = effects["misclassified"].set_index("group")
    every = effects["all"].set_index("group")
    out = pd.DataFrame({
        column: mis.index, "examples": mis["n_examples"].to_numpy(),
        "predicted (misclassified)": mis["total"].to_numpy(),
        "low": mis["total_low"].to_numpy(), "high": mis["total_high"].to_numpy(),
        "pretrained term": mis["pretrained_term"].to_numpy(),
        "finetuned term": mis["finetuned_term"].to_numpy(),
        "predicted (all)": every.loc[mis.index, "total"].to_numpy(),
        "harmful (interval < 0)": (mis["total_high"] < 0).to_numpy(),
    })
    actual = validated_source_effects(run, column)
    if actual:
        out["actual (validation retrain)"] = [actual.get(str(g), float("nan"))
                                              for g in out[column]]
    return out   # label groups already carry class names (group_effects_cached)


def validated_source_effects(run, column: str) -> dict[str, float]:
    """Group name -> actual change of the misclassified points' mean measurement when
    ``engine validate --source-column COLUMN`` retrained without the whole group (label groups
    named by class, as in the chart); empty when validation has not retrained this column."""
    group = (run.validation or {}).get("group") or {}
    out = {}
    names = class_names(run, "pretrain")
    for src in group.get("sources") or []:
        if src.get("column") != column or not _number(src.get("actual_change")):
            continue
        name = str(src["group"])
        if column == "label" and name.lstrip("-").isdigit():
            name = label_name(names, int(name))
        out[name] = float(src["actual_change"])
    return out
metrics = manifest_mapping(run, "metrics")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


st.title(f"Run {md_code(run.path.name)}")
st.caption(f"run_id {md_code(run.run_id)} · created {md_escape(manifest.get('created_at', '?'))}"
           f" · {md_code(run.path)}")
st.markdown(f"**Task:** {md_escape(task_description(run))}")

c = st.columns(6)
c[0].metric("Scenario", str(manifest.get("scenario", "?")))
alpha = manifest.get("alpha")
c[1].metric("alpha", "– (fixed)" if alpha is None else
            f"{alpha:g}" if _number(alpha) else str(alpha))
acc = metrics.get("test_accuracy")
c[2].metric("Test accuracy", f"{acc:.1%}" if _number(acc) else "–")
n_mis = metrics.get("n_misclassified")
if not (isinstance(n_mis, int) and not isinstance(n_mis, bool)):
    n_mis = int((~run.test_points["correct"].astype(bool)).sum())
c[3].metric("Misclassified", f"{n_mis} / {run.n_test}")
c[4].metric("Pretraining examples", f"{run.n_pretrain:,}")
c[5].metric("Measurement", str(manifest.get("measurement", "loss")))

if manifest.get("approximation"):
    st.warning(f"**Approximate scores:** {md_escape(manifest['approximation'], limit=1000)}.",
               icon=":material/info:")

for stage in unconverged_stages(run):
    info = manifest_mapping(run, "stages").get(stage)
    info = info if isinstance(info, dict) else {}
    if str(info.get("status", "")).startswith("not certified"):
        # Trained by minibatch adam / sgd for a fixed budget: no minimum is claimed.
        gn = info.get("final_grad_norm")
        gn = f"{gn:.3g}" if _number(gn) else "?"
        st.warning(
            f"**The {md_escape(stage)} stage is not certified as a minimum**: it was trained "
            f"for a fixed budget ({md_escape(info['status'])}, "
            f"{md_escape(info.get('iterations', '?'))} minibatch steps; final full-batch "
            f"gradient norm {md_escape(gn)}). Influence scores "
            "assume a minimum; read them as approximate.", icon=":material/warning:")
        continue
    where = ("it stopped at a saddle point, not a minimum (lowest Hessian eigenvalue "
             f"{md_escape(info.get('min_eigenvalue', '?'))})"
             if info.get("status") == "saddle" else "its influence scores are less reliable")
    st.warning(
        f"**The {md_escape(stage)} stage did not converge** (final gradient norm "
        f"{md_escape(info.get('final_grad_norm', '?'))}, tolerance "
        f"{md_escape(info.get('tolerance', '?'))}, {md_escape(info.get('iterations', '?'))} "
        f"iterations): {where}.",
        icon=":material/warning:")

left, right = st.columns([3, 2])
with left:
    st.subheader("Solver and convergence")
    stages = stage_rows(run)
    if stages.empty:
        st.info("The manifest records no per-stage solver information.")
    else:
        st.dataframe(stages, hide_index=True, key="stage_table")
    details = {k: manifest.get(k) for k in ("tracked_backbone", "approximation") if k in manifest}
    details.update({k: v for k, v in metrics.items() if k.endswith("train_accuracy")})
    if details:
        st.caption(" · ".join(md_escape(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}")
                              for k, v in details.items()))
    excluded = manifest.get("excluded_ids")
    if isinstance(excluded, list) and excluded:
        st.caption(f"This run excluded {len(excluded)} pretraining examples.")
with right:
    st.plotly_chart(confusion_heatmap(confusion_matrix(run)), key="confusion",
                    config={"displayModeBar": False})

st.subheader("Validation")
validation = run.validation
raw_checks = validation.get("checks") if isinstance(validation, dict) else None
if not validation:
    st.info(f"No validation results for this run. Produce them with "
            f"{md_code(f'python -m engine validate {run.path}')} "
            "(writes `validation/summary.json`).")
elif not isinstance(validation, dict):
    st.error("validation/summary.json is not a JSON object; re-run `python -m engine validate`.")
elif "error" in validation:
    st.error(md_escape(validation["error"], limit=1000))
elif raw_checks is not None and not (isinstance(raw_checks, list)
                                     and all(isinstance(c, dict) for c in raw_checks)):
    st.error("validation/summary.json: `checks` is not a list of objects; re-run "
             "`python -m engine validate`.")
else:
    checks = pd.DataFrame(raw_checks or [])
    if checks.empty:
        st.info("validation/summary.json lists no checks.")
    else:
        n_pass = int(checks["passed"].astype(bool).sum()) if "passed" in checks else 0
        (st.success if n_pass == len(checks) else st.warning)(
            f"{n_pass} of {len(checks)} validation checks passed.")
        if "passed" in checks:
            checks.insert(0, "result" if "result" not in checks else "check result",
                          checks["passed"].map({True: "pass", False: "FAIL"}))
        st.dataframe(checks, hide_index=True, key="validation_table")
    scatter = run.path / "validation" / "loo_scatter.json"
    if scatter.is_file():
        try:
            figure = pio.from_json(scatter.read_text())
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
            st.error(f"Cannot read {md_code(scatter)}: {md_escape(exc, limit=500)}")
        else:
            st.plotly_chart(figure, key="loo_scatter")

st.subheader("Which pretraining data help or hurt overall")
groups = group_columns(run)
key = st.radio("Group by", groups, key="ov_group", horizontal=True, bind="query-params",
               help="Pretraining label or a metadata column of the pretraining table "
                    "(`[data] metadata_columns`, e.g. `source`)")
effects = {"all": _group_effects(run.run_id, key, "all", run),
           "misclassified": _group_effects(run.run_id, key, "misclassified", run)}
st.plotly_chart(group_effect_bars({f"all {run.n_test} test points": effects["all"],
                                   f"{n_mis} misclassified test points":
                                       effects["misclassified"]}),
                key="group_bars", config={"displayModeBar": False})
st.caption("Each bar: the predicted change of the mean test loss over those test points if "
           "the whole group were removed (first order: the mean over test points of the summed "
           f"scores of the group's examples), with a {BOOT_LEVEL:.0%} bootstrap interval over "
           f"the test points ({N_BOOT} resamples). A group whose interval lies below zero is "
           "harmful whichever test points are drawn: a candidate false-transfer source.")
ranked = _ranked_sources(effects, key, run)
st.markdown("**Harmful sources, most harmful to the misclassified points first**")
st.dataframe(ranked, hide_index=True, key="group_table", column_config={
    c: st.column_config.NumberColumn(format="%+.3e") for c in ranked.columns
    if c.startswith(("predicted", "pretrained", "finetuned", "low", "high", "actual"))})
if "actual (validation retrain)" not in ranked.columns:
    st.caption("No actual effects yet: `python -m engine validate RUN --source-column "
               f"{md_escape(key)}` retrains without the most harmful groups and fills an "
               "*actual* column here.")

st.subheader("False transfer: pretraining examples behind the misclassified test points")
if n_mis == 0:
    st.info("No misclassified test points: nothing to trace.")
else:
    mis_inf = session.influence_over(run.run_id, "misclassified", run)
    st.caption(f"Scores averaged over the {n_mis} misclassified test points; `n_harmed` / "
               "`n_helped`: how many of them the example harms / helps.")
    k = st.slider("Examples per list", 5, 50, 10, key="ov_k")
    cols = ("total", "pretrained_term", "finetuned_term")
    extra = ["n_harmed", "n_helped", "pretrain_loss"] + [c for c in groups if c != "label"]
    listed: list[str] = []
    for title, frame, tkey in (("Most harmful", most_harmful(mis_inf, k), "ov_harmful"),
                               ("Most helpful", most_helpful(mis_inf, k), "ov_helpful")):
        st.markdown(f"**{title}**")
        display, config = example_table_view(run, frame, cols, extra)
        st.dataframe(display, hide_index=True, column_config=config, key=tkey, row_height=40)
        listed += frame["example_id"].tolist()
    if listed:
        o1, o2 = st.columns([4, 1], vertical_alignment="bottom")
        target = o1.selectbox("Open a pretraining example here (links open a new tab)", listed,
                              key="ov_open_pick")
        o2.button("Open", key="ov_open", on_click=session.open_example, args=(target,))

verdict_section(run)
