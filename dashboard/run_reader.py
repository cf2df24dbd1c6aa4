"""Open a run for serving without memory maps (no Streamlit here).

Why not memory maps.  ``engine.artifacts.load_run`` memory-maps the score matrices.  If a mapped
file is truncated while the server holds the map (an engine run rewriting it in place, a copy
over it, a full disk), the next access to a page past the new end raises SIGBUS, which Python
cannot catch: the whole Streamlit server dies, for every user.  So the dashboard holds no map of
a run file:

* the score matrices (the big files: 3 x n_test x n_pretrain float32, 1.2 GB for 1,000 x
  100,000) stay on disk and are read with ``os.preadv`` straight into new numpy arrays, on a
  file descriptor opened at load time (:class:`ScoreMatrix`): one system call per row (or per
  run of consecutive rows, or per element for a column), served from the page cache about as
  fast as a mapped read (measured on 300 x 100,000, pread vs mmap: ``score_frame`` of one
  test point 32 vs 27 ms, ``mean_influence`` over all test points 0.32 vs 0.28 s), memory
  bounded by what a page asks for, safe from several threads (no shared file position).  Every
  read checks that it got all the bytes it asked for, so a truncated file gives a
  :class:`RunError` saying what happened, never a signal.  (Reading whole matrices into
  memory instead would be as safe but costs 1.2 GB per cached run of that size.)  A file
  replaced by rename (how the engine rewrites a run) keeps serving the old, complete,
  hash-checked contents until the next rerun notices;
* the small arrays (map coordinates) are read into memory.

Detecting changes.  :func:`dashboard.runs_dir.fingerprint` (size, mtime_ns and inode of every
file the manifest lists, plus the manifest) is taken on every rerun and is part of the cache key,
so a changed run is re-opened, and re-opening checks every SHA-256 again: an edited run is
refused with a clear message instead of being served mixed with the old one.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from dashboard.runs_dir import fingerprint
from engine.artifacts import (
    FINETUNE_SCORES_FILE,
    SCORE_NAMES,
    Run,
    RunError,
    load_run,
    read_manifest,
)

_CHANGED = ("changed on disk while the dashboard had it open ({why}); reload the page to "
            "re-open the run (its hashes are checked again)")


class ScoreMatrix:
    """A read-only 2-D ``.npy`` matrix read with ``os.preadv`` (never memory-mapped).

    Supports what the pages use: ``m[i]`` (one row), ``m[rows]`` (int sequence / array, slice),
    ``m[rows, cols]`` (e.g. ``m[:, j]``: one column, read element by element), ``len(m)``,
    ``m.shape`` / ``m.dtype`` / ``m.ndim`` and ``np.asarray(m)`` (the whole matrix).  Every
    result is a new in-memory array.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise RunError(f"{self.path}: unsupported .npy format version {version}")
                offset = f.tell()
            if len(shape) != 2 or fortran or dtype.hasobject:
                raise RunError(f"{self.path} is not a C-ordered 2-D numeric array")
            self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
            self.dtype = dtype
            self._offset = offset
            self._row_bytes = self.shape[1] * dtype.itemsize
            size = os.fstat(fd).st_size
            expected = offset + self.shape[0] * self._row_bytes
            if size != expected:
                raise RunError(f"{self.path} has {size} bytes, its header needs {expected}; "
                               "the file is truncated or not a score matrix. Re-run the run.")
        except (OSError, ValueError) as exc:
            os.close(fd)
            if isinstance(exc, RunError):
                raise
            raise RunError(f"cannot read {self.path}: {exc}") from exc
        self._fd = fd
        weakref.finalize(self, os.close, fd)  # when the cache drops the run

    ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ScoreMatrix({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"

    # --- reading ------------------------------------------------------------------------
    def _truncated(self, got: int, wanted: int, at: int) -> RunError:
        why = f"read {got} of {wanted} bytes at offset {at}: the file was truncated"
        return RunError(f"{self.path} " + _CHANGED.format(why=why))

    def _read_into(self, buf: np.ndarray, at: int) -> None:
        """Fill the C-contiguous ``buf`` from byte ``at`` of the file (no extra copy)."""
        view = memoryview(buf).cast("B")
        got = 0
        while got < view.nbytes:  # pread may return less than asked only at end of file
            n = os.preadv(self._fd, [view[got:]], at + got)
            if n == 0:
                raise self._truncated(got, view.nbytes, at)
            got += n

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (consecutive), as a new ``(stop - start, n_cols)`` array."""
        out = np.empty((max(stop - start, 0), self.shape[1]), self.dtype)
        if out.size:
            self._read_into(out, self._offset + start * self._row_bytes)
        return out

    def _row_index(self, key: Any) -> tuple[np.ndarray, bool]:
        """Row positions selected by ``key`` and whether the key was a scalar."""
        n = self.shape[0]
        if isinstance(key, slice):
            return np.arange(n)[key], False
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for {n} rows")
            return np.array([i % n]), True
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"unsupported row index {key!r}")
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return rows % n if rows.size else rows.astype(np.int64), False

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the given order, one read per run of consecutive positions."""
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            self._read_into(out[i:j], self._offset + int(rows[i]) * self._row_bytes)
            i = j
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("a score matrix takes at most two indices")
            row_key, col_key = key
        else:
            row_key, col_key = key, slice(None)
        rows, scalar_row = self._row_index(row_key)
        if isinstance(col_key, (int, np.integer)) and not scalar_row:
            # One column: one element per row, never the whole matrix.
            j = int(col_key)
            if not -self.shape[1] <= j < self.shape[1]:
                raise IndexError(f"column {j} out of range for {self.shape[1]} columns")
            j %= self.shape[1]
            out = np.empty(len(rows), self.dtype)
            at = self._offset + j * self.dtype.itemsize
            for k, r in enumerate(rows):
                self._read_into(out[k:k + 1], at + int(r) * self._row_bytes)
            return out
        block = self._gather(rows)
        every_column = isinstance(col_key, slice) and col_key == slice(None)
        if scalar_row:
            return block[0] if every_column else block[0][col_key]
        return block if every_column else block[:, col_key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self._rows(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)


def _small_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise RunError(f"cannot read {path}: {exc}. Re-run `python -m engine run`.") from exc


def open_run(run_dir: str | os.PathLike) -> Run:
    """Load and verify the run at ``run_dir`` (schema, every SHA-256, shapes) for serving:
    score matrices as :class:`ScoreMatrix`, map coordinates in memory, no memory map kept.

    Raises :class:`RunError` for anything wrong with the run, including a malformed manifest
    (wrong types, missing keys) and a run that changed while it was being opened.
    """
    path = Path(run_dir).resolve()
    try:
        before = fingerprint(path, read_manifest(path))
        # load_run checks schema, hashes and shapes; its memory maps are only used for their
        # shapes (no data page is touched) and are dropped below.
        loaded = load_run(path)
        scores = {name: ScoreMatrix(path / "scores" / f"{name}.npy") for name in SCORE_NAMES}
        pretrain_xy = _small_array(path / "map" / "pretrain_xy.npy")
        test_xy = _small_array(path / "map" / "test_xy.npy")
        for name, matrix in scores.items():
            if matrix.shape != loaded.scores[name].shape:
                raise RunError(f"{path}: scores/{name}.npy changed while the run was opened")
        if pretrain_xy.shape != loaded.pretrain_xy.shape or test_xy.shape != loaded.test_xy.shape:
            raise RunError(f"{path}: map coordinates changed while the run was opened")
        after = fingerprint(path, read_manifest(path))
    except RunError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        # A manifest with wrong types or missing keys that the engine's checks let through.
        raise RunError(f"{path}: its manifest.json does not have the expected form "
                       f"({type(exc).__name__}: {exc}). Re-run `python -m engine run`.") from exc
    except OSError as exc:
        raise RunError(f"cannot read run {path}: {exc}") from exc
    if before != after:
        raise RunError(f"{path} changed while it was being opened (a run being written or "
                       "copied?); reload the page once it is complete.")
    finetune_scores = None
    if loaded.finetune_scores is not None:   # no memory map here either (see module docstring)
        finetune_scores = ScoreMatrix(Path(path) / FINETUNE_SCORES_FILE)
        if finetune_scores.shape != tuple(loaded.finetune_scores.shape):
            raise RunError(f"{path}/{FINETUNE_SCORES_FILE} changed while it was being opened; "
                           "reload the page once the run is complete.")
    return dataclasses.replace(loaded, scores=scores, pretrain_xy=pretrain_xy, test_xy=test_xy,
                               finetune_scores=finetune_scores)
