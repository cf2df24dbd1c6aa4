"""Fixtures of the real-browser tests: a runs directory, a Streamlit server, a Chromium page.

The runs directory is a private copy of the sample run, so the tests' flags never touch the
user's ``runs/flags.sqlite``.  The run copied is, in this order: ``$DASHBOARD_E2E_RUN`` (any run
directory), the ``sample_run`` fixture of ``tests/conftest.py`` (the real ``runs/digits``, built
if missing), an existing ``runs/digits``; without any of them a synthetic run from
``benchmarks/make_synthetic_run.py`` stands in, and the tests say so on stderr.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.make_synthetic_run import make_synthetic_run
from tests.apptest_pages import stop_group

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
READY = "[data-testid='stApp'][data-test-script-state='notRunning']"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def e2e_runs_dir(request, tmp_path_factory) -> Path:
    """A runs directory holding ``digits``: the real sample run when available."""
    root = tmp_path_factory.mktemp("e2e_runs")
    sample = Path(os.environ["DASHBOARD_E2E_RUN"]) if os.environ.get("DASHBOARD_E2E_RUN") else None
    if sample is None:
        try:
            sample = Path(request.getfixturevalue("sample_run"))
        except pytest.FixtureLookupError:
            existing = REPO / "runs" / "digits"
            sample = existing if (existing / "manifest.json").is_file() else None
    if sample is not None:
        shutil.copytree(sample, root / "digits")
        print(f"\n[e2e] using a copy of {sample}", file=sys.stderr)
    else:
        print("\n[e2e] no sample run: using a synthetic run instead", file=sys.stderr)
        make_synthetic_run(root / "digits", n_pretrain=1100, n_test=200, seed=0)
    return root


@pytest.fixture(scope="session")
def server(e2e_runs_dir) -> Iterator[str]:
    """``streamlit run dashboard/app.py`` on a free port; yields its base URL."""
    port = _free_port()
    log = open(e2e_runs_dir.parent / "streamlit.log", "w")  # noqa: SIM115 - closed below
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/app.py",
         "--server.headless", "true", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--", "--runs-dir", str(e2e_runs_dir)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as resp:
                    if resp.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError("streamlit did not start:\n"
                                   + (e2e_runs_dir.parent / "streamlit.log").read_text())
            time.sleep(0.3)
        yield base
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium "
                    "(apt-get install -y chromium) to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1500, "height": 1400},
                                  accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    context.close()


def wait_ready(pg, settle_ms: int = 300) -> None:
    """Wait until the script run has finished (and the frontend had a moment to paint)."""
    pg.wait_for_selector(READY, timeout=60_000)
    pg.wait_for_timeout(settle_ms)
    pg.wait_for_selector(READY, timeout=60_000)


def screenshot(pg, name: str) -> Path:
    """Save the whole page: the main area scrolls inside its own container, so the viewport is
    stretched to the content height for the capture and restored afterwards."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    size = pg.viewport_size
    height = pg.evaluate(
        "() => (document.querySelector('[data-testid=\"stMain\"]') || document.body)"
        ".scrollHeight")
    pg.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]),
                                                                  6000)})
    pg.wait_for_timeout(1500)  # let charts and canvases repaint at the new size
    pg.screenshot(path=str(path))
    pg.set_viewport_size(size)
    return path
