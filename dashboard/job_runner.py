"""Supervisor of one retrain job: ``python -m dashboard.job_runner --db JOBS_DB --job-id ID``.

Started by :meth:`dashboard.jobs.JobStore.start_retrain` in its own session (so it outlives
the dashboard), with stdout/stderr appended to the job's log.  It records itself, runs the
job's engine command as its child (same process group, output into the same log), and when
the engine exits writes the job's final status into the jobs table:

* ``succeeded``: the child run directory is complete (normally exit code 0);
* ``cancelled``: a cancel was requested (:meth:`~dashboard.jobs.JobStore.cancel`) and nothing
  was written;
* ``failed``: anything else, with the engine's last ``error: ...`` line as the message.

SIGTERM: a cancel sends it to the whole process group, so the engine has it already; one sent
to this process alone (no cancel recorded) is forwarded to the engine, once.  The engine
removes its staging directory and exits 130 (``interrupted; nothing was written``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# SIGTERM (a cancel) only sets a flag; installed before the slower imports below when run as
# a program, so an early cancel is not lost.
_SIGNALLED: list[int] = []
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: _SIGNALLED.append(signum))

from dashboard.jobs import (  # noqa: E402
    REPO_ROOT,
    Job,
    JobError,
    JobStore,
    _env,
    child_complete,
    pid_start_time,
)

POLL_S = 0.25
FINISH_RETRY_S = 60.0


def _say(job_id: str, text: str) -> None:
    print(f"[job {job_id} {time.strftime('%H:%M:%S')}] {text}", flush=True)


def last_line(log_path: str | Path, prefixes: tuple[str, ...] = ("error:", "interrupted;"),
              tail_bytes: int = 65536) -> str:
    """The last line of the log starting with one of ``prefixes`` (else the last line that
    is not this runner's own, else ``""``)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(fh.tell() - tail_bytes, 0))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n")]
    lines = [ln for ln in lines if ln and not ln.startswith("[job ")]
    for ln in reversed(lines):
        if ln.startswith(prefixes):
            return ln
    return lines[-1] if lines else ""


def outcome(job: Job, runs_dir: Path, rc: int, cancel_requested: bool, signalled: bool
            ) -> tuple[str, str]:
    """The final ``(status, message)`` of a job whose engine exited with ``rc``."""
    if child_complete(runs_dir / job.child_run):
        if rc == 0:
            return "succeeded", last_line(job.log_path, ("wrote ",)) or f"wrote {job.child_run}"
        return "succeeded", f"wrote {job.child_run} completely (the cancel came too late)"
    if cancel_requested:
        return "cancelled", "cancelled; nothing was written"
    line = last_line(job.log_path)
    if rc < 0:
        line = line or f"the engine was killed by signal {-rc}"
    elif signalled and not line:
        line = "interrupted by a signal; nothing was written"
    return "failed", line or f"the engine exited with code {rc}"


def _finish(store: JobStore, job: Job, status: str, rc: int | None, message: str) -> None:
    """Record the end, retrying while the store is busy (reconciliation covers the rest)."""
    deadline = time.monotonic() + FINISH_RETRY_S
    while True:
        try:
            store.update(job.job_id, status=status, returncode=rc, message=message,
                         finished_at=time.time())
            _say(job.job_id, f"{status}: {message}")
            return
        except JobError as exc:
            if time.monotonic() > deadline:
                _say(job.job_id, f"could not record the end ({status}): {exc}")
                return
            time.sleep(1.0)


def run_job(store: JobStore, job_id: str) -> int:
    """Run one job to its end; returns this process's exit code."""
    signalled = _SIGNALLED
    signal.signal(signal.SIGTERM, lambda signum, frame: signalled.append(signum))
    job = store.get(job_id)
    if job is None or not job.active:
        _say(job_id, "nothing to do: " + (f"the job is {job.status}" if job else "no such job"))
        return 1 if job is None else 0
    pid = os.getpid()
    store.update(job_id, status="running", pid=pid, pid_start=pid_start_time(pid),
                 started_at=time.time())
    current = store.get(job_id)
    if signalled or current is None or current.cancel_requested:
        _finish(store, job, "cancelled", None, "cancelled before it started")
        return 0
    _say(job_id, f"running {' '.join(job.command)}")
    try:
        engine = subprocess.Popen(job.command, cwd=REPO_ROOT, env=_env(),
                                  stdin=subprocess.DEVNULL)
    except OSError as exc:
        _finish(store, job, "failed", None, f"could not start the engine: {exc}")
        return 0
    try:
        store.update(job_id, engine_pid=engine.pid, engine_pid_start=pid_start_time(engine.pid))
    except JobError as exc:
        _say(job_id, f"could not record the engine's pid: {exc}")
    # A signal that came while the engine was being started may have missed it; the engine
    # is still importing (default SIGTERM action: it ends having written nothing).
    forwarded = bool(signalled)
    if forwarded:
        engine.send_signal(signal.SIGTERM)
    while True:
        try:
            rc = engine.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if signalled and not forwarded:
            forwarded = True
            current = store.get(job_id)
            if current is None or not current.cancel_requested:
                engine.send_signal(signal.SIGTERM)   # sent to this process alone
    current = store.get(job_id) or job
    status, message = outcome(job, store.runs_dir, rc, current.cancel_requested, bool(signalled))
    _finish(store, job, status, rc, message)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboard.job_runner",
                                description="Supervise one retrain job of the dashboard.")
    p.add_argument("--db", required=True, help="the jobs database (<runs dir>/jobs.sqlite)")
    p.add_argument("--job-id", required=True)
    ns = p.parse_args(argv)
    db = Path(ns.db).resolve()
    try:
        return run_job(JobStore(db.parent, db), ns.job_id)
    except JobError as exc:
        _say(ns.job_id, f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
