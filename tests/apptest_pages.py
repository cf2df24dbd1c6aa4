"""Shared helpers for AppTest page tests (a module, not a conftest: imported explicitly)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
OVERVIEW = "views/overview.py"


def new_app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=60)


def open_page(page: str | None = None, query: dict[str, str] | None = None) -> AppTest:
    """A fresh session, optionally deep-linked with query parameters, on ``page`` (the
    overview, the default page, needs no switch)."""
    at = new_app()
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, at.exception
    if page and page != OVERVIEW:
        at.switch_page(page).run()
        assert not at.exception, at.exception
    return at


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
