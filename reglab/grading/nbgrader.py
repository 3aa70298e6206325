"""Grading: the labs as nbgrader source notebooks, for a course that already runs nbgrader.

    python -m reglab.labs --nbgrader COURSE_DIR     # writes COURSE_DIR/source/<lab>/<lab notebook>.ipynb

nbgrader reads the same markers as our solutions (`### BEGIN SOLUTION` / `### END SOLUTION`, and
`### BEGIN HIDDEN TESTS` / `### END HIDDEN TESTS` in test cells) and keeps its own cell metadata in
`metadata.nbgrader` (nbgrader's documentation, "Developer documentation: metadata": schema version 3,
with `grade`, `solution`, `locked`, `task`, `grade_id`, `points`). Each solution cell becomes:
- a code cell with a solution region: an autograded answer (`solution`, not `grade`);
- a markdown cell with a solution region: a manually graded answer (`solution` and `grade`, 0 points:
  set the points in nbgrader's "Create Assignment" toolbar; our grader does not score prose);
- a code cell that calls `check("<lab>.<name>", Obj)`: an autograder test cell (`grade`, `locked`),
  worth the points of its checks, which fails in nbgrader's autograde exactly when a check raises;
- every other cell: read-only (`locked`).
Then `nbgrader generate_assignment <lab>` makes the student version and `nbgrader autograde` grades it.
Set REGLAB_BUDGET=ci (and REGLAB_PROGRESS=0) in the environment nbgrader runs in, so that each lab runs
in seconds; nbgrader's kernel is not sandboxed (`python -m reglab.grade` is).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from reglab import checks as check_registry
from reglab.grading.generate import BEGIN_SOLUTION, cell_source, dumps
from reglab.grading.lab import solution_checks
from reglab.grading.paths import lab_name

SCHEMA_VERSION = 3


def nbgrader_metadata(cell: dict, where: str) -> dict:
    """The `metadata.nbgrader` of one solution cell."""
    text = cell_source(cell)
    has_solution = any(line.strip() == BEGIN_SOLUTION for line in text.split("\n"))
    checks = solution_checks({"cells": [cell]}, where) if cell["cell_type"] == "code" else []
    meta = {"grade": False, "solution": False, "locked": True, "task": False, "grade_id": cell["id"],
            "schema_version": SCHEMA_VERSION}
    if checks and has_solution:
        raise ValueError(f"{where}: a cell cannot be both an answer and a test for nbgrader; split it")
    if checks:
        meta.update(grade=True, points=sum(check_registry.get(check_id).points for check_id, _, _ in checks))
    elif has_solution:
        meta.update(solution=True, locked=False, grade=cell["cell_type"] == "markdown")
        if meta["grade"]:
            meta["points"] = 0
    return meta


def nbgrader_source(solution: dict, source_name: str) -> dict:
    """A solution notebook with nbgrader's metadata on every cell (the input is not modified)."""
    notebook = copy.deepcopy(solution)
    for index, cell in enumerate(notebook["cells"]):
        where = f"{source_name}, cell {index} ({cell.get('id', 'no id')})"
        cell.setdefault("metadata", {})["nbgrader"] = nbgrader_metadata(cell, where)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return notebook


def write_course(course_dir: Path, solutions: list[Path]) -> list[Path]:
    """COURSE_DIR/source/<lab>/<lab notebook>: one nbgrader assignment per lab."""
    written = []
    for path in solutions:
        target = Path(course_dir) / "source" / lab_name(path) / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        notebook = nbgrader_source(json.loads(path.read_text(encoding="utf-8")), path.name)
        target.write_text(dumps(notebook), encoding="utf-8")
        written.append(target)
    return written
