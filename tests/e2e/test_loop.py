"""The whole loop in a real browser, on (a copy of) the sample run: flag the most harmful
examples of a misclassified point, read the what-if, start the retrain from the UI, watch its
progress (reloading the page in the middle of the job), open the comparison and read the
predicted vs actual change for that point.  Screenshots of every step go to
``test-artifacts/screenshots/loop-*.png``.

It retrains the sample for real (about 1.5-2 min on an idle 2-core machine), so it is slow.
"""

from __future__ import annotations

import re
import time
from urllib.parse import quote

import numpy as np
import pytest

from dashboard.flags import FlagStore
from dashboard.jobs import JobStore
from dashboard.what_if import removal_prediction
from engine.artifacts import load_run
from tests.e2e.conftest import screenshot, wait_ready

pytestmark = [pytest.mark.browser, pytest.mark.slow]

K = 10
RETRAIN_TIMEOUT_S = 900


def _goto(page, url: str) -> None:
    page.goto(url)
    wait_ready(page, settle_ms=800)
    assert page.locator("[data-testid='stException']").count() == 0


def _point(run) -> str:
    """The misclassified point whose own top-K harmful examples predict the largest drop."""
    tp = run.test_points
    best, best_change = None, np.inf
    for row in np.flatnonzero(~tp["correct"].astype(bool).to_numpy()):
        scores = np.asarray(run.scores["total"][row], dtype=np.float64)
        change = np.sort(scores)[:K].sum()
        if change < best_change:
            best, best_change = str(tp["test_id"].iloc[row]), change
    assert best is not None, "the sample run has no misclassified point"
    return best


def test_flag_what_if_retrain_compare(page, server, e2e_runs_dir):
    parent_dir = e2e_runs_dir / "digits"
    run = load_run(parent_dir, verify_hashes=False)
    store = FlagStore.beside_run(parent_dir)
    store.unflag(run.run_id, sorted(store.flagged_ids(run.run_id)))   # start from no flags
    test_id = _point(run)
    base = f"{server}/test-point?run=digits&test_id={quote(test_id)}"

    # 1. The misclassified point, its K most harmful examples only (filters from the URL).
    _goto(page, f"{base}&f_sign=harmful&f_top_k={K}")
    page.get_by_text(re.compile(rf"^{K} examples shown")).wait_for()
    screenshot(page, "loop-1-test-point")

    # 2. Flag all shown (with the confirmation step).
    page.locator(".st-key-flag_all button").click()
    page.locator(".st-key-flag_all_confirm button").click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(store.flagged_ids(run.run_id)) < K:
        time.sleep(0.2)
    flagged = sorted(store.flagged_ids(run.run_id))
    assert len(flagged) == K
    expected = np.sort(np.asarray(run.scores["total"][int(np.flatnonzero(
        run.test_points["test_id"].astype(str) == test_id)[0])], dtype=np.float64))[:K].sum()
    row = int(np.flatnonzero(run.test_points["test_id"].astype(str) == test_id)[0])
    predicted = float(removal_prediction(run, flagged)[row])
    assert predicted == pytest.approx(expected, rel=1e-6)

    # 3. The what-if beside the point: the sum of the flagged scores.
    wait_ready(page, settle_ms=800)
    what_if = page.get_by_text(f"If the {K} flagged examples are removed")
    what_if.first.wait_for()
    assert f"{predicted:+.3f}" in page.locator("[data-testid='stMain']").inner_text()
    screenshot(page, "loop-2-what-if")

    # 4. The Flags page: the what-if over every test point, then start the retrain.
    _goto(page, f"{server}/flags?run=digits&test_id={quote(test_id)}")
    page.get_by_text("What if the flagged examples are removed?").wait_for()
    screenshot(page, "loop-3-flags")
    page.locator(".st-key-retrain_start button").click()
    page.locator("[data-testid='stProgress']").first.wait_for(timeout=60_000)
    screenshot(page, "loop-4-progress")

    # 5. Reload in the middle of the job: it is still there, still progressing.
    jobs = JobStore(e2e_runs_dir).jobs("digits")
    assert jobs and jobs[0].active, "the retrain job did not start"
    child = jobs[0].child_run
    page.reload()
    wait_ready(page, settle_ms=800)
    page.locator("[data-testid='stProgress']").first.wait_for(timeout=60_000)
    assert page.get_by_text(f"run {child}").count() >= 1
    screenshot(page, "loop-5-after-reload")

    # 6. Wait for the job to finish; the page reports it without a reload.
    page.get_by_text("succeeded").first.wait_for(timeout=RETRAIN_TIMEOUT_S * 1000)
    wait_ready(page, settle_ms=800)
    screenshot(page, "loop-6-done")
    child_run = load_run(e2e_runs_dir / child, verify_hashes=False)
    assert child_run.manifest["parent"]["run_id"] == run.run_id
    assert sorted(child_run.manifest["excluded_ids"]) == flagged

    # 7. The comparison, for that point: predicted (parent's scores) vs actual (retrained).
    link = page.get_by_role("link", name=re.compile("^Compare with")).first
    href = link.get_attribute("href")
    assert href and "compare" in href
    _goto(page, f"{server}/compare?run=digits&compare={quote(child)}&test_id={quote(test_id)}")
    line = page.locator("[data-testid='stAlert']").filter(
        has_text=re.compile(rf"This point {re.escape(test_id)}")).first
    line.wait_for()
    before = float(run.test_points["loss"].iloc[row])
    crow = int(np.flatnonzero(child_run.test_points["test_id"].astype(str) == test_id)[0])
    after = float(child_run.test_points["loss"].iloc[crow])
    numbers = re.search(r"loss before ([-+\d.e]+), after ([-+\d.e]+), predicted change "
                        r"([-+\d.e]+), actual change ([-+\d.e]+)", line.inner_text())
    assert numbers, line.inner_text()
    shown = [float(v) for v in numbers.groups()]
    assert shown == pytest.approx([before, after, predicted, after - before], abs=1e-4)
    screenshot(page, "loop-7-compare")
    print(f"\n[e2e loop] {test_id}: loss {before:.3f} -> {after:.3f}, predicted change "
          f"{predicted:+.3f}, actual {after - before:+.3f}")
