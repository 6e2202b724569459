"""The course site in a real browser: built by `ldm_paper.docs`, opened in headless Chromium, every link of the index followed.

The browser tests are skipped where no Chromium is on PATH (`make test` installs it first where it may, as it installs
the dataset). A small build runs every time: every page rendered, `index` and `10_data` (two short lessons) executed. The full build that
`make docs` writes to `_site/` (every notebook executed at ci) is checked too when it is current.
"""
import json
from pathlib import Path

import nbformat
import pytest

from ldm_paper.docs import (BROWSERS, DocsBuildError, build_site, check_site, dump_dom, find_chromium, site_notebooks,
                            take_screenshot)
from ldm_paper.reproduce import notebook_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_site"
LESSONS = [p for p in site_notebooks(ROOT / "nbs") if p.name != "index.ipynb"]
needs_chromium = pytest.mark.skipif(find_chromium() is None, reason=f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); "
                                    "`make browser` installs it as root or with passwordless sudo")


def test_index_links_every_lesson():
    index = "\n".join(c.source for c in nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4).cells if c.cell_type == "markdown")
    missing = [p.name for p in LESSONS if f"({p.name})" not in index]
    assert not missing, f"nbs/index.ipynb does not link {missing}: add them to its table of lessons"


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    """Every page, with only the index and 10_data executed (the rest rendered as committed): seconds, not minutes."""
    out = tmp_path_factory.mktemp("site")
    build_site(out, execute=["index", "10_data"], screenshot=False, log=lambda *a: None)
    return out


@needs_chromium
def test_small_site_in_chromium(small_site):
    build = json.loads((small_site / "build.json").read_text())
    assert {p["notebook"] for p in build["pages"] if p["executed"]} == {"index.ipynb", "10_data.ipynb"}
    assert [p["error"] for p in build["pages"]] == [None] * len(build["pages"])
    report = check_site(small_site)
    assert not report["problems"], "\n".join(report["problems"])
    assert {p.stem + ".html" for p in LESSONS} <= set(report["pages"])          # every lesson reached from the index
    index = dump_dom(small_site / "index.html")
    assert "Figure gallery" in index and "fig09" in index and "planned" in index   # the gallery, computed when executed
    lesson = dump_dom(small_site / "10_data.html")
    assert "jp-OutputArea-output" in lesson and "#| export" not in lesson and "Course index" in lesson


@needs_chromium
def test_equations_are_typeset_offline(small_site):
    """The lessons' LaTeX is typeset by the MathJax copied into the site (no network): MathJax's HTML-CSS output
    replaces the $...$ source in the diffusion lesson, and the site holds MathJax itself."""
    assert (small_site / "mathjax" / "MathJax.js").is_file()
    page = (small_site / "40_diffusion.html").read_text()
    assert 'src="mathjax/MathJax.js' in page and "libs/mathjax" not in page.lower()
    dom = dump_dom(small_site / "40_diffusion.html")
    assert 'class="MathJax"' in dom and "MathJax_Display" in dom and "Math Processing Error" not in dom


@needs_chromium
def test_screenshot_of_the_index(small_site):
    from PIL import Image
    png = take_screenshot(small_site / "index.html", small_site / "index.png", 1280, 1000)
    im = Image.open(png)
    assert im.size == (1280, 1000)
    assert sum(n > 0 for n in im.convert("L").histogram()) > 32, "the screenshot is (almost) blank"


@needs_chromium
def test_a_failing_notebook_fails_the_build_and_shows_in_the_page(tmp_path):
    nbs = tmp_path / "nbs"; nbs.mkdir()
    nb = lambda *cells: nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(cells[0])] + [nbformat.v4.new_code_cell(c) for c in cells[1:]])
    nbformat.write(nb("# Home\n\n> t\n\n[a](01_a.ipynb) [b](02_b.ipynb) ![missing](nope.png) ![not made](../figures/later.png)"),
                   nbs / "index.ipynb")
    nbformat.write(nb("# A\n\n> ok", "print('fine')"), nbs / "01_a.ipynb")
    nbformat.write(nb("# B\n\n> fails", "x = 1", "y = {}['key']"), nbs / "02_b.ipynb")
    with pytest.raises(DocsBuildError, match=r"02_b\.ipynb: cell 2 \(`y = \{\}\['key'\]`\): KeyError: 'key'"):
        build_site(tmp_path / "site", nbs=nbs, screenshot=False, log=lambda *a: None)
    assert (tmp_path / "site" / "02_b.html").exists()                          # every page written before failing
    problems = check_site(tmp_path / "site")["problems"]
    assert problems == ["index.html: missing image nope.png", "02_b.html: the page shows a notebook error (a traceback)"]
    assert "[figure not made yet: figures/later.png" in (tmp_path / "site" / "index.html").read_text()   # a note, not a broken image


def _current_full_build():
    """`_site/build.json` if `make docs` built it from every notebook as it is now (all executed), else None."""
    f = SITE / "build.json"
    if not f.exists(): return None
    build = json.loads(f.read_text()); pages = {p["notebook"]: p for p in build["pages"]}
    nbs = site_notebooks(ROOT / "nbs")
    if set(pages) != {p.name for p in nbs}: return None
    if any(not pages[p.name]["executed"] or pages[p.name]["fingerprint"] != notebook_fingerprint(p) for p in nbs): return None
    return build


@needs_chromium
def test_full_site_in_chromium():
    build = _current_full_build()
    if build is None: pytest.skip("no current full build in _site/: `make docs` executes every notebook at ci (minutes)")
    failed = [f"{p['notebook']}: {p['error']}" for p in build["pages"] if p["error"]]
    assert not failed, "\n".join(failed)
    report = check_site(SITE)
    assert not report["problems"], "\n".join(report["problems"])
    assert {p.stem + ".html" for p in LESSONS} <= set(report["pages"])
    take_screenshot(SITE / "index.html", SITE / "index.png")
