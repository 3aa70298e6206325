"""The course website (`make site`), built in the `ci` budget and opened in headless Chromium.

The module fixture builds the site once into a temporary folder (site/build.py, REGLAB_BUDGET=ci) and
serves it on 127.0.0.1. Then:
- every internal link (`href` to a page, a file or an anchor) of every page resolves, read from the HTML;
- every page loads in Chromium with no script error and no request to another host (the site is offline);
- MathJax has typeset every formula: no `$$`, `\\(`, `\\[` or `$...$` is left in the rendered text;
- every figure a notebook made (its image outputs, in the executed notebook) is an `<img>` on its page
  that the browser has decoded.
`REGLAB_SITE_BUILD=build/site` checks that build instead of making one (`make site` first).
Needs Debian's Chromium (/usr/bin/chromium) and the `site` packages: skipped without them, except when
CI=true, where their absence fails.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

from browser import CHROMIUM, CHROMIUM_FLAGS, VIEWPORT

ROOT = Path(__file__).resolve().parent.parent
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")
# MathJax's hidden MathML copy of each formula (for screen readers) names TeX fonts that the
# jupyter-server-mathjax wheel does not ship; the visible formulas use its STIX-Web fonts.
HIDDEN_MATHML_FONTS = re.compile(r"/_static/mathjax/fonts/HTML-CSS/TeX/otf/MathJax_\w+-\w+\.otf$")
RAW_MATH = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{|(?<![\w$])\$[^$\s][^$\n]*?\$(?![\w$])")


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must build and check the site: {why}")
    pytest.skip(f"site test skipped: {why}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The build folder (html/, src/, cache/<budget>/, budget): the site built once, in the ci budget."""
    for module in ("myst_nb", "sphinx_book_theme", "jupyter_server_mathjax"):
        try:
            __import__(module)
        except ImportError:
            require(False, f"{module} is not installed (pip install -e '.[test,site]')")
    if os.environ.get("REGLAB_SITE_BUILD"):          # check a site built already (e.g. `make site`'s)
        return Path(os.environ["REGLAB_SITE_BUILD"]).resolve()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "REGLAB_BUDGET": "ci", "OMP_NUM_THREADS": "1"}
    build = subprocess.run([sys.executable, str(ROOT / "site" / "build.py"), "--out", str(out)], env=env,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"the site build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    return out


class Links(HTMLParser):
    """The hrefs/srcs and the ids (anchors) of one page."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.loads: set[str] = set()    # what the browser fetches (src, <link href>), not what a reader may follow
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key) and (key == "id" or tag == "a"):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) and not (tag == "link" and key == "href" and attrs.get("rel") == "canonical"):
                self.refs.append(attrs[key])
                if key == "src" or tag == "link":
                    self.loads.add(attrs[key])


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


def pages(html: Path) -> list[Path]:
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def test_the_site_has_the_home_page_every_lecture_lab_and_the_ledger_and_no_solution(site):
    html = site / "html"
    built = {p.relative_to(html).with_suffix("").as_posix() for p in pages(html)}
    expected = {"index", *(f"{d}/{p.stem}" for d in ("notebooks", "labs") for p in (ROOT / d).glob("*.ipynb"))}
    assert expected <= built, f"pages missing: {sorted(expected - built)}"
    assert "notebooks/07_claims_ledger" in built
    assert not any(part == "solutions" for p in html.rglob("*") for part in p.relative_to(html).parts)
    home = (html / "index.html").read_text(encoding="utf-8")
    for page in sorted(expected - {"index"}):
        assert f'href="{page}.html' in home, f"the home page does not link to {page}"
    for page in sorted(expected - {"index"}):             # and each page links to its notebook, to run it
        assert f'href="{Path(page).name}.ipynb"' in (html / f"{page}.html").read_text(encoding="utf-8")


def broken_links(html: Path) -> list[str]:
    """Every local href/src of every page that names no file or an anchor its page lacks, and every file
    a page would load from another host (a link for the reader to follow elsewhere is fine)."""
    broken, anchors = [], {}
    for page in pages(html):
        links = parse(page)
        for ref in links.refs:
            parts = urlsplit(ref)
            if parts.scheme or parts.netloc or ref.startswith(("mailto:", "javascript:", "data:")):
                if (parts.scheme.startswith("http") or parts.netloc) and ref in links.loads:
                    broken.append(f"{page.relative_to(html)} -> {ref} (another host)")
                continue
            target_ref, fragment = urldefrag(ref)
            target = (page.parent / unquote(target_ref.split("?")[0])).resolve() if target_ref else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(html)} -> {ref}")
            elif fragment and target.suffix == ".html":
                ids = anchors.setdefault(target, parse(target).ids)
                if unquote(fragment) not in ids:
                    broken.append(f"{page.relative_to(html)} -> {ref} (no such anchor)")
    return broken


def test_no_internal_link_is_broken(site):
    broken = broken_links(site / "html")
    assert not broken, "broken internal links:\n" + "\n".join(broken)


def executed_notebooks(out: Path) -> dict[str, dict]:
    """{page: the executed notebook}, read from the build's jupyter-cache (outputs merged into the source)."""
    from jupyter_cache import get_cache
    cache = get_cache(out / "cache" / (out / "budget").read_text().strip())
    found = {}
    for source in (out / "src").rglob("*.ipynb"):
        _, nb = cache.merge_match_into_file(str(source))
        found[source.relative_to(out / "src").with_suffix(".html").as_posix()] = nb
    return found


def expected_images(nb: dict) -> int:
    """The image outputs of an executed notebook that the page shows (cells not tagged to hide them)."""
    count = 0
    for cell in nb["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or tags & {"remove-output", "remove-cell"}:
            continue
        count += sum(any(m in out.get("data", {}) for m in IMAGE_MIMES) for out in cell.get("outputs", []))
    return count


async def check_pages(base: str, html: Path, executed: dict[str, dict]) -> dict[str, list[str]]:
    from playwright.async_api import async_playwright
    problems: dict[str, list[str]] = {}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = await browser.new_page(viewport=VIEWPORT)
        current: list[str] = []
        page.on("pageerror", lambda exc: current.append(f"script error: {exc}"))
        page.on("response", lambda r: r.status >= 400 and not HIDDEN_MATHML_FONTS.search(r.url)
                and current.append(f"{r.status}: {r.url}"))

        async def route(r):
            if r.request.url.startswith((base, "data:", "blob:")):
                await r.continue_()
            else:
                current.append(f"requested another host: {r.request.url}")
                await r.abort()
        await page.route("**/*", route)
        for path in pages(html):
            rel = path.relative_to(html).as_posix()
            current = problems.setdefault(rel, [])
            response = await page.goto(base + rel, wait_until="load")
            if response is None or response.status != 200:
                current.append(f"status {response and response.status}")
                continue
            if await page.locator(".math").count():
                await page.wait_for_function("() => window.MathJax && MathJax.Hub && MathJax.isReady",
                                             timeout=30_000)
                await page.evaluate("() => new Promise(done => MathJax.Hub.Queue(() => done(true)))")
                untypeset = await page.evaluate(
                    "() => [...document.querySelectorAll('.math.notranslate')]"
                    ".filter(e => !e.querySelector('.MathJax, .MathJax_Display, .MathJax_CHTML, .MathJax_SVG'))"
                    ".map(e => e.textContent.slice(0, 80))")
                current += [f"math not typeset: {t}" for t in untypeset]
                errors = await page.locator(".MathJax .merror, .MathJax_Error, [data-mjx-error]").count()
                if errors:
                    current.append(f"{errors} MathJax errors")
            text = await page.evaluate(
                "() => { const a = document.querySelector('article') || document.body;"
                " const c = a.cloneNode(true);"
                " c.querySelectorAll('pre, code, script, style, .MathJax_Preview').forEach(e => e.remove());"
                " return c.innerText; }")
            current += [f"raw math in the text: …{text[max(0, m.start() - 30):m.end() + 30]!r}…"
                        for m in RAW_MATH.finditer(text)]
            if rel in executed:
                want = expected_images(executed[rel])
                images = await page.evaluate(
                    "() => [...document.querySelectorAll('.cell_output img')]"
                    ".map(i => i.complete && i.naturalWidth > 0)")
                if len(images) != want:
                    current.append(f"{len(images)} figures on the page, the notebook made {want}")
                if not all(images):
                    current.append(f"{images.count(False)} figures did not load")
        await browser.close()
    return {rel: found for rel, found in problems.items() if found}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def served_check(html: Path, executed: dict[str, dict]) -> dict[str, list[str]]:
    handler = functools.partial(QuietHandler, directory=str(html))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            return asyncio.run(check_pages(f"http://127.0.0.1:{server.server_address[1]}/", html, executed))
        finally:
            server.shutdown()


def require_browser():
    require(Path(CHROMIUM).exists(), f"{CHROMIUM} not found; install Debian's chromium")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        require(False, "the playwright package is not installed (pip install -e '.[test]')")


def test_every_page_loads_offline_with_its_math_typeset_and_its_figures(site):
    require_browser()
    html, executed = site / "html", executed_notebooks(site)
    assert sum(map(expected_images, executed.values())) > 0, "the executed notebooks made no figure"
    problems = served_check(html, executed)
    assert not problems, "\n".join(f"{rel}: {p}" for rel, found in problems.items() for p in found)


def test_the_checks_report_a_broken_page(site, tmp_path):
    """The test of the test: one page, perturbed in each way the checks look for, is reported each time."""
    require_browser()
    html, executed = site / "html", executed_notebooks(site)
    page = "notebooks/01_dropout.html"
    assert expected_images(executed[page]) > 0
    (tmp_path / "notebooks").mkdir()
    for shared in ("_static", "_images"):
        (tmp_path / shared).symlink_to(html / shared)
    text = (html / page).read_text(encoding="utf-8")
    text = re.sub(r'<img [^>]*>', "", text, count=1)                               # a figure lost
    text = text.replace("</article>", '<p>raw $$x^2$$ and $y$ left</p><a href="nowhere.html">x</a>'
                        '<a href="#no-such-anchor">y</a><a href="https://arxiv.org/abs/1207.0580">fine</a><script src="https://cdn.invalid/x.js"></script>'
                        '<span class="math notranslate nohighlight">\\frac{</span></article>', 1)
    (tmp_path / page).write_text(text, encoding="utf-8")
    broken = "\n".join(broken_links(tmp_path))
    for expected in ("nowhere.html", "#no-such-anchor (no such anchor)", "https://cdn.invalid/x.js (another host)"):
        assert expected in broken
    assert "arxiv" not in broken
    found = "\n".join(served_check(tmp_path, {page: executed[page]})[page])
    for expected in ("requested another host: https://cdn.invalid/x.js", "raw math in the text", "math not typeset: \\frac{",
                     f"{expected_images(executed[page]) - 1} figures on the page, the notebook made"):
        assert expected in found, f"not reported: {expected!r} in\n{found}"
