"""Streamlit side of run access: the runs directory, the chosen run, cached read-only loads,
the flag store and the user name.  Nothing here trains or fits anything.

Caches are ``st.cache_resource`` (shared, never copied, never mutated) keyed by the run path and
the manifest's run id / modification time, never by array contents.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboard.filters import example_table, mean_influence
from dashboard.flags import FlagStore
from dashboard.run_details import class_names, label_name, misclassified_rows
from dashboard.runs_dir import default_run, manifest_mtime_ns, resolve_runs_dir, run_names
from engine.artifacts import Run, RunError, load_run, read_manifest

RUN_KEY = "run"
TEST_KEY = "test_id"
EXAMPLE_KEY = "example_id"
USER_KEY = "user_name"
_GOTO_KEY = "_goto_page"


def runs_dir() -> Path:
    """``--runs-dir`` script argument, else ``$INFLUENCE_RUNS_DIR``, else ``<repo>/runs``."""
    return resolve_runs_dir(sys.argv[1:], os.environ)


@st.cache_resource(max_entries=4, show_spinner="Opening run (checking hashes)…")
def _load(path: str, run_id: str, mtime_ns: int) -> Run:
    """Load a run read-only; re-loaded when its manifest (run id, mtime) changes."""
    return load_run(path)


def load(run_dir: Path) -> Run:
    """The run at ``run_dir`` (cached); raises :class:`RunError` if missing/partial/incompatible."""
    manifest = read_manifest(run_dir)
    return _load(str(run_dir), str(manifest["run_id"]), manifest_mtime_ns(run_dir))


def _reset_points() -> None:
    """When the run changes, test / example ids of the previous run no longer apply."""
    st.session_state[TEST_KEY] = ""
    st.session_state[EXAMPLE_KEY] = ""


def run_picker() -> Path | None:
    """Sidebar selectbox of the runs (bound to ``?run=``); returns the chosen run directory,
    or ``None`` (after showing what to do) when there is no run."""
    root = runs_dir()
    names = run_names(root)
    if not names:
        st.error(
            f"No runs found in `{root}`.\n\n"
            "Create the sample run with `python -m engine run sample_data/digits/config.toml "
            "--out runs/digits`, or point the dashboard at another directory with "
            "`streamlit run dashboard/app.py -- --runs-dir DIR` (or `INFLUENCE_RUNS_DIR=DIR`).")
        return None
    first = default_run(names)
    st.sidebar.selectbox("Run", names, index=names.index(first), key=RUN_KEY,
                         bind="query-params", on_change=_reset_points,
                         help=f"Runs found in {root}")
    return root / (st.session_state.get(RUN_KEY) or first)


def chosen_run_dir() -> Path | None:
    """Directory of the run chosen by :func:`run_picker` (``None`` when there is none)."""
    root = runs_dir()
    name = st.session_state.get(RUN_KEY) or default_run(run_names(root))
    return root / name if name else None


def current_run() -> Run:
    """The run chosen in the sidebar (render :func:`run_picker` first).  On a missing, partial
    or incompatible run it shows a clear error with what to do and stops the page."""
    run_dir = chosen_run_dir()
    if run_dir is None:
        st.stop()
    try:
        return load(run_dir)
    except RunError as exc:
        st.error(f"Cannot open run `{run_dir.name}`: {exc}\n\n"
                 "Re-create it with `python -m engine run CONFIG --out "
                 f"{run_dir}` or pick another run in the sidebar.")
        st.stop()
        raise  # unreachable; keeps type checkers happy


@st.cache_resource(max_entries=8)
def examples(run_id: str, _run: Run) -> pd.DataFrame:
    """Cached :func:`dashboard.filters.example_table` of a run (do not mutate)."""
    return example_table(_run)


@st.cache_resource(max_entries=8, show_spinner="Aggregating influence over test points…")
def influence_over(run_id: str, subset: str, _run: Run) -> pd.DataFrame:
    """Per-example mean scores over all test points (``subset="all"``) or the misclassified
    ones (``"misclassified"``), cached per run."""
    rows = (np.arange(_run.n_test) if subset == "all" else misclassified_rows(_run))
    return mean_influence(examples(run_id, _run), _run.scores, rows)


@st.cache_resource(max_entries=8)
def test_index(run_id: str, _run: Run) -> dict[str, int]:
    """test_id -> row of the score matrices."""
    return {str(t): i for i, t in enumerate(_run.test_points["test_id"])}


@st.cache_resource(max_entries=8)
def test_descriptions(run_id: str, _run: Run) -> dict[str, str]:
    """test_id -> one-line description for pickers (correctness, labels, loss)."""
    names = class_names(_run, "finetune")
    tp = _run.test_points
    return {
        str(t): f"{t} · {'correct' if ok else 'misclassified'} · true {label_name(names, int(y))}"
                f" → pred {label_name(names, int(p))} · loss {float(loss):.3f}"
        for t, ok, y, p, loss in zip(tp["test_id"], tp["correct"].astype(bool), tp["label"],
                                     tp["pred"], tp["loss"], strict=True)
    }


@st.cache_resource(max_entries=8)
def example_index(run_id: str, _run: Run) -> dict[str, int]:
    """example_id -> row of the pretraining table (= column of the score matrices)."""
    return {str(e): i for i, e in enumerate(_run.pretrain_examples["example_id"])}


def open_test_point(test_id: str) -> None:
    """Button callback: make ``test_id`` current and go to the test point page on this rerun
    (see :func:`follow_page_request`)."""
    st.session_state[TEST_KEY] = test_id
    st.session_state[_GOTO_KEY] = "views/test_point.py"


def open_example(example_id: str) -> None:
    """Button callback: show ``example_id`` on the example page on this rerun."""
    st.session_state[EXAMPLE_KEY] = example_id
    st.session_state[_GOTO_KEY] = "views/example.py"


def follow_page_request() -> None:
    """Switch page if a callback asked for it.

    ``query_params={}`` drops the query string without raising on URL-bound keys (plain
    ``st.switch_page`` refuses to clear them); the bound widgets (run, test id, example id)
    write their session values back into the URL on the next run.
    """
    target = st.session_state.pop(_GOTO_KEY, None)
    if target:
        st.switch_page(target, query_params={})


def flag_store(run: Run) -> FlagStore:
    """The flag store beside the run directory."""
    return FlagStore.beside_run(run.path)


def user_name() -> str:
    """Who is flagging (sidebar text input, kept for the session; default: the OS user)."""
    return str(st.session_state.get(USER_KEY) or _os_user())


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def sidebar_identity() -> None:
    """Sidebar inputs shared by every page: the test point deep link and the user name."""
    st.sidebar.text_input(
        "Test point id", key=TEST_KEY, bind="query-params",
        help="The current test point; kept in the URL (?test_id=...) across pages and reloads.")
    if USER_KEY not in st.session_state:
        st.session_state[USER_KEY] = _os_user()
    st.sidebar.text_input("Your name (recorded with flags)", key=USER_KEY,
                          persist_state="session")
