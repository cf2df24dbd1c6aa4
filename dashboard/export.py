"""Exports of pretraining examples with scores and flags, for the UI and the command line.

Three things can be exported, each as CSV, Parquet or JSON lines:

* ``view``: the filtered view of one test point (exactly the rows of the dashboard table);
* ``flagged``: the flagged examples of the run;
* ``minus-flagged``: the whole pretraining set without the flagged examples.

Every export comes with a small manifest (run id, filters, score convention, counts) and
``ids.txt`` (one ``example_id`` per line, the ids of the rows in the data file).  The zip bundle
holds the data file, ``manifest.json`` and ``ids.txt``; the ``minus-flagged`` bundle adds
``excluded_ids.txt`` (the flagged ids that were left out).  To retrain without the examples of
an ids file: ``python -m engine run CONFIG --out NEW_RUN --exclude ids.txt``.

Command line::

    python -m dashboard.export RUN_DIR --what view|flagged|minus-flagged \\
        --format csv|parquet|jsonl --out FILE [--test-id ID] [filter options]

``--out`` ending in ``.zip`` writes the bundle; otherwise the data file is written to FILE and
the manifest and ids beside it (``FILE.manifest.json``, ``FILE.ids.txt``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from dashboard.convention import SCORE_CONVENTION
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
from dashboard.flags import FlagStore
from engine.artifacts import Run, RunError, load_run

WHATS = ("view", "flagged", "minus-flagged")
FORMATS = ("csv", "parquet", "jsonl")
MIME_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet",
              "jsonl": "application/x-ndjson", "zip": "application/zip"}
FLAG_DETAIL_COLUMNS = ["flag_reason", "flag_note", "flagged_by", "flagged_at", "flag_test_id"]


@dataclass
class ExportBundle:
    """One export: the rows, their manifest, and how to serialise them."""

    frame: pd.DataFrame
    manifest: dict[str, Any]
    fmt: str
    excluded_ids: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        """Base file name, e.g. ``influence-<run_id>-view-<test_id>``."""
        parts = ["influence", self.manifest["run_id"], self.manifest["what"]]
        if self.manifest.get("test_id"):
            parts.append(str(self.manifest["test_id"]))
        return "-".join(parts).replace("/", "_").replace(" ", "_")

    @property
    def data_name(self) -> str:
        return f"{self.stem}.{self.fmt}"

    def data_bytes(self) -> bytes:
        """The rows serialised in ``fmt``."""
        return frame_bytes(self.frame, self.fmt)

    def ids_text(self) -> str:
        """``ids.txt``: one example id per line, in row order."""
        return ids_text(self.frame["example_id"])

    def manifest_bytes(self) -> bytes:
        return json.dumps(self.manifest, indent=2, sort_keys=True, default=str).encode()

    def zip_bytes(self) -> bytes:
        """Zip holding the data file, ``manifest.json``, ``ids.txt`` (and ``excluded_ids.txt``)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(self.data_name, self.data_bytes())
            zf.writestr("manifest.json", self.manifest_bytes())
            zf.writestr("ids.txt", self.ids_text())
            if self.manifest["what"] == "minus-flagged":
                zf.writestr("excluded_ids.txt", ids_text(self.excluded_ids))
        return buf.getvalue()


def ids_text(ids: Sequence[str] | pd.Series) -> str:
    """One id per line, newline-terminated (empty string for no ids)."""
    return "".join(f"{i}\n" for i in ids)


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
        "ids_file": "ids.txt (example ids of the rows in the data file, one per line)",
        "retrain_hint": ("python -m engine run CONFIG --out NEW_RUN --exclude "
                         + ("excluded_ids.txt" if what == "minus-flagged" else "ids.txt")),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return ExportBundle(frame, manifest, fmt, excluded)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dashboard.export",
        description="Export pretraining examples (filtered view, flagged set, or all minus "
                    "flagged) with scores and flags. " + SCORE_CONVENTION)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--what", choices=WHATS, required=True)
    p.add_argument("--format", choices=FORMATS, default="csv")
    p.add_argument("--out", type=Path, required=True,
                   help="data file, or a .zip for data + manifest.json + ids.txt")
    p.add_argument("--test-id", help="test point whose scores to include (required for view)")
    p.add_argument("--flags-db", type=Path, help="flag store (default: RUN_DIR/../flags.sqlite)")
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
    """The filter spec described by the CLI options."""
    return FilterSpec(
        sign=args.sign, top_k=args.top_k or None, labels=tuple(args.label),
        group_column=args.group_column, groups=tuple(args.group),
        score_min=args.score_min, score_max=args.score_max,
        dominant_term=args.dominant_term, flag_status=args.flag_status,
        text_query=args.search)


def write_bundle(bundle: ExportBundle, out: Path) -> list[Path]:
    """Write a bundle to ``out`` (zip, or data file + manifest + ids beside it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".zip":
        out.write_bytes(bundle.zip_bytes())
        return [out]
    files = {out: bundle.data_bytes(),
             out.with_name(out.name + ".manifest.json"): bundle.manifest_bytes(),
             out.with_name(out.name + ".ids.txt"): bundle.ids_text().encode()}
    if bundle.manifest["what"] == "minus-flagged":
        excluded = ids_text(bundle.excluded_ids).encode()
        files[out.with_name(out.name + ".excluded_ids.txt")] = excluded
    for path, data in files.items():
        path.write_bytes(data)
    return list(files)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run = load_run(args.run_dir, verify_hashes=not args.no_verify)
        store = FlagStore(args.flags_db) if args.flags_db else FlagStore.beside_run(run.path)
        bundle = build_export(run, args.what, args.format, store,
                              spec_from_args(args), args.test_id)
    except (RunError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    for path in write_bundle(bundle, args.out):
        print(path)
    print(f"{bundle.manifest['counts']['rows']} rows ({args.what}, run {run.run_id})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
