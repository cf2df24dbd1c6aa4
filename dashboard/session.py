"""Streamlit side of run access: the runs directory, the chosen run, cached read-only loads,
the flag store and the user name.  Nothing here trains or fits anything.

Runs are opened with :func:`dashboard.run_reader.open_run` (hashes checked, no memory maps:
see that module for why) and cached with ``st.cache_resource`` (shared, never copied, never
mutated) keyed by the run path and its :func:`~dashboard.runs_dir.fingerprint` (size, mtime and
inode of every file of the run), taken on every rerun: a run changed on disk is re-opened and
its hashes checked again.  Derived tables are cached per run id, never keyed by array contents.

The ``?run=`` value is matched against the listing of the runs directory (never used as a
path): an unknown, path-like, empty or hidden name shows that no such run exists and offers the
runs that do, and a run deleted while open says so; neither silently opens another run.
"""

from __future__ import annotations

import getpass
import logging
import os
import sqlite3
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import flags as flag_module
from dashboard.filters import example_table, mean_influence
from dashboard.flags import FlagStore
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import class_names, label_name, misclassified_rows
from dashboard.run_reader import open_run
from dashboard.runs_dir import (
    default_run,
    fingerprint,
    resolve_runs_dir,
    run_names,
    run_path,
    runs_dir_problem,
)
from engine.artifacts import Run, RunError, read_manifest

RUN_KEY = "run"
TEST_KEY = "test_id"
EXAMPLE_KEY = "example_id"
USER_KEY = "user_name"
RUN_CHOICE_KEY = "run_choice"
_GOTO_KEY = "_goto_page"
_WANTED_KEY = "_run_wanted"  # a requested run that is not there (kept until another is chosen)
#: The flag store's error class (``dashboard.flags.FlagStoreError``; sqlite3's before it existed).
FLAG_STORE_ERROR: type[Exception] = getattr(flag_module, "FlagStoreError", sqlite3.Error)
#: Errors of the run files, the flag store and the data that a page shows as one message
#: instead of a traceback (RunError is a ValueError).
PAGE_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, sqlite3.Error, FLAG_STORE_ERROR)
MAX_LINKS = 30
_LOG = logging.getLogger(__name__)


def runs_dir() -> Path:
    """``--runs-dir`` script argument, else ``$INFLUENCE_RUNS_DIR``, else ``<repo>/runs``."""
    return resolve_runs_dir(sys.argv[1:], os.environ)


@st.cache_resource(max_entries=4, show_spinner="Opening run (checking hashes)…")
def _load(path: str, run_fingerprint: str) -> Run:
    """Open a run read-only; re-opened (hashes checked again) when any of its files changes."""
    return open_run(path)


def load(run_dir: Path) -> Run:
    """The run at ``run_dir`` (cached); raises :class:`RunError` if missing, partial, malformed,
    incompatible or changed into something that no longer matches its hashes."""
    try:
        manifest = read_manifest(run_dir)
        current = fingerprint(run_dir, manifest)
    except RunError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, OSError) as exc:
        raise RunError(f"{run_dir}/manifest.json cannot be used ({type(exc).__name__}: "
                       f"{exc}). Re-run `python -m engine run`.") from exc
    return _load(str(run_dir), current)


def _kept_id(key: str, present: bool) -> None:
    if not present:
        st.session_state[key] = ""


def _reset_points() -> None:
    """When the run changes, keep the test point and the example when the new run has them
    (comparing a run with its retrain, for instance), clear them otherwise."""
    test_id = str(st.session_state.get(TEST_KEY) or "").strip()
    example_id = str(st.session_state.get(EXAMPLE_KEY) or "").strip()
    run_dir = run_path(runs_dir(), str(st.session_state.get(RUN_KEY) or ""))
    try:
        run = load(run_dir) if run_dir is not None and (test_id or example_id) else None
    except RunError:
        run = None  # the page says what is wrong with the run; ids of another run do not apply
    _kept_id(TEST_KEY, run is not None and test_id in test_index(run.run_id, run))
    _kept_id(EXAMPLE_KEY, run is not None and example_id in example_index(run.run_id, run))


def _requested_run() -> str | None:
    """The run this session asks for: a missing one asked for earlier, else the picker's value,
    else ``?run=`` (last value when repeated), else ``None`` (the default run)."""
    if _WANTED_KEY in st.session_state:
        return str(st.session_state[_WANTED_KEY])
    if st.session_state.get(RUN_KEY) is not None:
        return str(st.session_state[RUN_KEY])
    if RUN_KEY in st.query_params:
        return st.query_params.get_all(RUN_KEY)[-1]
    return None


def _choose_run() -> None:
    """``on_change`` of the picker shown when the requested run does not exist."""
    choice = st.session_state.get(RUN_CHOICE_KEY)
    if choice:  # test / example ids stay: they may belong to the run meant by the bad name
        st.session_state.pop(_WANTED_KEY, None)
        st.session_state[RUN_KEY] = choice


def _no_runs(root: Path) -> None:
    problem = runs_dir_problem(root)
    where = f"The runs directory {md_code(root)} {problem}." if problem else \
        f"No runs found in {md_code(root)}."
    st.error(
        f"{where}\n\n"
        "Create the sample run with `python -m engine run sample_data/digits/config.toml "
        "--out runs/digits`, or point the dashboard at another directory with "
        "`streamlit run dashboard/app.py -- --runs-dir DIR` (or `INFLUENCE_RUNS_DIR=DIR`).")


def _missing_run(root: Path, wanted: str, names: list[str]) -> None:
    """Say that ``wanted`` is not a run and offer the runs that are (picker and links)."""
    if not wanted.strip():
        what = "The URL names no run (`?run=` is empty)"
    else:
        what = f"There is no run {md_code(wanted)} in {md_code(root)}"
    why = ""
    if "/" in wanted or wanted.startswith("."):
        why = (" Run names are the names of the (non-hidden) directories in the runs "
               "directory; paths are not accepted.")
    elif wanted.strip():
        why = " It may have been deleted or renamed, or the link has a typo."
    st.error(f"{what}, so no run is open.{why} Pick one of the {len(names)} runs below.",
             icon=":material/error:")
    st.selectbox("Open a run", names, index=None, key=RUN_CHOICE_KEY, on_change=_choose_run,
                 placeholder="choose a run")
    links = " · ".join(f"[{md_escape(n)}](?run={quote(n, safe='')})" for n in names[:MAX_LINKS])
    more = f" (and {len(names) - MAX_LINKS} more in the picker)" if len(names) > MAX_LINKS else ""
    st.markdown(f"Or open one in a fresh view: {links}{more}")


def run_picker() -> Path | None:
    """Sidebar selectbox of the runs (bound to ``?run=``); returns the chosen run directory,
    or ``None`` (after showing what to do) when there is no run or the requested one is not
    there (unknown, path-like, empty, hidden or deleted name: never silently another run)."""
    root = runs_dir()
    names = run_names(root)
    if not names:
        _no_runs(root)
        return None
    wanted = _requested_run()
    if wanted is not None and run_path(root, wanted) is None:
        st.session_state[_WANTED_KEY] = wanted
        _missing_run(root, wanted, names)
        return None
    st.session_state.pop(_WANTED_KEY, None)
    first = default_run(names)
    st.sidebar.selectbox("Run", names, index=names.index(first), key=RUN_KEY,
                         bind="query-params", on_change=_reset_points,
                         help=f"Runs found in {md_escape(root)}")
    return run_path(root, st.session_state.get(RUN_KEY) or first)


def chosen_run_dir() -> Path | None:
    """Directory of the run chosen by :func:`run_picker` (``None`` when there is none or it is
    not, or no longer, one of the runs in the runs directory)."""
    root = runs_dir()
    name = st.session_state.get(RUN_KEY) or default_run(run_names(root))
    return run_path(root, name)


def current_run() -> Run:
    """The run chosen in the sidebar (render :func:`run_picker` first).  On a missing, partial,
    malformed or changed run it shows a clear error with what to do and stops the page."""
    run_dir = chosen_run_dir()
    if run_dir is None:
        name = st.session_state.get(RUN_KEY)
        if name:
            st.error(f"Run {md_code(name)} is no longer in {md_code(runs_dir())} (deleted or "
                     "renamed?). Pick another run in the sidebar.", icon=":material/error:")
        st.stop()
    try:
        return load(run_dir)
    except RunError as exc:
        st.error(f"Cannot open run {md_code(run_dir.name)}: {md_escape(exc, limit=1500)}\n\n"
                 f"Re-create it with {md_code(f'python -m engine run CONFIG --out {run_dir}')}"
                 " or pick another run in the sidebar.", icon=":material/error:")
        st.stop()
        raise  # unreachable; keeps type checkers happy


def show_page_error(exc: BaseException) -> None:
    """One clear message for an error of :data:`PAGE_ERRORS` raised while a page ran (the
    traceback goes to the server log only)."""
    _LOG.warning("page stopped by %s", type(exc).__name__, exc_info=exc)
    name = st.session_state.get(RUN_KEY) or "?"
    detail = md_escape(f"{type(exc).__name__}: {exc}", limit=1500)
    if isinstance(exc, FLAG_STORE_ERROR) and not isinstance(exc, sqlite3.Error):
        st.error(f"Cannot read flags: {md_escape(exc, limit=1500)}", icon=":material/error:")
    elif isinstance(exc, sqlite3.Error):
        st.error(f"The flag store (`flags.sqlite` beside the run directories) cannot be read: "
                 f"{detail}. Move the file aside to start a new one, or fix its permissions.",
                 icon=":material/error:")
    elif isinstance(exc, RunError):
        st.error(f"Run {md_code(name)} cannot be shown: {detail}", icon=":material/error:")
    else:
        st.error(f"This page cannot be shown for run {md_code(name)}: {detail}. Reload the page; "
                 "if it persists, re-create the run with `python -m engine run`.",
                 icon=":material/error:")


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


def flag_store(run: Run, stage: str = "pretrain") -> FlagStore:
    """The flag store beside the run directory (``stage``: pretraining or finetuning
    examples)."""
    return FlagStore.beside_run(run.path, stage)


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
