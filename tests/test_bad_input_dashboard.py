"""Bad input to the dashboard: ``?run=`` / ``?test_id=`` / ``?example_id=`` values (unknown,
path-like, Markdown, huge), malformed manifests, run files changed or truncated under a running
dashboard, runs deleted while open, stale selections, odd ids in a run, and the server's default
address.

Page tests go through ``streamlit.testing.v1.AppTest`` on small synthetic runs
(``benchmarks/make_synthetic_run.py``) and assert an on-page message, no exception, and that no
file of any run directory changed (the dashboard only reads runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from benchmarks.make_synthetic_run import make_synthetic_run
from dashboard.flags import FlagStore
from engine.artifacts import RunError, load_run, write_run
from tests.apptest_pages import open_page, stop_group

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
OVERVIEW, TEST_PAGE, EXAMPLE_PAGE, FLAGS_PAGE = (
    "views/overview.py", "views/test_point.py", "views/example.py", "views/flag_list.py")
ALL_PAGES = (OVERVIEW, TEST_PAGE, EXAMPLE_PAGE, FLAGS_PAGE)


# --- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input_runs")
    make_synthetic_run(root / "digits", n_pretrain=120, n_test=16, seed=3)
    make_synthetic_run(root / "other", n_pretrain=80, n_test=10, seed=4)
    return root


@pytest.fixture()
def runs(template, tmp_path, monkeypatch) -> Path:
    """A fresh runs directory (digits, other), a hidden complete-looking staging directory
    inside it and a complete run outside it, none of which a ``?run=`` value may open."""
    root = tmp_path / "runs"
    shutil.copytree(template, root)
    shutil.copytree(template / "digits", root / ".digits.partial-xyz")
    shutil.copytree(template / "other", tmp_path / "outside")
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(root))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (the flag store beside the runs excluded)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("flags.sqlite")}




def texts(elements) -> str:
    return html.unescape("\n".join(str(e.value) for e in elements))


def visible(md: str) -> str:
    """``md`` with its backslash escapes removed (roughly what a reader sees)."""
    return re.sub(r"\\(.)", r"\1", md)


def code_spans(md: str) -> list[str]:
    """Contents of the inline code spans of a Markdown paragraph, by CommonMark's rule: a run
    of n backticks opens a span that the next run of exactly n backticks closes; one leading
    and one trailing space are stripped when both are there; backslash escapes work only
    outside spans."""
    spans, i = [], 0
    while i < len(md):
        if md[i] == "\\":
            i += 2
            continue
        if md[i] != "`":
            i += 1
            continue
        j = i
        while j < len(md) and md[j] == "`":
            j += 1
        k, close = j, None
        while k < len(md):
            if md[k] != "`":
                k += 1
                continue
            m = k
            while m < len(md) and md[m] == "`":
                m += 1
            if m - k == j - i:
                close = (k, m)
                break
            k = m
        if close is None:
            i = j
            continue
        content = md[j:close[0]]
        if len(content) > 1 and content[0] == content[-1] == " " and content.strip(" "):
            content = content[1:-1]
        spans.append(content)
        i = close[1]
    return spans


def outside_code(md: str) -> str:
    """``md`` without its code spans (for checking what is left is inert)."""
    out = md
    for span in code_spans(md):
        out = out.replace(span, "", 1)
    return out


def unescaped(md: str, chars: str = "*_[]<>$~|") -> list[str]:
    """Markup characters outside code spans that are not backslash-escaped."""
    rest = outside_code(md)
    return [c for i, c in enumerate(rest) if c in chars and (i == 0 or rest[i - 1] != "\\")]


def edit_manifest(run_dir: Path, change) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    result = change(manifest)
    path.write_text(json.dumps(manifest if result is None else result))


# --- (6) ?run= never opens another run ------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside", "/etc", "runs/../digits", "", ".digits.partial-xyz",
                                  "no-such-run", "./digits", "digits/"])
def test_unknown_or_path_like_run_name_opens_no_run(runs, tmp_path, name):
    before, outside = snapshot(runs), snapshot(tmp_path / "outside")
    at = open_page(query={"run": name})
    assert not at.title, "a run was opened: " + texts(at.title)
    error = texts(at.error)
    assert "no run" in error and "so no run is open" in error
    assert set(at.selectbox(key="run_choice").options) == {"digits", "other"}
    assert "(?run=digits)" in texts(at.markdown) and "(?run=other)" in texts(at.markdown)
    if name.strip():
        assert name in code_spans(at.error[0].value)
    at.switch_page(TEST_PAGE).run()  # no page of any run either
    assert not at.exception and "Test point explorer" not in texts(at.title)
    assert "no run" in texts(at.error)
    assert snapshot(runs) == before and snapshot(tmp_path / "outside") == outside


def test_picking_a_run_after_a_bad_name_opens_it(runs):
    at = open_page(query={"run": "../outside"})
    at.run()  # stays an error on reruns: never falls back to the default run
    assert not at.title and "no run" in texts(at.error)
    at.selectbox(key="run_choice").set_value("other").run()
    assert not at.exception and not at.error
    assert "other" in at.title[0].value and at.selectbox(key="run").value == "other"


def test_run_deleted_while_open_says_so(runs):
    at = open_page(query={"run": "other"})
    assert "other" in at.title[0].value
    shutil.rmtree(runs / "other")
    before = snapshot(runs)
    for _ in range(2):  # and keeps saying so: no silent switch to "digits"
        at.run()
        assert not at.exception and not at.title
        assert "There is no run `other`" in texts(at.error)
    assert at.selectbox(key="run_choice").options == ["digits"]
    assert snapshot(runs) == before


# --- (9) runs changed under the dashboard ---------------------------------------------------

def test_score_file_changed_in_place_is_reopened_and_refused(runs):
    run = load_run(runs / "digits")
    tid = str(run.test_points["test_id"].iloc[3])
    original_files = snapshot(runs)
    at = open_page(TEST_PAGE, {"test_id": tid})
    assert tid in at.subheader[0].value
    path = runs / "digits" / "scores" / "total.npy"
    original, stat = path.read_bytes(), path.stat()
    changed = bytearray(original)
    changed[-4:] = b"\x00\x00\x80\x7f"  # same size, other value: served mixed before
    path.write_bytes(bytes(changed))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    before = snapshot(runs)
    at.run()
    assert not at.exception
    assert "Cannot open run `digits`" in texts(at.error) and "hash" in texts(at.error)
    assert not at.subheader  # nothing of the edited run is shown
    # Restored (same bytes and times): the run opens again without a restart.
    path.write_bytes(original)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    at.run()
    assert not at.exception and not at.error and tid in at.subheader[0].value
    assert snapshot(runs) == original_files and before != original_files


def test_validation_written_under_a_running_dashboard_is_shown(runs):
    at = open_page()
    assert "No validation results" in texts(at.info)
    (runs / "digits" / "validation").mkdir()
    (runs / "digits" / "validation" / "summary.json").write_text(json.dumps({"checks": [
        {"name": "loo", "verdict": "ok", "passed": True}]}))
    before = snapshot(runs)
    at.run()
    assert not at.exception and "1 of 1 validation checks passed" in texts(at.success)
    assert snapshot(runs) == before


TRUNCATE_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from dashboard import session
    from engine.artifacts import RunError

    run_dir = Path(sys.argv[2])
    run = session.load(run_dir)            # the cached loader every page uses
    scores = run.scores["total"]
    np.asarray(scores[0]).sum()            # readable before
    os.truncate(run_dir / "scores" / "total.npy", 200)   # truncated in place under it
    try:
        print("read after truncation:", float(np.asarray(scores[run.n_test - 1]).sum()))
    except RunError as exc:
        print("RunError on read:", exc)
    try:
        session.load(run_dir)              # the next rerun: changed, re-opened, refused
        print("re-opened without error")
    except RunError as exc:
        print("RunError on reopen:", exc)
""")


def test_truncated_score_file_does_not_kill_the_server_process(runs):
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_SCRIPT, str(ROOT), str(runs / "digits")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    if proc.returncode < 0:
        pytest.fail(f"killed by {signal.Signals(-proc.returncode).name}: {proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RunError on read:" in proc.stdout and "truncated" in proc.stdout, proc.stdout
    assert "RunError on reopen:" in proc.stdout, proc.stdout


def test_score_matrix_reads_like_the_array_and_refuses_truncation(tmp_path):
    from dashboard.run_reader import ScoreMatrix  # (new module: imported here, not at the top)

    arr = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    np.save(tmp_path / "m.npy", arr)
    m = ScoreMatrix(tmp_path / "m.npy")
    assert m.shape == arr.shape and len(m) == 7 and m.dtype == arr.dtype
    for key in (0, 6, -1, np.int64(3), slice(None), slice(2, 5), slice(None, None, 3),
                [4, 1, 2, 3], np.array([5, 6, 0]), np.array([], dtype=int), (slice(None), 2),
                (slice(1, 4), -1), ([0, 2], slice(1, 3)), (3, 4), (2, slice(None))):
        np.testing.assert_array_equal(m[key], arr[key], err_msg=repr(key))
    np.testing.assert_array_equal(np.asarray(m), arr)
    with pytest.raises(IndexError):
        m[7]
    with pytest.raises(IndexError):
        m[:, 5]
    os.truncate(tmp_path / "m.npy", 128 + 4 * 5 * 3)  # header + 3 rows
    np.testing.assert_array_equal(m[2], arr[2])
    with pytest.raises(RunError, match="truncated"):
        m[5]
    with pytest.raises(RunError, match="truncated"):
        ScoreMatrix(tmp_path / "m.npy")  # opening checks the size against the header


# --- (8) malformed manifests ----------------------------------------------------------------

def _set(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        target = m
        for p in parents:
            target = target[p]
        target[last] = value
    return change


def _drop(path: str):
    def change(m):
        *parents, last = path.split(".")
        target = m
        for p in parents:
            target = target[p]
        del target[last]
    return change


# (change, a word the message must contain: it names what is wrong)
BROKEN_MANIFESTS = {
    "shapes.n_test missing": (_drop("shapes.n_test"), "n_test"),
    "shapes.n_test is a string": (_set("shapes.n_test", "x"), "n_test"),
    "shapes is a list": (_set("shapes", []), "shapes"),
    "files is a list": (_set("files", []), "files"),
    "files is empty": (_set("files", {}), "files"),
    "files is a string": (_set("files", "x"), "files"),
    "run_id is null": (_set("run_id", None), "run_id"),
    "schema_version is a string": (_set("schema_version", "1"), "schema version"),
    "manifest is a list": (lambda m: [m], "JSON object"),
}


@pytest.mark.parametrize("case", list(BROKEN_MANIFESTS))
def test_broken_manifest_gives_one_clear_message(runs, case):
    change, word = BROKEN_MANIFESTS[case]
    edit_manifest(runs / "digits", change)
    before = snapshot(runs)
    at = open_page()
    assert not at.exception
    error = texts(at.error)
    # The message names what is wrong (the runs directory's path itself does not count).
    assert "Cannot open run `digits`" in error, error
    assert word in visible(error).replace(str(runs), "RUNS"), error
    assert not at.title
    assert snapshot(runs) == before


def test_every_page_stops_with_one_message_on_a_broken_manifest(runs):
    edit_manifest(runs / "digits", _drop("shapes.n_test"))
    for page in ALL_PAGES:
        at = open_page(page)
        assert not at.exception, page
        assert len(at.error) == 1 and "Cannot open run `digits`" in at.error[0].value, page
        assert not at.title and not at.dataframe and not at.data_editor, page


ODD_OPTIONAL_FIELDS = [
    dict(classes={"pretrain": "x", "finetune": 3}, stages=[], metrics=[], alpha="x",
         render={"kind": "image", "column": ["pixels"], "shape": "8x8"}, config=[],
         excluded_ids=5, created_at={"a": 1}, approximation="*rank* `8` <b>x</b>"),
    dict(classes="x", render="x", stages="x", metrics={"test_accuracy": "x",
         "n_misclassified": "x"}, alpha=None, config={"data": 3}, excluded_ids=None,
         approximation=["*a*", "<i>"], config_path=5),
]


@pytest.mark.parametrize("fields", ODD_OPTIONAL_FIELDS, ids=["nested", "flat"])
def test_optional_manifest_fields_of_wrong_types_do_not_break_pages(runs, fields):
    """Either the engine's manifest check refuses the run (one clear message) or the pages
    fall back; never a traceback."""
    edit_manifest(runs / "digits", lambda m: m.update(fields))
    before = snapshot(runs)
    for page in ALL_PAGES:
        at = open_page(page)
        assert not at.exception, page
        refused = "Cannot open run `digits`" in texts(at.error)
        assert refused or at.title, page
        if refused:
            assert len(at.error) == 1 and not at.title, page
    assert snapshot(runs) == before


@pytest.mark.parametrize("fields", ODD_OPTIONAL_FIELDS, ids=["nested", "flat"])
def test_run_details_fall_back_on_optional_fields_of_wrong_types(runs, fields):
    from dashboard.run_details import (
        class_names,
        manifest_mapping,
        render_spec,
        stage_rows,
        task_description,
        unconverged_stages,
    )

    run = load_run(runs / "digits", verify_hashes=False)
    odd = dataclasses.replace(run, manifest={**run.manifest, **fields})
    assert class_names(odd, "pretrain") == [str(i) for i in range(10)]
    assert class_names(odd, "finetune") == ["0", "1"]
    assert render_spec(odd).kind == "image"
    assert stage_rows(odd).empty and unconverged_stages(odd) == []
    assert task_description(odd).startswith("digits:")
    assert manifest_mapping(odd, "metrics") == ({} if fields["metrics"] == [] else
                                                fields["metrics"])


# --- (12) user-provided values in Markdown --------------------------------------------------

NASTY_IDS = ["a`b", "``x``", "`", "*bold* _it_", "[link](http://example.com)",
             "<script>alert(1)</script>", "one\n\n# two", ":red[x] $x^2$", "-1",
             "99999999999999999999"]


def _error_for_id(at, key: str, value: str) -> str:
    """Set an unknown id, rerun, and check it is shown literally in one error; return it."""
    at.session_state[key] = value
    at.run()
    assert not at.exception, value
    (error,) = [e.value for e in at.error]
    assert value.replace("\n", "⏎") in code_spans(error), (value, error)
    assert "\n" not in error and not unescaped(error), (value, error)
    return error


def test_markdown_in_url_ids_is_shown_literally(runs):
    before = snapshot(runs)
    at = open_page(TEST_PAGE)
    for value in NASTY_IDS:
        assert "Pick one below" in _error_for_id(at, "test_id", value)
        # No other test point is shown in its place.
        assert not [h for h in at.subheader if h.value.startswith("Test point")]
    at.switch_page(EXAMPLE_PAGE).run()
    for value in NASTY_IDS:
        assert "pick one below" in _error_for_id(at, "example_id", value)
    at.session_state["example_id"] = "x" * 100_000
    at.run()
    assert not at.exception and len(at.error[0].value) < 2_000
    assert snapshot(runs) == before


def test_flag_note_and_user_name_are_escaped(runs):
    run = load_run(runs / "digits")
    eid = str(run.pretrain_examples["example_id"].iloc[2])
    at = open_page(EXAMPLE_PAGE, {"example_id": eid})
    at.session_state["user_name"] = "eve_[admin](http://x)"
    at.session_state["flag_note"] = "*see* `this`\n# <b>now</b>"
    at.run()
    at.button(key="ex_flag").click().run()
    assert not at.exception
    (flagged,) = [m.value for m in at.markdown if "**Flagged**" in m.value]
    by = flagged.split("by", 1)[1]
    assert not unescaped(by) and "\n" not in flagged, flagged
    assert "eve\\_\\[admin\\](http://x)" in flagged and "\\*see\\*" in flagged


# --- sweep: other inputs --------------------------------------------------------------------

def test_missing_or_non_directory_runs_dir_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(tmp_path / "nowhere"))
    at = open_page()
    assert "does not exist" in texts(at.error) and "python -m engine run" in texts(at.error)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(tmp_path / "afile"))
    at = open_page()
    assert "is not a directory" in texts(at.error)


def test_stale_flag_table_selection_is_ignored(runs):
    run = load_run(runs / "digits")
    store = FlagStore.beside_run(runs / "digits")
    ids = run.pretrain_examples["example_id"].astype(str).tolist()[:2]
    store.flag(run.run_id, ids, "other")
    before = snapshot(runs)
    at = open_page(FLAGS_PAGE)
    # Row positions from a table that had more rows (another session unflagged since).
    (table,) = [d for d in at.dataframe if str(d.key or "").startswith("flags_table_")]
    at.session_state[table.key] = {"selection": {"rows": [0, 5, 99, -1], "columns": []}}
    at.run()
    assert not at.exception
    at.button(key="unflag_selected").click().run()
    assert not at.exception
    assert len(store.flagged_ids(run.run_id)) == 1
    assert snapshot(runs) == before


def test_unknown_test_id_on_flags_page_is_reported(runs):
    at = open_page(FLAGS_PAGE, {"test_id": "nope`*"})
    assert not at.exception
    warning = texts(at.warning)
    assert "nope`*" in code_spans(warning) and "no score columns" in warning


def _odd_id_run(src: Path, dest: Path) -> Path:
    run = load_run(src)
    tp = run.test_points.copy()
    pe = run.pretrain_examples.copy()
    tp["test_id"] = [f"t&{i} #`q`" for i in range(len(tp))]
    pe["example_id"] = [f"p {i}%2B&x=#*{i}*" for i in range(len(pe))]
    return write_run(dest, dict(run.manifest), tp, pe,
                     {n: run.scores[n][:] for n in run.scores}, run.pretrain_xy[:],
                     run.test_xy[:])


def test_odd_ids_in_a_run_keep_links_and_markdown_intact(runs):
    _odd_id_run(runs / "other", runs / "odd")
    run = load_run(runs / "odd")
    eid = str(run.pretrain_examples["example_id"].iloc[4])
    before = snapshot(runs)
    at = open_page(EXAMPLE_PAGE, {"run": "odd"})
    at.session_state["example_id"] = eid
    at.run()
    assert not at.exception and not at.error
    assert eid in code_spans(at.subheader[0].value)
    links = [v for d in at.dataframe if "link" in d.value.columns for v in d.value["link"]]
    assert links
    shown = {parse_qs(urlsplit(link).query)["test_id"][0] for link in links}
    assert shown <= set(run.test_points["test_id"].astype(str))
    tid = sorted(shown)[0]
    at.switch_page(TEST_PAGE)
    at.session_state["test_id"] = tid
    at.run()
    assert not at.exception and tid in code_spans(at.subheader[0].value)
    assert snapshot(runs) == before


def test_run_with_unusable_table_values_shows_a_message_not_a_traceback(runs):
    run = load_run(runs / "other")
    pe = run.pretrain_examples.assign(label=[f"class {v}" for v in run.pretrain_examples["label"]])
    write_run(runs / "strings", dict(run.manifest), run.test_points, pe,
              {n: run.scores[n][:] for n in run.scores}, run.pretrain_xy[:], run.test_xy[:])
    before = snapshot(runs)
    for page in ALL_PAGES:
        at = open_page(page, {"run": "strings"})
        assert not at.exception, page
        if page != FLAGS_PAGE:  # (the flags page does not use labels until something is flagged)
            assert "cannot be shown for run `strings`" in texts(at.error), page
    assert snapshot(runs) == before


# --- (13) local by default ------------------------------------------------------------------

def test_streamlit_config_is_local_by_default_and_docker_overrides_it():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["server"]["headless"] is True
    assert config["browser"]["gatherUsageStats"] is False
    cmd = (ROOT / "Dockerfile").read_text().split("CMD", 1)[1]
    assert '"--server.address", "0.0.0.0"' in cmd


def _listeners(port: int) -> list[tuple[str, str]]:
    """(family, hex local address) of the listening sockets on ``port`` (/proc/net/tcp*)."""
    out = []
    for family in ("tcp", "tcp6"):
        table = Path(f"/proc/net/{family}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":
                out.append((family, address))
    return out


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_bare_streamlit_run_listens_on_loopback_only(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "home").mkdir()
    (tmp_path / "runs").mkdir()
    env = dict(os.environ, HOME=str(tmp_path / "home"), INFLUENCE_RUNS_DIR=str(tmp_path / "runs"))
    env.pop("STREAMLIT_SERVER_ADDRESS", None)
    log = tmp_path / "streamlit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "dashboard/app.py",
             "--server.port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                            timeout=2) as resp:
                    if resp.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("streamlit did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.3)
        listeners = _listeners(port)
        assert listeners == [("tcp", "0100007F")], listeners  # 127.0.0.1, no IPv6 / any
        other = _non_loopback_address()
        if other:
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(3)
                s.connect((other, port))
    finally:
        stop_group(proc)
