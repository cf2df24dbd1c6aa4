"""Retrain jobs started from the dashboard: real engine and runner subprocesses, no mocks.

A parent run of the small config is built once per module (``python -m engine run``); each test
copies it into its own runs directory.  Jobs that must still be running when the test acts on
them are held with ``INFLUENCE_PAUSE_AT=training`` (inherited by the engine subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest

from dashboard.job_progress import job_progress, read_events
from dashboard.jobs import DISAPPEARED, Job, JobError, JobStore, pid_start_time, start_retrain
from engine import artifacts
from engine.ids_file import ids_text
from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def engine(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def parent_run(small_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parent") / "parent"
    proc = engine("run", small_config, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def runs(parent_run, tmp_path) -> Path:
    """A runs directory holding a copy of the parent run (as ``parent``)."""
    root = tmp_path / "runs"
    shutil.copytree(parent_run, root / "parent")
    return root


@pytest.fixture(scope="module")
def finished_runs(parent_run, tmp_path_factory) -> tuple[Path, str, list[str]]:
    """A runs directory where a retrain job of ``parent`` without 5 examples ran to its end:
    (runs dir, job id, excluded ids)."""
    root = tmp_path_factory.mktemp("finished") / "runs"
    shutil.copytree(parent_run, root / "parent")
    ids = example_ids(root / "parent")[:5]
    t0 = time.monotonic()
    job = start_retrain(root, root / "parent", ids, user="tester")
    assert time.monotonic() - t0 < 5, "start_retrain must return at once"
    assert job.active and job.child_run == "parent-minus-5-flagged" and job.user == "tester"
    finished(JobStore(root), job.job_id)
    return root, job.job_id, ids


@pytest.fixture(scope="module")
def yes_run(small_config, parent_run, tmp_path_factory) -> Path:
    """``engine run --exclude <80 of 150> --yes --progress-file``: the run directory (its
    progress file and output beside it)."""
    d = tmp_path_factory.mktemp("yes")
    many = d / "many.txt"
    many.write_text(ids_text(example_ids(parent_run)[:80]))
    proc = engine("run", small_config, "--out", d / "yes", "--exclude", many, "--yes",
                  "--progress-file", d / "progress.jsonl")
    (d / "stdout.txt").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    return d / "yes"


@pytest.fixture
def paused(monkeypatch):
    monkeypatch.setenv("INFLUENCE_PAUSE_AT", "training")
    monkeypatch.setenv("INFLUENCE_PAUSE_SECONDS", "300")


def example_ids(run_dir: Path) -> list[str]:
    return artifacts.load_run(run_dir).pretrain_examples["example_id"].tolist()


def wait_for(predicate, timeout: float = 600.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def finished(store: JobStore, job_id: str, timeout: float = 600.0):
    return wait_for(lambda: (j := store.get(job_id)) and not j.active and j, timeout,
                    f"job {job_id} to finish")


def leftovers(runs: Path) -> list[str]:
    """Hidden entries of the runs directory other than the job files."""
    return sorted(p.name for p in runs.iterdir() if p.name.startswith(".") and p.name != ".jobs")


def test_job_completes_and_is_kept_across_restarts(finished_runs):
    runs, job_id, ids = finished_runs
    done = JobStore(runs).get(job_id)
    assert done.status == "succeeded", done.message
    assert done.returncode == 0 and done.message.startswith("wrote ")
    child = artifacts.load_run(runs / done.child_run)
    parent_id = artifacts.read_manifest(runs / "parent")["run_id"]
    assert child.manifest["parent"] == {"run_id": parent_id, "name": "parent"}
    assert child.manifest["excluded_ids"] == ids
    assert child.n_pretrain == 145
    assert engine("verify", runs / done.child_run).returncode == 0
    # A new store (a restarted server) still reports the finished job.
    again = JobStore(runs)
    assert again.get(job_id).status == "succeeded"
    assert [j.job_id for j in again.jobs("parent")] == [job_id]
    assert again.latest("parent").job_id == job_id
    events = read_events(done.progress_path)
    assert events[0]["phase"] == "load" and events[-1]["phase"] == "done"
    assert job_progress(done).fraction == 1.0
    # The default name of the next retrain does not collide with the new run.
    assert again.default_child_name("parent", 5) == "parent-minus-5-flagged-2"
    assert leftovers(runs) == []


def test_one_job_per_run_then_cancel(runs, paused):
    ids = example_ids(runs / "parent")
    store = JobStore(runs)
    job = store.start_retrain(runs / "parent", ids[:4])
    with pytest.raises(JobError, match="already running"):
        store.start_retrain(runs / "parent", ids[:3], child_name="other")
    # Cancel once the engine reports a phase (it is then held before training).
    wait_for(lambda: any(e["phase"] == "pretrain" for e in read_events(job.progress_path)),
             what="the pretrain phase")
    assert job_progress(store.get(job.job_id)).phase == "pretrain"
    store.cancel(job.job_id)
    done = finished(store, job.job_id, timeout=300)
    assert done.status == "cancelled" and done.cancel_requested, done.message
    assert done.returncode == 130
    assert "interrupted; nothing was written" in Path(done.log_path).read_text()
    assert not (runs / done.child_run).exists()
    assert leftovers(runs) == []
    assert store.cancel(done.job_id).status == "cancelled"   # a finished job stays as it is


def test_dead_runner_is_reconciled(runs, paused):
    store = JobStore(runs)
    job = store.start_retrain(runs / "parent", example_ids(runs / "parent")[:2])
    job = wait_for(lambda: (j := store.get(job.job_id)).engine_pid and j, what="the engine")
    os.killpg(job.pid, signal.SIGKILL)   # runner and engine: as if the machine restarted
    wait_for(lambda: pid_start_time(job.pid) is None and pid_start_time(job.engine_pid) is None,
             what="the processes to die")
    failed = store.get(job.job_id)
    assert failed.status == "failed" and failed.message == DISAPPEARED
    assert leftovers(runs) == []   # the killed engine's staging directory was removed
    assert JobStore(runs).get(job.job_id).status == "failed"   # stored, not just shown
    # A "running" row whose pid is now another process (this one: start time differs) and
    # whose run directory is complete: succeeded, and nothing is signalled.
    store.update(job.job_id, only_active=False, status="running", pid=os.getpid(),
                 pid_start=1, engine_pid=None, engine_pid_start=None)
    shutil.copytree(runs / "parent", runs / job.child_run)
    assert store.cancel(job.job_id).status == "succeeded"


def test_cli_yes_and_parent(small_config, parent_run, yes_run, tmp_path):
    ids = example_ids(parent_run)
    many = tmp_path / "many.txt"
    many.write_text(ids_text(ids[:80]))
    t0 = time.monotonic()
    refused = engine("run", small_config, "--out", tmp_path / "no", "--exclude", many)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --exclude removes 80 of 150 pretraining examples (more than half); pass --yes "
        "if that is intended")
    assert "trained:" not in refused.stdout and not (tmp_path / "no").exists()
    assert list(tmp_path.glob(".no.*")) == []
    assert time.monotonic() - t0 < 60
    bad = engine("run", small_config, "--out", tmp_path / "np", "--parent", tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith(f"error: --parent {tmp_path} is not a readable run")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "np").exists()

    assert "WARNING: --exclude removes 80 of 150" in (yes_run.parent / "stdout.txt").read_text()
    manifest = artifacts.read_manifest(yes_run)
    assert manifest["excluded_ids"] == ids[:80] and "parent" not in manifest


def test_start_refusals(runs):
    ids = example_ids(runs / "parent")
    store = JobStore(runs)
    with pytest.raises(JobError, match="more than half"):
        store.start_retrain(runs / "parent", ids[:80])
    for name in ("../x", ".hidden", "a/b", " padded", "new\nline"):
        with pytest.raises(JobError, match="plain directory name"):
            store.start_retrain(runs / "parent", ids[:2], child_name=name)
    (runs / "taken").mkdir()
    with pytest.raises(JobError, match="already exists"):
        store.start_retrain(runs / "parent", ids[:2], child_name="taken")
    with pytest.raises(JobError, match="no examples are flagged"):
        store.start_retrain(runs / "parent", [])
    with pytest.raises(JobError, match="cannot retrain"):
        store.start_retrain(runs / "taken", ids[:2])
    assert store.jobs() == []
    # A damaged jobs file is reported in one line and left as it is.
    (runs / "jobs.sqlite").write_bytes(b"not a database" * 20)
    with pytest.raises(JobError, match="not an SQLite database") as err:
        store.jobs()
    assert "\n" not in str(err.value)
    with pytest.raises(JobError, match="not an SQLite database"):
        store.start_retrain(runs / "parent", ids[:2])
    assert (runs / "jobs.sqlite").read_bytes() == b"not a database" * 20


# Phase times of a parent run (seconds; "write" is the rest of "total": 0.3 s).
TIMINGS = {"load": 0.1, "pretrain": 2.0, "finetune": 0.2, "evaluate": 0.1, "influence": 0.3,
           "pretrain_solve": 0.1, "scoring": 0.1, "map": 1.0, "total": 4.0}


def test_progress_and_eta_from_a_real_progress_file(parent_run, yes_run, tmp_path):
    events = read_events(yes_run.parent / "progress.jsonl")
    phases = [e["phase"] for e in events if e["event"] == "start"]
    assert phases == ["load", "pretrain", "finetune", "evaluate", "influence", "map",
                      "finetune_influence", "write"]
    assert events[-1]["phase"] == "done" and events[-1]["message"].startswith("wrote ")
    assert set(events[0]) == {"t", "phase", "done", "total", "message", "event"}
    # A copy of the file, cut just after pretraining started, plus a half-written line.
    start = next(e for e in events if e["phase"] == "pretrain")
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps(e) + "\n" for e in events[:events.index(start) + 1])
                   + '{"t": 1, "pha')
    job = Job(**{f.name: None for f in fields(Job)})
    job = replace(job, job_id="j", status="running", created_at=start["t"] - 5,
                  started_at=start["t"] - 5, progress_path=str(cut), parent_timings=TIMINGS,
                  message="")
    p = job_progress(job, now=start["t"] + 0.5)
    assert p.phase == "pretrain" and p.elapsed_s == pytest.approx(5.5)
    assert p.eta_s == pytest.approx(1.5 + 1.9)   # 2.0 - 0.5, then the phases after it
    assert 0.02 < p.fraction < 0.5 and p.message == "pretraining"
    real = replace(job, parent_timings=artifacts.read_manifest(parent_run)["timings"])
    assert job_progress(real, now=start["t"] + 0.5).eta_s > 0
    # During scoring, done/total refines the current phase: 1/4 done in 3 s -> 9 s left.
    t = start["t"] + 10
    lines = [{"t": t, "phase": "influence", "event": "start", "done": None, "total": None,
              "message": "scoring"},
             {"t": t + 3, "phase": "influence", "event": "progress", "done": 25, "total": 100,
              "message": "per-example gradients"}]
    cut.write_text("".join(json.dumps(e) + "\n" for e in lines))
    p = job_progress(job, now=t + 3)
    assert (p.phase, p.done, p.total, p.message) == ("influence", 25, 100,
                                                      "per-example gradients")
    assert p.eta_s == pytest.approx(9 + 1.0 + 0.3)
    # Slower than the parent so far (pretraining took twice as long): the rest is scaled.
    lines = [{"t": t, "phase": "pretrain", "event": "start"},
             {"t": t + 4.0, "phase": "pretrain", "event": "end"}]
    cut.write_text("".join(json.dumps(e) + "\n" for e in lines))
    p = job_progress(job, now=t + 4.0)
    assert p.phase == "finetune" and p.eta_s == pytest.approx(0.2 + 2 * (0.1 + 0.3 + 1.0 + 0.3))
    # No progress yet: "starting", the parent's whole time as the ETA; finished: no ETA.
    cut.write_text("")
    assert job_progress(job, now=t).phase == "starting"
    assert job_progress(job, now=t).eta_s == pytest.approx(4.0)
    assert job_progress(replace(job, parent_timings={}), now=t).eta_s is None
    ended = job_progress(replace(job, status="succeeded", finished_at=t + 60))
    assert (ended.fraction, ended.eta_s, ended.elapsed_s) == (1.0, None, pytest.approx(75.0))


def _panel_page(runs_dir: str, parent: str, flagged: list[str]) -> None:
    from pathlib import Path

    from dashboard.retrain_panel import retrain_panel
    from engine.artifacts import load_run

    retrain_panel(load_run(Path(runs_dir) / parent), flagged, Path(runs_dir), user="tester")


def test_panel_starts_follows_and_cancels_a_job(runs, paused):
    from streamlit.testing.v1 import AppTest

    flagged = example_ids(runs / "parent")[:6]
    at = AppTest.from_function(_panel_page, args=(str(runs), "parent", flagged),
                               default_timeout=60)
    at.run()
    assert not at.exception
    assert at.text_input(key="retrain_child_name").value == "parent-minus-6-flagged"
    start = at.button(key="retrain_start")
    assert start.label == "Retrain without the 6 flagged examples" and not start.disabled
    start.click().run()
    assert not at.exception
    assert at.button(key="retrain_start").disabled   # one job per run
    assert any("parent-minus-6-flagged" in m.value for m in at.markdown)
    assert "ETA from the parent run's phase times" in at.get("progress")[0].proto.text
    job = JobStore(runs).latest("parent")
    assert job.user == "tester" and job.active and job.n_excluded == 6
    at.button(key="retrain_cancel").click().run()
    assert not at.exception
    finished(JobStore(runs), job.job_id, timeout=300)
    at.run()
    assert not at.exception
    assert "cancelled" in at.info[0].value
    assert not at.button(key="retrain_start").disabled
    assert leftovers(runs) == [] and not (runs / job.child_run).exists()


def test_panel_shows_a_finished_job_with_links(finished_runs):
    from streamlit.testing.v1 import AppTest

    runs, job_id, _ = finished_runs
    at = AppTest.from_function(_panel_page, args=(str(runs), "parent", ["x"]),
                               default_timeout=60)
    at.run()
    assert not at.exception
    assert "succeeded" in at.success[0].value and job_id in at.success[0].value
    links = " ".join(m.value for m in at.markdown)
    assert "(?run=parent-minus-5-flagged)" in links
    assert "(compare?run=parent&compare=parent-minus-5-flagged)" in links
    assert not at.button(key="retrain_start").disabled
    assert at.text_input(key="retrain_child_name").value == "parent-minus-1-flagged"


def test_panel_asks_before_excluding_most_data(runs):
    from streamlit.testing.v1 import AppTest

    flagged = example_ids(runs / "parent")[:100]
    at = AppTest.from_function(_panel_page, args=(str(runs), "parent", flagged),
                               default_timeout=60)
    at.run()
    assert not at.exception
    assert at.button(key="retrain_start").disabled
    at.checkbox(key="retrain_confirm").check().run()
    assert not at.button(key="retrain_start").disabled
    assert JobStore(runs).jobs() == []
