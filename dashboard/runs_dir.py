"""Where runs live and which one opens first (no Streamlit here)."""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.artifacts import MANIFEST, list_runs

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR_ENV = "INFLUENCE_RUNS_DIR"
DEFAULT_RUN = "digits"


def resolve_runs_dir(argv: Sequence[str], environ: Mapping[str, str]) -> Path:
    """``--runs-dir`` script argument, else ``$INFLUENCE_RUNS_DIR``, else ``<repo>/runs``.

    Unknown arguments are ignored, so this is safe under pytest / AppTest, whose ``sys.argv``
    belongs to the test runner.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs-dir")
    known, _ = parser.parse_known_args(list(argv))
    raw = known.runs_dir or environ.get(RUNS_DIR_ENV) or str(REPO_ROOT / "runs")
    return Path(raw).expanduser().resolve()


def run_names(runs_dir: Path) -> list[str]:
    """Names of run directories under ``runs_dir``: complete runs (newest first), then other
    non-hidden directories (interrupted or partial runs, listed so opening them says why).

    Hidden directories (``.NAME.partial-...`` staging folders of the engine, ``.NAME.old-...``)
    are never listed.  A directory that cannot be read (permissions, deleted while listing) is
    treated as having no runs: :func:`runs_dir_problem` says why.
    """
    try:
        complete = [p.name for p in list_runs(runs_dir)]
        others = []
        if runs_dir.is_dir():
            others = sorted(p.name for p in runs_dir.iterdir()
                            if not p.name.startswith(".") and p.name not in complete
                            and _is_dir(p) and not _exists(p / MANIFEST))
    except OSError:
        return []
    return [n for n in complete + others if is_plain_name(n)]


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return True  # unreadable: not listed as a partial run


def is_plain_name(name: str) -> bool:
    """Whether ``name`` can name a run: one non-empty, non-hidden path component (no ``/``,
    no NUL, no leading ``.``, so neither ``.`` nor ``..``)."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\x00" not in name


def run_path(runs_dir: Path, name: str | None) -> Path | None:
    """``runs_dir / name`` when ``name`` is one of :func:`run_names` (``None`` otherwise).

    The name is matched against the listing, never joined as a path first, so a ``?run=``
    value like ``../x``, ``/etc`` or ``runs/../digits`` can never reach a directory outside
    the runs directory, nor a hidden staging directory inside it.
    """
    if not name or not is_plain_name(name) or name not in run_names(runs_dir):
        return None
    return runs_dir / name


def runs_dir_problem(runs_dir: Path) -> str | None:
    """Why ``runs_dir`` cannot hold runs (missing, not a directory, unreadable), or ``None``."""
    if not runs_dir.exists():
        return "does not exist"
    if not runs_dir.is_dir():
        return "is not a directory"
    if not os.access(runs_dir, os.R_OK | os.X_OK):
        return "cannot be read (permissions)"
    return None


def default_run(names: Sequence[str]) -> str | None:
    """``digits`` when present, else the newest run, else ``None``."""
    if DEFAULT_RUN in names:
        return DEFAULT_RUN
    return names[0] if names else None


#: Files a run may gain after it was written (``python -m engine validate``); not in the
#: manifest's file list, but the dashboard shows them, so they are part of the fingerprint.
EXTRA_FILES = ("validation/summary.json", "validation/loo_scatter.json")


def fingerprint(run_dir: Path, manifest: Mapping[str, Any]) -> str:
    """A short digest of (size, mtime_ns, inode) of ``manifest.json``, of every file the
    manifest lists and of :data:`EXTRA_FILES`; a missing file counts as missing.

    Cheap (one ``stat`` per file, no reading), taken on every rerun and part of the run cache
    key: a file changed in place (same name, new size or modification time) or replaced
    (new inode) gives a new fingerprint, hence a re-open that checks every hash again.
    """
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    listed = sorted(str(rel) for rel in files) if isinstance(files, Mapping) else []
    entries = []
    for rel in [MANIFEST, *listed, *EXTRA_FILES]:
        try:
            st = os.stat(run_dir / rel)
            entries.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
        except (OSError, ValueError):
            entries.append(f"{rel}:missing")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:24]
