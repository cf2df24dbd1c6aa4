"""Where runs live and which one opens first (no Streamlit here)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

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
    non-hidden directories (interrupted or partial runs, listed so opening them says why)."""
    complete = [p.name for p in list_runs(runs_dir)]
    others = []
    if runs_dir.is_dir():
        others = sorted(p.name for p in runs_dir.iterdir()
                        if p.is_dir() and not p.name.startswith(".")
                        and p.name not in complete and not (p / MANIFEST).exists())
    return complete + others


def default_run(names: Sequence[str]) -> str | None:
    """``digits`` when present, else the newest run, else ``None``."""
    if DEFAULT_RUN in names:
        return DEFAULT_RUN
    return names[0] if names else None


def manifest_mtime_ns(run_dir: Path) -> int:
    """Modification time of the manifest (0 when missing): part of the run cache key."""
    try:
        return os.stat(run_dir / MANIFEST).st_mtime_ns
    except OSError:
        return 0
