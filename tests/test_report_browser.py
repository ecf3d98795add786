"""The HTML report in a real headless Chromium: loads cleanly, fetches nothing, draws every figure.

Uses Debian's `chromium` package through Playwright for Python with that executable (Playwright's
own browser downloads are not used). Skips when /usr/bin/chromium is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.report.pdf import html_to_pdf
from tools.report.render import write_report

CHROMIUM = Path("/usr/bin/chromium")
FIXTURE = Path(__file__).parent / "fixtures" / "report_data.json"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Chromium not installed at /usr/bin/chromium (apt-get install chromium)",
)


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    written = write_report(json.loads(FIXTURE.read_text()), out)
    return written["html"]


@pytest.fixture(scope="module")
def loaded_page(report_path, tmp_path_factory):
    """Open the report once in a fresh profile; record console errors and every request."""
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")
    screenshot = tmp_path_factory.mktemp("screens") / "report.png"
    console_errors: list[str] = []
    page_errors: list[str] = []
    requests: list[str] = []

    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.on("console", lambda message: console_errors.append(message.text)
                    if message.type == "error" else None)
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(report_path.as_uri(), wait_until="load")
            page.screenshot(path=str(screenshot), full_page=True)

            figures = []
            for element in page.query_selector_all("svg, img"):
                box = element.bounding_box()
                label = element.evaluate("e => e.closest('figure')?.id || e.tagName")
                figures.append((label, box))
            title = page.title()
        finally:
            context.close()

    yield {"console_errors": console_errors, "page_errors": page_errors, "requests": requests,
           "figures": figures, "screenshot": screenshot, "title": title}


def test_browser_page_loads_with_title(loaded_page):
    assert loaded_page["title"].startswith("Audit a3f9c2e1")


def test_browser_console_has_no_errors(loaded_page):
    assert loaded_page["console_errors"] == []
    assert loaded_page["page_errors"] == []


def test_browser_requests_only_the_file(loaded_page, report_path):
    # Inline data: URLs are decoded in the browser, never fetched over a network.
    fetched = [url for url in loaded_page["requests"] if not url.startswith("data:")]
    assert fetched == [report_path.as_uri()]


def test_browser_renders_every_figure(loaded_page):
    figures = loaded_page["figures"]
    assert len(figures) == 9
    for label, box in figures:
        assert box is not None, label
        assert box["width"] > 50, label
        assert box["height"] > 50, label


def test_browser_screenshot_is_written(loaded_page):
    screenshot = loaded_page["screenshot"]
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert screenshot.stat().st_size > 50_000


def test_html_to_pdf_prints_report(report_path, tmp_path):
    pdf = html_to_pdf(report_path, tmp_path / "report.pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    assert pdf.stat().st_size > 50_000
