"""Server-side speed of the dashboard on a large synthetic run (100,000 x 1,000 by default).

Generates the run once under ``benchmarks/out/bench_runs/`` (reused when its shape matches),
then measures with AppTest (the whole page script, as Streamlit runs it on each rerun):

* first load: a fresh process-wide cache, deep link to a test point (opens the run: SHA-256 of
  every file, memory maps, first page render);
* first load of the overview (per-example means over all and over misclassified test points);
* switching test point (the "Next" button) and changing a filter (sign, top-k), warm cache;

and, separately, the pure functions each rerun of the test point page calls.  Prints every
figure with its ratio to the target (switch / filter < 0.5 s, first load < 5 s).

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

TARGETS = {"first load": 5.0, "switch": 0.5, "filter": 0.5}


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
    ratio = f"  ({med / target:.2f} x target {target:g} s)" if target else ""
    runs = ", ".join(f"{s:.3f}" for s in seconds)
    print(f"{name:<44} median {med:7.3f} s{ratio}   [{runs}]")
    return {"name": name, "median_s": med, "runs_s": seconds, "target_s": target}


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
    from engine.artifacts import load_run

    results = []
    results.append(_report("load_run with SHA-256 check",
                           [_timed(lambda: load_run(runs_dir / "digits"))], None))
    run = load_run(runs_dir / "digits", verify_hashes=False)
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
    print("\n== whole pages, server side (AppTest) ==")
    pages = bench_app(args.runs_dir, args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"functions": funcs, "pages": pages}, indent=2))
    slow = [r["name"] for r in pages if r["target_s"] and r["median_s"] > r["target_s"]]
    print("\nall page timings within target" if not slow else f"\nover target: {slow}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
