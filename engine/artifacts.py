"""On-disk run artifacts: the only interface between the engine and the dashboard.

A run directory holds::

    manifest.json              settings, convergence, timings, hashes, schema version
    test_points.parquet        one row per scored test point (rows of the score matrices)
    pretrain_examples.parquet  one row per pretraining example (columns of the score matrices)
    scores/total.npy           (n_test, n_pretrain) float32, = pretrained_term + finetuned_term
    scores/pretrained_term.npy (n_test, n_pretrain) float32
    scores/finetuned_term.npy  (n_test, n_pretrain) float32
    map/pretrain_xy.npy        (n_pretrain, 2) float32, 2-D map coordinates
    map/test_xy.npy            (n_test, 2) float32
    finetune_scores.npy        optional: (n_test, n_finetune) float32, influence of the
                               finetuning examples (:mod:`engine.finetune_influence`)
    finetune_examples.parquet  optional (with it): one row per finetuning example (its columns)
    validation/                optional, written by ``python -m engine validate``

A run is written into a temporary sibling directory and renamed into place only once every file
is complete, so a crash never leaves a half-written directory that looks like a run.  The loader
checks the schema version, the shapes and the SHA-256 of every file listed in the manifest, and
refuses anything partial or mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.atomic_dir import STAGING_MARKER, Staging, recover
from engine.convention import SCORE_CONVENTION
from engine.pause_points import pause_point

SCHEMA_VERSION = 1


SCORE_NAMES = ("total", "pretrained_term", "finetuned_term")
MANIFEST = "manifest.json"
TEST_TABLE = "test_points.parquet"
PRETRAIN_TABLE = "pretrain_examples.parquet"
TEST_REQUIRED = ("test_id", "label", "pred", "loss", "correct")
PRETRAIN_REQUIRED = ("example_id", "label")
# Optional finetuning-data influence (engine.finetune_influence): both files or neither.
FINETUNE_SCORES_FILE = "finetune_scores.npy"
FINETUNE_TABLE = "finetune_examples.parquet"
FINETUNE_FILES = (FINETUNE_SCORES_FILE, FINETUNE_TABLE)
FINETUNE_REQUIRED = ("example_id",)


class RunError(ValueError):
    """A run directory is missing, partial, corrupted or of an incompatible schema."""


@dataclass
class Run:
    """A loaded run: tables in memory, score matrices memory-mapped read-only.

    ``finetune_scores`` (``(n_test, n_finetune)``, memory-mapped) and ``finetune_examples``
    (its columns' table) are the finetuning-data influence when the run has it, else ``None``.
    """

    path: Path
    manifest: dict[str, Any]
    test_points: pd.DataFrame
    pretrain_examples: pd.DataFrame
    scores: dict[str, np.ndarray]
    pretrain_xy: np.ndarray
    test_xy: np.ndarray
    validation: dict[str, Any] | None = field(default=None)
    finetune_scores: np.ndarray | None = field(default=None)
    finetune_examples: pd.DataFrame | None = field(default=None)

    @property
    def run_id(self) -> str:
        """Content hash that identifies this run (flags and exports are keyed by it)."""
        return str(self.manifest["run_id"])

    @property
    def n_test(self) -> int:
        return len(self.test_points)

    @property
    def n_pretrain(self) -> int:
        return len(self.pretrain_examples)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks so large score matrices never sit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_table(df: pd.DataFrame, required: tuple[str, ...], id_col: str, name: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise RunError(f"{name} lacks required columns {missing}")
    ids = df[id_col].astype(str)
    if ids.duplicated().any():
        dup = ids[ids.duplicated()].iloc[0]
        raise RunError(f"{name} has duplicate {id_col} {dup!r}")


def check_replaceable(dest: Path) -> None:
    """Refuse to replace ``dest`` unless it is an empty directory or a complete run of this
    tool (``--overwrite`` must never delete a user's folder)."""
    if dest.is_symlink() or not dest.is_dir():
        raise RunError(f"refusing to replace {dest}: it is not a directory; --overwrite only "
                       "replaces a run directory. Choose another --out.")
    if not any(dest.iterdir()):
        return
    try:
        read_manifest(dest)
    except RunError as exc:
        raise RunError(f"refusing to replace {dest}: it is not a complete run written by this "
                       f"tool ({exc}). --overwrite only replaces run directories; choose "
                       "another --out.") from None


def _is_run(path: Path) -> bool:
    try:
        read_manifest(path)
    except RunError:
        return False
    return True


def open_destination(out_dir: str | os.PathLike, overwrite: bool,
                     echo: Callable[[str], None] | None = None) -> Staging:
    """Check that a run may be written to ``out_dir`` and stage it; call before any work.

    Repairs what an interrupted earlier write left (see :func:`engine.atomic_dir.recover`),
    refuses an existing ``out_dir`` without ``overwrite`` and anything but a run or an empty
    directory with it, and creates the staging directory (so an unwritable location fails
    now, not after training).
    """
    out = Path(out_dir).absolute()
    for line in recover(out, _is_run):
        if echo is not None:
            echo(line)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise RunError(f"{out} already exists; choose another --out or pass --overwrite "
                           "to replace a run")
        check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Staging(out)
    except OSError as exc:
        raise RunError(f"cannot write a run at {out}: {exc.strerror or exc}; choose an --out "
                       "in a writable directory") from None


def write_run(
    out_dir: str | os.PathLike,
    manifest: dict[str, Any],
    test_points: pd.DataFrame,
    pretrain_examples: pd.DataFrame,
    scores: dict[str, np.ndarray] | None,
    pretrain_xy: np.ndarray,
    test_xy: np.ndarray,
    overwrite: bool = False,
    model_arrays: dict[str, np.ndarray] | None = None,
    staging: Staging | None = None,
) -> Path:
    """Write a complete run atomically and return its path.

    ``manifest`` holds the run's settings; this function adds ``schema_version``, ``files``
    (SHA-256 per file), ``shapes``, ``run_id`` and ``score_convention``.  ``model_arrays`` (the
    trained parameters, used by validation to warm-start retraining) go to ``model/NAME.npy``.
    An existing ``out_dir`` is replaced only when ``overwrite`` is true, only when it is a run
    or an empty directory, and only after the new run is complete (atomically:
    :mod:`engine.atomic_dir`).  ``staging`` is the :func:`open_destination` made before the
    work started (one is opened here otherwise); it is closed on return.  ``scores=None``:
    the score files are already in ``staging`` (:func:`create_score_files`, then
    :func:`write_score_columns` by every rank of a distributed run); they are checked here.
    """
    out = Path(out_dir).absolute()
    if staging is None:
        staging = open_destination(out, overwrite)
    with staging:
        return _write_staged(staging, manifest, test_points, pretrain_examples, scores,
                             pretrain_xy, test_xy, overwrite, model_arrays)


def create_score_files(directory: Path, n_test: int, n_pre: int) -> None:
    """Create the three float32 ``(n_test, n_pre)`` score files (``.npy``, zero-filled) in a
    staging ``directory``, for :func:`write_score_columns` to fill."""
    (directory / "scores").mkdir(exist_ok=True)
    for name in SCORE_NAMES:
        mm = np.lib.format.open_memmap(directory / "scores" / f"{name}.npy", mode="w+",
                                       dtype=np.float32, shape=(n_test, n_pre))
        mm.flush()
        del mm


def write_score_columns(directory: Path, lo: int, blocks: dict[str, np.ndarray]) -> None:
    """Write score columns ``[lo, lo + width)`` (pretraining examples) of every score file
    made by :func:`create_score_files`; ``blocks`` maps each score name to ``(n_test, width)``.
    Writers of disjoint column ranges may run concurrently (one process per rank)."""
    if set(blocks) != set(SCORE_NAMES):
        raise RunError(f"scores must be exactly {SCORE_NAMES}, got {sorted(blocks)}")
    for name in SCORE_NAMES:
        block = blocks[name]
        if not np.all(np.isfinite(block)):
            raise RunError(f"scores[{name!r}] columns from {lo} contain NaN or infinite values")
        mm = np.lib.format.open_memmap(directory / "scores" / f"{name}.npy", mode="r+")
        if block.ndim != 2 or block.shape[0] != mm.shape[0] or lo + block.shape[1] > mm.shape[1]:
            raise RunError(f"scores[{name!r}]: a block of shape {block.shape} at column {lo} "
                           f"does not fit the file's shape {mm.shape}")
        mm[:, lo : lo + block.shape[1]] = block
        mm.flush()
        del mm


def _check_score_files(directory: Path, n_test: int, n_pre: int, chunk: int = 256) -> None:
    for name in SCORE_NAMES:
        path = directory / "scores" / f"{name}.npy"
        if not path.is_file():
            raise RunError(f"scores/{name}.npy was not written")
        arr = np.load(path, mmap_mode="r")
        if arr.shape != (n_test, n_pre) or arr.dtype != np.float32:
            raise RunError(f"scores/{name}.npy has shape {arr.shape} ({arr.dtype}), expected "
                           f"{(n_test, n_pre)} float32")
        for s in range(0, n_test, chunk):
            if not np.all(np.isfinite(arr[s : s + chunk])):
                raise RunError(f"scores[{name!r}] contains NaN or infinite values")


def _write_staged(staging: Staging, manifest: dict[str, Any], test_points: pd.DataFrame,
                  pretrain_examples: pd.DataFrame, scores: dict[str, np.ndarray] | None,
                  pretrain_xy: np.ndarray, test_xy: np.ndarray, overwrite: bool,
                  model_arrays: dict[str, np.ndarray] | None) -> Path:
    n_test, n_pre = len(test_points), len(pretrain_examples)
    _check_table(test_points, TEST_REQUIRED, "test_id", TEST_TABLE)
    _check_table(pretrain_examples, PRETRAIN_REQUIRED, "example_id", PRETRAIN_TABLE)
    tmp = staging.path
    if scores is None:
        _check_score_files(tmp, n_test, n_pre)
    elif set(scores) != set(SCORE_NAMES):
        raise RunError(f"scores must be exactly {SCORE_NAMES}, got {sorted(scores)}")
    for name, arr in (scores or {}).items():
        if arr.shape != (n_test, n_pre):
            raise RunError(f"scores[{name!r}] has shape {arr.shape}, expected {(n_test, n_pre)}")
        if not np.all(np.isfinite(arr)):
            raise RunError(f"scores[{name!r}] contains NaN or infinite values")
    if pretrain_xy.shape != (n_pre, 2) or test_xy.shape != (n_test, 2):
        raise RunError("map coordinates must have shapes (n_pretrain, 2) and (n_test, 2)")

    if scores is not None:
        (tmp / "scores").mkdir()
    (tmp / "map").mkdir()
    test_points = test_points.assign(test_id=test_points["test_id"].astype(str))
    pretrain_examples = pretrain_examples.assign(
        example_id=pretrain_examples["example_id"].astype(str)
    )
    test_points.to_parquet(tmp / TEST_TABLE, index=False)
    pretrain_examples.to_parquet(tmp / PRETRAIN_TABLE, index=False)
    for name in SCORE_NAMES if scores is not None else ():
        np.save(tmp / "scores" / f"{name}.npy", np.ascontiguousarray(scores[name], np.float32))
    np.save(tmp / "map" / "pretrain_xy.npy", np.asarray(pretrain_xy, np.float32))
    np.save(tmp / "map" / "test_xy.npy", np.asarray(test_xy, np.float32))
    if model_arrays:
        (tmp / "model").mkdir()
        for name, arr in model_arrays.items():
            np.save(tmp / "model" / f"{name}.npy", np.asarray(arr))
    files = {
        str(p.relative_to(tmp)): sha256_file(p)
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name != STAGING_MARKER
    }
    run_id = hashlib.sha256(
        json.dumps([files, manifest.get("config")], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    full = dict(manifest)
    full.update(
        schema_version=SCHEMA_VERSION,
        run_id=run_id,
        score_convention=SCORE_CONVENTION,
        shapes={"n_test": n_test, "n_pretrain": n_pre},
        files=files,
    )
    (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    pause_point("writing")
    staging.swap_into_place(check_replaceable if overwrite else None)
    return staging.dest


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` and validate its structure (:func:`manifest_problems`)."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunError(f"{path} is a file, not a run directory; pass the directory that "
                       "`python -m engine run --out` created")
    if not path.is_dir():
        raise RunError(
            f"run directory {path} does not exist; create it with "
            f"`python -m engine run CONFIG --out {path}`"
        )
    mpath = path / MANIFEST
    if not mpath.is_file():
        partial = " (it looks like an interrupted or partial run)" if any(path.iterdir()) else ""
        raise RunError(f"{path} has no {MANIFEST}{partial}; re-run `python -m engine run`")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{mpath} is not valid JSON ({exc}); re-run `python -m engine run`"
                       ) from None
    except OSError as exc:
        raise RunError(f"cannot read {mpath}: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict):
        raise RunError(f"{mpath} is not a JSON object; re-run `python -m engine run`")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunError(
            f"{path} has schema version {version!r}; this tool reads version {SCHEMA_VERSION}. "
            "Re-create the run with this version of the engine."
        )
    problems = manifest_problems(manifest)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                            if len(problems) > 5 else "")
        raise RunError(f"{mpath} is damaged or was edited: {shown}. Re-run `python -m engine "
                       "run` to re-create the run")
    return manifest


# Files every run lists in its manifest (so none of them escapes the hash check).
REQUIRED_FILES = (TEST_TABLE, PRETRAIN_TABLE, *(f"scores/{n}.npy" for n in SCORE_NAMES),
                  "map/pretrain_xy.npy", "map/test_xy.npy")
_HEX = frozenset("0123456789abcdef")
# key -> (accepted types, required).  Optional keys are checked only when present.
_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "schema_version": ((int,), True), "run_id": ((str,), True), "files": ((dict,), True),
    "shapes": ((dict,), True), "score_convention": ((str,), True),
    "config": ((dict,), False), "config_path": ((str,), False), "scenario": ((str,), False),
    "alpha": ((int, float, type(None)), False), "measurement": ((str,), False),
    "stages": ((dict,), False), "metrics": ((dict,), False), "classes": ((dict,), False),
    "render": ((dict,), False), "excluded_ids": ((list,), False),
    "excluded_finetune_ids": ((list,), False),
    "input_hashes": ((dict,), False), "approximation": ((str, type(None)), False),
    "timings": ((dict,), False), "versions": ((dict,), False),
    "distributed": ((dict,), False), "parent": ((dict,), False),
    "finetune_influence": ((dict,), False),
}


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object",
             list: "a list", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """Everything wrong with a manifest's structure (missing keys, wrong types, unsafe file
    names), as short phrases; empty when it is well formed."""
    out: list[str] = []
    for key, (types, required) in _SCHEMA.items():
        if key not in manifest:
            if required:
                out.append(f"key {key!r} is missing")
            continue
        value = manifest[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            out.append(f"{key!r} must be {_type_names(types)}, not {type(value).__name__}")
    shapes = manifest.get("shapes")
    if isinstance(shapes, dict):
        for key in ("n_test", "n_pretrain"):
            v = shapes.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                out.append(f"'shapes.{key}' must be a non-negative integer, not {v!r}")
    files = manifest.get("files")
    if isinstance(files, dict):
        for rel, digest in files.items():
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts or not parts:
                out.append(f"file entry {rel!r} points outside the run directory")
            if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
                out.append(f"file entry {rel!r} has no SHA-256 hash")
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            out.append(f"'files' does not list {missing}")
        listed = [f for f in FINETUNE_FILES if f in files]
        if len(listed) == 1:
            out.append(f"'files' lists {listed[0]} without "
                       f"{(set(FINETUNE_FILES) - set(listed)).pop()}")
        if listed and "finetune_influence" not in manifest:
            out.append(f"'files' lists {listed} but the manifest has no 'finetune_influence'")
    for key in ("excluded_ids", "excluded_finetune_ids"):
        excluded = manifest.get(key)
        if isinstance(excluded, list) and not all(isinstance(i, str) for i in excluded):
            out.append(f"'{key}' must be a list of strings")
    return out


def verify_files(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Compare every file listed in the manifest with its recorded SHA-256."""
    for rel, digest in manifest["files"].items():
        p = run_dir / rel
        if not p.is_file():
            raise RunError(f"{run_dir} is missing {rel}; the run is partial. Re-run it.")
        if sha256_file(p) != digest:
            raise RunError(
                f"{p} does not match the hash recorded in the manifest: the run was modified or "
                "mixed with files of another run. Re-run `python -m engine run`."
            )


def load_run(run_dir: str | os.PathLike, verify_hashes: bool = True) -> Run:
    """Load a run for reading: validates schema, hashes and shapes; memory-maps the scores."""
    path = Path(run_dir).resolve()
    manifest = read_manifest(path)
    if verify_hashes:
        verify_files(path, manifest)
    n_test = manifest["shapes"]["n_test"]
    n_pre = manifest["shapes"]["n_pretrain"]
    try:
        test_points = pd.read_parquet(path / TEST_TABLE)
        pretrain = pd.read_parquet(path / PRETRAIN_TABLE)
        scores = {
            n: np.load(path / "scores" / f"{n}.npy", mmap_mode="r") for n in SCORE_NAMES
        }
        pretrain_xy = np.load(path / "map" / "pretrain_xy.npy", mmap_mode="r")
        test_xy = np.load(path / "map" / "test_xy.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read run {path}: {exc}. Re-run `python -m engine run`.") from exc
    _check_table(test_points, TEST_REQUIRED, "test_id", TEST_TABLE)
    _check_table(pretrain, PRETRAIN_REQUIRED, "example_id", PRETRAIN_TABLE)
    if len(test_points) != n_test or len(pretrain) != n_pre:
        raise RunError(
            f"{path}: tables have {len(test_points)} test / {len(pretrain)} pretraining rows, "
            f"manifest says {n_test} / {n_pre}"
        )
    for n, arr in scores.items():
        if arr.shape != (n_test, n_pre):
            raise RunError(
                f"{path}: scores/{n}.npy has shape {arr.shape}, expected {(n_test, n_pre)}")
    if pretrain_xy.shape != (n_pre, 2) or test_xy.shape != (n_test, 2):
        raise RunError(f"{path}: map coordinates do not match the tables")
    validation = None
    vpath = path / "validation" / "summary.json"
    if vpath.is_file():
        try:
            validation = json.loads(vpath.read_text())
        except json.JSONDecodeError:
            validation = {"error": f"{vpath} is not valid JSON"}
    ft_scores, ft_table = _load_finetune(path, manifest, n_test)
    return Run(path, manifest, test_points, pretrain, scores, pretrain_xy, test_xy, validation,
               ft_scores, ft_table)


def _load_finetune(path: Path, manifest: dict[str, Any], n_test: int
                   ) -> tuple[np.ndarray | None, pd.DataFrame | None]:
    """The finetuning-data influence files the manifest lists (memory-mapped scores, table),
    or ``(None, None)``; copies the manifest does not list are not part of the run."""
    if FINETUNE_SCORES_FILE not in manifest["files"]:
        return None, None
    try:
        scores = np.load(path / FINETUNE_SCORES_FILE, mmap_mode="r")
        table = pd.read_parquet(path / FINETUNE_TABLE)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read run {path}: {exc}. Re-run `python -m engine run`.") from exc
    _check_table(table, FINETUNE_REQUIRED, "example_id", FINETUNE_TABLE)
    want = manifest["finetune_influence"].get("shape")
    if scores.ndim != 2 or scores.shape != (n_test, len(table)) or (
            want is not None and list(scores.shape) != list(want)):
        raise RunError(f"{path}: {FINETUNE_SCORES_FILE} has shape {scores.shape}, expected "
                       f"{(n_test, len(table))} ({n_test} scored test points x {len(table)} "
                       f"rows of {FINETUNE_TABLE}). Re-run `python -m engine run`.")
    return scores, table


def load_model_arrays(run: Run) -> dict[str, np.ndarray]:
    """The trained parameter vectors stored with the run (``model/*.npy``)."""
    names = [rel for rel in run.manifest["files"] if rel.startswith("model/")]
    if not names:
        raise RunError(f"{run.path} stores no trained parameters; re-run `python -m engine run`")
    return {Path(rel).stem: np.load(run.path / rel) for rel in names}


def list_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """Run directories (those with a manifest) directly under ``runs_dir``, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()
            and not p.name.startswith(".")]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)
