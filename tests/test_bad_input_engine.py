"""Bad input to the engine CLI, run as a user would (a subprocess): a nonzero exit with one
clear line, no traceback, and every file that existed before is byte-identical afterwards.
Plus interrupts (SIGINT / SIGTERM) at every phase of a run, with and without --overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from engine import artifacts
from engine.ids_file import IdsFormatError, ids_text, parse_ids_text, read_ids_file
from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def engine(*args: str, timeout: float = 240, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (what must not change)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, proc.stderr
    for w in words:
        assert w.lower() in err[0].lower(), err[0]


@pytest.fixture(scope="module")
def cfg_dir(small_config, tmp_path_factory) -> Path:
    """A private copy of the small config folder (the user's folder in these tests)."""
    d = tmp_path_factory.mktemp("user")
    for p in small_config.parent.iterdir():
        shutil.copy(p, d / p.name)
    (d / "notes.txt").write_text("my own notes\n")
    return d


@pytest.fixture(scope="module")
def a_run(cfg_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "first"
    proc = engine("run", cfg_dir / "config.toml", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


# --- --overwrite may only replace runs --------------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_run(cfg_dir):
    before = snapshot(cfg_dir)
    proc = engine("run", cfg_dir / "config.toml", "--out", cfg_dir, "--overwrite")
    assert_refused(proc, "refusing to replace", "not a complete run")
    assert snapshot(cfg_dir) == before
    assert "trained" not in proc.stdout      # refused before any training


def test_overwrite_refuses_a_regular_file(cfg_dir, tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    proc = engine("run", cfg_dir / "config.toml", "--out", target, "--overwrite")
    assert_refused(proc, "not a directory")
    assert target.read_text() == "a,b\n1,2\n"


def test_existing_out_without_overwrite_is_refused_before_training(cfg_dir, a_run):
    before = snapshot(a_run)
    proc = engine("run", cfg_dir / "config.toml", "--out", a_run)
    assert_refused(proc, "already exists")
    assert snapshot(a_run) == before


def test_out_under_a_regular_file_fails_before_training(cfg_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = engine("run", cfg_dir / "config.toml", "--out", blocker / "run")
    assert_refused(proc, "cannot write a run")
    assert "trained" not in proc.stdout and blocker.read_text() == "x"


def test_unknown_test_point_ids_fail_before_training(cfg_dir, tmp_path):
    text = (cfg_dir / "config.toml").read_text().replace(
        'test_points = "all"', 'test_points = ["test-000", "no-such-id"]')
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    for p in cfg_dir.glob("*.parquet"):
        shutil.copy(p, tmp_path / p.name)
    start = time.perf_counter()
    proc = engine("run", cfg, "--out", tmp_path / "run")
    assert_refused(proc, "no-such-id")
    assert "trained" not in proc.stdout and time.perf_counter() - start < 60
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.partial-*"))


# --- ids files ------------------------------------------------------------------------------

ODD_IDS = ["#hash", "\\back", "NA", "null", " spaced ", "ünï", "a,b", "x\ty"]


def test_ids_files_round_trip_every_id(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text(ids_text(ODD_IDS), encoding="utf-8")
    assert read_ids_file(path) == ODD_IDS
    # Windows editors: BOM + CRLF.
    path.write_bytes(b"\xef\xbb\xbf" + ids_text(ODD_IDS).replace("\n", "\r\n").encode())
    assert read_ids_file(path) == ODD_IDS
    assert parse_ids_text("# comment\n\nid1\n") == ["id1"]
    for bad in ("a\nb", "a\rb", "", "\ufeffa", "a\u2028b"):
        with pytest.raises(IdsFormatError):
            ids_text([bad])


def test_exclude_reads_escaped_and_na_ids_and_refuses_bad_files(tmp_path):
    # A pretraining table whose ids need the format's escapes and pandas' NA spellings.
    rows = pd.read_parquet(ROOT / "sample_data" / "digits" / "pretrain.parquet").iloc[:60]
    ids = ["#first", "\\second", "NA", "null"] + [f"p{i}" for i in range(56)]
    rows = rows.assign(example_id=ids)
    rows.to_csv(tmp_path / "pre.csv", index=False)
    from engine.data import load_table  # the loader the run uses

    table = load_table(tmp_path / "pre.csv", id_column="example_id", label_column="label",
                       feature_prefix="px_", classes=list(range(10)))
    assert table.ids.tolist()[:4] == ["#first", "\\second", "NA", "null"]
    ids_path = tmp_path / "ids.txt"
    ids_path.write_text(ids_text(["#first", "NA"]))
    assert read_ids_file(ids_path) == ["#first", "NA"]
    # An id containing a line break is refused when the table is loaded.
    rows.assign(example_id=["bad\nid"] + ids[1:]).to_parquet(tmp_path / "nl.parquet")
    with pytest.raises(ValueError, match="line break"):
        load_table(tmp_path / "nl.parquet", id_column="example_id", label_column="label",
                   feature_prefix="px_", classes=list(range(10)))


@pytest.mark.parametrize("kind", ["directory", "binary", "latin1", "missing"])
def test_bad_exclude_files_name_the_file(cfg_dir, tmp_path, kind):
    path = tmp_path / "ids"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\x00\x01\x02PNG")
    elif kind == "latin1":
        path.write_bytes("caf\xe9\n".encode("latin-1"))
    proc = engine("run", cfg_dir / "config.toml", "--out", tmp_path / "run", "--exclude", path)
    words = {"directory": "is a directory", "binary": "binary", "latin1": "not utf-8",
             "missing": "does not exist"}[kind]
    assert_refused(proc, str(path), words)


# --- configs and data -----------------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (("hidden = [8]", "hidden = [100000000000]"), ["[model] hidden", "wider than"]),
    (("hidden = [8]", "hidden = [1e11]"), ["[model] hidden", "positive integers"]),
    (("hidden = [8]", "hidden = [8]\nstandardize = 1"), ["unknown"]),
])
def test_config_errors_name_the_setting(cfg_dir, tmp_path, edit, words):
    cfg = tmp_path / "config.toml"
    cfg.write_text((cfg_dir / "config.toml").read_text().replace(*edit))
    for p in cfg_dir.glob("*.parquet"):
        shutil.copy(p, tmp_path / p.name)
    assert_refused(engine("run", cfg, "--out", tmp_path / "run"), *words)


@pytest.mark.parametrize("value", [1e6, 1e308])
def test_unscaled_features_are_refused_up_front_with_advice(cfg_dir, tmp_path, value):
    for p in cfg_dir.glob("*.parquet"):
        shutil.copy(p, tmp_path / p.name)
    pre = pd.read_parquet(tmp_path / "pre.parquet")
    pre["px_3"] = pre["px_3"].astype("float64")
    pre.loc[0, "px_3"] = value
    pre.to_parquet(tmp_path / "pre.parquet")
    shutil.copy(cfg_dir / "config.toml", tmp_path / "config.toml")
    start = time.perf_counter()
    proc = engine("run", tmp_path / "config.toml", "--out", tmp_path / "run")
    assert_refused(proc, "standardize")
    assert time.perf_counter() - start < 60


def test_standardize_option_trains_on_unscaled_features(cfg_dir, tmp_path):
    for p in cfg_dir.glob("*.parquet"):
        shutil.copy(p, tmp_path / p.name)
    for name in ("pre", "ft", "test"):
        t = pd.read_parquet(tmp_path / f"{name}.parquet")
        px = [c for c in t.columns if c.startswith("px_")]
        t[px] = t[px] * 1e6
        t.to_parquet(tmp_path / f"{name}.parquet")
    text = (cfg_dir / "config.toml").read_text().replace(
        'image_shape = [8, 8]', 'image_shape = [8, 8]\nstandardize = true')
    (tmp_path / "config.toml").write_text(text)
    proc = engine("run", tmp_path / "config.toml", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    m = artifacts.read_manifest(tmp_path / "run")
    assert m["config"]["data"]["standardize"] is True
    assert m["stages"]["pretrain"]["converged"]


# --- verify and damaged run directories ---------------------------------------------------

def _copy_run(a_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(a_run, dst)
    return dst


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["shapes"].pop("n_test"), ["shapes.n_test"]),
    (lambda m: m["shapes"].update(n_test="x"), ["shapes.n_test"]),
    (lambda m: m.update(files=[]), ["'files' must be an object"]),
    (lambda m: m.pop("run_id"), ["'run_id' is missing"]),
    (lambda m: m["files"].pop("scores/total.npy"), ["does not list"]),
    (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), ["outside the run"]),
    (lambda m: m.update(excluded_ids=[1, 2]), ["excluded_ids"]),
])
def test_verify_reports_what_is_wrong_with_an_edited_manifest(a_run, tmp_path, edit, words):
    run = _copy_run(a_run, tmp_path)
    m = json.loads((run / "manifest.json").read_text())
    edit(m)
    (run / "manifest.json").write_text(json.dumps(m))
    before = snapshot(run)
    proc = engine("verify", run)
    assert_refused(proc, "damaged or was edited", *words)
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncate-scores", "not-json", "list-json", "binary"])
def test_verify_reports_damaged_files(a_run, tmp_path, damage):
    run = _copy_run(a_run, tmp_path)
    if damage == "truncate-scores":
        p = run / "scores" / "total.npy"
        p.write_bytes(p.read_bytes()[:100])
    elif damage == "not-json":
        (run / "manifest.json").write_text("{oops")
    elif damage == "list-json":
        (run / "manifest.json").write_text("[1, 2]")
    else:
        (run / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    assert_refused(engine("verify", run))


def test_verify_on_a_file_says_it_is_a_file(tmp_path):
    f = tmp_path / "scores.npy"
    f.write_bytes(b"x")
    assert_refused(engine("verify", f), "is a file")


# --- interrupts -------------------------------------------------------------------------------

def _interrupt(cfg: Path, out: Path, point: str, sig: int, overwrite: bool
               ) -> subprocess.CompletedProcess:
    # The signal must land inside the pause: 3 s was too short for a loaded CI machine, where
    # this process can be starved for seconds between reading the line and signalling.
    env = {**ENV, "INFLUENCE_PAUSE_AT": point, "INFLUENCE_PAUSE_SECONDS": "15"}
    args = [sys.executable, "-m", "engine", "run", str(cfg), "--out", str(out)]
    if overwrite:
        args.append("--overwrite")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Generous: a loaded 2-core CI machine can take minutes to import and train to a pause.
    deadline = time.monotonic() + 900
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:          # the run announces the pause on stderr
        lines.append(line)
        if f"paused at {point}" in line:
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline
    out_text, err_rest = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(args, proc.returncode, out_text,
                                       "".join(lines) + err_rest)


# Every point with and without --overwrite, and every (point, signal) pair once across the two.
INTERRUPTS = {False: [("training", signal.SIGINT), ("scoring", signal.SIGTERM),
                      ("writing", signal.SIGINT), ("swap", signal.SIGTERM)],
              True: [("training", signal.SIGTERM), ("scoring", signal.SIGINT),
                     ("writing", signal.SIGTERM), ("swap", signal.SIGINT)]}


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupts_leave_the_old_or_the_new_run(cfg_dir, a_run, tmp_path, overwrite):
    cfg = cfg_dir / "config.toml"
    for point, sig in INTERRUPTS[overwrite]:
        out = tmp_path / f"{point}-{sig.name}"
        if overwrite:
            shutil.copytree(a_run, out)
        before = snapshot(out) if overwrite else {}
        proc = _interrupt(cfg, out, point, sig, overwrite)
        text = proc.stdout + proc.stderr
        assert "Traceback" not in text, text
        assert [ln for ln in proc.stderr.splitlines() if ln.startswith("interrupted")], text
        if point == "swap":
            # Signals are deferred inside the swap: the new run is complete.
            assert "the run was written completely" in proc.stderr
            assert artifacts.load_run(out).run_id
            if overwrite:
                assert snapshot(out) != before
        else:
            assert proc.returncode == 130 and "nothing was written" in proc.stderr
            if overwrite:
                assert snapshot(out) == before
            else:
                assert not out.exists()
        assert engine("verify", out).returncode == (0 if out.exists() else 2)
        assert not list(tmp_path.glob(".*partial-*")) and not list(tmp_path.glob(".*old-*"))


def test_leftovers_of_a_killed_run_are_repaired_on_the_next_start(cfg_dir, a_run, tmp_path):
    """SIGKILL cannot be caught: the next start removes the dead writer's staging directory
    and restores a run parked by an interrupted two-rename replacement."""
    from engine.atomic_dir import STAGING_MARKER

    dest = tmp_path / "run"
    staged = tmp_path / ".run.partial-dead1234"
    staged.mkdir()
    (staged / STAGING_MARKER).touch()
    (staged / "half.npy").write_bytes(b"x")
    park = tmp_path / ".run.old-abcd1234"
    shutil.copytree(a_run, park / "run")
    foreign = tmp_path / ".run.partial-notours"   # not made by the tool: left alone
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    proc = engine("run", cfg_dir / "config.toml", "--out", dest)
    assert "restored" in proc.stdout and "already exists" in proc.stderr
    assert artifacts.load_run(dest).run_id == artifacts.load_run(a_run).run_id
    assert not staged.exists() and not park.exists()
    assert (foreign / "keep.txt").read_text() == "mine"
