"""Every notebook and solution, opened in JupyterLab in headless Chromium: all cells run in the `ci`
budget without an error, every slider renders, and moving each slider changes the output it drives.

Run alone with `make browser`; screenshots land in screenshots/ (git-ignored), with browser_report.txt
(what ran, how long each stage took, what was wrong) and jupyterlab.log. Needs Debian's chromium at
/usr/bin/chromium: skipped without it, except in CI (CI=true), where its absence fails.
The notebooks run in a few tabs at once (REGLAB_BROWSER_TABS, default 3) on one server and one browser,
all inside the module fixture; each test then reads its notebook's report. `-k dropout` runs only the
notebooks it selects (and the self-test only when its test is selected).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from browser import CHROMIUM, JupyterLab, check_notebooks, count_sliders, decode_frame

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "screenshots"
NOTEBOOKS = sorted([*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("solutions/*.ipynb")])
TABS = int(os.environ.get("REGLAB_BROWSER_TABS", "3"))


def rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def code(cell_id: str, source: str, tags=()) -> dict:
    return {"cell_type": "code", "id": cell_id, "source": source, "metadata": {"tags": list(tags)},
            "outputs": [], "execution_count": None}


def broken_widget_notebook() -> dict:
    """The test of the test: one slider that works, and each way a widget can be broken."""
    widgets = ["nbval-ignore-output"]
    cells = [
        code("setup", "from ipywidgets import FloatSlider, IntSlider, interact, interactive\n"
                      "import matplotlib.pyplot as plt\n%matplotlib inline"),
        code("works", "def show_square(n):\n    print(f'{n} squared is {n * n}')\n\n"
                      "interact(show_square, n=IntSlider(value=3, min=0, max=10));", widgets),
        code("plot-works", "def show_line(slope):\n    fig, ax = plt.subplots(figsize=(3, 2))\n"
                           "    ax.plot([0, 1], [0, slope])\n    ax.set_ylim(-2, 2)\n    plt.show()\n\n"
                           "interact(show_line, slope=FloatSlider(value=1.0, min=-2, max=2, step=0.1));", widgets),
        code("ignores-its-slider", "def show_constant(n):\n    print('always the same')\n\n"
                                   "interact(show_constant, n=IntSlider(value=10, min=0, max=10));", widgets),
        code("raises-when-moved", "def show_fragile(x):\n    if x != 0.5:\n        raise ValueError('fragile widget')\n"
                                  "    print(x)\n\n"
                                  "interact(show_fragile, x=FloatSlider(value=0.5, min=0, max=1, step=0.1));", widgets),
        code("never-displayed", "hidden = interactive(show_square, n=IntSlider(value=1, min=0, max=5))"),
        code("undeclared-slider", "def show_sum(a, b=5):\n    print(f'{a} + {b} = {a + b}')\n\n"
                                  "interact(show_sum, a=IntSlider(value=1, min=0, max=5));", widgets),
        code("expected-error", "raise KeyError('this cell is tagged raises-exception')", ["raises-exception"]),
        code("unexpected-error", "raise RuntimeError('deliberately broken cell')"),
        code("after-the-error", "print('never reached')"),
    ]
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}}}


def require_browser():
    """Skip without Chromium or playwright, except in CI (CI=true), where the browser test must run."""
    missing = None
    if not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} not found; install Debian's chromium (apt-get install -y chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {missing}")
    if missing:
        pytest.skip(f"browser test skipped: {missing}")


@pytest.fixture(scope="module")
def reports(request):
    """Run the selected notebooks (all, unless -k picks some), plus the broken self-test notebook, in the
    browser at once; {path: Report}."""
    require_browser()
    selected = {item.callspec.params["notebook"] for item in request.session.items
                if hasattr(item, "callspec") and "notebook" in item.callspec.params}
    self_test = any(item.name == "test_checker_reports_each_kind_of_broken_widget" for item in request.session.items)
    SCREENSHOTS.mkdir(exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):          # the folder shows this run only
        old.unlink()
    # The broken notebook must sit under the served root: a temporary folder inside the git-ignored
    # screenshots/ (not a hidden one: Jupyter refuses hidden paths), removed afterwards.
    scratch = SCREENSHOTS / "selftest"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    broken = scratch / "broken_widgets.ipynb"
    broken.write_text(json.dumps(broken_widget_notebook(), indent=1))
    started = time.monotonic()
    try:
        with JupyterLab(ROOT, env={"REGLAB_BUDGET": "ci", "OMP_NUM_THREADS": "1"},
                        log_path=SCREENSHOTS / "jupyterlab.log") as lab:
            # Largest notebooks first (roughly the longest), so that no tab is left with a long one at the end.
            present = [path for path in selected if path.exists()]      # other work may rename a file
            by_size = sorted(present, key=lambda path: -path.stat().st_size)
            found = check_notebooks(lab, ROOT, [broken] * self_test + by_size, SCREENSHOTS, tabs=TABS)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [f"browser test: {len(present)} notebooks{' + the self-test' * self_test} in "
             f"{time.monotonic() - started:.0f} s, {TABS} tabs at a time"]
    for report in found.values():
        lines += [report.summary()] + [f"  - {problem}" for problem in report.problems]
    (SCREENSHOTS / "browser_report.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    if self_test:
        found["<self-test>"] = found.pop(rel(broken))
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[rel(p) for p in NOTEBOOKS])
def test_notebook_runs_and_its_sliders_drive_its_output(notebook, reports):
    if rel(notebook) not in reports:
        pytest.skip(f"{rel(notebook)} disappeared between collection and the browser run")
    report = reports[rel(notebook)]
    assert report.ok, f"{report.summary()}\n" + "\n".join(f"- {p}" for p in report.problems)
    assert report.screenshots and all(Path(shot).is_file() for shot in report.screenshots)


def test_checker_reports_each_kind_of_broken_widget(reports):
    report = reports["<self-test>"]
    problems = "\n".join(report.problems)
    expected = {
        "ignores-its-slider": "did not change the output",
        "raises-when-moved": "raised ValueError: fragile widget",
        "never-displayed": "declares 1 slider(s) but shows 0",
        "undeclared-slider": "shows 2 slider(s) but its source declares 1",
        "unexpected-error": "raised RuntimeError: deliberately broken cell",
        "after-the-error": "did not run",
    }
    for cell_id, message in expected.items():
        assert any(f"'{cell_id}'" in p and message in p for p in report.problems), \
            f"the checker missed the broken cell {cell_id!r} ({message!r}); it reported:\n{problems}"
    for cell_id in ("setup", "works", "plot-works", "expected-error"):
        assert not any(f"'{cell_id}'" in p for p in report.problems), \
            f"the checker blamed the working cell {cell_id!r}:\n{problems}"
    assert report.sliders_responding == 4, report.summary()      # works, plot-works, both of show_sum
    assert len(report.problems) == len(expected), problems


def test_slider_count_reads_constructors_and_interact_tuples():
    assert count_sliders("interact(show, p=FloatSlider(min=0, max=0.9, step=0.1));") == 1
    assert count_sliders("%matplotlib inline\nw = widgets.IntSlider(3)\n"
                         "interact(show, n=w, kind=SelectionSlider(options=['a', 'b']))") == 2
    assert count_sliders("interact(show, lr=(1e-4, 1e-2), steps=(1, 10, 1), name='x')") == 2
    assert count_sliders("show_dropout(0.1)") == 0


def test_kernel_frames_decode_as_jupyter_server_encodes_them():
    from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
    msg = {"header": {"msg_type": "execute_reply", "msg_id": "b"}, "parent_header": {"msg_id": "a"},
           "metadata": {}, "content": {"status": "error", "ename": "ValueError"}}
    frame = serialize_msg_to_ws_v1(msg, "shell", pack=lambda part: json.dumps(part).encode())
    decoded = decode_frame(frame)
    assert decoded["channel"] == "shell"
    assert {key: decoded[key] for key in ("header", "parent_header", "content")} == \
        {key: msg[key] for key in ("header", "parent_header", "content")}
    assert decode_frame(json.dumps({"channel": "iopub", **msg}))["content"] == msg["content"]
