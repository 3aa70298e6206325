"""Grading room, the lab: which cells a submission must keep and which checks grade it, read from the lab's solution.

Checks: the public `check("<lab>.<name>", Object)` calls of the solution, its hidden tests (the same
calls between `### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS`), and an instructor's private tests
(`--tests DIR`: Python files that `add(Check(...))` and list `CHECKS = [("<lab>.<name>", "Object")]`).
The required cells are every code cell and every answer cell of the lab generated from the solution.
The lab's slider cells (tagged `widget` in the solution) are emptied for a headless run: a slider needs
a person, and nbclient can hang on a cell that opens widget comms (jupyter/nbclient#312).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from reglab import checks as check_registry
from reglab.grading.generate import BEGIN_HIDDEN, END_HIDDEN, NOTE_ID, STUB_MARKDOWN, cell_source, make_lab
from reglab.grading.paths import SOLUTIONS, find_solution, lab_name

WIDGET_TAG = "widget"
WIDGET_SKIPPED = "# (not run here: this cell only shows sliders, which need a person)\n"


def widget_ids(notebook: dict) -> frozenset:
    """Ids of the code cells tagged `widget`."""
    return frozenset(c.get("id") for c in notebook["cells"] if c.get("cell_type") == "code" and
                     WIDGET_TAG in c.get("metadata", {}).get("tags", []))


def skip_widgets(notebook: dict, ids: frozenset) -> dict:
    """The notebook with the code cells of these ids emptied (in place), for a headless run."""
    for cell in notebook["cells"]:
        if cell.get("cell_type") == "code" and cell.get("id") in ids:
            cell["source"] = WIDGET_SKIPPED
    return notebook


@dataclass(frozen=True)
class PlannedCheck:
    id: str                 # "<lab>.<name>"
    object_name: str        # the student's top-level object the probe receives
    points: int
    summary: str
    kind: str               # "public" (in the lab), "hidden" (solution only) or "private" (--tests)


@dataclass(frozen=True)
class LabCell:
    id: str
    cell_type: str
    anchor: str             # a line that identifies the cell if its id changed ("" when not distinctive)


@dataclass(frozen=True)
class Lab:
    name: str
    solution: Path
    cells: tuple[LabCell, ...]             # the cells every submission must keep, in order
    parameters_id: str
    checks: tuple[PlannedCheck, ...]
    private_files: tuple[Path, ...] = ()   # --tests files that register this lab's private checks
    others: tuple[tuple[str, frozenset], ...] = ()   # (lab name, its required ids) for every other lab
    prefixes: tuple[str, ...] = ()         # check ids of this lab start with one of these and a dot
    widget_ids: frozenset = frozenset()    # ids of the solution's slider cells (tag `widget`), not run

    @property
    def max_score(self) -> int:
        return sum(c.points for c in self.checks)


def _read_solution(path: Path) -> tuple[dict, list[dict]]:
    """A solution notebook and the cells its generated lab requires: every code cell and every answer
    cell (prose and the generated note may go)."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    required = [c for c in make_lab(notebook, path.name)["cells"] if c.get("id") != NOTE_ID and
                (c["cell_type"] == "code" or STUB_MARKDOWN in cell_source(c))]
    return notebook, required


def _anchor(cell) -> str:
    for line in cell_source(cell).split("\n"):
        text = line.strip()
        if text and not text.startswith("#") and text != "raise NotImplementedError()" and text != STUB_MARKDOWN:
            return text
    return ""


def solution_checks(solution: dict, where: str) -> list[tuple[str, str, bool]]:
    """(check id, object name, hidden?) for each `check("<id>", Name)` call of a solution notebook."""
    found = []
    for index, cell in enumerate(solution["cells"]):
        if cell["cell_type"] != "code":
            continue
        lines = cell_source(cell).split("\n")
        hidden, inside = set(), False
        for number, line in enumerate(lines, start=1):
            if line.strip() == BEGIN_HIDDEN:
                inside = True
            elif line.strip() == END_HIDDEN:
                inside = False
            elif inside:
                hidden.add(number)
        code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)   # IPython magics
        try:
            tree = ast.parse(code)
        except SyntaxError as err:
            raise ValueError(f"{where}, cell {index} ({cell.get('id')}): not valid Python: {err}") from None
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check"
                    and len(node.args) == 2 and not node.keywords and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and isinstance(node.args[1], ast.Name)):
                found.append((node.args[0].value, node.args[1].id, node.lineno in hidden))
    return found


def load_private_tests(tests_dir: Path, prefixes) -> tuple[list[tuple[str, str]], list[Path]]:
    """Import every `*.py` of an instructor's tests folder (registering its checks); return the
    (check id, object name) pairs its `CHECKS` lists for this lab (ids "<prefix>.<name>") and the files
    that list them."""
    tests_dir = Path(tests_dir)
    if not tests_dir.is_dir():
        raise ValueError(f"--tests must be a folder of Python files, got {str(tests_dir)!r}")
    pairs, files = [], []
    sys.path.insert(0, str(tests_dir))
    try:
        for path in sorted(tests_dir.glob("*.py")):
            if path.name.startswith("_"):
                continue
            module_name = f"reglab_private_tests.{path.stem}"
            module = sys.modules.get(module_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            listed = getattr(module, "CHECKS", [])
            if not isinstance(listed, (list, tuple)) or not all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in listed):
                raise ValueError(f"{path}: CHECKS must be a list of (check id, object name) pairs, got {listed!r}")
            mine = [(i, n) for i, n in listed if i.partition(".")[0] in prefixes]
            for check_id, name in mine:
                if not name.isidentifier():
                    raise ValueError(f"{path}: object name {name!r} of {check_id} is not a Python name")
            pairs += mine
            if mine:
                files.append(path)
    finally:
        sys.path.remove(str(tests_dir))
    return pairs, files


def _lab_ids(solution_path: Path) -> frozenset:
    return frozenset(c.get("id") for c in _read_solution(solution_path)[1])


def load_lab(name_or_path: str, tests_dir: Path | None = None, kinds=("public", "hidden", "private")) -> Lab:
    """The lab to grade against: its required cells (from the generated lab) and its checks."""
    solution = find_solution(name_or_path)
    name = lab_name(solution)
    notebook, required = _read_solution(solution)
    anchors = [_anchor(c) for c in required]
    cells = tuple(LabCell(c["id"], c["cell_type"], a if anchors.count(a) == 1 else "") for c, a in zip(required, anchors))
    parameters = [c["id"] for c in required if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not parameters:
        raise ValueError(f"{solution}: no code cell is tagged 'parameters'")

    wanted: dict[str, tuple[str, str]] = {}
    calls = solution_checks(notebook, str(solution))
    prefixes = sorted({name} | {check_id.partition(".")[0] for check_id, _, _ in calls})
    for check_id, object_name, hidden in calls:
        kind = "hidden" if hidden else "public"
        if check_id in wanted and wanted[check_id][0] != object_name:
            raise ValueError(f"{solution}: {check_id} checks both {wanted[check_id][0]} and {object_name}")
        wanted.setdefault(check_id, (object_name, kind))
    private_files: list[Path] = []
    if tests_dir is not None:
        pairs, private_files = load_private_tests(tests_dir, prefixes)
        for check_id, object_name in pairs:
            wanted.setdefault(check_id, (object_name, "private"))
    planned = []
    for check_id, (object_name, kind) in wanted.items():
        if kind not in kinds:
            continue
        try:
            spec = check_registry.get(check_id)
        except KeyError as err:
            raise ValueError(f"{solution}: {err.args[0]}") from None
        planned.append(PlannedCheck(check_id, object_name, spec.points, spec.summary, kind))
    order = {"public": 0, "hidden": 0, "private": 1}                 # solution order, private ones last
    planned.sort(key=lambda c: order[c.kind])

    others = {}
    for folder in {solution.parent, SOLUTIONS}:
        for path in sorted(folder.glob("*_lab.ipynb")) if folder.is_dir() else []:
            other = lab_name(path)
            if other != name and other not in others:
                try:
                    others[other] = _lab_ids(path)
                except (OSError, ValueError, KeyError):
                    continue
    return Lab(name, solution, cells, parameters[0], tuple(planned), tuple(private_files),
               tuple(sorted(others.items())), tuple(prefixes), widget_ids(notebook))


def infer_lab(notebook: Path) -> str:
    """The lab a notebook belongs to: the generated note names its solution, else the file name, else its ids."""
    try:
        cells = json.loads(Path(notebook).read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError, AttributeError):
        cells = []
    for cell in cells if isinstance(cells, list) else []:
        if isinstance(cell, dict) and cell.get("id") == NOTE_ID:
            match = re.search(r"solutions/([\w.-]+\.ipynb)", cell_source(cell))
            if match and (SOLUTIONS / match.group(1)).exists():
                return lab_name(Path(match.group(1)))
    known = {lab_name(p): p for p in sorted(SOLUTIONS.glob("*_lab.ipynb"))}
    if lab_name(Path(notebook)) in known:
        return lab_name(Path(notebook))
    ids = {c.get("id") for c in cells if isinstance(c, dict)}
    scores = {name: len(ids & _lab_ids(path)) for name, path in known.items()}
    if scores and max(scores.values()) > 2:
        return max(scores, key=scores.get)
    raise ValueError(f"cannot tell which lab {notebook} is; pass --lab NAME")
