"""Background retrain jobs: "retrain without the flagged set" (stdlib only, no Streamlit here).

A job runs ``python -m engine run CONFIG --out <runs dir>/CHILD --exclude IDS --parent PARENT
--progress-file ...`` for a parent run's config, supervised by ``python -m dashboard.job_runner``
in its own session (``start_new_session``), so it outlives the Streamlit script, the browser tab
and the server.  Jobs are rows of ``<runs dir>/jobs.sqlite`` (beside ``flags.sqlite``; WAL, busy
timeout, one ``BEGIN IMMEDIATE`` transaction per write, read-only connections for reads).  A
damaged jobs file raises :class:`JobError` (one line) and is never written to, recreated or
deleted.  Each job's files (ids, log, progress) are in ``<runs dir>/.jobs/<job_id>/``.

Life cycle: ``queued`` (row written) -> ``running`` (runner started) -> ``succeeded`` /
``failed`` / ``cancelled``, written by the runner when the engine exits.  Reconciliation
(every read) marks a ``running`` job whose processes are gone (a dead pid, or a pid reused by
another process: the start time in ``/proc/<pid>/stat`` differs) as ``failed``, or
``succeeded`` when its run directory is complete.  Finished jobs stay in the table.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dashboard.runs_dir import is_plain_name
from engine.artifacts import RunError, read_manifest
from engine.atomic_dir import recover
from engine.ids_file import IdsFormatError, ids_text

REPO_ROOT = Path(__file__).resolve().parents[1]
JOBS_FILE = "jobs.sqlite"
JOBS_DIR = ".jobs"
FINETUNE_IDS_FILE = "excluded_finetune_ids.txt"
ACTIVE = ("queued", "running")
STATUSES = (*ACTIVE, "succeeded", "failed", "cancelled")
DISAPPEARED = "the job's process disappeared (server machine restarted or process killed)"
BUSY_TIMEOUT_MS = 30_000
QUEUED_GRACE_S = 60.0      # a queued job without a runner after this long never started
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, parent_run TEXT NOT NULL, parent_run_id TEXT NOT NULL,
    child_run TEXT NOT NULL, n_excluded INTEGER NOT NULL, ids_path TEXT NOT NULL,
    config_path TEXT NOT NULL, command TEXT NOT NULL, pid INTEGER, pid_start INTEGER,
    engine_pid INTEGER, engine_pid_start INTEGER,
    status TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed','cancelled')),
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, returncode INTEGER,
    message TEXT NOT NULL DEFAULT '', log_path TEXT NOT NULL, progress_path TEXT NOT NULL,
    user TEXT NOT NULL DEFAULT '', cancel_requested INTEGER NOT NULL DEFAULT 0,
    parent_timings TEXT NOT NULL DEFAULT '{}')"""


class JobError(Exception):
    """A job cannot be started, cancelled or read; the message is one line saying what to do."""


@dataclass(frozen=True)
class Job:
    """One row of the jobs table (times are Unix seconds; ``command`` the engine's argv)."""

    job_id: str
    parent_run: str
    parent_run_id: str
    child_run: str
    n_excluded: int
    ids_path: str
    config_path: str
    command: list[str]
    pid: int | None
    pid_start: int | None
    engine_pid: int | None
    engine_pid_start: int | None
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    returncode: int | None
    message: str
    log_path: str
    progress_path: str
    user: str
    cancel_requested: bool
    parent_timings: dict[str, float]

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.status in ACTIVE


_COLUMNS = [f.name for f in fields(Job)]


def _job(row: tuple) -> Job:
    d = dict(zip(_COLUMNS, row, strict=True))
    d["command"] = json.loads(d["command"])
    d["parent_timings"] = json.loads(d["parent_timings"] or "{}")
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def pid_start_time(pid: int | None) -> int | None:
    """Start time of a live process (``/proc/<pid>/stat`` field 22, clock ticks since boot);
    ``None`` when there is no such process or it is a zombie."""
    if not pid or pid <= 0:
        return None
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()   # fields 3.. (the name may hold spaces)
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


def _alive(pid: int | None, start: int | None) -> bool:
    """Whether ``pid`` is still the process recorded with start time ``start``."""
    return start is not None and pid_start_time(pid) == start


def child_complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete run (valid manifest; runs appear atomically)."""
    try:
        read_manifest(run_dir)
    except (RunError, OSError):
        return False
    return True


def check_child_name(name: str) -> str:
    """``name`` if it can name a new run directory (one plain, non-hidden component)."""
    if not isinstance(name, str) or not is_plain_name(name) or name != name.strip() \
            or any(ord(c) < 32 for c in name) or "\\" in name or len(name) > 200:
        raise JobError(f"run name {name!r} is not a plain directory name: use letters, digits, "
                       "'-' or '_' (no '/', no leading '.', at most 200 characters)")
    return name


def exclusion(manifest: dict[str, Any], flagged_ids: Collection[str]) -> tuple[list[str], int]:
    """The ids a retrain of the run excludes (the run's own exclusions, then the flagged
    ids) and the pretraining file's size."""
    before = [str(i) for i in manifest.get("excluded_ids") or []]
    flagged = list(flagged_ids) if isinstance(flagged_ids, (list, tuple)) else sorted(flagged_ids)
    ids = list(dict.fromkeys([*before, *flagged]))
    return ids, int(manifest["shapes"]["n_pretrain"]) + len(before)


def finetune_exclusion(manifest: dict[str, Any], flagged_ids: Collection[str]) -> list[str]:
    """The finetuning training ids a retrain of the run excludes (the run's own, then the
    flagged ones)."""
    before = [str(i) for i in manifest.get("excluded_finetune_ids") or []]
    flagged = list(flagged_ids) if isinstance(flagged_ids, (list, tuple)) else sorted(flagged_ids)
    return list(dict.fromkeys([*before, *flagged]))


class JobStore:
    """The jobs of one runs directory (``<runs dir>/jobs.sqlite``)."""

    def __init__(self, runs_dir: str | Path, path: str | Path | None = None) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        self.path = Path(path) if path else self.runs_dir / JOBS_FILE

    # -- SQLite -------------------------------------------------------------------------
    def _error(self, what: str, advice: str = "it was left untouched: move it aside (or "
               "restore it from a backup); a new job store is created at the next job"
               ) -> JobError:
        return JobError(_one_line(f"job store {self.path}: {what}; {advice}"))

    def _exists(self) -> bool:
        try:
            if not self.path.exists():
                return False
            if not self.path.is_file():
                raise self._error("not a regular file", "move it aside")
            with open(self.path, "rb") as fh:
                header = fh.read(100)
        except OSError as exc:
            raise self._error(f"cannot read it ({exc.strerror or exc})",
                              "check its permissions") from exc
        if header and (len(header) < 100 or not header.startswith(_SQLITE_MAGIC)):
            raise self._error("not an SQLite database")
        return True

    def _translate(self, exc: sqlite3.Error, writing: bool) -> JobError:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name == "SQLITE_NOTADB":
            return self._error("not an SQLite database")
        if name.startswith("SQLITE_CORRUPT") or "malformed" in str(exc):
            return self._error(f"the database is damaged ({exc})")
        if writing and name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
            return self._error(f"cannot write ({exc})",
                               f"check that {self.path.parent} is writable")
        if name == "SQLITE_BUSY" or "locked" in str(exc):
            return self._error(f"busy ({exc})", "another process holds it; try again")
        return self._error(f"{'write' if writing else 'read'} failed ({exc})",
                           "check the file and its directory")

    def _connect(self, **params: str) -> sqlite3.Connection:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return sqlite3.connect(f"file:{quote(str(self.path.absolute()))}?{query}", uri=True,
                               timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)

    def _select(self, where: str = "", params: tuple = ()) -> list[Job]:
        """Rows as stored (no reconciliation); a missing or empty file holds no jobs."""
        if not self._exists() or self.path.stat().st_size == 0:
            return []
        query = f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY created_at DESC"
        conn = None
        try:
            conn = self._connect(mode="ro")
            try:
                rows = conn.execute(query, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                name = getattr(exc, "sqlite_errorname", "") or ""
                if not name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
                    raise
                conn.close()   # WAL file in a directory we cannot write: read it as immutable
                conn = self._connect(mode="ro", immutable="1")
                rows = conn.execute(query, params).fetchall()
        except sqlite3.Error as exc:
            raise self._translate(exc, writing=False) from exc
        finally:
            if conn is not None:
                conn.close()
        try:
            return [_job(r) for r in rows]
        except (ValueError, TypeError) as exc:
            raise self._error(f"a job row is damaged ({exc})") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; an existing file is checked first."""
        exists = self._exists()
        try:
            conn = self._connect(mode="rw" if exists else "rwc")
        except sqlite3.Error as exc:
            raise self._translate(exc, writing=True) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if exists:
                problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    raise self._error(f"the database is damaged ({problems[0]})")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                except sqlite3.OperationalError as exc:   # busy: a later write switches
                    if "locked" not in str(exc):
                        raise
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_SCHEMA)
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._translate(exc, writing=True) from exc
        finally:
            conn.close()

    def update(self, job_id: str, only_active: bool = True, **values: Any) -> bool:
        """Set columns of a job (only while it is queued/running unless ``only_active``);
        returns whether a row changed."""
        sets = ", ".join(f"{k} = ?" for k in values)
        cond = " AND status IN ('queued', 'running')" if only_active else ""
        with self._write() as conn:
            cur = conn.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?{cond}",
                               (*values.values(), job_id))
            return cur.rowcount > 0

    # -- reading (reconciled) -----------------------------------------------------------
    def _reconciled(self, job: Job) -> Job:
        """What an active job's status really is, given its processes and its run dir."""
        if not job.active or _alive(job.pid, job.pid_start) \
                or _alive(job.engine_pid, job.engine_pid_start):
            return job
        if job.pid is None and time.time() - job.created_at < QUEUED_GRACE_S:
            return job   # being launched right now
        if child_complete(self.runs_dir / job.child_run):
            status, message = "succeeded", (f"wrote {job.child_run} (its runner stopped "
                                             "before recording the end)")
        elif job.cancel_requested:
            status, message = "cancelled", "cancelled; nothing was written"
        else:
            status, message = "failed", DISAPPEARED
        if status != "succeeded":
            try:   # the staging directory a killed engine left (only if no writer holds it)
                recover(self.runs_dir / job.child_run, child_complete)
            except OSError:
                pass
        new = {"status": status, "message": message, "finished_at": time.time()}
        try:
            self.update(job.job_id, **new)
        except JobError:
            pass   # read-only directory: report the reconciled state without storing it
        stored = self._select("WHERE job_id = ?", (job.job_id,))
        if stored and not stored[0].active:
            return stored[0]
        return replace(job, **new)

    def jobs(self, parent_run: str | None = None) -> list[Job]:
        """Every job (of ``parent_run``, a run directory name), newest first, reconciled."""
        where, params = ("WHERE parent_run = ?", (parent_run,)) if parent_run else ("", ())
        return [self._reconciled(j) for j in self._select(where, params)]

    def get(self, job_id: str) -> Job | None:
        """One job, reconciled; ``None`` if there is no such job."""
        found = self._select("WHERE job_id = ?", (job_id,))
        return self._reconciled(found[0]) if found else None

    def latest(self, parent_run: str) -> Job | None:
        """The newest job of a run (the running one, when there is one)."""
        jobs = self.jobs(parent_run)
        return next((j for j in jobs if j.active), jobs[0] if jobs else None)

    def refresh(self) -> list[Job]:
        """Reconcile every queued/running job; returns all jobs."""
        return self.jobs()

    # -- launching and cancelling -------------------------------------------------------
    def default_child_name(self, parent_run: str, n_flagged: int) -> str:
        """``<parent>-minus-<N>-flagged``, then ``-2``, ``-3``... when taken."""
        base = f"{parent_run}-minus-{n_flagged}-flagged"
        taken = {j.child_run for j in self._select("WHERE status IN ('queued', 'running')")}
        name, k = base, 1
        while name in taken or os.path.lexists(self.runs_dir / name):
            k += 1
            name = f"{base}-{k}"
        return name

    def start_retrain(self, parent_run_dir: str | Path, excluded_ids: Collection[str],
                      child_name: str | None = None, user: str = "", yes: bool = False,
                      excluded_finetune_ids: Collection[str] = ()) -> Job:
        """Start retraining the run at ``parent_run_dir`` without ``excluded_ids`` (and
        without what it already excluded) into ``<runs dir>/<child_name>``; returns at once.
        ``excluded_finetune_ids``: finetuning training examples to leave out as well
        (``--exclude-finetune``, with the run's own finetuning exclusions).

        Refused (:class:`JobError`): another job of the same run is queued or running, the
        child directory exists, the name is not a plain directory name, no ids, or more than
        half the pretraining examples excluded without ``yes``.
        """
        parent = Path(parent_run_dir).resolve()
        try:
            manifest = read_manifest(parent)
        except RunError as exc:
            raise JobError(_one_line(f"cannot retrain {parent.name}: {exc}")) from None
        if not excluded_ids and not excluded_finetune_ids:
            raise JobError("no examples are flagged: flag the examples to leave out first")
        ids, m = exclusion(manifest, excluded_ids)
        ft_ids = finetune_exclusion(manifest, excluded_finetune_ids)
        try:
            text = ids_text(ids)
            ft_text = ids_text(ft_ids)
        except IdsFormatError as exc:
            raise JobError(_one_line(exc)) from None
        if 2 * len(ids) > m and not yes:
            raise JobError(f"--exclude removes {len(ids)} of {m} pretraining examples (more "
                           "than half); confirm to go ahead")
        config = str(manifest.get("config_path") or "")
        if not config or not Path(config).is_file():
            raise JobError(f"the config of {parent.name} ({config or 'not recorded'}) is "
                           "missing; retrain it with `python -m engine run` by hand")
        self.refresh()
        child = check_child_name(child_name or self.default_child_name(
            parent.name, len(set(excluded_ids)) + len(set(excluded_finetune_ids))))
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        jdir = self.runs_dir / JOBS_DIR / job_id
        out = self.runs_dir / child
        command = [sys.executable, "-m", "engine", "run", config, "--out", str(out),
                   "--parent", str(parent), "--progress-file", str(jdir / "progress.jsonl")]
        if ids:
            command += ["--exclude", str(jdir / "excluded_ids.txt")]
        if ft_ids:
            command += ["--exclude-finetune", str(jdir / FINETUNE_IDS_FILE)]
        if manifest.get("scenario"):
            command += ["--scenario", str(manifest["scenario"])]
        if manifest.get("alpha") is not None:
            command += ["--alpha", repr(float(manifest["alpha"]))]
        command += ["--yes"] if yes else []
        timings = {k: float(v) for k, v in (manifest.get("timings") or {}).items()
                   if isinstance(v, (int, float))}
        with self._write() as conn:
            busy = conn.execute("SELECT job_id, parent_run, child_run FROM jobs WHERE status IN "
                                "('queued', 'running') AND (parent_run = ? OR child_run = ?)",
                                (parent.name, child)).fetchone()
            if busy and busy[1] == parent.name:
                raise JobError(f"a retrain of run {parent.name} is already running (job "
                               f"{busy[0]}); wait for it to finish or cancel it")
            if busy:
                raise JobError(f"job {busy[0]} is already writing {child}; choose another name")
            if os.path.lexists(out):
                raise JobError(f"{out} already exists; choose another name (a run is never "
                               "overwritten)")
            conn.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES "
                         f"({', '.join('?' * len(_COLUMNS))})",
                         (job_id, parent.name, str(manifest["run_id"]), child,
                          len(ids) + len(ft_ids),
                          str(jdir / "excluded_ids.txt"), config, json.dumps(command), None,
                          None, None, None, "queued", time.time(), None, None, None, "",
                          str(jdir / "log.txt"), str(jdir / "progress.jsonl"), str(user or ""),
                          0, json.dumps(timings)))
        try:
            jdir.mkdir(parents=True)
            (jdir / "excluded_ids.txt").write_text(text, encoding="utf-8")
            if ft_ids:
                (jdir / FINETUNE_IDS_FILE).write_text(ft_text, encoding="utf-8")
            with open(jdir / "log.txt", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dashboard.job_runner", "--db", str(self.path),
                     "--job-id", job_id], cwd=REPO_ROOT, env=_env(), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            self.update(job_id, status="failed", finished_at=time.time(),
                        message=_one_line(f"could not start the job: {exc}"))
            raise JobError(_one_line(f"could not start the job in {jdir}: "
                                     f"{exc.strerror or exc}")) from None
        threading.Thread(target=proc.wait, daemon=True).start()   # reap it: no zombie
        with self._write() as conn:   # the runner may already have recorded itself
            conn.execute("UPDATE jobs SET pid = ?, pid_start = ? WHERE job_id = ? AND pid IS "
                         "NULL", (proc.pid, pid_start_time(proc.pid), job_id))
        job = self.get(job_id)
        assert job is not None
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a queued/running job to stop: SIGTERM to its runner's process group (never to
        a pid that is not the recorded process); it ends ``cancelled`` once the engine has
        cleaned up.  A finished job is returned unchanged."""
        job = self.get(job_id)
        if job is None:
            raise JobError(f"there is no job {job_id}")
        if not job.active:
            return job
        self.update(job_id, cancel_requested=1)
        try:
            if _alive(job.pid, job.pid_start) and os.getpgid(job.pid) == job.pid:
                os.killpg(job.pid, signal.SIGTERM)        # the runner and the engine
            elif _alive(job.engine_pid, job.engine_pid_start):
                os.kill(job.engine_pid, signal.SIGTERM)   # its runner is gone: the engine
        except ProcessLookupError:
            pass   # it ended meanwhile; reconciliation records how
        return self.get(job_id) or job


def _env() -> dict[str, str]:
    """The environment of a job: this one, with the repository importable and the engine's
    output unbuffered (the log follows it live)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)}


def start_retrain(runs_dir: str | Path, parent_run_dir: str | Path,
                  excluded_ids: Collection[str], child_name: str | None = None,
                  user: str = "", yes: bool = False,
                  excluded_finetune_ids: Collection[str] = ()) -> Job:
    """:meth:`JobStore.start_retrain` of the store of ``runs_dir``."""
    return JobStore(runs_dir).start_retrain(parent_run_dir, excluded_ids, child_name, user, yes,
                                            excluded_finetune_ids)


def cancel(runs_dir: str | Path, job_id: str) -> Job:
    """:meth:`JobStore.cancel` of the store of ``runs_dir``."""
    return JobStore(runs_dir).cancel(job_id)
