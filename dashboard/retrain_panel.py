"""The Flags page's "retrain without the flagged examples" panel (a background job).

The button starts :meth:`dashboard.jobs.JobStore.start_retrain` and returns at once; the job
runs in its own process, so the page never waits for it.  While this run's job is queued or
running, only the status part reruns (``st.fragment(run_every=2)``): progress bar, phase, ETA
(from the parent run's phase times), elapsed time and a Cancel button.  A finished job shows
its outcome: links to the new run and to the comparison page, or the error line and the log.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import streamlit as st

from dashboard.job_progress import PHASE_LABELS, job_progress
from dashboard.jobs import Job, JobError, JobStore, cancel, exclusion
from dashboard.md_escape import md_code, md_escape
from engine.artifacts import Run

NAME_KEY = "retrain_child_name"
CONFIRM_KEY = "retrain_confirm"
START_KEY = "retrain_start"
CANCEL_KEY = "retrain_cancel"
ERROR_KEY = "retrain_error"
START_ERROR_KEY = "retrain_start_error"
_DEFAULT_KEY = "_retrain_default_name"
POLL_S = 2


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min`` (``?`` when unknown)."""
    if seconds is None:
        return "?"
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _cancel(runs_dir: Path, job_id: str) -> None:
    try:
        cancel(runs_dir, job_id)
    except (JobError, OSError) as exc:
        st.session_state[ERROR_KEY] = f"Could not cancel job {job_id}: {exc}"


def _start(runs_dir: Path, parent: Path, flagged: list[str], user: str,
           flagged_finetune: list[str]) -> None:
    """The start button's callback: runs before the page, so the page shows the new job."""
    name = str(st.session_state.get(NAME_KEY) or "").strip() or None
    try:
        JobStore(runs_dir).start_retrain(parent, flagged, name, user,
                                         bool(st.session_state.get(CONFIRM_KEY)),
                                         flagged_finetune)
    except (JobError, OSError) as exc:
        st.session_state[START_ERROR_KEY] = f"Could not start the retrain: {exc}"


def _links(job: Job) -> str:
    child, parent = quote(job.child_run), quote(job.parent_run)
    return (f"[Open run {md_escape(job.child_run)}](?run={child}) · "
            f"[Compare with {md_escape(job.parent_run)}](compare?run={parent}&compare={child})")


def _finished(job: Job) -> None:
    """A job's outcome."""
    head = (f"Job {md_code(job.job_id)} → run {md_code(job.child_run)} "
            f"(without {job.n_excluded} examples), finished {_when(job.finished_at)}")
    if job.status == "succeeded":
        st.success(f"{head}: **succeeded**. {md_escape(job.message)}",
                   icon=":material/check_circle:")
        st.markdown(_links(job))
    elif job.status == "cancelled":
        st.info(f"{head}: **cancelled**. {md_escape(job.message)}", icon=":material/cancel:")
    else:
        st.error(f"{head}: **failed**: {md_escape(job.message or 'no message')}. "
                 f"Log: {md_code(job.log_path)}", icon=":material/error:")


def _live(runs_dir: Path, job_id: str) -> None:
    """The status of a queued/running job (the body of a polling fragment)."""
    try:
        job = JobStore(runs_dir).get(job_id)
    except JobError as exc:
        st.error(f"Cannot read the retrain job: {exc}", icon=":material/error:")
        return
    if job is None or not job.active:
        st.rerun()   # the whole page: the start button is free again, polling stops
        return
    p = job_progress(job)
    eta = (f"about {duration(p.eta_s)} left (ETA from the parent run's phase times)"
           if p.eta_s is not None else "no ETA (the parent run recorded no phase times)")
    steps = f" {p.done}/{p.total}" if p.done is not None and p.total else ""
    st.markdown(f"Job {md_code(job.job_id)} ({job.status}) → run {md_code(job.child_run)}, "
                f"started {_when(job.started_at or job.created_at)}"
                + (f" by {md_escape(job.user)}" if job.user else ""))
    label = PHASE_LABELS.get(p.phase, md_escape(p.phase))
    st.progress(p.fraction, text=f"{label}{steps} · elapsed {duration(p.elapsed_s)} · {eta}")
    if p.message:
        st.caption(md_escape(p.message))
    if job.cancel_requested:
        st.info("Cancelling: the engine is removing its partial files…",
                icon=":material/hourglass_top:")
    st.button("Cancel", key=CANCEL_KEY, on_click=_cancel, args=(runs_dir, job.job_id),
              disabled=job.cancel_requested, icon=":material/stop_circle:")
    error = st.session_state.pop(ERROR_KEY, None)
    if error:
        st.error(md_escape(error), icon=":material/error:")


def _history(jobs: list[Job]) -> None:
    with st.expander(f"Retrain jobs of this run ({len(jobs)})"):
        st.dataframe(pd.DataFrame({
            "job": [j.job_id for j in jobs], "new run": [j.child_run for j in jobs],
            "status": [j.status for j in jobs], "excluded": [j.n_excluded for j in jobs],
            "who": [j.user for j in jobs], "started": [_when(j.started_at) for j in jobs],
            "finished": [_when(j.finished_at) for j in jobs],
            "message": [j.message for j in jobs]}), hide_index=True, key="retrain_jobs_table")


def retrain_panel(run: Run, flagged_ids: Collection[str], runs_dir: Path, user: str = "",
                  flagged_finetune_ids: Collection[str] = ()) -> None:
    """Start, follow and cancel "retrain without the flagged examples" for ``run``.

    ``flagged_ids``: the run's flagged pretraining example ids; ``flagged_finetune_ids``: its
    flagged finetuning example ids (``--exclude-finetune``); ``runs_dir``: where the new run
    and ``jobs.sqlite`` go; ``user``: recorded with the job.
    """
    store = JobStore(runs_dir)
    parent = run.path.name
    try:
        jobs = store.jobs(parent)
        default = store.default_child_name(parent, len(flagged_ids) + len(flagged_finetune_ids))
    except JobError as exc:
        st.error(f"Cannot read retrain jobs: {exc}", icon=":material/error:")
        return
    job = next((j for j in jobs if j.active), jobs[0] if jobs else None)
    busy = job is not None and job.active
    ids, m = exclusion(run.manifest, flagged_ids)
    n, n_ft = len(flagged_ids), len(flagged_finetune_ids)
    what = (f"{n} flagged examples" if not n_ft else f"{n} flagged pretraining and {n_ft} "
            "flagged finetuning examples")
    if st.session_state.get(_DEFAULT_KEY) != default or NAME_KEY not in st.session_state:
        st.session_state[_DEFAULT_KEY] = st.session_state[NAME_KEY] = default   # a new default
    st.text_input("New run name (a directory in the runs directory)", key=NAME_KEY,
                         disabled=busy)
    before = len(ids) - n
    st.caption(f"Runs `python -m engine run` on this run's config in the background, without "
               f"the {what}" + (f" and the {before} this run already excluded"
                                              if before else "")
               + "; the new run records this run as its parent. You can leave the page.")
    yes = False
    if 2 * len(ids) > m:
        yes = st.checkbox(f"Yes, retrain without {len(ids)} of the {m} pretraining examples "
                          "(more than half)", key=CONFIRM_KEY, disabled=busy)
    st.button(f"Retrain without the {what}", key=START_KEY, type="primary",
              disabled=busy or n + n_ft == 0 or (2 * len(ids) > m and not yes),
              icon=":material/model_training:", on_click=_start,
              args=(runs_dir, run.path, sorted(flagged_ids), user, sorted(flagged_finetune_ids)))
    error = st.session_state.pop(START_ERROR_KEY, None)
    if error:
        st.error(md_escape(error), icon=":material/error:")
    if job is None:
        return
    if job.active:
        st.fragment(_live, run_every=POLL_S)(runs_dir, job.job_id)
    else:
        _finished(job)
    _history(jobs)
