"""Server-side speed of the dashboard on a large synthetic run (100,000 x 1,000 by default).

Generates the run once under ``benchmarks/out/bench_runs/`` (reused when its shape matches),
then measures with AppTest (the whole page script, as Streamlit runs it on each rerun):

* first load: a fresh process-wide cache, deep link to a test point (opens the run: SHA-256 of
  every file, memory maps, first page render);
* first load of the overview (per-example means over all and over misclassified test points);
* switching test point (the "Next" button) and changing a filter (sign, top-k), warm cache;

the interactions that rerun only the evidence fragment of the test point page (a filter
change, a flag edit, a map colour change): AppTest always reruns the whole page (it has no way
to rerun one fragment), so the fragment's body (:func:`dashboard.evidence.evidence_body`) is
timed directly, inside a real script run of a small wrapper app: widgets, caches, figure and
table serialization included, websocket transfer and browser rendering not; and, separately,
the pure functions each rerun calls.  Prints every figure with its ratio to the target
(fragment reruns < 0.3 s, switch / whole-page filter < 0.5 s, first load < 5 s).

    python benchmarks/dashboard_bench.py [--n-pretrain 100000 --n-test 1000 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.make_synthetic_run import make_synthetic_run  # noqa: E402

TARGETS = {"first load": 5.0, "switch": 0.5, "filter": 0.5, "fragment": 0.3}

#: Wrapper app for :func:`bench_fragment`: one call of the evidence fragment's body, timed.
FRAGMENT_APP = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import streamlit as st
from dashboard import session
from dashboard.evidence import evidence_body

run = session.load(Path({run_dir!r}))
row = int(st.session_state.get("bench_row", 0))
test_id = str(run.test_points["test_id"].iloc[row])
correct = bool(run.test_points["correct"].iloc[row])
start = time.perf_counter()
evidence_body(run, test_id, row, correct)
st.session_state["bench_body_s"] = time.perf_counter() - start
"""


def _ensure_run(root: Path, n_pretrain: int, n_test: int, seed: int) -> Path:
    run_dir = root / "digits"
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        shapes = json.loads(manifest.read_text()).get("shapes", {})
        if shapes == {"n_test": n_test, "n_pretrain": n_pretrain}:
            print(f"reusing {run_dir}")
            return run_dir
    t = time.perf_counter()
    make_synthetic_run(run_dir, n_pretrain=n_pretrain, n_test=n_test, seed=seed)
    print(f"generated {run_dir} in {time.perf_counter() - t:.1f} s")
    return run_dir


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _report(name: str, seconds: list[float], target: float | None) -> dict:
    med = statistics.median(seconds)
    lo, hi = min(seconds), max(seconds)
    ratio = f"  ({med / target:.2f} x target {target:g} s)" if target else ""
    runs = ", ".join(f"{s:.3f}" for s in seconds)
    print(f"{name:<48} min {lo:6.3f}  median {med:6.3f}  max {hi:6.3f} s{ratio}   [{runs}]")
    return {"name": name, "min_s": lo, "median_s": med, "max_s": hi, "runs_s": seconds,
            "target_s": target}


def bench_app(runs_dir: Path, repeats: int) -> list[dict]:
    """Whole-page timings with AppTest."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["INFLUENCE_RUNS_DIR"] = str(runs_dir)
    app = str(ROOT / "dashboard" / "app.py")
    results = []

    from engine.artifacts import load_run

    run = load_run(runs_dir / "digits", verify_hashes=False)
    mis = run.test_points[~run.test_points["correct"].astype(bool)]["test_id"].astype(str)

    # Cold loads.  AppTest has to run the entry page (the overview) once before it can switch
    # page, so each round times the overview with an empty cache, empties the cache again and
    # times the deep-linked test point page.  The first round also pays the imports (plotly...).
    first_loads, overview_loads = [], []
    for _ in range(max(1, repeats // 2)):
        st.cache_resource.clear()
        at = AppTest.from_file(app, default_timeout=300)
        at.query_params["test_id"] = mis.iloc[0]
        overview_loads.append(_timed(at.run))
        st.cache_resource.clear()
        at.switch_page("views/test_point.py")
        first_loads.append(_timed(at.run))
        assert not at.exception, at.exception
    results.append(_report("first load: overview page (cold cache)", overview_loads,
                           TARGETS["first load"]))
    results.append(_report("first load: test point page (cold cache)", first_loads,
                           TARGETS["first load"]))

    # Warm: switching test point and changing filters on the test point page.
    switches = []
    for _ in range(repeats):
        switches.append(_timed(at.button(key="nav_next").click().run))
        assert not at.exception, at.exception
    results.append(_report("switch test point (Next)", switches, TARGETS["switch"]))
    deep = []
    for tid in run.test_points["test_id"].astype(str).iloc[5:5 + repeats]:
        at.session_state["test_id"] = tid
        deep.append(_timed(at.run))
    results.append(_report("switch test point (set id)", deep, TARGETS["switch"]))
    filters = []
    for sign in (["harmful", "helpful", "both"] * repeats)[:repeats]:
        filters.append(_timed(at.radio(key="f_sign").set_value(sign).run))
        assert not at.exception, at.exception
    results.append(_report("change filter: sign", filters, TARGETS["filter"]))
    topk = []
    for k in ([50, 10, 100, 20] * repeats)[:repeats]:
        topk.append(_timed(at.number_input(key="f_top_k").set_value(k).run))
    results.append(_report("change filter: top-k", topk, TARGETS["filter"]))
    labels = []
    for lab in ([[1], [2, 3], []] * repeats)[:repeats]:
        labels.append(_timed(at.multiselect(key="f_labels").set_value(lab).run))
    results.append(_report("change filter: pretraining label", labels, TARGETS["filter"]))
    return results


def bench_fragment(runs_dir: Path, repeats: int) -> list[dict]:
    """Server time of the evidence fragment's reruns: the body timed inside a script run."""
    from streamlit.testing.v1 import AppTest

    from dashboard.flags import FlagStore
    from engine.artifacts import load_run

    run_dir = runs_dir / "digits"
    run = load_run(run_dir, verify_hashes=False)
    mis_rows = [int(r) for r in
                (~run.test_points["correct"].astype(bool)).to_numpy().nonzero()[0]]
    at = AppTest.from_string(FRAGMENT_APP.format(root=str(ROOT), run_dir=str(run_dir)),
                             default_timeout=300)
    at.session_state["bench_row"] = mis_rows[0] if mis_rows else 0
    at.run()  # opens the run, fills the per-point caches
    assert not at.exception, at.exception
    at.run()

    def body_time(step: Callable[[], object]) -> float:
        step()
        assert not at.exception, at.exception
        return float(at.session_state["bench_body_s"])

    results = []
    signs = (["harmful", "helpful", "both"] * repeats)[:repeats]
    results.append(_report("fragment: filter sign", [
        body_time(at.radio(key="f_sign").set_value(v).run) for v in signs], TARGETS["fragment"]))
    ks = ([50, 10, 100, 20] * repeats)[:repeats]
    results.append(_report("fragment: filter top-k", [
        body_time(at.number_input(key="f_top_k").set_value(k).run) for k in ks],
        TARGETS["fragment"]))
    at.number_input(key="f_top_k").set_value(20).run()
    labels = ([[1], [2, 3], []] * repeats)[:repeats]
    results.append(_report("fragment: filter pretraining label", [
        body_time(at.multiselect(key="f_labels").set_value(v).run) for v in labels],
        TARGETS["fragment"]))
    colours = (["label", "flag", "pretrain_loss", "score"] * repeats)[:repeats]
    results.append(_report("fragment: map colour", [
        body_time(at.selectbox(key="map_colour").set_value(c).run) for c in colours],
        TARGETS["fragment"]))
    everything = []
    for sign in (["both", "harmful"] * repeats)[:repeats]:
        at.radio(key="f_sign").set_value(sign)
        everything.append(body_time(at.number_input(key="f_top_k").set_value(0).run))
        at.number_input(key="f_top_k").set_value(20).run()
    at.radio(key="f_sign").set_value("both").run()
    results.append(_report("fragment: top-k 0 = all rows (1,000-row tables)", everything,
                           TARGETS["fragment"]))

    # A flag edit: the editor's on_change writes the store, then the fragment reruns.  AppTest
    # cannot tick a checkbox in a data_editor, so the write is the store call it makes.
    store = FlagStore.beside_run(run_dir)
    ids = run.pretrain_examples["example_id"].astype(str).tolist()
    tid = str(run.test_points["test_id"].iloc[int(at.session_state["bench_row"])])
    edits = []
    for i in range(repeats):
        start = time.perf_counter()
        store.flag(run.run_id, [ids[i]], "label noise", "", "bench", tid)
        write = time.perf_counter() - start
        edits.append(write + body_time(at.run))
    store.unflag(run.run_id, ids[:repeats], "bench")
    results.append(_report("fragment: flag edit (store write + rerun)", edits,
                           TARGETS["fragment"]))
    return results


def bench_functions(runs_dir: Path, repeats: int) -> list[dict]:
    """The pure functions behind one rerun of the test point page."""
    from dashboard.example_display import thumbnails
    from dashboard.filters import (
        FilterSpec,
        apply_filters,
        example_table,
        map_sample,
        mean_influence,
        score_frame,
    )
    from dashboard.run_details import misclassified_rows
    from dashboard.run_reader import open_run

    results = []
    opened: list = []
    results.append(_report("open_run (the dashboard's, SHA-256 checked)",
                           [_timed(lambda: opened.append(open_run(runs_dir / "digits")))], None))
    run = opened[0]  # score matrices read with preadv, as the dashboard serves them
    ex = example_table(run)
    rows = list(range(0, run.n_test, max(1, run.n_test // repeats)))[:repeats]
    per_row = [_timed(lambda r=r: score_frame(ex, run.scores, r, set())) for r in rows]
    results.append(_report("score_frame (one test point)", per_row, None))
    frame = score_frame(ex, run.scores, rows[0], set())
    spec = FilterSpec()
    results.append(_report("apply_filters (default spec)",
                           [_timed(lambda: apply_filters(frame, spec)) for _ in rows], None))
    results.append(_report("apply_filters (no top-k, sorted)",
                           [_timed(lambda: apply_filters(frame, spec.replace(top_k=None)))
                            for _ in rows], None))
    results.append(_report("map_sample (4,000 points)",
                           [_timed(lambda: map_sample(frame)) for _ in rows], None))
    view = apply_filters(frame, spec)
    results.append(_report("thumbnails for 40 rows",
                           [_timed(lambda: thumbnails(run, view["row"].tolist())) for _ in rows],
                           None))
    from dashboard.evidence_data import build_point_data

    results.append(_report("build_point_data (cached per test point)",
                           [_timed(lambda r=r: build_point_data(ex, run.scores, r))
                            for r in rows], None))
    point = build_point_data(ex, run.scores, rows[0])
    results.append(_report("apply_filters (no top-k) on the cached, sorted frame",
                           [_timed(lambda: apply_filters(point.frame, spec.replace(top_k=None)))
                            for _ in rows], None))
    from dashboard.what_if import what_if

    ids = ex["example_id"].tolist()
    results.append(_report("what_if of a new flag set (point_what_if, flag edit)",
                           [_timed(lambda i=i: what_if(run, ids[i:i + 3])) for i in rows], None))
    results.append(_report("mean_influence over all test points",
                           [_timed(lambda: mean_influence(ex, run.scores,
                                                          range(run.n_test)))], None))
    results.append(_report("mean_influence over misclassified",
                           [_timed(lambda: mean_influence(ex, run.scores,
                                                          misclassified_rows(run)))], None))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=ROOT / "benchmarks" / "out" / "bench_runs")
    p.add_argument("--n-pretrain", type=int, default=100_000)
    p.add_argument("--n-test", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)

    _ensure_run(args.runs_dir, args.n_pretrain, args.n_test, args.seed)
    print(f"\nrun: {args.n_pretrain:,} pretraining examples x {args.n_test:,} test points, "
          f"{os.cpu_count()} CPUs\n")
    print("== pure functions (per rerun) ==")
    funcs = bench_functions(args.runs_dir, args.repeats)
    print("\n== evidence fragment reruns, server side (body timed in a script run) ==")
    fragment = bench_fragment(args.runs_dir, args.repeats)
    print("\n== whole pages, server side (AppTest) ==")
    pages = bench_app(args.runs_dir, args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"functions": funcs, "fragment": fragment,
                                         "pages": pages}, indent=2))
    slow = [r["name"] for r in fragment + pages
            if r["target_s"] and r["median_s"] > r["target_s"]]
    print("\nall page timings within target" if not slow else f"\nover target: {slow}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
