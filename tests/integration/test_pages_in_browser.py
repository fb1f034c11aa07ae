"""The pages people look at, opened in a real browser (headless Chromium driven by playwright): evaluate's
report.html and the score run's review.html load without console errors or failed requests, show no
broken image, sort their tables by score on a click, and link only to files that exist."""
import os
import shutil
from urllib.parse import unquote, urlparse

import pytest

from helpers import SMALL

CHROMIUM = os.environ.get("PATCHCORE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    """Chromium of the system (Debian's package, no browser download); the tests skip, saying what is
    missing, only where playwright or chromium is not installed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need the Python package playwright (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install -y chromium, "
                    "or set PATCHCORE_TEST_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, path: str):
    """The page at file://path, loaded, with the console errors and failed requests it had on the way."""
    page = browser.new_page()
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    page.goto("file://" + os.path.abspath(path), wait_until="load")
    return page, problems


SCORES = """(table) => {
  const t = document.querySelectorAll('table.sortable')[table];
  const col = Array.from(t.tHead.rows[0].cells).findIndex(th => th.textContent.trim() === 'score');
  return Array.from(t.tBodies[0].rows).map(r => {
    const c = r.cells[col]; return parseFloat(c.dataset.v !== undefined ? c.dataset.v : c.textContent);});}"""


def _check_page(browser, path: str, min_images: int, min_links: int) -> None:
    page, problems = _open(browser, path)
    try:
        images = page.evaluate("Array.from(document.images).map(i => [i.src.slice(0, 60), i.complete, i.naturalWidth])")
        assert len(images) >= min_images
        broken = [src for src, complete, width in images if not complete or width == 0]
        assert not broken, f"broken images in {path}: {broken}"
        _check_sorting(page)
        assert _check_links(page, path) >= min_links
        assert not problems, problems
    finally:
        page.close()


def _check_sorting(page) -> None:
    """Each sortable table's "score" header: a click sorts the rows ascending, a second descending."""
    n = page.evaluate("document.querySelectorAll('table.sortable').length")
    assert n >= 1
    for t in range(n):
        before = page.evaluate(SCORES, t)
        assert len(before) >= 3 and before != sorted(before), before  # the check would prove nothing else
        header = page.locator("table.sortable").nth(t).locator("thead th", has_text="score").first
        header.click()
        assert page.evaluate(SCORES, t) == sorted(before)
        header.click()
        assert page.evaluate(SCORES, t) == sorted(before, reverse=True)


def _check_links(page, path: str) -> int:
    """Every relative <a href> resolves (against the page's folder) to an existing file, and so does every
    absolute local path (a file outside the page's folder); returns how many relative links there are."""
    hrefs = page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => [a.getAttribute('href'), a.href])")
    missing, relative = [], 0
    for raw, resolved in hrefs:
        if urlparse(raw).scheme or raw.startswith("#"):
            continue
        relative += not raw.startswith("/")
        target = unquote(urlparse(resolved).path)
        if not os.path.isfile(target):
            missing.append((raw, target))
    assert not missing, f"links of {path} to missing files: {missing}"
    return relative


def test_report_in_a_browser(browser, small_model, category, tmp_path):
    from patchcore_dist.pipeline.evaluate import run_evaluate
    out = str(tmp_path / "eval")
    run_evaluate(small_model, category, out, overrides=SMALL + ["runtime.executor=local"])
    _check_page(browser, os.path.join(out, "report.html"), min_images=10, min_links=10)


def test_review_page_in_a_browser(browser, small_model, category, tmp_path):
    from patchcore_dist.pipeline.score import run_score
    out = str(tmp_path / "out")
    run_score(small_model, os.path.join(category, "test"), out, overrides=SMALL + ["runtime.executor=local"])
    _check_page(browser, os.path.join(out, "review.html"), min_images=3, min_links=10)


def _page(tmp_path, img: str = "", link: str = "a.png", script: str | None = None, extra: str = "") -> str:
    """A small page like ours: a sortable score table, an inline image and a link."""
    from patchcore_dist.render.page import SORT_SCRIPT, STYLE, b64_png
    from PIL import Image
    (tmp_path / "a.png").write_bytes(b"png")
    src = img or b64_png(Image.new("RGB", (4, 4)))
    rows = "".join(f'<tr><td>{n}</td><td class="num" data-v="{v}">{v}</td><td><a href="{link}">x</a></td></tr>'
                   for n, v in (("b", 0.5), ("a", 2.0), ("c", 1.0)))
    path = tmp_path / "page.html"
    path.write_text(f"<html><head><style>{STYLE}</style></head><body><img src=\"{src}\">"
                    f'<table class="sortable"><thead><tr><th>image</th><th>score</th><th>files</th></tr></thead>'
                    f"<tbody>{rows}</tbody></table>{extra}<script>{SORT_SCRIPT if script is None else script}</script>"
                    "</body></html>")
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("broken image", "broken images"), ("missing link", "missing files"), ("console error", "console: boom"),
    ("no sorting", r"assert \[0.5, 2, 1\] == \[0.5, 1, 2\]"), ("script error", "page error"),
])
def test_the_checks_catch_a_broken_page(browser, tmp_path, kind, expected):
    """The checks themselves: the page passes as made, and each fault is caught."""
    _check_page(browser, _page(tmp_path), min_images=1, min_links=3)
    fault = {"broken image": {"img": "missing.png"}, "missing link": {"link": "gone/x.png"},
             "console error": {"extra": "<script>console.error('boom')</script>"}, "no sorting": {"script": ""},
             "script error": {"extra": "<script>undefinedFunction()</script>"}}[kind]
    with pytest.raises(AssertionError, match=expected):
        _check_page(browser, _page(tmp_path, **fault), min_images=1, min_links=3)
