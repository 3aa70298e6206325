"""Grading room, the lab generator: every student lab is cut from its solution, `solutions/` being the single source.

    python -m reglab.labs          # write labs/ from solutions/
    python -m reglab.labs --check  # exit 1 if labs/ is stale (CI runs this)

In a solution notebook (nbgrader's markers):
- code between `### BEGIN SOLUTION` and `### END SOLUTION` becomes `raise NotImplementedError()`
  (in a markdown cell: "*Your answer here.*");
- code between `### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS` is removed (only the grader runs it);
  a cell left empty by that is dropped;
- a cell tagged `raises-in-lab` (it calls the student's code) is tagged `raises-exception` in the lab,
  nbval's way of expecting an error from an unfinished stub.
Outputs and execution counts are cleared, and a note on top says where the lab comes from.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from reglab.grading.paths import LABS, ROOT, SOLUTIONS

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
STUB_CODE = "# YOUR CODE HERE\nraise NotImplementedError()"
STUB_MARKDOWN = "*Your answer here.*"
NOTE_ID = "reglab-generated-note"
DESCRIPTION = "Student labs are generated from the solutions: `solutions/` is the single source of every lab."


class LabSourceError(ValueError):
    """A solution notebook whose markers cannot be turned into a lab."""


def cell_source(cell) -> str:
    """A cell's source as one string (nbformat allows a string or a list of lines)."""
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _replace_regions(text: str, begin: str, end: str, replacement: str | None, where: str) -> str:
    """Replace each begin..end region (marker lines included) by replacement, indented like the marker;
    replacement None removes the region."""
    out, inside, indent = [], False, ""
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if stripped == begin:
            if inside:
                raise LabSourceError(f"{where}: line {number} opens {begin!r} inside an open region")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            if replacement is not None:
                out.extend(indent + r for r in replacement.split("\n"))
        elif stripped == end:
            if not inside:
                raise LabSourceError(f"{where}: line {number} closes {end!r} without an opening marker")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise LabSourceError(f"{where}: {begin!r} is never closed with {end!r}")
    return "\n".join(out)


def make_lab(solution: dict, source_name: str) -> dict:
    """The student version of a solution notebook (an nbformat dict); the input is not modified."""
    lab = copy.deepcopy(solution)
    cells = []
    for index, cell in enumerate(lab["cells"]):
        where = f"{source_name}, cell {index} ({cell.get('id', 'no id')})"
        text = cell_source(cell)
        is_code = cell["cell_type"] == "code"
        text = _replace_regions(text, BEGIN_SOLUTION, END_SOLUTION, STUB_CODE if is_code else STUB_MARKDOWN, where)
        text = _replace_regions(text, BEGIN_HIDDEN, END_HIDDEN, None, where)
        if not text.strip() and cell_source(cell).strip():
            continue                                   # a hidden-tests-only cell
        cell["source"] = text
        tags = cell.get("metadata", {}).get("tags", [])
        if "raises-in-lab" in tags:
            cell["metadata"]["tags"] = [t for t in tags if t != "raises-in-lab"] + ["raises-exception"]
        if is_code:
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    note = {"cell_type": "markdown", "id": NOTE_ID, "metadata": {}, "source":
            f"> **Student version**, generated from `solutions/{source_name}` by `python -m reglab.labs`.\n"
            "> Fill in every cell marked `# YOUR CODE HERE` and every *Your answer here.*; the checks below\n"
            "> each cell tell you when it works. Course maintainers: edit the solution, not this file."}
    lab["cells"] = [note] + cells
    return lab


def dumps(notebook: dict) -> str:
    """nbformat's on-disk layout (one-space indent, sorted keys, trailing newline)."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def expected_labs(solutions_dir: Path = SOLUTIONS) -> dict[str, str]:
    """{lab file name: its text} for every solution notebook."""
    labs = {}
    for path in sorted(solutions_dir.glob("*.ipynb")):
        try:
            solution = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise LabSourceError(f"{path.name} is not valid notebook JSON: {err}") from None
        labs[path.name] = dumps(make_lab(solution, path.name))
    return labs


def stale_labs(solutions_dir: Path = SOLUTIONS, labs_dir: Path = LABS) -> list[str]:
    """Lines describing every lab that differs from what the solutions generate (empty when up to date)."""
    expected = expected_labs(solutions_dir)
    problems = []
    for name, text in expected.items():
        path = labs_dir / name
        if not path.exists():
            problems.append(f"labs/{name} is missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"labs/{name} differs from what solutions/{name} generates")
    for path in sorted(labs_dir.glob("*.ipynb")):
        if path.name not in expected:
            problems.append(f"labs/{path.name} has no solution in solutions/")
    return problems


def write_labs(solutions_dir: Path = SOLUTIONS, labs_dir: Path = LABS) -> list[Path]:
    labs_dir.mkdir(exist_ok=True)
    written = []
    expected = expected_labs(solutions_dir)
    for name, text in expected.items():
        path = labs_dir / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    for path in labs_dir.glob("*.ipynb"):
        if path.name not in expected:
            path.unlink()
            written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reglab.labs", description=DESCRIPTION)
    parser.add_argument("--check", action="store_true", help="exit 1 if labs/ is stale instead of writing it")
    parser.add_argument("--nbgrader", metavar="COURSE_DIR", help="write each lab as an nbgrader source notebook "
                        "(COURSE_DIR/source/<lab>/) instead")
    args = parser.parse_args(argv)
    try:
        if args.nbgrader:
            from reglab.grading.nbgrader import write_course
            for path in write_course(Path(args.nbgrader), sorted(SOLUTIONS.glob("*.ipynb"))):
                print(f"wrote {path}")
            return 0
        if args.check:
            problems = stale_labs()
            for line in problems:
                print(line)
            print("labs/ is stale: run `python -m reglab.labs`" if problems else "labs/ is up to date")
            return 1 if problems else 0
        for path in write_labs():
            print(f"wrote {path.relative_to(ROOT)}" if path.exists() else f"removed {path.relative_to(ROOT)}")
        return 0
    except LabSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

