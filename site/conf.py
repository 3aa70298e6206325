"""Sphinx configuration of the course website (built by site/build.py; see its docstring).

Offline by construction: the theme (sphinx-book-theme) is an installed package, MathJax 2.7 is copied from
the `jupyter-server-mathjax` wheel into `_static/mathjax/`, and the ipywidgets embedding scripts (which
myst-nb would load from a CDN) are left out: a slider is shown as a note to run the notebook.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from docutils import nodes

ROOT = Path(__file__).resolve().parent.parent

project = "reglab"
author = "the reglab authors"
copyright = "the reglab authors"
extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
suppress_warnings = ["mystnb.unknown_mime_type"]     # the labs' result records (application/vnd.reglab...)

# --- notebooks: executed through jupyter-cache, one cache per budget ----------------------------------
nb_execution_mode = "cache"
nb_execution_cache_path = os.environ.get("REGLAB_SITE_CACHE", str(ROOT / "build" / "site" / "cache" / "cpu"))
nb_execution_timeout = 300 if os.environ.get("REGLAB_BUDGET") == "ci" else 3600   # per cell; `cpu` sweeps take minutes
nb_execution_raise_on_error = True     # a cell that raises (and is not tagged raises-exception) fails the build
nb_execution_show_tb = True
nb_merge_streams = True
nb_ipywidgets_js = {}                  # its default loads require.js and the widget manager from CDNs
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_dmath_double_inline = True        # `$$...$$` inside a paragraph, as Jupyter renders it
myst_heading_anchors = 3

# --- math: MathJax 2.7 from the jupyter-server-mathjax wheel, served from _static ------------------
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"   # the wheel ships the -full config only
mathjax2_config = {
    "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]],
                "processEscapes": True, "ignoreClass": "document", "processClass": "math|output_area"},
    # The wheel ships HTML-CSS output with the STIX-Web fonts only (no TeX fonts): use those, never local ones.
    "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web", "imageFont": None},
    "messageStyle": "none",
    "menuSettings": {"zoom": "None"},
}

# --- theme -----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "reglab: regularization in transformer training"
html_theme_options = {
    "use_download_button": True,
    "use_fullscreen_button": False,
    "home_page_in_toc": True,
    "show_toc_level": 2,
}
html_last_updated_fmt = None
html_static_path: list[str] = []


def add_run_link(app, doctree):
    """At the top of each notebook's page: the notebook itself, to download and run."""
    docname = app.env.docname
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    name = Path(docname).name + ".ipynb"
    html = (f'<p class="reglab-run">Run it yourself: <a class="reference download" href="{name}" download>'
            f'{name}</a> (<code>{docname}.ipynb</code> in the course; <code>make lab</code> opens it in '
            f'JupyterLab). This page shows it executed in the <code>{os.environ.get("REGLAB_BUDGET", "cpu")}'
            f'</code> budget.</p>')
    raw = nodes.raw("", html, format="html")
    sections = list(doctree.findall(nodes.section))
    if sections:
        title = next(iter(sections[0].findall(nodes.title)), None)
        sections[0].insert(sections[0].index(title) + 1 if title is not None else 0, raw)
    else:
        doctree.insert(0, raw)


def replace_widget_reprs(app, doctree):
    """A slider's output is its text fallback, `interactive(children=(...))`: say what it is instead."""
    for block in list(doctree.findall(nodes.literal_block)):
        if block.astext().startswith(("interactive(children=", "interact(", "VBox(children=")):
            note = nodes.paragraph("", "", nodes.emphasis(
                "", "An interactive slider is here: run the notebook to move it."))
            note["classes"].append("reglab-widget")
            block.replace_self(note)


def copy_assets(app, exception):
    """MathJax into _static/mathjax, and each published notebook (as committed, clean) next to its page."""
    if exception is not None or app.builder.format != "html":
        return
    import jupyter_server_mathjax
    mathjax = Path(jupyter_server_mathjax.__file__).parent / "static"
    target = Path(app.outdir) / "_static" / "mathjax"
    if not (target / "MathJax.js").exists():
        shutil.copytree(mathjax, target, dirs_exist_ok=True)
    for docname in app.env.found_docs:
        source = ROOT / f"{docname}.ipynb"
        if source.exists():
            (Path(app.outdir) / docname).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, Path(app.outdir) / f"{docname}.ipynb")


def setup(app):
    app.connect("doctree-read", add_run_link)
    app.connect("doctree-read", replace_widget_reprs)
    app.connect("build-finished", copy_assets)
