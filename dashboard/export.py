r"""Exports of pretraining examples with scores and flags, for the UI and the command line.

Three things can be exported, each as CSV, Parquet or JSON lines:

* ``view``: the filtered view of one test point (exactly the rows of the dashboard table);
* ``flagged``: the flagged examples of the run;
* ``minus-flagged``: the whole pretraining set without the flagged examples.

Every export comes with a small manifest (run id, filters, score convention, counts) and an
ids file named by what it lists (one ``example_id`` per line, the rows of the data file):
``view_ids.txt``, ``flagged_ids.txt`` or ``kept_ids.txt``; the ``minus-flagged`` bundle adds
``flagged_ids.txt`` (the ids it left out).  ``flagged`` and ``minus-flagged`` also carry the
pretraining file's feature columns (:mod:`dashboard.export_features`), so "minus flagged" is a
usable dataset.  To retrain without the flagged examples:
``python -m engine run CONFIG --out NEW_RUN --exclude flagged_ids.txt``.

Command line::

    python -m dashboard.export RUN_DIR --what view|flagged|minus-flagged \
        --format csv|parquet|jsonl --out FILE [--test-id ID] [filter options]

``--out`` ending in ``.zip`` writes the bundle; otherwise the data file is written to FILE and
the manifest and ids beside it (``FILE.manifest.json``, ``FILE.flagged_ids.txt``, ...).
Existing files are never replaced unless ``--overwrite`` is given, and then only the files
this export writes (each written to a temporary file first and renamed into place); nothing
is written inside the run directory or over the flag store.  ``--flags-db`` given explicitly
must be an existing flags database.  Errors are one line on stderr, exit status 2.

Ids files (``view_ids.txt``, ``flagged_ids.txt``, ``kept_ids.txt``) are written in the format
``python -m engine run --exclude`` reads, defined once in :mod:`engine.ids_file`.

File names derived from data (run ids, test ids) go through :func:`safe_file_name`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import secrets
import sys
import unicodedata
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from dashboard.convention import SCORE_CONVENTION
from dashboard.export_features import SourceDataError, with_source_columns
from dashboard.filters import (
    DOMINANT_TERMS,
    FLAG_STATUSES,
    SIGNS,
    FilterSpec,
    apply_filters,
    example_table,
    flag_column,
    score_frame,
)
from dashboard.flags import FlagStore, FlagStoreError
from engine.artifacts import Run, RunError, load_run
from engine.ids_file import IdsFormatError, ids_text, parse_ids_text  # noqa: F401 (re-exported)

WHATS = ("view", "flagged", "minus-flagged")
FORMATS = ("csv", "parquet", "jsonl")
MIME_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet",
              "jsonl": "application/x-ndjson", "zip": "application/zip"}
FLAG_DETAIL_COLUMNS = ["flag_reason", "flag_note", "flagged_by", "flagged_at", "flag_test_id"]
#: The ids file of each export, named by what it lists (the rows of the data file).
IDS_FILES = {"view": "view_ids.txt", "flagged": "flagged_ids.txt", "minus-flagged": "kept_ids.txt"}
#: The minus-flagged export also lists the ids it left out, ready for ``--exclude``.
EXCLUDED_IDS_FILE = "flagged_ids.txt"


@dataclass
class ExportBundle:
    """One export: the rows, their manifest, and how to serialise them."""

    frame: pd.DataFrame
    manifest: dict[str, Any]
    fmt: str
    excluded_ids: list[str] = field(default_factory=list)

    def file_name(self, ext: str) -> str:
        """Safe file name ``influence-<run_id>-<what>[-<test_id>].<ext>``."""
        return export_file_name(self.manifest["run_id"], self.manifest["what"],
                                self.manifest.get("test_id"), ext)

    @property
    def stem(self) -> str:
        """Base file name, e.g. ``influence-<run_id>-view-<test_id>`` (made safe)."""
        return self.data_name[: -len(self.fmt) - 1]

    @property
    def data_name(self) -> str:
        return self.file_name(self.fmt)

    def data_bytes(self) -> bytes:
        """The rows serialised in ``fmt``."""
        return frame_bytes(self.frame, self.fmt)

    @property
    def ids_name(self) -> str:
        """Name of the ids file of the rows (:data:`IDS_FILES`)."""
        return IDS_FILES[self.manifest["what"]]

    def ids_text(self) -> str:
        """The ids file of the rows: one example id per line, in row order."""
        return ids_text(self.frame["example_id"])

    def manifest_bytes(self) -> bytes:
        return json.dumps(self.manifest, indent=2, sort_keys=True, default=str).encode()

    def zip_bytes(self) -> bytes:
        """Zip holding the data file, ``manifest.json`` and the ids file of the rows
        (``view_ids.txt``, ``flagged_ids.txt`` or ``kept_ids.txt``; minus-flagged adds
        ``flagged_ids.txt``, the ids it left out)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(self.data_name, self.data_bytes())
            zf.writestr("manifest.json", self.manifest_bytes())
            zf.writestr(self.ids_name, self.ids_text())
            if self.manifest["what"] == "minus-flagged":
                zf.writestr(EXCLUDED_IDS_FILE, ids_text(self.excluded_ids))
        return buf.getvalue()


MAX_NAME_BYTES = 150
_NAME_FORBIDDEN = frozenset('/\\<>:"|?*')
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{p}{n}" for p in ("COM", "LPT") for n in range(1, 10)])


def safe_file_name(name: object, suffix: str = "", max_bytes: int = MAX_NAME_BYTES) -> str:
    """``name`` (from data: run ids, test ids) made safe as one file or zip entry name, plus
    ``suffix`` (a constant such as ``".zip"``).

    Path separators, characters Windows forbids, control / format / unassigned characters and
    whitespace become ``_``; runs of dots become one dot; leading dots, dashes and underscores
    and trailing dots and underscores are dropped; Windows device names (``con``, ``nul``, ...)
    get a leading ``_``; an empty result becomes ``unnamed``.  Names longer than ``max_bytes``
    (UTF-8, suffix included) are cut and end in 8 hex digits of the original name's SHA-1.
    """
    text = unicodedata.normalize("NFC", str(name))
    safe = "".join("_" if ch in _NAME_FORBIDDEN or unicodedata.category(ch)[0] in "CZ" else ch
                   for ch in text)
    safe = re.sub(r"_{2,}", "_", re.sub(r"\.{2,}", ".", safe)).lstrip("._-").rstrip("._")
    if not safe:
        safe = "unnamed"
    if safe.split(".")[0].upper() in _WINDOWS_RESERVED:
        safe = "_" + safe
    room = max_bytes - len(suffix.encode())
    if len(safe.encode()) > room:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cut = safe.encode()[: max(room - len(digest) - 1, 1)].decode("utf-8", "ignore")
        safe = f"{cut.rstrip('._') or 'unnamed'}-{digest}"
    return safe + suffix


def export_file_name(run_id: object, what: str, test_id: object, ext: str) -> str:
    """Download / zip entry name of an export: ``influence-<run_id>-<what>[-<test_id>].<ext>``,
    made safe by :func:`safe_file_name`."""
    parts = ["influence", str(run_id), what] + ([str(test_id)] if test_id else [])
    return safe_file_name("-".join(parts), f".{ext}")


def frame_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    """Serialise a frame as CSV, Parquet or JSON lines."""
    if fmt == "csv":
        return frame.to_csv(index=False).encode()
    if fmt == "parquet":
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        return buf.getvalue()
    if fmt == "jsonl":
        if frame.empty:
            return b""
        return frame.to_json(orient="records", lines=True, date_format="iso").encode()
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def read_frame(data: bytes, fmt: str) -> pd.DataFrame:
    """Inverse of :func:`frame_bytes` (used by tests and to check an export)."""
    if fmt == "csv":
        return pd.read_csv(io.BytesIO(data), dtype={"example_id": str})
    if fmt == "parquet":
        return pd.read_parquet(io.BytesIO(data))
    if fmt == "jsonl":
        if not data.strip():
            return pd.DataFrame()
        return pd.read_json(io.BytesIO(data), lines=True, dtype={"example_id": str})
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def test_row(run: Run, test_id: str) -> int:
    """Row of ``test_id`` in the score matrices; ``KeyError`` with a clear message if unknown."""
    hits = (run.test_points["test_id"].astype(str) == str(test_id)).to_numpy().nonzero()[0]
    if len(hits) == 0:
        raise KeyError(f"test point {test_id!r} is not in run {run.run_id} ({run.path})")
    return int(hits[0])


def _with_flag_details(frame: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    details = flags.set_index("example_id")[["reason", "note", "user", "flagged_at", "test_id"]]
    details.columns = FLAG_DETAIL_COLUMNS
    return frame.join(details, on="example_id")


def build_export(run: Run, what: str, fmt: str, store: FlagStore,
                 spec: FilterSpec | None = None, test_id: str | None = None,
                 examples: pd.DataFrame | None = None) -> ExportBundle:
    """Build an export of ``run``.

    ``view`` needs ``test_id`` and applies ``spec`` exactly as the dashboard table does.
    ``flagged`` / ``minus-flagged`` ignore ``spec`` and add the score columns of ``test_id`` when
    one is given.  ``examples`` may pass a cached :func:`example_table` to skip rebuilding it.
    """
    if what not in WHATS:
        raise ValueError(f"what must be one of {WHATS}, got {what!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if what == "view" and not test_id:
        raise ValueError("exporting the view needs a test point (test_id)")
    base = example_table(run) if examples is None else examples
    flags = store.flags(run.run_id)
    flagged_ids = set(flags["example_id"])
    if test_id:
        frame = score_frame(base, run.scores, test_row(run, test_id), flagged_ids)
    else:
        frame = base.assign(flagged=flag_column(base, flagged_ids))
    excluded: list[str] = []
    if what == "view":
        spec = spec or FilterSpec()
        frame = apply_filters(frame, spec)
    elif what == "flagged":
        frame = frame[frame["flagged"]]
    else:
        excluded = frame.loc[frame["flagged"], "example_id"].tolist()
        frame = frame[~frame["flagged"]]
    frame = _with_flag_details(frame.drop(columns=["row"]), flags).reset_index(drop=True)
    features = "not included in view exports"
    if what != "view":
        try:
            frame = with_source_columns(frame, run)
            features = ("the pretraining file's feature columns, label values and ids under "
                        "the config's column names (the run's class index as label_index): "
                        "the file can replace [data] pretrain in the run's config")
        except SourceDataError as exc:
            features = f"not included: {exc}"
    counts = {
        "rows": len(frame),
        "n_pretrain": run.n_pretrain,
        "n_flagged": len(flagged_ids),
    }
    if what == "minus-flagged":
        counts["n_excluded"] = len(excluded)
    if "total" in frame.columns:
        counts["n_helpful"] = int((frame["total"] > 0).sum())
        counts["n_harmful"] = int((frame["total"] < 0).sum())
    manifest = {
        "run_id": run.run_id,
        "run_dir": str(run.path),
        "what": what,
        "format": fmt,
        "test_id": test_id,
        "filters": spec.to_dict() if (what == "view" and spec) else None,
        "score_convention": SCORE_CONVENTION,
        "counts": counts,
        "columns": list(frame.columns),
        "features": features,
        "ids_file": (f"{IDS_FILES[what]} (example ids of the rows in the data file, one per "
                     "line; lines starting with # are comments; an id starting with # or \\ "
                     "is written with a leading \\ that readers strip)"),
        "excluded_ids_file": EXCLUDED_IDS_FILE if what == "minus-flagged" else None,
        "retrain_hint": ("python -m engine run CONFIG --out NEW_RUN --exclude "
                         + (EXCLUDED_IDS_FILE if what != "view" else IDS_FILES["view"])),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return ExportBundle(frame, manifest, fmt, excluded)


class ExportOutputError(ValueError):
    """``--out`` cannot be written (not a file path, under a regular file, would replace an
    existing file without ``--overwrite``, inside the run directory, the flag store)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m dashboard.export",
        description="Export pretraining examples (filtered view, flagged set, or all minus "
                    "flagged) with scores and flags. " + SCORE_CONVENTION)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--what", choices=WHATS, required=True)
    p.add_argument("--format", choices=FORMATS, default="csv")
    p.add_argument("--out", required=True,
                   help="data file, or a .zip for data + manifest.json + the ids file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files at --out (only the files this export writes)")
    p.add_argument("--test-id", help="test point whose scores to include (required for view)")
    p.add_argument("--flags-db", type=Path,
                   help="flag store, must exist (default: RUN_DIR/../flags.sqlite, where a "
                        "missing file means nothing is flagged)")
    p.add_argument("--sign", choices=SIGNS, default="both")
    p.add_argument("--top-k", type=int, default=20, help="0 keeps every row")
    p.add_argument("--label", type=int, action="append", default=[],
                   help="pretraining label to keep (repeatable)")
    p.add_argument("--group-column")
    p.add_argument("--group", action="append", default=[], help="group value (repeatable)")
    p.add_argument("--score-min", type=float)
    p.add_argument("--score-max", type=float)
    p.add_argument("--dominant-term", choices=DOMINANT_TERMS, default="any")
    p.add_argument("--flag-status", choices=FLAG_STATUSES, default="all")
    p.add_argument("--search", default="", help="substring of the example text (or id)")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the run")
    return p


def spec_from_args(args: argparse.Namespace) -> FilterSpec:
    """The filter spec described by the CLI options (``ValueError`` for contradictory ones)."""
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 keeps every row), got {args.top_k}")
    for name in ("score_min", "score_max"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.score_min is not None and args.score_max is not None \
            and args.score_min > args.score_max:
        raise ValueError(f"--score-min {args.score_min} is larger than --score-max "
                         f"{args.score_max}")
    if args.group and not args.group_column:
        raise ValueError("--group needs --group-column (the metadata column to match)")
    return FilterSpec(
        sign=args.sign, top_k=args.top_k or None, labels=tuple(args.label),
        group_column=args.group_column, groups=tuple(args.group),
        score_min=args.score_min, score_max=args.score_max,
        dominant_term=args.dominant_term, flag_status=args.flag_status,
        text_query=args.search)


def bundle_files(bundle: ExportBundle, out: Path) -> dict[Path, bytes]:
    """What :func:`write_bundle` writes: path -> bytes (a zip at ``out``, or the data file at
    ``out`` and the manifest and ids beside it).  Raises :class:`IdsFormatError` for ids the
    ids files cannot hold."""
    if out.suffix.lower() == ".zip":
        return {out: bundle.zip_bytes()}
    files = {out: bundle.data_bytes(),
             out.with_name(out.name + ".manifest.json"): bundle.manifest_bytes(),
             out.with_name(f"{out.name}.{bundle.ids_name}"): bundle.ids_text().encode()}
    if bundle.manifest["what"] == "minus-flagged":
        excluded = ids_text(bundle.excluded_ids).encode()
        files[out.with_name(f"{out.name}.{EXCLUDED_IDS_FILE}")] = excluded
    return files


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be a file: empty, ``.``/``..``, an existing directory,
    or under an existing path that is not a directory."""
    if out.name in ("", ".", ".."):
        raise ExportOutputError(f"--out {str(out)!r} must name a file, e.g. out/export.zip")
    if out.is_dir():
        raise ExportOutputError(f"--out {out} is a directory; give a file path in it, e.g. "
                                f"{out / 'export.zip'}")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ExportOutputError(f"--out {out}: {parent} is not a directory")
            break


def _check_targets(paths: Sequence[Path], overwrite: bool, protect: Sequence[Path]) -> None:
    protect_dirs = [p.resolve() for p in protect if p.is_dir()]
    protect_files = {p.resolve() for p in protect if not p.is_dir()}
    existing = []
    for path in paths:
        check_out(path)
        real = path.resolve()
        for d in protect_dirs:
            if real == d or real.is_relative_to(d):
                raise ExportOutputError(f"refusing to write {path} inside the run directory {d} "
                                        "(runs are read-only); choose another --out")
        if real in protect_files:
            raise ExportOutputError(f"refusing to write {path} over the flag store {real}; "
                                    "choose another --out")
        if os.path.lexists(path):
            if not (path.is_file() or path.is_symlink()):
                raise ExportOutputError(f"{path} exists and is not a regular file; choose "
                                        "another --out")
            existing.append(path)
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ExportOutputError(f"{existing[0]} already exists{more}; refusing to overwrite: "
                                "choose another --out or pass --overwrite")


def write_bundle(bundle: ExportBundle, out: Path, overwrite: bool = False,
                 protect: Sequence[Path] = ()) -> list[Path]:
    """Write a bundle to ``out`` (zip, or data file + manifest + ids beside it).

    Refuses (:class:`ExportOutputError`, before writing anything) an ``out`` that cannot be a
    file, targets inside a ``protect`` directory or equal to a ``protect`` file, and targets that
    exist unless ``overwrite``; only the files of this export are ever replaced.  Every file is
    first written in full to a temporary file beside it, then renamed into place."""
    files = bundle_files(bundle, out)
    _check_targets(list(files), overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    temps: dict[Path, str] = {}
    try:
        for path, data in files.items():
            tmp = str(path.parent / f".export-{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
            temps[path] = tmp
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for path, tmp in list(temps.items()):
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)   # fails if path appeared meanwhile: never clobbers
                except FileExistsError:
                    raise ExportOutputError(f"{path} appeared while exporting; refusing to "
                                            "overwrite it") from None
                except OSError:   # no hard links on this file system
                    if os.path.lexists(path):
                        raise ExportOutputError(f"{path} appeared while exporting; refusing "
                                                "to overwrite it") from None
                    os.replace(tmp, path)
                else:
                    os.unlink(tmp)
            del temps[path]
    finally:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    return list(files)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if not args.out.strip() or args.out.endswith(("/", os.sep)):
            raise ExportOutputError(f"--out {args.out!r} must name a file, not a directory, "
                                    "e.g. out/export.zip")
        out = Path(args.out)
        check_out(out)
        if args.flags_db is not None:
            store = FlagStore(args.flags_db, required=True)
            store.check()
        run = load_run(args.run_dir, verify_hashes=not args.no_verify)
        if args.flags_db is None:
            store = FlagStore.beside_run(run.path)
        bundle = build_export(run, args.what, args.format, store, spec, args.test_id)
        store_files = [store.path.with_name(store.path.name + s)
                       for s in ("", "-wal", "-shm", "-journal")]
        written = write_bundle(bundle, out, args.overwrite,
                               protect=[run.path, *store_files])
    except (RunError, KeyError, ValueError, FlagStoreError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {_one_line(msg)}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {_one_line(exc.strerror or exc)}{where}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(f"{bundle.manifest['counts']['rows']} rows ({args.what}, run {run.run_id})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
