"""report.html in a real headless browser (Debian's chromium through Playwright): no network request, every figure
decoded and drawn at its size, wide tables scrolling inside their own box rather than widening the page."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ibbench import report
from ibbench.report import FIGURE_SIZES

FIXTURE = Path(__file__).parent / "fixtures" / "report_sweep"
# Flags a root, display-less, offline machine needs; without the background-networking ones Chromium keeps
# trying to reach Google's services.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


def _chromium() -> str:
    """Debian's chromium, installed here (as .ci/run does) when missing and this machine allows it."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, env=env, timeout=900,
                       stdin=subprocess.DEVNULL)  # fmt: skip
        found = shutil.which("chromium")
        if found:
            return found
    reason = "no chromium (Debian package `chromium`), and it could not be installed here"
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    report.write_report(FIXTURE, out)
    return out / "report.html"


@pytest.mark.slow
def test_report_html_renders_offline_with_every_figure_drawn(browser, report_html):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    # Anything that is not the file itself or inline data would be a network request: record it and refuse it.
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
               else route.abort())  # fmt: skip
    page.goto(report_html.as_uri(), wait_until="load")
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []

    images = page.eval_on_selector_all(
        "figure img",
        """els => els.map(e => ({figure: e.closest('figure').id, complete: e.complete, width: e.naturalWidth,
                                 height: e.naturalHeight, shown: e.getBoundingClientRect().width}))""",
    )
    assert sorted(i["figure"] for i in images) == sorted(FIGURE_SIZES)
    from matplotlib.image import imread

    for image in images:
        width, height = (round(v * report.DPI) for v in FIGURE_SIZES[image["figure"]])
        assert image["complete"] and (image["width"], image["height"]) == (width, height), image
        assert image["shown"] > 0.5 * min(width, 1200), image  # laid out at a readable width
        # What the browser drew, not only the bytes it was given: not a blank or single-colour box.
        drawn = imread(io.BytesIO(page.locator(f"figure#{image['figure']} img").screenshot()))
        assert drawn[..., :3].std() > 0.05 and len(np.unique(drawn[..., :3].reshape(-1, 3), axis=0)) > 16
    page.close()


def test_wide_tables_scroll_in_their_own_box(browser, report_html):
    page = browser.new_page(viewport={"width": 600, "height": 900})
    page.goto(report_html.as_uri(), wait_until="load")
    page_width = page.evaluate("document.documentElement.scrollWidth")
    assert page_width <= 600, f"the page widened to {page_width}px"
    boxes = page.eval_on_selector_all(
        ".table-wrap",
        "els => els.map(e => ({scroll: e.scrollWidth, client: e.clientWidth, table: e.firstElementChild.className,"
        " overflow: getComputedStyle(e).overflowX}))",
    )
    assert len(boxes) >= 3
    wide = [b for b in boxes if b["scroll"] > b["client"]]
    assert wide, boxes  # at 600 px the robustness table does not fit ...
    assert all(b["overflow"] in ("auto", "scroll") and b["client"] <= 600 for b in wide)  # ... and scrolls in place
    page.close()
