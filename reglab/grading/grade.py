"""Grading submitted labs: validate each notebook, run it in a sandbox, probe it there, judge here.

    python -m reglab.grade dropout submissions/ --out grades/ [--workers 2] [--tests private/]
    python -m reglab.grade --self-check labs/01_dropout_lab.ipynb      # a student's public checks

For each submission the grader
1. validates it against the lab generated from the solution: a notebook, of this lab, with every code
   cell and answer cell of the lab still there under its id, in the lab's order (added cells, edited
   cells and deleted prose are fine); anything else is `invalid`, with the reason;
2. executes it with papermill in a fresh kernel in a private working directory (`reglab.grading.sandbox`:
   inside bubblewrap, with no network and nothing of the machine visible but Python and the course,
   as an unprivileged uid, with a wall-clock timeout, memory and process caps, every process killed at
   the end; the grader refuses to run when the sandbox cannot start, unless --no-sandbox, which each
   row's reason then records),
   with the parameters budget="ci", device="cpu", seed=0, and one cell appended at the end that calls
   every check's probe on the student's objects and writes the JSON data to a file. The lab's slider
   cells (tagged `widget` in the solution) are not run, and progress bars are off (REGLAB_PROGRESS=0,
   set by the sandbox): a widget needs a person, and a headless papermill/nbclient run can hang on a
   cell that opens widget comms (jupyter/nbclient#312, jupyter/nbconvert#2029; it hung one of our CI
   runs for 300 s);
3. judges that data in the grader's own process (`Check.judge`, PyTorch as the answer key): a score
   never depends on anything the notebook prints, displays or patches in its kernel.

Checks: the public `check("<lab>.<name>", Object)` calls of the solution, its hidden tests (the same
calls between `### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS`), and an instructor's private tests
(`--tests DIR`: Python files that `add(Check(...))` and list `CHECKS = [("<lab>.<name>", "Object")]`).

Results in DIR: `grades.csv` (one row per submission: submission, status, score, max_score, reason,
sha256, then the points earned per check), `feedback/<submission>.md` (each failed check with the
misconception its judge names; hidden and private checks show their summary and verdict, never their
code) and `executed/<submission>.ipynb`. Status is graded, error, timeout or invalid, always with a
reason; the score is the points of the checks whose data reached the grader and passed. The grader
keeps the gradebook in memory and rewrites it atomically after each submission (and any of its files a
submission changed); a rerun skips rows already graded (or invalid) for the same file unless --force;
one grader at a time writes to an output folder (a lock file).
"""
from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import copy
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from reglab import checks as check_registry
from reglab.grading.generate import (BEGIN_HIDDEN, END_HIDDEN, NOTE_ID, SOLUTIONS, STUB_MARKDOWN, find_solution, lab_name, make_lab,
                         skip_widgets, widget_ids)
from reglab.grading.sandbox import DEFAULT_UID, Limits, choose_uid, execute, remove_tree, skip_slow_optional_imports, unavailable

STATUSES = ("graded", "error", "timeout", "invalid")
BASE_COLUMNS = ["submission", "status", "score", "max_score", "reason", "sha256"]
PROBE_CELL_ID = "reglab-grader-probes"
PROBE_FILE = ".reglab-probes.json"
PRIVATE_DIR = ".reglab-tests"
PROBE_SECONDS = 60                    # one probe may run this long before it counts as hanging
MAX_SUBMISSION_BYTES = 32 * 2**20     # a lab notebook with its outputs is well under 1 MB
MAX_PROBE_FILE_BYTES = 16 * 2**20
MAX_CHECK_DATA_BYTES = 4 * 2**20      # the check protocol asks probes for < ~1 MB
NO_SANDBOX_NOTE = "ran without the sandbox (--no-sandbox)"   # in the reason of every row graded so
PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"
_UMASK = os.umask(0o022)              # read the process's umask (the only way is to set it) ...
os.umask(_UMASK)                      # ... and put it back


# ----------------------------------------------------------------------------------------------
# The lab: which cells a submission must keep, which checks grade it
# ----------------------------------------------------------------------------------------------

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


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _required_cells(lab_notebook: dict) -> list[dict]:
    """Every code cell and every answer cell of a generated lab (prose and the note may go)."""
    return [c for c in lab_notebook["cells"] if c.get("id") != NOTE_ID and
            (c["cell_type"] == "code" or STUB_MARKDOWN in _source(c))]


def _anchor(cell) -> str:
    for line in _source(cell).split("\n"):
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
        lines = _source(cell).split("\n")
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
    notebook = json.loads(solution_path.read_text(encoding="utf-8"))
    return frozenset(c.get("id") for c in _required_cells(make_lab(notebook, solution_path.name)))


def load_lab(name_or_path: str, tests_dir: Path | None = None, kinds=("public", "hidden", "private")) -> Lab:
    """The lab to grade against: its required cells (from the generated lab) and its checks."""
    solution = find_solution(name_or_path)
    name = lab_name(solution)
    notebook = json.loads(solution.read_text(encoding="utf-8"))
    lab_notebook = make_lab(notebook, solution.name)
    required = _required_cells(lab_notebook)
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


# ----------------------------------------------------------------------------------------------
# Validation: is this a notebook of this lab, with its cells where the lab has them?
# ----------------------------------------------------------------------------------------------

class Invalid(Exception):
    """A submission the grader will not run; the message is the reason shown to instructor and student."""


def _quote(ids) -> str:
    return ", ".join(f"'{i}'" for i in ids)


def read_notebook(raw: bytes) -> dict:
    """Parse a submitted file into a notebook dict, or raise Invalid saying what it is instead."""
    if not raw.strip():
        raise Invalid("empty file: nothing was submitted (0 bytes)" if not raw else "empty file: only whitespace")
    if len(raw) > MAX_SUBMISSION_BYTES:
        raise Invalid(f"file too large: {len(raw) / 2**20:.0f} MB (a lab notebook is well under "
                      f"{MAX_SUBMISSION_BYTES // 2**20} MB; clear its outputs)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Invalid("not a notebook: the file is not UTF-8 text (a binary file, e.g. a zip or a PDF?)") from None
    start = text.lstrip()[:40].split("\n")[0]
    if not text.lstrip().startswith(("{", "[")):
        raise Invalid(f"not a notebook: the file is not JSON (it begins {start!r}; "
                      "submit the .ipynb file saved by Jupyter, not a script or an export)")
    try:
        notebook = json.loads(text)
    except json.JSONDecodeError as err:
        raise Invalid(f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg} "
                      "(a truncated or hand-edited file?)") from None
    except RecursionError:
        raise Invalid("malformed JSON: nested too deeply to be a notebook") from None
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list) or "nbformat" not in notebook:
        raise Invalid("not a notebook: valid JSON, but without a notebook's 'nbformat' and 'cells'")
    major, minor = notebook.get("nbformat"), notebook.get("nbformat_minor", 0)
    if major != 4:
        raise Invalid(f"nbformat {major} notebook: the grader reads nbformat 4 (open and save it in Jupyter)")
    cells = notebook["cells"]
    if not all(isinstance(c, dict) for c in cells):
        raise Invalid("not a valid notebook: a cell is not a JSON object")
    if (isinstance(minor, int) and minor < 5) or any(not isinstance(c.get("id"), str) for c in cells):
        raise Invalid(f"its cells have no ids (nbformat 4.{minor}), so they cannot be matched to the lab's: "
                      "download the lab again and copy your work into it")
    counts = collections.Counter(c["id"] for c in cells)
    duplicated = sorted(i for i, n in counts.items() if n > 1)
    if duplicated:
        raise Invalid(f"not a valid notebook: cell ids {_quote(duplicated)} appear more than once")
    import nbformat
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nbformat.validate(nbformat.from_dict(copy.deepcopy(notebook)))
    except nbformat.ValidationError as err:
        first = str(err).strip().split("\n")[0][:200]
        raise Invalid(f"not a valid notebook: {first}") from None
    return notebook


def _moved(positions: list[int]) -> set[int]:
    """Indices (into positions) not on one longest increasing run: the cells that were moved."""
    n = len(positions)
    best, back = [1] * n, [-1] * n
    for i in range(n):
        for j in range(i):
            if positions[j] < positions[i] and best[j] + 1 > best[i]:
                best[i], back[i] = best[j] + 1, j
    keep, i = set(), max(range(n), key=best.__getitem__) if n else -1
    while i >= 0:
        keep.add(i)
        i = back[i]
    return set(range(n)) - keep


def check_structure(notebook: dict, lab: Lab) -> list[str]:
    """Raise Invalid unless notebook is this lab with its required cells in order; return notes on
    what was tolerated."""
    cells = notebook["cells"]
    ids = [c["id"] for c in cells]
    present = set(ids)
    required = [c.id for c in lab.cells]
    mine = {c.id for c in lab.cells}
    share = len(present & mine) / len(mine)
    for other, other_ids in lab.others:
        distinctive = other_ids - mine
        if distinctive and share < 0.5 and len(present & distinctive) / len(distinctive) > share:
            raise Invalid(f"a notebook of the {other!r} lab, not the {lab.name!r} lab "
                          f"({len(present & distinctive)} of its cells come from {other!r})")
    if share == 0 or not (present & (mine - {lab.parameters_id})):
        raise Invalid(f"none of its cells come from the {lab.name!r} lab: is this the right file?")
    if lab.parameters_id not in present:
        raise Invalid(f"missing parameters cell: the lab's cell '{lab.parameters_id}' (tagged `parameters`) was "
                      "deleted, so the grader cannot set budget, seed and device")
    missing = [c for c in lab.cells if c.id not in present]
    if missing:
        lab_ids = mine | {NOTE_ID}
        renamed, deleted = [], []
        for cell in missing:
            match = next((c for c in cells if c["id"] not in lab_ids and c.get("cell_type") == cell.cell_type and cell.anchor
                          and cell.anchor in [line.strip() for line in _source(c).split("\n")]), None)
            (renamed if match else deleted).append(f"'{cell.id}'" + (f" is now '{match['id']}'" if match else ""))
        parts = []
        if renamed:
            parts.append(f"renamed cells: {', '.join(renamed)} (a cell must keep the lab's id: put your work "
                         "back into the original cell)")
        if deleted:
            parts.append(f"deleted cells: {', '.join(deleted)} (restore them from the lab)")
        raise Invalid("; ".join(parts))
    order = [i for i in ids if i in mine]
    moved = _moved([required.index(i) for i in order])
    if moved:
        described = []
        for k in sorted(moved):
            position = required.index(order[k])
            before = required[position - 1] if position else None
            described.append(f"'{order[k]}'" + (f" (the lab has it right after '{before}')" if before else " (the lab has it first)"))
        raise Invalid(f"reordered cells: {', '.join(described)}; move them back to the lab's order")
    notes = []
    parameters_cell = cells[ids.index(lab.parameters_id)]
    if "parameters" not in parameters_cell.get("metadata", {}).get("tags", []):
        notes.append(f"the cell '{lab.parameters_id}' had lost its `parameters` tag; the grader restored it")
    return notes


# ----------------------------------------------------------------------------------------------
# The probe cell: the one piece of grader code that runs in the student's kernel
# ----------------------------------------------------------------------------------------------

PROBE_SOURCE = '''\
# Appended by the reglab grader: probe the notebook's objects; the grader judges the data elsewhere.
def _reglab_grader_probes(namespace, plan, private_dir, private_files, out_path, seconds):
    import importlib.util, json, os, signal, sys

    class ProbeTimeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise ProbeTimeout()

    try:
        signal.signal(signal.SIGALRM, on_alarm)
        alarm = True
    except (ValueError, OSError):
        alarm = False
    import reglab.checks as checks
    results, private_loaded = {}, False
    for check_id, name, kind in plan:
        if kind == "private" and not private_loaded:           # only after every public probe ran
            private_loaded = True
            sys.path.insert(0, private_dir)
            for file in private_files:
                module_name = "reglab_private_tests." + file[:-3]
                try:
                    spec = importlib.util.spec_from_file_location(module_name, os.path.join(private_dir, file))
                    module = importlib.util.module_from_spec(spec)
                    sys.modules[module_name] = module
                    spec.loader.exec_module(module)
                except BaseException:
                    pass
        try:
            probe = checks.get(check_id).probe
        except BaseException as err:
            results[check_id] = {"unavailable": type(err).__name__}
            continue
        try:
            if name not in namespace:
                entry = {"missing": name}
            else:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, seconds)
                try:
                    data = probe(namespace[name])
                finally:
                    if alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                try:
                    json.dumps(data, allow_nan=True)
                    entry = {"data": data}
                except BaseException as err:
                    entry = {"error": "ProbeDataError", "message": "the probe returned data that is not JSON"}
        except ProbeTimeout:
            entry = {"error": "ProbeTimeout", "message": ""}
        except BaseException as err:
            try:
                entry = {"error": type(err).__name__, "message": str(err)[:500]}
            except BaseException:
                entry = {"error": "Exception", "message": ""}
        results[check_id] = entry
    with open(out_path + ".part", "w", encoding="utf-8") as f:
        json.dump({"results": results}, f, allow_nan=True)
    os.replace(out_path + ".part", out_path)

'''


def probe_cell(lab: Lab, workdir: Path) -> dict:
    plan = [[c.id, c.object_name, c.kind] for c in lab.checks]
    arguments = [plan, str(workdir / PRIVATE_DIR), [p.name for p in lab.private_files], str(workdir / PROBE_FILE),
                 PROBE_SECONDS]
    source = (PROBE_SOURCE + f"\n\n_reglab_grader_probes(globals(), {', '.join(map(repr, arguments))})\n"
              "del _reglab_grader_probes\n")
    return {"cell_type": "code", "id": PROBE_CELL_ID, "metadata": {"tags": ["reglab-grader"]},
            "source": source, "outputs": [], "execution_count": None}


def prepare(notebook: dict, lab: Lab, workdir: Path) -> dict:
    """The notebook to execute: outputs cleared, the parameters tag in place, grader cells the
    submission may carry removed, the lab's slider cells emptied, and the probe cell appended."""
    prepared = copy.deepcopy(notebook)
    cells = []
    for cell in prepared["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell["id"] == PROBE_CELL_ID or "injected-parameters" in tags or PAPERMILL_ERROR_TAG in tags:
            continue
        if cell["id"] == lab.parameters_id and "parameters" not in tags:
            cell.setdefault("metadata", {})["tags"] = list(tags) + ["parameters"]
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    prepared["cells"] = cells
    skip_widgets(prepared, lab.widget_ids)
    prepared["cells"].append(probe_cell(lab, workdir))
    prepared["metadata"] = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                            "language_info": {"name": "python"}}
    prepared["nbformat"], prepared["nbformat_minor"] = 4, 5
    return prepared


# ----------------------------------------------------------------------------------------------
# Judging, in the grader's process, from the data alone
# ----------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    check: PlannedCheck
    earned: int | None          # None: never judged (the submission did not run)
    message: str                # why it failed ("" when it passed)

    @property
    def passed(self) -> bool:
        return bool(self.earned is not None and self.earned == self.check.points and not self.message)


def _clean(text, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_probe_results(path: Path) -> tuple[dict | None, str]:
    """The probe file's per-check entries, or None and why it could not be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROBE_FILE_BYTES + 1)
    except OSError:
        return None, "the grader's probe cell wrote no results"
    if len(raw) > MAX_PROBE_FILE_BYTES:
        return None, f"the probe results exceed {MAX_PROBE_FILE_BYTES // 2**20} MB"
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, "the probe results are not valid JSON"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("results"), dict):
        return None, "the probe results do not have the grader's layout"
    return parsed["results"], ""


def judge_entry(check: PlannedCheck, entry) -> Verdict:
    """Judge one check's probe entry; anything malformed is a failure, never a crash."""
    name = f"`{check.object_name}`"
    if not isinstance(entry, dict):
        return Verdict(check, 0, "no probe data for this check (the probe cell did not reach it)")
    if "unavailable" in entry:
        return Verdict(check, 0, "the check could not be loaded in the notebook's kernel (did the notebook change "
                                 "`reglab.checks`?); if your notebook did not, tell your instructor")
    if "missing" in entry:
        return Verdict(check, 0, f"{name} is not defined after running the notebook "
                                 "(renamed, deleted, or its cell failed?)")
    if "error" in entry:
        kind = entry.get("error")
        kind = kind if isinstance(kind, str) and kind.isidentifier() and len(kind) <= 80 else "an exception"
        if kind == "NotImplementedError":
            return Verdict(check, 0, f"not implemented: {name} still raises NotImplementedError")
        if kind == "ProbeTimeout":
            return Verdict(check, 0, f"{name} ran longer than {PROBE_SECONDS} s on the check's input (an infinite loop?)")
        if kind == "ProbeDataError":
            return Verdict(check, 0, "the probe's data could not be saved as JSON")
        message = entry.get("message")
        detail = f": {_clean(message, 300)}" if check.kind != "private" and isinstance(message, str) and message.strip() else ""
        return Verdict(check, 0, f"{name} raised {kind}{detail}")
    data = entry.get("data")
    if not isinstance(data, dict):
        return Verdict(check, 0, "the probe data is malformed (not a JSON object); this counts as a failure")
    try:
        if len(json.dumps(data, allow_nan=True)) > MAX_CHECK_DATA_BYTES:
            return Verdict(check, 0, f"the probe data exceeds {MAX_CHECK_DATA_BYTES // 2**20} MB; this counts as a failure")
        check_registry.get(check.id).judge(data)
    except check_registry.CheckFailed as err:
        return Verdict(check, 0, _clean(err, 1500) or "failed")
    except Exception as err:                           # noqa: BLE001 - malformed data must never crash the grader
        return Verdict(check, 0, f"the probe data is malformed ({type(err).__name__} while judging it); "
                                 "this counts as a failure")
    return Verdict(check, check.points, "")


def judge_all(lab: Lab, results: dict | None, why_missing: str) -> list[Verdict]:
    if results is None:
        return [Verdict(c, 0, f"not checked: {why_missing}") for c in lab.checks]
    return [judge_entry(c, results.get(c.id)) for c in lab.checks]


# ----------------------------------------------------------------------------------------------
# One submission, start to end (runs in a worker process)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    budget: str = "ci"
    seed: int = 0
    device: str = "cpu"
    timeout_s: float = 300.0
    memory_mb: int = 4096
    uid: int | None = None          # base uid of student code (+ worker slot); None: the grader's own (self-check)
    sandbox: bool = True            # run inside bubblewrap; False: --no-sandbox (recorded) or --self-check

    def parameters(self) -> dict:
        return {"budget": self.budget, "seed": self.seed, "device": self.device}


@dataclass
class Graded:
    name: str
    status: str
    reason: str
    verdicts: list[Verdict]
    sha256: str
    seconds: float
    cell_errors: list[tuple[str, str]] = field(default_factory=list)   # (cell id, "Error: message")
    notes: list[str] = field(default_factory=list)
    executed: str | None = None      # the executed notebook's text, without the grader's cell

    @property
    def score(self) -> int:
        return sum(v.earned or 0 for v in self.verdicts)


def _cell_errors(executed: dict | None) -> list[tuple[str, str]]:
    errors = []
    for cell in (executed or {}).get("cells", []):
        if not isinstance(cell, dict) or cell.get("id") == PROBE_CELL_ID:
            continue
        for output in cell.get("outputs", []) if isinstance(cell.get("outputs"), list) else []:
            if isinstance(output, dict) and output.get("output_type") == "error":
                errors.append((str(cell.get("id")), _clean(f"{output.get('ename')}: {output.get('evalue')}", 240)))
    return errors


def _last_started_cell(executed: dict | None) -> str | None:
    """The cell the run stopped in: the last one papermill had started (cells after it are 'pending')."""
    last = None
    for cell in (executed or {}).get("cells", []):
        if isinstance(cell, dict) and cell.get("metadata", {}).get("papermill", {}).get("status") in ("running", "completed"):
            last = cell
    if last is None:
        return None
    return "the grader's probe cell" if last.get("id") == PROBE_CELL_ID else f"cell '{last.get('id')}'"


def _for_inspection(executed: dict | None) -> str | None:
    if executed is None:
        return None
    shown = copy.deepcopy(executed)
    shown["cells"] = [c for c in shown.get("cells", []) if isinstance(c, dict) and c.get("id") != PROBE_CELL_ID
                      and PAPERMILL_ERROR_TAG not in c.get("metadata", {}).get("tags", [])]
    return json.dumps(shown, indent=1, ensure_ascii=False) + "\n"


MEMORY_ERRORS = ("MemoryError:", "OutOfMemoryError:")                  # Python's, torch.cuda's
MEMORY_WORDS = ("DefaultCPUAllocator: can't allocate memory",)           # torch's CPU allocator, as RuntimeError


@dataclass
class Submission:
    """A submitted file after validation: its notebook when valid, else the reason it is not."""
    name: str
    path: Path
    sha256: str = ""
    notebook: dict | None = None
    notes: list[str] = field(default_factory=list)
    invalid: str = ""


def validate_submission(path: Path, name: str, lab: Lab) -> Submission:
    """Read and validate one file (cheap, no code runs)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        return Submission(name, path, invalid=f"could not read the file: {err.strerror}")
    sha = hashlib.sha256(raw).hexdigest()
    try:
        notebook = read_notebook(raw)
        notes = check_structure(notebook, lab)
    except Invalid as err:
        return Submission(name, path, sha, invalid=str(err))
    return Submission(name, path, sha, notebook, notes)


def invalid_graded(submission: Submission, lab: Lab) -> Graded:
    verdicts = [Verdict(c, None, "not run: the submission is invalid") for c in lab.checks]
    return Graded(submission.name, "invalid", submission.invalid, verdicts, submission.sha256, 0.0)


def grade_submission(path: Path, name: str, lab: Lab, options: Options, slot: int = 0) -> Graded:
    """Validate, execute and judge one submission. Never raises for anything the file contains."""
    submission = validate_submission(path, name, lab)
    return invalid_graded(submission, lab) if submission.invalid else run_submission(submission, lab, options, slot)


def run_submission(submission: Submission, lab: Lab, options: Options, slot: int = 0) -> Graded:
    """Execute a valid submission in the sandbox and judge its probe data here."""
    start = time.perf_counter()
    name, sha, notebook, notes = submission.name, submission.sha256, submission.notebook, submission.notes
    workdir = Path(tempfile.mkdtemp(prefix="reglab-grade-"))
    try:
        if lab.private_files:
            (workdir / PRIVATE_DIR).mkdir()
            for file in lab.private_files:
                shutil.copyfile(file, workdir / PRIVATE_DIR / file.name)
        uid = None if options.uid is None else options.uid + slot
        limits = Limits(timeout_s=options.timeout_s, memory_mb=options.memory_mb, uid=uid, sandbox=options.sandbox)
        run = execute(prepare(notebook, lab, workdir), workdir, options.parameters(), limits)
        results, why = read_probe_results(workdir / PROBE_FILE)
    finally:
        remove_tree(workdir)
    errors = _cell_errors(run.notebook)
    where = _last_started_cell(run.notebook)
    if run.outcome == "timeout":
        results, why = None, f"the notebook timed out after {options.timeout_s:g} s"
    verdicts = judge_all(lab, results, why)
    memory = [(cell, text) for cell, text in errors
              if text.startswith(MEMORY_ERRORS) or any(w in text for w in MEMORY_WORDS)]
    exits = [(cell, text) for cell, text in errors if text.startswith("SystemExit")]
    if run.outcome == "timeout":
        status, reason = "timeout", f"timed out: {where or 'the notebook'} was still running after {options.timeout_s:g} s"
    elif run.outcome == "kernel-died":
        status, reason = "error", (f"the kernel died{' while running ' + where if where else ''}: the code called "
                                   f"os._exit, killed its own process, or crashed (e.g. out of memory under the "
                                   f"{options.memory_mb} MB cap)")
    elif run.outcome == "crashed":
        status, reason = "error", f"the notebook's runner stopped{' during ' + where if where else ''}: {_clean(run.message, 300)}"
    elif memory:
        status, reason = "error", (f"out of memory in cell '{memory[0][0]}' ({_clean(memory[0][1], 100)}) under "
                                   f"the grader's {options.memory_mb} MB cap")
    elif exits:
        status, reason = "error", (f"cell '{exits[0][0]}' called sys.exit() ({exits[0][1]}): a notebook must run "
                                   "to its end; the cells after it ran anyway")
    elif results is None:
        status, reason = "error", f"the grader's probes did not report: {why}"
    else:
        status = "graded"
        passed = sum(v.passed for v in verdicts)
        reason = f"ran to the end in {run.wall_s:.0f} s; {passed} of {len(verdicts)} checks passed"
        if errors:
            shown = ", ".join(f"'{cell}' ({text.split(':')[0]})" for cell, text in errors[:4])
            reason += f"; errors in cells {shown}" + (f" and {len(errors) - 4} more" if len(errors) > 4 else "")
    if run.flooded:
        reason += f"; {run.flooded}"
    if not options.sandbox:
        reason += f"; {NO_SANDBOX_NOTE}"
    return Graded(name, status, reason, verdicts, sha, time.perf_counter() - start, errors, notes,
                  _for_inspection(run.notebook))


# ----------------------------------------------------------------------------------------------
# Feedback and the gradebook
# ----------------------------------------------------------------------------------------------

def feedback(graded: Graded, lab: Lab) -> str:
    """The student's feedback: status, score, every failed check with its judge's message."""
    kinds = {"public": "", "hidden": " (hidden test)", "private": " (instructor's test)"}
    lines = [f"# Feedback on `{graded.name}`: the {lab.name} lab", "",
             f"- **Status:** {graded.status} ({graded.reason})",
             f"- **Score:** {graded.score} / {lab.max_score}" + ("" if graded.status != "invalid" else " (nothing was run)"), ""]
    for note in graded.notes:
        lines.append(f"- Note: {note}")
    failed = [v for v in graded.verdicts if not v.passed]
    passed = [v for v in graded.verdicts if v.passed]
    if graded.status != "invalid":
        lines += ["", f"## Failed checks ({len(failed)})", ""]
        for v in failed:
            lines.append(f"- **{v.check.id}**{kinds[v.check.kind]}, 0 / {v.check.points}: {v.check.summary}.  ")
            lines.append(f"  {v.message}")
        if not failed:
            lines.append("None: every check passed.")
        lines += ["", f"## Passed checks ({len(passed)})", ""]
        lines += [f"- {v.check.id}{kinds[v.check.kind]}, {v.earned} / {v.check.points}: {v.check.summary}" for v in passed]
        if graded.cell_errors:
            lines += ["", "## Cells that raised errors", ""]
            lines += [f"- `{cell}`: {text}" for cell, text in graded.cell_errors]
    else:
        lines += ["", "The notebook was not run. Fix the problem above and submit again."]
    return "\n".join(lines) + "\n"


def slug(relative: Path) -> str:
    """A submission's name in the gradebook and in file names: its path under the argument, no suffix."""
    parts = list(relative.with_suffix("").parts) if relative.suffix == ".ipynb" else list(relative.parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(parts)).strip("._") or "submission"


def find_submissions(arguments: list[str], out: Path | None = None) -> list[tuple[Path, str]]:
    """(path, name) of each submission: files as given, folders searched for *.ipynb (except inside
    the output folder out, which holds the executed notebooks)."""
    found, names = [], {}
    skip = Path(out).resolve() if out else None
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            items = [(p, p.relative_to(path)) for p in sorted(path.rglob("*.ipynb"))
                     if ".ipynb_checkpoints" not in p.parts and p.is_file()
                     and not (skip and p.resolve().is_relative_to(skip))]
        elif path.exists():
            items = [(path, Path(path.name))]
        else:
            raise ValueError(f"no such file or folder: {argument!r}")
        for item, relative in items:
            name = slug(relative)
            if name in names and names[name] != item.resolve():
                raise ValueError(f"two submissions would share the name {name!r}: {names[name]} and {item}; "
                                 "grade them in separate runs or rename one")
            if name not in names:
                names[name] = item.resolve()
                found.append((item, name))
    return found


class Gradebook:
    """grades.csv, feedback/ and executed/ under the output folder. The rows and every file the grader
    wrote live here in memory; files are written atomically, and `restore` rewrites any that something
    else (a submission's code) changed."""

    def __init__(self, out: Path, lab: Lab):
        self.out, self.lab = Path(out), lab
        self.rows: dict[str, dict[str, str]] = {}
        self.files: dict[Path, bytes] = {}
        self.columns = BASE_COLUMNS + [c.id for c in lab.checks]
        self.warnings: list[str] = []
        self._load()

    @property
    def csv_path(self) -> Path:
        return self.out / "grades.csv"

    def _load(self) -> None:
        if not self.csv_path.exists():
            return
        try:
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                rows = list(reader)
            if header[: len(BASE_COLUMNS)] != BASE_COLUMNS:
                raise ValueError("unexpected header")
        except (OSError, ValueError, csv.Error, UnicodeDecodeError):
            aside = self.csv_path.with_name(f"grades.csv.unreadable-{int(time.time())}")
            os.replace(self.csv_path, aside)
            self.warnings.append(f"{self.csv_path} was not a gradebook; moved it to {aside.name} and started a new one")
            return
        self.columns += [c for c in header if c not in self.columns]
        for row in rows:
            if row.get("status") in STATUSES and row.get("submission"):
                self.rows[row["submission"]] = {k: v or "" for k, v in row.items() if k}
                for rel in (Path("feedback") / f"{row['submission']}.md", Path("executed") / f"{row['submission']}.ipynb"):
                    try:
                        self.files[self.out / rel] = (self.out / rel).read_bytes()
                    except OSError:
                        pass
        self.files[self.csv_path] = self._csv_bytes()

    def up_to_date(self, name: str, sha: str) -> bool:
        row = self.rows.get(name)
        return bool(row and row.get("sha256") == sha and row.get("status") in ("graded", "invalid")
                    and row.get("max_score") == str(self.lab.max_score)
                    and all(c.id in row for c in self.lab.checks))

    def _csv_bytes(self) -> bytes:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for name in sorted(self.rows):
            writer.writerow({k: self.rows[name].get(k, "") for k in self.columns})
        return buffer.getvalue().encode("utf-8")

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(handle, 0o666 & ~_UMASK)                 # mkstemp makes 0600; keep the user's umask
            with os.fdopen(handle, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        self.files[path] = data

    def record(self, graded: Graded) -> None:
        """Add one submission's row, feedback and executed notebook, then rewrite the gradebook."""
        row = {"submission": graded.name, "status": graded.status, "score": str(graded.score),
               "max_score": str(self.lab.max_score), "reason": graded.reason, "sha256": graded.sha256}
        row.update({v.check.id: "" if v.earned is None else str(v.earned) for v in graded.verdicts})
        self.rows[graded.name] = row
        self._write(self.out / "feedback" / f"{graded.name}.md", feedback(graded, self.lab).encode("utf-8"))
        executed = self.out / "executed" / f"{graded.name}.ipynb"
        if graded.executed is not None:
            self._write(executed, graded.executed.encode("utf-8"))
        elif executed in self.files or executed.exists():
            self.files.pop(executed, None)
            executed.unlink(missing_ok=True)
        self._write(self.csv_path, self._csv_bytes())

    def restore(self) -> list[str]:
        """Rewrite every file of ours that no longer holds what we wrote; return their names."""
        restored = []
        for path, data in list(self.files.items()):
            try:
                same = path.read_bytes() == data and not path.is_symlink()
            except OSError:
                same = False
            if not same:
                if path.is_symlink() or path.is_dir():
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                self._write(path, data)
                restored.append(str(path.relative_to(self.out)))
        return restored


# ----------------------------------------------------------------------------------------------
# Running many: a process pool, one submission per task
# ----------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)          # unwinds grade_submission, whose sandbox then kills the kernel


def _interrupt(signum, frame):
    raise KeyboardInterrupt                 # a terminated grader stops its workers the way Ctrl-C does


def _init_worker(lab: Lab, tests_dir: str | None, slots) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    skip_slow_optional_imports()
    importlib.import_module("nbformat")     # imported once here rather than inside the first timed submission
    if tests_dir:
        load_private_tests(Path(tests_dir), lab.prefixes)
    for check in lab.checks:                # import every judge before any student code runs
        check_registry.get(check.id)
    _WORKER.update(lab=lab, slot=slots.get() if slots is not None else 0)


def _grade_in_worker(submission: Submission, options: Options) -> Graded:
    return run_submission(submission, _WORKER["lab"], options, _WORKER["slot"])


def sandbox_uid(choice: str, sandboxed: bool = True) -> int | None:
    """The base uid of student code for --sandbox-uid choice (`reglab.grading.sandbox.choose_uid`)."""
    return choose_uid(choice, sandboxed)


def _lock(out: Path):
    """An exclusive lock on out (held while the returned file stays open): one grader per gradebook."""
    handle = open(out / ".grader.lock", "a")
    try:
        import fcntl
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:                      # not POSIX: no lock
        pass
    except OSError:
        handle.close()
        raise ValueError(f"another grader is writing to {out}; wait for it or choose another --out") from None
    return handle


def grade(lab: Lab, submissions: list[tuple[Path, str]], out: Path, options: Options, workers: int = 1,
          force: bool = False, tests_dir: Path | None = None, log=print) -> list[Graded]:
    """Grade submissions into out; returns what was graded in this run (skipped ones excluded)."""
    out = Path(out)
    problem = unavailable(DEFAULT_UID if options.uid is None else options.uid) if options.sandbox else ""
    if problem:                              # fail closed: no student code runs outside the sandbox unasked
        raise ValueError(problem)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        return _grade_unlocked(lab, submissions, out, options, workers, force, tests_dir, log)


def _grade_unlocked(lab, submissions, out, options, workers, force, tests_dir, log) -> list[Graded]:
    book = Gradebook(out, lab)
    for line in book.warnings:
        log(f"warning: {line}")
    todo, done = [], []
    for path, name in submissions:
        submission = validate_submission(path, name, lab)       # cheap, in this process: no code runs
        if not force and book.up_to_date(name, submission.sha256):
            row = book.rows[name]
            log(f"skipped {name}: already {row['status']} ({row['score']}/{lab.max_score}); --force regrades it")
        elif submission.invalid:
            graded = invalid_graded(submission, lab)
            book.record(graded)
            done.append(graded)
            log(f"{name}: invalid ({graded.reason})")
        else:
            todo.append(submission)
    if not todo:
        return done
    workers = min(workers, len(todo))
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(workers):
        slots.put(slot)
    start, finished = time.perf_counter(), 0
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                                  initargs=(lab, str(tests_dir) if tests_dir else None, slots))
    try:
        futures = {pool.submit(_grade_in_worker, submission, options): submission for submission in todo}
        for future in concurrent.futures.as_completed(futures):
            name = futures[future].name
            try:
                graded = future.result()
            except Exception as err:                 # noqa: BLE001 - the worker itself failed
                graded = Graded(name, "error", f"the grader's worker failed: {type(err).__name__}: {_clean(err, 200)}",
                                [Verdict(c, None, "not run: the grader failed") for c in lab.checks], futures[future].sha256, 0.0)
            book.record(graded)
            for path in book.restore():
                log(f"warning: restored {path}, which a submission's code had changed")
            done.append(graded)
            finished += 1
            log(f"[{finished}/{len(todo)}] {name}: {graded.status}, {graded.score}/{lab.max_score} "
                f"in {graded.seconds:.1f} s ({graded.reason})")
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):   # stop workers mid-submission
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for path in book.restore():
            log(f"warning: restored {path}, which a submission's code had changed")
    log(f"ran {len(todo)} submission(s) in {time.perf_counter() - start:.1f} s with {workers} worker(s); "
        f"gradebook: {book.csv_path}")
    return done


def self_check(notebook: Path, lab_name_or_path: str | None, options: Options, tests_dir: Path | None = None,
               log=print) -> int:
    """Run a student's notebook with the public checks only and print each verdict; 0 if all pass."""
    lab = load_lab(lab_name_or_path or infer_lab(notebook), tests_dir, kinds=("public",))
    options = dataclasses.replace(options, sandbox=False, uid=None)    # your own code, as your own user
    log(f"self-check of {notebook} against the {lab.name} lab (public checks only; budget {options.budget}, "
        f"device {options.device}); this takes about as long as running the notebook")
    graded = grade_submission(Path(notebook), Path(notebook).stem, lab, options)
    log(f"status: {graded.status} ({graded.reason})")
    for verdict in graded.verdicts:
        mark = "passed" if verdict.passed else "FAILED"
        log(f"  {mark}  {verdict.check.id} ({verdict.check.points} pt): {verdict.message or verdict.check.summary}")
    log(f"public checks: {graded.score} / {lab.max_score} points. The grade also counts hidden tests.")
    return 0 if graded.status == "graded" and graded.score == lab.max_score else 1


def infer_lab(notebook: Path) -> str:
    """The lab a notebook belongs to: the generated note names its solution, else the file name, else its ids."""
    try:
        cells = json.loads(Path(notebook).read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError, AttributeError):
        cells = []
    for cell in cells if isinstance(cells, list) else []:
        if isinstance(cell, dict) and cell.get("id") == NOTE_ID:
            match = re.search(r"solutions/([\w.-]+\.ipynb)", _source(cell))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reglab.grade", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", nargs="?", help="a lab's short name (dropout, ...) or its solution notebook's path")
    parser.add_argument("submissions", nargs="*", help="notebook files or folders of them")
    parser.add_argument("--out", metavar="DIR", help="output folder: grades.csv, feedback/, executed/")
    parser.add_argument("--self-check", metavar="NOTEBOOK", help="run your own lab with its public checks only")
    parser.add_argument("--lab", dest="lab_option", metavar="LAB", help="the lab, for --self-check (default: inferred)")
    parser.add_argument("--tests", metavar="DIR", help="folder of private test files: each adds Checks and lists "
                        "CHECKS = [(check id, object name), ...]")
    parser.add_argument("--workers", type=int, metavar="N", default=1, help="submissions graded at once (default 1)")
    parser.add_argument("--force", action="store_true", help="regrade submissions the gradebook already has")
    parser.add_argument("--timeout", type=float, metavar="S", default=300.0, help="seconds per submission (default 300)")
    parser.add_argument("--memory-mb", type=int, metavar="MB", default=4096, help="memory cap per process (default 4096)")
    parser.add_argument("--budget", default="ci", choices=["ci", "cpu", "gpu"], help="injected budget (default ci)")
    parser.add_argument("--seed", type=int, default=0, help="injected seed (default 0)")
    parser.add_argument("--device", default="cpu", help="injected device (default cpu)")
    parser.add_argument("--sandbox-uid", default="auto", metavar="UID",
                        help="uid for student code ('auto': 61000 + worker slot; 'self': the grader's own, not for root)")
    parser.add_argument("--no-sandbox", action="store_true", help="run student code without bubblewrap (no network "
                        "or filesystem isolation); printed, and recorded in every row's reason")
    args = parser.parse_args(argv)
    skip_slow_optional_imports()
    if args.workers < 1 or args.timeout <= 0 or args.memory_mb < 256:
        parser.error("--workers must be >= 1, --timeout > 0 and --memory-mb >= 256")
    tests_dir = Path(args.tests) if args.tests else None
    try:
        if args.self_check:
            if args.submissions or args.out:
                parser.error("--self-check takes one notebook and no --out")
            options = Options(args.budget, args.seed, args.device, args.timeout, args.memory_mb, None, sandbox=False)
            return self_check(Path(args.self_check), args.lab_option or args.lab, options, tests_dir)
        uid = sandbox_uid(args.sandbox_uid, sandboxed=not args.no_sandbox)
        options = Options(args.budget, args.seed, args.device, args.timeout, args.memory_mb, uid, sandbox=not args.no_sandbox)
        if not args.lab or not args.submissions or not args.out:
            parser.error("give LAB, at least one SUBMISSION and --out DIR (or --self-check NOTEBOOK)")
        lab = load_lab(args.lab, tests_dir)
        submissions = find_submissions(args.submissions, Path(args.out))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.no_sandbox:
        print(f"warning: --no-sandbox: student code runs without bubblewrap: it can reach the network and read what "
              f"uid {uid if uid is not None else os.getuid()} can read; every row's reason says so", file=sys.stderr)
    print(f"grading {len(submissions)} submission(s) of the {lab.name} lab: {len(lab.checks)} checks, "
          f"{lab.max_score} points; budget {options.budget}, timeout {options.timeout_s:g} s, memory {options.memory_mb} MB")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        grade(lab, submissions, Path(args.out), options, args.workers, args.force, tests_dir)
    except KeyboardInterrupt:
        print("interrupted: the gradebook holds every submission graded so far", file=sys.stderr)
        return 130
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
