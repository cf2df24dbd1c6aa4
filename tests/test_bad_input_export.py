"""Bad input to the export CLI and the flag store: mistyped / damaged / read-only flag stores,
unwritable or occupied ``--out`` paths, hostile ids and names.

The CLI is run as a user runs it (``python -m dashboard.export`` in a subprocess): a bad input
must give exit status 2, one line on stderr, no traceback, and leave every file that existed
before byte-identical.  Runs are small synthetic runs (no training).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.make_synthetic_run import make_synthetic_run
from dashboard import export as export_mod
from dashboard.export import (
    MAX_NAME_BYTES,
    ExportBundle,
    IdsFormatError,
    build_export,
    export_file_name,
    ids_text,
    parse_ids_text,
    safe_file_name,
)
from dashboard.flags import FlagStore, FlagStoreError
from engine.artifacts import MANIFEST, PRETRAIN_TABLE, load_run, sha256_file

ROOT = Path(__file__).resolve().parents[1]
FLAGGED = ["p000003", "p000010"]
NOBODY = 65534


# --- helpers --------------------------------------------------------------------------------

def _cli(*args: object, user: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dashboard.export", *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _hashes(*dirs: Path) -> dict[str, str]:
    """sha256 of every file under ``dirs`` (symlinks not followed)."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _assert_unchanged(before: dict[str, str], *dirs: Path) -> None:
    after = _hashes(*dirs)
    for path, digest in before.items():
        assert after.get(path) == digest, f"{path} was changed or removed"


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, both
    assert "Traceback" not in both, both
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _main_error(capsys, argv: list[str], *needles: str) -> str:
    """In-process variant (for cheap argument checks): exit 2, one stderr line."""
    assert export_mod.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template")
    make_synthetic_run(root / "r", n_pretrain=60, n_test=6, seed=3)
    return root


@pytest.fixture()
def runs(template, tmp_path) -> Path:
    """A fresh runs directory holding run ``r`` and its flags (two flagged examples)."""
    root = tmp_path / "runs"
    shutil.copytree(template, root)
    FlagStore(root / "flags.sqlite").flag(load_run(root / "r").run_id, FLAGGED, "label noise")
    return root


@pytest.fixture()
def run_id(runs) -> str:
    return load_run(runs / "r").run_id


def _real_flags_bytes(tmp_path: Path, n: int = 600) -> bytes:
    """Bytes of a real, quiescent flags database with a few pages."""
    store = FlagStore(tmp_path / "real" / "flags.sqlite")
    store.path.parent.mkdir()
    store.flag("run", [f"e{i}" for i in range(n)], "other", note="n" * 50)
    return store.path.read_bytes()


def _damaged(kind: str, tmp_path: Path) -> bytes:
    if kind == "random-bytes":
        return os.urandom(8192)
    if kind == "text-file":
        return b"these are my notes, not a database\n" * 40
    if kind == "sqlite-header-then-junk":
        return b"SQLite format 3\x00" + os.urandom(8000)
    good = _real_flags_bytes(tmp_path)
    if kind == "truncated-half":
        return good[: len(good) // 2]
    if kind == "truncated-last-bytes":
        return good[:-100]
    raise AssertionError(kind)


DAMAGED = ["random-bytes", "text-file", "sqlite-header-then-junk", "truncated-half",
           "truncated-last-bytes"]


# --- (5) an explicit --flags-db must exist and be a flags database --------------------------

def test_cli_mistyped_flags_db_is_an_error(runs, tmp_path, capsys):
    out_dir = tmp_path / "out"
    before = _hashes(runs)
    proc = _cli(runs / "r", "--what", "minus-flagged", "--out", out_dir / "x.csv",
                "--flags-db", runs / "flags.sqlit")   # typo
    _assert_one_line_error(proc, "flags.sqlit", "no such file")
    for what in ("flagged", "view"):
        _main_error(capsys, [str(runs / "r"), "--what", what, "--test-id", "t00001", "--out",
                             str(out_dir / "x.csv"), "--flags-db", str(runs / "flags.sqlit")],
                    "no such file")
    _assert_unchanged(before, runs)
    assert not out_dir.exists()
    assert not (runs / "flags.sqlit").exists()   # not created either


@pytest.mark.parametrize("kind", ["directory", "empty-file", "sqlite-without-flags"])
def test_cli_explicit_flags_db_that_is_not_a_flags_database(runs, tmp_path, kind, capsys):
    db = tmp_path / "db.sqlite"
    if kind == "directory":
        db.mkdir()
    elif kind == "empty-file":
        db.write_bytes(b"")
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE other (x)")
        conn.close()
    before = _hashes(runs, tmp_path)
    argv = [runs / "r", "--what", "minus-flagged", "--out", tmp_path / "out" / "x.csv",
            "--flags-db", db]
    if kind == "directory":
        _assert_one_line_error(_cli(*argv), str(db))
    else:   # the same code path; in-process to keep the file fast
        _main_error(capsys, [str(a) for a in argv], str(db), "not a flags database")
    _assert_unchanged(before, runs, tmp_path)
    assert not (tmp_path / "out").exists()


def test_default_flag_store_missing_means_no_flags(runs, tmp_path, capsys):
    (runs / "flags.sqlite").unlink()
    out = tmp_path / "all.zip"
    assert export_mod.main([str(runs / "r"), "--what", "minus-flagged", "--out", str(out)]) == 0
    with zipfile.ZipFile(out) as zf:
        assert zf.read("flagged_ids.txt") == b""
    assert not (runs / "flags.sqlite").exists()   # reading created nothing


def test_explicit_flags_db_is_used(runs, run_id, tmp_path):
    other = FlagStore(tmp_path / "elsewhere.sqlite")
    other.flag(run_id, ["p000042"], "duplicate")
    out = tmp_path / "minus.zip"
    assert export_mod.main([str(runs / "r"), "--what", "minus-flagged", "--out", str(out),
                            "--flags-db", str(other.path)]) == 0
    with zipfile.ZipFile(out) as zf:
        assert parse_ids_text(zf.read("flagged_ids.txt").decode()) == ["p000042"]


# --- (7) damaged, non-SQLite and read-only flag stores --------------------------------------

@pytest.mark.parametrize("kind", ["random-bytes", "text-file", "truncated-half"])
def test_cli_damaged_flag_store_beside_the_run(runs, tmp_path, kind):
    flags = runs / "flags.sqlite"
    flags.write_bytes(_damaged(kind, tmp_path))
    before = _hashes(runs)
    names_before = set(os.listdir(runs))
    proc = _cli(runs / "r", "--what", "minus-flagged", "--out", tmp_path / "o" / "x.zip")
    line = _assert_one_line_error(proc, str(flags), "move it aside")
    assert "restore" in line
    _assert_unchanged(before, runs)
    assert set(os.listdir(runs)) >= names_before
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", DAMAGED)
def test_flag_store_api_on_a_damaged_file(tmp_path, kind):
    path = tmp_path / "flags.sqlite"
    data = _damaged(kind, tmp_path)
    path.write_bytes(data)
    store = FlagStore(path)
    for call in (lambda: store.flagged_ids("run"), lambda: store.flags("run"),
                 lambda: store.flags(), lambda: store.history("run"), store.check,
                 lambda: store.flag("run", ["e1"], "other"),
                 lambda: store.unflag("run", ["e1"])):
        with pytest.raises(FlagStoreError) as info:
            call()
        message = str(info.value)
        assert str(path) in message and "\n" not in message and "move it aside" in message
        assert path.read_bytes() == data   # never written, recreated or "repaired"
    assert path.exists()


def test_flag_store_errors_are_one_line_even_for_odd_paths(tmp_path):
    odd = tmp_path / "odd\nname"
    odd.mkdir()
    (odd / "flags.sqlite").write_bytes(b"not a database" * 10)
    with pytest.raises(FlagStoreError) as info:
        FlagStore(odd / "flags.sqlite").flagged_ids("run")
    assert "\n" not in str(info.value)


def test_write_to_an_unwritable_location_is_a_flag_store_error(tmp_path):
    store = FlagStore(tmp_path / "no-such-dir" / "flags.sqlite")
    with pytest.raises(FlagStoreError, match="writable"):
        store.flag("run", ["e1"], "other")
    assert not (tmp_path / "no-such-dir").exists()


def _reader_dir() -> Path:
    """A directory an unprivileged user can read (pytest's tmp dirs are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="flags-ro-"))
    d.chmod(0o755)
    return d


def _as_reader(d: Path) -> int | None:
    """The uid to read as so that ``d`` is really not writable: ``nobody`` under root (root
    ignores directory permissions, so chmod alone proves nothing), else ourselves after
    ``chmod 555``."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop privileges, and root "
                        "ignores directory permissions")
        return NOBODY
    d.chmod(0o555)
    return None


READ_SCRIPT = """
import os, sqlite3, sys
from dashboard.flags import FlagStore
d, run_id = sys.argv[1], sys.argv[2]
assert not os.access(d, os.W_OK), "the directory is writable: the test proves nothing"
try:   # what the store used to do (a read-write connection) fails here
    sqlite3.connect(os.path.join(d, "flags.sqlite")).execute("SELECT * FROM flags").fetchall()
    print("plain-connect-ok")
except sqlite3.Error as exc:
    print("plain-connect-failed:", exc)
print(sorted(FlagStore(os.path.join(d, "flags.sqlite")).flagged_ids(run_id)))
"""


def _run_reader(d: Path, run_id: str, user: int | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", READ_SCRIPT, str(d), run_id]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_read_wal_flags_in_a_read_only_directory():
    d = _reader_dir()
    try:
        store = FlagStore(d / "flags.sqlite")
        store.flag("run", ["a", "#b"], "other")
        assert store.path.read_bytes()[18:20] == b"\x02\x02"   # header: WAL mode
        assert sorted(os.listdir(d)) == ["flags.sqlite"]   # no -wal / -shm left
        before = _hashes(d)
        user = _as_reader(d)
        proc = _run_reader(d, "run", user)
        assert proc.returncode == 0, proc.stderr
        assert "plain-connect-failed" in proc.stdout   # the scenario of the bug
        assert proc.stdout.strip().splitlines()[-1] == "['#b', 'a']"
        _assert_unchanged(before, d)
        assert sorted(os.listdir(d)) == ["flags.sqlite"]
    finally:
        d.chmod(0o755)
        shutil.rmtree(d)


def test_read_only_directory_with_a_live_writer_sees_its_committed_flags():
    d = _reader_dir()
    writer = None
    try:
        store = FlagStore(d / "flags.sqlite")
        store.flag("run", ["a"], "other")
        writer = sqlite3.connect(store.path, isolation_level=None)
        writer.execute("PRAGMA wal_autocheckpoint = 0")   # keep the new row in the log
        writer.execute("INSERT INTO flags VALUES ('run', 'c', 'other', '', '', NULL, 'now')")
        assert (d / "flags.sqlite-wal").stat().st_size > 0
        user = _as_reader(d)
        proc = _run_reader(d, "run", user)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "['a', 'c']"
    finally:
        if writer is not None:
            writer.close()
        d.chmod(0o755)
        shutil.rmtree(d)


def test_cli_exports_from_a_read_only_runs_directory(template):
    d = _reader_dir()
    out_dir = Path(tempfile.mkdtemp(prefix="flags-out-"))
    try:
        shutil.copytree(template / "r", d / "r")
        for p in [d / "r", *(d / "r").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        run_id = load_run(d / "r").run_id
        FlagStore(d / "flags.sqlite").flag(run_id, FLAGGED, "label noise")
        before = _hashes(d)
        user = _as_reader(d)
        if user is not None:
            os.chown(out_dir, user, user)
        proc = _cli(d / "r", "--what", "minus-flagged", "--out", out_dir / "m.zip", user=user)
        assert proc.returncode == 0, proc.stderr
        with zipfile.ZipFile(out_dir / "m.zip") as zf:
            assert parse_ids_text(zf.read("flagged_ids.txt").decode()) == FLAGGED
        _assert_unchanged(before, d)
    finally:
        d.chmod(0o755)
        shutil.rmtree(d)
        shutil.rmtree(out_dir)


# --- flag store entry points ----------------------------------------------------------------

def test_flag_store_argument_sweep(tmp_path):
    store = FlagStore(tmp_path / "flags.sqlite")
    with pytest.raises(TypeError):
        store.flag("run", "abc", "other")   # a bare string would flag "a", "b", "c"
    with pytest.raises(TypeError):
        store.flag("run", [None], "other")
    with pytest.raises(TypeError):
        store.unflag("run", "abc")
    with pytest.raises(ValueError):
        store.flag("run", [""], "other")
    with pytest.raises(ValueError):
        store.flag("", ["e"], "other")
    with pytest.raises(ValueError):
        store.unflag(None, ["e"])   # type: ignore[arg-type]
    assert not store.path.exists()   # nothing was written by refused calls
    odd = ["#hash", "\\back", "new\nline", " spaced ", "日本語", "a\rb"]
    assert store.flag("run", odd, "other", note=None, user=None) == len(odd)  # type: ignore
    assert store.flagged_ids("run") == set(odd)   # stored exactly
    assert store.unflag("run", ["new\nline"]) == 1
    assert FlagStore(tmp_path / "missing.sqlite").unflag("run", ["e"]) == 0
    assert not (tmp_path / "missing.sqlite").exists()


def test_required_store_reads_raise_when_missing(tmp_path):
    store = FlagStore(tmp_path / "nope.sqlite", required=True)
    for call in (store.check, lambda: store.flags("r"), lambda: store.flagged_ids("r")):
        with pytest.raises(FlagStoreError, match="no such file"):
            call()
    assert FlagStore(tmp_path / "nope.sqlite").flags("r").empty   # not required: no flags


# --- (10) --out ------------------------------------------------------------------------------

def test_cli_out_under_a_regular_file(runs, tmp_path):
    somefile = tmp_path / "somefile.txt"
    somefile.write_text("my notes\n")
    before = _hashes(runs, tmp_path)
    proc = _cli(runs / "r", "--what", "flagged", "--out", somefile / "sub" / "x.csv")
    _assert_one_line_error(proc, "somefile.txt", "not a directory")
    _assert_unchanged(before, runs, tmp_path)


def test_cli_out_onto_an_existing_directory(runs, tmp_path, capsys):
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    before = _hashes(runs, tmp_path)
    proc = _cli(runs / "r", "--what", "flagged", "--out", target)
    _assert_one_line_error(proc, "is a directory")
    _main_error(capsys, [str(runs / "r"), "--what", "flagged", "--out", f"{tmp_path}/new-dir/"],
                "must name a file")
    _assert_unchanged(before, runs, tmp_path)
    assert sorted(os.listdir(target)) == ["keep.txt"]
    assert not (tmp_path / "new-dir").exists()


def test_cli_never_overwrites_without_overwrite(runs, run_id, tmp_path):
    out = tmp_path / "o" / "view.csv"
    out.parent.mkdir()
    (out.parent / "view.csv.kept_ids.txt").write_text("user's own list\n")   # a sibling exists
    (out.parent / "unrelated.txt").write_text("unrelated\n")
    before = _hashes(runs, tmp_path)
    proc = _cli(runs / "r", "--what", "minus-flagged", "--out", out)
    _assert_one_line_error(proc, "view.csv.kept_ids.txt", "already exists", "--overwrite")
    _assert_unchanged(before, runs, tmp_path)
    assert sorted(os.listdir(out.parent)) == ["unrelated.txt", "view.csv.kept_ids.txt"]

    # With --overwrite exactly the files of this export are replaced, nothing else touched.
    assert export_mod.main([str(runs / "r"), "--what", "minus-flagged", "--out", str(out),
                            "--overwrite"]) == 0
    assert sorted(os.listdir(out.parent)) == [
        "unrelated.txt", "view.csv", "view.csv.flagged_ids.txt", "view.csv.kept_ids.txt",
        "view.csv.manifest.json"]
    assert (out.parent / "unrelated.txt").read_text() == "unrelated\n"
    assert parse_ids_text((out.parent / "view.csv.flagged_ids.txt").read_text()) == FLAGGED
    assert len(pd.read_csv(out)) == 60 - len(FLAGGED)
    _assert_unchanged(_hashes(runs), runs)


def test_cli_refuses_the_run_directory_and_the_flag_store(runs, tmp_path, capsys):
    before = _hashes(runs)
    proc = _cli(runs / "r", "--what", "flagged", "--out", runs / "r" / "manifest.json",
                "--overwrite")
    _assert_one_line_error(proc, "inside the run directory")
    _main_error(capsys, [str(runs / "r"), "--what", "flagged", "--out",
                         str(runs / "flags.sqlite"), "--overwrite"], "flag store")
    _assert_unchanged(before, runs)
    assert json.loads((runs / "r" / MANIFEST).read_text())["run_id"]


def test_overwrite_replaces_a_symlink_not_its_target(runs, tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    link = tmp_path / "x.zip"
    link.symlink_to(precious)
    assert export_mod.main([str(runs / "r"), "--what", "flagged", "--out", str(link),
                            "--overwrite"]) == 0
    assert precious.read_text() == "precious\n"
    assert not link.is_symlink() and zipfile.is_zipfile(link)


def test_cli_usage_errors_are_one_line(runs, tmp_path):
    proc = _cli(runs / "r", "--what", "flagged", "--out", tmp_path / "x.csv", "--top-k", "x")
    _assert_one_line_error(proc, "--top-k", "see --help")
    assert not (tmp_path / "x.csv").exists()


def test_cli_argument_sweep(runs, tmp_path, capsys):
    r, out = str(runs / "r"), str(tmp_path / "x.csv")
    base = [r, "--out", out]
    _main_error(capsys, base + ["--what", "flagged", "--top-k", "-1"], "--top-k")
    _main_error(capsys, base + ["--what", "flagged", "--score-min", "nan"], "finite")
    _main_error(capsys, base + ["--what", "flagged", "--score-max", "inf"], "finite")
    _main_error(capsys, base + ["--what", "flagged", "--score-min", "1", "--score-max", "0"],
                "larger")
    _main_error(capsys, base + ["--what", "flagged", "--group", "original"], "--group-column")
    _main_error(capsys, base + ["--what", "view", "--test-id", ""], "test point")
    _main_error(capsys, base + ["--what", "view", "--test-id", "no\nsuch"], "not in run")
    _main_error(capsys, base + ["--what", "view", "--test-id", "t00001",
                                "--group-column", "nope", "--group", "x"], "nope")
    _main_error(capsys, [str(tmp_path / "no-run"), "--out", out, "--what", "flagged"],
                "does not exist")
    _main_error(capsys, [r, "--out", "", "--what", "flagged"], "must name a file")
    _main_error(capsys, [r, "--out", str(tmp_path / ("n" * 300 + ".csv")), "--what",
                         "flagged"], "")
    assert not (tmp_path / "x.csv").exists()


# --- ids files ------------------------------------------------------------------------------

ODD_IDS = ["plain", "#hash", "##", "\\back", "\\#both", "a#b", "tail\\", " spaced ", "tab\tin",
           "日本語", "é", "con", "../../etc/x", "x" * 5000]


def test_ids_text_round_trips_and_escapes():
    text = ids_text(ODD_IDS)
    assert parse_ids_text(text) == ODD_IDS
    lines = text.split("\n")
    assert lines[1] == "\\#hash" and lines[2] == "\\##" and lines[3] == "\\\\back"
    assert lines[4] == "\\\\#both" and lines[0] == "plain" and text.endswith("\n")
    assert not any(line.startswith("#") for line in lines)   # no id reads as a comment
    # CRLF endings and a BOM (an editor's save) read back the same.
    assert parse_ids_text("\ufeff" + text.replace("\n", "\r\n")) == ODD_IDS
    assert parse_ids_text("# a comment\n\nx\n") == ["x"]
    assert ids_text([]) == ""


@pytest.mark.parametrize("bad", ["new\nline", "car\rriage", "\n", "", "\ufeffbom", "ls\u2028x",
                                 "vt\vx", "nel\x85x", "\ud800lone"])
def test_ids_text_refuses_ids_it_cannot_hold(bad):
    with pytest.raises(IdsFormatError) as info:
        ids_text(["ok", bad])
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@pytest.fixture()
def odd_id_runs(tmp_path):
    """A run whose example ids include ``#hash`` and ``\\back`` (and optionally a newline),
    with the manifest's hashes updated so the run verifies."""
    def make(ids: dict[int, str]) -> Path:
        run = make_synthetic_run(tmp_path / "odd" / f"r{len(list(tmp_path.glob('odd/*')))}",
                                 n_pretrain=20, n_test=3, seed=4)
        table = pd.read_parquet(run / PRETRAIN_TABLE)
        for row, new in ids.items():
            table.loc[row, "example_id"] = new
        table.to_parquet(run / PRETRAIN_TABLE, index=False)
        manifest = json.loads((run / MANIFEST).read_text())
        manifest["files"][PRETRAIN_TABLE] = sha256_file(run / PRETRAIN_TABLE)
        (run / MANIFEST).write_text(json.dumps(manifest))
        return run
    return make


def test_cli_refuses_ids_with_line_breaks(odd_id_runs, tmp_path):
    run = odd_id_runs({1: "bad\nid", 2: "#hash"})
    FlagStore(run.parent / "flags.sqlite").flag(load_run(run).run_id, ["bad\nid"], "other")
    before = _hashes(run.parent)
    proc = _cli(run, "--what", "minus-flagged", "--out", tmp_path / "o" / "m.csv")
    _assert_one_line_error(proc, "line break")
    _assert_unchanged(before, run.parent)
    assert not (tmp_path / "o").exists()


def test_cli_ids_with_hash_and_backslash_round_trip(odd_id_runs, tmp_path, capsys):
    run = odd_id_runs({2: "#hash", 3: "\\back"})
    FlagStore(run.parent / "flags.sqlite").flag(load_run(run).run_id, ["#hash", "\\back"],
                                                "other")
    out = tmp_path / "m.csv"
    assert export_mod.main([str(run), "--what", "minus-flagged", "--out", str(out)]) == 0
    excluded = (tmp_path / "m.csv.flagged_ids.txt").read_text(encoding="utf-8")
    assert sorted(parse_ids_text(excluded)) == ["#hash", "\\back"]
    kept = parse_ids_text((tmp_path / "m.csv.kept_ids.txt").read_text(encoding="utf-8"))
    assert len(kept) == 18 and "#hash" not in kept


# --- file names derived from data -----------------------------------------------------------

HOSTILE_NAMES = ["../../etc/x", "a\\b", "..", ".", "", "con", "CON.txt", "nul", "lpt1.zip",
                 "a\nb", "x\r\ny", "\x00evil", "tab\tx", "\u202eexe.txt", ".hidden", "-rf",
                 "a/../../b", "what?*<>|:\"", "日本語テスト", "e\u0301", "x" * 1000, "é" * 400,
                 "\U0001f600" * 100, "trailing. . ."]


def _assert_safe(name: str, suffix: str = "") -> None:
    assert name.endswith(suffix)
    assert "/" not in name and "\\" not in name and ".." not in name and "\x00" not in name
    assert not name.startswith((".", "-")) and name.strip() == name
    assert not any(unicodedata.category(ch)[0] in "CZ" for ch in name), repr(name)
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert name.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL", "LPT1", "COM1"}
    assert name[: len(name) - len(suffix)]


@pytest.mark.parametrize("raw", HOSTILE_NAMES)
def test_safe_file_name(raw):
    for suffix in ("", ".zip", ".manifest.json"):
        name = safe_file_name(raw, suffix)
        _assert_safe(name, suffix)
        assert name == safe_file_name(raw, suffix)   # deterministic


def test_safe_file_name_keeps_ordinary_names_and_unicode():
    assert safe_file_name("influence-abc123-view-t00004", ".csv") == \
        "influence-abc123-view-t00004.csv"
    assert safe_file_name("日本語テスト") == "日本語テスト"
    assert safe_file_name("con") == "_con"
    assert safe_file_name("../../etc/x") == "etc_x"
    long_a, long_b = safe_file_name("x" * 1000 + "a"), safe_file_name("x" * 1000 + "b")
    assert long_a != long_b   # cut names keep a hash of the original


@pytest.mark.parametrize("test_id", HOSTILE_NAMES[:12])
def test_bundle_and_zip_entry_names_are_safe(test_id):
    bundle = ExportBundle(pd.DataFrame({"example_id": ["a", "#b"]}),
                          {"run_id": "../run\\id\n", "what": "view", "test_id": test_id},
                          "csv")
    for name in (bundle.data_name, export_file_name("../x", "view", test_id, "zip")):
        _assert_safe(name)
    with zipfile.ZipFile(io.BytesIO(bundle.zip_bytes())) as zf:
        names = zf.namelist()
        assert sorted(names) == sorted([bundle.data_name, "manifest.json", "view_ids.txt"])
        for name in names:
            _assert_safe(name)
        assert parse_ids_text(zf.read("view_ids.txt").decode()) == ["a", "#b"]


def test_real_export_names_match_the_panel(runs, run_id):
    store = FlagStore.beside_run(runs / "r")
    run = load_run(runs / "r")
    bundle = build_export(run, "view", "jsonl", store, test_id="t00002")
    assert bundle.data_name == export_file_name(run_id, "view", "t00002", "jsonl") == \
        f"influence-{run_id}-view-t00002.jsonl"


# --- dashboard pieces -----------------------------------------------------------------------

def test_export_panel_names_and_damaged_store(runs, monkeypatch):
    """The download buttons get safe names; with a damaged store the panel shows one error
    line instead of buttons (no traceback)."""
    import streamlit as st
    from streamlit.delta_generator import DeltaGenerator

    from dashboard import export_panel

    run = load_run(runs / "r")
    run.manifest["run_id"] = "../evil\\run"
    seen: list[str] = []
    errors: list[str] = []
    monkeypatch.setattr(DeltaGenerator, "download_button",
                        lambda self, label, **kw: seen.append(kw["file_name"]))
    monkeypatch.setattr(st, "error", lambda body, **kw: errors.append(body))
    export_panel.export_buttons(run, "view", key="k", test_id="../../etc/passwd")
    assert len(seen) == 2 and not errors
    for name in seen:
        _assert_safe(name)
    (runs / "flags.sqlite").write_bytes(b"garbage" * 100)
    seen.clear()
    export_panel.export_buttons(run, "view", key="k2", test_id="t00001")
    assert not seen and len(errors) == 1 and "\n" not in errors[0]
    assert str(runs / "flags.sqlite") in errors[0]


def test_guarded_read_and_write_show_one_line(tmp_path, monkeypatch):
    import streamlit as st

    from dashboard import flag_controls

    path = tmp_path / "flags.sqlite"
    path.write_bytes(b"garbage" * 100)
    store = FlagStore(path)
    errors: list[str] = []

    class StoppedError(Exception):
        pass

    def stop():
        raise StoppedError

    monkeypatch.setattr(st, "error", lambda body, **kw: errors.append(body))
    monkeypatch.setattr(st, "stop", stop)
    with pytest.raises(StoppedError):
        flag_controls.guarded_read(store.flags, "run")
    assert len(errors) == 1 and str(path) in errors[0] and "\n" not in errors[0]
    state: dict = {}
    monkeypatch.setattr(st, "session_state", state)
    assert not flag_controls.guarded_write(store.flag, "run", ["e"], "other")
    message = state[flag_controls.ERROR_KEY]
    assert str(path) in message and "\n" not in message
    assert path.read_bytes() == b"garbage" * 100
    assert flag_controls.guarded_read(FlagStore(tmp_path / "none.sqlite").flagged_ids,
                                      "run") == set()
