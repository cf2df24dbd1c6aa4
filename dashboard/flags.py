"""SQLite store of flagged pretraining examples (stdlib ``sqlite3``, no Streamlit here).

The database lives beside the run directories (``<run_dir>/../flags.sqlite``) so a run directory
itself stays read-only.  Flags are keyed by ``(run_id, example_id)``; every flag and unflag is
also appended to ``flag_events`` (who / when / why / from which test point).  Each operation opens
its own connection with a busy timeout (the file in WAL mode) and writes in one
``BEGIN IMMEDIATE`` transaction, so several processes (two browser sessions, the CLI) can flag
at the same time without losing anything.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

REASONS = ("label noise", "off-task", "duplicate", "other")
FLAGS_FILE = "flags.sqlite"
BUSY_TIMEOUT_MS = 30_000

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


def flag_store_path(run_dir: str | Path) -> Path:
    """Where the flags of the run at ``run_dir`` are stored: beside it, never inside it."""
    return Path(run_dir).resolve().parent / FLAGS_FILE


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


class FlagStore:
    """Flags of pretraining examples, persisted in one SQLite file shared by all runs beside it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def beside_run(cls, run_dir: str | Path) -> FlagStore:
        """The store used for the run at ``run_dir``."""
        return cls(flag_store_path(run_dir))

    @contextmanager
    def _connect(self, write: bool) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if write:
                _switch_to_wal(conn)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            else:
                yield conn
        finally:
            conn.close()

    def _read(self, query: str, params: tuple[str, ...] = ()) -> list[tuple]:
        """Rows of a read query; a store that was never written (no file, no table) is empty
        and reading it creates nothing."""
        if not self.path.is_file():
            return []
        with self._connect(write=False) as conn:
            try:
                return conn.execute(query, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise

    def flag(self, run_id: str, example_ids: Iterable[str], reason: str, note: str = "",
             user: str = "", test_id: str | None = None, overwrite: bool = True) -> int:
        """Flag examples of ``run_id``; returns how many rows were written.

        With ``overwrite`` false, examples that are already flagged keep their first reason.
        """
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
        ids = list(dict.fromkeys(str(e) for e in example_ids))
        if not ids:
            return 0
        at = _now()
        verb = ("INSERT INTO flags VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, example_id) "
                "DO UPDATE SET reason=excluded.reason, note=excluded.note, user=excluded.user, "
                "test_id=excluded.test_id, flagged_at=excluded.flagged_at"
                if overwrite else "INSERT OR IGNORE INTO flags VALUES (?, ?, ?, ?, ?, ?, ?)")
        with self._connect(write=True) as conn:
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
        ids = list(dict.fromkeys(str(e) for e in example_ids))
        if not ids or not self.path.is_file():
            return 0
        at = _now()
        with self._connect(write=True) as conn:
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
