"""SQLite store of flagged pretraining examples (stdlib ``sqlite3``, no Streamlit here).

The database lives beside the run directories (``<run_dir>/../flags.sqlite``) so a run directory
itself stays read-only.  Flags are keyed by ``(run_id, example_id)``; every flag and unflag is
also appended to ``flag_events`` (who / when / why / from which test point).  Each operation opens
its own connection with a busy timeout (the file in WAL mode) and writes in one
``BEGIN IMMEDIATE`` transaction, so several processes (two browser sessions, the CLI) can flag
at the same time without losing anything.

Reads open the file read-only (``mode=ro``) and create nothing: a missing file means no flags
(unless the store was opened with ``required=True``), and a WAL-mode file in a directory this
process cannot write is read as ``immutable`` when SQLite cannot create its ``-shm`` file there.
A file that is not an SQLite database, is truncated or is otherwise damaged raises
:class:`FlagStoreError` (one line naming the file and what to do) and is never written to,
recreated or "repaired": writes check it (``PRAGMA quick_check``) before touching it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pandas as pd

REASONS = ("label noise", "off-task", "duplicate", "other")
FLAGS_FILE = "flags.sqlite"
#: Flags of FINETUNING training examples: a second store of the same schema, so ids of the two
#: pools never collide (a finetuning id may equal a pretraining id) and old stores stay valid.
FINETUNE_FLAGS_FILE = "finetune_flags.sqlite"
STAGES = ("pretrain", "finetune")
BUSY_TIMEOUT_MS = 30_000
SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flags (
    run_id     TEXT NOT NULL,
    example_id TEXT NOT NULL,
    reason     TEXT NOT NULL,
    note       TEXT NOT NULL DEFAULT '',
    user       TEXT NOT NULL DEFAULT '',
    test_id    TEXT,
    flagged_at TEXT NOT NULL,
    PRIMARY KEY (run_id, example_id)
);
CREATE TABLE IF NOT EXISTS flag_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     TEXT NOT NULL,
    example_id TEXT NOT NULL,
    action     TEXT NOT NULL CHECK (action IN ('flag', 'unflag')),
    reason     TEXT,
    note       TEXT,
    user       TEXT,
    test_id    TEXT,
    at         TEXT NOT NULL
);
"""

FLAG_COLUMNS = ["run_id", "example_id", "reason", "note", "user", "test_id", "flagged_at"]

_DAMAGED_ADVICE = ("it was left untouched: move it aside (or restore it from a backup); a new, "
                   "empty flag store is created there at the next flag")


class FlagStoreError(Exception):
    """The flag store cannot be read or written (missing when required, not an SQLite file,
    damaged, unreadable, read-only).  The message is one line: the file, what is wrong, what
    to do."""


def flag_store_path(run_dir: str | Path, stage: str = "pretrain") -> Path:
    """Where the flags of the run at ``run_dir`` are stored: beside it, never inside it;
    ``stage`` ``"pretrain"`` (pretraining examples) or ``"finetune"`` (finetuning examples)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    name = FLAGS_FILE if stage == "pretrain" else FINETUNE_FLAGS_FILE
    return Path(run_dir).resolve().parent / name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (persistent: once per file) if it is not already.

    The switch needs exclusive access, and SQLite answers "database is locked" at once, without
    waiting for the busy timeout, while another process is using a fresh file.  That is safe to
    skip: the write that follows is a ``BEGIN IMMEDIATE`` transaction (which does wait) and is
    just as durable in rollback-journal mode; a later write makes the switch.
    """
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    try:
        conn.execute("PRAGMA journal_mode = WAL")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise


def _uri(path: Path, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{quote(str(path.absolute()))}?{query}"


def _error_name(exc: sqlite3.Error) -> str:
    return getattr(exc, "sqlite_errorname", "") or ""


def _ids(example_ids: Iterable[str]) -> list[str]:
    """Distinct example ids in order; refuses a bare string (it would flag its characters),
    non-string ids and empty ids."""
    if isinstance(example_ids, (str, bytes)):
        raise TypeError("example_ids must be a collection of ids, not one string")
    ids = list(dict.fromkeys(example_ids))
    for e in ids:
        if not isinstance(e, str):
            raise TypeError(f"example ids must be strings, got {e!r}")
        if not e:
            raise ValueError("example ids must not be empty")
    return [str(e) for e in ids]


def _run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    return run_id


class FlagStore:
    """Flags of pretraining (or, in its own file, finetuning) examples, persisted in one SQLite
    file shared by all runs beside it.

    ``required``: the file must exist (a path given explicitly, e.g. ``--flags-db``); reading a
    missing file then raises :class:`FlagStoreError` instead of meaning "no flags".
    """

    def __init__(self, path: str | Path, required: bool = False) -> None:
        self.path = Path(path)
        self.required = required

    @classmethod
    def beside_run(cls, run_dir: str | Path, stage: str = "pretrain") -> FlagStore:
        """The store used for the run at ``run_dir`` (``stage``: see :func:`flag_store_path`)."""
        return cls(flag_store_path(run_dir, stage))

    def _error(self, what: str, advice: str = _DAMAGED_ADVICE) -> FlagStoreError:
        return FlagStoreError(_one_line(f"flag store {self.path}: {what}; {advice}"))

    def _exists(self, writing: bool = False) -> bool:
        """Whether there is a store file; raises if it is unreadable, is not an SQLite database
        or is shorter than its header.  An empty file (created by a first write that did not
        finish) is a store without flags.  A path that is not a regular file (a directory)
        holds no flags when only reading, unless ``required``; it cannot be written."""
        try:
            if not self.path.exists():
                if self.required:
                    raise self._error("no such file", "check the path (a flags database given "
                                      "explicitly must exist)")
                return False
            if not self.path.is_file():
                if self.required or writing:
                    raise self._error("not a regular file",
                                      "move it aside or give the path of a flags.sqlite file")
                return False
            with open(self.path, "rb") as fh:
                header = fh.read(_HEADER_SIZE)
        except OSError as exc:
            raise self._error(f"cannot read it ({exc.strerror or exc})",
                              "check its permissions") from exc
        if header and (len(header) < _HEADER_SIZE or not header.startswith(SQLITE_MAGIC)):
            raise self._error("not an SQLite database")
        return True

    def _check_size(self, conn: sqlite3.Connection) -> None:
        """A file shorter than the page count in its header was truncated.  Only checked when
        no write-ahead log holds pages (with one, the main file may legitimately be shorter)."""
        # Order matters: the page count (which includes pages still in the log) first, then the
        # log, then the file, which only grows; so a concurrent writer cannot cause a false alarm.
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            return
        if self.path.stat().st_size < pages * page_size:
            raise self._error("the file is truncated (shorter than its header says)")

    def _translate(self, exc: sqlite3.Error, writing: bool) -> FlagStoreError:
        name = _error_name(exc)
        if name == "SQLITE_NOTADB":
            return self._error("not an SQLite database")
        if name.startswith("SQLITE_CORRUPT") or "malformed" in str(exc):
            return self._error(f"the database is damaged ({exc})")
        if writing and (name.startswith("SQLITE_READONLY") or name.startswith("SQLITE_CANTOPEN")
                        or name == "SQLITE_PERM"):
            return self._error(f"cannot write ({exc})",
                               f"check that {self.path.parent} exists and is writable")
        if name == "SQLITE_BUSY" or "locked" in str(exc):
            return self._error(f"busy ({exc})", "another process holds it; try again")
        return self._error(f"{'write' if writing else 'read'} failed ({exc})",
                           "check the file and its directory")

    @contextmanager
    def _read_conn(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection; ``immutable`` when SQLite cannot create the ``-shm`` file
        of a WAL-mode database in a directory this process cannot write."""
        conn = None
        try:
            conn = sqlite3.connect(_uri(self.path, mode="ro"), uri=True,
                                   timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            try:
                conn.execute("PRAGMA schema_version").fetchone()
            except sqlite3.OperationalError as exc:
                name = _error_name(exc)
                if not (name.startswith("SQLITE_READONLY") or name.startswith("SQLITE_CANTOPEN")):
                    raise
                wal = self.path.with_name(self.path.name + "-wal")
                if wal.exists() and wal.stat().st_size > 0:
                    raise self._error(
                        f"cannot read it: its write-ahead log {wal.name} holds changes and "
                        f"{self.path.parent} is not writable ({exc})",
                        "open it once from a process that can write the directory") from exc
                conn.close()
                conn = sqlite3.connect(_uri(self.path, mode="ro", immutable="1"), uri=True,
                                       isolation_level=None)
                conn.execute("PRAGMA schema_version").fetchone()
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._translate(exc, writing=False) from exc
            raise
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write_conn(self) -> Iterator[sqlite3.Connection]:
        """A connection in one ``BEGIN IMMEDIATE`` transaction, schema ensured.  An existing
        file is checked first and never written to when damaged."""
        exists = self._exists(writing=True)
        try:
            conn = sqlite3.connect(_uri(self.path, mode="rw" if exists else "rwc"), uri=True,
                                   timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._translate(exc, writing=True) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if exists:
                self._check_size(conn)
                problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    raise self._error(f"the database is damaged ({problems[0]})")
            _switch_to_wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
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

    def check(self) -> None:
        """Raise :class:`FlagStoreError` if the store cannot be read (see the module doc)."""
        self._read("SELECT 1 FROM flags LIMIT 1")

    def _not_flags(self, what: str) -> list[tuple]:
        if self.required:
            raise self._error(f"not a flags database ({what})",
                              "check the path (a flags database given explicitly must hold "
                              "flags)")
        return []

    def _read(self, query: str, params: tuple[str, ...] = ()) -> list[tuple]:
        """Rows of a read query; a store that was never written (no file, empty file, no
        table) is empty, and reading it creates nothing (unless ``required``: then it is an
        error)."""
        if not self._exists():
            return []
        if self.path.stat().st_size == 0:
            return self._not_flags("empty file")
        with self._read_conn() as conn:
            try:
                self._check_size(conn)
                return conn.execute(query, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return self._not_flags("no flags table")
                raise self._translate(exc, writing=False) from exc
            except sqlite3.Error as exc:
                raise self._translate(exc, writing=False) from exc

    def flag(self, run_id: str, example_ids: Iterable[str], reason: str, note: str = "",
             user: str = "", test_id: str | None = None, overwrite: bool = True) -> int:
        """Flag examples of ``run_id``; returns how many rows were written.

        With ``overwrite`` false, examples that are already flagged keep their first reason.
        """
        _run_id(run_id)
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
        ids = _ids(example_ids)
        if not ids:
            return 0
        note, user = str(note or ""), str(user or "")
        at = _now()
        verb = ("INSERT INTO flags VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, example_id) "
                "DO UPDATE SET reason=excluded.reason, note=excluded.note, user=excluded.user, "
                "test_id=excluded.test_id, flagged_at=excluded.flagged_at"
                if overwrite else "INSERT OR IGNORE INTO flags VALUES (?, ?, ?, ?, ?, ?, ?)")
        with self._write_conn() as conn:
            before = conn.total_changes
            conn.executemany(verb, [(run_id, e, reason, note, user, test_id, at) for e in ids])
            written = conn.total_changes - before
            conn.executemany(
                "INSERT INTO flag_events (run_id, example_id, action, reason, note, user, "
                "test_id, at) VALUES (?, ?, 'flag', ?, ?, ?, ?, ?)",
                [(run_id, e, reason, note, user, test_id, at) for e in ids])
        return written

    def unflag(self, run_id: str, example_ids: Iterable[str], user: str = "") -> int:
        """Remove flags; returns how many flags existed and were removed."""
        _run_id(run_id)
        ids = _ids(example_ids)
        if not ids or not self._exists():
            return 0
        user = str(user or "")
        at = _now()
        with self._write_conn() as conn:
            before = conn.total_changes
            conn.executemany("DELETE FROM flags WHERE run_id = ? AND example_id = ?",
                             [(run_id, e) for e in ids])
            removed = conn.total_changes - before
            conn.executemany(
                "INSERT INTO flag_events (run_id, example_id, action, user, at) "
                "VALUES (?, ?, 'unflag', ?, ?)", [(run_id, e, user, at) for e in ids])
        return removed

    def flagged_ids(self, run_id: str) -> set[str]:
        """Ids of the examples of ``run_id`` that are flagged now."""
        return {r[0] for r in self._read("SELECT example_id FROM flags WHERE run_id = ?",
                                         (run_id,))}

    def flags(self, run_id: str | None = None) -> pd.DataFrame:
        """Current flags (all runs when ``run_id`` is None), newest first."""
        query = f"SELECT {', '.join(FLAG_COLUMNS)} FROM flags"
        params: tuple[str, ...] = ()
        if run_id is not None:
            query += " WHERE run_id = ?"
            params = (run_id,)
        rows = self._read(query + " ORDER BY flagged_at DESC, example_id", params)
        return pd.DataFrame(rows, columns=FLAG_COLUMNS)

    def history(self, run_id: str) -> pd.DataFrame:
        """Every flag / unflag event of ``run_id``, oldest first."""
        cols = ["example_id", "action", "reason", "note", "user", "test_id", "at"]
        rows = self._read(
            f"SELECT {', '.join(cols)} FROM flag_events WHERE run_id = ? ORDER BY id", (run_id,))
        return pd.DataFrame(rows, columns=cols)
