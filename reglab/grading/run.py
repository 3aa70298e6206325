"""Grading room, one submission start to end: prepare, run in the sandbox, read back and judge, status and reason.

The sandbox (`reglab.grading.sandbox`: inside bubblewrap, with no network and nothing of the machine
visible but Python and the course, as an unprivileged uid, with a wall-clock timeout, memory and
process caps, every process killed at the end; `--no-sandbox`, which each row's reason then records,
runs without bubblewrap) executes the notebook with papermill in a fresh kernel in a private working directory, with the
parameters budget="ci", device="cpu", seed=0 (by default), the lab's slider cells emptied and progress
bars off (REGLAB_PROGRESS=0, set by the sandbox): a widget needs a person, and a headless
papermill/nbclient run can hang on a cell that opens widget comms (jupyter/nbclient#312,
jupyter/nbconvert#2029; it hung one of our CI runs for 300 s). The probe cell is appended at the end.
Status is graded, error, timeout or invalid, always with a reason; the score is the points of the
checks whose data reached the grader and passed.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from reglab.grading.judge import Verdict, judge_all, not_run, one_line
from reglab.grading.lab import Lab, skip_widgets
from reglab.grading.probe import PRIVATE_DIR, PROBE_CELL_ID, PROBE_FILE, probe_cell, read_probe_results
from reglab.grading.sandbox import Limits, execute, remove_tree
from reglab.grading.validate import Submission, validate_submission

STATUSES = ("graded", "error", "timeout", "invalid")
PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"
MEMORY_ERRORS = ("MemoryError:", "OutOfMemoryError:")                  # Python's, torch.cuda's
MEMORY_WORDS = ("DefaultCPUAllocator: can't allocate memory",)           # torch's CPU allocator, as RuntimeError
NO_SANDBOX_NOTE = "ran without the sandbox (--no-sandbox)"               # in the reason of every row graded so


@dataclass(frozen=True)
class Options:
    budget: str = "ci"              # injected into the parameters cell: seconds on 2 CPU cores
    seed: int = 0                   # injected too
    device: str = "cpu"             # injected too
    timeout_s: float = 300.0        # wall clock for one submission, kernel start-up included
    memory_mb: int = 4096           # memory cap per process of the submission
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


def _cell_errors(executed: dict | None) -> list[tuple[str, str]]:
    errors = []
    for cell in (executed or {}).get("cells", []):
        if not isinstance(cell, dict) or cell.get("id") == PROBE_CELL_ID:
            continue
        for output in cell.get("outputs", []) if isinstance(cell.get("outputs"), list) else []:
            if isinstance(output, dict) and output.get("output_type") == "error":
                errors.append((str(cell.get("id")), one_line(f"{output.get('ename')}: {output.get('evalue')}", 240)))
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


def invalid_graded(submission: Submission, lab: Lab) -> Graded:
    return Graded(submission.name, "invalid", submission.invalid, not_run(lab, "the submission is invalid"),
                  submission.sha256, 0.0)


def grade_submission(path: Path, name: str, lab: Lab, options: Options, slot: int = 0) -> Graded:
    """Validate, execute and judge one submission. Never raises for anything the file contains."""
    submission = validate_submission(path, name, lab)
    return invalid_graded(submission, lab) if submission.invalid else run_submission(submission, lab, options, slot)


def run_submission(submission: Submission, lab: Lab, options: Options, slot: int = 0) -> Graded:
    """Execute a valid submission in the sandbox and judge its probe data here."""
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="reglab-grade-"))
    try:
        if lab.private_files:
            (workdir / PRIVATE_DIR).mkdir()
            for file in lab.private_files:
                shutil.copyfile(file, workdir / PRIVATE_DIR / file.name)
        uid = None if options.uid is None else options.uid + slot
        limits = Limits(timeout_s=options.timeout_s, memory_mb=options.memory_mb, uid=uid, sandbox=options.sandbox)
        run = execute(prepare(submission.notebook, lab, workdir), workdir, options.parameters(), limits)
        results, why = read_probe_results(workdir / PROBE_FILE)
    finally:
        remove_tree(workdir)
    if run.outcome == "timeout":
        results, why = None, f"the notebook timed out after {options.timeout_s:g} s"
    verdicts = judge_all(lab, results, why)
    errors = _cell_errors(run.notebook)
    status, reason = status_and_reason(run, results is not None, why, verdicts, errors, options)
    if run.flooded:
        reason += f"; {run.flooded}"
    if not options.sandbox:
        reason += f"; {NO_SANDBOX_NOTE}"
    return Graded(submission.name, status, reason, verdicts, submission.sha256, time.perf_counter() - start,
                  errors, submission.notes, _for_inspection(run.notebook))


def status_and_reason(run, reported: bool, why: str, verdicts: list[Verdict], errors: list[tuple[str, str]],
                      options: Options) -> tuple[str, str]:
    """The submission's status and the reason for it, from how its run ended (a `sandbox.Execution`),
    whether its probes reported (else why not), its verdicts and its cells' errors."""
    where = _last_started_cell(run.notebook)
    memory = [(cell, text) for cell, text in errors
              if text.startswith(MEMORY_ERRORS) or any(w in text for w in MEMORY_WORDS)]
    exits = [(cell, text) for cell, text in errors if text.startswith("SystemExit")]
    if run.outcome == "timeout":
        return "timeout", f"timed out: {where or 'the notebook'} was still running after {options.timeout_s:g} s"
    if run.outcome == "kernel-died":
        return "error", (f"the kernel died{' while running ' + where if where else ''}: the code called "
                         f"os._exit, killed its own process, or crashed (e.g. out of memory under the "
                         f"{options.memory_mb} MB cap)")
    if run.outcome == "crashed":
        return "error", f"the notebook's runner stopped{' during ' + where if where else ''}: {one_line(run.message, 300)}"
    if memory:
        return "error", (f"out of memory in cell '{memory[0][0]}' ({one_line(memory[0][1], 100)}) under "
                         f"the grader's {options.memory_mb} MB cap")
    if exits:
        return "error", (f"cell '{exits[0][0]}' called sys.exit() ({exits[0][1]}): a notebook must run "
                         "to its end; the cells after it ran anyway")
    if not reported:
        return "error", f"the grader's probes did not report: {why}"
    passed = sum(v.passed for v in verdicts)
    reason = f"ran to the end in {run.wall_s:.0f} s; {passed} of {len(verdicts)} checks passed"
    if errors:
        shown = ", ".join(f"'{cell}' ({text.split(':')[0]})" for cell, text in errors[:4])
        reason += f"; errors in cells {shown}" + (f" and {len(errors) - 4} more" if len(errors) > 4 else "")
    return "graded", reason
