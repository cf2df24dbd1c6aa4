"""Real-browser tests: a Streamlit server and Debian's Chromium driven by Playwright.

Each test opens a new browser context (a new Streamlit session).  Screenshots of every page go
to ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile

import pandas as pd
import pytest

from dashboard.convention import SCORE_CONVENTION
from dashboard.flags import FlagStore
from engine.artifacts import load_run
from tests.e2e.conftest import screenshot, wait_ready

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def run(e2e_runs_dir):
    return load_run(e2e_runs_dir / "digits", verify_hashes=False)


@pytest.fixture(scope="module")
def misclassified_id(run) -> str:
    mis = run.test_points[~run.test_points["correct"].astype(bool)]
    return str(mis.sort_values("loss")["test_id"].iloc[0])


def goto(page, server: str, path: str) -> None:
    page.goto(server + path)
    wait_ready(page, settle_ms=800)
    assert page.locator("[data-testid='stException']").count() == 0


def shown_count(page) -> int:
    text = page.get_by_text(re.compile(r"^[\d,]+ examples shown")).inner_text()
    return int(text.split()[0].replace(",", ""))


def nav(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
    page.wait_for_timeout(500)
    wait_ready(page, settle_ms=800)


def test_overview_loads(page, server):
    goto(page, server, "/")
    assert "Run" in page.locator("h1").first.inner_text()
    assert SCORE_CONVENTION in page.locator(".influence-legend").inner_text()
    page.get_by_text("False transfer").wait_for()
    screenshot(page, "overview")


def test_deep_link_survives_reload_and_page_switch(page, server, misclassified_id):
    goto(page, server, f"/test-point?test_id={misclassified_id}")
    header = page.get_by_text(f"Test point {misclassified_id}")
    assert "misclassified" in header.first.inner_text()
    page.reload()
    wait_ready(page, settle_ms=800)
    assert page.get_by_text(f"Test point {misclassified_id}").count() >= 1
    nav(page, "Overview")
    assert f"test_id={misclassified_id}" in page.url
    nav(page, "Test point")
    assert page.get_by_text(f"Test point {misclassified_id}").count() >= 1
    assert f"test_id={misclassified_id}" in page.url
    screenshot(page, "test_point")


def test_unknown_test_id_shows_a_message(page, server):
    goto(page, server, "/test-point?test_id=definitely-not-a-test-point")
    page.get_by_text("is not in run").wait_for()
    assert page.locator("[data-testid='stException']").count() == 0


def test_box_select_on_the_map_filters_the_table(page, server, misclassified_id, run):
    goto(page, server, f"/test-point?test_id={misclassified_id}")
    top_k = page.locator(".st-key-f_top_k input")
    top_k.fill("0")
    top_k.press("Enter")
    page.wait_for_timeout(500)
    wait_ready(page, settle_ms=800)
    assert shown_count(page) == run.n_pretrain
    plot = page.locator("[class*='st-key-map_'] .nsewdrag").first
    plot.scroll_into_view_if_needed()
    box = plot.bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.05, box["y"] + box["height"] * 0.05
    x1, y1 = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.6
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 13):
        page.mouse.move(x0 + (x1 - x0) * i / 12, y0 + (y1 - y0) * i / 12)
    page.mouse.up()
    caption = page.get_by_text(re.compile(r"\d+ examples selected on the map"))
    caption.wait_for(timeout=30_000)
    wait_ready(page, settle_ms=800)
    selected = int(caption.inner_text().split()[0])
    assert 0 < selected < run.n_pretrain
    assert shown_count(page) == selected
    screenshot(page, "map_selection")


def test_flag_from_the_table_survives_a_reload(page, server, e2e_runs_dir, run,
                                               misclassified_id):
    store = FlagStore.beside_run(e2e_runs_dir / "digits")
    before = store.flagged_ids(run.run_id)
    goto(page, server, f"/test-point?test_id={misclassified_id}")
    grid = page.locator("[class*='st-key-tbl_helpful_'] [data-testid='stDataFrame']").first
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    # Select the flag cell of the first data row (header ~35 px, rows 40 px), toggle it.
    page.mouse.click(box["x"] + 8, box["y"] + 35 + 20)
    page.wait_for_timeout(300)
    page.keyboard.press(" ")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and store.flagged_ids(run.run_id) == before:
        time.sleep(0.2)
    new = store.flagged_ids(run.run_id) - before
    assert len(new) == 1, "ticking the checkbox did not store a flag"
    (example_id,) = new
    flag = store.flags(run.run_id).set_index("example_id").loc[example_id]
    assert flag["test_id"] == misclassified_id and flag["reason"] == "label noise"
    page.reload()
    wait_ready(page, settle_ms=800)
    nav(page, "Flags")
    n = len(before) + 1
    page.get_by_text(re.compile(rf"^{n} flagged example{'s' if n != 1 else ''} ·")).wait_for()
    screenshot(page, "flags")
    goto(page, server, f"/example?example_id={example_id}")
    page.get_by_text("Flagged as").wait_for()
    screenshot(page, "example")


def test_download_export_zip(page, server, misclassified_id):
    goto(page, server, f"/test-point?test_id={misclassified_id}")
    n = shown_count(page)
    button = page.locator(".st-key-export_view_zip button")
    button.scroll_into_view_if_needed()
    with page.expect_download(timeout=30_000) as info:
        button.click()
    data = open(info.value.path(), "rb").read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
        ids = zf.read("view_ids.txt").decode().split()
        (data_name,) = [x for x in names if x.endswith(".csv")]
        rows = pd.read_csv(zf.open(data_name), dtype={"example_id": str})
    assert manifest["counts"]["rows"] == len(rows) == len(ids) == n
    assert manifest["test_id"] == misclassified_id
    assert manifest["score_convention"] == SCORE_CONVENTION
    assert list(rows["example_id"]) == ids


def test_filters_live_in_the_url(page, server, misclassified_id, browser):
    """Filter widgets are bound to the URL: changing one rewrites the URL in place, a reload and
    a shared link (a new session) restore the view, and the sidebar link back to the page
    restores it from the session.  The evidence (harmful first on a misclassified point) and
    the thumbnail strips are on the page."""
    goto(page, server, f"/test-point?test_id={misclassified_id}")
    headings = page.locator("h4").all_inner_texts()
    assert [h.split(" (")[0] for h in headings[:2]] == ["Most harmful", "Most helpful"]
    thumbs = page.locator("[data-testid='stImage'] a[href*='example?run=digits&example_id=']")
    thumbs.nth(15).wait_for()
    assert thumbs.count() == 16
    page.locator(".st-key-f_sign label").filter(has_text="harmful").first.click()
    wait_ready(page, settle_ms=800)
    top_k = page.locator(".st-key-f_top_k input")
    top_k.fill("5")
    top_k.press("Enter")
    page.wait_for_timeout(500)
    wait_ready(page, settle_ms=800)
    assert "f_sign=harmful" in page.url and "f_top_k=5" in page.url
    assert shown_count(page) == 5
    url = page.url
    page.reload()
    wait_ready(page, settle_ms=800)
    assert page.url == url and shown_count(page) == 5
    assert page.locator(".st-key-f_top_k input").input_value() == "5"
    screenshot(page, "test_point_filtered")
    # A shared link opens the same view in a fresh session.
    other = browser.new_context(viewport={"width": 1500, "height": 1400}).new_page()
    try:
        goto(other, server, url.removeprefix(server))
        assert shown_count(other) == 5
    finally:
        other.context.close()
    # Away and back through the sidebar: the session keeps the filters (and the URL again).
    nav(page, "Overview")
    assert "f_top_k" not in page.url
    nav(page, "Test point")
    assert shown_count(page) == 5 and "f_top_k=5" in page.url
